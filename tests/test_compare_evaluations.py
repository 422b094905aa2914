"""tools/compare_evaluations.py: the per-clip table that decides whether weights ship (weights/TRAINING.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compare_evaluations.py"


def fake_run(root: Path, clips: dict[str, dict[str, float]], after_source: dict[str, float]) -> Path:
    """An ``evaluate --out`` folder as the tool reads it: each video's ``<item>/eval/self.json`` record."""
    for name, mean in clips.items():
        item = f"{name}-0123456789"
        (root / item / "eval").mkdir(parents=True)
        record = {"protocol": "self", "item_id": item, "name": f"{name}.mp4", "mean": mean,
                  "per_frame": {"psnr": [after_source[name], 1.0]}}
        (root / item / "eval" / "self.json").write_text(json.dumps(record))
    return root


def test_table_values_means_and_per_clip_wins(tmp_path):
    new = fake_run(tmp_path / "new", {"a": {"psnr": 20.0, "akd": 5.0}, "b": {"psnr": 18.0, "akd": 9.0}},
                   {"a": 27.0, "b": 24.0})
    old = fake_run(tmp_path / "old", {"a": {"psnr": 19.0, "akd": 6.0}, "b": {"psnr": 17.5, "akd": 8.0}},
                   {"a": 26.0, "b": 25.0})
    out = tmp_path / "table.json"
    text = subprocess.run([sys.executable, str(TOOL), f"new={new}", f"old={old}", "--json", str(out)],
                          check=True, capture_output=True, text=True).stdout
    assert "| a.mp4 | new | 20.00 | 5.00 | 27.00 |" in text
    assert "| **mean of 2** | old | 18.25 | 7.00 | 25.50 |" in text
    # PSNR higher on both clips; AKD (lower is better) only on a; the frame after the source only on a.
    assert "new better than old on: psnr 2/2, akd 1/2, after_source_psnr 1/2" in text
    means = json.loads(out.read_text())["means"]
    assert means["new"]["psnr"] == 19.0 and means["old"]["after_source_psnr"] == 25.5
