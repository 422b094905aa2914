"""Video and image-sequence output through the ffmpeg binary that the ``imageio-ffmpeg`` wheel ships.

Frames are streamed to ffmpeg's stdin (ffmpeg-python builds the command), so a long video is never held in memory.
The mp4 is written under a temporary name and renamed when complete (atomic).
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import InputError
from .store import atomic_path

_DISK_FULL = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def disk_full_error(path: str | Path, code: str = "ENOSPC") -> InputError:
    return InputError(f"the disk is full ({code}) writing '{path}'" if code == "ENOSPC" else
                      f"the disk quota is exceeded ({code}) writing '{path}'",
                      "free some space, or write to another --out folder")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Say why writing ``path`` failed: a full disk or quota as such (one line naming the file), not as a bare
    "could not write"; other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise disk_full_error(path, _DISK_FULL[e.errno]) from e
        raise


def write_file_bytes(path: str | Path, data: bytes) -> None:
    """Write encoded bytes (a PNG, ...) to ``path`` atomically; a full disk says so."""
    with writing(path), atomic_path(path) as tmp:
        tmp.write_bytes(data)


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 30.0, crf: int = 18) -> int:
    """Encode (H, W, 3) uint8 frames to H.264 mp4 (yuv420p, so every player opens it). Returns the frame count."""
    import ffmpeg

    it: Iterator[np.ndarray] = iter(frames)
    first = next(it, None)
    if first is None:
        raise InputError(f"no frames to write to '{path}'")
    h, w = first.shape[:2]
    if h % 2 or w % 2:
        raise InputError(f"video size {w}x{h} must be even for yuv420p", "use an even --size")
    n = 0
    with writing(path), atomic_path(path, suffix=".mp4") as tmp:
        proc = (
            ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
            .output(str(tmp), pix_fmt="yuv420p", vcodec="libx264", crf=crf, preset="veryfast", movflags="+faststart")
            .overwrite_output()
            .global_args("-loglevel", "error")
            .run_async(pipe_stdin=True, pipe_stderr=True, cmd=ffmpeg_exe())
        )
        try:
            for frame in _chain(first, it):
                proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
                n += 1
        except BrokenPipeError:  # ffmpeg stopped (e.g. the disk is full): its own message says why
            pass
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            err = proc.stderr.read().decode(errors="replace")
            code = proc.wait()
        if code != 0:
            if any(t in err for t in _DISK_FULL_TEXT):
                raise disk_full_error(path, "ENOSPC" if _DISK_FULL_TEXT[0] in err else "EDQUOT")
            raise InputError(f"ffmpeg failed writing '{path}': {err.strip().splitlines()[-1] if err.strip() else code}")
    return n


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, C) uint8 image as PNG atomically."""
    import imageio.v3 as iio

    with writing(path), atomic_path(path) as tmp:
        iio.imwrite(tmp, image, extension=".png")


def read_video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 frames of a video one at a time (decord)."""
    import decord

    vr = decord.VideoReader(str(path))
    for i in range(len(vr)):
        yield vr[i].asnumpy()


def to_uint8(img) -> np.ndarray:
    """Float image in [0,1] (torch or numpy) -> uint8 numpy."""
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
