"""Artifact store and batch runner: atomic writes, skip/redo logic, corruption detection, shards, isolation."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.batch import (
    EXIT_INTERRUPTED, EXIT_ITEM_FAILED, EXIT_LOCKED, EXIT_OK, ItemResult, exit_code, run_batch, run_stage,
)
from pipelines.errors import ConfigError, InputError
from pipelines.store import (
    ItemLocked, Manifest, atomic_path, expand_inputs, item_id, item_lock, lock_holder, parse_shard, select_shard,
    shard_from_env, write_json,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "x.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_item_id_is_stable_and_content_based(tmp_path):
    a = tmp_path / "my photo ü.jpg"
    a.write_bytes(b"abc")
    b = tmp_path / "sub" / "my photo ü.jpg"
    b.parent.mkdir()
    b.write_bytes(b"abd")
    assert item_id(a) == item_id(a) and item_id(a) != item_id(b)
    assert item_id(a).startswith("my_photo-")


def test_expand_inputs_files_folders_globs_and_lists(tmp_path):
    for n in ("a.jpg", "b.png", "c.txt"):
        (tmp_path / n).write_bytes(n.encode())
    (tmp_path / "list.txt").write_text("a.jpg\n# comment\n\nb.png\n")
    exts = (".jpg", ".png")
    assert [p.name for p in expand_inputs([str(tmp_path)], exts)] == ["a.jpg", "b.png"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.jpg")])] == ["a.jpg"]
    assert [p.name for p in expand_inputs([f"@{tmp_path / 'list.txt'}", str(tmp_path / "a.jpg")])] == ["a.jpg", "b.png"]
    with pytest.raises(InputError, match="nope.jpg"):
        expand_inputs([str(tmp_path / "nope.jpg")])
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.gif")])


def test_shards_cover_every_item_exactly_once():
    items = list(range(23))
    parts = [select_shard(items, i, 4) for i in range(4)]
    assert sorted(sum(parts, [])) == items
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0"}) == (7, 8)
    assert shard_from_env({"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "4"}) == (2, 4)
    assert shard_from_env({"LSB_JOBINDEX": "1", "LSB_JOBINDEX_END": "5", "LSB_JOBNAME": "fh[1-5]"}) == (0, 5)
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"LSB_JOBINDEX": "0", "SGE_TASK_ID": "undefined"}) == (0, 1)  # not job arrays


def _array_envs(scheduler: str, ids: range | list[int], spec: str) -> list[dict]:
    """The job-array variables each task of an array with these ``ids`` (written ``spec``) sees."""
    lo, hi, n = min(ids), max(ids), len(ids)
    step = ids.step if isinstance(ids, range) else 1
    if scheduler == "slurm":
        base = {"SLURM_ARRAY_TASK_COUNT": n, "SLURM_ARRAY_TASK_MIN": lo, "SLURM_ARRAY_TASK_MAX": hi,
                "SLURM_ARRAY_TASK_STEP": step}
        return [{**base, "SLURM_ARRAY_TASK_ID": t} for t in ids]
    if scheduler == "lsf":  # LSF passes the array's index list in the job name
        base = {"LSB_JOBINDEX_END": hi, "LSB_JOBINDEX_STEP": step, "LSB_JOBNAME": f"fhavatar[{spec}]"}
        return [{**base, "LSB_JOBINDEX": t} for t in ids]
    if scheduler == "sge":
        base = {"SGE_TASK_FIRST": lo, "SGE_TASK_LAST": hi, "SGE_TASK_STEPSIZE": step}
        return [{**base, "SGE_TASK_ID": t} for t in ids]
    base = {"FHAVATAR_SHARD_COUNT": n, "FHAVATAR_SHARD_FIRST": lo, "FHAVATAR_SHARD_STEP": step}  # PBS Pro
    return [{**base, "PBS_ARRAY_INDEX": t} for t in ids]


@pytest.mark.parametrize("scheduler,ids,spec", [
    ("slurm", range(0, 5, 2), "0-4:2"),  # the issue: 5 of 6 photos processed
    ("slurm", range(1, 17), "1-16"),
    ("slurm", range(5, 8), "5-7"),
    ("lsf", range(2, 5), "2-4"),  # the issue: 4 of 6 photos processed
    ("lsf", range(1, 10, 2), "1-9:2"),
    ("lsf", [1, 2, 3, 7, 10, 12], "1-3,7,10-12:2"),
    ("sge", range(1, 11, 3), "1-10:3"),
    ("pbs", range(1, 8, 2), "1-7:2"),
])
def test_job_array_tasks_take_every_item_exactly_once(scheduler, ids, spec):
    for n_items in (6, 23):
        items = list(range(n_items))
        taken = [select_shard(items, *shard_from_env({k: str(v) for k, v in env.items()}))
                 for env in _array_envs(scheduler, ids, spec)]
        assert sorted(sum(taken, [])) == items, f"{scheduler} [{spec}] over {n_items} items: {taken}"


@pytest.mark.parametrize("env,says", [
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}, "task id"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_STEP": "2"}, "not one of the array's ids (0-4:2)"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",  # --array=1,3,7
      "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_STEP": "1"}, "irregular"),
    ({"LSB_JOBINDEX": "5", "LSB_JOBINDEX_END": "4", "LSB_JOBNAME": "fh[2-4]"}, "LSB_JOBINDEX=5"),
    ({"LSB_JOBINDEX": "5", "LSB_JOBINDEX_END": "10", "LSB_JOBNAME": "fh[2-4,6-10:2]"}, "(2,3,4,6,8,10)"),
    ({"LSB_JOBINDEX": "3", "LSB_JOBINDEX_END": "6", "LSB_JOBNAME": "fh[2-4]"}, "LSB_JOBINDEX_END=6"),
    ({"LSB_JOBINDEX": "5", "LSB_JOBINDEX_END": "4", "LSB_JOBNAME": "fh"}, "LSB_JOBNAME"),
    ({"SGE_TASK_ID": "12", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "10", "SGE_TASK_STEPSIZE": "1"}, "SGE_TASK_ID=12"),
    ({"PBS_ARRAY_INDEX": "3"}, "FHAVATAR_SHARD_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, "not an integer"),
])
def test_job_array_ids_outside_the_array_are_errors(env, says):
    """A task id the array does not have (or variables that do not pin the ids down) must stop the job with exit 2,
    never run an empty or wrong shard."""
    with pytest.raises(ConfigError) as e:
        shard_from_env(env)
    assert says in str(e.value) and "--shard" in str(e.value)
    assert e.value.exit_code == 2


def _work(text):
    def work(folder: Path):
        with atomic_path(folder / "out.txt") as tmp:
            tmp.write_text(text)
        return ["out.txt"]
    return work


def test_run_stage_skips_redoes_and_detects_corruption(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("input")
    stage = tmp_path / "item" / "stage"
    calls = []

    def work(folder):
        calls.append(1)
        return _work("result")(folder)

    assert run_stage(stage, {"k": 1}, {"src": inp}, work)[0] == "done"
    assert run_stage(stage, {"k": 1}, {"src": inp}, work)[0] == "skipped"
    assert run_stage(stage, {"k": 2}, {"src": inp}, work)[0] == "done"  # changed setting
    inp.write_text("changed input")
    assert run_stage(stage, {"k": 2}, {"src": inp}, work)[0] == "done"  # changed input
    (stage / "out.txt").write_text("corrupted")
    assert run_stage(stage, {"k": 2}, {"src": inp}, work)[0] == "done"  # corrupted output detected
    assert (stage / "out.txt").read_text() == "result"
    assert run_stage(stage, {"k": 2}, {"src": inp}, work, force=True)[0] == "done"
    assert len(calls) == 5
    m = Manifest.load(stage)
    assert m.status == "done" and m.settings == {"k": 2} and "out.txt" in m.outputs


def test_failed_stage_records_error_and_lock_excludes_others(tmp_path):
    stage = tmp_path / "item" / "stage"

    def bad(folder):
        raise InputError("no face found in 'x.jpg'", "use another photo")

    with pytest.raises(InputError):
        run_stage(stage, {}, {}, bad)
    m = Manifest.load(stage)
    assert m.status == "failed" and "no face" in m.error
    with item_lock(tmp_path / "item"):
        # flock locks are per open file description: a second open in another process is excluded.
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r})
            from pipelines.store import item_lock, ItemLocked
            from pathlib import Path
            try:
                with item_lock(Path({str(tmp_path / 'item')!r})):
                    print("acquired")
            except ItemLocked:
                print("locked")
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        assert out == "locked"


def test_batch_isolates_failures_and_reports_exit_codes(tmp_path):
    def job(i):
        def run():
            if i % 3 == 0:
                raise InputError(f"item {i} is unreadable")
            if i == 4:
                raise ValueError("boom")
            return "done", {}
        return run

    results = run_batch([(f"in{i}", f"id{i}", job(i)) for i in range(10)])
    failed = [r.name for r in results if r.status == "failed"]
    assert failed == ["in0", "in3", "in4", "in6", "in9"]
    assert sum(r.status == "done" for r in results) == 5
    assert "unreadable" in results[0].error and "boom" in results[4].error
    assert exit_code(results) == EXIT_ITEM_FAILED
    ff = run_batch([(f"in{i}", f"id{i}", job(i)) for i in range(10)], fail_fast=True)
    assert ff[0].status == "failed" and all(r.status == "pending" for r in ff[1:])
    assert exit_code([r for r in results if r.status == "done"]) == EXIT_OK


def test_sigterm_stops_after_the_current_item(tmp_path):
    """Job pre-emption: SIGTERM during item 2 lets it finish, leaves the rest pending, exit code 130."""
    script = tmp_path / "runner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, os, signal
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from pathlib import Path
        from pipelines.batch import run_batch, run_stage, exit_code
        from pipelines.store import atomic_path
        out = Path({str(tmp_path / 'out')!r})
        def job(i):
            def work(folder):
                if i == 2:
                    (out / 'started2').write_text('x')
                    time.sleep(1.5)
                with atomic_path(folder / 'r.txt') as t:
                    t.write_text(str(i))
                return ['r.txt']
            return lambda: run_stage(out / f'item{{i}}' / 'stage', {{}}, {{}}, work)
        res = run_batch([(str(i), str(i), job(i)) for i in range(6)])
        print(' '.join(r.status for r in res))
        sys.exit(exit_code(res))
    """))
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for _ in range(200):
        if (tmp_path / "out" / "started2").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED
    assert out.split() == ["done", "done", "done", "pending", "pending", "pending"]
    assert (tmp_path / "out" / "item2" / "stage" / "r.txt").read_text() == "2"
    assert not (tmp_path / "out" / "item3").exists()


def test_run_stage_removes_stale_temps_in_its_own_lock_scope_only(tmp_path):
    """A SIGKILL during a write leaves the writer's temporary file; the next job taking the stage removes it."""
    stage = tmp_path / "item" / "avatar"
    (stage / "frames").mkdir(parents=True)
    (stage / "other").mkdir()
    (stage / "other" / ".lock").touch()  # another lock's scope: its writer may be alive
    stale = [stage / ".avatar.npz.0a1b2c3d.tmp.npz", stage / "frames" / ".000001.png.k_3j4h5g.tmp.png"]
    kept = [stage / "other" / ".x.png.0a1b2c3d.tmp.png", stage / "notes.tmp", stage / ".hidden"]
    for p in stale + kept:
        p.write_text("x")
    assert run_stage(stage, {}, {}, _work("result"))[0] == "done"
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)


def test_finished_stage_is_skipped_without_its_lock_and_unfinished_one_is_left_to_the_holder(tmp_path):
    stage = tmp_path / "item" / "avatar"
    assert run_stage(stage, {"k": 1}, {}, _work("a"))[0] == "done"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from pathlib import Path
        from pipelines.store import item_lock
        with item_lock(Path({str(stage.parent)!r}), stage="turntable"):
            print("held", flush=True)
            time.sleep(60)
    """)
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        holder = lock_holder(stage.parent)
        assert (holder.pid, holder.stage) == (other.pid, "turntable")
        assert run_stage(stage, {"k": 1}, {}, _work("a"))[0] == "skipped"  # another job holds the item: no matter
        with pytest.raises(ItemLocked) as e:
            run_stage(stage, {"k": 2}, {}, _work("b"))
        assert f"pid {other.pid}" in str(e.value)
        r = run_batch([("in", "id", lambda: run_stage(stage, {"k": 2}, {}, _work("b")))])
        assert r[0].status == "locked" and f"left to pid {other.pid}" in r[0].error
        assert exit_code(r) == EXIT_LOCKED
    finally:
        other.kill()
        other.wait()
    assert lock_holder(stage.parent) is None  # a killed holder's lock is free: it is not "running" any more
    assert run_stage(stage, {"k": 2}, {}, _work("b"))[0] == "done"


def test_item_lock_is_reentrant_in_its_thread_and_names_its_holder(tmp_path):
    import threading

    item = tmp_path / "item"
    with item_lock(item, stage="preprocess"):
        assert lock_holder(item).stage == "preprocess" and lock_holder(item).pid == os.getpid()
        with item_lock(item, stage="avatar"):  # the same thread, a nested stage
            assert lock_holder(item).stage == "avatar"
        assert lock_holder(item).stage == "preprocess"
        seen = []

        def other_thread():
            try:
                with item_lock(item):
                    seen.append("acquired")
            except ItemLocked:
                seen.append("locked")

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert seen == ["locked"]
    assert lock_holder(item) is None


def test_exit_codes_put_failures_before_locked_items():
    def r(*statuses):
        return [ItemResult(s, s, s) for s in statuses]

    assert exit_code(r("done", "locked", "skipped")) == EXIT_LOCKED == 75
    assert exit_code(r("locked", "failed")) == EXIT_ITEM_FAILED
    assert exit_code(r("locked", "pending")) == EXIT_INTERRUPTED
    assert exit_code(r("done", "skipped")) == EXIT_OK


def test_atomic_path_files_get_the_umask_s_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"b")
    finally:
        os.umask(old)
    assert {oct(stat.S_IMODE((tmp_path / n).stat().st_mode)) for n in ("a.json", "b.bin")} == {"0o640"}
