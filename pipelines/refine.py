"""Test-time refinement (``--refine-steps``): fit a predicted avatar to its own source view, keep the rest.

The network's attribute maps A (1, 14, K, K) are corrected by Adam on the source view, with:

* **unconstrained corrections**: each tuned attribute is a fixed base (the prediction in a free parameterisation:
  logit of colour and opacity, log of scale, the quaternion, the offset in millimetres) plus a correction δ, so every
  step gives valid maps (no clamping, whose zero gradients stall texels at the bounds);
* **a coarse-to-fine pyramid** per attribute: δ is a per-texel map plus, where the source sees, maps of K/2, K/4 ...
  texels a side upsampled bilinearly. Adam moves every parameter by about its step size whatever its gradient, so
  per-texel corrections alone turn into high-frequency noise wherever the photo says little; the coarse levels
  carry the smooth corrections (skin tone, a head drawn too small) with few parameters;
* **the photo's loss**: L1 + ``ssim_weight`` (1 - SSIM) on RGB and ``alpha_weight`` L1 of the alpha against the
  matte, both over white (the preprocess background; another colour is re-composited on white first);
* **what the source does not show stays predicted**: the visibility of each texel in the source view (z-buffer,
  facing, inside the matte; softened over 3 x 3 texels) weights a proximity term ||δ||² to the prediction, strong
  where unseen (``proximity``) and weak where seen (``proximity_seen``, against overfitting); an unseen texel whose
  mirror texel (u -> 1 - u) is seen takes its mirror's correction (``mirror``) for the attributes a left/right
  mirror leaves unchanged (colour, opacity, scale). Texels with no visibility at all get no correction of their
  own (``hold_unseen``): the photo's gradient reaches them wherever their Gaussians still draw in the source view,
  and Adam's normalised steps would move them regardless of how small it is;
* **a learning-rate schedule**: a linear warm-up, then cosine decay to ``final_lr`` of each step size.

Δp (the UV shape offsets) is not tuned separately: the binding adds it to the offset channel of A before anything
else, so tuning the offsets already moves the geometry (one degree of freedom, not two).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .avatar.binding import AvatarRig
from .avatar.maps import ATTRIBUTE_DIMS, ATTRIBUTE_SLICES
from .core.camera import world_to_camera
from .errors import ConfigError
from .head.base import HeadModel
from .uv.space import UVSpace

REFINABLE = tuple(ATTRIBUTE_DIMS)  # color, rotation, scale, opacity, offset
MIRRORED = ("color", "opacity", "scale")  # attributes a left/right mirror leaves unchanged
OFFSET_UNIT = 1e-3  # metres per unit of the offset correction: its step size and proximity read in millimetres
_EPS = 1e-4


@dataclass
class RefineConfig:
    """How refinement fits an avatar to its source view (``ReconstructConfig.refine_steps`` says how long)."""

    # What ``--refine-steps auto`` means on CUDA (measured on the H200, bench/RESULTS.md 2026-12-03: 50 steps ~1 s,
    # better on every validation clip; 200 and 500 lose driven frames); on the CPU auto means 0 (5.5 s a step there).
    auto_steps: int = 50
    channels: tuple[str, ...] = ("color", "opacity", "scale", "rotation", "offset")
    # Adam step sizes, in each attribute's free units: logit, logit, log, quaternion, millimetres.
    lr_color: float = 0.05
    lr_opacity: float = 0.05
    lr_scale: float = 0.02
    lr_rotation: float = 0.01
    lr_offset: float = 0.2
    levels: int = 3  # pyramid levels of each correction (1 = per-texel only)
    warmup: float = 0.05  # fraction of the steps with a linear step-size ramp
    final_lr: float = 0.1  # cosine decay to this fraction of the step sizes
    ssim_weight: float = 0.2
    alpha_weight: float = 1.0
    proximity: float = 1.0  # ||δ||² weight where the source does not see a texel
    proximity_seen: float = 0.01  # ... and where it does
    mirror: float = 4.0  # pull of an unseen texel's δ towards its seen mirror's
    # Texels the source does not see (observation weight 0: not seen, nor next to a seen one) get no correction of
    # their own, only their mirror's (colour, opacity, scale); False leaves them to the proximity term alone.
    hold_unseen: bool = True
    render_size: int = 0  # pixels a side of the fitted renders; 0 = the source image's size
    log_every: int = 10  # steps between the loss/PSNR readings (each one waits for the device)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)

    def validate(self) -> "RefineConfig":
        bad = [c for c in self.channels if c not in REFINABLE]
        if bad or not self.channels:
            raise ConfigError(f"refinement channels {list(self.channels)} are not a subset of {list(REFINABLE)}")
        if self.levels < 1 or self.log_every < 1:
            raise ConfigError(f"refinement levels ({self.levels}) and log_every ({self.log_every}) must be >= 1")
        if self.auto_steps < 0 or self.render_size < 0 or (0 < self.render_size < 16):
            raise ConfigError("refinement auto_steps must be >= 0 and render_size 0 or >= 16")
        weights = {k: v for k, v in asdict(self).items() if k.startswith(("lr_", "proximity", "mirror")) or
                   k.endswith("_weight")}
        negative = sorted(k for k, v in weights.items() if v < 0)
        if negative or not 0.0 < self.final_lr <= 1.0 or not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"refinement settings out of range: {negative or 'final_lr/warmup'}",
                              "weights and step sizes >= 0, 0 < final_lr <= 1, 0 <= warmup < 1")
        return self

    def lr_factor(self, step: int, steps: int) -> float:
        """Step-size factor of step ``step`` (0-based) of ``steps``: linear warm-up, then cosine to ``final_lr``."""
        warm = max(1, round(self.warmup * steps))
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - 1 - warm)
        return self.final_lr + (1.0 - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


# ---------------------------------------------------------------------------------------------------- what is seen
def seen_by_source(source, head: HeadModel, uv: UVSpace) -> tuple[torch.Tensor, torch.Tensor]:
    """Which texels the source view shows: seen (1, 1, K, K) bool (visible: z-buffer and facing, and projecting inside
    the matte) and where each texel lands in the image, grid (1, K, K, 2) in grid_sample's [-1, 1] units.

    ``source`` is a ``reconstruct.SourceFrame``; the posed mesh without Δp is used (Δp moves texels by millimetres).
    """
    from .network.local import project_position_map, visibility_mask

    p = uv.position_map(head(source.params), head.faces)  # (1, 3, K, K) posed, world
    valid = uv.valid[None, None].to(p)
    w2c = world_to_camera(source.c2w[None])
    # The z-buffer is K / 2 pixels a side (the network's 128 at K = 256): coarse enough for the texels to close it.
    vis = visibility_mask(p, valid, w2c, source.K[None], 2 * uv.size)
    proj, _ = project_position_map(p, w2c, source.K[None])  # [0, 1] image units
    grid = proj * 2 - 1
    inside = F.grid_sample(source.matte[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (vis > 0.5) & (inside > 0.5), grid


def source_view_gradients(maps: torch.Tensor, delta_p: torch.Tensor | None, source, head: HeadModel, uv: UVSpace,
                          size: int = 256, backend: str = "auto", colour_in_matte: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The source view's squared error E = sum_pixels ||render - photo||² (both on white, ``size`` pixels a side)
    and its gradients with respect to the maps (1, 14, K, K) and Δp (1, 3, K, K): (g_maps, g_delta_p, E), the
    gradients of the inputs' shapes (g_delta_p None when ``delta_p`` is).

    ``seen_by_source`` asks the bare mesh; the render is what the source view actually shows (a network's offsets
    and Δp move Gaussians of mesh-hidden texels into view and make mesh-visible ones transparent). With these
    gradients, ``sum(g * (new - old))`` per texel is the first-order change of the source view's error when that
    texel's attributes go from ``old`` to ``new``: it is > 0 where a change of the texel makes the source view worse,
    0 where the render does not show the texel at all.

    ``colour_in_matte``: the colour maps' gradient counts the pixels inside the matte only. Outside it the photo
    asks for no subject at all — a matter of coverage (opacity, size, position), not of colour: a Gaussian poking out
    of the matte would otherwise be asked to turn white.
    """
    from .train.forward import render_rig

    target, matte = source_target(source, size)
    with torch.enable_grad():
        A = maps.detach().clone().requires_grad_(True)
        dp = None if delta_p is None else delta_p.detach().clone().requires_grad_(True)
        rig = AvatarRig(head, uv, A, source.params.shape, dp)
        r = render_rig(rig, head(source.params).detach(), source.c2w[None], source.K[None], size, backend=backend)
        err = (r.rgb - target).pow(2)
        loss = err.sum()
        inputs = [A] if dp is None else [A, dp]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=colour_in_matte)
        if colour_in_matte:
            (g_in,) = torch.autograd.grad((err * (matte > 0.5)).sum(), [A], allow_unused=True)
    g_maps = grads[0] if grads[0] is not None else torch.zeros_like(maps)
    if colour_in_matte:
        g_maps[:, ATTRIBUTE_SLICES["color"]] = 0 if g_in is None else g_in[:, ATTRIBUTE_SLICES["color"]]
    g_dp = None if dp is None else (grads[1] if grads[1] is not None else torch.zeros_like(delta_p))
    return g_maps.detach(), None if g_dp is None else g_dp.detach(), float(loss.detach())


def observation_weights(source, head: HeadModel, uv: UVSpace) -> torch.Tensor:
    """w (1, 1, K, K) in [0, 1]: 1 where the source view shows a texel, 0 where it does not, soft over 3 x 3 texels
    at the border (a texel next to an unseen one is less reliable)."""
    seen, _ = seen_by_source(source, head, uv)
    valid = uv.valid[None, None].to(source.image)
    w = F.avg_pool2d(seen.to(source.image), 3, stride=1, padding=1, count_include_pad=False)
    return w * valid


# ---------------------------------------------------------------------------------------------- parameterisation
def _free(x: torch.Tensor, name: str) -> torch.Tensor:
    """Activated attribute -> free parameterisation (logit, log, quaternion or millimetres)."""
    if name in ("color", "opacity"):
        return torch.logit(x.clamp(_EPS, 1 - _EPS))
    if name == "scale":
        return x.clamp_min(1e-8).log()
    if name == "offset":
        return x / OFFSET_UNIT
    return x


def _activated(z: torch.Tensor, name: str) -> torch.Tensor:
    if name in ("color", "opacity"):
        return torch.sigmoid(z)
    if name == "scale":
        return z.exp()
    if name == "offset":
        return z * OFFSET_UNIT
    return F.normalize(z, dim=1, eps=1e-6)


def _pyramid(channels: int, K: int, levels: int, device) -> list[torch.Tensor]:
    """Zero corrections (1, C, K / 2^l, K / 2^l) for l < ``levels`` (down to 4 texels a side)."""
    sizes = [K >> level for level in range(levels) if K >> level >= 4] or [K]
    return [torch.zeros(1, channels, s, s, device=device, requires_grad=True) for s in sizes]


def _collapse(levels: list[torch.Tensor], seen: torch.Tensor, uv: UVSpace, mirrored: bool, hold: bool = True
              ) -> torch.Tensor:
    """The correction (1, C, K, K) of one attribute, held by what the source sees (``seen`` (1, 1, K, K) in [0, 1]):
    ``seen * (per-texel level + the upsampled coarse levels)``, plus, for the attributes a mirror leaves unchanged,
    ``(1 - seen) * flip(seen * that)``: a texel seen less than its mirror takes the mirror's correction.

    ``hold`` False: the per-texel level is free everywhere (only the proximity term keeps unseen texels).

    The visibility holds the correction by construction, not only through the proximity term: the photo's gradient
    reaches texels the source does not see wherever their Gaussians still draw in the source view (on the ICT
    head's network avatars: large translucent Gaussians behind the face and at the silhouette, texels the network's
    offsets bring into view), and Adam moves every parameter by about its step size however small its gradient, so a
    quadratic pull back to the prediction only bounds those moves loosely (issue 19: hidden texels changed by 0.145 of
    the seen ones' change). An ungated coarse texel would also spread what the photo says about the face onto the
    unseen texels around it."""
    K = levels[0].shape[-1]
    d = levels[0]
    if len(levels) > 1:
        d = d + sum(F.interpolate(p, size=(K, K), mode="bilinear", align_corners=False) for p in levels[1:])
    if not hold:  # the correction as it was: per-texel level free, coarse levels gated
        return levels[0] + seen * (d - levels[0])
    free = (seen > 0).to(d)  # seen, or next to a seen texel (``seen`` is softened over 3 x 3)
    held = free * d
    if mirrored:
        held = held + (1 - free) * uv.flip(held)
    return held


# --------------------------------------------------------------------------------------------------------- losses
def source_target(source, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The source photo on white (1, 3, size, size) and its matte (1, 1, size, size): what a source-view render at
    ``size`` pixels a side is compared with (resized with antialiasing when the photo has another size)."""
    target = on_white(source.image[None], source.matte[None])
    matte = source.matte[None]
    if target.shape[-1] != size:
        target = F.interpolate(target, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        matte = F.interpolate(matte, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return target, matte


def on_white(image: torch.Tensor, matte: torch.Tensor) -> torch.Tensor:
    """image (B, 3, H, W) composited on some background with matte (B, 1, H, W) -> the same on white.

    The background is the median colour where the matte is ~0 (white when there is no such pixel)."""
    bg_pix = image.permute(1, 0, 2, 3).flatten(1)[:, (matte < 0.02).flatten()]
    if bg_pix.shape[1] == 0:
        return image
    bg = bg_pix.median(dim=1).values.view(1, 3, 1, 1)
    return (image + (1 - matte) * (1 - bg)).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of two images in [0, 1] (over all pixels and channels)."""
    return -10 * torch.log10((x - y).pow(2).mean().clamp_min(1e-12))


def regulariser(deltas: dict[str, torch.Tensor], w: torch.Tensor, uv: UVSpace, valid: torch.Tensor,
                cfg: RefineConfig) -> torch.Tensor:
    """Visibility-weighted proximity of the corrections δ (1, C, K, K) to 0, plus the mirror pull of unseen texels
    whose mirror is seen; means over the valid texels."""
    n = valid.sum().clamp_min(1.0)
    near = (cfg.proximity * (1 - w) + cfg.proximity_seen * w) * valid
    mirror = cfg.mirror * uv.flip(w) * (1 - w) * valid
    total = w.new_zeros(())
    for name, d in deltas.items():
        total = total + (near * d.pow(2).mean(1, keepdim=True)).sum() / n
        if name in MIRRORED and cfg.mirror > 0:
            total = total + (mirror * (d - uv.flip(d).detach()).pow(2).mean(1, keepdim=True)).sum() / n
    return total


# ----------------------------------------------------------------------------------------------------------- loop
def refine_maps(maps: torch.Tensor, delta_p: torch.Tensor | None, source, head: HeadModel, uv: UVSpace, steps: int,
                cfg: RefineConfig | None = None, backend: str = "auto",
                progress: Callable[..., None] | None = None) -> tuple[torch.Tensor, dict]:
    """Refine attribute maps (1, 14, K, K) on their source view for ``steps`` Adam steps.

    Args:
        maps: the predicted maps (not modified); delta_p: Δp (1, 3, K, K) on the canonical mesh, or None;
        source: the ``reconstruct.SourceFrame`` (on the maps' device).
        progress: called as ``progress(1, total=steps, status=text)`` after every step (the CLI's bars take these).
    Returns:
        (refined maps (1, 14, K, K), report): the report holds the steps, seconds, source-view PSNR before and after
        (dB, renders over white), the loss at every ``log_every`` steps and the settings.
    """
    from .train.forward import render_rig
    from .train.losses import ssim

    cfg = (cfg or RefineConfig()).validate()
    t0 = time.perf_counter()
    device = maps.device
    maps = maps.detach()
    K = maps.shape[-1]
    size = cfg.render_size or source.image.shape[-1]
    target, matte = source_target(source, size)
    valid = uv.valid[None, None].to(maps)
    shape = source.params.shape
    c2w, Kn = source.c2w[None], source.K[None]
    report: dict = {"steps": steps, "render_size": size, "config": asdict(cfg), "loss": []}

    with torch.enable_grad():  # callers may run under no_grad (reconstruct predicts under it)
        verts = head(source.params).detach()
        w = observation_weights(source, head, uv)
        base = {n: _free(maps[:, ATTRIBUTE_SLICES[n]], n) for n in cfg.channels}
        pyramids = {n: _pyramid(ATTRIBUTE_DIMS[n], K, cfg.levels, device) for n in cfg.channels}
        groups = [{"params": pyramids[n], "lr": getattr(cfg, f"lr_{n}")} for n in cfg.channels]
        base_lr = [g["lr"] for g in groups]
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))

        def assemble() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            parts, deltas = [], {}
            for name, sl in ATTRIBUTE_SLICES.items():
                if name in pyramids:
                    deltas[name] = _collapse(pyramids[name], w, uv, name in MIRRORED, cfg.hold_unseen) * valid
                    parts.append(_activated(base[name] + deltas[name], name))
                else:
                    parts.append(maps[:, sl])
            return torch.cat(parts, 1), deltas

        def render(A: torch.Tensor):
            return render_rig(AvatarRig(head, uv, A, shape, delta_p), verts, c2w, Kn, size, backend=backend)

        status = ""
        for step in range(steps):
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * cfg.lr_factor(step, steps)
            A, deltas = assemble()
            r = render(A)
            photo = ((r.rgb - target).abs().mean() + cfg.ssim_weight * (1 - ssim(r.rgb, target))
                     + cfg.alpha_weight * (r.alpha - matte).abs().mean())
            loss = photo + regulariser(deltas, w, uv, valid, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0:
                report["source_psnr_before"] = float(psnr(r.rgb.detach(), target))
            if step % cfg.log_every == 0 or step == steps - 1:
                value = float(loss.detach())
                report["loss"].append([step, round(value, 6)])
                status = f"loss {value:.4f}, source {float(psnr(r.rgb.detach(), target)):.2f} dB"
            if progress is not None:
                progress(1, total=steps, status=status)

    with torch.no_grad():
        A, _ = assemble()
        if steps > 0:
            report["source_psnr_after"] = float(psnr(render(A).rgb, target))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return A.detach(), report
