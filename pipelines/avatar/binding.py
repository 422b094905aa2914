"""Gaussians bound to the head mesh through the UV space, animated by the posed mesh.

As in GaussianAvatars / GGHead: every Gaussian sits on a triangle at fixed barycentrics; its offset and rotation are
expressed in the triangle's local frame (tangent, bitangent, normal), and its size follows the triangle's size. When
the mesh moves, the Gaussian moves, rotates and scales with its triangle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..head.base import HeadModel, HeadParams
from ..head.lbs import blend_shapes, joint_rotations
from ..uv.space import UVSpace
from .maps import ATTRIBUTE_SLICES
from .pose_kernel import fused_pose_available, pose_gaussians


@dataclass
class Gaussians:
    """A batch of 3D Gaussians: means (B, G, 3), quats (B, G, 4) w,x,y,z, scales (B, G, 3) metres,
    opacities (B, G), colors (B, G, C)."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor

    def __len__(self) -> int:
        return self.means.shape[1]

    def index(self, b) -> "Gaussians":
        return Gaussians(*(t[b : b + 1] for t in (self.means, self.quats, self.scales, self.opacities, self.colors)))


def triangle_frames(verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal frames (B, F, 3, 3) (columns: tangent, bitangent, normal) and sizes (B, F) = sqrt(2 * area)."""
    tri = verts[:, faces]  # (B, F, 3 corners, 3)
    e1, e2 = (tri[:, :, 1:] - tri[:, :, :1]).unbind(-2)
    n = torch.cross(e1, e2, dim=-1)
    size = n.norm(dim=-1).clamp(min=1e-12).sqrt()
    n = F.normalize(n, dim=-1, eps=1e-12)
    t = F.normalize(e1, dim=-1, eps=1e-12)
    b = torch.cross(n, t, dim=-1)
    return torch.stack([t, b, n], dim=-1), size


# The four candidate quaternions of a rotation matrix m (row-major m00..m22), times 4 * their largest-denominator
# component: entry [i, j] = sum_t _QUAT_SIGN[i, j, t] * m[_QUAT_INDEX[i, j, t]] (+ 1 on the diagonal). Row i is the
# candidate whose component i is computed from the diagonal, e.g. row 0 = (1 + m00 + m11 + m22, m21 - m12, ...).
_QUAT_TERMS = (
    ((("+", 0), ("+", 4), ("+", 8)), (("+", 7), ("-", 5)), (("+", 2), ("-", 6)), (("+", 3), ("-", 1))),
    ((("+", 7), ("-", 5)), (("+", 0), ("-", 4), ("-", 8)), (("+", 3), ("+", 1)), (("+", 2), ("+", 6))),
    ((("+", 2), ("-", 6)), (("+", 3), ("+", 1)), (("-", 0), ("+", 4), ("-", 8)), (("+", 5), ("+", 7))),
    ((("+", 3), ("-", 1)), (("+", 6), ("+", 2)), (("+", 7), ("+", 5)), (("-", 0), ("-", 4), ("+", 8))),
)


@functools.lru_cache(maxsize=8)
def _quat_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather indices (48,), signs (4, 4, 3) and the 4x4 identity for ``matrix_to_quat``, cached per device: a
    host-to-device copy every call would stall the stream (and cannot be captured in a CUDA graph)."""
    index = torch.tensor([[[t[1] for t in e] + [0] * (3 - len(e)) for e in row] for row in _QUAT_TERMS])
    sign = torch.tensor([[[1.0 if t[0] == "+" else -1.0 for t in e] + [0.0] * (3 - len(e)) for e in row]
                         for row in _QUAT_TERMS])
    return index.flatten().to(device), sign.to(device, dtype), torch.eye(4, dtype=dtype, device=device)


def matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) w,x,y,z with w >= 0.

    Builds the four algebraically equivalent candidates (Shepperd's method) and keeps, per matrix, the one with the
    largest denominator, which is accurate to float precision everywhere (no sign or small-component issues). The
    candidates come from one gather of the matrix entries (a handful of kernels, not ~50: this runs every frame).
    """
    m = R.reshape(*R.shape[:-2], 9)
    index, sign, eye = _quat_tables(R.device, R.dtype)
    cand = (m[..., index].unflatten(-1, (4, 4, 3)) * sign).sum(-1) + eye  # (..., 4, 4)
    best = cand.diagonal(dim1=-2, dim2=-1).argmax(-1)  # largest (1 +- m00 +- m11 +- m22)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    # Normalize and pick the w >= 0 sign in one division (w == 0 keeps the candidate's sign).
    return q / torch.where(q[..., :1] < 0, -1.0, 1.0) / q.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of quaternions (..., 4) w,x,y,z: the rotation b followed by a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )


def texel_frames(uv: UVSpace, verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle frames (B, K, K, 3, 3) and sizes (B, K, K) looked up per texel of the UV map."""
    R, size = triangle_frames(verts, faces)
    fi = uv.face_index.clamp(min=0)
    return R[:, fi], size[:, fi]


def posed_to_canonical_offsets(uv: UVSpace, offsets: torch.Tensor, posed: torch.Tensor, canonical: torch.Tensor,
                               faces: torch.Tensor) -> torch.Tensor:
    """Re-express per-texel world offsets (B, 3, K, K) made on the posed mesh as offsets on the canonical mesh.

    The network refines the *source* (posed) position map, but the avatar stores Δp_uv on its canonical mesh: each
    offset is carried through its triangle's local frame (rotation and size) from one mesh to the other.
    """
    R_p, s_p = texel_frames(uv, posed, faces)
    R_c, s_c = texel_frames(uv, canonical, faces)
    d = offsets.permute(0, 2, 3, 1)[..., None]  # (B, K, K, 3, 1)
    local = (R_p.transpose(-1, -2) @ d) / s_p[..., None, None]
    out = (R_c @ local)[..., 0] * s_c[..., None]
    return out.permute(0, 3, 1, 2) * uv.valid


def quat_right_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) matrices M(q) with ``M(q) @ p == quat_multiply(p, q)`` for quaternions q (..., 4) w,x,y,z.

    The Hamilton product is linear in its left factor; with the right factor fixed per Gaussian, the product with a
    per-frame rotation becomes one multiply-and-sum (instead of ~30 element-wise kernels of ``quat_multiply``).
    """
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([w, -x, -y, -z], -1),
        torch.stack([x, w, z, -y], -1),
        torch.stack([y, -z, w, x], -1),
        torch.stack([z, y, -x, w], -1),
    ], -2)


def forward_kinematics(rot: torch.Tensor, joints: torch.Tensor, parents: tuple[int, ...]) -> torch.Tensor:
    """Skinning transforms (B, J, 3, 4) that map rest-pose points to posed points; the maths of
    ``head.lbs.rigid_transforms``, with the kinematic tree as Python ints.

    Args:
        rot: (B, J, 3, 3) local joint rotations; joints: (B, J, 3) rest joint locations;
        parents: parent of each joint (-1 for the root), topologically sorted.

    Reading ``parents`` from a device tensor (``int(parents[j])``) would synchronise with the GPU on every call
    and forbid CUDA-graph capture; Python ints cost nothing.
    """
    Rw: list[torch.Tensor] = []
    tw: list[torch.Tensor] = []
    for j, p in enumerate(parents):
        if p < 0:
            Rw.append(rot[:, j])
            tw.append(joints[:, j])
        else:
            Rw.append(Rw[p] @ rot[:, j])
            tw.append((Rw[p] @ (joints[:, j] - joints[:, p])[..., None])[..., 0] + tw[p])
    R = torch.stack(Rw, 1)  # (B, J, 3, 3) world rotations
    t = torch.stack(tw, 1) - (R @ joints[..., None])[..., 0]  # posed joints minus the rotated rest joints
    return torch.cat([R, t[..., None]], -1)


class AvatarRig:
    """Gaussians of B avatars (usually 1), ready to be posed; differentiable w.r.t. the maps (training uses it).

    Built from the attribute maps A (B, 14, K, K), the UV shape offset Δp_uv (B, 3, K, K) on the canonical mesh (or
    None) and the avatars' shapes (B, S); ``pose(verts)`` then places the Gaussians on posed meshes of the same head
    model - the per-frame hot path of reenactment and turntables. ``pose_params`` goes from tracked parameters to
    Gaussians without a device synchronisation, so it can be captured in a CUDA graph (:class:`PoseGraph`).
    """

    def __init__(self, head: HeadModel, uv: UVSpace, maps: torch.Tensor, shape: torch.Tensor,
                 delta_p: torch.Tensor | None = None) -> None:
        self.head = head
        self.uv = uv
        B = maps.shape[0]
        self.shape = shape.reshape(B, -1)
        faces = head.faces
        canonical = head.canonical(self.shape)  # (B, V, 3)
        R_can, size_can = triangle_frames(canonical, faces)
        self._face = uv.sample_face
        self._bary = uv.sample_bary
        self._size_can = size_can[:, self._face]  # (B, G)
        attrs = uv.sample_maps(maps)  # (B, G, 14)
        R = R_can[:, self._face]  # (B, G, 3, 3)
        offset = attrs[..., ATTRIBUTE_SLICES["offset"]]
        if delta_p is not None:
            offset = offset + uv.sample_maps(delta_p)
        # Offsets live in the canonical triangle's frame so they follow it when posed.
        self.offset_local = (R.transpose(-1, -2) @ offset[..., None])[..., 0]
        self.quat_local = F.normalize(attrs[..., ATTRIBUTE_SLICES["rotation"]], dim=-1)
        self._quat_right = quat_right_matrix(self.quat_local)  # (B, G, 4, 4)
        self.scale_base = attrs[..., ATTRIBUTE_SLICES["scale"]] * uv.sample_scale()[:, None]
        self.opacity = attrs[..., ATTRIBUTE_SLICES["opacity"]][..., 0]
        self.color = attrs[..., ATTRIBUTE_SLICES["color"]]
        self._identity: dict[str, torch.Tensor] | None = None
        self._graphs: dict[tuple[int, int], PoseGraph] = {}
        # Inference posing through the fused Triton kernel (pose_kernel.py) where it can run; False forces the
        # PyTorch path (benchmarks and checks compare the two).
        self.fused = True
        self._fused_inputs: tuple[torch.Tensor, ...] | None = None

    @property
    def num_gaussians(self) -> int:
        return self.color.shape[1]

    def _identity_terms(self) -> dict[str, torch.Tensor]:
        """What the avatar's fixed shape contributes to every frame, computed once (on the first ``pose_params``).

        v (B, V*3) template + shape blendshapes; J (B, J*3) their regressed joints; exprdirs (E, V*3) and
        J_exprdirs (E, J*3) the expression basis and its regressed joints, laid out for one matrix product a frame.
        """
        if self._identity is None:
            h = self.head
            V, _, E = h.exprdirs.shape
            v_id = h.v_template[None] + blend_shapes(self.shape, h.shapedirs)  # (B, V, 3)
            self._identity = {
                "v": v_id.reshape(v_id.shape[0], V * 3),
                "J": torch.einsum("jv,bvd->bjd", h.J_regressor, v_id).flatten(1),
                "exprdirs": h.exprdirs.permute(2, 0, 1).reshape(E, V * 3),
                "J_exprdirs": torch.einsum("jv,vdc->cjd", h.J_regressor, h.exprdirs).reshape(E, -1),
                "posedirs": h.posedirs if h.posedirs.numel() else None,
                "parents": tuple(int(p) for p in h.parents.tolist()),
            }
        return self._identity

    def posed_vertices(self, params: HeadParams) -> torch.Tensor:
        """Posed mesh (B, V, 3) for tracked parameters (B frames) with the avatar's shape.

        Equal to ``head(params)`` with ``params.shape`` replaced by the avatar's (FLAME eq. 11-12, joints regressed
        from the shaped mesh with expression), but the identity terms are precomputed, the expression blendshapes
        and their joints are one matrix product each, and nothing reads back from the device.
        """
        idt = self._identity_terms()
        B = params.batch
        V = self.head.v_template.shape[0]
        v = torch.addmm(idt["v"], params.expression, idt["exprdirs"]).view(B, V, 3)
        joints = torch.addmm(idt["J"], params.expression, idt["J_exprdirs"]).view(B, -1, 3)
        rot, translation = joint_rotations(params.full_pose(), joints, params.translation, self.head.neck_share)
        if idt["posedirs"] is not None:
            eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
            v = v + ((rot[:, 1:] - eye).reshape(B, -1) @ idt["posedirs"]).view(B, V, 3)
        A = forward_kinematics(rot, joints, idt["parents"])  # (B, J, 3, 4)
        # One (V, J) x (J, B*12) product for every frame's skinning transforms (an einsum ran it as B gemv calls).
        T = (self.head.lbs_weights @ A.flatten(2).transpose(0, 1).flatten(1)).view(V, B, 3, 4).transpose(0, 1)
        verts = (T[..., :3] * v[:, :, None, :]).sum(-1) + T[..., 3]
        return verts + translation[:, None, :]

    def pose_params(self, params: HeadParams) -> Gaussians:
        """Gaussians for tracked parameters (B frames); the avatar's own shape replaces ``params.shape``."""
        return self.pose(self.posed_vertices(params))

    def pose_graph(self, batch: int, slot: int = 0) -> "PoseGraph":
        """``pose_params`` for ``batch`` frames a call as a CUDA graph, captured on first use and kept with the rig
        (inference only: the graph records no autograd history, and the maps must not change afterwards). Graphs of
        different ``slot`` have their own output buffers (one can be rendered while the other is posed)."""
        if (batch, slot) not in self._graphs:
            self._graphs[batch, slot] = PoseGraph(self, batch)
        return self._graphs[batch, slot]

    def pose(self, verts: torch.Tensor, colors: torch.Tensor | None = None) -> Gaussians:
        """Gaussians (B, G, ...) on posed vertices (B, V, 3) (B must equal the rig's batch, or the rig's is 1).

        ``colors`` (B or 1, G, C) replaces the colours (e.g. positions for the 3D TV loss).
        """
        B = verts.shape[0]
        color = self.color if colors is None else colors
        if self._use_fused(verts):
            means, quats, scales = pose_gaussians(verts, *self._fused_kernel_inputs())
            return Gaussians(means, quats, scales, self.opacity.expand(B, -1), color.expand(B, -1, -1))
        faces = self.head.faces
        R, size = triangle_frames(verts, faces)  # (B, F, 3, 3), (B, F)
        # Everything a Gaussian needs from its triangle, gathered in one pass: frame (9), quaternion (4), size (1),
        # corner positions (9).
        per_face = torch.cat([R.flatten(-2), matrix_to_quat(R), size[..., None], verts[:, faces].flatten(-2)], -1)
        tri = per_face[:, self._face]  # (B, G, 23)
        # 3x3 and 4x4 products per Gaussian as multiply-and-sum, not batched matmuls: cuBLAS runs (B*G)-batched
        # tiny products as gemv kernels that took most of the pose step on the GPU (bench/profile_pose.py).
        Rg = tri[..., :9].unflatten(-1, (3, 3))
        k = tri[..., 13] / self._size_can  # (B, G) triangle growth
        surface = (tri[..., 14:].unflatten(-1, (3, 3)) * self._bary[..., None]).sum(-2)
        means = surface + k[..., None] * (Rg * self.offset_local[..., None, :]).sum(-1)
        quats = (self._quat_right * tri[..., None, 9:13]).sum(-1)  # q_face (x) quat_local
        scales = self.scale_base * k[..., None]
        return Gaussians(means, quats, scales, self.opacity.expand(B, -1), color.expand(B, -1, -1))

    def _use_fused(self, verts: torch.Tensor) -> bool:
        """The fused kernel has no backward: used only when no gradient is wanted, on float32 CUDA tensors."""
        wants_grad = torch.is_grad_enabled() and (verts.requires_grad or self.offset_local.requires_grad
                                                  or self.scale_base.requires_grad or self.quat_local.requires_grad)
        return (self.fused and not wants_grad and verts.dtype == torch.float32
                and self.offset_local.shape[0] in (1, verts.shape[0]) and fused_pose_available(verts.device))

    def _fused_kernel_inputs(self) -> tuple[torch.Tensor, ...]:
        """faces, face_of (int32), bary, size_can, offset_local, quat_local, scale_base as the kernel reads them
        (contiguous float32), made once: the rig's maps do not change after it is built."""
        if self._fused_inputs is None:
            self._fused_inputs = (
                self.head.faces.to(torch.int32).contiguous(), self._face.to(torch.int32).contiguous(),
                self._bary.float().contiguous(),
                *(t.detach().float().contiguous() for t in (self._size_can, self.offset_local, self.quat_local,
                                                             self.scale_base)))
        return self._fused_inputs


class PoseGraph:
    """``rig.pose_params`` for a fixed number of frames, captured once in a CUDA graph and replayed per call.

    Posing is ~100 small kernels whose launch cost, not their work, dominates at a few frames per call; a graph
    replays them with one launch. Inputs are copied into static buffers; the returned Gaussians live in the graph's
    static outputs, so they are overwritten by the next call (consume or clone them first). CUDA only.
    """

    def __init__(self, rig: AvatarRig, batch: int, warmup: int = 2) -> None:
        device = rig.color.device
        if device.type != "cuda":
            raise ValueError(f"PoseGraph needs a CUDA rig, got one on '{device}'")
        self.batch = batch
        self.params = rig.head.zero_params(batch)  # static inputs (zeros are a valid pose)
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                rig.pose_params(self.params)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.no_grad(), torch.cuda.graph(self.graph):
            out = rig.pose_params(self.params)
        # Opacities and colours do not change from frame to frame: made contiguous once here rather than copied by
        # the renderer on every call.
        self.out = Gaussians(out.means, out.quats, out.scales, out.opacities.contiguous(), out.colors.contiguous())

    def __call__(self, params: HeadParams) -> Gaussians:
        if params.batch != self.batch:
            raise ValueError(f"this PoseGraph poses {self.batch} frames a call, got {params.batch}")
        for name, buf in self.params.to_dict().items():
            if name != "shape":  # the rig's own shape is used, as in pose_params
                buf.copy_(getattr(params, name))
        self.graph.replay()
        return self.out
