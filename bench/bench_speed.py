"""Speed of the avatar pipeline on a GPU: reenact, turntable, reconstruct, tracking; before/after the pose-step work.

Run on the GPU machine (gsplat==1.5.3, imageio-ffmpeg, ffmpeg-python installed)::

    git show <commit>:pipelines/avatar/binding.py > build/bench_baseline/binding.py   # the code "before"
    git show <commit>:pipelines/animate.py        > build/bench_baseline/animate.py
    python bench/bench_speed.py --baseline build/bench_baseline --out results/speed.json

or, anywhere, a CPU dry run at tiny sizes (torch reference rasterizer, tiny network) that exercises every section::

    python bench/bench_speed.py --cpu-dry --baseline build/bench_baseline --out /tmp/speed_dry.json

What is timed (GPU: CUDA events around each call, median of ``--reps`` calls after warm-up; host wall clock where the
work ends on the CPU: readback, encoding, tracking):

* **reenact**: the steady state of ``pipelines.animate.render_sequence`` without encoding. Motion (``HeadParams`` for
  T frames) and cameras are precomputed on the device. Per call of ``batch`` frames: head-model LBS + Gaussian
  deformation (``AvatarRig.pose_params``) + gsplat render (``render_gaussians``). Variants: the **floor** (the bare
  render of the same, already posed Gaussians), ``baseline`` (the pose code of ``--baseline``), ``eager`` (this
  tree's ``pose_params``), ``graph`` (this tree's ``pose_graph``: the pose step replayed as a CUDA graph) and, with
  ``--compile``, ``compiled`` (``torch.compile(mode="reduce-overhead")`` of the pose step: what kernel fusion buys).
  Also the pose step alone, and the whole loop with readback to numpy (``render_sequence``, before and after).
* **scaling**: floor and graph e2e at 256/512/1024 px, and at UV sizes 128/256/512 (Gaussian counts).
* **turntable**: 360 frames at 512 px: render only, mp4 encoding only, both (before/after), and ``run_turntable``.
* **reconstruct**: ``network_inputs`` + ``FHAvatarNet`` forward (random weights, paper sizes) at batch 1 and 8.
* **tracking**: ``pipelines.tracking.fit.track`` (a CPU Levenberg-Marquardt solver) on synthetic landmarks.

Correctness first: the new pose step is compared with the baseline (relative L2 of means/quats/scales), the CUDA
graph with eager posing (outputs poisoned with NaN before the replay), and the rendered frames of the new and the
baseline loops; the script exits 1 if a check fails. Peak GPU memory (``torch.cuda.max_memory_allocated``) is
recorded for every measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.avatar.artifact import Avatar, save_avatar  # noqa: E402
from pipelines.avatar.binding import AvatarRig, Gaussians  # noqa: E402
from pipelines.avatar.maps import template_maps  # noqa: E402
from pipelines.core.camera import (  # noqa: E402
    DEFAULT_RADIUS,
    Camera,
    normalized_intrinsics,
    orbit_cameras,
    project_points,
    to_pixel_intrinsics,
    world_to_camera,
)
from pipelines.head.base import HeadModel, HeadParams  # noqa: E402
from pipelines.head.registry import load_head_model  # noqa: E402
from pipelines.render import render_gaussians  # noqa: E402
from pipelines.avatar.head import head_record  # noqa: E402
from pipelines.uv.space import UVConfig, load_or_build_uv_space  # noqa: E402

# Checks: new pose step vs baseline (float32 rounding of the same maths, amplified on ~1 mm triangles for the
# frames), graph vs eager (same kernels: bitwise equal expected), frames of the new vs baseline loop (uint8).
TOL = {"means_rel": 1e-5, "scales_rel": 1e-5, "quats_rel": 1e-4, "graph_max_abs": 1e-6, "frame_mean_abs": 0.05,
       "frame_max_abs": 8}


@dataclass
class Settings:
    """Sizes of one run (GPU defaults; ``dry()`` shrinks everything for the CPU)."""

    device: str = "cuda"
    backend: str = "gsplat"
    uv_size: int = 256
    size: int = 512
    batches: tuple[int, ...] = (1, 8)
    motion_frames: int = 240
    reps: int = 100
    warmup: int = 10
    pipeline_frames: int = 240
    sizes: tuple[int, ...] = (256, 512, 1024)
    uv_sizes: tuple[int, ...] = (128, 256, 512)
    turntable_frames: int = 360
    net_batches: tuple[int, ...] = (1, 8)
    net_reps: int = 20
    tiny_network: bool = False
    track_frames: int = 500

    @classmethod
    def dry(cls) -> "Settings":
        return cls(device="cpu", backend="torch", uv_size=64, size=64, batches=(1, 2), motion_frames=8, reps=2,
                   warmup=1, pipeline_frames=4, sizes=(32, 64), uv_sizes=(64,), turntable_frames=6, net_batches=(1,),
                   net_reps=1, tiny_network=True, track_frames=12)


# ----------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], device: torch.device, reps: int, warmup: int) -> dict:
    """Per-call time of ``fn(i)`` (i = call number): median/p10/p90 ms (CUDA events on the GPU, perf_counter on the
    CPU) and the mean wall time per call of the whole timed loop (a throughput cross-check)."""
    for i in range(warmup):
        fn(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        t0 = time.perf_counter()
        for i, (a, b) in enumerate(ev):
            a.record()
            fn(warmup + i)
            b.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        ms = [a.elapsed_time(b) for a, b in ev]
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        ms = []
        t0 = time.perf_counter()
        for i in range(reps):
            t = time.perf_counter()
            fn(warmup + i)
            ms.append(1000.0 * (time.perf_counter() - t))
        wall = time.perf_counter() - t0
        peak = float("nan")
    q = np.percentile(ms, [10, 50, 90])
    return {"median_ms": float(q[1]), "p10_ms": float(q[0]), "p90_ms": float(q[2]),
            "wall_ms_per_call": 1000.0 * wall / reps, "reps": reps, "peak_mib": peak}


def time_wall(fn: Callable[[], object], device: torch.device, reps: int) -> dict:
    """Host wall clock of whole runs (work that ends on the CPU): all runs, their median and min, in seconds."""
    runs = []
    for _ in range(reps):
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"runs_s": runs, "median_s": statistics.median(runs), "min_s": min(runs), "peak_mib": peak}


# ------------------------------------------------------------------------------------------------- inputs
def load_module(name: str, path: Path):
    """Import a file as ``name`` (e.g. ``pipelines.avatar._baseline_binding`` so its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def smooth(T: int, dim: int, gen: torch.Generator, scale: float, width: float = 10.0) -> torch.Tensor:
    """(T, dim) smooth random trajectories (Gaussian-filtered noise), std ~ scale."""
    k = torch.exp(-0.5 * (torch.arange(-30, 31, dtype=torch.float32) / width) ** 2)
    raw = torch.randn(dim, 1, T + 60, generator=gen)
    out = torch.nn.functional.conv1d(raw, k.view(1, 1, -1))[:, 0, :T].T
    return out / k.norm() * scale


def random_motion(head: HeadModel, T: int, seed: int) -> HeadParams:
    """A talking-head-like sequence: smooth expression, head rotation (~10 deg), jaw and gaze."""
    g = torch.Generator().manual_seed(seed)
    jaw = torch.zeros(T, 3)
    jaw[:, 0] = (0.15 + smooth(T, 1, g, 0.12)[:, 0]).clamp(0.0, 0.45)
    gaze = smooth(T, 3, g, 0.1) * torch.tensor([1.0, 1.0, 0.0])
    return HeadParams(
        shape=torch.zeros(T, head.n_shape),
        expression=smooth(T, head.n_expr, g, 0.6),
        rotation=smooth(T, 3, g, 1.0) * torch.deg2rad(torch.tensor([8.0, 15.0, 4.0])),
        translation=smooth(T, 3, g, 0.01),
        neck=torch.zeros(T, 3),
        jaw=jaw,
        eyes=torch.cat([gaze, gaze], 1),
    )


def slice_params(p: HeadParams, s: int, n: int) -> HeadParams:
    return HeadParams(**{k: v[s:s + n] for k, v in p.to_dict().items()})


def frontal_cameras(head: HeadModel, T: int, yaw_amplitude: float = 20.0) -> Camera:
    """T cameras at the default radius around the head centre, swinging +-yaw_amplitude degrees."""
    yaw = yaw_amplitude * torch.sin(torch.linspace(0, 2 * math.pi, T))
    target = tuple(float(x) for x in head.head_center().cpu().tolist())
    c2w = orbit_cameras(yaw, torch.zeros(T), radius=DEFAULT_RADIUS, target=target)
    return Camera(normalized_intrinsics(batch=T), c2w)


def make_rig(head: HeadModel, uv_size: int, device: torch.device, rig_cls=AvatarRig, seed: int = 0) -> AvatarRig:
    """A template avatar with a random identity, random local rotations and small offsets (so no term is zero)."""
    uv = load_or_build_uv_space(head, UVConfig(size=uv_size), device=device)
    g = torch.Generator().manual_seed(seed)
    maps = template_maps(uv.to("cpu"))
    K = uv.size
    maps[:, 3:7] = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
                                                 + 0.3 * torch.randn(1, 4, K, K, generator=g), dim=1)
    maps[:, 11:14] = 0.001 * torch.randn(1, 3, K, K, generator=g)
    shape = 0.5 * torch.randn(1, head.n_shape, generator=g)
    return rig_cls(head, uv, maps.to(device), shape.to(device))


def render(g: Gaussians, viewmats, Ks, size: int, bg, backend: str):
    return render_gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, size, size, bg,
                            backend=backend)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def canon_quat(q: torch.Tensor) -> torch.Tensor:
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0)


# --------------------------------------------------------------------------------------------------- sections
class Bench:
    def __init__(self, cfg: Settings, baseline_dir: Path | None, compile_pose: bool, log: Callable[[str], None]):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.log = log
        self.compile_pose = compile_pose
        self.results: dict = {"checks": {}, "sections": {}}
        t = time.perf_counter()
        self.head_cpu = load_head_model("embedded")
        self.results["head_build_s"] = time.perf_counter() - t
        self.head = load_head_model("embedded", device=self.device)
        self.base_binding = self.base_animate = None
        if baseline_dir is not None:
            self.base_binding = load_module("pipelines.avatar._baseline_binding", baseline_dir / "binding.py")
            self.base_animate = load_module("pipelines._baseline_animate", baseline_dir / "animate.py")
        self.motion = random_motion(self.head_cpu, cfg.motion_frames, seed=1).to(self.device)
        # On the device, like the motion: the baseline loop indexes the cameras with device tensors.
        self.cams = frontal_cameras(self.head_cpu, cfg.motion_frames).to(self.device)
        t = time.perf_counter()
        self.rig = make_rig(self.head, cfg.uv_size, self.device)
        sync(self.device)
        self.results["rig_build_s"] = time.perf_counter() - t
        self.results["num_gaussians"] = self.rig.num_gaussians
        self.results["num_vertices"] = int(self.head.v_template.shape[0])
        self.results["num_faces"] = int(self.head.faces.shape[0])
        self.base_rig = make_rig(self.head, cfg.uv_size, self.device, self.base_binding.AvatarRig) \
            if self.base_binding else None

    # -------------------------------------------------------------------------------------- correctness
    def checks(self) -> bool:
        cfg, ok = self.cfg, True
        B = max(cfg.batches)
        g = torch.Generator().manual_seed(7)
        p = random_motion(self.head_cpu, B, seed=int(torch.randint(0, 10**6, (1,), generator=g))).to(self.device)
        res = self.results["checks"]
        with torch.no_grad():
            new = self.rig.pose_params(p)
            if self.base_rig is not None:
                old = self.base_rig.pose_params(p)
                res["pose_vs_baseline"] = {
                    "means_rel": rel(new.means, old.means),
                    "scales_rel": rel(new.scales, old.scales),
                    "quats_rel": rel(canon_quat(new.quats), canon_quat(old.quats)),
                    "opacities_equal": bool(torch.equal(new.opacities, old.opacities)),
                    "colors_equal": bool(torch.equal(new.colors, old.colors)),
                }
                r = res["pose_vs_baseline"]
                ok &= r["means_rel"] < TOL["means_rel"] and r["scales_rel"] < TOL["scales_rel"]
                ok &= r["quats_rel"] < TOL["quats_rel"] and r["opacities_equal"] and r["colors_equal"]
            # posed_vertices == head(params) with the avatar's shape
            pp = p.to_dict()
            pp["shape"] = self.rig.shape.expand(B, -1)
            ref = self.head(HeadParams(**pp))
            res["posed_vertices_rel"] = rel(self.rig.posed_vertices(p), ref)
            ok &= res["posed_vertices_rel"] < TOL["means_rel"]
            if self.device.type == "cuda":
                graph = self.rig.pose_graph(B)
                for t in (graph.out.means, graph.out.quats, graph.out.scales):
                    t.fill_(float("nan"))  # poison: every element must be rewritten by the replay
                got = graph(p)
                res["graph_vs_eager_max_abs"] = max(float((getattr(got, k) - getattr(new, k)).abs().max())
                                                    for k in ("means", "quats", "scales"))
                res["graph_all_finite"] = bool(all(torch.isfinite(getattr(got, k)).all()
                                                   for k in ("means", "quats", "scales")))
                ok &= res["graph_vs_eager_max_abs"] <= TOL["graph_max_abs"] and res["graph_all_finite"]
        if self.base_animate is not None:
            from pipelines.animate import render_sequence

            n = min(2 * B, cfg.motion_frames)
            mp, cams = slice_params(self.motion, 0, n), self.cams[torch.arange(n)]
            a = list(render_sequence(self.rig, mp, cams, cfg.size, backend=cfg.backend, batch_size=B))
            b = list(self.base_animate.render_sequence(self.base_rig, mp, cams, cfg.size, backend=cfg.backend,
                                                       batch_size=B))
            d = np.stack([np.abs(x.rgb.astype(np.int16) - y.rgb.astype(np.int16)) for x, y in zip(a, b)])
            da = np.stack([np.abs(x.alpha.astype(np.int16) - y.alpha.astype(np.int16)) for x, y in zip(a, b)])
            res["frames_vs_baseline"] = {"frames": len(a), "rgb_mean_abs": float(d.mean()), "rgb_max_abs": int(d.max()),
                                         "alpha_mean_abs": float(da.mean()), "alpha_max_abs": int(da.max()),
                                         "alpha_coverage": float(np.mean([x.alpha.mean() / 255 for x in a]))}
            r = res["frames_vs_baseline"]
            ok &= len(a) == len(b) == n and r["rgb_mean_abs"] < TOL["frame_mean_abs"]
            ok &= r["rgb_max_abs"] <= TOL["frame_max_abs"] and r["alpha_coverage"] > 0.05
        res["pass"] = bool(ok)
        self.log(f"checks: {'PASS' if ok else 'FAIL'} {json.dumps(res)}")
        return bool(ok)

    # -------------------------------------------------------------------------------------- reenact
    def _batch_inputs(self, B: int, size: int):
        """Per-call inputs cycling through the motion: params slices, view matrices, intrinsics, backgrounds."""
        cfg = self.cfg
        n = max(1, cfg.motion_frames // B)
        params = [slice_params(self.motion, i * B, B) for i in range(n)]
        vm = world_to_camera(self.cams.c2w.to(self.device))
        Ks = to_pixel_intrinsics(self.cams.K.to(self.device), size, size)
        views = [(vm[i * B:(i + 1) * B], Ks[i * B:(i + 1) * B]) for i in range(n)]
        bg = torch.ones(B, 3, device=self.device)
        return params, views, bg

    def _posers(self, rig: AvatarRig, B: int) -> dict[str, Callable[[HeadParams], Gaussians]]:
        posers: dict[str, Callable] = {"eager": rig.pose_params}
        if self.base_rig is not None:
            posers = {"baseline": self.base_rig.pose_params, **posers}
        if self.device.type == "cuda":
            posers["graph"] = rig.pose_graph(B)
        return posers

    def reenact(self, compiled: bool = False) -> None:
        cfg, out = self.cfg, {}
        for B in cfg.batches:
            params, views, bg = self._batch_inputs(B, cfg.size)
            row: dict = {}
            with torch.no_grad():
                posed = [self.rig.pose_params(p) for p in params[:8]]  # floor inputs: several sets, cycled
                row["floor"] = time_calls(lambda i: render(posed[i % len(posed)], *views[i % len(posed)], cfg.size,
                                                           bg, cfg.backend), self.device, cfg.reps, cfg.warmup)
                del posed
                posers = {"compiled": compiled_poser(self.rig)} if compiled else self._posers(self.rig, B)
                for name, poser in posers.items():
                    try:
                        row[f"pose_{name}"] = time_calls(lambda i: poser(params[i % len(params)]), self.device,
                                                         cfg.reps, cfg.warmup)

                        def e2e(i, poser=poser):
                            g = poser(params[i % len(params)])
                            return render(g, *views[i % len(views)], cfg.size, bg, cfg.backend)

                        row[f"e2e_{name}"] = time_calls(e2e, self.device, cfg.reps, cfg.warmup)
                    except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                        row[f"e2e_{name}"] = {"error": f"{type(e).__name__}: {e}"}
                        self.log(traceback.format_exc())
            for k, v in row.items():
                if "median_ms" in v:
                    v["fps"] = 1000.0 * B / v["median_ms"]
            out[f"batch{B}"] = row
            self.log(f"reenact batch {B}: " + ", ".join(f"{k} {v.get('median_ms', float('nan')):.3f} ms"
                                                        for k, v in row.items()))
        self.results["sections"]["compiled" if compiled else "reenact"] = out

    def compiled(self) -> None:
        """The reenact measurement with the pose step under torch.compile (GPU; last, as compiling takes a while)."""
        if self.device.type != "cuda":
            self.results["sections"]["compiled"] = {"skipped": "GPU only"}
            return
        t = time.perf_counter()
        self.reenact(compiled=True)
        self.results["sections"]["compiled"]["seconds_with_compile"] = time.perf_counter() - t

    def pipeline(self) -> None:
        """The whole loop, readback to numpy included (render_sequence), before and after."""
        from pipelines.animate import render_sequence

        cfg, out = self.cfg, {}
        T = min(cfg.pipeline_frames, cfg.motion_frames)
        mp, cams = slice_params(self.motion, 0, T), self.cams[torch.arange(T)]
        loops = {"after": (render_sequence, self.rig)}
        if self.base_animate is not None:
            loops = {"before": (self.base_animate.render_sequence, self.base_rig), **loops}
        for B in cfg.batches:
            for name, (loop, rig) in loops.items():
                def run(loop=loop, rig=rig):
                    for _ in loop(rig, mp, cams, cfg.size, backend=cfg.backend, batch_size=B):
                        pass

                run()  # warm-up (graph capture, allocator)
                r = time_wall(run, self.device, 3)
                r["fps"] = T / r["median_s"]
                out[f"batch{B}_{name}"] = r
                self.log(f"render_sequence batch {B} {name}: {r['fps']:.0f} frames/s")
        self.results["sections"]["pipeline"] = {"frames": T, **out}

    # -------------------------------------------------------------------------------------- scaling
    def scaling(self) -> None:
        cfg, out = self.cfg, {"resolution": {}, "gaussians": {}}
        B = max(cfg.batches)

        def measure(rig: AvatarRig, size: int) -> dict:
            params, views, bg = self._batch_inputs(B, size)
            with torch.no_grad():
                posed = [rig.pose_params(p) for p in params[:8]]
                floor = time_calls(lambda i: render(posed[i % len(posed)], *views[i % len(posed)], size, bg,
                                                    cfg.backend), self.device, cfg.reps // 2, cfg.warmup)
                del posed
                poser = rig.pose_graph(B) if self.device.type == "cuda" else rig.pose_params
                e2e = time_calls(lambda i: render(poser(params[i % len(params)]), *views[i % len(views)], size, bg,
                                                  cfg.backend), self.device, cfg.reps // 2, cfg.warmup)
            return {"floor": floor, "e2e": e2e, "gaussians": rig.num_gaussians, "size": size,
                    "ratio": e2e["median_ms"] / floor["median_ms"]}

        for size in cfg.sizes:
            out["resolution"][str(size)] = r = measure(self.rig, size)
            self.log(f"scaling {size}px: floor {r['floor']['median_ms']:.3f} ms, e2e {r['e2e']['median_ms']:.3f} ms")
        for K in cfg.uv_sizes:
            rig = self.rig if K == cfg.uv_size else make_rig(self.head, K, self.device)
            out["gaussians"][str(K)] = r = measure(rig, cfg.size)
            self.log(f"scaling UV {K} ({r['gaussians']} Gaussians): floor {r['floor']['median_ms']:.3f} ms, "
                     f"e2e {r['e2e']['median_ms']:.3f} ms")
            del rig
        self.results["sections"]["scaling"] = {"batch": B, **out}

    # -------------------------------------------------------------------------------------- turntable
    def turntable(self) -> None:
        from pipelines.animate import render_sequence, write_frames
        from pipelines.turntable import TurntableConfig, run_turntable, turntable_cameras
        from pipelines.video import ffmpeg_exe, write_video

        cfg, out = self.cfg, {}
        tt = TurntableConfig(frames=cfg.turntable_frames, size=cfg.size)
        exe = ffmpeg_exe()
        out["ffmpeg"] = subprocess.run([exe, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
        target = tuple(float(x) for x in self.head.head_center().tolist())
        cams = turntable_cameras(tt, target).to(self.device)
        params = self.head.zero_params(1)
        tmp = Path(tempfile.mkdtemp(prefix="bench_speed_"))
        loops = {"after": (render_sequence, self.rig)}
        if self.base_animate is not None:
            loops = {"before": (self.base_animate.render_sequence, self.base_rig), **loops}
        frames = None
        for name, (loop, rig) in loops.items():
            def render_only(loop=loop, rig=rig):
                return [f.rgb for f in loop(rig, params, cams, tt.size, tt.background, cfg.backend, tt.batch_size)]

            frames = render_only()  # warm-up
            out[f"render_only_{name}"] = time_wall(render_only, self.device, 3)

            def both(loop=loop, rig=rig):
                fr = loop(rig, params, cams, tt.size, tt.background, cfg.backend, tt.batch_size)
                return write_frames(fr, tmp / f"tt_{name}.mp4", None, tt.fps)

            out[f"render_encode_{name}"] = time_wall(both, self.device, 3)
        out["encode_only"] = time_wall(lambda: write_video(tmp / "enc.mp4", iter(frames), fps=tt.fps), self.device, 3)
        # The whole command: load the avatar file, head model, UV space, rig, render, encode.
        avatar_path = tmp / "avatar.npz"
        save_avatar(avatar_path, template_avatar(self.head, self.rig.uv))
        n = run_turntable(avatar_path, tmp / "run.mp4", None, tt, backend=cfg.backend, device=self.cfg.device)
        out["run_turntable"] = time_wall(
            lambda: run_turntable(avatar_path, tmp / "run.mp4", None, tt, backend=cfg.backend, device=self.cfg.device),
            self.device, 3)
        out["frames"], out["mp4_bytes"] = n, (tmp / "run.mp4").stat().st_size
        self.results["sections"]["turntable"] = out
        self.log("turntable: " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in out.items()
                                           if isinstance(v, dict)))

    # -------------------------------------------------------------------------------------- reconstruct
    def reconstruct(self) -> None:
        from pipelines.network.config import NetworkConfig
        from pipelines.network.inference import network_inputs
        from pipelines.network.weights import load_network

        cfg, out = self.cfg, {}
        ncfg = NetworkConfig.tiny(uv_size=cfg.uv_size) if cfg.tiny_network else NetworkConfig()
        net = load_network("random", self.cfg.device, config=ncfg)
        uv = load_or_build_uv_space(self.head, UVConfig(size=ncfg.uv_size), device=self.device)
        out["config"] = {"uv_size": ncfg.uv_size, "image_size": ncfg.image_size,
                         "parameters": sum(p.numel() for p in net.parameters())}
        g = torch.Generator().manual_seed(3)
        for B in cfg.net_batches:
            image = torch.rand(B, 3, ncfg.image_size, ncfg.image_size, generator=g).to(self.device)
            params = random_motion(self.head_cpu, B, seed=5).to(self.device)
            target = tuple(float(x) for x in self.head.head_center().tolist())
            c2w = orbit_cameras(torch.zeros(B), torch.zeros(B), radius=DEFAULT_RADIUS, target=target).to(self.device)
            K = normalized_intrinsics(batch=B, device=self.device)

            def forward(_i):
                inp = network_inputs(self.head, uv, params, c2w)
                return net(image, inp["p"], inp["valid"], inp["w2c"], K, with_aux=False).A

            reps = cfg.net_reps if B == 1 else max(1, cfg.net_reps // 2)
            with torch.no_grad():
                r = time_calls(forward, self.device, reps, max(1, cfg.warmup // 3))
                r["portraits_per_s"] = 1000.0 * B / r["median_ms"]
                out[f"batch{B}"] = r
                if self.device.type == "cuda":
                    try:
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            rb = time_calls(forward, self.device, reps, max(1, cfg.warmup // 3))
                        rb["portraits_per_s"] = 1000.0 * B / rb["median_ms"]
                        out[f"batch{B}_bf16_autocast"] = rb
                    except Exception as e:  # noqa: BLE001
                        out[f"batch{B}_bf16_autocast"] = {"error": f"{type(e).__name__}: {e}"}
            self.log(f"reconstruct batch {B}: {r['median_ms']:.2f} ms ({r['portraits_per_s']:.1f} portraits/s)")
        self.results["sections"]["reconstruct"] = out

    # -------------------------------------------------------------------------------------- tracking
    def tracking(self) -> None:
        from pipelines.tracking.config import TrackingConfig
        from pipelines.tracking.fit import track

        cfg, out = self.cfg, {}
        head = self.head_cpu
        T = cfg.track_frames
        motion = random_motion(head, T, seed=9)
        motion.shape = torch.zeros(T, head.n_shape)
        K = normalized_intrinsics()[0]
        target = tuple(float(x) for x in head.head_center().tolist())
        c2w = orbit_cameras(torch.zeros(1), torch.zeros(1), radius=DEFAULT_RADIUS, target=target)[0]
        with torch.no_grad():
            pts = head.landmarks_3d(head(motion))
            uv, _ = project_points(pts, world_to_camera(c2w[None]).expand(T, 4, 4), K.expand(T, 3, 3))
        lmk = np.full((T, 478, 2), np.nan, dtype=np.float64)
        mp = head.landmarks.mp_index.numpy()
        lmk[:, mp[mp < 478]] = uv.numpy()[:, mp < 478] * 512
        for threads in (1, 0):  # the tracker's default (1 thread), then torch's default thread count
            t = time.perf_counter()
            result = track(head, lmk, np.ones(T, bool), K, c2w, image_size=512,
                           config=TrackingConfig(num_threads=threads))
            s = time.perf_counter() - t
            out[f"threads_{threads or torch.get_num_threads()}"] = {
                "seconds": s, "frames_per_s": T / s, "mean_landmark_error_px": float(np.nanmean(result.lmk_error_px))}
            self.log(f"tracking {T} frames, {threads or torch.get_num_threads()} threads: {s:.2f} s ({T / s:.0f} "
                     f"frames/s), landmark error {np.nanmean(result.lmk_error_px):.2f} px")
        out["frames"] = T
        out["gpu_path"] = ("none: track() builds its tensors on the CPU (float64 normal equations, per-frame block "
                           "solves); there is no device argument")
        self.results["sections"]["tracking"] = out


def template_avatar(head: HeadModel, uv) -> Avatar:
    """A template avatar file for the turntable command (neutral source frame, frontal camera)."""
    params = {k: v.cpu().numpy() for k, v in head.zero_params(1).to_dict().items()}
    return Avatar(template_maps(uv.to("cpu"))[0].numpy(), np.zeros((3, uv.size, uv.size), np.float32),
                  np.zeros(head.n_shape, np.float32), params, normalized_intrinsics()[0].numpy(),
                  orbit_cameras(torch.zeros(1), torch.zeros(1))[0].numpy(),
                  head_record(head), {"method": "template"})


def compiled_poser(rig: AvatarRig) -> Callable[[HeadParams], Gaussians]:
    """``torch.compile`` (inductor + CUDA graphs) of the pose step: how much kernel fusion would add."""
    shape = rig.shape[:1]

    def pose(expression, rotation, translation, neck, jaw, eyes):
        B = expression.shape[0]
        p = HeadParams(shape.expand(B, -1), expression, rotation, translation, neck, jaw, eyes)
        g = rig.pose_params(p)
        return g.means, g.quats, g.scales, g.opacities, g.colors

    fn = torch.compile(pose, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def call(p: HeadParams) -> Gaussians:
        torch.compiler.cudagraph_mark_step_begin()
        return Gaussians(*fn(p.expression, p.rotation, p.translation, p.neck, p.jaw, p.eyes))

    return call


# ------------------------------------------------------------------------------------------------------ report
def table(results: dict) -> str:
    lines = []
    sec = results["sections"]
    for key in ("reenact", "compiled"):
        if not isinstance(sec.get(key), dict) or not any(k.startswith("batch") for k in sec[key]):
            continue
        lines.append(f"{key} ({results['num_gaussians']} Gaussians, {results['settings']['size']} px), per call:")
        lines.append(f"{'batch':>5s} {'variant':18s} {'median ms':>10s} {'p90 ms':>8s} {'frames/s':>9s} "
                     f"{'x floor':>8s} {'peak MiB':>9s}")
        for bk, row in sec[key].items():
            if not bk.startswith("batch"):
                continue
            floor = row["floor"]["median_ms"]
            for name, r in row.items():
                if "median_ms" not in r:
                    lines.append(f"{bk[5:]:>5s} {name:18s} {r.get('error', '?')[:60]}")
                    continue
                ratio = r["median_ms"] / floor if name.startswith("e2e") or name == "floor" else float("nan")
                lines.append(f"{bk[5:]:>5s} {name:18s} {r['median_ms']:10.3f} {r['p90_ms']:8.3f} {r['fps']:9.0f} "
                             f"{ratio:8.2f} {r['peak_mib']:9.0f}")
    if "pipeline" in sec:
        lines.append(f"render_sequence ({sec['pipeline']['frames']} frames, readback to numpy):")
        for k, r in sec["pipeline"].items():
            if isinstance(r, dict):
                lines.append(f"  {k:18s} {r['fps']:8.0f} frames/s  peak {r['peak_mib']:.0f} MiB")
    if "scaling" in sec:
        s = sec["scaling"]
        lines.append(f"scaling (batch {s['batch']}), per frame: size/UV  gaussians  floor ms  e2e ms  ratio")
        for kind in ("resolution", "gaussians"):
            for k, r in s[kind].items():
                b = s["batch"]
                lines.append(f"  {kind[:3]} {k:>5s} {r['gaussians']:9d} {r['floor']['median_ms'] / b:9.4f} "
                             f"{r['e2e']['median_ms'] / b:8.4f} {r['ratio']:6.2f}  peak {r['e2e']['peak_mib']:.0f} MiB")
    if "turntable" in sec:
        t = sec["turntable"]
        lines.append(f"turntable ({t.get('frames')} frames): " + ", ".join(
            f"{k} {v['median_s']:.3f} s" for k, v in t.items() if isinstance(v, dict)))
    if "reconstruct" in sec:
        for k, r in sec["reconstruct"].items():
            if isinstance(r, dict) and "median_ms" in r:
                lines.append(f"reconstruct {k:22s} {r['median_ms']:8.2f} ms  {r['portraits_per_s']:7.1f} portraits/s"
                             f"  peak {r['peak_mib']:.0f} MiB")
    if "tracking" in sec:
        for k, r in sec["tracking"].items():
            if isinstance(r, dict):
                lines.append(f"tracking {k:12s} {r['seconds']:7.2f} s  {r['frames_per_s']:7.1f} frames/s  "
                             f"err {r['mean_landmark_error_px']:.2f} px")
    return "\n".join(lines)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--cpu-dry", action="store_true", help="tiny sizes on the CPU (torch rasterizer)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="folder with the 'before' binding.py and animate.py (git show COMMIT:...)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the pose step (GPU)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="sections: reenact pipeline scaling turntable reconstruct tracking")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement")
    args = parser.parse_args()

    cfg = Settings.dry() if args.cpu_dry else Settings()
    if args.reps:
        cfg.reps = args.reps
    if not args.cpu_dry:
        if not torch.cuda.is_available():
            print("no CUDA device: run on the GPU machine, or pass --cpu-dry", file=sys.stderr)
            return 2
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    def log(msg: str) -> None:
        print(msg, flush=True)

    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if not args.cpu_dry else platform.processor() or "cpu",
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "mode": "cpu-dry" if args.cpu_dry else "gpu",
        "files": {p: file_digest(ROOT / p) for p in ("pipelines/avatar/binding.py", "pipelines/animate.py")},
        "baseline_files": {p.name: file_digest(p) for p in sorted(args.baseline.glob("*.py"))} if args.baseline else {},
    }
    if not args.cpu_dry:
        import gsplat

        meta["gsplat"] = gsplat.__version__
        meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    t = time.perf_counter()
    bench = Bench(cfg, args.baseline, args.compile, log)
    if not args.cpu_dry:  # first gsplat call (loads, or JIT-compiles, the CUDA extension)
        g = bench.rig.pose_params(slice_params(bench.motion, 0, 1))
        vm = world_to_camera(bench.cams.c2w[:1].to(bench.device))
        render(g, vm, to_pixel_intrinsics(bench.cams.K[:1].to(bench.device), 64, 64), 64, None, cfg.backend)
        sync(bench.device)
    meta["setup_s"] = time.perf_counter() - t
    bench.results.update({"meta": meta, "settings": cfg.__dict__, "tolerances": TOL})
    log(json.dumps(meta))

    ok = bench.checks()
    sections = args.only or ["reenact", "pipeline", "scaling", "turntable", "reconstruct", "tracking"]
    if args.compile and "compiled" not in sections:
        sections.append("compiled")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in sections:
        t = time.perf_counter()
        try:
            getattr(bench, name)()
        except Exception as e:  # noqa: BLE001 - record and go on: one broken section must not lose the rest
            bench.results["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(traceback.format_exc())
        bench.results.setdefault("section_s", {})[name] = time.perf_counter() - t
        args.out.write_text(json.dumps(bench.results, indent=2, default=str))
    log(table(bench.results))
    log(("PASS" if ok else "FAIL") + f": results in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
