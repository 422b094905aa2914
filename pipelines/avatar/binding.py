"""Gaussians bound to the head mesh through the UV space, animated by the posed mesh.

As in GaussianAvatars / GGHead: every Gaussian sits on a triangle at fixed barycentrics; its offset and rotation are
expressed in the triangle's local frame (tangent, bitangent, normal), and its size follows the triangle's size. When
the mesh moves, the Gaussian moves, rotates and scales with its triangle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..head.base import HeadModel, HeadParams
from ..head.lbs import blend_shapes, joint_rotations
from ..uv.space import UVSpace
from .maps import ATTRIBUTE_SLICES
from .pose_kernel import fused_pose_available, pose_gaussians
from .quaternion import matrix_to_quat, quat_right_matrix
from .skinning import PositionSkinning, SkinningConfig


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

    With the ``source`` pose the maps were predicted for (one avatar), ``pose_params`` also applies ``skinning``
    (skinning.py): Gaussians far from their triangle follow the joints by where they are, and the chest holds the
    source's translation. ``pose(verts)`` is the paper's binding alone (training uses it).
    """

    def __init__(self, head: HeadModel, uv: UVSpace, maps: torch.Tensor, shape: torch.Tensor,
                 delta_p: torch.Tensor | None = None, source: HeadParams | None = None,
                 skinning: SkinningConfig | None = None) -> None:
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
        self.skinning = skinning or SkinningConfig()
        self.position_skinning: PositionSkinning | None = None
        self._torso_translation: torch.Tensor | None = None  # (1, 3) the chest's translation when it holds still
        if source is not None:
            self._bind_source(source, canonical)

    def _bind_source(self, source: HeadParams, canonical: torch.Tensor) -> None:
        """Precompute what ``skinning`` needs from the source pose (batch 1): its joint transforms and translation."""
        if self.shape.shape[0] != 1 or source.batch != 1:
            raise ValueError("source-pose skinning is for one avatar and its one source frame")
        with torch.no_grad():
            _, E_source, translation = self._posed(source, hold_torso=False)
            if self.skinning.torso_follow < 1.0:
                self._torso_translation = translation
            if self.skinning.by_position:
                means = self.pose(canonical).means[0]  # (G, 3) canonical Gaussian centres
                self.position_skinning = PositionSkinning.build(
                    means, canonical[0], self.head.lbs_weights, self.head.faces, self._face, self._bary, E_source,
                    self.skinning)

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
        and their joints are one matrix product each, and nothing reads back from the device. With a source pose
        and ``skinning.torso_follow`` < 1 the chest holds (part of) the source's translation.
        """
        return self._posed(params)[0]

    def posed_skeleton(self, params: HeadParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Posed vertices (B, V, 3) and the joints' skinning transforms E (B, J, 3, 4) that ``reskin`` takes."""
        verts, E, _ = self._posed(params)
        return verts, E

    def reskin(self, g: Gaussians, E: torch.Tensor) -> Gaussians:
        """Gaussians posed by their triangles (``pose``) -> those the offsets moved off their triangle re-posed by
        the joints E (B, J, 3, 4) with the weights of where they are (skinning.py); ``g`` itself without a source."""
        if self.position_skinning is None:
            return g
        means, quats = self.position_skinning.apply(g.means, g.quats, E)
        return Gaussians(means, quats, g.scales, g.opacities, g.colors)

    def _posed(self, params: HeadParams, hold_torso: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posed vertices (B, V, 3), the joints' skinning transforms E (B, J, 3, 4) with the translation in them
        (vertex = sum_j w_j E_j v), and the translation (B, 3) of the rigid head turn (``lbs.joint_rotations``)."""
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
        verts = (T[..., :3] * v[:, :, None, :]).sum(-1) + T[..., 3] + translation[:, None, :]
        E = torch.cat([A[..., :3], A[..., 3:] + translation[:, None, :, None]], -1)
        if hold_torso and self._torso_translation is not None:
            # The root (chest) keeps the source's translation; the head's own joints are unchanged.
            hold = (1.0 - self.skinning.torso_follow) * (self._torso_translation - translation)  # (B, 3)
            verts = verts + self.head.lbs_weights[None, :, 0, None] * hold[:, None]
            root = torch.cat([E[:, :1, :, :3], E[:, :1, :, 3:] + hold[:, None, :, None]], -1)
            E = torch.cat([root, E[:, 1:]], 1)
        return verts, E, translation

    def pose_params(self, params: HeadParams) -> Gaussians:
        """Gaussians for tracked parameters (B frames); the avatar's own shape replaces ``params.shape``."""
        verts, E = self.posed_skeleton(params)
        return self.reskin(self.pose(verts), E)

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
