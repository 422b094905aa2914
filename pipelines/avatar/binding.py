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
from ..uv.space import UVSpace
from .maps import ATTRIBUTE_SLICES


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
    v0, v1, v2 = verts[:, faces[:, 0]], verts[:, faces[:, 1]], verts[:, faces[:, 2]]
    e1, e2 = v1 - v0, v2 - v0
    n = torch.cross(e1, e2, dim=-1)
    size = n.norm(dim=-1).clamp(min=1e-12).sqrt()
    n = F.normalize(n, dim=-1, eps=1e-12)
    t = F.normalize(e1, dim=-1, eps=1e-12)
    b = torch.cross(n, t, dim=-1)
    return torch.stack([t, b, n], dim=-1), size


def matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) w,x,y,z.

    Computes the four algebraically equivalent candidates and keeps, per matrix, the one with the largest
    denominator, which is accurate to float precision everywhere (no sign or small-component issues).
    """
    m = R.reshape(*R.shape[:-2], 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    q_abs = torch.sqrt(torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                                    1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1).clamp(min=1e-12))
    cand = torch.stack([
        torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
        torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
    ], -2) / (2.0 * q_abs[..., None])
    best = q_abs.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0)
    return F.normalize(q, dim=-1)


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


class AvatarRig:
    """Gaussians of B avatars (usually 1), ready to be posed; differentiable w.r.t. the maps (training uses it).

    Built from the attribute maps A (B, 14, K, K), the UV shape offset Δp_uv (B, 3, K, K) on the canonical mesh (or
    None) and the avatars' shapes (B, S); ``pose(verts)`` then places the Gaussians on posed meshes of the same head
    model - the per-frame hot path of reenactment and turntables.
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
        self.scale_base = attrs[..., ATTRIBUTE_SLICES["scale"]] * uv.sample_scale()[:, None]
        self.opacity = attrs[..., ATTRIBUTE_SLICES["opacity"]][..., 0]
        self.color = attrs[..., ATTRIBUTE_SLICES["color"]]

    @property
    def num_gaussians(self) -> int:
        return self.color.shape[1]

    def pose_params(self, params: HeadParams) -> Gaussians:
        """Gaussians for tracked parameters (B frames); the avatar's own shape replaces ``params.shape``."""
        shape = self.shape.expand(params.batch, -1) if self.shape.shape[0] == 1 else self.shape
        params = HeadParams(**{**params.to_dict(), "shape": shape})
        return self.pose(self.head(params))

    def pose(self, verts: torch.Tensor, colors: torch.Tensor | None = None) -> Gaussians:
        """Gaussians (B, G, ...) on posed vertices (B, V, 3) (B must equal the rig's batch, or the rig's is 1).

        ``colors`` (B or 1, G, C) replaces the colours (e.g. positions for the 3D TV loss).
        """
        B = verts.shape[0]
        R, size = triangle_frames(verts, self.head.faces)  # (B, F, 3, 3), (B, F)
        Rg = R[:, self._face]
        k = size[:, self._face] / self._size_can  # (B, G) triangle growth
        tri = verts[:, self.head.faces[self._face]]  # (B, G, 3, 3)
        surface = (tri * self._bary[None, :, :, None]).sum(2)
        means = surface + k[..., None] * (Rg @ self.offset_local[..., None])[..., 0]
        quats = quat_multiply(matrix_to_quat(R)[:, self._face], self.quat_local)
        scales = self.scale_base * k[..., None]
        color = self.color if colors is None else colors
        return Gaussians(means, quats, scales, self.opacity.expand(B, -1), color.expand(B, -1, -1))
