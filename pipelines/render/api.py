"""One entry point for rendering 3D Gaussians, whichever backend draws them."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.errors import ConfigError
from pipelines.render.gsplat_backend import (
    GSPLAT_VERSION,
    GsplatOptions,
    gsplat_available,
    gsplat_import_error,
    rasterize_gsplat,
)
from pipelines.render.reference import gaussian_contributions, rasterize_view

BACKENDS = ("auto", "gsplat", "torch")
log = logging.getLogger(__name__)


@dataclass
class RenderOutput:
    """Rendered views.

    rgb: (B, H, W, C) composited colours (any C: RGB, positions, UVs ...) over the background.
    alpha: (B, H, W, 1) accumulated opacity, 1 - final transmittance.
    depth: (B, H, W, 1) expected camera-space z, sum w_i z_i / alpha (0 where alpha is 0); None when the render was
        asked for no depth (``GsplatOptions.depth``).
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor | None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ("gsplat" or "torch") for a requested one and the tensors' device.

    "auto" picks gsplat when the tensors are on CUDA and gsplat imports, else the PyTorch reference.
    """
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown render backend '{backend}'", f"choose one of {', '.join(repr(b) for b in BACKENDS)}"
        )
    if backend == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        if gsplat_available():
            return "gsplat"
        _warn_slow_fallback()
        return "torch"
    return backend


@functools.lru_cache(maxsize=1)
def _warn_slow_fallback() -> None:
    """Say once per process that a CUDA machine renders with the reference rasterizer (about 50x slower than gsplat):
    a missing or broken gsplat must not go unnoticed."""
    log.warning("gsplat cannot be imported (%s): rendering on CUDA with the PyTorch reference rasterizer, about 50x "
                "slower — install it with `pip install gsplat==%s`, or pass --renderer torch to choose this",
                gsplat_import_error() or "not installed", GSPLAT_VERSION)


def render_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    backend: str = "auto",
    near: float = 0.01,
    far: float = 100.0,
    options: GsplatOptions | None = None,
) -> RenderOutput:
    """Render 3D Gaussians into B views.

    Args:
        means: (N, 3) world-space centres shared by all views, or (B, N, 3) one set per view (e.g. an animated
            avatar, frame b seen by camera b). The other Gaussian tensors follow the same leading shape.
        quats: (N, 4) / (B, N, 4) rotations as quaternions (w, x, y, z); need not be normalized.
        scales: (N, 3) / (B, N, 3) standard deviations along the rotated axes (already activated, not log).
        opacities: (N,) / (B, N) in [0, 1] (already activated).
        colors: (N, C) / (B, N, C) features to composite, any number of channels.
        viewmats: (B, 4, 4) world-to-camera matrices, OpenCV axes (x right, y down, z forward).
        Ks: (B, 3, 3) intrinsics in pixels; pixel (i, j) has its centre at (j + 0.5, i + 0.5).
        width, height: image size in pixels.
        backgrounds: (B, C) or (C,) colour behind the Gaussians; None for black (zeros).
        backend: "auto" (gsplat on CUDA when importable, else "torch"), "gsplat" or "torch".
        near, far: Gaussians whose camera-space z is outside [near, far] are culled.
        options: gsplat's layout (packing, tile size) and whether depth is wanted; None: ``GsplatOptions()``. The
            reference backend draws the same image whatever the layout.

    Returns:
        :class:`RenderOutput` with rgb (B, H, W, C), alpha (B, H, W, 1), depth (B, H, W, 1) (None without depth).
    """
    options = options or GsplatOptions()
    per_view = _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    B, C = viewmats.shape[0], colors.shape[-1]
    if backgrounds is not None and backgrounds.dim() == 1:
        backgrounds = backgrounds.expand(B, C)
    chosen = resolve_backend(backend, means.device)

    if chosen == "gsplat":
        rgb, alpha, depth = rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds, near, far,
            options=options,
        )
        return RenderOutput(rgb, alpha, depth)

    views = []
    for b in range(B):
        g = (means[b], quats[b], scales[b], opacities[b], colors[b]) if per_view else (
            means, quats, scales, opacities, colors
        )
        bg = backgrounds[b] if backgrounds is not None else None
        views.append(rasterize_view(*g, viewmats[b], Ks[b], width, height, bg, near=near, far=far))
    rgb, alpha, depth = (torch.stack(v, dim=0) for v in zip(*views))
    return RenderOutput(rgb, alpha, depth if options.depth else None)


def render_contributions(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backend: str = "auto",
    near: float = 0.01,
    far: float = 100.0,
) -> Tensor:
    """How much each Gaussian draws into each view: (B, N) ``sum over pixels of w_i = T_i alpha_i``.

    Removing Gaussian i changes a pixel by ``w_i (c_i - C_behind)``, at most ``w_i`` for colours in [0, 1], so this
    bounds the L1 change of the view (in pixels) that dropping it makes. Same inputs as :func:`render_gaussians`
    (shared (N, ...) or per-view (B, N, ...) Gaussians). gsplat: the gradient of the rendered image sum with
    respect to a colour channel, which is exactly ``sum_p w_i(p)``; torch: the reference compositor sums the
    weights it already evaluates (no autograd, bounded memory).
    """
    # Three channels, not one: the channel counts gsplat's kernels are built for certainly include 3.
    ones = torch.ones_like(opacities)[..., None].expand(*opacities.shape, 3)
    per_view = _check_shapes(means, quats, scales, opacities, ones, viewmats, Ks, None)
    B = viewmats.shape[0]
    if resolve_backend(backend, means.device) == "gsplat":
        colors = torch.zeros_like(ones).contiguous().requires_grad_(True)
        with torch.enable_grad():
            rgb, _, _ = rasterize_gsplat(means.detach(), quats.detach(), scales.detach(), opacities.detach(), colors,
                                         viewmats, Ks, width, height, None, near, far,
                                         options=GsplatOptions(depth=False))
            (grad,) = torch.autograd.grad(rgb[..., 0].sum(), colors)
        return grad[..., 0] if per_view else grad[..., 0].expand(B, -1)
    out = []
    for b in range(B):
        g = (means[b], quats[b], scales[b], opacities[b]) if per_view else (means, quats, scales, opacities)
        out.append(gaussian_contributions(*g, viewmats[b], Ks[b], width, height, near=near, far=far))
    return torch.stack(out, 0)


def _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds) -> bool:
    """Validate shapes; return True for per-view Gaussians (leading B)."""
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats must be (B, 4, 4), got {tuple(viewmats.shape)}")
    B = viewmats.shape[0]
    if Ks.shape != (B, 3, 3):
        raise ValueError(f"Ks must be ({B}, 3, 3) to match viewmats, got {tuple(Ks.shape)}")
    if means.dim() not in (2, 3) or means.shape[-1] != 3:
        raise ValueError(f"means must be (N, 3) or (B, N, 3), got {tuple(means.shape)}")
    lead = means.shape[:-1]  # (N,) or (B, N)
    if means.dim() == 3 and means.shape[0] != B:
        raise ValueError(f"per-view means {tuple(means.shape)} must have B={B} sets, one per view")
    expected = {"quats": (quats, lead + (4,)), "scales": (scales, lead + (3,)), "opacities": (opacities, lead)}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must be {tuple(shape)} to match means, got {tuple(t.shape)}")
    if colors.dim() != means.dim() or colors.shape[:-1] != lead:
        raise ValueError(f"colors must be {tuple(lead) + ('C',)} to match means, got {tuple(colors.shape)}")
    C = colors.shape[-1]
    if backgrounds is not None and tuple(backgrounds.shape) not in ((B, C), (C,)):
        raise ValueError(f"backgrounds must be ({B}, {C}) or ({C},), got {tuple(backgrounds.shape)}")
    return means.dim() == 3
