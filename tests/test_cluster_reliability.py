"""Cluster reliability through the real CLI (subprocesses, CPU): job-array shards, per-item locks, `status`,
stale temporary files, file modes, exit codes (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imageio.v3 as iio
import pytest

from pipelines.store import Manifest, item_id, item_lock
from test_cluster import CLI, ENV, lines_json, portrait, run_cli

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bogus(tmp_path_factory) -> list[Path]:
    """Six inputs that fail at once (not images): which task takes which is all these tests need."""
    d = tmp_path_factory.mktemp("bogus")
    for i in range(6):
        (d / f"b{i}.jpg").write_text(f"not an image {i}")
    return sorted(d.iterdir())


def _taken(env: dict, inputs: list[Path], out: Path) -> tuple[int, list[str], str]:
    """(exit code, names of the inputs the task took, its errors) of one job-array task."""
    p = subprocess.run([*CLI, "--log-json", "preprocess", *map(str, inputs), "--out", str(out), "--head-model",
                        "embedded"], capture_output=True, text=True, env={**ENV, **env}, timeout=300)
    events = lines_json(p.stdout)
    errors = " ".join(e["message"] for e in events if e["event"] == "error")
    return p.returncode, [Path(e["name"]).name for e in events if e["event"] == "item"], errors or p.stderr


@pytest.mark.parametrize("scheduler", ["slurm", "lsf"])
def test_job_array_tasks_cover_every_input_once(bogus, tmp_path, scheduler):
    """SLURM --array=0-4:2 used to process 5 of 6 inputs and LSF [2-4] 4 of 6; each exited 0."""
    if scheduler == "slurm":
        base = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4",
                "SLURM_ARRAY_TASK_STEP": "2"}
        envs = [{**base, "SLURM_ARRAY_TASK_ID": t} for t in ("0", "2", "4")]
    else:
        base = {"LSB_JOBINDEX_END": "4", "LSB_JOBINDEX_STEP": "1", "LSB_JOBNAME": "fhavatar[2-4]"}
        envs = [{**base, "LSB_JOBINDEX": t} for t in ("2", "3", "4")]
    seen = []
    for env in envs:
        code, names, err = _taken(env, bogus, tmp_path / "out")
        assert code == 1, err[-2000:]  # its items failed (not images), one line each
        seen += names
    assert sorted(seen) == [p.name for p in bogus]  # every input once: none dropped, none twice


@pytest.mark.parametrize("env,var", [
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}, "SLURM_ARRAY_TASK_ID=7"),
    ({"LSB_JOBINDEX": "5", "LSB_JOBINDEX_END": "4", "LSB_JOBNAME": "fhavatar[2-4]"}, "LSB_JOBINDEX=5"),
])
def test_a_task_id_outside_the_array_is_a_usage_error(bogus, tmp_path, env, var):
    """SLURM_ARRAY_TASK_ID=7 with 3 tasks used to run '0 item(s)' and exit 0."""
    code, names, err = _taken(env, bogus, tmp_path / "out")
    assert code == 2 and names == []
    assert var in err and "--shard" in err and "\n" not in err


def _item_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("photo") / "face.jpg"
    iio.imwrite(p, portrait(0), quality=92)
    return p


@pytest.fixture(scope="module")
def preprocessed(photo, tmp_path_factory) -> Path:
    """One photo preprocessed by the CLI under umask 002 (a group-shared cluster folder)."""
    out = tmp_path_factory.mktemp("shared") / "out"
    p = subprocess.run([*CLI, "preprocess", str(photo), "--out", str(out), "--head-model", "embedded"],
                       capture_output=True, text=True, env=ENV, timeout=600, umask=0o002)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_artifacts_respect_the_umask(preprocessed):
    """The temporary-file helper created every artifact 0600, whatever the umask."""
    files = _item_files(preprocessed)
    assert len(files) >= 7  # frames, mattes, npz files, progress, manifest (and the lock)
    modes = {str(p.relative_to(preprocessed)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o664"}, modes
    dirs = {oct(stat.S_IMODE(p.stat().st_mode)) for p in preprocessed.rglob("*") if p.is_dir()}
    assert dirs == {"0o775"}


def test_stale_temp_files_are_removed_when_the_item_is_next_taken(preprocessed, photo, tmp_path):
    """A SIGKILL during a write leaves '.<name>.<random>.tmp<ext>' files that re-runs never removed."""
    out = tmp_path / "out"
    shutil.copytree(preprocessed, out)
    stage = next(out.glob("*/preprocess"))
    frame = (stage / "frames" / "000000.png").read_bytes()
    stale = [stage / "frames" / ".000000.png.k3j4h5g6.tmp.png",  # mkstemp-style names of earlier versions too
             stage / "mattes" / ".000000.png.0a1b2c3d.tmp.png",
             stage / ".landmarks.npz.abc_1234.tmp.npz", stage / ".manifest.json.9f8e7d6c.tmp.json"]
    for p in stale:
        p.write_bytes(b"half-written" * 1000)
    keep = stage / "frames" / "notes.tmp.txt"  # not one of ours
    keep.write_text("keep me")
    (stage / "manifest.json").unlink()  # as a killed run leaves it: preprocess writes its manifest last
    p = run_cli("--log-json", "preprocess", photo, "--out", out, "--head-model", "embedded", check=0)
    assert [e["status"] for e in lines_json(p.stdout) if e["event"] == "item"] == ["done"]
    assert [s for s in stale if s.exists()] == [] and keep.read_text() == "keep me"
    assert (stage / "frames" / "000000.png").read_bytes() == frame


def test_preprocess_takes_the_item_lock_and_leaves_a_locked_item_to_its_holder(photo, tmp_path):
    """preprocess took no lock (two jobs both did all the work); a job whose only 'failure' was a locked item
    exited 1. Now: the locked item is left to the job holding it, with its own outcome and exit code 75."""
    out = tmp_path / "out"
    item = out / item_id(photo)
    with item_lock(item):  # another job working on it
        p = run_cli("--log-json", "preprocess", photo, "--out", out, "--head-model", "embedded")
    assert p.returncode == 75, p.stderr[-2000:]
    events = lines_json(p.stdout)
    (ev,) = [e for e in events if e["event"] == "item"]
    assert ev["status"] == "locked" and f"pid {os.getpid()} on {socket.gethostname()}" in ev["error"]
    assert [e for e in events if e["event"] == "summary"][0]["locked"] == 1
    assert not (item / "preprocess").exists()  # it did none of the work
    p = run_cli("preprocess", photo, "--out", out, "--head-model", "embedded")  # people see it as a notice, not error
    assert p.returncode == 0 and "locked" not in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_models_load_exits_130(photo, tmp_path, sig):
    """SIGTERM before the first item used to kill the job with 143 (SIGINT: click's 'Aborted!' and 1)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "preprocess", str(photo), "--out", str(out), "--head-model", "embedded"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)  # the folder is made before the head model and torch load (seconds)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"interrupted by {sig.name}" in err and "re-run" in err
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def _hold(lock_dir: Path, stage: str) -> subprocess.Popen:
    """Another job holding an item for a stage (until killed)."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from pipelines.store import item_lock
        with item_lock(Path({str(lock_dir)!r}), stage={stage!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stage(folder: Path, status: str, error: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Manifest(stage=folder.name, status=status, error=error).save(folder)


def test_status_tells_dead_jobs_from_live_ones_and_lists_what_has_not_started(photo, tmp_path):
    """status showed a SIGKILLed job 'running' forever, never listed items without a folder, and counted
    reenactments as one number that included the failures."""
    out = tmp_path / "out"
    other = tmp_path / "other.jpg"
    iio.imwrite(other, portrait(6), quality=92)
    killed = out / item_id(photo)  # its job was SIGKILLed during the avatar stage: a manifest says running
    _stage(killed / "preprocess", "done")
    _stage(killed / "avatar", "running")
    (killed / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname(), "stage": "avatar"}))
    _stage(killed / "reenact" / "drv1-0123456789", "done")
    _stage(killed / "reenact" / "drv2-0123456789", "failed", "no face found in 'drv2.mp4'")
    _stage(killed / "reenact" / "drv3-0123456789", "done")
    live = out / "live-0123456789"  # a job is working on its avatar right now
    _stage(live / "preprocess", "done")
    _stage(live / "avatar", "running")
    holder = _hold(live, "avatar")
    starting = _hold(out / "starting-0123456789", "preprocess")  # it has not made its stage folder yet
    try:
        p = run_cli("--log-json", "status", out, photo, other, check=0)
        table = run_cli("status", out, photo, other, check=0).stderr
    finally:
        for h in (holder, starting):
            h.kill()
            h.wait()
    rows = {e["item"]: e for e in lines_json(p.stdout) if e["event"] == "status"}
    assert rows[killed.name]["avatar"] == "interrupted" and rows[killed.name]["preprocess"] == "done"
    assert rows[killed.name]["reenact"] == {"done": 2, "failed": 1}
    assert rows[killed.name]["errors"] == {}
    assert rows["live-0123456789"]["avatar"] == "running"
    assert rows["live-0123456789"]["running"] == {"avatar": f"pid {holder.pid} on {socket.gethostname()}"}
    assert rows["starting-0123456789"]["preprocess"] == "running"
    assert rows[item_id(other)] == {**rows[item_id(other)], "preprocess": "not started", "input": str(other)}
    summary = [e for e in lines_json(p.stdout) if e["event"] == "summary"][0]
    assert summary["items"] == 4 and summary["preprocess"] == {"done": 2, "running": 1, "not started": 1}
    assert summary["avatar"] == {"running": 1, "interrupted": 1} and summary["reenact"] == {"done": 2, "failed": 1}
    text = " ".join(table.split())
    assert "2 done, 1 failed" in text and "not started" in text and "interrupted" in text
    # Once the live job is gone (killed), its stage reads interrupted too.
    p = run_cli("--log-json", "status", out, check=0)
    rows = {e["item"]: e for e in lines_json(p.stdout) if e["event"] == "status"}
    assert rows["live-0123456789"]["avatar"] == "interrupted" and item_id(other) not in rows
    assert rows["starting-0123456789"]["preprocess"] == "-"


def test_run_in_a_job_array_drives_each_avatar_with_every_driving_input(tmp_path, monkeypatch):
    """`fhavatar run` sharded its --driving inputs by the job array too: task i drove its avatars with 1/n of them."""
    import pipelines.stages as stages
    from typer.testing import CliRunner

    import fhavatar_cli.main as cli

    calls: list[tuple[str, str]] = []
    import pipelines.reenact as reenact

    monkeypatch.setattr(cli, "_load_head", lambda *a: type("Head", (), {"name": "h", "n_shape": 1, "n_expr": 1})())
    monkeypatch.setattr(reenact, "driving_tracking", lambda d: None)  # the stand-in files are not tracked motion
    monkeypatch.setattr(reenact, "check_driving", lambda *a, **k: None)
    monkeypatch.setattr(stages, "reconstruct_item", lambda spec, *a, **k: ("done", {"avatar": str(spec)}))
    monkeypatch.setattr(stages, "reenact_item", lambda avatar, drv, *a, **k: calls.append((avatar.name, drv.name)))
    for name in ("p0.jpg", "p1.jpg", "d0.npz", "d1.npz", "d2.npz"):
        (tmp_path / name).write_bytes(name.encode())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        r = CliRunner().invoke(cli.app, ["run", str(tmp_path / "p0.jpg"), str(tmp_path / "p1.jpg"), "--out",
                                         str(tmp_path / "out"), "--method", "template", "--turntable-frames", "0",
                                         "--device", "cpu", *sum((["-d", str(tmp_path / f"d{i}.npz")]
                                                                  for i in range(3)), [])],
                               env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                                    "SLURM_ARRAY_TASK_MIN": "0"})
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert r.exit_code == 0, r.output
    assert calls == [("p1.jpg", "d0.npz"), ("p1.jpg", "d1.npz"), ("p1.jpg", "d2.npz")]
