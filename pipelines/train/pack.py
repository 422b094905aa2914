"""Pack preprocessed clips into small training items (for moving training data to a GPU machine).

A packed item is what :mod:`pipelines.train.data` reads: ``tracking.npz`` + ``pack.json`` + either
``frames/%06d.jpg`` and ``mattes/%06d.png`` or (``video=True``) ``frames.mp4`` and ``mattes.mp4``, with the kept frames
renumbered 0..n-1. Only tracked frames are kept, evenly spread over the clip (``max_frames``), so that a clip's whole
range of expressions and poses survives a tight size budget. Images: frames as JPEG (``jpeg_quality``), mattes as
lossless PNG. Videos: H.264 (``crf``; mattes at a lower crf, since the alpha loss reads their soft edges), about ten
times smaller at the same size, so many more identities fit the GPU machine's transfer budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..store import atomic_path, write_json
from ..tracking.result import TRACKED, load_tracking, save_tracking
from .data import _frame_file, item_name


def spread_indices(candidates: np.ndarray, max_frames: int | None) -> np.ndarray:
    """At most ``max_frames`` of ``candidates`` (sorted frame indices), evenly spaced, first and last included."""
    if max_frames is None or len(candidates) <= max_frames:
        return candidates
    pick = np.unique(np.round(np.linspace(0, len(candidates) - 1, max_frames)).astype(int))
    return candidates[pick]


def pack_item(src: str | Path, dst_root: str | Path, max_frames: int | None = None, jpeg_quality: int = 90,
              first: int | None = None, video: bool = False, crf: int = 20) -> Path:
    """Pack one preprocessed item (``<item>`` or ``<item>/preprocess``) into ``dst_root/<item name>/``.

    Args:
        max_frames: keep at most this many tracked frames, evenly spread (None: all).
        first: keep only the first ``first`` tracked frames instead (consecutive: validation / evaluation clips).
    Returns the packed folder.
    """
    from PIL import Image

    src = Path(src)
    folder = src / "preprocess" if (src / "preprocess" / "tracking.npz").is_file() else src
    if not (folder / "tracking.npz").is_file():
        raise InputError(f"'{src}' is not a preprocessed item (no tracking.npz)", "run `fhavatar preprocess` on it")
    tracking = load_tracking(folder / "tracking.npz")
    tracked = np.nonzero(np.asarray(tracking.status) == TRACKED)[0]
    if len(tracked) == 0:
        raise InputError(f"'{src}' has no tracked frames", "check its preprocess manifest for per-frame errors")
    keep = tracked[:first] if first is not None else spread_indices(tracked, max_frames)
    out = Path(dst_root) / item_name(folder)
    if video:
        _pack_videos(folder, keep, out, crf)
        packed = tracking.select(keep)
        packed.landmarks = None  # the observed 2D points (half the file) serve tracking, not training
        save_tracking(out / "tracking.npz", packed)
        write_json(out / "pack.json", {"source": str(src), "source_frames": [int(i) for i in keep], "video": True,
                                       "crf": crf, "frames": len(keep)})
        return out
    (out / "frames").mkdir(parents=True, exist_ok=True)
    (out / "mattes").mkdir(parents=True, exist_ok=True)
    for new, old in enumerate(keep):
        with Image.open(_frame_file(folder, "frames", int(old))) as im:
            with atomic_path(out / "frames" / f"{new:06d}.jpg", suffix=".jpg") as tmp:
                im.convert("RGB").save(tmp, format="JPEG", quality=jpeg_quality)
        with Image.open(_frame_file(folder, "mattes", int(old))) as im:
            with atomic_path(out / "mattes" / f"{new:06d}.png", suffix=".png") as tmp:
                im.convert("L").save(tmp, format="PNG", optimize=True)
    save_tracking(out / "tracking.npz", tracking.select(keep))
    write_json(out / "pack.json", {"source": str(src), "source_frames": [int(i) for i in keep],
                                   "jpeg_quality": jpeg_quality, "frames": len(keep)})
    return out


def _pack_videos(folder: Path, keep: np.ndarray, out: Path, crf: int) -> None:
    """frames.mp4 / mattes.mp4 (H.264, yuv420p, 1 fps nominal: frames are samples, not a movie) of the kept frames."""
    import imageio.v2 as imageio
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for kind, name, mode, q in (("frames", "frames.mp4", "RGB", crf), ("mattes", "mattes.mp4", "L", max(crf - 4, 0))):
        with atomic_path(out / name, suffix=".mp4") as tmp:
            writer = imageio.get_writer(tmp, format="FFMPEG", fps=1, codec="libx264", macro_block_size=1,
                                        ffmpeg_params=["-crf", str(q), "-preset", "slow", "-g", "250"],
                                        pixelformat="yuv420p", ffmpeg_log_level="error")
            try:
                for t in keep:
                    with Image.open(_frame_file(folder, kind, int(t))) as im:
                        a = np.asarray(im.convert(mode))
                    writer.append_data(np.repeat(a[..., None], 3, -1) if mode == "L" else a)
            finally:
                writer.close()
