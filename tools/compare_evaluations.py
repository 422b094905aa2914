#!/usr/bin/env python3
"""Per-clip table of several ``fhavatar evaluate`` runs side by side (markdown), for choosing between weights.

    python tools/compare_evaluations.py NAME=DIR [NAME=DIR ...] [--protocol self|cross] [--json OUT.json]

DIR: an ``evaluate --out`` folder (its ``eval-<protocol>.json``). Rows: clip x run, then the mean over the clips of
each run; columns: the metrics the reports share, and for ``self`` the PSNR of the frame after the source (the view
closest to the source, one frame of motion later). Final lines count, for the first run (the candidate) against
each other run, on how many clips it is better on each metric (↑ higher / ↓ lower is better).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Direction of each metric: +1 higher is better, -1 lower is better.
DIRECTION = {"psnr": 1, "ssim": 1, "lpips": -1, "csim": 1, "akd": -1, "aed": -1, "apd": -1, "after_source_psnr": 1}
FORMAT = {"ssim": "{:.4f}", "csim": "{:.4f}", "aed": "{:.4f}", "lpips": "{:.4f}"}


def load_run(folder: Path, protocol: str) -> dict[str, dict[str, float]]:
    """``{clip name: {metric: value}}`` of one evaluate folder; ``after_source_psnr`` from each video's frames."""
    report = json.loads((folder / f"eval-{protocol}.json").read_text())
    rows: dict[str, dict[str, float]] = {}
    for video in report["videos"]:
        values = {k: float(v) for k, v in video["mean"].items() if k in DIRECTION and isinstance(v, (int, float))}
        per_video = folder / video["item_id"] / "eval" / f"{protocol}.json"
        if protocol == "self" and per_video.exists():
            per_frame = json.loads(per_video.read_text())["per_frame"].get("psnr") or []
            if per_frame:
                values["after_source_psnr"] = float(per_frame[0])
        rows[str(video.get("video") or video.get("name"))] = values
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR")
    parser.add_argument("--protocol", default="self", choices=("self", "cross"))
    parser.add_argument("--json", type=Path, default=None, help="also write the table's values here")
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            parser.error(f"'{spec}' is not NAME=DIR")
        runs[name] = load_run(Path(folder), args.protocol)
    clips = sorted(set.intersection(*(set(r) for r in runs.values())))
    metrics = [m for m in DIRECTION if all(m in runs[n][c] for n in runs for c in clips)]
    arrow = {1: "↑", -1: "↓"}
    lines = ["| clip | run | " + " | ".join(f"{m.replace('_', ' ')} {arrow[DIRECTION[m]]}" for m in metrics) + " |",
             "|:--|:--|" + "--:|" * len(metrics)]

    def cell(m: str, v: float) -> str:
        return "inf" if math.isinf(v) else FORMAT.get(m, "{:.2f}").format(v)

    for clip in clips:
        for name, run in runs.items():
            lines.append(f"| {clip} | {name} | " + " | ".join(cell(m, run[clip][m]) for m in metrics) + " |")
    means = {n: {m: sum(r[c][m] for c in clips) / len(clips) for m in metrics} for n, r in runs.items()}
    for name in runs:
        lines.append(f"| **mean of {len(clips)}** | {name} | " + " | ".join(cell(m, means[name][m]) for m in metrics)
                     + " |")
    first, *others = list(runs)
    lines.append("")
    for other in others:
        wins = {m: sum(DIRECTION[m] * (runs[first][c][m] - runs[other][c][m]) > 0 for c in clips) for m in metrics}
        lines.append(f"- {first} better than {other} on: " + ", ".join(f"{m} {w}/{len(clips)}" for m, w in wins.items()))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"protocol": args.protocol, "runs": runs, "means": means}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
