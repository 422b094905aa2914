"""Feed-forward reconstruction with the network, plus the optional per-avatar refinement on the source view."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..avatar.binding import AvatarRig, posed_to_canonical_offsets
from ..core.camera import to_pixel_intrinsics, world_to_camera
from ..head.base import HeadModel
from ..uv.space import UVSpace
from .model import FHAvatarNet


def network_inputs(head: HeadModel, uv: UVSpace, params, c2w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Posed source mesh (B, V, 3), its position map p (B, 3, K, K), the valid mask (1, 1, K, K), w2c (B, 4, 4)."""
    verts = head(params)
    return {
        "verts": verts,
        "p": uv.position_map(verts, head.faces),
        "valid": uv.valid[None, None].float(),
        "w2c": world_to_camera(c2w),
    }


def predict_maps(net: FHAvatarNet, source, head: HeadModel, uv: UVSpace, refine_steps: int = 0,
                 refine_lr: float = 1e-2, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A (1, 14, K, K) and Δp_uv on the canonical mesh (1, 3, K, K) for one ``SourceFrame``."""
    inp = network_inputs(head, uv, source.params, source.c2w[None])
    with torch.no_grad():
        out = net(source.image[None], inp["p"], inp["valid"], inp["w2c"], source.K[None], with_aux=False)
    A = out.A
    canonical = head.canonical(source.params.shape)
    delta_p = posed_to_canonical_offsets(uv, out.delta_p, inp["verts"], canonical, head.faces)
    info = {"visible_fraction": float((out.M_v * inp["valid"]).sum() / inp["valid"].sum())}
    if refine_steps > 0:
        A, info["refine_loss"] = refine_on_source(A, delta_p, source, head, uv, refine_steps, refine_lr, backend)
    return A, delta_p, info


def refine_on_source(A: torch.Tensor, delta_p: torch.Tensor, source, head: HeadModel, uv: UVSpace, steps: int,
                     lr: float, backend: str = "auto") -> tuple[torch.Tensor, list[float]]:
    """Fine-tune the attribute maps for ``steps`` Adam steps on the source view (L1 on RGB and alpha).

    Only colours, opacities and offsets are tuned (rotations/scales keep the network's values), so the unseen back
    of the head keeps the network's prediction while the visible side sharpens towards the photo.
    """
    from ..render import render_gaussians

    A = A.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([A], lr=lr)
    size = source.image.shape[-1]
    bg = torch.ones(1, 3, device=A.device)
    target = source.image.permute(1, 2, 0)[None]
    matte = source.matte.permute(1, 2, 0)[None]
    Ks = to_pixel_intrinsics(source.K[None], size, size)
    viewmats = world_to_camera(source.c2w[None])
    verts = head(source.params).detach()
    losses = []
    keep = torch.ones(1, A.shape[1], 1, 1, device=A.device)
    keep[:, 3:10] = 0.0  # rotation and scale channels
    for _ in range(steps):
        maps = A * keep + A.detach() * (1 - keep)
        maps = torch.cat([maps[:, :10], maps[:, 10:11].clamp(1e-3, 1 - 1e-3), maps[:, 11:]], 1)
        rig = AvatarRig(head, uv, maps, source.params.shape, delta_p)
        g = rig.pose(verts)
        out = render_gaussians(g.means, g.quats, g.scales, g.opacities, g.colors.clamp(0, 1), viewmats, Ks, size,
                               size, bg, backend=backend)
        loss = F.l1_loss(out.rgb, target) + F.l1_loss(out.alpha, matte)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    with torch.no_grad():
        A = A.detach()
        A[:, :3].clamp_(0, 1)
        A[:, 10:11].clamp_(1e-3, 1 - 1e-3)
    return A, losses
