"""Speed of the avatar pipeline on a GPU: reenact, turntable, reconstruct, tracking; pruning's quality bound.

Run on the GPU machine (gsplat==1.5.3; ``. tools/gpu_env.sh`` first), the issue-16 run::

    python3 bench/bench_speed.py --val-data build/val16 --out $OUT     # $OUT/bench_speed.json + bench_speed.md

(``build/val16``: the validation clips' preprocessed folders, frame 0 and 8 driven frames each; ``--head-model``
defaults to ict; ``--baseline DIR`` adds the pose/loop code of an older commit, ``git show C:pipelines/avatar/
binding.py > DIR/binding.py`` and the same for ``pipelines/animate.py``). Anywhere, the bench's logic at tiny sizes on
the CPU (torch reference rasterizer; ``tests/test_bench_speed.py`` runs it)::

    python bench/bench_speed.py --smoke --out /tmp/speed_smoke

Sections, in order (``--only``): **prune** (validation clips: PSNR of pruned vs whole avatars; adds the first clip's
avatars, whole and pruned, to the rigs timed below), **gsplat_options** (floor of each packed / tile-size layout;
the fastest is used from then on), **reenact**, **stages** (CUDA events between the stages of one eager call:
input copies, skinning, attribute assembly, render and gsplat's own projection / intersection + sort / rasterize,
readback), **pipeline**, **scaling**; also turntable, reconstruct, tracking, compiled on request.

What is timed (GPU: CUDA events around each call, median of ``--reps`` calls after warm-up; host wall clock where the
work ends on the CPU: readback, encoding, tracking):

* **reenact**: for each rig (a random template; with ``--val-data`` a real avatar, whole and pruned) the steady
  state of ``pipelines.animate.render_sequence`` without encoding. Motion (``HeadParams`` for
  T frames) and cameras are precomputed on the device. Per call of ``batch`` frames: head-model LBS + Gaussian
  deformation (``AvatarRig.pose_params``) + gsplat render (``render_gaussians``). Variants: the **floor** (the bare
  render of the same, already posed Gaussians), ``baseline`` (the pose code of ``--baseline``), ``eager`` (this
  tree's ``pose_params``), ``graph`` (this tree's ``pose_graph``: the pose step replayed as a CUDA graph),
  ``overlap`` (the product loop: the next call's pose graph on a second stream while this call renders) and, with
  ``--compile``, ``compiled`` (``torch.compile(mode="reduce-overhead")`` of the pose step: what kernel fusion buys).
  Also the pose step alone, and the whole loop with readback to numpy (``render_sequence``, before and after).
* **scaling**: floor and graph e2e at 256/512/1024 px, and at UV sizes 128/256/512 (Gaussian counts).
* **turntable**: 360 frames at 512 px: render only, mp4 encoding only, both (before/after), and ``run_turntable``.
* **reconstruct**: ``network_inputs`` + ``FHAvatarNet`` forward (random weights, paper sizes) at batch 1 and 8.
* **tracking**: ``pipelines.tracking.fit.track`` (a CPU Levenberg-Marquardt solver) on synthetic landmarks.

Correctness first: the new pose step is compared with the baseline (relative L2 of means/quats/scales), the CUDA
graph with eager posing (outputs poisoned with NaN before the replay), the frames of the product loop
(``render_sequence``: second stream, two graph slots) with eager posing and rendering, and the rendered frames of
the new and the baseline loops; the script exits 1 if a check fails or a pruned avatar loses more than 0.1 dB PSNR
on a validation clip. The table ends with the issue's targets (end-to-end batch 1 >= 1000 FPS, batch 8 <= 1.3x the
floor: the best of the graph and overlap variants on the pruned avatar; the pruning bound). Peak GPU memory
(``torch.cuda.max_memory_allocated``) is recorded for every measurement.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.avatar.artifact import Avatar, save_avatar  # noqa: E402
from pipelines.avatar.binding import AvatarRig, Gaussians, PoseGraph  # noqa: E402
from pipelines.avatar.maps import template_maps  # noqa: E402
from pipelines.avatar.skinning import SkinningConfig  # noqa: E402
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
from pipelines.animate import PosePipeline, _to_host_uint8  # noqa: E402
from pipelines.avatar.head import head_record  # noqa: E402
from pipelines.avatar.prune import PruneConfig, prune_avatar, select_samples  # noqa: E402
from pipelines.render import GsplatOptions, render_gaussians  # noqa: E402
from pipelines.uv.space import UVConfig, load_or_build_uv_space  # noqa: E402

# Checks: new pose step vs baseline (float32 rounding of the same maths, amplified on ~1 mm triangles for the
# frames), graph vs eager (the same relative bounds: cuBLAS picks other kernels under capture, so not bitwise), frames
# of the new vs baseline loop (uint8). The product loop vs eager posing: uint8 frames agree to 1 level.
# Pruning: the pruned avatar's PSNR against the ground truth within 0.1 dB of the whole one's (the bound).
TOL = {"means_rel": 1e-5, "scales_rel": 1e-5, "quats_rel": 1e-4, "frame_mean_abs": 0.05,
       "frame_max_abs": 8, "loop_max_abs": 1, "prune_psnr_drop_db": 0.1}


@dataclass
class Settings:
    """Sizes of one run (GPU defaults; ``smoke()`` shrinks everything for the CPU)."""

    device: str = "cuda"
    backend: str = "gsplat"
    head_model: str = "ict"
    uv_size: int = 256
    hair_grid: tuple[int, int] = (1024, 128)  # UVConfig's dense hair grid (cols, rows)
    uv_vertices: bool = True  # UVConfig.include_vertices (a Gaussian at every UV vertex)
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
    packed: tuple[bool, ...] = (False, True)  # gsplat layouts the options sweep measures
    tile_sizes: tuple[int, ...] = (8, 16, 32)
    val_frames: int = 8  # driven frames per validation clip (prune section)

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(device="cpu", backend="torch", uv_size=32, hair_grid=(64, 8), uv_vertices=False, size=48,
                   batches=(1, 2),
                   motion_frames=8, reps=2, warmup=1, pipeline_frames=4, sizes=(32, 48), uv_sizes=(32,),
                   turntable_frames=6, net_batches=(1,), net_reps=1, tiny_network=True, track_frames=12,
                   packed=(False,), tile_sizes=(16,), val_frames=2)


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


def uv_config(cfg: "Settings", uv_size: int | None = None) -> UVConfig:
    return UVConfig(size=uv_size or cfg.uv_size, hair_grid_cols=cfg.hair_grid[0], hair_grid_rows=cfg.hair_grid[1],
                    include_vertices=cfg.uv_vertices)


def make_rig(head: HeadModel, uv: UVConfig, device: torch.device, rig_cls=AvatarRig, seed: int = 0,
             source: HeadParams | None = None) -> AvatarRig:
    """A template avatar with a random identity, random local rotations and small offsets (so no term is zero).

    With a ``source`` pose it is posed as the product poses a reconstructed avatar (``SkinningConfig``'s defaults),
    and its head-weighted neck texels are moved 8 cm down onto the chest by their shape offsets, as the network's
    collar texels are, so that position skinning has Gaussians to re-skin (about 5 % of them; a v6 avatar: 2.5 %)."""
    uv = load_or_build_uv_space(head, uv, device=device)
    g = torch.Generator().manual_seed(seed)
    maps = template_maps(uv.to("cpu"))
    K = uv.size
    maps[:, 3:7] = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
                                                 + 0.3 * torch.randn(1, 4, K, K, generator=g), dim=1)
    maps[:, 11:14] = 0.001 * torch.randn(1, 3, K, K, generator=g)
    shape = 0.5 * torch.randn(1, head.n_shape, generator=g)
    if source is None:
        return rig_cls(head, uv, maps.to(device), shape.to(device))
    W = head.lbs_weights.to(device)
    w_texel = (W[head.faces.to(device)[uv.face_index.clamp(min=0)]] * uv.bary[..., None]).sum(-2)  # (K, K, J)
    collar = uv.valid & uv.region_mask("neck") & (w_texel[..., 0] < 0.5)
    delta_p = torch.zeros(1, 3, K, K, device=device)
    delta_p[0, 1, collar] = -0.08
    return rig_cls(head, uv, maps.to(device), shape.to(device), delta_p, source.to(device), SkinningConfig())


def render(g: Gaussians, viewmats, Ks, size: int, bg, backend: str, options: GsplatOptions | None = None):
    """The product's render call (no depth, as ``render_sequence``)."""
    options = replace(options or GsplatOptions(), depth=False)
    return render_gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, size, size, bg,
                            backend=backend, options=options)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def canon_quat(q: torch.Tensor) -> torch.Tensor:
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0)


# --------------------------------------------------------------------------------------------------- sections
class Bench:
    def __init__(self, cfg: Settings, baseline_dir: Path | None, compile_pose: bool, log: Callable[[str], None],
                 options: GsplatOptions = GsplatOptions(), prune: PruneConfig = PruneConfig(),
                 val_data: Path | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.log = log
        self.compile_pose = compile_pose
        self.options = options
        self.prune_cfg = prune
        self.val_data = val_data
        self.results: dict = {"checks": {}, "sections": {}, "gsplat_options": asdict(options)}
        t = time.perf_counter()
        self.head_cpu = load_head_model(cfg.head_model)
        self.results["head_build_s"] = time.perf_counter() - t
        self.head = load_head_model(cfg.head_model, device=self.device)
        self.base_binding = self.base_animate = None
        if baseline_dir is not None:
            self.base_binding = load_module("pipelines.avatar._baseline_binding", baseline_dir / "binding.py")
            self.base_animate = load_module("pipelines._baseline_animate", baseline_dir / "animate.py")
        self.motion = random_motion(self.head_cpu, cfg.motion_frames, seed=1).to(self.device)
        # On the device, like the motion: the baseline loop indexes the cameras with device tensors.
        self.cams = frontal_cameras(self.head_cpu, cfg.motion_frames).to(self.device)
        t = time.perf_counter()
        self.rig = make_rig(self.head, uv_config(cfg), self.device)
        sync(self.device)
        self.results["rig_build_s"] = time.perf_counter() - t
        self.results["head_model"] = cfg.head_model
        self.results["num_gaussians"] = self.rig.num_gaussians
        self.results["num_vertices"] = int(self.head.v_template.shape[0])
        self.results["num_faces"] = int(self.head.faces.shape[0])
        self.base_rig = make_rig(self.head, uv_config(cfg), self.device, self.base_binding.AvatarRig) \
            if self.base_binding else None
        # Rigs the reenact section times: the template, then (prune section) a real avatar, whole and pruned.
        self.rigs: dict[str, AvatarRig] = {"template": self.rig, "template_skinned": make_rig(
            self.head, uv_config(cfg), self.device, source=random_motion(self.head_cpu, 1, seed=2))}

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
            for key, rig in (("", self.rig), ("skinned_", self.rigs["template_skinned"])):
                # The template as posed bare and as the product poses a reconstructed avatar (position skinning).
                ok &= self._check_posing(rig, p, res, key)
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
        ok &= self._check_loop(res)
        res["pass"] = bool(ok)
        self.log(f"checks: {'PASS' if ok else 'FAIL'} {json.dumps(res)}")
        return bool(ok)

    def _check_posing(self, rig: AvatarRig, p: HeadParams, res: dict, key: str) -> bool:
        """The fused kernel against the PyTorch path, and (CUDA) the graph replay against eager posing, for ``rig``;
        results under ``key`` + name in ``res``."""
        ok = True
        new = rig.pose_params(p)
        if rig.position_skinning is not None:
            res[key + "reskinned_gaussians"] = len(rig.position_skinning)
        if rig._use_fused(rig.posed_vertices(p)):
            # The fused Triton kernel (pose_kernel.py) against the PyTorch path it replaces.
            ref = torch_path_poser(rig)(p)
            res[key + "fused_vs_torch_path"] = {
                "means_rel": rel(new.means, ref.means), "scales_rel": rel(new.scales, ref.scales),
                "quats_rel": rel(canon_quat(new.quats), canon_quat(ref.quats)),
                "max_abs": {k: float((getattr(new, k) - getattr(ref, k)).abs().max())
                            for k in ("means", "quats", "scales")}}
            r = res[key + "fused_vs_torch_path"]
            ok &= r["means_rel"] < TOL["means_rel"] and r["scales_rel"] < TOL["scales_rel"]
            ok &= r["quats_rel"] < TOL["quats_rel"]
        if self.device.type == "cuda":
            graph = rig.pose_graph(p.batch)
            for t in (graph.out.means, graph.out.quats, graph.out.scales):
                t.fill_(float("nan"))  # poison: every element must be rewritten by the replay
            got = graph(p)
            per = {k: float((getattr(got, k) - getattr(new, k)).abs().max()) for k in ("means", "quats", "scales")}
            res[key + "graph_vs_eager_per_attribute"] = per  # which attribute differs, when one does
            res[key + "graph_vs_eager_max_abs"] = max(per.values())
            res[key + "graph_all_finite"] = bool(all(torch.isfinite(getattr(got, k)).all()
                                                     for k in ("means", "quats", "scales")))
            # cuBLAS picks other kernels for the (expression, skinning) products under graph capture, so the
            # replay is not bitwise equal to eager posing: float32 rounding, amplified in the frames of ~1 mm
            # triangles (max |dq| 1.5e-4 on the H200). Held to the relative bounds of the baseline check.
            rq = rel(canon_quat(got.quats), canon_quat(new.quats))
            res[key + "graph_vs_eager_rel"] = {"means": rel(got.means, new.means),
                                               "scales": rel(got.scales, new.scales), "quats": rq}
            r = res[key + "graph_vs_eager_rel"]
            ok &= r["means"] < TOL["means_rel"] and r["scales"] < TOL["scales_rel"] and r["quats"] < TOL["quats_rel"]
            ok &= res[key + "graph_all_finite"]
        return bool(ok)

    def _check_loop(self, res: dict) -> bool:
        """The product loop (``render_sequence``: on CUDA the pose step on a second stream, two graph slots in turn)
        against plain eager posing and rendering, frame by frame; 3 full batches and a partial one, so both slots
        are reused and the last batch is posed eagerly. On the template as the product poses an avatar (from its
        source pose, with position skinning)."""
        from pipelines.animate import render_sequence

        cfg, rig = self.cfg, self.rigs["template_skinned"]
        B = max(cfg.batches)
        n = min(3 * B + 1, cfg.motion_frames)
        mp, cams = slice_params(self.motion, 0, n), self.cams[torch.arange(n)]
        got = list(render_sequence(rig, mp, cams, cfg.size, backend=cfg.backend, batch_size=B,
                                   options=self.options))
        vm = world_to_camera(cams.c2w)
        Ks = to_pixel_intrinsics(cams.K, cfg.size, cfg.size)
        want = []
        with torch.no_grad():
            for s in range(0, n, B):
                k = min(B, n - s)
                out = render(rig.pose_params(slice_params(mp, s, k)), vm[s:s + k], Ks[s:s + k], cfg.size,
                             torch.ones(k, 3, device=self.device), cfg.backend, self.options)
                rgb, alpha = _to_host_uint8(out.rgb, out.alpha[..., 0])
                want += list(zip(rgb, alpha))
        d = max(int(np.abs(f.rgb.astype(np.int16) - r.astype(np.int16)).max()) for f, (r, _) in zip(got, want))
        da = max(int(np.abs(f.alpha.astype(np.int16) - a.astype(np.int16)).max()) for f, (_, a) in zip(got, want))
        cover = float(np.mean([f.alpha.mean() / 255 for f in got]))
        res["loop_vs_eager"] = {"frames": len(got), "rgb_max_abs": d, "alpha_max_abs": da, "alpha_coverage": cover}
        return len(got) == n and d <= TOL["loop_max_abs"] and da <= TOL["loop_max_abs"] and cover > 0.02

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

    def _floor(self, rig: AvatarRig, params, views, size: int, bg, reps: int,
               options: GsplatOptions | None = None) -> dict:
        """The bare render of already posed Gaussians (several posed sets, cycled with their views)."""
        posed = [rig.pose_params(p) for p in params[:8]]
        return time_calls(lambda i: render(posed[i % len(posed)], *views[i % len(posed)], size, bg, self.cfg.backend,
                                           options or self.options), self.device, reps, self.cfg.warmup)

    def _posers(self, rig: AvatarRig, B: int) -> dict[str, Callable[[HeadParams], Gaussians]]:
        posers: dict[str, Callable] = {"eager": rig.pose_params}
        if self.base_rig is not None and rig is self.rig:
            posers = {"baseline": self.base_rig.pose_params, **posers}
        if self.device.type == "cuda":
            posers["graph"] = rig.pose_graph(B)
            if rig._use_fused(rig.posed_vertices(slice_params(self.motion, 0, B))):
                # The same step on the PyTorch path (what the fused kernel replaces), eager and as a graph.
                posers["eager_torch"] = torch_path_poser(rig)
                posers["graph_torch"] = torch_path_graph(rig, B)
        return posers

    def _overlapped(self, rig: AvatarRig, B: int, params, views, size: int, bg) -> Callable[[int], object]:
        """One call of the product loop's steady state: the pose of call i+1 is submitted on the pose stream before
        call i renders (``PosePipeline``, as ``render_sequence``)."""
        pipe = PosePipeline(rig, B)
        state = {"i": None, "slot": None}

        def call(i: int):
            if state["i"] != i:  # first call (or a jump): pose this call's frames now
                state["slot"] = pipe.submit(params[i % len(params)])
            slot = state["slot"]
            g = pipe.result(slot)
            state["slot"], state["i"] = pipe.submit(params[(i + 1) % len(params)]), i + 1
            out = render(g, *views[i % len(views)], size, bg, self.cfg.backend, self.options)
            pipe.release(slot)
            return out

        return call

    def reenact(self, compiled: bool = False) -> None:
        cfg, out = self.cfg, {}
        for rig_name, rig in self.rigs.items():
            res: dict = {"num_gaussians": rig.num_gaussians}
            for B in cfg.batches:
                params, views, bg = self._batch_inputs(B, cfg.size)
                row: dict = {}
                with torch.no_grad():
                    row["floor"] = self._floor(rig, params, views, cfg.size, bg, cfg.reps)
                    posers = {"compiled": compiled_poser(rig)} if compiled else self._posers(rig, B)
                    for name, poser in posers.items():
                        try:
                            row[f"pose_{name}"] = time_calls(lambda i: poser(params[i % len(params)]), self.device,
                                                             cfg.reps, cfg.warmup)

                            def e2e(i, poser=poser):
                                g = poser(params[i % len(params)])
                                return render(g, *views[i % len(views)], cfg.size, bg, cfg.backend, self.options)

                            row[f"e2e_{name}"] = time_calls(e2e, self.device, cfg.reps, cfg.warmup)
                        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                            row[f"e2e_{name}"] = {"error": f"{type(e).__name__}: {e}"}
                            self.log(traceback.format_exc())
                    if self.device.type == "cuda" and not compiled:
                        try:  # the product loop: pose of the next call on a second stream (render_sequence)
                            row["e2e_overlap"] = time_calls(self._overlapped(rig, B, params, views, cfg.size, bg),
                                                            self.device, cfg.reps, cfg.warmup)
                        except Exception as e:  # noqa: BLE001
                            row["e2e_overlap"] = {"error": f"{type(e).__name__}: {e}"}
                            self.log(traceback.format_exc())
                for k, v in row.items():
                    if "median_ms" in v:
                        v["fps"] = 1000.0 * B / v["median_ms"]
                res[f"batch{B}"] = row
                self.log(f"reenact {rig_name} ({rig.num_gaussians} Gaussians) batch {B}: " + ", ".join(
                    f"{k} {v.get('median_ms', float('nan')):.3f} ms" for k, v in row.items()))
            out[rig_name] = res
        self.results["sections"]["compiled" if compiled else "reenact"] = out

    def compiled(self) -> None:
        """The reenact measurement with the pose step under torch.compile (GPU; last, as compiling takes a while)."""
        if self.device.type != "cuda":
            self.results["sections"]["compiled"] = {"skipped": "GPU only"}
            return
        t = time.perf_counter()
        self.reenact(compiled=True)
        self.results["sections"]["compiled"]["seconds_with_compile"] = time.perf_counter() - t

    # -------------------------------------------------------------------------------------- stages
    def stages(self) -> None:
        """Where a frame's time goes, stage by stage (CUDA events between the stages of one call; perf_counter with
        a synchronisation on the CPU), for the last rig of the reenact section (the pruned avatar when there is
        one): input copies into the graph's buffers, skinning (``posed_skeleton``: blendshapes, LBS), Gaussian
        attribute assembly (``pose``: triangle frames, gathers, means / quats / scales), position skinning of the
        Gaussians the offsets moved off their triangles (``reskin``), projection + tile
        intersection + sort + rasterization (gsplat's own steps, timed apart, when gsplat is the renderer), and the
        readback to host uint8."""
        cfg, out = self.cfg, {}
        name, rig = list(self.rigs.items())[-1]
        out["rig"], out["num_gaussians"] = name, rig.num_gaussians
        cuda = self.device.type == "cuda"
        for B in cfg.batches:
            params, views, bg = self._batch_inputs(B, cfg.size)
            graph = rig.pose_graph(B) if cuda else None
            names = ["copy_inputs", "skinning", "attributes", "reskin", "render", "readback"]
            samples: dict[str, list[float]] = {k: [] for k in names + ["total"]}
            with torch.no_grad():
                for i in range(cfg.warmup + cfg.reps):
                    p, (vm, K) = params[i % len(params)], views[i % len(views)]
                    marks = [self._mark()]
                    if graph is not None:  # what PoseGraph.__call__ copies, on its own
                        for k, buf in graph.params.to_dict().items():
                            if k != "shape":
                                buf.copy_(getattr(p, k))
                    marks.append(self._mark())
                    verts, E = rig.posed_skeleton(p)
                    marks.append(self._mark())
                    g = rig.pose(verts)
                    marks.append(self._mark())
                    g = rig.reskin(g, E)
                    marks.append(self._mark())
                    o = render(g, vm, K, cfg.size, bg, cfg.backend, self.options)
                    marks.append(self._mark())
                    _to_host_uint8(o.rgb, o.alpha[..., 0])
                    marks.append(self._mark())
                    if i >= cfg.warmup:
                        sync(self.device)
                        ms = [self._elapsed(a, b) for a, b in zip(marks[:-1], marks[1:])]
                        for k, v in zip(names, ms):
                            samples[k].append(v)
                        samples["total"].append(sum(ms))
            row = {k: float(np.median(v)) for k, v in samples.items()}
            if graph is not None:
                row["pose_graph_replay"] = time_calls(lambda i: graph.graph.replay(), self.device, cfg.reps,
                                                      cfg.warmup)["median_ms"]
            if cuda and cfg.backend == "gsplat":
                try:
                    row["gsplat"] = self._gsplat_stages(rig, params, views, bg)
                except Exception as e:  # noqa: BLE001 - gsplat internals: record and go on
                    row["gsplat"] = {"error": f"{type(e).__name__}: {e}"}
            out[f"batch{B}"] = row
            self.log(f"stages batch {B} (eager, ms): " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
        self.results["sections"]["stages"] = out

    def _mark(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @staticmethod
    def _elapsed(a, b) -> float:
        return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else 1000.0 * (b - a)

    def _gsplat_stages(self, rig: AvatarRig, params, views, bg) -> dict:
        """gsplat's rasterization split into its steps (the calls ``gsplat.rasterization`` makes for our inputs:
        not packed, RGB, per-view Gaussians): projection, tile intersection + sort, offsets, rasterization; the
        composed image is compared with ``render_gaussians``'s."""
        from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles, rasterize_to_pixels

        cfg, ts = self.cfg, self.options.tile_size
        W = H = cfg.size
        tw, th = math.ceil(W / ts), math.ceil(H / ts)
        posed = [rig.pose_params(p) for p in params[:8]]
        names = ["projection", "isect_sort", "offsets", "rasterize"]
        samples: dict[str, list[float]] = {k: [] for k in names}
        for i in range(self.cfg.warmup + self.cfg.reps):
            g, (vm, K) = posed[i % len(posed)], views[i % len(posed)]
            B = vm.shape[0]
            marks = [self._mark()]
            radii, means2d, depths, conics, _ = fully_fused_projection(
                g.means, None, g.quats, g.scales, vm[:, None], K[:, None], W, H, eps2d=0.3, near_plane=0.01,
                far_plane=100.0, opacities=g.opacities)
            marks.append(self._mark())
            _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, ts, tw, th, n_images=B)
            marks.append(self._mark())
            offsets = isect_offset_encode(isect_ids, B, tw, th).reshape(B, 1, th, tw)
            marks.append(self._mark())
            opac = torch.broadcast_to(g.opacities[:, None, :], (B, 1, g.opacities.shape[1]))
            rgb, alpha = rasterize_to_pixels(means2d, conics, g.colors[:, None], opac, W, H, ts, offsets,
                                             flatten_ids, backgrounds=bg[:, None])
            marks.append(self._mark())
            if i >= self.cfg.warmup:
                sync(self.device)
                for k, a, b in zip(names, marks[:-1], marks[1:]):
                    samples[k].append(self._elapsed(a, b))
        row = {k: float(np.median(v)) for k, v in samples.items()}
        ref = render(g, vm, K, cfg.size, bg, cfg.backend, self.options)
        row["max_abs_vs_render"] = float((rgb[:, 0] - ref.rgb).abs().max())
        row["isects_per_frame"] = int(flatten_ids.numel()) / B
        return row

    # -------------------------------------------------------------------------------------- gsplat options
    def gsplat_options(self) -> None:
        """The floor (bare render) of the reenact section's last rig with each gsplat layout; the fastest (by the sum
        over the batch sizes) becomes the layout of the sections after this one, and is recorded."""
        cfg, out = self.cfg, {}
        name, rig = list(self.rigs.items())[-1]
        out["rig"] = name
        best, best_ms = None, math.inf
        for packed in cfg.packed:
            for ts in cfg.tile_sizes:
                opt = replace(self.options, packed=packed, tile_size=ts)
                key = f"packed={int(packed)} tile={ts}"
                row = {}
                try:
                    with torch.no_grad():
                        for B in cfg.batches:
                            params, views, bg = self._batch_inputs(B, cfg.size)
                            row[f"batch{B}"] = self._floor(rig, params, views, cfg.size, bg, cfg.reps // 2, opt)
                except Exception as e:  # noqa: BLE001 - an unsupported layout is recorded, not fatal
                    out[key] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                total = sum(r["median_ms"] for r in row.values())
                out[key] = {**row, "sum_ms": total}
                if total < best_ms:
                    best, best_ms = opt, total
                self.log(f"gsplat {key}: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in row.items()))
        if best is not None:
            self.options = best
            out["chosen"] = asdict(best)
            self.results["gsplat_options"] = asdict(best)
        self.results["sections"]["gsplat_options"] = out

    # -------------------------------------------------------------------------------------- prune
    def prune(self) -> None:
        """PSNR of pruned vs whole avatars on the validation clips (``--val-data``: preprocessed item folders).

        Per clip: the source frame's avatar (``--method unproject``, this head model, K = ``uv_size``), whole
        (nothing pruned, not even by opacity) and pruned with ``--prune-*``; both rendered for ``val_frames`` driven
        frames (self-reenactment: the clip's own tracking and cameras) and scored like ``fhavatar evaluate`` (the
        matted foreground: prediction and ground truth composited on white with the ground-truth matte). Reported:
        PSNR of each against the ground truth, the drop, and PSNR of the pruned render against the whole one. The
        first clip's avatars join the reenact section's rigs ("avatar", "avatar_pruned")."""
        from pipelines.evaluate.metrics import composite, psnr
        from pipelines.reconstruct import ReconstructConfig, load_source, reconstruct
        from pipelines.reenact import ReenactConfig, reenact_cameras, source_tracking
        from pipelines.tracking.motion import transfer_motion
        from pipelines.tracking.result import load_tracking

        cfg, out = self.cfg, {"clips": {}, "config": asdict(self.prune_cfg)}
        if self.val_data is None:
            self.results["sections"]["prune"] = {"skipped": "no --val-data"}
            return
        clips = sorted(d for d in self.val_data.iterdir() if (clip_dir(d) / "tracking.npz").is_file())
        uv = load_or_build_uv_space(self.head, uv_config(cfg), device=self.device)
        rcfg = ReconstructConfig(method="unproject", uv_size=cfg.uv_size, prune=PruneConfig(min_opacity=0.0))
        for d in clips:
            pp = clip_dir(d)
            t = time.perf_counter()
            source = load_source(pp, 0).to(self.device)
            whole = reconstruct(source, self.head, uv, rcfg, backend=cfg.backend)
            t_rec = time.perf_counter() - t
            t = time.perf_counter()
            pruned = prune_avatar(whole, self.head, uv, self.prune_cfg, backend=cfg.backend)
            sync(self.device)
            t_prune = time.perf_counter() - t
            tr = load_tracking(pp / "tracking.npz")
            have = [i for i in range(1, tr.num_frames) if (pp / "frames" / f"{i:06d}.png").is_file()]
            frames = have[:: max(1, len(have) // cfg.val_frames)][: cfg.val_frames]
            drv = tr.select(frames)
            motion = transfer_motion(source_tracking(whole), drv, "absolute").to(self.device)
            target = [float(x) for x in self.head.head_center().tolist()]
            cams = reenact_cameras(ReenactConfig(motion="absolute"), whole, drv, target, len(frames))
            gt = np.stack([read_rgb(pp / "frames" / f"{i:06d}.png") for i in frames])
            matte = np.stack([read_alpha(pp / "mattes" / f"{i:06d}.png") for i in frames])
            size = gt.shape[1]
            renders = {}
            for key, av in (("whole", whole), ("pruned", pruned)):
                # build_rig's binding, on this run's UV space (the smoke run's is smaller than the product's).
                rig = AvatarRig(self.head, select_samples(uv, av.keep), av.maps_tensor(self.device),
                                torch.as_tensor(av.shape, device=self.device), av.delta_p_tensor(self.device),
                                av.source_head_params(self.device), SkinningConfig())
                vm = world_to_camera(cams.c2w.to(self.device))
                Ks = to_pixel_intrinsics(cams.K.to(self.device), size, size)
                with torch.no_grad():
                    o = render(rig.pose_params(motion), vm, Ks, size, torch.ones(len(frames), 3, device=self.device),
                               cfg.backend, self.options)
                renders[key] = o.rgb.clamp(0, 1).cpu().numpy()
                if d == clips[0]:
                    self.rigs["avatar" if key == "whole" else "avatar_pruned"] = rig
            gtc = composite(gt, matte)
            ps = {k: float(np.mean(psnr(composite(v, matte), gtc))) for k, v in renders.items()}
            between = float(np.mean(np.minimum(psnr(renders["pruned"], renders["whole"]), 150.0)))  # 150: identical
            info = pruned.meta["prune"]
            out["clips"][d.name] = {"frames": frames, "gaussians_whole": info["before"],
                                    "gaussians_pruned": info["kept"],
                                    "psnr_whole": ps["whole"], "psnr_pruned": ps["pruned"],
                                    "psnr_drop_db": ps["whole"] - ps["pruned"], "psnr_pruned_vs_whole": between,
                                    "reconstruct_s": t_rec, "prune_s": t_prune, "prune": info}
            self.log(f"prune {d.name}: {info['before']} -> {info['kept']} Gaussians, PSNR {ps['whole']:.3f} -> "
                     f"{ps['pruned']:.3f} dB, pruned vs whole {between:.2f} dB ({t_prune:.1f} s)")
        rows = list(out["clips"].values())
        if rows:
            out["mean_psnr_drop_db"] = float(np.mean([r["psnr_drop_db"] for r in rows]))
            out["max_psnr_drop_db"] = float(max(r["psnr_drop_db"] for r in rows))
            out["mean_kept_fraction"] = float(np.mean([r["gaussians_pruned"] / r["gaussians_whole"] for r in rows]))
            out["pass"] = out["max_psnr_drop_db"] <= TOL["prune_psnr_drop_db"]
        self.results["sections"]["prune"] = out

    def pipeline(self) -> None:
        """The whole loop, readback to numpy included (render_sequence), before and after."""
        from pipelines.animate import render_sequence

        cfg, out = self.cfg, {}
        T = min(cfg.pipeline_frames, cfg.motion_frames)
        mp, cams = slice_params(self.motion, 0, T), self.cams[torch.arange(T)]
        rig = list(self.rigs.values())[-1]
        loops = {"after": (lambda *a, **k: render_sequence(*a, options=self.options, **k), rig)}
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
        self.results["sections"]["pipeline"] = {"frames": T, "num_gaussians": rig.num_gaussians, **out}

    # -------------------------------------------------------------------------------------- scaling
    def scaling(self) -> None:
        cfg, out = self.cfg, {"resolution": {}, "gaussians": {}}
        B = max(cfg.batches)

        def measure(rig: AvatarRig, size: int) -> dict:
            params, views, bg = self._batch_inputs(B, size)
            with torch.no_grad():
                floor = self._floor(rig, params, views, size, bg, cfg.reps // 2)
                poser = rig.pose_graph(B) if self.device.type == "cuda" else rig.pose_params
                e2e = time_calls(lambda i: render(poser(params[i % len(params)]), *views[i % len(views)], size, bg,
                                                  cfg.backend, self.options), self.device, cfg.reps // 2, cfg.warmup)
            return {"floor": floor, "e2e": e2e, "gaussians": rig.num_gaussians, "size": size,
                    "ratio": e2e["median_ms"] / floor["median_ms"]}

        for size in cfg.sizes:
            out["resolution"][str(size)] = r = measure(self.rig, size)
            self.log(f"scaling {size}px: floor {r['floor']['median_ms']:.3f} ms, e2e {r['e2e']['median_ms']:.3f} ms")
        for K in cfg.uv_sizes:
            rig = self.rig if K == cfg.uv_size else make_rig(self.head, uv_config(cfg, K), self.device)
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


def clip_dir(d: Path) -> Path:
    """A validation clip's preprocessed folder: ``d`` itself or ``d/preprocess``."""
    return d / "preprocess" if (d / "preprocess" / "tracking.npz").is_file() else d


def read_rgb(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path)[..., :3].astype(np.float32) / 255.0


def read_alpha(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    a = iio.imread(path).astype(np.float32) / 255.0
    return (a[..., 0] if a.ndim == 3 else a)[..., None]


def template_avatar(head: HeadModel, uv) -> Avatar:
    """A template avatar file for the turntable command (neutral source frame, frontal camera)."""
    params = {k: v.cpu().numpy() for k, v in head.zero_params(1).to_dict().items()}
    return Avatar(template_maps(uv.to("cpu"))[0].numpy(), np.zeros((3, uv.size, uv.size), np.float32),
                  np.zeros(head.n_shape, np.float32), params, normalized_intrinsics()[0].numpy(),
                  orbit_cameras(torch.zeros(1), torch.zeros(1))[0].numpy(),
                  head_record(head), {"method": "template"})


def torch_path_poser(rig: AvatarRig) -> Callable[[HeadParams], Gaussians]:
    """``rig.pose_params`` on the PyTorch path (the fused kernel switched off for the call)."""
    def call(p: HeadParams) -> Gaussians:
        rig.fused = False
        try:
            return rig.pose_params(p)
        finally:
            rig.fused = True
    return call


def torch_path_graph(rig: AvatarRig, B: int) -> PoseGraph:
    """A CUDA graph of the PyTorch-path pose step (captured with the fused kernel off; kept apart from the rig's
    own graphs)."""
    rig.fused = False
    try:
        return PoseGraph(rig, B)
    finally:
        rig.fused = True


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
        if not isinstance(sec.get(key), dict):
            continue
        for rig_name, rows in sec[key].items():
            if not isinstance(rows, dict) or not any(k.startswith("batch") for k in rows):
                continue
            lines.append(f"{key} {rig_name} ({rows['num_gaussians']} Gaussians, {results['settings']['size']} px), "
                         "per call:")
            lines.append(f"{'batch':>5s} {'variant':18s} {'median ms':>10s} {'p90 ms':>8s} {'frames/s':>9s} "
                         f"{'x floor':>8s} {'peak MiB':>9s}")
            for bk, row in rows.items():
                if not bk.startswith("batch"):
                    continue
                floor = row["floor"]["median_ms"]
                for name, r in row.items():
                    if "median_ms" not in r:
                        lines.append(f"{bk[5:]:>5s} {name:18s} {r.get('error', '?')[:60]}")
                        continue
                    ratio = r["median_ms"] / floor if name.startswith("e2e") or name == "floor" else float("nan")
                    lines.append(f"{bk[5:]:>5s} {name:18s} {r['median_ms']:10.3f} {r['p90_ms']:8.3f} "
                                 f"{r['fps']:9.0f} {ratio:8.2f} {r['peak_mib']:9.0f}")
    if isinstance(sec.get("stages"), dict) and "rig" in sec["stages"]:
        st = sec["stages"]
        lines.append(f"stages ({st['rig']}, {st['num_gaussians']} Gaussians; eager, one call; ms):")
        for bk, row in st.items():
            if bk.startswith("batch"):
                lines.append(f"  {bk}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
                gs = row.get("gsplat")
                if isinstance(gs, dict):
                    lines.append("    gsplat: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in gs.items()))
    if isinstance(sec.get("gsplat_options"), dict):
        g = sec["gsplat_options"]
        lines.append(f"gsplat layouts (floor of {g.get('rig')}, ms): " + "; ".join(
            f"{k}: " + (", ".join(f"{b} {r['median_ms']:.3f}" for b, r in v.items() if isinstance(r, dict))
                        if "error" not in v else v["error"][:40])
            for k, v in g.items() if isinstance(v, dict) and k != "chosen") + f"; chosen {g.get('chosen')}")
    if isinstance(sec.get("prune"), dict) and "clips" in sec["prune"]:
        pr = sec["prune"]
        lines.append("prune (validation clips; PSNR of the matted foreground vs ground truth):")
        lines.append(f"  {'clip':24s} {'whole':>7s} {'pruned':>7s} {'PSNR whole':>10s} {'PSNR pruned':>11s} "
                     f"{'drop dB':>8s} {'pruned vs whole':>15s}")
        for c, r in pr["clips"].items():
            lines.append(f"  {c:24s} {r['gaussians_whole']:7d} {r['gaussians_pruned']:7d} {r['psnr_whole']:10.3f} "
                         f"{r['psnr_pruned']:11.3f} {r['psnr_drop_db']:8.4f} {r['psnr_pruned_vs_whole']:15.2f}")
        if "max_psnr_drop_db" in pr:
            lines.append(f"  max drop {pr['max_psnr_drop_db']:.4f} dB, kept {100 * pr['mean_kept_fraction']:.1f}% "
                         f"of the Gaussians ({'PASS' if pr['pass'] else 'FAIL'}: <= {TOL['prune_psnr_drop_db']} dB)")
    if "pipeline" in sec and isinstance(sec["pipeline"], dict) and "frames" in sec["pipeline"]:
        lines.append(f"render_sequence ({sec['pipeline']['frames']} frames, {sec['pipeline']['num_gaussians']} "
                     "Gaussians, readback to numpy):")
        for k, r in sec["pipeline"].items():
            if isinstance(r, dict):
                lines.append(f"  {k:18s} {r['fps']:8.0f} frames/s  peak {r['peak_mib']:.0f} MiB")
    if "scaling" in sec and "batch" in sec["scaling"]:
        s = sec["scaling"]
        lines.append(f"scaling (batch {s['batch']}), per frame: size/UV  gaussians  floor ms  e2e ms  ratio")
        for kind in ("resolution", "gaussians"):
            for k, r in s[kind].items():
                b = s["batch"]
                lines.append(f"  {kind[:3]} {k:>5s} {r['gaussians']:9d} {r['floor']['median_ms'] / b:9.4f} "
                             f"{r['e2e']['median_ms'] / b:8.4f} {r['ratio']:6.2f}  peak {r['e2e']['peak_mib']:.0f} MiB")
    if "turntable" in sec and "frames" in sec["turntable"]:
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
    lines += [""] + target_lines(results)
    return "\n".join(lines)


def targets(results: dict) -> dict:
    """The issue's targets from the measured numbers: the reenact rig of record (the pruned avatar when measured,
    else the last one), the best end-to-end variant per batch (graph or overlap: what the product loop can use)."""
    sec = results["sections"]
    out: dict = {"checks": bool(results["checks"].get("pass"))}
    re = sec.get("reenact")
    if isinstance(re, dict) and re:
        rig = "avatar_pruned" if "avatar_pruned" in re else list(re)[-1]
        out["rig"], out["num_gaussians"] = rig, re[rig]["num_gaussians"]
        for bk, row in re[rig].items():
            if not bk.startswith("batch"):
                continue
            e2e = {k: v for k, v in row.items() if k.startswith("e2e") and "median_ms" in v and k != "e2e_baseline"}
            if not e2e:
                continue
            best = min(e2e, key=lambda k: e2e[k]["median_ms"])
            out[bk] = {"best": best, "fps": e2e[best]["fps"], "median_ms": e2e[best]["median_ms"],
                       "floor_ms": row["floor"]["median_ms"],
                       "x_floor": e2e[best]["median_ms"] / row["floor"]["median_ms"]}
        if "batch1" in out:
            out["batch1"]["pass"] = out["batch1"]["fps"] >= 1000.0
        if "batch8" in out:
            out["batch8"]["pass"] = out["batch8"]["x_floor"] <= 1.3
    pr = sec.get("prune")
    if isinstance(pr, dict) and "pass" in pr:
        out["prune"] = {"max_psnr_drop_db": pr["max_psnr_drop_db"], "pass": pr["pass"]}
    return out


def target_lines(results: dict) -> list[str]:
    t = targets(results)
    verdict = lambda ok: "PASS" if ok else "gap"  # noqa: E731
    lines = [f"targets (rig {t.get('rig')}, {t.get('num_gaussians')} Gaussians, {results['settings']['size']} px):",
             f"  correctness checks: {'PASS' if t['checks'] else 'FAIL'}"]
    if "batch1" in t:
        b = t["batch1"]
        lines.append(f"  batch 1 end to end >= 1000 FPS: {b['fps']:.0f} FPS ({b['best']}, {b['median_ms']:.3f} ms; "
                     f"floor {b['floor_ms']:.3f} ms) {verdict(b['pass'])}")
    if "batch8" in t:
        b = t["batch8"]
        lines.append(f"  batch 8 <= 1.3x floor: {b['x_floor']:.2f}x ({b['best']}, {b['median_ms']:.3f} ms vs "
                     f"{b['floor_ms']:.3f} ms; {b['fps']:.0f} FPS) {verdict(b['pass'])}")
    if "prune" in t:
        lines.append(f"  pruned within {TOL['prune_psnr_drop_db']} dB of whole: max drop "
                     f"{t['prune']['max_psnr_drop_db']:.4f} dB {'PASS' if t['prune']['pass'] else 'FAIL'}")
    return lines


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


SECTIONS = ("prune", "gsplat_options", "reenact", "stages", "pipeline", "scaling", "turntable", "reconstruct",
            "tracking", "compiled")
DEFAULT_SECTIONS = ("prune", "gsplat_options", "reenact", "stages", "pipeline", "scaling")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for bench_speed.json and bench_speed.md (the table), or a .json file")
    parser.add_argument("--smoke", "--cpu-dry", dest="smoke", action="store_true",
                        help="tiny sizes on the CPU (torch reference rasterizer): checks the bench's logic")
    parser.add_argument("--head-model", default=None, help="head model of the avatars (default: ict)")
    parser.add_argument("--uv-size", type=int, default=None, help="UV size K (default 256; smoke 32)")
    parser.add_argument("--val-data", type=Path, default=None,
                        help="folder of validation clips (preprocessed item folders) for the prune section")
    parser.add_argument("--val-frames", type=int, default=None, help="driven frames per validation clip")
    parser.add_argument("--prune-opacity", type=float, default=None, help="PruneConfig.min_opacity")
    parser.add_argument("--prune-contribution", type=float, default=None, help="PruneConfig.min_contribution")
    parser.add_argument("--max-gaussians", type=int, default=None, help="PruneConfig.max_gaussians")
    parser.add_argument("--packed", type=int, choices=(0, 1), default=None,
                        help="gsplat packed mode (default: the gsplat_options section measures both and picks)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="gsplat tile size (default: the gsplat_options section measures 8/16/32 and picks)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="folder with the 'before' binding.py and animate.py (git show COMMIT:...)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the pose step (GPU)")
    parser.add_argument("--only", nargs="*", default=None, choices=SECTIONS,
                        help=f"sections, in order (default: {' '.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement")
    args = parser.parse_args(argv)

    cfg = Settings.smoke() if args.smoke else Settings()
    for key in ("reps", "uv_size", "head_model", "val_frames"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    options = GsplatOptions()
    if args.packed is not None:
        cfg.packed = (bool(args.packed),)
        options = replace(options, packed=bool(args.packed))
    if args.tile_size is not None:
        cfg.tile_sizes = (args.tile_size,)
        options = replace(options, tile_size=args.tile_size)
    prune = {k: v for k, v in (("min_opacity", args.prune_opacity), ("min_contribution", args.prune_contribution),
                               ("max_gaussians", args.max_gaussians)) if v is not None}
    prune_cfg = replace(PruneConfig(**({"size": 32, "views": 4, "pitches": (0.0,)} if args.smoke else {})), **prune)
    if not args.smoke:
        if not torch.cuda.is_available():
            print("no CUDA device: run on the GPU machine, or pass --smoke", file=sys.stderr)
            return 2
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    out_json = args.out if args.out.suffix == ".json" else args.out / "bench_speed.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if not args.smoke else platform.processor() or "cpu",
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "mode": "smoke" if args.smoke else "gpu",
        "commit": git_commit(),
        "argv": sys.argv[1:] if argv is None else argv,
        "files": {p: file_digest(ROOT / p) for p in ("pipelines/avatar/binding.py", "pipelines/avatar/skinning.py",
                                                     "pipelines/animate.py")},
        "baseline_files": {p.name: file_digest(p) for p in sorted(args.baseline.glob("*.py"))} if args.baseline else {},
    }
    if not args.smoke:
        import gsplat

        meta["gsplat"] = gsplat.__version__
        meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    t = time.perf_counter()
    bench = Bench(cfg, args.baseline, args.compile, log, options, prune_cfg, args.val_data)
    if not args.smoke:  # first gsplat call (loads, or JIT-compiles, the CUDA extension)
        g = bench.rig.pose_params(slice_params(bench.motion, 0, 1))
        vm = world_to_camera(bench.cams.c2w[:1].to(bench.device))
        render(g, vm, to_pixel_intrinsics(bench.cams.K[:1].to(bench.device), 64, 64), 64, None, cfg.backend)
        sync(bench.device)
    meta["setup_s"] = time.perf_counter() - t
    bench.results.update({"meta": meta, "settings": asdict(cfg), "tolerances": TOL})
    log(json.dumps(meta))

    ok = bench.checks()
    sections = list(args.only or DEFAULT_SECTIONS)
    if args.compile and "compiled" not in sections:
        sections.append("compiled")
    for name in sections:
        t = time.perf_counter()
        try:
            getattr(bench, name)()
        except Exception as e:  # noqa: BLE001 - record and go on: one broken section must not lose the rest
            bench.results["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(traceback.format_exc())
        bench.results.setdefault("section_s", {})[name] = time.perf_counter() - t
        bench.results["targets"] = targets(bench.results)
        out_json.write_text(json.dumps(bench.results, indent=2, default=str))
    text = table(bench.results)
    out_json.with_suffix(".md").write_text(text + "\n")
    log(text)
    prune_ok = bench.results["targets"].get("prune", {}).get("pass", True)
    ok = ok and prune_ok
    log(("PASS" if ok else "FAIL") + f": results in {out_json}")
    return 0 if ok else 1


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
