"""Reading portraits and videos as RGB frames.

Images go through Pillow (EXIF orientation applied, greyscale / palette / 16-bit / RGBA converted to 8-bit RGB).
Videos go through ``decord``: frames are fetched by index with ``get_batch`` on small chunks, so a long video is never
decoded into memory at once. A video is read twice by the stage: once small (``max_side``) to find the face boxes,
once at full resolution to crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2  # noqa: F401  (load before decord: its bundled old zlib breaks cv2 PNG decoding if it loads first)
import numpy as np

from ..errors import InputError
from ..store import IMAGE_EXTS, VIDEO_EXTS

_VIDEO_FIX = "check that the file is a complete, playable video (re-encode it with ffmpeg if needed)"
_IMAGE_FIX = "check that the file is a complete image (re-save it as PNG or JPEG if needed)"


def select_indices(
    num_frames: int, source_fps: float, fps: float | None, stride: int, max_frames: int | None
) -> tuple[np.ndarray, float]:
    """Source frame indices to keep and the frame rate of the kept sequence.

    Order: resample to ``fps`` (nearest source frame of each output time stamp; never upsamples), then keep every
    ``stride``-th frame, then the first ``max_frames``.
    """
    idx = np.arange(num_frames)
    out_fps = source_fps
    if fps is not None and source_fps > 0 and fps < source_fps:
        step = source_fps / fps
        idx = np.unique(np.floor(np.arange(math.ceil(num_frames / step)) * step + 1e-6).astype(np.int64))
        idx = idx[idx < num_frames]
        out_fps = fps
    idx = idx[::stride]
    out_fps = out_fps / stride
    if max_frames is not None:
        idx = idx[:max_frames]
    return idx.astype(np.int64), float(out_fps)


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied; transparent pixels are composited over white.

    Raises InputError naming the file when it is missing, truncated or not an image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit greyscale: rescale to 8 bit
                arr = np.asarray(im, dtype=np.float64)
                arr = arr * (255.0 / 65535.0 if arr.max() > 255 else 1.0)
                im = Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), "L")
            if im.mode in ("P", "LA", "PA", "La", "RGBa"):
                im = im.convert("RGBA")
            if im.mode == "RGBA":
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise InputError(f"input '{path}' not found", "check the path") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read image '{path}': {e}", _IMAGE_FIX) from e
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 16:
        raise InputError(f"image '{path}' is too small ({rgb.shape[1]}x{rgb.shape[0]})", "use a portrait photo")
    return np.ascontiguousarray(rgb)


def resize_max_side(rgb: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale so the longer side is at most ``max_side``; returns (image, scale = new / old)."""
    import cv2

    h, w = rgb.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return rgb, 1.0
    s = max_side / max(h, w)
    out = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return out, out.shape[1] / w


@dataclass
class FrameSource:
    """Frames of one input. ``indices`` are the source frame numbers kept (after fps / stride / max_frames)."""

    path: Path
    kind: str  # "image" | "video"
    width: int
    height: int
    source_fps: float
    fps: float
    num_source_frames: int
    indices: np.ndarray
    _image: np.ndarray | None = field(default=None, repr=False)
    _readers: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.indices)

    def frames(self, positions: Sequence[int], chunk: int = 8, max_side: int | None = None
               ) -> Iterator[tuple[int, np.ndarray, float]]:
        """Yield (position, (H, W, 3) uint8 RGB, scale) for positions into ``indices``, in the given order.

        ``max_side`` asks for a smaller decode (scale = decoded / full size). Videos are fetched ``chunk`` frames
        at a time, so at most ``chunk`` decoded frames are alive at once.
        """
        if self.kind == "image":
            assert self._image is not None
            for p in positions:
                img, s = resize_max_side(self._image, max_side)
                yield p, img, s
            return
        reader, scale = self._reader(max_side)
        positions = list(positions)
        for start in range(0, len(positions), chunk):
            part = positions[start:start + chunk]
            try:
                batch = reader.get_batch([int(self.indices[p]) for p in part]).asnumpy()
            except Exception as e:  # decord raises its own DECORDError (and others) on broken streams
                raise InputError(f"cannot decode video '{self.path}' (frames {part[0]}..{part[-1]}): "
                                 f"{_first_line(e)}", _VIDEO_FIX) from e
            for p, frame in zip(part, batch):
                yield p, np.ascontiguousarray(frame), scale
            del batch

    def _reader(self, max_side: int | None):
        import decord

        w, h = self.width, self.height
        if max_side is not None and max(w, h) > max_side:
            s = max_side / max(w, h)
            # Even sizes keep the scaler happy with 4:2:0 video.
            ws, hs = max(2, 2 * round(w * s / 2)), max(2, 2 * round(h * s / 2))
            key = (ws, hs)
        else:
            ws, hs, key = -1, -1, None
        if key not in self._readers:
            # One decoder at a time: a second open decord reader costs hundreds of MB and its memory keeps growing
            # while the other one decodes (measured with decord 0.6.0).
            self._readers.clear()
            try:
                self._readers[key] = decord.VideoReader(str(self.path), ctx=decord.cpu(0), width=ws, height=hs,
                                                        num_threads=1)
            except Exception as e:
                raise InputError(f"cannot read video '{self.path}': {_first_line(e)}", _VIDEO_FIX) from e
        return self._readers[key], (1.0 if key is None else key[0] / w)

    def close(self) -> None:
        self._readers.clear()
        self._image = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def open_source(path: str | Path, fps: float | None = None, stride: int = 1,
                max_frames: int | None = None) -> FrameSource:
    """Open an image or a video (by extension; unknown extensions are tried as images first).

    Raises InputError naming the file when it is missing, empty, truncated or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input '{path}' not found", "check the path")
    if path.stat().st_size == 0:
        raise InputError(f"input '{path}' is empty (0 bytes)", "check the file was copied completely")
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTS:
        return _open_video(path, fps, stride, max_frames)
    if suffix not in IMAGE_EXTS:
        try:
            return _open_image(path)
        except InputError:
            try:
                return _open_video(path, fps, stride, max_frames)
            except InputError:
                raise InputError(f"input '{path}' is neither a readable image nor a video",
                                 f"use one of {', '.join(IMAGE_EXTS + VIDEO_EXTS)}") from None
    return _open_image(path)


def _open_image(path: Path) -> FrameSource:
    rgb = load_image(path)
    h, w = rgb.shape[:2]
    return FrameSource(path, "image", w, h, 0.0, 0.0, 1, np.zeros(1, np.int64), _image=rgb)


def _open_video(path: Path, fps: float | None, stride: int, max_frames: int | None) -> FrameSource:
    import decord

    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        first = vr[0].asnumpy() if n else None  # decoding one frame catches streams that open but cannot decode
        src_fps = float(vr.get_avg_fps() or 0.0)
    except Exception as e:
        raise InputError(f"cannot read video '{path}': {_first_line(e)}", _VIDEO_FIX) from e
    if n == 0 or first is None:
        raise InputError(f"video '{path}' has no frames", _VIDEO_FIX)
    h, w = first.shape[:2]
    if not math.isfinite(src_fps) or src_fps <= 0:
        src_fps = 25.0  # unknown rate: a common default; only used for --fps and the recorded rate
    idx, out_fps = select_indices(n, src_fps, fps, stride, max_frames)
    del first, vr  # readers are opened again on demand, one at a time (see FrameSource._reader)
    return FrameSource(path, "video", w, h, src_fps, out_fps, n, idx)
