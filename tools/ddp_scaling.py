#!/usr/bin/env python3
"""Multi-GPU scaling check: N processes (torchrun, DDP) against one process of the same global batch.

    . tools/gpu_env.sh    # on the GPU machine (carried wheels, gsplat)
    python3 tools/ddp_scaling.py build/traindata --out $OUT/scaling --gpus 2 --per-gpu-batch 4 --steps 300

runs ``fhavatar train`` twice on the same data, config and schedule, from the same initial weights:

* ``1proc/``: one process on one GPU with batch ``gpus * per_gpu_batch``;
* ``<N>proc/``: ``torchrun --standalone --nproc_per_node N``, batch ``per_gpu_batch`` per process.

Both draw exactly the same samples at every step (``data.rank_plans``), so their loss curves differ only by
floating-point order, bf16 autocast and gsplat's atomic adds. Then it writes ``scaling.json``, ``scaling.md`` (a
table for weights/TRAINING.md) and ``scaling_losses.png`` (both runs' total and L1 curves): steady-state seconds
per step (the mean of the logged windows after ``--warmup`` steps), steps/s, samples/s, the speed-up of N
processes over one and the scaling efficiency = speed-up / N (1.0: perfect), and the loss curves' agreement.

Timing excludes start-up and validation: validation runs only before the first and after the last step
(``val_every=0``) on ``--val-frames`` frames, checkpoints only at the end. ``--only single|multi|report`` runs one
part (to split the work over several commands under a per-command time limit; ``report`` re-reads both logs).
``--device cpu`` runs the same on the CPU with gloo (a smoke test of this tool, with a tiny ``--config``).
``--export DIR`` copies the small results (the report, each run's logs, notes, config and status; no checkpoints)
into DIR, e.g. ``$OUT`` on the device machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.train.plot import plot_losses, read_log  # noqa: E402

# NVLink multicast stays off on shared multi-GPU hosts (a program using it can take the host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def train_command(args: argparse.Namespace, out: Path, batch: int, device: str) -> list[str]:
    sets = [f"batch_size={batch}", "val_every=0", f"data.val_frames={args.val_frames}", "checkpoint_every=0",
            f"log_every={args.log_every}", *args.set]
    cmd = ["-m", "fhavatar_cli", "--log-json", "train", *map(str, args.data), "--out", str(out), "--config",
           str(args.config), "--stop-at", str(args.steps), "--fresh", "--device", device]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_single(args: argparse.Namespace) -> None:
    env = {**os.environ, **SAFE_ENV}
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    cmd = [sys.executable, *train_command(args, args.out / "1proc", args.gpus * args.per_gpu_batch, args.device)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)


def run_multi(args: argparse.Namespace) -> None:
    env = {**os.environ, **SAFE_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.gpus),
           "--local-ranks-filter", "0",
           *train_command(args, args.out / f"{args.gpus}proc", args.per_gpu_batch, args.device)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)


def _steady(log: dict, warmup: int) -> float:
    """Mean seconds per step over the logged windows that start after ``warmup`` steps."""
    keep = log["step"] > warmup
    if not keep.any():
        raise SystemExit(f"no logged step after --warmup {warmup}: run more --steps")
    return float(log["sec_per_step"][keep].mean())


def report(args: argparse.Namespace) -> dict:
    runs = {"1proc": args.out / "1proc", "multi": args.out / f"{args.gpus}proc"}
    logs = {k: read_log(d / "train_log.csv") for k, d in runs.items()}
    notes = {k: json.loads((d / "notes.json").read_text()) for k, d in runs.items()}
    batch = args.gpus * args.per_gpu_batch
    t1, tn = _steady(logs["1proc"], args.warmup), _steady(logs["multi"], args.warmup)
    steps = sorted(set(logs["1proc"]["step"].tolist()) & set(logs["multi"]["step"].tolist()))
    rows = {k: {s: i for i, s in enumerate(log["step"].tolist())} for k, log in logs.items()}
    agree = {}
    for term in ("total", "l1", "alpha"):
        a = [logs["1proc"][term][rows["1proc"][s]] for s in steps]
        b = [logs["multi"][term][rows["multi"][s]] for s in steps]
        rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]
        agree[term] = {"mean_rel_diff": sum(rel) / len(rel), "max_rel_diff": max(rel),
                       "last_1proc": a[-1], "last_multi": b[-1]}
    result = {
        "gpus": args.gpus, "global_batch": batch, "per_gpu_batch": args.per_gpu_batch, "steps": args.steps,
        "warmup": args.warmup, "device": {k: n["device"] for k, n in notes.items()},
        "world_size": {k: n["world_size"] for k, n in notes.items()},
        "sec_per_step": {"1proc": t1, "multi": tn},
        "steps_per_s": {"1proc": 1 / t1, "multi": 1 / tn},
        "samples_per_s": {"1proc": batch / t1, "multi": batch / tn},
        "speedup": t1 / tn, "efficiency": t1 / tn / args.gpus, "logged_steps_compared": len(steps),
        "loss_agreement": agree,
    }
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    n = args.gpus
    md = [f"| run | processes x batch | s/step | steps/s | samples/s |", "| --- | --- | ---: | ---: | ---: |",
          f"| 1 process | 1 x {batch} | {t1:.3f} | {1 / t1:.2f} | {batch / t1:.1f} |",
          f"| {n} processes (DDP) | {n} x {args.per_gpu_batch} | {tn:.3f} | {1 / tn:.2f} | {batch / tn:.1f} |", "",
          f"Speed-up {t1 / tn:.2f}x with {n} processes, scaling efficiency {t1 / tn / n:.0%} (steps {args.warmup + 1}-"
          f"{args.steps}, same global batch of {batch}; device {notes['multi']['device']}).", "",
          "| term | mean rel. diff | max rel. diff | last window, 1 process | last window, DDP |",
          "| --- | ---: | ---: | ---: | ---: |"]
    md += [f"| {k} | {v['mean_rel_diff']:.1e} | {v['max_rel_diff']:.1e} | {v['last_1proc']:.4f} | "
           f"{v['last_multi']:.4f} |" for k, v in agree.items()]
    (args.out / "scaling.md").write_text("\n".join(md) + "\n")
    curves = {"step": logs["1proc"]["step"][[rows["1proc"][s] for s in steps]]}
    for k, label in (("1proc", "1 process"), ("multi", f"{n} processes")):
        for term in ("total", "l1"):
            curves[f"{term}, {label}"] = logs[k][term][[rows[k][s] for s in steps]]
    plot_losses(curves, [c for c in curves if c != "step"], args.out / "scaling_losses.png",
                title=f"1 process x batch {batch} vs {n} processes x batch {args.per_gpu_batch}", smooth_window=1)
    print("\n".join(md))
    return result


EXPORTED = ("train_log.csv", "val.csv", "notes.json", "config.json", "status.json", "losses.png")


def export(args: argparse.Namespace, dest: Path) -> None:
    """Copy the report and each run's small files (no checkpoints or weights) to ``dest``."""
    for run in ("1proc", f"{args.gpus}proc"):
        for name in EXPORTED:
            f = args.out / run / name
            if f.is_file():
                (dest / run).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest / run / name)
    for name in ("scaling.json", "scaling.md", "scaling_losses.png"):
        if (args.out / name).is_file():
            shutil.copy2(args.out / name, dest / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", type=Path, help="preprocessed / packed clip folders (as for fhavatar train)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "train_gpu.yaml")
    ap.add_argument("--gpus", type=int, default=2, help="processes of the DDP run (one GPU each)")
    ap.add_argument("--per-gpu-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50, help="steps left out of the timing (CUDA warm-up)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--val-frames", type=int, default=4)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--set", action="append", default=[], help="more TrainConfig overrides for both runs")
    ap.add_argument("--only", choices=("single", "multi", "report"), default=None)
    ap.add_argument("--export", type=Path, default=None, help="copy the report and the runs' logs here at the end")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "single"):
            run_single(args)
        if args.only in (None, "multi"):
            run_multi(args)
        if args.only in (None, "report"):
            report(args)
    finally:  # also what a failed run left (its logs say how far it got)
        if args.export is not None:
            export(args, args.export)


if __name__ == "__main__":
    main()
