"""The head model reduced to its landmarks, for fast fitting.

A landmark is a barycentric combination of three mesh vertices and LBS is linear in the joint transforms, so

    X_l = sum_j (R_j q_lj + w_lj t_j) + translation,   q_lj = sum_c b_lc w_{v_c j} V~_{v_c},   w_lj = sum_c b_lc w_{v_c j}

where (R_j, t_j) is joint j's rest-to-posed transform, b the barycentrics, w the skinning weights and
V~ = template + shape + expression + pose-corrective blendshapes (FLAME eq. 11-12). The q_lj are linear in the
coefficients, so their bases are precomputed for the (landmark, joint) pairs with non-zero weight: one small matmul
per evaluation instead of skinning the mesh. The joints J(beta, psi) are regressed from the shaped mesh with
expression (as ``HeadModel.forward`` does) and enter only through t_j, linearly. All Jacobians are in closed form.
The result equals ``head.landmarks_3d(head(params))`` (to float rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..head.base import HeadModel, HeadParams, LandmarkEmbedding
from ..head.lbs import axis_angle_to_matrix


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(*v.shape, 3)


def axis_angle_derivative(aa: torch.Tensor) -> torch.Tensor:
    """d R / d aa_c of Rodrigues' formula: (..., 3) -> (..., 3 c, 3, 3).

    Gallego & Yezzi (2015): dR/dv_c = (v_c [v]x + [v x ((I - R) e_c)]x) R / |v|^2, and [e_c]x at v = 0.
    """
    R = axis_angle_to_matrix(aa)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device)
    n2 = (aa * aa).sum(-1)[..., None, None, None]  # (..., 1, 1, 1)
    I_minus_R = eye - R  # columns (I - R) e_c
    w = torch.cross(aa[..., None, :].expand(*aa.shape[:-1], 3, 3), I_minus_R.transpose(-1, -2), dim=-1)  # (..., c, 3)
    gen = aa[..., :, None, None] * _skew(aa)[..., None, :, :] + _skew(w)  # (..., c, 3, 3)
    general = gen @ R[..., None, :, :] / n2.clamp(min=1e-30)
    small = _skew(eye).expand(*aa.shape[:-1], 3, 3, 3)
    return torch.where(n2 > 1e-12, general, small)


class LandmarkRig(nn.Module):
    """A head model restricted to its landmarks.

    Args:
        head: the full head model (must have a landmark embedding).
        n_available: number of landmark columns in the observations (478 with irises, 468 without); embedded
            landmarks with a MediaPipe index at or beyond it are dropped.
        embedding: surface points to use instead of the head's landmark embedding (e.g. dense samples of the face
            for photometric refinement; their ``mp_index`` is then just their column number).
    Attributes:
        mp_index (L,) MediaPipe index of each kept landmark, in the embedding's order.
        joint_weight (L, J) total skinning weight of each landmark on each joint.
    """

    def __init__(self, head: HeadModel, n_available: int = 478, embedding: LandmarkEmbedding | None = None) -> None:
        super().__init__()
        emb = head.landmarks if embedding is None else embedding
        if emb is None:
            raise InputError(f"head model '{head.name}' has no landmark embedding", "use a head model with landmarks")
        keep = emb.mp_index < n_available
        if int(keep.sum()) < 6:
            raise InputError(
                f"only {int(keep.sum())} of head model '{head.name}' landmarks are among the {n_available} given",
                "pass MediaPipe face-mesh landmarks (468 or 478 points)",
            )
        f64 = lambda t: t.detach().double().cpu()  # noqa: E731  (precompute in double, store float)
        tri = head.faces[emb.faces[keep]].cpu()  # (L, 3) vertex ids
        bary = f64(emb.bary[keep])  # (L, 3)
        w = f64(head.lbs_weights)[tri]  # (L, 3, J)
        joint_weight = (bary[..., None] * w).sum(1)  # (L, J)
        L, J = joint_weight.shape
        # Pad each landmark's joint list to the largest count: dense (L, k) tables, no scatter needed.
        active = joint_weight.abs() > 1e-8
        k = max(int(active.sum(1).max()), 1)
        order = torch.argsort(active.double(), dim=1, descending=True, stable=True)[:, :k]  # (L, k) joint ids
        pair_used = torch.gather(active, 1, order)  # (L, k)
        coef = bary[:, :, None] * torch.gather(w, 2, order[:, None, :].expand(L, 3, k))  # (L, 3 corners, k)
        coef = coef * pair_used[:, None, :]

        def pair_basis(per_vertex: torch.Tensor) -> torch.Tensor:
            """per_vertex (V, 3, C) -> (C, L*k*3): sum_c coef * value at corner c."""
            vals = per_vertex[tri]  # (L, 3, 3, C)
            out = torch.einsum("lck,lcdn->lkdn", coef, vals)  # (L, k, 3, C)
            return out.reshape(L * k * 3, -1).T.contiguous().float()

        V = head.v_template.shape[0]
        n_pose = head.posedirs.shape[0] if head.posedirs.numel() else 0
        self.register_buffer("mp_index", emb.mp_index[keep].long().cpu().clone())
        self.register_buffer("joint_weight", joint_weight.float())
        self.register_buffer("pair_joint", order)  # (L, k)
        pair_weight = torch.gather(joint_weight, 1, order) * pair_used  # (L, k)
        self.register_buffer("pair_weight", pair_weight.float())
        # The same weights as a dense (L, J) matrix (sum over pairs of a joint's translation = one matmul).
        translation_weight = torch.zeros(L, J, dtype=torch.float64).scatter_add(1, order, pair_weight)
        self.register_buffer("translation_weight", translation_weight.float())
        self.register_buffer("q_template", pair_basis(f64(head.v_template)[..., None])[0])  # (L*k*3,)
        self.register_buffer("q_shape", pair_basis(f64(head.shapedirs)))  # (S, L*k*3)
        self.register_buffer("q_expr", pair_basis(f64(head.exprdirs)))  # (E, L*k*3)
        if n_pose:
            self.register_buffer("q_pose", pair_basis(f64(head.posedirs).reshape(n_pose, V, 3).permute(1, 2, 0)))
        else:
            self.register_buffer("q_pose", torch.zeros(0, L * k * 3))
        # Joints are regressed from the shaped mesh with expression (HeadModel.forward, as FLAME's code):
        # J(beta, psi) = J_regressor (template + S beta + E psi), linear in both.
        self.register_buffer("J_template", (f64(head.J_regressor) @ f64(head.v_template)).float())  # (J, 3)
        self.register_buffer(
            "J_shapedirs",
            torch.einsum("jv,vdc->jdc", f64(head.J_regressor), f64(head.shapedirs)).reshape(J * 3, -1).float(),
        )
        self.register_buffer(
            "J_exprdirs",
            torch.einsum("jv,vdc->jdc", f64(head.J_regressor), f64(head.exprdirs)).reshape(J * 3, -1).float(),
        )
        self.parents = [int(p) for p in head.parents.tolist()]
        # ancestor[m, j]: joint j is joint m or one of its ancestors (rotating j moves points skinned to m).
        anc = torch.zeros(J, J, dtype=torch.bool)
        for m in range(J):
            j = m
            while j >= 0:
                anc[m, j] = True
                j = self.parents[j]
        self.register_buffer("ancestor", anc)
        self.n_shape, self.n_expr, self.k = head.n_shape, head.n_expr, k
        self.expression_range = head.expression_range  # (lo, hi) of meaningful expression coefficients, or None

    @property
    def num_landmarks(self) -> int:
        return self.mp_index.shape[0]

    # ------------------------------------------------------------------------------------------------ kinematics
    def joints(self, shape: torch.Tensor, expression: torch.Tensor | None = None) -> torch.Tensor:
        """Rest joints (B, J, 3) for shape (B, S) and expression (B, E) (None: neutral)."""
        offset = shape @ self.J_shapedirs.T
        if expression is not None:
            offset = offset + expression @ self.J_exprdirs.T
        return self.J_template[None] + offset.reshape(offset.shape[0], -1, 3)

    def joint_transforms(self, pose: torch.Tensor, joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rest-to-posed transforms of each joint: x -> R x + t, as R (B, J, 3, 3), t (B, J, 3).

        pose (B, J, 3) axis-angle, joints (B, J, 3) rest locations. Written without in-place ops (vmap-able).
        """
        rot = axis_angle_to_matrix(pose)
        Rg, pg = [], []  # global rotation and posed location per joint
        for j, p in enumerate(self.parents):
            if p < 0:
                Rg.append(rot[:, j])
                pg.append(joints[:, j])
            else:
                Rg.append(Rg[p] @ rot[:, j])
                pg.append(pg[p] + (Rg[p] @ (joints[:, j] - joints[:, p])[..., None])[..., 0])
        R = torch.stack(Rg, 1)
        t = torch.stack(pg, 1) - (R @ joints[..., None])[..., 0]
        return R, t

    def translations_from_joints(self, R: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Joint translations t (..., B, J, 3) for global rotations R (B, J, 3, 3) and rest joints (..., B, J, 3).

        With the rotations fixed, t is linear in the joints, so this also maps joint *displacements* (e.g. the
        shape basis of J(beta)) to translation displacements.
        """
        pg = []
        for j, p in enumerate(self.parents):
            if p < 0:
                pg.append(joints[..., j, :])
            else:
                pg.append(pg[p] + (R[:, p] @ (joints[..., j, :] - joints[..., p, :])[..., None])[..., 0])
        return torch.stack(pg, -2) - (R @ joints[..., None])[..., 0]

    def pose_features(self, pose: torch.Tensor) -> torch.Tensor:
        """(B, (J-1)*9) pose-corrective features (R_j - I) of the non-root joints, as in ``head.lbs.lbs``."""
        rot = axis_angle_to_matrix(pose[:, 1:])
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        return (rot - eye).reshape(pose.shape[0], -1)

    # -------------------------------------------------------------------------------------------------- forward
    def linear_q(self, shape: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Pair points q (B, L, k, 3) from the linear blendshapes only (no pose correctives)."""
        B = expression.shape[0]
        q = self.q_template + shape @ self.q_shape + expression @ self.q_expr
        return q.reshape(B, -1, self.k, 3)

    def skin(self, q: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Landmarks (B, L, 3) from pair points q (B, L, k, 3) and joint transforms R (B, J, 3, 3), t (B, J, 3)."""
        Rp = R[:, self.pair_joint]  # (B, L, k, 3, 3)
        return (Rp @ q[..., None])[..., 0].sum(2) + torch.einsum("lj,bjd->bld", self.translation_weight, t)

    def landmarks(
        self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor, translation: torch.Tensor
    ) -> torch.Tensor:
        """Posed landmarks (B, L, 3). shape (B or 1, S), expression (B, E), pose (B, J, 3), translation (B, 3)."""
        B = expression.shape[0]
        shape = shape.expand(B, -1)
        q = self.linear_q(shape, expression)
        if self.q_pose.shape[0]:
            q = q + (self.pose_features(pose) @ self.q_pose).reshape(B, -1, self.k, 3)
        R, t = self.joint_transforms(pose, self.joints(shape, expression))
        return self.skin(q, R, t) + translation[:, None, :]

    def forward(self, params: HeadParams) -> torch.Tensor:
        """Posed 3D landmarks (B, L, 3) in world space. ``params.shape`` may be (1, S) and is broadcast."""
        return self.landmarks(params.shape, params.expression, params.full_pose(), params.translation)

    def canonical_landmarks(self, shape: torch.Tensor | None = None) -> torch.Tensor:
        """(L, 3) neutral, zero-pose landmarks for shape (S,) (default zeros)."""
        params = HeadParams.zeros(1, self.n_shape, self.n_expr, device=self.q_template.device)
        if shape is not None:
            params.shape = shape.reshape(1, -1).to(self.q_template)
        return self(params)[0]

    # ------------------------------------------------------------------------------------------------ jacobians
    def pose_jacobian(
        self, pose: torch.Tensor, joints: torch.Tensor, q: torch.Tensor, joint_ids: list[int]
    ) -> torch.Tensor:
        """d landmarks / d local axis-angles of ``joint_ids``: (B, L, 3, 3 * len(joint_ids)), in closed form.

        pose (B, J, 3), joints (B, J, 3) rest locations, q (B, L, k, 3) pair points including pose correctives.
        Rotating joint j by a small local dR moves every point y skinned below it by
        ``Rg_parent dR R_j^T Rg_parent^T (y - p_j)`` (p_j its posed location); joints other than the root also
        change the pose-corrective blendshapes through (R_j - I).
        """
        B = pose.shape[0]
        rot = axis_angle_to_matrix(pose)  # (B, J, 3, 3) local
        d_rot = axis_angle_derivative(pose)  # (B, J, c, 3, 3)
        R, t = self.joint_transforms(pose, joints)
        posed_joints = (R @ joints[..., None])[..., 0] + t  # (B, J, 3)
        Rp = R[:, self.pair_joint]  # (B, L, k, 3, 3)
        y = (Rp @ q[..., None])[..., 0] + self.pair_weight[None, :, :, None] * t[:, self.pair_joint]  # (B, L, k, 3)
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device).expand(B, 3, 3)
        blocks = []
        for j in joint_ids:
            p = self.parents[j]
            Rg = eye if p < 0 else R[:, p]
            # World-frame generator of the local rotation change: Rg dR_c R_loc^T Rg^T, for c = 0..2.
            A = Rg[:, None] @ d_rot[:, j] @ rot[:, j, None].transpose(-1, -2) @ Rg[:, None].transpose(-1, -2)
            below = self.ancestor[self.pair_joint, j].to(q.dtype)  # (L, k): pair's joint is j or below
            Y = ((y - self.pair_weight[None, :, :, None] * posed_joints[:, j, None, None]) * below[..., None]).sum(2)
            dX = torch.einsum("bcde,ble->bldc", A, Y)  # (B, L, 3, c)
            if p >= 0 and self.q_pose.shape[0]:
                rows = self.q_pose[(j - 1) * 9:j * 9]  # (9, L*k*3): correctives driven by (R_j - I)
                dq = (d_rot[:, j].reshape(B, 3, 9) @ rows).reshape(B, 3, -1, self.k, 3)  # (B, c, L, k, 3)
                dX = dX + torch.einsum("blkde,bclke->bldc", Rp, dq)
            blocks.append(dX)
        return torch.cat(blocks, -1)

    def joint_shift_jacobian(self, R: torch.Tensor, joint_dirs: torch.Tensor) -> torch.Tensor:
        """d landmarks / d coefficients (B, L, 3, C) through the joint locations, for joint bases (J*3, C).

        With the rotations R (B, J, 3, 3) fixed, the joint translations are linear in the rest joints.
        """
        B, J = R.shape[:2]
        C = joint_dirs.shape[1]
        dJ = joint_dirs.T.reshape(C, 1, J, 3).expand(C, B, J, 3)
        dt = self.translations_from_joints(R, dJ)  # (C, B, J, 3)
        return torch.einsum("lj,cbjd->bldc", self.translation_weight, dt)

    def linear_jacobian(self, R: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """d landmarks / d coefficients (B, L, 3, C) through the pair points q only, for a basis (C, L*k*3)."""
        C = basis.shape[0]
        Rp = R[:, self.pair_joint]  # (B, L, k, 3, 3)
        b = basis.T.reshape(self.num_landmarks, self.k, 3, C)  # (L, k, 3, C)
        return torch.einsum("blkde,lkec->bldc", Rp, b)
