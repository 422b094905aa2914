"""One process of the two-process CPU training test (tests/test_train_ddp.py), launched by ``torchrun``.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py CONFIG.json DATA OUT

Runs, in the one gloo process group that the first ``train`` call makes (as under ``torchrun -m fhavatar_cli train``)
and the next calls reuse:

* ``whole``: steps 0..S on a fresh folder;
* ``split``: the same, stopped after S - 1 steps and resumed to S (a second ``train`` call on the same folder);
* ``clock``: ``max_minutes`` set, and rank 1's clock alone jumps past it once 2 steps are done: every rank must stop
  after step 2 (before the fix rank 0 went on alone into the next step's collectives: a hang, or an error once rank 1
  had exited);
* ``nan``: rank 1's loss alone is NaN at step 1: every rank must raise FloatingPointError there.

Each rank records its flat weights after every optimiser step (a global optimiser hook, so the training loop is run
unchanged) and writes ``OUT/rank<r>.pt``: {run: {"weights": [(P,) per step], "step": int, "stopped": str}}
({"weights", "error": message} for ``nan``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

STEPS = 3  # S: optimiser steps of the "whole" run
CLOCK_STOP_AFTER = 2  # the "clock" run: steps done when rank 1's clock jumps
NAN_AT = 1  # the "nan" run: the step (0-based) whose loss is NaN on rank 1


class WeightRecorder:
    """Flat copies of the parameters after every optimiser step (of any optimiser), in order."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self._handle = register_optimizer_step_post_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.weights.append(torch.cat([p.detach().reshape(-1) for p in params]).clone())

    def take(self) -> list[torch.Tensor]:
        out, self.weights = self.weights, []
        return out

    def close(self) -> None:
        self._handle.remove()


def main(config_path: str, data: str, out: str) -> None:
    import torch.distributed as dist

    from synthetic_head import SphereHead

    from pipelines.train import load_train_config, train
    from pipelines.train import loop

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    cfg = load_train_config(config_path)
    head = SphereHead()
    rec = WeightRecorder()
    out_dir = Path(out)
    results: dict[str, dict] = {}

    def run(name: str, folder: str, **kw) -> None:
        res = train(cfg, [data], out_dir / folder, head=head, backend="torch", **kw)
        entry = results.setdefault(name, {"weights": []})
        entry["weights"] += rec.take()
        entry.update(step=res.step, stopped=res.stopped, weights_file=str(res.weights))

    run("whole", "whole", stop_at_step=STEPS)
    assert dist.is_initialized() and dist.get_backend() == "gloo"  # made by train, kept for the next calls
    run("split", "split", stop_at_step=STEPS - 1)
    run("split", "split", stop_at_step=STEPS)

    if rank == 1:  # this rank's clock alone says the time is up once CLOCK_STOP_AFTER steps are done
        loop.clock = lambda: time.monotonic() + (1e6 if len(rec.weights) >= CLOCK_STOP_AFTER else 0.0)
    run("clock", "clock", stop_at_step=STEPS + 2, max_minutes=60.0)
    loop.clock = time.monotonic

    if rank == 1:  # this rank's loss alone turns NaN at step NAN_AT
        compute_losses = loop.compute_losses

        def nan_losses(*args, **kw):
            total, terms = compute_losses(*args, **kw)
            return (total * float("nan"), terms) if len(rec.weights) >= NAN_AT else (total, terms)

        loop.compute_losses = nan_losses
    try:
        run("nan", "nan", stop_at_step=STEPS)
    except FloatingPointError as e:
        results["nan"] = {"error": str(e), "weights": rec.take()}

    rec.close()
    torch.save(results, out_dir / f"rank{rank}.pt")  # (the group is destroyed at exit)


if __name__ == "__main__":
    main(*sys.argv[1:4])
