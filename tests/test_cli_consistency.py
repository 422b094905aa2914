"""Command-line consistency and input checks (issue 15): the real CLI in subprocesses, small and on the CPU.

A finished preprocess is reused whatever its settings; turntables of several avatars never collide; driving motion,
network weights and output folders are checked before any work (one line, documented exit code); the checkpoint
owns K; a full disk says so; third-party native logs stay off the console; common options work on every command.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from skimage import data

from video_files import sample_motion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fhavatar_cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SHIPPED_MOTION = ROOT / "sample_inputs" / "driving_motion.npz"  # the ICT head's
MOTION = sample_motion(Path(tempfile.mkdtemp()), "embedded")  # these tests drive embedded-head avatars
DEFAULT_WEIGHTS = ROOT / "weights" / "fhavatar_default.safetensors"
TEMPLATE = ("--method", "template", "--uv-size", "64", "--head-model", "embedded")
TURN = ("--frames", "2", "--size", "64", "--renderer", "torch")


def cli(*args, check: int | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nSTDOUT:{p.stdout[-2000:]}\nSTDERR:{p.stderr[-3000:]}"
    return p


def events(p: subprocess.CompletedProcess, kind: str = "item") -> list[dict]:
    return [e for e in (json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")) if e["event"] == kind]


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """stderr holds exactly one line, our error (no traceback, no third-party noise before it)."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photo")
    iio.imwrite(d / "face.jpg", np.ascontiguousarray(data.astronaut()[10:330, 100:420]), quality=92)
    return d / "face.jpg"


QUIET_RUN: dict[str, str] = {}


@pytest.fixture(scope="module")
def avatar(photo, tmp_path_factory) -> Path:
    """A template avatar (K = 64, embedded head) in the store layout: <out>/<item>/avatar/avatar.npz."""
    out = tmp_path_factory.mktemp("store")
    QUIET_RUN["stderr"] = cli("--quiet", "reconstruct", photo, "--out", out, *TEMPLATE, check=0).stderr
    return next(out.glob("*/avatar/avatar.npz"))


# ------------------------------------------------------------------------------------------------------ defect 2
def test_reconstruct_reuses_a_finished_preprocess_whatever_its_settings(photo, tmp_path):
    out = tmp_path / "out"
    cli("preprocess", photo, "--out", out, "--background", "grey", "--head-model", "embedded", check=0)
    stage = next(out.glob("*/preprocess"))
    manifest = json.loads((stage / "manifest.json").read_text())
    tracking = (stage / "tracking.npz").read_bytes()
    assert manifest["settings"]["background"] == [128, 128, 128]

    p = cli("--log-json", "reconstruct", photo, "--out", out, *TEMPLATE, check=0)
    assert [e["status"] for e in events(p)] == ["done"]
    assert json.loads((stage / "manifest.json").read_text()) == manifest  # reused, not redone with the defaults
    assert (stage / "tracking.npz").read_bytes() == tracking
    p = cli("--log-json", "reconstruct", photo, "--out", out, *TEMPLATE, check=0)
    assert [e["status"] for e in events(p)] == ["skipped"]
    p = cli("--log-json", "reconstruct", photo, "--out", out, *TEMPLATE, "--force", check=0)  # redoes the avatar
    assert [e["status"] for e in events(p)] == ["done"]
    assert json.loads((stage / "manifest.json").read_text()) == manifest  # and keeps the reusable preprocess

    # An unfinished preprocess with other settings is not overwritten: one line naming the setting.
    (stage / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    avatar = next(out.glob("*/avatar/avatar.npz"))
    before = avatar.read_bytes()
    p = cli("--log-json", "reconstruct", photo, "--out", out, *TEMPLATE, check=1)
    (item,) = events(p)
    assert item["status"] == "failed" and "background: [128, 128, 128] (default: [255, 255, 255])" in item["error"]
    assert "--force" in item["error"] and avatar.read_bytes() == before
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"
    # --force redoes it with the defaults, and says "done".
    p = cli("--log-json", "reconstruct", photo, "--out", out, *TEMPLATE, "--force", check=0)
    assert [e["status"] for e in events(p)] == ["done"]
    assert json.loads((stage / "manifest.json").read_text())["settings"]["background"] == [255, 255, 255]


# ------------------------------------------------------------------------------------------------------ defect 3
def test_turntables_of_two_avatars_in_one_folder_do_not_collide(avatar, tmp_path):
    from pipelines.avatar.artifact import load_avatar, save_avatar

    x = tmp_path / "x"
    x.mkdir()
    shutil.copy(avatar, x / "a.npz")
    b = load_avatar(avatar)
    b.maps[:3] = 1.0 - b.maps[:3]  # another avatar: inverted colours
    save_avatar(x / "b.npz", b)

    p = cli("--log-json", "turntable", x / "a.npz", x / "b.npz", *TURN, check=0)
    assert [e["status"] for e in events(p)] == ["done", "done"]
    videos = sorted(x.glob("*/turntable/turntable.mp4"))
    assert len(videos) == 2 and videos[0].read_bytes() != videos[1].read_bytes()
    assert {v.parent.parent.name.split("-")[0] for v in videos} == {"a", "b"}
    p = cli("--log-json", "turntable", x / "a.npz", x / "b.npz", *TURN, check=0)
    assert [e["status"] for e in events(p)] == ["skipped", "skipped"]

    # Two --output files in one folder: a manifest each, each skipped when done.
    y = tmp_path / "y"
    for name, av in (("t1.mp4", "a.npz"), ("t2.mp4", "b.npz")):
        cli("turntable", x / av, "--output", y / name, *TURN, check=0)
    assert (y / "t1.mp4").read_bytes() != (y / "t2.mp4").read_bytes()
    assert not (y / "manifest.json").exists()
    for name in ("t1.mp4", "t2.mp4"):
        m = json.loads((y / f".{name}.fhavatar" / "manifest.json").read_text())
        assert m["status"] == "done" and list(m["outputs"]) == [f"../{name}"]
    p = cli("--log-json", "turntable", x / "a.npz", "--output", y / "t1.mp4", *TURN, check=0)
    assert [e["status"] for e in events(p)] == ["skipped"]


# ------------------------------------------------------------------------------------------------------ defect 4
def _motion(tmp_path: Path, name: str, **change) -> Path:
    with np.load(MOTION) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(change)
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_driving_motion_is_checked_before_rendering(avatar, tmp_path):
    expr = np.load(MOTION)["param_expression"].copy()
    expr[3, 5] = np.nan
    bad = _motion(tmp_path, "nan motion.npz", param_expression=expr)
    p = cli("reenact", avatar, bad, "--size", "64", "--max-frames", "4", "--renderer", "torch", check=2)
    line = one_error_line(p)
    assert "nan motion.npz" in line and "non-finite" in line and "expression, frame 3" in line
    assert not list(avatar.parent.parent.glob("reenact/*/video.mp4"))  # nothing rendered
    other = _motion(tmp_path, "flame.npz", head_model=np.array("flame:generic_model"))
    line = one_error_line(cli("reenact", avatar, other, "--size", "64", check=2))
    assert "flame.npz" in line and "flame:generic_model" in line and "'embedded'" in line


def test_shipped_sample_motion_drives_the_default_head():
    """sample_inputs/driving_motion.npz (``make demo``) fits the head of the shipped weights, and it smiles and opens
    the jaw."""
    from pipelines.head.registry import load_head_model
    from pipelines.reenact import check_driving, driving_tracking

    head = load_head_model("auto")
    trk = driving_tracking(SHIPPED_MOTION)
    check_driving(trk, "driving_motion.npz", head.name, head.n_shape, head.n_expr)
    smile = trk.params["expression"][:, list(head.expression_names).index("mouthSmile_L")]
    assert smile.max() > 0.5 and trk.params["jaw"][:, 0].max() > 0.15


def test_check_driving_names_shapes_that_do_not_fit_the_head():
    from pipelines.errors import InputError
    from pipelines.reenact import check_driving, driving_tracking

    trk = driving_tracking(MOTION)
    check_driving(trk, "ok.npz", "embedded", 20, 24)  # the shipped motion fits the embedded head
    with pytest.raises(InputError, match=r"'m.npz' has expression of shape \(75, 24\), expected \(75, 100\)"):
        check_driving(trk, "m.npz", "embedded", 20, 100)
    trk.params["eyes"] = trk.params["eyes"][:, :3]
    with pytest.raises(InputError, match=r"eyes of shape \(75, 3\), expected \(75, 6\)"):
        check_driving(trk, "m.npz")
    trk = driving_tracking(MOTION)
    trk.c2w = trk.c2w.copy()
    trk.c2w[7, 0, 3] = np.inf
    with pytest.raises(InputError, match="non-finite values .* in c2w, frame 7"):
        check_driving(trk, "m.npz")


# ------------------------------------------------------------------------------------------------------ defect 5
def test_bad_weights_exit_3_before_any_item(photo, tmp_path):
    flipped = tmp_path / "flipped.safetensors"
    raw = bytearray(DEFAULT_WEIGHTS.read_bytes())
    raw[-5000:-4000] = bytes(255 - b for b in raw[-5000:-4000])  # tensor bytes, the header intact
    flipped.write_bytes(bytes(raw))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint" * 100)
    for weights, why in ((flipped, "sha256"), (garbage, "unreadable")):
        out = tmp_path / f"out_{weights.stem}"
        p = cli("reconstruct", photo, "--out", out, "--weights", weights, "--head-model", "embedded", check=3)
        line = one_error_line(p)
        assert weights.name in line and why in line
        assert not any(out.iterdir())  # up front: nothing was preprocessed


def test_checkpoints_are_checked_for_shapes_and_their_tensor_digest(tmp_path):
    from safetensors.torch import load_file, save_file

    from pipelines.errors import WeightsError
    from pipelines.network.config import NetworkConfig
    from pipelines.network.weights import load_network, read_metadata, save_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, load_network("random", config=NetworkConfig.tiny()))
    load_network(ckpt)  # intact: loads
    meta, state = read_metadata(ckpt), load_file(str(ckpt))
    name = sorted(state)[3]
    flipped = dict(state)
    flipped[name] = -state[name]
    save_file(flipped, str(tmp_path / "flipped.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match="do not match the digest"):
        load_network(tmp_path / "flipped.safetensors")
    wrong = {**state, name: state[name].reshape(-1)[:-1].clone()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata={"config": meta["config"]})
    with pytest.raises(WeightsError, match=f"misshapen 1 tensors, e.g. {name}"):
        load_network(tmp_path / "wrong.safetensors")


# ----------------------------------------------------------------------------------------------------- defect 10
def test_unwritable_outputs_are_one_line_exit_2(photo, avatar, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = one_error_line(cli("preprocess", photo, "--out", a_file, "--head-model", "embedded", check=2))
    assert f"--out '{a_file}' is a file, not a folder" in line
    if os.geteuid() == 0:  # root ignores file modes: a read-only file system instead
        ro = Path("/sys/fhavatar_ro")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        ro = tmp_path / "ro" / "x"
    line = one_error_line(cli("turntable", avatar, "--output", ro / "t.mp4", *TURN, check=2))
    assert str(ro) in line and "writable --output" in line


# ----------------------------------------------------------------------------------------------------- defect 11
def test_the_checkpoint_owns_k(avatar, tmp_path):
    from pipelines.avatar.artifact import load_avatar
    from pipelines.network.config import NetworkConfig
    from pipelines.network.weights import load_network, save_checkpoint

    ckpt = tmp_path / "k32.safetensors"
    save_checkpoint(ckpt, load_network("random", config=NetworkConfig.tiny()))  # K = 32
    item = shutil.copytree(avatar.parent.parent, tmp_path / avatar.parent.parent.name)  # reconstructed in place
    (item / "avatar" / "avatar.npz").unlink()
    line = one_error_line(cli("reconstruct", item, "--weights", ckpt, "--uv-size", "64", "--head-model", "embedded",
                              check=2))
    assert "--uv-size 64 conflicts" in line and "K = 32" in line
    assert not (item / "avatar" / "avatar.npz").exists()  # refused up front
    cli("reconstruct", item, "--weights", ckpt, "--head-model", "embedded", check=0)
    assert load_avatar(item / "avatar" / "avatar.npz").uv_size == 32


# ----------------------------------------------------------------------------------------------------- defect 13
def test_a_full_disk_says_so_with_the_path(tmp_path, monkeypatch):
    from pipelines.errors import InputError
    from pipelines.preprocess import stage

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    target = tmp_path / "frames" / "000012.png"
    with pytest.raises(InputError, match=r"the disk is full \(ENOSPC\) writing '.*frames/000012.png'"):
        stage._write_png(target, np.zeros((8, 8, 3), np.uint8))
    assert not list(target.parent.iterdir())  # no temporary file left


# ----------------------------------------------------------------------------------------------------- defect 14
def test_native_logs_are_hidden_unless_verbose(avatar, tmp_path):
    assert QUIET_RUN["stderr"] == ""  # the quiet reconstruction of a photo: no MediaPipe / TFLite lines
    from video_files import write_video

    video = tmp_path / "clip.mp4"
    write_video(video, [np.ascontiguousarray(data.astronaut()[10:330, 100:420])] * 6)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 2])  # no moov atom
    args = ("preprocess", cut, "--out", tmp_path / "o", "--head-model", "embedded")
    assert "cut.mp4" in one_error_line(cli("--quiet", *args, check=1))  # our line only: no ffmpeg noise before it
    assert "moov atom not found" in cli("--verbose", *args, check=1).stderr


# ----------------------------------------------------------------------------------------------------- defect 15
def test_common_options_work_on_every_command(avatar, tmp_path):
    d = tmp_path / "d"
    p = cli("turntable", avatar, "--out", d, *TURN, "--shard", "0/1", "--fail-fast", "--quiet", "--log-json", check=0)
    assert [e["status"] for e in events(p)] == ["done"] and p.stderr == ""
    assert (d / avatar.parent.parent.name / "turntable" / "turntable.mp4").is_file()
    p = cli("reenact", avatar, MOTION, "--out", d, "--size", "64", "--max-frames", "2", "--renderer", "torch",
            "--fail-fast", "--log-json", check=0)
    assert [e["status"] for e in events(p)] == ["done"]
    assert len(list((d / avatar.parent.parent.name / "reenact").glob("*/video.mp4"))) == 1
    p = cli("reconstruct", avatar.parent.parent, "--out", avatar.parent.parent.parent, *TEMPLATE,
            "--renderer", "torch", "--log-json", check=0)
    assert [e["status"] for e in events(p)] == ["skipped"]
    line = one_error_line(cli("turntable", tmp_path / "nope.npz", *TURN, check=2))  # README: missing input = 2
    assert "nope.npz" in line and "not found" in line


def test_option_defaults_have_one_owner_the_stage_dataclasses():
    import typer.main

    from fhavatar_cli.main import app, owned_default
    from pipelines.turntable import TurntableConfig

    group = typer.main.get_command(app)
    owned = 0
    for name, command in group.commands.items():
        for param in command.params:
            if owned_default(command, param.name) is not None:
                owned += 1
                assert param.default is None, f"{name} --{param.name} re-declares the default of its dataclass"
    assert owned >= 25
    radius = next(p for p in group.commands["turntable"].params if p.name == "radius")
    assert owned_default(group.commands["turntable"], "radius") == TurntableConfig.radius and radius.default is None


def test_stage_settings_come_from_a_file_and_set_and_the_options_win(avatar, tmp_path):
    """reenact / turntable / evaluate read their stage dataclass from --config and --set (nested keys included);
    an option given on the command line wins; a bad value is a one-line exit 2 naming the setting."""
    from pipelines.video import read_video_frames

    settings = tmp_path / "reenact.yaml"
    settings.write_text("size: 48\nskinning:\n  torso_follow: 0.5\n")
    d = tmp_path / "d"
    p = cli("reenact", avatar, MOTION, "--out", d, "--config", settings, "--max-frames", "2", "--renderer", "torch",
            "--log-json", check=0)
    video = next((d / avatar.parent.parent.name / "reenact").glob("*/video.mp4"))
    assert {f.shape[:2] for f in read_video_frames(video)} == {(48, 48)}
    manifest = json.loads((video.parent / "manifest.json").read_text())
    assert manifest["settings"]["skinning"]["torso_follow"] == 0.5
    p = cli("turntable", avatar, "--out", tmp_path / "t", "--set", "size=48", "--set", "frames=2", "--size", "40",
            "--renderer", "torch", check=0)
    turn = next((tmp_path / "t").glob("*/turntable/turntable.mp4"))
    assert [f.shape[:2] for f in read_video_frames(turn)] == [(40, 40)] * 2
    line = one_error_line(cli("reenact", avatar, MOTION, "--set", "skinning.torso_follow=2", check=2))
    assert "torso_follow" in line
    line = one_error_line(cli("evaluate", MOTION, "--out", tmp_path / "e", "--set", "skining.by_position=false",
                              check=2))
    assert "skining" in line
