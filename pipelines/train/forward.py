"""One differentiable pass: source image + tracking -> network -> Gaussian avatar -> renders of the target frame.

Shared by the training step and the validation (same code path for both, so what is validated is what is trained).
The network may run under bf16 autocast; everything after it (rigging, rasterization, losses) runs in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..avatar.binding import AvatarRig, posed_to_canonical_offsets
from ..core.camera import to_pixel_intrinsics, world_to_camera
from ..head.base import HeadModel, HeadParams
from ..network.model import FHAvatarNet, NetOutput
from ..render import render_gaussians
from ..uv.space import UVSpace


@dataclass
class AvatarPrediction:
    """The network's avatar for B sources. out: the raw NetOutput (fp32 maps); delta_p_canonical (B, 3, K, K)."""

    out: NetOutput
    A: torch.Tensor
    A1: torch.Tensor | None
    delta_p: torch.Tensor  # (B, 3, K, K) on the posed source mesh (what L_shape / L_shape^tv regularise)
    delta_p_canonical: torch.Tensor
    shape: torch.Tensor  # (B, S)

    def rig(self, head: HeadModel, uv: UVSpace, aux: bool = False) -> AvatarRig:
        maps = self.A1 if aux else self.A
        assert maps is not None, "the auxiliary maps were not computed"
        return AvatarRig(head, uv, maps, self.shape, self.delta_p_canonical)


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled, else a no-op context."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_avatar(net: FHAvatarNet, head: HeadModel, uv: UVSpace, image: torch.Tensor, params: HeadParams,
                   c2w: torch.Tensor, K: torch.Tensor, with_aux: bool, amp: bool = False) -> AvatarPrediction:
    """Run the network on B sources: image (B, 3, H, W), params (B, ...), c2w (B, 4, 4), K (B, 3, 3) normalized."""
    verts = head(params)  # posed source mesh (B, V, 3)
    p = uv.position_map(verts, head.faces)
    valid = uv.valid[None, None].float()
    w2c = world_to_camera(c2w)
    with autocast_for(image.device, amp):
        out = net(image, p, valid, w2c, K, with_aux=with_aux)
    A = out.A.float()
    A1 = out.A1.float() if out.A1 is not None else None
    delta_p = out.delta_p.float()
    canonical = head.canonical(params.shape)
    dpc = posed_to_canonical_offsets(uv, delta_p, verts, canonical, head.faces)
    return AvatarPrediction(out, A, A1, delta_p, dpc, params.shape)


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
