"""The training objective (paper eq. 6-10).

    L = L_re + L_α + λ_id L_id + λ^1 (L_lpips^1 + L_α^1) + L_reg
    L_reg = λ_3d L_3d + λ_eye L_eye + λ_pos L_pos + λ_shape L_shape + λ_shape^tv L_shape^tv

Terms, each returned (unweighted) under its own name so that every one is logged:

* ``l1``, ``perceptual``: L_re = L1 + LPIPS on RGB. LPIPS needs torchvision's ImageNet backbone, which we cannot ship
  or download; when ``pipelines.evaluate.models.lpips_model`` cannot load it, the perceptual term is a
  differentiable SSIM term, (1 - SSIM) weighted by ``LossConfig.lambda_ssim`` (:func:`perceptual_backend` says which).
* ``alpha``: L1 between the rendered alpha I_α and the target matte.
* ``id``: the paper's ArcFace identity loss. Our only identity model (dlib CSIM) is not differentiable, so the term
  is skipped (never computed; the training log records why).
* ``aux_perceptual``, ``aux_alpha``: the auxiliary branch A^1 (rendered I_o^1, I_α^1), weighted by λ^1. With the
  SSIM fallback we also add L1 to the auxiliary RGB term (SSIM alone ignores absolute colour).
* ``3d`` (eq. 6): TV((I_3d - (1 - I_α)) / I_α) where I_3d renders the Gaussian *positions* as colours over a white
  (1) background with the same Gaussians; I_α is clamped from below by ``alpha_min``.
* ``eye``: TV of the attribute maps over the eyeball UV region (GAIA [51]): neighbouring eyeball texels agree.
* ``pos``: L_pos = ||A_position||_2, mean over valid texels (metres).
* ``shape`` (eq. 7): max(||Δp_uv||_2 - ε, 0), mean over valid texels.
* ``shape_tv`` (eq. 8): TV(Δp_uv) over valid neighbouring texels.

TV is the mean absolute difference between horizontally and vertically neighbouring pixels/texels (both counted
only where both neighbours are inside the given mask), averaged over channels.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from ..avatar.maps import ATTRIBUTE_SLICES
from .config import LossConfig


# ------------------------------------------------------------------------------------------------------ building blocks
def total_variation(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |x_i - x_j| over 4-neighbour pairs (i, j) of (B, C, H, W), where ``mask`` (B or 1, 1, H, W) is set at both."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs()
    if mask is None:
        return 0.5 * (dh.mean() + dw.mean())
    m = mask.to(x.dtype)
    mh = m[..., 1:, :] * m[..., :-1, :]
    mw = m[..., :, 1:] * m[..., :, :-1]
    C = x.shape[1]
    num = (dh * mh).sum() + (dw * mw).sum()
    den = C * (mh.expand(x.shape[0], 1, -1, -1).sum() + mw.expand(x.shape[0], 1, -1, -1).sum())
    return num / den.clamp_min(1.0)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Differentiable mean SSIM of (B, C, H, W) images in [0, 1] (Gaussian 11x11 window, sigma 1.5, 'valid' region).

    Same definition as ``pipelines.evaluate.metrics.ssim`` (which uses reflect padding and crops the border).
    """
    C = x.shape[1]
    g = _gaussian_kernel(size, sigma, x.device, x.dtype)
    gh = g.view(1, 1, size, 1).expand(C, 1, size, 1)
    gw = g.view(1, 1, 1, size).expand(C, 1, 1, size)

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, gh, groups=C), gw, groups=C)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean()


@functools.lru_cache(maxsize=1)
def _lpips_or_reason():
    """(lpips module or None, reason). The LPIPS *metric* wrapper runs under no_grad, so we use its inner network."""
    try:
        from ..evaluate.models import ModelUnavailable, lpips_model
    except Exception as e:  # noqa: BLE001
        return None, f"evaluate.models unavailable ({e})"
    try:
        return lpips_model("vgg").net, "LPIPS (VGG)"
    except ModelUnavailable as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001
        return None, f"LPIPS failed to load ({type(e).__name__}: {e})"


def perceptual_backend() -> str:
    """'lpips' when LPIPS can be loaded offline, else 'ssim' (the fallback)."""
    return "lpips" if _lpips_or_reason()[0] is not None else "ssim"


def perceptual_note() -> str:
    model, why = _lpips_or_reason()
    return "LPIPS (VGG) on RGB" if model is not None else f"LPIPS unavailable ({why}); using lambda_ssim * (1 - SSIM)"


def perceptual_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """LPIPS(pred, target) or, without LPIPS weights, lambda_ssim * (1 - SSIM); images (B, 3, H, W) in [0, 1]."""
    model, _ = _lpips_or_reason()
    if model is not None:
        model = model.to(pred.device)
        return model(pred, target).mean()
    return cfg.lambda_ssim * (1.0 - ssim(pred, target))


def position_tv(i3d: torch.Tensor, alpha: torch.Tensor, cfg: LossConfig, matte: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6: TV((I_3d - (1 - I_α)) / max(I_α, alpha_min)); I_3d (B, 3, H, W) rendered over a background of 1."""
    normalized = (i3d - (1.0 - alpha)) / alpha.clamp_min(cfg.alpha_min)
    mask = (matte > 0.5) if (matte is not None and cfg.tv3d_in_matte) else None
    return total_variation(normalized, mask)


def shape_hinge(delta_p: torch.Tensor, valid: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 7: mean over valid texels of max(||Δp||_2 - ε, 0); delta_p (B, 3, K, K), valid (1 or B, 1, K, K)."""
    v = valid.to(delta_p.dtype).expand(delta_p.shape[0], 1, -1, -1)
    h = F.relu(delta_p.norm(dim=1, keepdim=True) - epsilon)
    return (h * v).sum() / v.sum().clamp_min(1.0)


def offset_norm(offset: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_pos: mean over valid texels of ||A_position||_2; offset (B, 3, K, K)."""
    v = valid.to(offset.dtype).expand(offset.shape[0], 1, -1, -1)
    return (offset.norm(dim=1, keepdim=True) * v).sum() / v.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------- objective
def compute_losses(
    rgb: torch.Tensor,
    alpha: torch.Tensor,
    target: torch.Tensor,
    matte: torch.Tensor,
    cfg: LossConfig,
    weights: dict[str, float],
    A: torch.Tensor,
    delta_p: torch.Tensor,
    valid: torch.Tensor,
    eye_mask: torch.Tensor,
    i3d: torch.Tensor | None = None,
    rgb_aux: torch.Tensor | None = None,
    alpha_aux: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total and every unweighted term (detached) by name.

    rgb, target, rgb_aux, i3d: (B, 3, H, W); alpha, matte, alpha_aux: (B, 1, H, W); A: (B, 14, K, K) activated
    attribute maps; delta_p: (B, 3, K, K); valid, eye_mask: (1, 1, K, K). Terms whose weight is 0 are skipped
    (not computed, logged as 0) so that late regularisers cost nothing before their milestone.
    """
    terms: dict[str, torch.Tensor] = {}
    total = rgb.new_zeros(())
    fallback = perceptual_backend() == "ssim"

    def add(name: str, weight: float, fn) -> None:
        nonlocal total
        if weight == 0.0:
            terms[name] = rgb.new_zeros(())
            return
        value = fn()
        terms[name] = value.detach()
        total = total + weight * value

    add("l1", weights["l1"], lambda: (rgb - target).abs().mean())
    add("perceptual", weights["perceptual"], lambda: perceptual_loss(rgb, target, cfg))
    add("alpha", weights["alpha"], lambda: (alpha - matte).abs().mean())
    if rgb_aux is not None and alpha_aux is not None:
        def aux_rgb() -> torch.Tensor:
            p = perceptual_loss(rgb_aux, target, cfg)
            return p + (rgb_aux - target).abs().mean() if fallback else p

        add("aux_perceptual", weights["aux"], aux_rgb)
        add("aux_alpha", weights["aux"], lambda: (alpha_aux - matte).abs().mean())
    # Without I_3d (not rendered while λ_3d is 0) the term is logged as 0 like every other inactive term.
    add("3d", weights["3d"] if i3d is not None else 0.0, lambda: position_tv(i3d, alpha, cfg, matte))
    add("eye", weights["eye"], lambda: total_variation(A, eye_mask))
    add("pos", weights["pos"], lambda: offset_norm(A[:, ATTRIBUTE_SLICES["offset"]], valid))
    add("shape", weights["shape"], lambda: shape_hinge(delta_p, valid, cfg.epsilon))
    add("shape_tv", weights["shape_tv"], lambda: total_variation(delta_p, valid))
    terms["total"] = total.detach()
    return total, terms


def warn_skipped_terms() -> list[str]:
    """Human-readable notes on the terms that cannot be computed here (logged once at the start of training)."""
    notes = []
    if perceptual_backend() == "ssim":
        notes.append(perceptual_note())
    notes.append("L_id skipped: the only identity model available (dlib face recognition, CSIM) is not "
                 "differentiable and ArcFace weights cannot be shipped")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return notes
