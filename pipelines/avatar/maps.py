"""Layout of the UV Gaussian attribute maps A (B, 14, K, K) of section 3.2.

Channels hold *activated* values: colour in [0,1] (3), rotation as a unit quaternion w,x,y,z in the triangle's local
frame (4), scale in texel units (3, > 0; multiplied by the relative scale map s to get metres), opacity in (0,1) (1),
position offset in metres along the canonical head's axes (3; the binding carries it in the canonical triangle's
frame, so it follows the triangle when posed). ``ATTRIBUTE_DIMS`` below is the only statement of this layout.
"""

from __future__ import annotations

import torch

from ..head.base import REGIONS
from ..uv.space import UVSpace

# The one owner of the layout: the network's decoder, the binding, training, refinement and the artifact all read it
# from here, never as literal channel numbers.
ATTRIBUTE_DIMS: dict[str, int] = {"color": 3, "rotation": 4, "scale": 3, "opacity": 1, "offset": 3}


def _slices(dims: dict[str, int]) -> dict[str, slice]:
    out, start = {}, 0
    for name, d in dims.items():
        out[name] = slice(start, start + d)
        start += d
    return out


ATTRIBUTE_SLICES: dict[str, slice] = _slices(ATTRIBUTE_DIMS)  # channel slice of each attribute inside A
NUM_ATTRIBUTES = sum(ATTRIBUTE_DIMS.values())  # 14


def split_attributes(A: torch.Tensor) -> dict[str, torch.Tensor]:
    """A (B, 14, K, K) -> {"color": (B, 3, K, K), "rotation": (B, 4, ...), "scale", "opacity", "offset"}."""
    return {name: A[:, s] for name, s in ATTRIBUTE_SLICES.items()}


def pool_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Attribute maps (B, 14, K, K) averaged down to (B, 14, size, size), quaternions renormalised: the same avatar
    on a coarser UV grid (scales are in texel units, so each Gaussian grows with its texel). For cheap CPU checks."""
    f = maps.shape[-1] // size
    if f <= 1:
        return maps
    A = torch.nn.functional.avg_pool2d(maps, f)
    rot = ATTRIBUTE_SLICES["rotation"]
    return torch.cat([A[:, : rot.start], torch.nn.functional.normalize(A[:, rot], dim=1), A[:, rot.stop :]], 1)


# A muted palette per region, so a template avatar shows its UV layout and regions at a glance.
REGION_COLORS = {
    "face": (0.86, 0.68, 0.58),
    "scalp": (0.32, 0.22, 0.16),
    "eyes": (0.92, 0.92, 0.90),
    "mouth": (0.62, 0.22, 0.24),
    "neck": (0.80, 0.62, 0.53),
    "ears": (0.84, 0.63, 0.55),
    "other": (0.6, 0.6, 0.6),
    "teeth": (0.93, 0.91, 0.84),
}


def template_maps(uv: UVSpace, scale_texels: float = 1.3, opacity: float = 0.95, checker: int = 16) -> torch.Tensor:
    """Attribute maps (1, 14, K, K) of a template avatar coloured from the UV layout.

    Colours are the region palette modulated by a faint UV checkerboard (so rotation and mirroring are visible in a
    turntable); Gaussians are isotropic, slightly larger than a texel so the surface is closed, with no offsets.
    """
    K = uv.size
    A = torch.zeros(1, NUM_ATTRIBUTES, K, K)
    color = torch.full((3, K, K), 0.5)
    for name, rgb in REGION_COLORS.items():
        m = uv.region == REGIONS[name]
        for c in range(3):
            color[c][m] = rgb[c]
    ii, jj = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    check = (((ii * checker) // K + (jj * checker) // K) % 2).float()
    # Left half of the UV square (subject's right) slightly cooler, so left/right are distinguishable.
    side = (jj >= K // 2).float()
    color = color * (0.9 + 0.1 * check) * torch.stack([0.97 + 0.03 * side, torch.ones_like(side), 1.03 - 0.03 * side])
    A[0, ATTRIBUTE_SLICES["color"]] = color.clamp(0, 1)
    A[0, ATTRIBUTE_SLICES["rotation"].start] = 1.0  # identity quaternion (w, x, y, z)
    A[0, ATTRIBUTE_SLICES["scale"]] = scale_texels
    A[0, ATTRIBUTE_SLICES["opacity"]] = opacity
    return A
