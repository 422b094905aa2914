"""68-point landmark sources for tracking (``fhavatar preprocess --landmarks dlib|fan``), on real photos."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import ConfigError
from pipelines.offline import ModelUnavailable
from pipelines.preprocess.landmarks68 import (
    MEDIAPIPE_TO_IBUG68,
    Dlib68,
    face_box_from_mesh,
    require_landmark_source,
    to_mediapipe_layout,
)
from pipelines.tracking import head_pose_angles, load_tracking


def test_mediapipe_layout_places_the_68_points_at_their_mesh_indices():
    pts = np.random.default_rng(0).uniform(0, 512, (3, 68, 2))
    out = to_mediapipe_layout(pts)
    assert out.shape == (3, 478, 2)
    assert np.array_equal(out[:, list(MEDIAPIPE_TO_IBUG68)], pts)
    assert np.isfinite(out).all(-1).sum(1).tolist() == [68, 68, 68]  # every other index is NaN
    assert len(set(MEDIAPIPE_TO_IBUG68)) == 68  # no two iBUG points share a mesh vertex
    with pytest.raises(ValueError):
        to_mediapipe_layout(pts[:, :67])


@pytest.fixture(scope="module")
def astronaut_runs(tmp_path_factory):
    """The astronaut preprocessed into one folder twice: MediaPipe tracking, then dlib 68-point tracking."""
    import skimage.data as skimage_data
    from PIL import Image

    from pipelines.head.registry import load_head_model
    from pipelines.stages import preprocess_item

    tmp = tmp_path_factory.mktemp("lmk68")
    path = tmp / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    head = load_head_model("embedded")
    out = tmp / "out"
    _, o1 = preprocess_item(path, out, head)
    stage = Path(o1["dir"])
    mp = {"tracking": load_tracking(stage / "tracking.npz"), "frame_mtime": (stage / "frames/000000.png").stat().st_mtime_ns}
    with np.load(stage / "landmarks.npz") as z:
        mp["lmk478"] = z["lmk478"][0, :, :2].astype(np.float64)
    status, _ = preprocess_item(path, out, head, landmarks="dlib", overlay="none")
    return {"mp": mp, "stage": stage, "status": status, "dlib": load_tracking(stage / "tracking.npz")}


def test_dlib68_points_agree_with_the_mediapipe_mesh(astronaut_runs):
    """dlib's 68 points land on the mesh vertices MEDIAPIPE_TO_IBUG68 names (the table was measured with dlib)."""
    stage = astronaut_runs["stage"]
    with np.load(stage / "landmarks68.npz") as z:
        lmk68, found, source = z["lmk68"], z["found"], str(z["source"])
    assert source == "dlib" and found.tolist() == [True] and lmk68.shape == (1, 68, 2)
    mesh = astronaut_runs["mp"]["lmk478"]
    iod = np.linalg.norm(mesh[[33, 133]].mean(0) - mesh[[362, 263]].mean(0))
    d = np.linalg.norm(lmk68[0] - mesh[list(MEDIAPIPE_TO_IBUG68)], axis=-1) / iod
    assert 40 < iod < 200, iod
    assert np.median(d[17:]) < 0.06, np.median(d[17:])  # interior points (brows, nose, eyes, lips)
    assert np.median(d[:17]) < 0.15, np.median(d[:17])  # the jaw contour is defined differently by each model
    assert d.max() < 0.3, d.max()


def test_dlib68_tracking_fits_and_agrees_with_mediapipe_tracking(astronaut_runs):
    mp, trk = astronaut_runs["mp"]["tracking"], astronaut_runs["dlib"]
    assert astronaut_runs["status"] == "done"
    assert np.isfinite(trk.landmarks[0]).all(-1).sum() == 68  # tracked on the 68 points only
    assert trk.lmk_error_px[0] < 4.0, trk.lmk_error_px
    yaw_mp, pitch_mp, roll_mp = head_pose_angles(mp.params["rotation"])[0]
    yaw, pitch, roll = head_pose_angles(trk.params["rotation"])[0]
    # 68 points constrain yaw and roll well; pitch less (it trades off against the shape's depth profile).
    assert abs(yaw - yaw_mp) < 5.0 and abs(roll - roll_mp) < 3.0, (yaw, yaw_mp, roll, roll_mp)
    assert abs(pitch - pitch_mp) < 12.0, (pitch, pitch_mp)
    assert np.abs(trk.params["expression"]).max() < 3.0


def test_changing_the_landmark_source_reuses_the_frames(astronaut_runs):
    stage = astronaut_runs["stage"]
    assert (stage / "frames/000000.png").stat().st_mtime_ns == astronaut_runs["mp"]["frame_mtime"]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["settings"]["tracking"]["landmarks"] == "dlib"
    assert "landmarks68.npz" in manifest["outputs"]


def test_unknown_or_unavailable_sources_fail_with_the_reason_and_a_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown"):
        require_landmark_source("openpose")
    assert require_landmark_source("mediapipe") is None
    assert isinstance(require_landmark_source("dlib"), Dlib68)
    from pipelines.preprocess import landmarks68

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))  # FAN's weights cannot be in it
    landmarks68.load_landmarker.cache_clear()
    with pytest.raises(ConfigError) as exc:
        require_landmark_source("fan")
    msg = str(exc.value)
    assert "--landmarks fan is unavailable" in msg and "never" in msg and "mediapipe" in msg
    assert not any(tmp_path.rglob("*.pth*"))  # and nothing was fetched


def test_cli_refuses_an_unavailable_source_before_any_work(tmp_path):
    import skimage.data as skimage_data
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(skimage_data.astronaut()).save(img)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")}
    p = subprocess.run([sys.executable, "-m", "fhavatar_cli", "preprocess", str(img), "--out", str(tmp_path / "out"),
                        "--landmarks", "fan"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--landmarks fan is unavailable" in lines[0], p.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("frames"))


@pytest.mark.skipif(importlib.util.find_spec("face_alignment") is None, reason="face_alignment is not installed")
def test_fan68_runs_from_a_cached_file_only(tmp_path, monkeypatch):
    """The FAN path end to end with a *randomly initialised* 2DFAN-4 file in the hub cache: this checks our plumbing
    (cache lookup, no download, box seeding, output layout), not FAN's accuracy (its real weights are not here)."""
    from face_alignment import api as fa_api
    from face_alignment.models import FAN

    from pipelines.preprocess.landmarks68 import Fan68

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    with pytest.raises(ModelUnavailable, match="not in the torch hub cache"):
        Fan68()
    fname = Path(fa_api.models_urls["2DFAN-4"]).name
    (hub / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), hub / "checkpoints" / fname)
    fan = Fan68()
    rgb = np.full((256, 256, 3), 128, np.uint8)
    box = np.array([64.0, 72.0, 192.0, 200.0])
    pts = fan(rgb, box)
    assert pts is not None and pts.shape == (68, 2) and np.isfinite(pts).all()
    # face_alignment reads a square crop of side 200 (w + h) / 195 around the box centre raised by 0.12 h: every
    # prediction (a heatmap peak, 4 crop pixels per cell) lies in it, and a random net does not put them all at one spot.
    w, h = box[2] - box[0], box[3] - box[1]
    c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2 - 0.12 * h])
    half = 100 * (w + h) / 195
    assert (np.abs(pts - c) <= half + 4).all(), (np.abs(pts - c).max(), half)
    assert len(np.unique(pts.round(), axis=0)) > 10


def test_face_box_from_mesh_spans_brows_to_chin():
    mesh = np.zeros((478, 2))
    mesh[:468] = np.random.default_rng(1).uniform([100, 50], [300, 350], (468, 2))
    x0, y0, x1, y1 = face_box_from_mesh(mesh)
    assert x0 < mesh[:468, 0].min() and x1 > mesh[:468, 0].max()  # cheek to cheek, a little wider
    assert mesh[:468, 1].min() < y0 < y1 < mesh[:468, 1].max()  # below the mesh's top (forehead), above its bottom
