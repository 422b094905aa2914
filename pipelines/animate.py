"""The one render loop shared by reenactment and turntables: pose the avatar per frame, render, yield images."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

from .avatar.binding import AvatarRig, Gaussians
from .core.camera import Camera, to_pixel_intrinsics, world_to_camera
from .head.base import HeadParams

if TYPE_CHECKING:
    from .render import GsplatOptions

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
    options: "GsplatOptions | None" = None,
) -> Iterator[Frame]:
    """Render T frames: params (T frames, or 1 broadcast) x cameras (T, or 1 broadcast).

    Frames are posed and rendered ``batch_size`` at a time (one batched LBS + deformation + one batched render).
    Everything per frame that does not depend on the Gaussians (parameters, view matrices, intrinsics) is moved to
    the device once; on CUDA full batches are posed by CUDA graphs on a second stream, the next batch while this one
    renders (:class:`PosePipeline`), and each batch comes back in one copy through pinned memory. ``options``: the
    renderer's (gsplat) layout; depth is never rendered here.
    """
    from .render import GsplatOptions, render_gaussians

    device = rig.color.device
    T = max(params.batch, len(cameras))
    params = params.to(device)
    viewmats = world_to_camera(cameras.c2w.to(device))
    Ks = to_pixel_intrinsics(cameras.K.to(device), size, size)
    bg = torch.tensor(background, dtype=torch.float32, device=device).expand(batch_size, 3)
    options = dataclasses.replace(options or GsplatOptions(), depth=False)
    n_full = T // batch_size
    pipe = _pose_pipeline(rig, batch_size) if n_full else None

    def batch(s: int, n: int) -> HeadParams:
        return HeadParams(**{k: _frames(v, s, n) for k, v in params.to_dict().items()})

    with torch.no_grad():
        pending = pipe.submit(batch(0, batch_size)) if pipe is not None else None
    for s in range(0, T, batch_size):
        n = min(batch_size, T - s)
        with torch.no_grad():  # not around the yield: the caller's code must not run without autograd
            if pending is not None and n == batch_size:
                slot, g = pending, pipe.result(pending)
                # The next full batch is posed on the pose stream while this one renders.
                nxt = s + batch_size
                pending = pipe.submit(batch(nxt, batch_size)) if nxt + batch_size <= T else None
            else:
                slot, g = None, rig.pose_params(batch(s, n))
            out = render_gaussians(
                g.means, g.quats, g.scales, g.opacities, g.colors,
                viewmats=_frames(viewmats, s, n), Ks=_frames(Ks, s, n),
                width=size, height=size, backgrounds=bg[:n], backend=backend, options=options,
            )
            if slot is not None:
                pipe.release(slot)
            rgb, alpha = _to_host_uint8(out.rgb, out.alpha[..., 0])
        for b in range(n):
            yield Frame(rgb[b], alpha[b])
        if progress is not None:
            progress(n)


class PosePipeline:
    """Full batches posed by CUDA graphs on their own stream, two output slots used in turn: ``submit`` the next
    batch before rendering this one and the pose step runs beside the render instead of before it.

    ``submit(params)`` replays the free slot's graph on the pose stream (once the render that last read that slot is
    done) and returns the slot; ``result(slot)`` makes the current stream wait for that pose and returns its
    Gaussians; ``release(slot)`` marks, on the current stream, that its render has been issued (call it after the
    render that reads the slot). CUDA only.
    """

    def __init__(self, rig: AvatarRig, batch: int) -> None:
        self.graphs = [rig.pose_graph(batch, slot) for slot in (0, 1)]
        device = rig.color.device
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the inputs were made on the current stream
        self.posed = [torch.cuda.Event(), torch.cuda.Event()]
        self.released = [torch.cuda.Event(), torch.cuda.Event()]  # waiting on one never recorded returns at once
        self.next = 0

    def submit(self, params: HeadParams) -> int:
        slot, self.next = self.next, 1 - self.next
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.released[slot])
            self.graphs[slot](params)
            self.posed[slot].record(self.stream)
        return slot

    def result(self, slot: int) -> Gaussians:
        torch.cuda.current_stream(self.stream.device).wait_event(self.posed[slot])
        return self.graphs[slot].out

    def release(self, slot: int) -> None:
        self.released[slot].record(torch.cuda.current_stream(self.stream.device))


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


def _pose_pipeline(rig: AvatarRig, batch_size: int) -> PosePipeline | None:
    """The rig's CUDA-graph pose pipeline for full batches, or None off CUDA (or if capture fails: eager posing
    then)."""
    if rig.color.device.type != "cuda":
        return None
    try:
        return PosePipeline(rig, batch_size)
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
