"""Which kernels the pose step (``AvatarRig.pose_params``) spends its GPU time in: torch.profiler over eager calls.

    python3 bench/profile_pose.py --out $OUT [--batch 8] [--uv-size 256]      # $OUT/profile_pose_b<B>.{txt,json}

A template avatar of the ICT head (random identity and attributes, as ``bench_speed.make_rig``) is posed ``--reps``
times with random motion; the table lists the CUDA kernels by total device time (what a CUDA graph replays, minus
the launch gaps), the JSON the same rows plus the graph-replayed step's median time (``bench_speed.time_calls``: CUDA
events).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import make_rig, random_motion, time_calls  # noqa: E402
from pipelines.head.registry import load_head_model  # noqa: E402
from pipelines.uv.space import UVConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--uv-size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    device = torch.device("cuda")
    head = load_head_model("ict", device=device)
    rig = make_rig(head, UVConfig(size=a.uv_size), device)
    a.out.mkdir(parents=True, exist_ok=True)
    for B in a.batch:
        params = random_motion(load_head_model("ict"), B, seed=3).to(device)
        with torch.no_grad():
            for _ in range(3):
                rig.pose_params(params)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(a.reps):
                    rig.pose_params(params)
                torch.cuda.synchronize()
            graph = rig.pose_graph(B)
            replay = time_calls(lambda i: graph(params), device, a.reps, warmup=2)["median_ms"]
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        events.sort(key=lambda e: -e.device_time_total)
        rows = [{"kernel": e.key[:120], "calls_per_step": e.count / a.reps,
                 "us_per_step": e.device_time_total / a.reps} for e in events]
        total = sum(r["us_per_step"] for r in rows)
        lines = [f"pose step, batch {B}, {rig.num_gaussians} Gaussians: kernels {sum(r['calls_per_step'] for r in rows):.0f}"
                 f" a step, device time {total / 1000:.3f} ms, graph replay {replay:.3f} ms",
                 f"{'us/step':>9} {'calls':>6}  kernel"]
        lines += [f"{r['us_per_step']:9.1f} {r['calls_per_step']:6.1f}  {r['kernel']}" for r in rows[:40]]
        text = "\n".join(lines)
        print(text, flush=True)
        (a.out / f"profile_pose_b{B}.txt").write_text(text + "\n")
        (a.out / f"profile_pose_b{B}.json").write_text(json.dumps(
            {"batch": B, "num_gaussians": rig.num_gaussians, "device_ms": total / 1000, "graph_replay_ms": replay,
             "kernels": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
