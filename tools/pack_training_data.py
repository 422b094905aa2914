#!/usr/bin/env python3
"""Pack preprocessed clips into small training items (JPEG frames, PNG mattes, renumbered tracking).

    python tools/pack_training_data.py OUT ITEM... [--max-frames N] [--first N] [--quality Q] [--video [--crf C]]

ITEM: ``<out>/<item-id>`` folders written by ``fhavatar preprocess``. ``--max-frames`` keeps N tracked frames
evenly spread over each clip (training); ``--first`` keeps the first N (validation/evaluation clips, which need
consecutive frames). Prints each packed folder and its size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.train.pack import pack_item  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("items", nargs="+", type=Path)
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--first", type=int, default=None)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--video", action="store_true", help="frames and mattes as H.264 mp4 (about 10x smaller)")
    ap.add_argument("--crf", type=int, default=20, help="H.264 quality with --video (lower is better)")
    a = ap.parse_args()
    for item in a.items:
        dst = pack_item(item, a.out, max_frames=a.max_frames, jpeg_quality=a.quality, first=a.first, video=a.video,
                        crf=a.crf)
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        print(f"{dst}  {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
