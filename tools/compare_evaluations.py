#!/usr/bin/env python3
"""Per-clip table of several ``fhavatar evaluate`` runs side by side (markdown), for choosing between weights.

    python tools/compare_evaluations.py NAME=DIR [NAME=DIR ...] [--protocol self|cross] [--json OUT.json]

DIR: an ``evaluate --out`` folder (its per-video ``<item>/eval/<protocol>.json``). Rows: clip x run, then the mean
over the clips of each run; columns: the metrics the reports share, and for ``self`` the PSNR of the frame after the
source (the view closest to the source, one frame of motion later). Final lines count, for the first run (the
candidate) against each other run, on how many clips it is better on each metric (↑ higher / ↓ lower is better).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluate.report import FORMATS, HIGHER_IS_BETTER, load_results  # noqa: E402

# Direction of each metric (+1 higher is better, -1 lower): the evaluation report's, and the frame after the source.
DIRECTION = {**{m: 1 if higher else -1 for m, higher in HIGHER_IS_BETTER.items()}, "after_source_psnr": 1}
# The report's number formats; keypoint (px) and pose (degree) errors to two decimals in these side-by-side tables.
FORMAT = {**FORMATS, "akd": ".2f", "apd": ".2f", "after_source_psnr": ".2f"}


def load_run(folder: Path, protocol: str) -> dict[str, dict[str, float]]:
    """``{clip name: {metric: value}}`` of one evaluate folder (its per-video results, as ``evaluate --merge`` reads
    them); for ``self`` also ``after_source_psnr``, the PSNR of each video's first driven frame."""
    rows: dict[str, dict[str, float]] = {}
    for record in load_results(folder, protocol):
        values = {k: float(v) for k, v in record["mean"].items() if k in DIRECTION and isinstance(v, (int, float))}
        psnr = record.get("per_frame", {}).get("psnr") or []
        if protocol == "self" and psnr:
            values["after_source_psnr"] = float(psnr[0])
        rows[record["name"]] = values
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
        if not runs[name]:
            parser.error(f"'{folder}' holds no `fhavatar evaluate --protocol {args.protocol}` results")
    clips = sorted(set.intersection(*(set(r) for r in runs.values())))
    metrics = [m for m in DIRECTION if all(m in runs[n][c] for n in runs for c in clips)]
    arrow = {1: "↑", -1: "↓"}
    lines = ["| clip | run | " + " | ".join(f"{m.replace('_', ' ')} {arrow[DIRECTION[m]]}" for m in metrics) + " |",
             "|:--|:--|" + "--:|" * len(metrics)]

    def cell(m: str, v: float) -> str:
        return "inf" if math.isinf(v) else format(v, FORMAT[m])

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
        counts = ", ".join(f"{m} {w}/{len(clips)}" for m, w in wins.items())
        lines.append(f"- {first} better than {other} on: {counts}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"protocol": args.protocol, "runs": runs, "means": means}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
