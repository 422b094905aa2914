"""Multi-process training on the CPU: ``torchrun --nproc_per_node 2`` with gloo, a tiny network, 1 thread per rank.

One torchrun launch (tests/ddp_worker.py) trains 2 ranks x batch 1 and is compared with a single process of batch 2
(the same global batch, run here): both ranks hold the same weights after every step, the 2-process run follows the
single one within floating-point summation order, it resumes exactly, and a stop decision taken by one rank's clock
(or a NaN loss on one rank) stops both at the same step. torchrun itself, not torch.multiprocessing: the code path
of ``torchrun -m fhavatar_cli train`` (environment rendezvous, the process group made by ``train``). About 25 s on
an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.train import train
from pipelines.train.config import DataConfig, LossConfig

from ddp_worker import CLOCK_STOP_AFTER, NAN_AT, STEPS, WeightRecorder
from test_train import cache_env, dataset, head, read_csv, tiny_config  # noqa: F401 (fixtures)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Tolerances of the 2-process vs 1-process comparison. The only difference is the order of floating-point sums
# (gradients summed over 2 ranks, then averaged, vs over one batch of 2). Adam divides each update by the gradient's
# RMS, so a weight whose gradient is ~0 can move by about lr either way on its last bits: a flipped sign costs up to
# 2 lr per step. Measured after 3 steps (lr 1e-4, 626 823 weights): max 2.3e-4, 99th percentile 7e-8, 35 weights
# off by more than 1e-5; losses within 5e-6 relative.
WEIGHT_ATOL_PER_STEP = 2e-4  # 2 lr
WEIGHT_Q999 = 1e-6  # 99.9 % of the weights agree to within this
LOSS_RTOL = 1e-4


def ddp_config(**over):
    # L_3d's TV counts neighbour pairs inside each rank's own mattes (a ratio of sums over the rank's batch), so with
    # tv3d_in_matte the 2-process run weights samples slightly differently from one process; off here, every term
    # is a mean over equal-sized samples and the global batch's loss is exactly the mean of the ranks' losses.
    kw = dict(iterations=5, batch_size=1, checkpoint_every=0, loss=LossConfig(tv3d_in_matte=False),
              data=DataConfig(val_items=("held_out",), val_frames=1, recon_prob=0.3, flip_prob=0.5))
    kw.update(over)
    return tiny_config(**kw)


def _torchrun_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.fixture(scope="module")
def ddp_runs(dataset, tmp_path_factory):  # noqa: F811
    """Launch the 2-process worker once; {rank: results} and the output folder."""
    if not _torchrun_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    cfg_file = out / "config.json"
    cfg_file.write_text(json.dumps(ddp_config().to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
           "FHAVATAR_CACHE": str(tmp_path_factory.mktemp("uvcache_ddp"))}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "ddp_worker.py"), str(cfg_file), str(dataset), str(out)]
    # ~15 s on an idle core; the timeout is the guard against a rank left waiting in a collective (gloo's own
    # timeout is 30 minutes).
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)}, out


@pytest.fixture(scope="module")
def single_run(dataset, tmp_path_factory, cache_env):  # noqa: F811
    """One process, batch 2: the same global batch as the 2 ranks x batch 1."""
    from synthetic_head import SphereHead

    out = tmp_path_factory.mktemp("single") / "run"
    rec = WeightRecorder()
    try:
        res = train(ddp_config(batch_size=2), [dataset], out, head=SphereHead(), backend="torch", stop_at_step=STEPS)
    finally:
        rec.close()
    return res, rec.take(), out


def test_ranks_share_the_global_batch_of_one_process(dataset):  # noqa: F811
    """N ranks x batch B draw exactly the samples of one process of batch N x B, each rank a disjoint share."""
    from pipelines.train.data import Clip, rank_plans

    clips = [Clip(dataset / n, 32) for n in ("clip_a-0123456789", "clip_b-abcdef0123")]
    cfg = DataConfig(recon_prob=0.3)
    for step in range(6):
        one = rank_plans(clips, cfg, 3, step, 0, 4, True)
        assert rank_plans(clips, cfg, 3, step, 0, 2, True) + rank_plans(clips, cfg, 3, step, 1, 2, True) == one
        assert [rank_plans(clips, cfg, 3, step, r, 1, True)[0] for r in range(4)] == one
    draws = [rank_plans(clips, cfg, 3, s, r, 1, True)[0] for s in range(20) for r in range(2)]
    assert len({(p.clip, p.source, p.target, p.jitter) for p in draws}) > 30  # ranks do not repeat each other


def test_both_ranks_hold_identical_weights_after_every_step(ddp_runs):
    runs, _ = ddp_runs
    for name in ("whole", "split", "clock"):
        w0, w1 = runs[0][name]["weights"], runs[1][name]["weights"]
        assert len(w0) == len(w1) > 0, name
        for s, (a, b) in enumerate(zip(w0, w1), start=1):
            assert torch.equal(a, b), f"{name}: ranks differ after step {s}: {(a - b).abs().max().item()}"
    assert len(runs[0]["whole"]["weights"]) == STEPS
    assert runs[1]["whole"]["weights_file"] == runs[0]["whole"]["weights_file"]  # rank 0's file, on every rank


def test_two_processes_follow_one_process_of_the_same_global_batch(ddp_runs, single_run):
    runs, out = ddp_runs
    res, single, single_out = single_run
    assert res.step == STEPS and len(single) == STEPS
    moved = (single[-1] - single[0]).abs().median().item()
    for s, (a, b) in enumerate(zip(runs[0]["whole"]["weights"], single), start=1):
        diff = (a - b).abs()
        assert diff.max().item() < WEIGHT_ATOL_PER_STEP * s, (s, diff.max().item())
        assert diff.quantile(0.999).item() < WEIGHT_Q999, (s, diff.quantile(0.999).item())
    assert moved > 50 * WEIGHT_Q999  # not a trivial comparison: 3 steps move the median weight by ~lr
    # The logged losses are the global batch's (averaged over the ranks), not rank 0's half of it.
    ddp_log, one_log = read_csv(out / "whole" / "train_log.csv"), read_csv(single_out / "train_log.csv")
    assert [r["step"] for r in ddp_log] == [r["step"] for r in one_log] == [str(s) for s in range(1, STEPS + 1)]
    for r_ddp, r_one in zip(ddp_log, one_log):
        for k in ("total", "l1", "perceptual", "alpha", "3d", "pos", "grad_norm"):
            assert float(r_ddp[k]) == pytest.approx(float(r_one[k]), rel=LOSS_RTOL, abs=1e-9), (r_ddp["step"], k)


def test_two_process_run_resumes_exactly(ddp_runs):
    runs, out = ddp_runs
    whole, split = runs[0]["whole"], runs[0]["split"]
    assert whole["step"] == split["step"] == STEPS and split["stopped"] == "stop_at"
    assert torch.equal(whole["weights"][-1], split["weights"][-1])
    a = torch.load(out / "whole" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(out / "split" / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == STEPS
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    la, lb = read_csv(out / "whole" / "train_log.csv"), read_csv(out / "split" / "train_log.csv")
    assert [r["step"] for r in lb] == [str(s) for s in range(1, STEPS + 1)]
    assert [r["total"] for r in la] == [r["total"] for r in lb]


def test_one_rank_s_clock_stops_every_rank_at_the_same_step(ddp_runs):
    runs, out = ddp_runs
    for rank in (0, 1):
        clock = runs[rank]["clock"]
        assert (clock["step"], clock["stopped"]) == (CLOCK_STOP_AFTER, "time"), rank
        assert len(clock["weights"]) == CLOCK_STOP_AFTER, rank
    status = json.loads((out / "clock" / "status.json").read_text())
    assert (status["step"], status["stopped"]) == (CLOCK_STOP_AFTER, "time")
    assert torch.load(out / "clock" / "checkpoints" / "last.pt", weights_only=False)["step"] == CLOCK_STOP_AFTER


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_an_error(ddp_runs):
    runs, _ = ddp_runs
    for rank in (0, 1):
        nan = runs[rank]["nan"]
        assert "error" in nan, rank  # raised, not hung in the all-reduce
        assert len(nan["weights"]) == NAN_AT, rank  # no optimiser step on the NaN loss
        assert f"non-finite loss at step {NAN_AT}" in nan["error"]
    assert "on another process" in runs[0]["nan"]["error"] and "on process 1" in runs[1]["nan"]["error"]
