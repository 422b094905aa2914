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


def sample_motion(folder: Path, head_model: str) -> Path:
    """``tools/make_sample_motion.py`` for ``head_model`` written into ``folder`` (the shipped
    sample_inputs/driving_motion.npz is the ICT head's; tests that drive embedded-head avatars make their own)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = Path(folder) / f"driving_motion_{head_model}.npz"
    subprocess.run([sys.executable, str(root / "tools" / "make_sample_motion.py"), "--head-model", head_model,
                    "--out", str(out)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(root)})
    return out
