"""Where a posed Gaussian goes when the network moved it away from its triangle (ours; the paper binds every
Gaussian to its triangle only).

The shape offsets Δp let a texel of the neck or the jaw line paint the shoulders and the collar of the photo, several
centimetres from the triangle that carries it. Riding that triangle, such a Gaussian turns with the head, so the
shoulders swing whenever the person turns: on the validation split the bottom fifth of the frame held 30-43 % of the
squared error. Two corrections, both exact at the source pose (the render the network was trained to match):

* **Skinning by position.** A Gaussian that its offset moved away from its triangle takes the joint weights of the
  head-model vertex nearest its canonical position instead of its triangle's (blended in between ``offset_onset``
  and ``offset_full``, so Gaussians on the surface keep their triangle's motion exactly; eyeball vertices are no
  candidates, or eyelids would follow the gaze). Its motion from the source pose is re-expressed with those weights: posed
  position ``T_g(f) T_g(s)^-1 T_t(s) T_t(f)^-1 m_t(f)`` where ``m_t(f)`` is where its triangle puts it in frame f,
  ``T_t`` / ``T_g`` are the blended skinning transforms with the triangle's / the Gaussian's weights, s the source.
  Expression motion (carried by the triangle) is kept; only the joints' share changes.
* **The torso holds still.** Trackers explain the head's motion by one rigid transform; real shoulders stay while
  the head moves. With ``torso_follow`` = 0 the root joint (chest) keeps the source frame's translation, the head
  still lands where the tracking puts it (the neck's blend into the chest absorbs the difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..head.base import JOINT_NAMES
from .quaternion import matrix_to_quat, quat_multiply


@dataclass
class SkinningConfig:
    """How posed Gaussians follow the skeleton at inference (reenact, turntable, evaluate). Training poses every
    Gaussian with its triangle, as the paper does."""

    by_position: bool = True  # Gaussians moved off their triangle take the weights of the vertex nearest them
    offset_onset: float = 0.01  # metres of offset from the triangle under which a Gaussian keeps its weights
    offset_full: float = 0.03  # metres from which it takes the nearest vertex's weights alone
    weight_tolerance: float = 0.02  # L1 weight change under which a Gaussian keeps its triangle's motion
    torso_follow: float = 0.0  # share of the head's translation (from the source frame) that the chest follows

    def __post_init__(self) -> None:
        if not 0.0 <= self.torso_follow <= 1.0:
            raise ConfigError(f"skinning.torso_follow {self.torso_follow} must be in [0, 1]",
                              "0 keeps the chest where the source photo has it, 1 moves it with the head")
        if not 0.0 <= self.offset_onset < self.offset_full:
            raise ConfigError(f"skinning.offset_onset {self.offset_onset} and offset_full {self.offset_full} must "
                              "satisfy 0 <= offset_onset < offset_full (metres)")
        if not 0.0 <= self.weight_tolerance < 2.0:
            raise ConfigError(f"skinning.weight_tolerance {self.weight_tolerance} must be in [0, 2)")


def homogeneous(T: torch.Tensor) -> torch.Tensor:
    """(..., 3, 4) affine transforms -> (..., 4, 4)."""
    bottom = torch.zeros(T.shape[:-2] + (1, 4), dtype=T.dtype, device=T.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([T, bottom], -2)


def nearest_vertex(points: torch.Tensor, verts: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Index (N,) of the vertex of ``verts`` (V, 3) nearest each of ``points`` (N, 3), in chunks that bound memory."""
    return torch.cat([torch.cdist(points[i:i + chunk], verts).argmin(1) for i in range(0, len(points), chunk)])


def orthonormalize(M: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) near-rotations (blended skinning matrices) -> rotations, by Gram-Schmidt on the columns (no
    decomposition, so nothing synchronises with the device and it can be captured in a CUDA graph)."""
    x = F.normalize(M[..., 0], dim=-1)
    y = F.normalize(M[..., 1] - (M[..., 1] * x).sum(-1, keepdim=True) * x, dim=-1)
    return torch.stack([x, y, torch.cross(x, y, dim=-1)], -1)


class PositionSkinning:
    """Joint weights from where the Gaussians are, for the Gaussians whose weights differ from their triangle's.

    index (S,) of those Gaussians, w_gauss / w_tri (S, J) their weights by position / by triangle, and
    ``reference`` (1, S, 4, 4) = T_g(s)^-1 T_t(s) at the source pose s.
    """

    def __init__(self, index: torch.Tensor, w_gauss: torch.Tensor, w_tri: torch.Tensor, E_source: torch.Tensor):
        self.index, self.w_gauss, self.w_tri = index, w_gauss, w_tri
        Tg, Tt = self.transforms(E_source)
        self.reference = torch.linalg.inv(Tg) @ Tt

    @classmethod
    def build(cls, canonical_means: torch.Tensor, canonical_verts: torch.Tensor, lbs_weights: torch.Tensor,
              faces: torch.Tensor, face_of: torch.Tensor, bary: torch.Tensor, E_source: torch.Tensor,
              cfg: SkinningConfig) -> "PositionSkinning":
        """canonical_means (G, 3) Gaussian centres on the canonical mesh canonical_verts (V, 3); lbs_weights (V, J)
        in JOINT_NAMES order; faces (F, 3); face_of (G,) and bary (G, 3) each Gaussian's triangle; E_source
        (1, J, 3, 4) the joints' skinning transforms at the source pose, global translation included."""
        corners = faces[face_of]  # (G, 3)
        w_tri = (lbs_weights[corners] * bary[..., None]).sum(1)  # (G, J)
        offset = (canonical_means - (canonical_verts[corners] * bary[..., None]).sum(1)).norm(dim=-1)  # (G,)
        eyes = [JOINT_NAMES.index("eye_left"), JOINT_NAMES.index("eye_right")]
        skin = torch.nonzero(lbs_weights[:, eyes].sum(-1) == 0)[:, 0]  # candidate vertices: not on an eyeball
        w_near = lbs_weights[skin[nearest_vertex(canonical_means, canonical_verts[skin])]]  # (G, J)
        share = ((offset - cfg.offset_onset) / (cfg.offset_full - cfg.offset_onset)).clamp(0.0, 1.0)
        share = share * share * (3.0 - 2.0 * share)  # smoothstep: no seam where the re-skinning starts
        share = torch.where(w_tri[:, eyes].sum(-1) > 0, 0.0, share)  # eyeballs turn with their joints
        w_gauss = w_tri + share[:, None] * (w_near - w_tri)
        index = torch.nonzero((w_gauss - w_tri).abs().sum(-1) > cfg.weight_tolerance)[:, 0]
        return cls(index, w_gauss[index], w_tri[index], E_source)

    def __len__(self) -> int:
        return len(self.index)

    def transforms(self, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E (B, J, 3, 4) joint transforms -> T_g, T_t (B, S, 4, 4), blended with the two weightings."""
        return (homogeneous(torch.einsum("sj,bjrc->bsrc", self.w_gauss, E)),
                homogeneous(torch.einsum("sj,bjrc->bsrc", self.w_tri, E)))

    def correction(self, E: torch.Tensor) -> torch.Tensor:
        """(B, S, 4, 4) map from where the triangles put the Gaussians in the frames of E to where their own
        weights put them: T_g(f) T_g(s)^-1 T_t(s) T_t(f)^-1 (the identity at the source pose)."""
        Tg, Tt = self.transforms(E)
        Tt_inv, _ = torch.linalg.inv_ex(Tt)  # inv_ex: no error check, so no device synchronisation
        return Tg @ self.reference @ Tt_inv

    def apply(self, means: torch.Tensor, quats: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """means (B, G, 3), quats (B, G, 4) posed by their triangles -> the same with the selected Gaussians moved and
        turned by ``correction(E)``."""
        if not len(self):
            return means, quats
        C = self.correction(E)
        m = means[:, self.index]
        means = means.index_copy(1, self.index, (C[..., :3, :3] @ m[..., None])[..., 0] + C[..., :3, 3])
        turn = matrix_to_quat(orthonormalize(C[..., :3, :3]))
        quats = quats.index_copy(1, self.index, F.normalize(quat_multiply(turn, quats[:, self.index]), dim=-1))
        return means, quats
