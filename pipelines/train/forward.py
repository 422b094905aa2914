"""One differentiable pass: source image + tracking -> network -> Gaussian avatar -> renders of the target frame.

Shared by the training step and the validation (same code path for both, so what is validated is what is trained).
The prediction is ``pipelines.network.inference.predict_avatar`` (the one reconstruction also runs); the network may
run under bf16 autocast, everything after it (rigging, rasterization, losses) runs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..avatar.binding import AvatarRig
from ..core.camera import to_pixel_intrinsics, world_to_camera
# The prediction itself is the network package's, shared with reconstruction and refinement.
from ..network.inference import predict_avatar  # noqa: F401 - re-exported for the loop and validation
from ..render import render_gaussians


@dataclass
class Rendered:
    """rgb (B, 3, H, W) over white, alpha (B, 1, H, W), positions (B, 3, H, W) over a background of 1 (or None)."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    positions: torch.Tensor | None


def render_rig(rig: AvatarRig, verts: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, size: int,
               with_positions: bool = False, backend: str = "auto") -> Rendered:
    """Pose the rig on target meshes (B, V, 3) and render B views (c2w (B, 4, 4), K (B, 3, 3) normalized).

    With ``with_positions`` the Gaussians' world positions are rendered in the same pass as 3 extra colour channels
    (eq. 6's I_3d: same Gaussians, colour := position), over a background of 1 like the RGB.
    """
    g = rig.pose(verts)
    B = verts.shape[0]
    colors = torch.cat([g.colors, g.means], -1) if with_positions else g.colors
    C = colors.shape[-1]
    out = render_gaussians(
        g.means, g.quats, g.scales, g.opacities, colors,
        viewmats=world_to_camera(c2w), Ks=to_pixel_intrinsics(K, size, size), width=size, height=size,
        backgrounds=torch.ones(B, C, device=verts.device), backend=backend,
    )
    img = out.rgb.permute(0, 3, 1, 2)
    alpha = out.alpha.permute(0, 3, 1, 2)
    return Rendered(img[:, :3], alpha, img[:, 3:6] if with_positions else None)
