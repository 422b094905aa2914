"""The speed benchmark's logic on the CPU (issue 16): ``bench/bench_speed.py --smoke`` at tiny sizes with the torch
reference renderer, the ICT head, a synthetic validation clip for the prune section; checks, stage timings, the
table and the targets come out with values."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "bench_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = mod
    spec.loader.exec_module(mod)
    return mod


def synthetic_clip(folder: Path, frames: int = 3, size: int = 48) -> Path:
    """A preprocessed item folder (frames/, mattes/, tracking.npz) for the ICT head: a grey head on white."""
    from pipelines.core.camera import normalized_intrinsics, orbit_cameras
    from pipelines.head.registry import load_head_model
    from pipelines.tracking.result import TrackingResult, save_tracking

    head = load_head_model("ict")
    pp = folder / "clip" / "preprocess"
    (pp / "frames").mkdir(parents=True)
    (pp / "mattes").mkdir()
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.3 * size) ** 2).astype(np.float32)
    for i in range(frames):
        img = np.where(disc[..., None] > 0, np.array([0.6, 0.45, 0.4]) + 0.05 * i, 1.0)
        iio.imwrite(pp / "frames" / f"{i:06d}.png", (img * 255).astype(np.uint8))
        iio.imwrite(pp / "mattes" / f"{i:06d}.png", (disc * 255).astype(np.uint8))
    p = {k: v.numpy() for k, v in head.zero_params(frames).to_dict().items()}
    p["shape"] = p["shape"][0]
    p["jaw"][:, 0] = np.linspace(0.0, 0.3, frames)
    target = tuple(float(x) for x in head.head_center().tolist())
    c2w = orbit_cameras(torch.zeros(frames), torch.zeros(frames), target=target).numpy()
    save_tracking(pp / "tracking.npz", TrackingResult(params=p, K=normalized_intrinsics()[0].numpy(), c2w=c2w,
                                                      lmk_error_px=np.zeros(frames), status=np.zeros(frames, np.uint8),
                                                      image_size=size, head_model=head.name))
    return folder


def test_smoke_run_checks_stages_prune_and_targets(bench, tmp_path):
    val = synthetic_clip(tmp_path / "val")
    out = tmp_path / "out"
    rc = bench.main(["--smoke", "--out", str(out), "--val-data", str(val), "--prune-contribution", "1.0",
                     "--only", "prune", "gsplat_options", "reenact", "stages"])
    res = json.loads((out / "bench_speed.json").read_text())
    assert rc == 0 and res["checks"]["pass"]
    # The product loop (render_sequence) and eager posing + rendering draw the same frames.
    loop = res["checks"]["loop_vs_eager"]
    assert loop["frames"] == 7 and loop["rgb_max_abs"] <= 1 and loop["alpha_coverage"] > 0.02
    assert res["settings"]["head_model"] == "ict" and res["meta"]["mode"] == "smoke"
    # Prune: one clip, fewer Gaussians, PSNRs against the ground truth and of pruned vs whole.
    clip = res["sections"]["prune"]["clips"]["clip"]
    assert 0 < clip["gaussians_pruned"] < clip["gaussians_whole"]
    assert np.isfinite(clip["psnr_whole"]) and clip["psnr_drop_db"] == pytest.approx(
        clip["psnr_whole"] - clip["psnr_pruned"])
    assert clip["psnr_pruned_vs_whole"] > 20.0 and clip["prune"]["config"]["min_contribution"] == 1.0
    # The reenact section timed the template (also posed from a source, re-skinning its collar) and both avatars of
    # the clip, each with its own Gaussian count.
    re = res["sections"]["reenact"]
    assert set(re) == {"template", "template_skinned", "avatar", "avatar_pruned"}
    assert re["avatar_pruned"]["num_gaussians"] == clip["gaussians_pruned"]
    for row in (re["avatar_pruned"]["batch1"], re["avatar_pruned"]["batch2"]):
        assert row["floor"]["median_ms"] > 0 and row["e2e_eager"]["median_ms"] > 0
    # Stage timings add up to the call they split.
    st = res["sections"]["stages"]["batch1"]
    parts = sum(st[k] for k in ("copy_inputs", "skinning", "attributes", "reskin", "render", "readback"))
    assert st["total"] == pytest.approx(parts) and st["render"] > 0 and st["skinning"] > 0
    assert res["sections"]["gsplat_options"]["chosen"]["tile_size"] == 16
    t = res["targets"]
    assert t["rig"] == "avatar_pruned" and t["batch1"]["best"] == "e2e_eager" and "prune" in t
    md = (out / "bench_speed.md").read_text()
    assert "targets (rig avatar_pruned" in md and "batch 1 end to end >= 1000 FPS" in md and "prune (validation" in md
