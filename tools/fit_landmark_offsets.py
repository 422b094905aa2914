"""Fit the ICT head's per-landmark embedding offsets on preprocessed training clips.

Writes ``pipelines/assets/ict_landmark_offsets.npy`` ((478, 2) float32, metres in ICT's frontal x/y plane), which
``IctHeadConfig.fitted_landmarks`` (default on) applies; see ``pipelines/tracking/landmark_offsets.py`` for the
method. The file shipped was made by::

    fhavatar preprocess ../shared/data/clips/*.mp4 --head-model ict --out build/pp
    python tools/fit_landmark_offsets.py build/pp/*/ --history build/offsets_history.json

Training clips: those ``../shared/data/SOURCES.tsv`` allows training on (``use`` = train+eval; clips without a row,
the LivePortrait and KatieHill ones, are trainable by the README's use policy), never an ``eval only`` row and never
the fixed validation split (``VALIDATION``). The tracker runs with its defaults, as in ``tools/compare_tracking.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

VALIDATION = ("lp_d0", "st_WDA_KatieHill_000", "vrt_4", "pcavs_00104", "smirk_dafoe")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "pipelines" / "assets" / "ict_landmark_offsets.npy"
DEFAULT_SOURCES = ROOT.parent / "shared" / "data" / "SOURCES.tsv"


def clip_uses(sources: Path) -> dict[str, str]:
    """Clip name -> its SOURCES.tsv ``use`` value (clips only)."""
    with sources.open(newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        return {Path(r["file"]).stem: r["use"] for r in rows if r["file"].startswith("data/clips/")}


def is_training_clip(name: str, uses: dict[str, str]) -> bool:
    """May the offsets be fitted on this clip? (train+eval or row-less, and not in the validation split)."""
    return name not in VALIDATION and uses.get(name, "train+eval") == "train+eval"


def clip_name(folder: Path) -> str:
    """``<out>/<clip>-<hash>/`` (or its preprocess/ folder) -> clip."""
    folder = folder.parent if folder.name == "preprocess" else folder
    return folder.name.rsplit("-", 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="preprocessed item folders (<out>/<id>/)")
    ap.add_argument("--sources", type=Path, default=DEFAULT_SOURCES)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--rounds", type=int, default=None, help="default: OffsetFitConfig.rounds")
    ap.add_argument("--history", type=Path, help="also write the per-round errors here (JSON)")
    args = ap.parse_args()

    from pipelines.head.ict.model import IctHeadConfig, IctHeadModel, ict_landmark_embedding
    from pipelines.tracking.landmark_offsets import ClipLandmarks, OffsetFitConfig, fit_landmark_offsets

    uses = clip_uses(args.sources)
    clips = []
    for folder in sorted(args.folders):
        stage = folder / "preprocess" if (folder / "preprocess").is_dir() else folder
        name = clip_name(folder)
        if not (stage / "landmarks.npz").is_file() or not is_training_clip(name, uses):
            continue
        with np.load(stage / "landmarks.npz", allow_pickle=False) as z:
            size = int(z["size"]) if "size" in z.files else 512
            clips.append(ClipLandmarks(name, z["lmk478"][..., :2].astype(np.float64), z["valid"].astype(bool),
                                       z["K"], z["c2w"][0], size))
    if not clips:
        ap.error("no training clip among the folders")
    print(f"{len(clips)} training clips, {sum(len(c.valid) for c in clips)} frames:", " ".join(c.name for c in clips))

    head = IctHeadModel(IctHeadConfig(fitted_landmarks=False))  # the plain alignment the offsets correct
    cfg = OffsetFitConfig() if args.rounds is None else OffsetFitConfig(rounds=args.rounds)
    t0 = time.perf_counter()
    offsets, history = fit_landmark_offsets(head, lambda o: ict_landmark_embedding(head, o), clips, cfg,
                                            report=lambda s: print(s, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, offsets.astype(np.float32))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    if args.history:
        args.history.write_text(json.dumps({"clips": [c.name for c in clips], "config": cfg.__dict__,
                                            "rounds": history}, indent=1))


if __name__ == "__main__":
    main()
