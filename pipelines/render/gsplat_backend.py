"""gsplat 1.5.3 backend: CUDA rasterization through ``gsplat.rasterization``.

gsplat is imported lazily (it is an optional GPU dependency, ``pip install gsplat==1.5.3``); nothing here runs
on a machine without it unless asked to, and then it raises a one-line :class:`ConfigError`.

Conventions passed to gsplat, mirrored exactly by :mod:`pipelines.render.reference`: ``viewmats`` are
world-to-camera 4x4 (OpenCV axes), ``Ks`` are pixel intrinsics, ``rasterize_mode="classic"``,
``eps2d=0.3``, ``render_mode="RGB+ED"`` (the last channel is the expected camera-space z), post-activation
``colors`` with any number of channels (``sh_degree=None``), backgrounds per view. Packing, the tile size and
whether depth is rendered are :class:`GsplatOptions`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from pipelines.errors import ConfigError

GSPLAT_VERSION = "1.5.3"


@dataclass(frozen=True)
class GsplatOptions:
    """How gsplat lays out its work; none of these change the image beyond float32 rounding (the reference renderer
    ignores them). The defaults are the one place they are chosen; ``bench/bench_speed.py --packed/--tile-size``
    measures the alternatives.

    packed: gsplat's sparse layout of the projected Gaussians (less memory; a device synchronisation more per call).
    tile_size: pixels per side of a rasterization tile.
    depth: also render the expected depth (``render_mode="RGB+ED"``); without it depth comes back as None, which
        saves a channel, a concatenation and a division per call (reenactment and turntables do not read it).
    """

    packed: bool = False
    tile_size: int = 16
    depth: bool = True


_import_error: list[str] = []  # why gsplat could not be imported, once it was tried


@functools.lru_cache(maxsize=1)
def _import_gsplat():
    """The gsplat module, or None when it cannot be imported (the reason: ``gsplat_import_error``)."""
    try:
        import gsplat  # noqa: PLC0415 - optional dependency, imported on first use
    except Exception as e:  # ImportError, or a broken CUDA extension build
        _import_error.append(f"{type(e).__name__}: {e}".splitlines()[0])
        return None
    return gsplat


def gsplat_import_error() -> str | None:
    """Why gsplat cannot be imported (one line), or None when it imports (or was not tried)."""
    return _import_error[-1] if _import_gsplat() is None and _import_error else None


def gsplat_available() -> bool:
    """True when CUDA is available and gsplat imports."""
    return torch.cuda.is_available() and _import_gsplat() is not None


def require_gsplat():
    """Return the gsplat module or raise a :class:`ConfigError` saying why it cannot be used."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "render backend 'gsplat' needs a CUDA GPU, and none is available",
            "use backend='torch' (the pure-PyTorch reference rasterizer) or 'auto'",
        )
    gsplat = _import_gsplat()
    if gsplat is None:
        raise ConfigError(
            "render backend 'gsplat' was requested but the gsplat package cannot be imported",
            f"install it with `pip install gsplat=={GSPLAT_VERSION}`, or use backend='torch' or 'auto'",
        )
    return gsplat


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None,
    near: float,
    far: float,
    eps2d: float = 0.3,
    options: GsplatOptions = GsplatOptions(),
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Render B views with gsplat.

    Args:
        means (N, 3) or (B, N, 3), quats (..., N, 4) wxyz, scales (..., N, 3), opacities (..., N),
        colors (..., N, C): shared Gaussians, or one set per view when they have the leading B.
        viewmats (B, 4, 4) world-to-camera, Ks (B, 3, 3) pixel intrinsics, backgrounds (B, C) or None.
        All on one CUDA device.

    Returns:
        rgb (B, H, W, C), alpha (B, H, W, 1), expected depth (B, H, W, 1) (None without ``options.depth``).
    """
    gsplat = require_gsplat()
    if means.device.type != "cuda":
        raise ConfigError(
            f"render backend 'gsplat' needs CUDA tensors, got tensors on '{means.device}'",
            "move the Gaussians and cameras to a CUDA device, or use backend='torch' or 'auto'",
        )
    f32 = dict(dtype=torch.float32)
    means, quats, scales = means.to(**f32), quats.to(**f32), scales.to(**f32)
    opacities, colors = opacities.to(**f32), colors.to(**f32)
    viewmats, Ks = viewmats.to(**f32).contiguous(), Ks.to(**f32).contiguous()
    if backgrounds is not None:
        backgrounds = backgrounds.to(**f32)

    per_view = means.dim() == 3
    if per_view:
        # gsplat 1.5 batch dims: Gaussians [B, N, ...] with cameras [B, C=1, ...] render image b from set b.
        viewmats, Ks = viewmats[:, None], Ks[:, None]
        if backgrounds is not None:
            backgrounds = backgrounds[:, None]
    renders, alphas, _ = gsplat.rasterization(
        means=means.contiguous(),
        quats=quats.contiguous(),
        scales=scales.contiguous(),
        opacities=opacities.contiguous(),
        colors=colors.contiguous(),
        viewmats=viewmats,
        Ks=Ks,
        width=int(width),
        height=int(height),
        near_plane=float(near),
        far_plane=float(far),
        eps2d=float(eps2d),
        sh_degree=None,
        packed=bool(options.packed),
        tile_size=int(options.tile_size),
        backgrounds=backgrounds.contiguous() if backgrounds is not None else None,
        render_mode="RGB+ED" if options.depth else "RGB",
        rasterize_mode="classic",
    )
    if per_view:
        renders, alphas = renders[:, 0], alphas[:, 0]
    if not options.depth:
        return renders, alphas, None
    return renders[..., :-1], alphas, renders[..., -1:]
