"""Validation on held-out clips: self-reenactment PSNR / SSIM of the network and of the no-network baseline.

Besides the image metrics each clip reports how well the rendered silhouette covers the person: ``coverage`` is the
rendered alpha area over the target matte's area (1 = same size; < 1 = the head comes out too small) and ``iou`` the
intersection over union of the two silhouettes (both thresholded at 0.5).

For each validation clip the first tracked frame is the source; the avatar is driven by the tracked motion of the
following frames and rendered from their cameras, then compared with those frames (both on the white background
the preprocess composites on). The baseline is ``reconstruct.unproject_maps`` (source colours unprojected onto the
tracked mesh, no network), rendered the same way; it does not change during training, so it is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..avatar.binding import AvatarRig
from ..evaluate.metrics import psnr, ssim
from ..head.base import HeadModel, HeadParams
from ..network.model import FHAvatarNet
from ..uv.space import UVSpace
from .data import ValClip, resize_images
from .forward import predict_avatar, render_rig


@dataclass
class ValResult:
    """Per clip: rendered frames (T, H, W, 3) float in [0, 1], their PSNR / SSIM (T,) and silhouette coverage / IoU
    against the target mattes (T,)."""

    name: str
    frames: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    coverage: np.ndarray
    iou: np.ndarray

    def summary(self) -> dict[str, float]:
        return {"psnr": float(np.mean(self.psnr)), "ssim": float(np.mean(self.ssim)),
                "coverage": float(np.mean(self.coverage)), "iou": float(np.mean(self.iou)),
                "frames": int(len(self.psnr))}


def silhouette_overlap(alpha: np.ndarray, matte: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (rendered area / matte area) and IoU per frame of alpha (T, H, W) against matte (T, H, W)."""
    a, m = alpha > threshold, matte > threshold
    area = np.maximum(m.sum((1, 2)), 1)
    union = np.maximum((a | m).sum((1, 2)), 1)
    return a.sum((1, 2)) / area, (a & m).sum((1, 2)) / union


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def render_reenactment(rig: AvatarRig, head: HeadModel, clip: ValClip, size: int, chunk: int = 8,
                       backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Renders of the rig driven by the clip's target frames: rgb (T, size, size, 3) and alpha (T, size, size)."""
    out, alphas = [], []
    T = clip.tgt_img.shape[0]
    for s in range(0, T, chunk):
        idx = slice(s, min(s + chunk, T))
        p = HeadParams(**{k: v[idx] for k, v in clip.tgt_params.to_dict().items()})
        p.shape = rig.shape.expand(p.batch, -1)
        verts = head(p)
        r = render_rig(rig, verts, clip.tgt_c2w[idx], clip.K.expand(verts.shape[0], 3, 3), size, backend=backend)
        out.append(_np(r.rgb))
        alphas.append(_np(r.alpha)[..., 0])
    return np.concatenate(out), np.concatenate(alphas)


def score(name: str, rendered: tuple[np.ndarray, np.ndarray], clip: ValClip, size: int) -> ValResult:
    frames, alpha = rendered
    gt = _np(resize_images(clip.tgt_img, size))
    coverage, iou = silhouette_overlap(alpha, _np(resize_images(clip.tgt_matte, size))[..., 0])
    return ValResult(name, frames, psnr(frames, gt), ssim(frames, gt), coverage, iou)


@torch.no_grad()
def validate_network(net: FHAvatarNet, head: HeadModel, uv: UVSpace, clip: ValClip, size: int, amp: bool = False,
                     backend: str = "auto") -> ValResult:
    was_training = net.training
    net.eval()
    try:
        img = resize_images(clip.src_img, net.config.image_size)
        pred = predict_avatar(net, head, uv, img, clip.src_params, clip.src_c2w, clip.K, with_aux=False, amp=amp)
        frames = render_reenactment(pred.rig(head, uv), head, clip, size, backend=backend)
    finally:
        net.train(was_training)
    return score(clip.name, frames, clip, size)


@torch.no_grad()
def validate_baseline(head: HeadModel, uv: UVSpace, clip: ValClip, size: int, backend: str = "auto") -> ValResult:
    """The no-network baseline: ``unproject_maps`` of the source frame, no shape offset."""
    from ..reconstruct import SourceFrame, unproject_maps

    src = SourceFrame(clip.src_img[0], clip.src_matte[0], clip.src_params, clip.K[0], clip.src_c2w[0])
    maps = unproject_maps(src, head, uv)
    rig = AvatarRig(head, uv, maps, clip.src_params.shape, None)
    return score(clip.name, render_reenactment(rig, head, clip, size, backend=backend), clip, size)


def comparison_grid(clip: ValClip, ours: ValResult, baseline: ValResult | None, size: int,
                    rows: int = 2) -> np.ndarray:
    """(rows * size, 4 * size, 3) uint8: source | target | ours | baseline for ``rows`` evenly spread targets."""
    T = len(ours.frames)
    picks = np.linspace(0, T - 1, rows).round().astype(int) if T > 1 else np.zeros(rows, int)
    src = _np(resize_images(clip.src_img, size))[0]
    gt = _np(resize_images(clip.tgt_img, size))
    blank = np.ones_like(src)
    lines = [np.concatenate([src, gt[t], ours.frames[t], baseline.frames[t] if baseline is not None else blank], 1)
             for t in picks]
    return (np.concatenate(lines, 0) * 255 + 0.5).astype(np.uint8)
