"""Track preprocessed clips with several head models and compare their landmark errors, clip by clip.

Reads each ``<folder>/preprocess/landmarks.npz`` (MediaPipe's 478 points; written by ``fhavatar preprocess``),
tracks it with every head model named in ``--heads`` (the preprocess stage's own tracking is not touched) and writes
a markdown table and a JSON file: frames, frames tracked, median / 90th-percentile landmark error (px at 512) per
clip and head model.

Example (the table in docs/HEAD_MODELS.md)::

    fhavatar preprocess ../shared/data/clips/*.mp4 --out pp --head-model ict
    python tools/compare_tracking.py pp/*/ --heads embedded ict --out docs/tracking_compare

``--keep HEAD --previous OLD.json`` copies HEAD's per-clip results from an earlier run instead of re-tracking
(for a head model that did not change; its rows are marked ``"kept": true``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def track_clip(stage: Path, head) -> dict:
    from pipelines.tracking.fit import track
    from pipelines.tracking.result import LOW_CONFIDENCE, TRACKED

    with np.load(stage / "landmarks.npz", allow_pickle=False) as z:
        lmk, valid, K, c2w = z["lmk478"][..., :2], z["valid"], z["K"], z["c2w"]
        size = int(z["size"]) if "size" in z.files else 512
    t0 = time.perf_counter()
    res = track(head, lmk, valid, K, c2w[0], image_size=size)
    ok = np.isin(res.status, [TRACKED, LOW_CONFIDENCE])
    err = res.lmk_error_px[ok] * 512.0 / size
    return {"frames": int(len(valid)), "tracked": int(ok.sum()), "median_px": float(np.median(err)),
            "p90_px": float(np.percentile(err, 90)), "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="item folders (<out>/<id>/) or their preprocess/ folders")
    ap.add_argument("--heads", nargs="+", default=["embedded", "ict"])
    ap.add_argument("--out", type=Path, default=Path("tracking_compare"), help="writes OUT.json and OUT.md")
    ap.add_argument("--keep", nargs="*", default=[], help="heads whose results are copied from --previous")
    ap.add_argument("--previous", type=Path, help="an earlier OUT.json (for --keep)")
    args = ap.parse_args()
    if args.keep and args.previous is None:
        ap.error("--keep needs --previous")

    from pipelines.head.registry import load_head_model

    previous = {r["clip"]: r for r in json.loads(args.previous.read_text())} if args.keep else {}
    heads = {k: (None if k in args.keep else load_head_model(k)) for k in args.heads}
    rows = []
    for folder in sorted(args.folders):
        stage = folder / "preprocess" if (folder / "preprocess").is_dir() else folder
        if not (stage / "landmarks.npz").is_file():
            continue
        row = {"clip": stage.parent.name.rsplit("-", 1)[0] if stage.name == "preprocess" else stage.name}
        for name, head in heads.items():
            row[name] = {**previous[row["clip"]][name], "kept": True} if head is None else track_clip(stage, head)
        rows.append(row)
        print(row["clip"], {k: (row[k]["tracked"], round(row[k]["median_px"], 2)) for k in heads}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    names = list(heads)
    lines = ["| clip | frames | " + " | ".join(f"{n} tracked | {n} median px | {n} p90 px" for n in names) + " |",
             "|---|--:|" + "--:|--:|--:|" * len(names)]
    for r in rows:
        cells = [f"{r[n]['tracked']} | {r[n]['median_px']:.2f} | {r[n]['p90_px']:.2f}" for n in names]
        lines.append(f"| {r['clip']} | {r[names[0]]['frames']} | " + " | ".join(cells) + " |")
    if rows:
        means = [f"{sum(r[n]['tracked'] for r in rows)} | {np.mean([r[n]['median_px'] for r in rows]):.2f} | "
                 f"{np.mean([r[n]['p90_px'] for r in rows]):.2f}" for n in names]
        lines.append(f"| **all ({len(rows)})** | {sum(r[names[0]]['frames'] for r in rows)} | " + " | ".join(means) + " |")
        if len(names) == 2:
            a, b = names
            better = sum(r[b]["median_px"] <= r[a]["median_px"] for r in rows)
            lines.append(f"\n{b} at or below {a} on {better} of {len(rows)} clips.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
