"""Writing small test videos (H.264 mp4 through the ffmpeg binary of the imageio-ffmpeg wheel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25) -> None:
    """Encode RGB uint8 frames (H, W, 3) as an mp4 at ``path``."""
    import imageio_ffmpeg

    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         quality=9, macro_block_size=16, ffmpeg_log_level="error")
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()
