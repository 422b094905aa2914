"""Pack preprocessed clips into small training items (for moving training data to a GPU machine).

A packed item is what :mod:`pipelines.train.data` reads: ``tracking.npz`` + ``frames/%06d.jpg`` + ``mattes/%06d.png``
+ ``pack.json``, with the kept frames renumbered 0..n-1. Only tracked frames are kept, evenly spread over the clip
(``max_frames``), so that a clip's whole range of expressions and poses survives a tight size budget. Frames are
re-encoded as JPEG (``jpeg_quality``), mattes stay lossless PNG (the alpha loss reads their soft edges).
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
              first: int | None = None) -> Path:
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
