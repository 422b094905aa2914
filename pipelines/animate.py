"""The one render loop shared by reenactment and turntables: pose the avatar per frame, render, yield images."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .avatar.binding import AvatarRig, Gaussians
from .core.camera import Camera, to_pixel_intrinsics, world_to_camera
from .head.base import HeadParams

log = logging.getLogger(__name__)


@dataclass
class Frame:
    """One rendered frame: rgb (H, W, 3) uint8, alpha (H, W) uint8."""

    rgb: np.ndarray
    alpha: np.ndarray


def render_sequence(
    rig: AvatarRig,
    params: HeadParams,
    cameras: Camera,
    size: int = 512,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    backend: str = "auto",
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Frame]:
    """Render T frames: params (T frames, or 1 broadcast) x cameras (T, or 1 broadcast).

    Frames are posed and rendered ``batch_size`` at a time (one batched LBS + deformation + one batched render).
    Everything per frame that does not depend on the Gaussians (parameters, view matrices, intrinsics) is moved to
    the device once; on CUDA the posing of full batches replays a CUDA graph (:meth:`AvatarRig.pose_graph`) and each
    batch comes back in one copy through pinned memory.
    """
    from .render import render_gaussians

    device = rig.color.device
    T = max(params.batch, len(cameras))
    params = params.to(device)
    viewmats = world_to_camera(cameras.c2w.to(device))
    Ks = to_pixel_intrinsics(cameras.K.to(device), size, size)
    bg = torch.tensor(background, dtype=torch.float32, device=device).expand(batch_size, 3)
    pose_full_batch = _full_batch_poser(rig, batch_size) if T >= batch_size else None
    for s in range(0, T, batch_size):
        n = min(batch_size, T - s)
        with torch.no_grad():
            p = HeadParams(**{k: _frames(v, s, n) for k, v in params.to_dict().items()})
            g = pose_full_batch(p) if pose_full_batch is not None and n == batch_size else rig.pose_params(p)
            out = render_gaussians(
                g.means, g.quats, g.scales, g.opacities, g.colors,
                viewmats=_frames(viewmats, s, n), Ks=_frames(Ks, s, n),
                width=size, height=size, backgrounds=bg[:n], backend=backend,
            )
            rgb, alpha = _to_host_uint8(out.rgb, out.alpha[..., 0])
        for b in range(n):
            yield Frame(rgb[b], alpha[b])
        if progress is not None:
            progress(n)


def _frames(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Frames start..start+n of a per-frame tensor (T, ...), or its single frame (1, ...) broadcast: views only."""
    return x[start:start + n] if x.shape[0] > 1 else x.expand(n, *x.shape[1:])


def _to_host_uint8(*images: torch.Tensor) -> list[np.ndarray]:
    """Images in [0, 1] (n, H, W[, C]) -> uint8 numpy arrays, copied from CUDA through pinned memory with one
    synchronisation for all of them."""
    cuda = images[0].device.type == "cuda"
    out = []
    for img in images:
        img8 = (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        host = torch.empty(img8.shape, dtype=torch.uint8, pin_memory=cuda)
        out.append(host.copy_(img8, non_blocking=cuda))
    if cuda:
        torch.cuda.current_stream(images[0].device).synchronize()
    return [h.numpy() for h in out]


def _full_batch_poser(rig: AvatarRig, batch_size: int) -> Callable[[HeadParams], Gaussians] | None:
    """The rig's CUDA-graph poser for full batches, or None off CUDA (or if capture fails: eager posing then)."""
    if rig.color.device.type != "cuda":
        return None
    try:
        return rig.pose_graph(batch_size)
    except RuntimeError as e:  # a torch build that cannot capture some op: slower, same result
        log.warning("CUDA graph capture of the pose step failed (%s); posing eagerly", e)
        return None


def write_frames(frames: Iterable[Frame], video_path: str | Path | None, png_dir: str | Path | None,
                 fps: float) -> int:
    """Stream frames to an mp4 and/or an RGBA PNG sequence; returns the number of frames."""
    from .video import write_png, write_video

    def tee() -> Iterator[np.ndarray]:
        for i, fr in enumerate(frames):
            if png_dir is not None:
                write_png(Path(png_dir) / f"{i:06d}.png", np.concatenate([fr.rgb, fr.alpha[..., None]], -1))
            yield fr.rgb

    if video_path is not None:
        return write_video(video_path, tee(), fps=fps)
    return sum(1 for _ in tee())
