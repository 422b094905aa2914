"""Evaluation protocols (paper section 4.1) end to end on two tiny synthetic videos, and the reports.

The videos are scikit-image's astronaut head on two flat backgrounds, moving a few pixels per frame; the avatars
use the ``unproject`` method (no network weights needed) at 128 x 128. LPIPS is made unavailable on purpose (an
empty torch hub folder) so that the "n/a (reason)" path is always exercised.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio

from pipelines.errors import ConfigError
from pipelines.evaluate import EvalConfig, merge, plan_pairs, run_evaluate
from pipelines.evaluate import models as M
from pipelines.evaluate.protocol import concat_results, settings_key
from pipelines.evaluate.metrics import MetricsResult
from pipelines.evaluate.report import aggregate, line_plot, markdown_report, nice_ticks, pick_frames
from pipelines.store import Manifest, item_id
from video_files import write_video

SHARED_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips"
SIZE, MAX_FRAMES = 128, 3
SMALL_AVATAR = {"uv_size": 64}  # 64^2 texels instead of 256^2: 16x fewer Gaussians keep CPU rendering fast
SELF_HEADER = ["Method", "PSNR↑", "SSIM↑", "LPIPS↓", "CSIM↑", "AKD↓", "AED↓", "APD↓"]
CROSS_HEADER = ["Method", "CSIM↑", "AED↓", "APD↓"]


# --------------------------------------------------------------------------------------------------------- inputs


def _head_on(colour: tuple[int, int, int], size: int = 384) -> np.ndarray:
    """The astronaut's head (soft elliptical cut-out) on a flat colour."""
    head = skimage.data.astronaut()[0:230, 140:320].astype(np.float32)
    mask = np.zeros(head.shape[:2], np.float32)
    cv2.ellipse(mask, (88, 100), (78, 100), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 2)[..., None]
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = colour
    y0, x0 = size // 2 - 115, size // 2 - 90
    canvas[y0:y0 + 230, x0:x0 + 180] = head * mask + canvas[y0:y0 + 230, x0:x0 + 180] * (1 - mask)
    return canvas.round().astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("videos")
    paths = []
    for name, colour, dx in (("grey", (90, 90, 90), 3), ("blue", (60, 120, 160), -2)):
        base = _head_on(colour)
        frames = [np.roll(base, dx * t, axis=1)[32:352, 32:352] for t in range(5)]
        write_video(folder / f"{name}.mp4", frames)
        paths.append(folder / f"{name}.mp4")
    return paths


@pytest.fixture(scope="module")
def no_lpips(tmp_path_factory):
    """LPIPS deterministically unavailable: an empty torch hub folder and no cached model."""
    old = torch.hub._hub_dir  # None unless someone called set_dir: then $TORCH_HOME is read at each get_dir()
    torch.hub.set_dir(str(tmp_path_factory.mktemp("empty_hub")))
    M.lpips_model.cache_clear()
    yield
    torch.hub._hub_dir = old
    M.lpips_model.cache_clear()


def _run(videos, out, protocol="self", max_frames=MAX_FRAMES, reconstruct_options=SMALL_AVATAR, **kw):
    items = []
    text, code = run_evaluate([str(v) for v in videos], out, protocol=protocol, method="unproject", size=SIZE,
                              max_frames=max_frames, device="cpu", on_result=items.append,
                              reconstruct_options=reconstruct_options, **kw)
    return text, code, items


@pytest.fixture(scope="module")
def self_run(videos, no_lpips, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    text, code, items = _run(videos, out)
    return out, text, code, items


@pytest.fixture(scope="module")
def cross_run(videos, self_run):
    out = self_run[0]
    # Same frame cap as the self-reenactment run: the preprocessed frames and avatars are reused.
    text, code, items = _run(videos, out, protocol="cross")
    return out, text, code, items


def _record(out: Path, video: Path, protocol: str) -> dict:
    return json.loads((out / item_id(video) / "eval" / f"{protocol}.json").read_text())


def _table_header(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("| Method"))
    return [c.strip() for c in line.strip("|").split("|")]


# ----------------------------------------------------------------------------------------------- self-reenactment
def test_self_protocol_scores_every_driving_frame(self_run, videos):
    out, text, code, items = self_run
    assert code == 0, text
    assert [r.status for r in items] == ["done", "done"]
    for v in videos:
        rec = _record(out, v, "self")
        assert rec["source"]["item_id"] == rec["item_id"] == item_id(v)
        assert rec["driving_frames"] == rec["video_frames"] == [1, 2]  # frame 0 is the source, the rest drive
        for m in ("psnr", "ssim"):
            vals = rec["per_frame"][m]
            assert len(vals) == 2 and all(x is not None and math.isfinite(x) for x in vals)
        assert all(5.0 < x < 40.0 for x in rec["per_frame"]["psnr"])
        assert all(0.0 < x <= 1.0 for x in rec["per_frame"]["ssim"])
        assert rec["mean"]["psnr"] == pytest.approx(np.mean(rec["per_frame"]["psnr"]))
        assert (out / item_id(v) / "eval" / "self" / "sidebyside.png").is_file()
        plot = iio.imread(out / item_id(v) / "eval" / "self" / "psnr.png")
        assert plot.shape[:2] == (320, 640)


def test_self_psnr_is_the_matted_comparison_with_the_next_frames(self_run, videos):
    """Recompute PSNR from the files: rendered frame k against preprocessed frame k + 1, both composited on the
    white background with the ground-truth matte (independent of the metrics code: scikit-image's PSNR)."""
    out, *_ = self_run
    v = videos[0]
    rec = _record(out, v, "self")
    item = out / item_id(v)
    pred_dir = item / "reenact" / f"{item_id(v)}-eval-self" / "frames"
    for k, t in enumerate(rec["driving_frames"]):
        pred = iio.imread(pred_dir / f"{k:06d}.png")[..., :3] / 255.0
        gt = iio.imread(item / "preprocess" / "frames" / f"{t:06d}.png")[..., :3] / 255.0
        a = iio.imread(item / "preprocess" / "mattes" / f"{t:06d}.png").astype(np.float64)[..., None] / 255.0
        assert pred.shape == gt.shape == (SIZE, SIZE, 3)
        expect = peak_signal_noise_ratio(gt * a + (1 - a), pred * a + (1 - a), data_range=1.0)
        assert rec["per_frame"]["psnr"][k] == pytest.approx(expect, abs=1e-3)
        # The prediction differs from the source frame: it really is a render, not a copy of the input.
        assert np.abs(pred - gt).mean() > 0.01


def test_full_frame_flag_rescores_without_rerendering(self_run, videos, tmp_path):
    """``foreground=False`` compares the whole frames (prediction rendered on the preprocess background); only the
    metrics are redone, and the report then describes the new settings."""
    out, text, *_ = self_run
    other = tmp_path / "full"
    shutil.copytree(out, other)
    text2, code, items = _run(videos, other, foreground=False)
    assert code == 0 and "compared on: full frame" in text2 and text2 != text
    assert all(r.outputs["stages"]["reenact"] == "skipped" and r.outputs["stages"]["eval"] == "done" for r in items)
    v = videos[1]
    rec = _record(other, v, "self")
    item = other / item_id(v)
    pred = iio.imread(item / "reenact" / f"{item_id(v)}-eval-self" / "frames" / "000000.png")[..., :3]
    gt = iio.imread(item / "preprocess" / "frames" / "000001.png")[..., :3]
    assert rec["per_frame"]["psnr"][0] == pytest.approx(peak_signal_noise_ratio(gt, pred), abs=1e-3)


def test_second_run_skips_all_work(self_run, videos):
    out, text, *_ = self_run
    watched = []
    for v in videos:
        item = out / item_id(v)
        watched += [item / "preprocess", item / "avatar", item / "reenact" / f"{item_id(v)}-eval-self",
                    item / "eval" / "self"]
    before = {p: Manifest.load(p).finished for p in watched}
    results = {p: (out / item_id(v) / "eval" / "self.json").stat().st_mtime_ns for v in videos
               for p in [out / item_id(v)]}
    text2, code, items = _run(videos, out)
    assert code == 0 and text2 == text
    assert [r.status for r in items] == ["skipped", "skipped"]
    assert all(set(r.outputs["stages"].values()) == {"skipped"} for r in items)
    assert {p: Manifest.load(p).finished for p in watched} == before
    assert {p: (p / "eval" / "self.json").stat().st_mtime_ns for p in results} == results


def test_shards_then_merge_equal_one_run(self_run, videos, tmp_path):
    """Two shards (0/2, 1/2) of a job array and a merge step give the unsharded table, byte for byte; the copied
    artifacts (another folder) are reused, so nothing in the store depends on absolute paths."""
    out, text, *_ = self_run
    other = tmp_path / "sharded"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("eval", "eval-*"))
    shard_tables = []
    for s in ("0/2", "1/2"):
        t, code, items = _run(videos, other, shard=s)
        assert code == 0 and len(items) == 1
        assert items[0].outputs["stages"]["reenact"] == "skipped" and items[0].outputs["stages"]["eval"] == "done"
        shard_tables.append(t)
    assert not (other / "eval-self.md").exists()  # shards do not write the overall report
    assert all(sum(ln.startswith("| ") and ".mp4" in ln for ln in t.splitlines()) == 1 for t in shard_tables)
    merged, code, items = _run(videos, other, merge_only=True)
    assert code == 0 and items == []
    assert merged == text
    assert (other / "eval-self.csv").read_text() == (out / "eval-self.csv").read_text()
    assert merge(other, "self").overall == merge(out, "self").overall


def test_markdown_table_and_unavailable_metric(self_run):
    out, text, *_ = self_run
    assert _table_header(text) == SELF_HEADER
    row = next(ln for ln in text.splitlines() if ln.startswith("| Ours"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    lpips_cell = cells[SELF_HEADER.index("LPIPS↓")]
    summary = json.loads((out / "eval-self.json").read_text())
    reason = summary["unavailable"]["lpips"]  # why the model cannot load here (weights, or the package itself)
    assert "lpips" not in summary["overall"] and len(reason) > 10
    assert lpips_cell == f"n/a ({reason})"  # the reason, never a number
    assert all(v["unavailable"]["lpips"] == reason for v in summary["videos"])
    assert float(cells[SELF_HEADER.index("PSNR↑")]) > 5
    csv_rows = (out / "eval-self.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[4:] == ["psnr", "ssim", "lpips", "csim", "akd", "aed", "apd"]
    assert all(r.split(",")[6] == "n/a" for r in csv_rows[1:])
    assert "Metric models:" in text and "- PSNR↑: formula (no model)" in text


# ------------------------------------------------------------------------------------------------ cross-identity
def test_cross_protocol_pairs_and_scores(cross_run, videos):
    out, text, code, items = cross_run
    assert code == 0, text
    assert _table_header(text) == CROSS_HEADER
    ids = sorted(item_id(v) for v in videos)
    for v in videos:
        rec = _record(out, v, "cross")
        assert rec["source"]["item_id"] == next(i for i in ids if i != item_id(v))  # the other video's frame 0
        assert rec["driving_frames"] == [0, 1, 2]  # every frame drives (the source comes from the other video)
        assert set(rec["per_frame"]) | set(rec["unavailable"]) == {"csim", "aed", "apd"}
        assert "psnr" not in rec["mean"]
        frames = out / rec["source"]["item_id"] / "reenact" / f"{item_id(v)}-eval-cross" / "frames"
        assert len(list(frames.glob("*.png"))) == 3
        assert (out / item_id(v) / "eval" / "cross" / "csim.png").is_file() == ("csim" in rec["per_frame"])
    # The avatars of the self-reenactment run were reused.
    assert all(r.outputs["stages"]["source_avatar"] == "skipped" for r in items)


def test_pairing_is_deterministic_and_never_self(tmp_path):
    files = []
    for k in range(4):
        p = tmp_path / f"v{k}.mp4"
        p.write_bytes(bytes([k]) * 16)
        files.append(p)
    pairs = plan_pairs(files, "cross")
    assert plan_pairs(files[::-1], "cross") == pairs  # input order does not matter
    assert {p.driving_id for p in pairs} == {p.source_id for p in pairs} == {item_id(f) for f in files}
    assert all(p.source_id != p.driving_id for p in pairs)
    ids = [p.driving_id for p in pairs]
    assert [p.source_id for p in pairs] == ids[1:] + ids[:1]  # video i takes the source of video i + 1
    assert all(p.source == p.driving for p in plan_pairs(files, "self"))
    with pytest.raises(ConfigError, match="at least 2"):
        plan_pairs(files[:1], "cross")
    with pytest.raises(ConfigError, match="offset"):
        plan_pairs(files, "cross", pair_offset=4)


# ---------------------------------------------------------------------------------------------- usage / reports
def test_bad_settings_are_one_line_errors(videos, tmp_path):
    with pytest.raises(ConfigError, match="not part of the cross protocol"):
        EvalConfig(protocol="cross", metrics=("psnr",)).validate()
    with pytest.raises(ConfigError, match="max-frames"):
        EvalConfig(protocol="self", max_frames=1).validate()
    text, code = run_evaluate([str(videos[0])], tmp_path / "o", protocol="cross", method="unproject")
    assert code == 2 and "at least 2" in text
    text, code = run_evaluate([str(videos[0])], tmp_path / "o", method="network", weights=str(tmp_path / "no.st"))
    assert code == 3 and "no.st" in text
    img = tmp_path / "photo.png"
    iio.imwrite(img, np.zeros((8, 8, 3), np.uint8))
    text, code = run_evaluate([str(img)], tmp_path / "o", method="unproject")
    assert code == 2  # a folder/glob filtered to videos finds nothing, a photo is no video


def test_a_failing_video_is_reported_not_hidden(tmp_path):
    blank = tmp_path / "blank.mp4"
    write_video(blank, [np.full((160, 160, 3), 90, np.uint8)] * 3)
    text, code, items = _run([blank], tmp_path / "o")
    assert code == 1 and [r.status for r in items] == ["failed"]
    assert "No per-video results found" in text and "no face found" in text and item_id(blank) in text


def _fake_record(iid: str, psnr: list[float | None], lpips_reason: str | None, settings: dict) -> dict:
    vals = [x for x in psnr if x is not None]
    return {
        "protocol": "self", "item_id": iid, "name": f"{iid}.mp4", "source": {"item_id": iid, "name": f"{iid}.mp4"},
        "n_frames": len(psnr), "driving_frames": list(range(1, len(psnr) + 1)), "settings": settings,
        "settings_hash": settings_key(settings), "avatar": {"method": "unproject"}, "not_requested": [],
        "mean": {"psnr": float(np.mean(vals))}, "n_valid": {"psnr": len(vals)},
        "models": {"psnr": "formula (no model)"}, "per_frame": {"psnr": psnr},
        "unavailable": {"lpips": lpips_reason} if lpips_reason else {},
    }


def test_aggregate_is_frame_weighted_and_never_invents_numbers():
    settings = {"reconstruct": {"method": "unproject"}, "size": 512, "comparison": "x"}
    a = _fake_record("a", [10.0, 12.0], "weights missing", settings)
    b = _fake_record("b", [20.0, 20.0, 20.0, None, 20.0, 20.0, 20.0], "weights missing", settings)
    rep = aggregate([b, a], "self", settings, settings_key(settings))
    assert [v["item_id"] for v in rep.videos] == ["a", "b"]
    assert rep.overall["psnr"]["mean"] == pytest.approx((22.0 + 120.0) / 8)  # 8 scored frames
    assert rep.overall["psnr"]["mean_over_videos"] == pytest.approx(15.5)
    assert rep.unavailable["lpips"] == "weights missing"
    assert rep.unavailable["ssim"] == "no result"
    text = markdown_report(rep)
    cells = next(ln for ln in text.splitlines() if ln.startswith("| Ours")).strip("|").split("|")
    assert cells[3].strip() == "n/a (weights missing)" and cells[1].strip() == "17.75"
    assert "| a.mp4 | (itself) | 2 | 11.00 | n/a [1] | n/a [2] |" in text


def test_merge_refuses_mixed_settings_and_filters_by_key(tmp_path):
    s1 = {"reconstruct": {"method": "unproject"}, "size": 512, "comparison": "x"}
    s2 = {**s1, "size": 256}
    for iid, s in (("a", s1), ("b", s2)):
        (tmp_path / iid / "eval").mkdir(parents=True)
        (tmp_path / iid / "eval" / "self.json").write_text(json.dumps(_fake_record(iid, [15.0], None, s)))
    with pytest.raises(ConfigError, match="different settings"):
        merge(tmp_path, "self")
    rep = merge(tmp_path, "self", items=["a", "b", "c"], settings_hash=settings_key(s1))
    assert [v["item_id"] for v in rep.videos] == ["a"]
    assert rep.missing == {"b": "result made with other settings", "c": "no result yet"}


def test_concat_results_keeps_frame_order_and_means():
    p1, p2 = MetricsResult(2, True), MetricsResult(3, True)
    p1.add("psnr", np.array([10.0, 20.0]), "f")
    p2.add("psnr", np.array([30.0, np.nan, 50.0]), "f")
    p1.add("csim", np.array([np.nan, np.nan]), "d")  # no face in this chunk
    p2.add("csim", np.array([0.5, 0.7, np.nan]), "d")
    p1.unavailable["lpips"] = p2.unavailable["lpips"] = "missing"
    r = concat_results([p1, p2])
    assert r.per_frame["psnr"].tolist()[:2] == [10.0, 20.0] and r.mean["psnr"] == pytest.approx(27.5)
    assert r.n_valid["csim"] == 2 and r.mean["csim"] == pytest.approx(0.6) and r.unavailable == {"lpips": "missing"}


def test_plot_helpers():
    ticks = nice_ticks(12.93, 13.04)
    assert ticks[0] <= 12.93 and ticks[-1] >= 13.04 and len(ticks) <= 7
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0]) and any(steps[0] == pytest.approx(s) for s in (0.02, 0.025, 0.05))
    img = line_plot(np.arange(1, 6), np.array([10.0, 12.0, np.nan, 11.0, 13.0]), "PSNR", "dB", mean=11.5)
    blue = (img == [31, 119, 180]).all(-1)
    assert img.shape == (320, 640, 3) and blue.sum() > 100
    assert pick_frames(10, 4) == [0, 3, 6, 9] and pick_frames(2, 4) == [0, 1]


@pytest.mark.shared
def test_shared_clip_self_reenactment(tmp_path, no_lpips):
    """A real talking-head clip (HDTF): every requested face metric is computed on the rendered frames."""
    clip = SHARED_CLIPS / "st_WDA_KatieHill_000.mp4"
    if not clip.is_file():
        pytest.skip("shared data absent")
    # K = 128: at K = 64 the ICT face is ~25 texels wide and, with the UV gaps dilated (reconstruct.dilate_maps),
    # MediaPipe no longer finds a face in the 128 px render of this clip, so the face metrics would have no frame.
    text, code, items = _run([clip], tmp_path / "o", reconstruct_options={"uv_size": 128})
    assert code == 0, text
    rec = _record(tmp_path / "o", clip, "self")
    assert set(rec["mean"]) == {"psnr", "ssim", "csim", "akd", "aed", "apd"}
    assert rec["mean"]["psnr"] > 10 and rec["mean"]["csim"] > 0.5


def test_a_job_waits_for_an_item_another_job_holds(tmp_path, monkeypatch):
    """Cross-identity shards share avatars: a stage whose item is locked by another job is retried until the lock
    is released, then runs (or is skipped as up to date) instead of failing the video."""
    import threading
    import time

    from pipelines.batch import run_stage
    from pipelines.evaluate import protocol as P
    from pipelines.store import ItemLocked, item_lock

    monkeypatch.setattr(P, "LOCK_POLL_S", 0.02)
    stage = tmp_path / "item" / "avatar"
    held, release = threading.Event(), threading.Event()

    def other_job():
        with item_lock(stage.parent):
            held.set()
            release.wait(5)

    t = threading.Thread(target=other_job)
    t.start()
    held.wait(5)
    msgs: list[str] = []
    ctx = P._Context(tmp_path, EvalConfig(lock_wait_s=0.1), None, None, None, "cpu", None, msgs.append, False)

    def work(folder: Path) -> list[str]:
        (folder / "a.txt").write_text("x")
        return ["a.txt"]

    job = lambda: run_stage(stage, {}, {}, work)  # noqa: E731
    with pytest.raises(ItemLocked):  # waited 0.1 s, still held
        P._waiting(ctx, "v.mp4 avatar", job)
    ctx.cfg.lock_wait_s = 5.0
    threading.Timer(0.2, release.set).start()
    t0 = time.time()
    assert P._waiting(ctx, "v.mp4 avatar", job)[0] == "done"
    assert time.time() - t0 >= 0.15
    t.join()
    assert msgs == ["v.mp4 avatar: another job is working on it, waiting"] * 2


def test_tracker_settings_reach_the_preprocess_of_every_video(videos, no_lpips, tmp_path):
    """EvalConfig.tracking (`evaluate --tracking-config`) tracks the videos with those settings: the preprocess
    manifest records them (and another setting is another preprocess, not the default one reused)."""
    from pipelines.tracking.config import TrackingConfig

    cfg = TrackingConfig(expression_limits=True, jaw_init_pitches=(0.0, 0.2))
    text, code, items = _run(videos[:2], tmp_path / "out", tracking=cfg)
    assert code == 0, text
    manifest = json.loads((tmp_path / "out" / item_id(videos[0]) / "preprocess" / "manifest.json").read_text())
    recorded = manifest["settings"]["tracking"]["tracking"]
    assert recorded["expression_limits"] is True and recorded["jaw_init_pitches"] == [0.0, 0.2]


def test_completion_reaches_the_avatars_it_scores(videos, no_lpips, tmp_path):
    """`fhavatar evaluate --complete` scores completed avatars: the avatar records the completion, and the run's
    settings hash differs from the uncompleted run's (so --merge never mixes them)."""
    from typer.testing import CliRunner

    from fhavatar_cli.main import app
    from pipelines.avatar.artifact import load_avatar

    def cli(out, *extra):
        r = CliRunner().invoke(app, ["--quiet", "evaluate", str(videos[0]), "--out", str(out), "--method", "unproject",
                                     "--uv-size", "64", "--size", str(SIZE), "--max-frames", str(MAX_FRAMES),
                                     "--metrics", "psnr", "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        return _record(out, videos[0], "self")

    done = cli(tmp_path / "done", "--complete")
    avatar = load_avatar(tmp_path / "done" / item_id(videos[0]) / "avatar" / "avatar.npz")
    assert avatar.meta["complete"]["enabled"] is True
    assert cli(tmp_path / "plain")["settings_hash"] != done["settings_hash"]
