"""Check the pure-PyTorch reference rasterizer against gsplat 1.5.3 on a GPU, and time both.

Run on the GPU machine (gsplat==1.5.3 installed)::

    python bench/gsplat_check.py --out results/gsplat_check.json

or, anywhere, a CPU dry run that skips gsplat (it checks the reference against its brute-force compositor
instead and times it on the CPU)::

    python bench/gsplat_check.py --cpu-dry --out /tmp/gsplat_check_dry.json

Scenes (fixed seeds): random Gaussians in a box (1K), head-like ellipsoid shells of small Gaussians seen from an
orbit (20K at 256 and 512 px, 78K at 512 px), 5-channel features (RGB + UV), per-view Gaussians (an "animated"
batch, means of shape (B, N, 3)), and edge cases (Gaussians straddling the near plane, beyond the frustum where
the EWA Jacobian is clamped, huge and tiny footprints, opacities near the 1/255 threshold).

Tolerances (reference vs gsplat, per scene over all views; images in [0, 1], depth in scene units ~ metres):

* RGB and alpha: mean abs diff < 1e-3 and max abs diff < 2e-2. Both backends implement the same maths; the
  remaining differences are float32 rounding (gsplat's ``__expf``, sequential vs cumulative products) which can
  flip a 1/255 alpha or 1e-4 transmittance decision at a few pixels (each flip moves a pixel by ~1/255).
* Expected depth, over pixels where both alphas exceed 0.5: mean abs diff < 1e-3, max abs diff < 2e-2.
* Gradients of a fixed random loss w.r.t. colours, opacities, means, scales and quaternions (scenes marked
  ``grad``): cosine similarity between the backends' gradients >= 0.99.

The PSNR of the reference RGB against gsplat's is reported (not a pass criterion). Exits 1 when any scene is
outside the tolerances, 0 otherwise; writes everything to the ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.camera import (  # noqa: E402
    normalized_intrinsics,
    orbit_cameras,
    to_pixel_intrinsics,
    world_to_camera,
)
from pipelines.render import render_gaussians  # noqa: E402
from pipelines.render.reference import rasterize_view  # noqa: E402

TOL = {
    "rgb_mean": 1e-3,
    "rgb_max": 2e-2,
    "alpha_mean": 1e-3,
    "alpha_max": 2e-2,
    "depth_mean": 1e-3,
    "depth_max": 2e-2,
    "grad_cos_min": 0.99,
}
NEAR, FAR = 0.01, 100.0


@dataclass
class Scene:
    name: str
    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    width: int
    height: int
    backgrounds: torch.Tensor | None = None
    grad: bool = False
    info: dict = field(default_factory=dict)

    def tensors(self, device: torch.device) -> dict:
        out = {
            k: getattr(self, k).to(device)
            for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
        }
        out["backgrounds"] = None if self.backgrounds is None else self.backgrounds.to(device)
        return out


def orbit(views: int, size: int, pitch: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """World-to-camera (B, 4, 4) on the paper's orbit (radius 1 m, EG3D focal) and pixel intrinsics (B, 3, 3)."""
    yaw = torch.linspace(-180.0, 180.0, views + 1)[:-1] + 15.0
    pitch_deg = torch.full((views,), pitch) * torch.cos(torch.deg2rad(yaw))
    viewmats = world_to_camera(orbit_cameras(yaw, pitch_deg))
    Ks = to_pixel_intrinsics(normalized_intrinsics(batch=views), size, size)
    return viewmats, Ks


def head_shell(n: int, gen: torch.Generator, channels: int = 3) -> tuple[torch.Tensor, ...]:
    """Small Gaussians on a head-sized ellipsoid shell (+ a few inside), like a UV-map avatar."""
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    radius = 1.0 + 0.03 * torch.randn(n, 1, generator=gen)
    radius[: n // 10] *= torch.rand(n // 10, 1, generator=gen)  # some interior Gaussians
    means = d * torch.tensor([0.08, 0.11, 0.10]) * radius
    quats = torch.randn(n, 4, generator=gen)
    scales = 0.004 * (20_000 / n) ** 0.5 * torch.exp(0.4 * torch.randn(n, 3, generator=gen))
    opacities = torch.sigmoid(2.0 + 1.5 * torch.randn(n, generator=gen))
    colors = torch.rand(n, channels, generator=gen)
    return means, quats, scales, opacities, colors


def build_scenes(views: int, small: bool) -> list[Scene]:
    """All scenes; ``small`` shrinks the heavy ones (for the CPU dry run)."""
    gen = torch.Generator().manual_seed(0)
    scenes = []

    # Random Gaussians in a 0.4 m box around the origin.
    n = 1000
    means = (torch.rand(n, 3, generator=gen) - 0.5) * 0.4
    quats = torch.randn(n, 4, generator=gen)
    scales = 0.01 * torch.exp(0.6 * torch.randn(n, 3, generator=gen))
    opac = torch.rand(n, generator=gen)
    cols = torch.rand(n, 3, generator=gen)
    vm, K = orbit(views, 256)
    bg = torch.rand(views, 3, generator=gen)
    scenes.append(Scene("random_1k_256", means, quats, scales, opac, cols, vm, K, 256, 256, bg, grad=True))

    for n, size in [(20_000, 256), (20_000, 512), (78_000, 512)]:
        if small and size == 512:
            n, size = n // 4, 256
        vm, K = orbit(views, size)
        scenes.append(Scene(f"head_{n // 1000}k_{size}", *head_shell(n, gen), vm, K, size, size, torch.ones(views, 3)))

    # 5 channels: RGB + UV-like coordinates, with a 5-channel background.
    vm, K = orbit(views, 256)
    m, q, s, o, c = head_shell(20_000, gen, channels=5)
    bg5 = torch.tensor([0.0, 0.0, 0.0, -1.0, -1.0]).expand(views, 5).clone()
    scenes.append(Scene("uv_5ch_20k_256", m, q, s, o, c, vm, K, 256, 256, bg5))

    # Per-view Gaussians: a shell that deforms from view to view, (B, N, ...) tensors.
    m, q, s, o, c = head_shell(5_000 if small else 20_000, gen)
    wobble = torch.linspace(0.0, 1.0, views)[:, None, None]
    m_b = m[None] * (1.0 + 0.1 * wobble * torch.tensor([1.0, -0.5, 0.0]))
    per_view = tuple(t[None].expand(views, *t.shape).clone() for t in (q, s, o, c))
    scenes.append(
        Scene(f"per_view_{m.shape[0] // 1000}k_256", m_b, *per_view, vm, K, 256, 256, torch.zeros(views, 3), grad=True)
    )

    # Edge cases, frontal camera looking down -z from z = +1.
    n = 2000
    vm, K = orbit(1, 256, pitch=0.0)
    vm, K = vm.expand(views, 4, 4).clone(), K.expand(views, 3, 3).clone()
    cam_z = 1.0
    means = (torch.rand(n, 3, generator=gen) - 0.5) * torch.tensor([0.6, 0.6, 0.4])
    means[:200, 2] = cam_z - NEAR + (torch.rand(200, generator=gen) - 0.5) * 0.004  # straddle the near plane
    means[200:400, 0] = torch.sign(torch.randn(200, generator=gen)) * (0.2 + 0.3 * torch.rand(200, generator=gen))
    quats = torch.randn(n, 4, generator=gen)
    scales = 0.01 * torch.exp(torch.randn(n, 3, generator=gen))
    scales[400:420] = 0.3  # huge footprints
    scales[420:600] = 1e-4  # sub-pixel: the 0.3 px dilation dominates
    opac = torch.rand(n, generator=gen)
    opac[600:800] = 1.0 / 255.0 + (torch.rand(200, generator=gen) - 0.5) * 1e-3  # around the threshold
    opac[800:900] = 1.0
    scenes.append(Scene("edges_2k_256", means, quats, scales, opac, torch.rand(n, 3, generator=gen), vm, K, 256, 256))
    return scenes


def render(scene: Scene, backend: str, device: torch.device, requires_grad: bool = False):
    t = scene.tensors(device)
    if requires_grad:
        for k in ("means", "quats", "scales", "opacities", "colors"):
            t[k] = t[k].clone().requires_grad_(True)
    out = render_gaussians(
        t["means"], t["quats"], t["scales"], t["opacities"], t["colors"], t["viewmats"], t["Ks"],
        scene.width, scene.height, t["backgrounds"], backend=backend, near=NEAR, far=FAR,
    )  # fmt: skip
    return out, t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backend(scene: Scene, backend: str, device: torch.device, repeats: int) -> float:
    """Milliseconds per view (best of ``repeats`` after a warm-up)."""
    with torch.no_grad():
        render(scene, backend, device)
        best = math.inf
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            render(scene, backend, device)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / scene.viewmats.shape[0]


def compare_images(a, b) -> dict:
    """Max/mean abs diffs of rgb, alpha and (where both alphas > 0.5) depth; PSNR of a.rgb vs b.rgb."""
    rgb = (a.rgb - b.rgb).abs()
    alpha = (a.alpha - b.alpha).abs()
    solid = (a.alpha > 0.5) & (b.alpha > 0.5)
    depth = (a.depth - b.depth).abs()[solid]
    mse = ((a.rgb.clamp(0, 1) - b.rgb.clamp(0, 1)) ** 2).mean().item()
    return {
        "rgb_max": rgb.max().item(),
        "rgb_mean": rgb.mean().item(),
        "alpha_max": alpha.max().item(),
        "alpha_mean": alpha.mean().item(),
        "depth_max": depth.max().item() if depth.numel() else 0.0,
        "depth_mean": depth.mean().item() if depth.numel() else 0.0,
        "solid_fraction": solid.float().mean().item(),
        "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf,
    }


def compare_gradients(scene: Scene, device: torch.device, other: str) -> dict:
    """Cosine similarity of the gradients of one random loss, torch backend vs ``other``."""
    grads = {}
    for backend in ("torch", other):
        out, t = render(scene, backend, device, requires_grad=True)
        gen = torch.Generator(device=device).manual_seed(1)
        w_rgb = torch.rand(out.rgb.shape, generator=gen, device=device)
        w_a = torch.rand(out.alpha.shape, generator=gen, device=device)
        loss = (out.rgb * w_rgb).sum() + (out.alpha * w_a).sum() + 0.1 * (out.depth * out.alpha).sum()
        loss.backward()
        grads[backend] = {k: t[k].grad.detach().flatten() for k in ("colors", "opacities", "means", "scales", "quats")}
    return {
        f"grad_cos_{k}": torch.nn.functional.cosine_similarity(grads["torch"][k], grads[other][k], dim=0).item()
        for k in grads["torch"]
    }


def dense_check(scene: Scene, device: torch.device) -> dict:
    """Tiled reference vs its brute-force compositor on the first view (CPU dry run)."""
    t = scene.tensors(device)
    args = (t["means"], t["quats"], t["scales"], t["opacities"], t["colors"], t["viewmats"][0], t["Ks"][0])
    bg = None if t["backgrounds"] is None else t["backgrounds"][0]
    with torch.no_grad():
        tiled = rasterize_view(*args, scene.width, scene.height, bg, NEAR, FAR)
        dense = rasterize_view(*args, scene.width, scene.height, bg, NEAR, FAR, dense=True)
    return {
        "dense_rgb_max": (tiled[0] - dense[0]).abs().max().item(),
        "dense_alpha_max": (tiled[1] - dense[1]).abs().max().item(),
    }


def within_tolerance(row: dict) -> list[str]:
    keys = ("rgb_mean", "rgb_max", "alpha_mean", "alpha_max", "depth_mean", "depth_max")
    failures = [k for k in keys if row[k] >= TOL[k]]
    failures += [k for k, v in row.items() if k.startswith("grad_cos_") and not v >= TOL["grad_cos_min"]]
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--cpu-dry", action="store_true", help="CPU only, skip gsplat, smaller scenes")
    parser.add_argument("--views", type=int, default=4, help="cameras per scene")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--only", nargs="*", default=None, help="scene names to run (default: all)")
    args = parser.parse_args()

    if args.cpu_dry:
        device, other = torch.device("cpu"), None
        views, repeats = min(args.views, 2), 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on the GPU machine, or pass --cpu-dry", file=sys.stderr)
            return 2
        import gsplat

        device, other, views, repeats = torch.device("cuda"), "gsplat", args.views, args.repeats
        torch.backends.cuda.matmul.allow_tf32 = False  # keep the reference's matmuls in full float32
        torch.backends.cudnn.allow_tf32 = False

    meta = {
        "torch": torch.__version__,
        "gsplat": None if other is None else getattr(sys.modules.get("gsplat"), "__version__", "?"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "mode": "cpu-dry" if args.cpu_dry else "gpu",
        "tolerances": TOL,
    }
    if other is not None and meta["gsplat"] != "1.5.3":
        print(f"warning: gsplat {meta['gsplat']} is installed; this check targets 1.5.3", file=sys.stderr)

    rows = []
    scenes = [s for s in build_scenes(views, small=args.cpu_dry) if args.only is None or s.name in args.only]
    header = (
        f"{'scene':22s} {'N':>6s} {'px':>4s} {'C':>2s} {'torch ms/v':>10s} {'gsplat ms/v':>11s} {'rgb max':>8s} "
        f"{'rgb mean':>9s} {'a max':>8s} {'a mean':>9s} {'d max':>8s} {'d mean':>9s} {'PSNR':>6s}"
    )
    print(f"{meta['mode']} on {meta['device']}, torch {meta['torch']}, gsplat {meta['gsplat']}")
    print(header)
    for scene in scenes:
        row = {
            "scene": scene.name,
            "gaussians": scene.means.shape[-2],
            "width": scene.width,
            "height": scene.height,
            "views": scene.viewmats.shape[0],
            "channels": scene.colors.shape[-1],
            "per_view": scene.means.dim() == 3,
            "torch_ms_per_view": time_backend(scene, "torch", device, repeats),
        }
        if other is not None:
            row["gsplat_ms_per_view"] = time_backend(scene, other, device, repeats)
            with torch.no_grad():
                ref, _ = render(scene, "torch", device)
                gs, _ = render(scene, other, device)
            row.update(compare_images(ref, gs))
            if scene.grad:
                row.update(compare_gradients(scene, device, other))
            row["failures"] = within_tolerance(row)
        elif scene.name == "random_1k_256":
            row.update(dense_check(scene, device))
            row["failures"] = [k for k in ("dense_rgb_max", "dense_alpha_max") if row[k] >= 1e-5]
        else:
            row["failures"] = []
        row["pass"] = not row["failures"]
        rows.append(row)

        def f(key, fmt="8.2e"):
            return format(row[key], fmt) if key in row else "-".rjust(int(fmt.split(".")[0]))

        print(
            f"{row['scene']:22s} {row['gaussians']:6d} {row['width']:4d} {row['channels']:2d} "
            f"{row['torch_ms_per_view']:10.1f} {f('gsplat_ms_per_view', '11.2f')} {f('rgb_max')} "
            f"{f('rgb_mean', '9.2e')} {f('alpha_max')} {f('alpha_mean', '9.2e')} {f('depth_max')} "
            f"{f('depth_mean', '9.2e')} {f('psnr', '6.1f')}"
            + ("" if row["pass"] else f"  FAIL {row['failures']}")
        )
        grads = {k: v for k, v in row.items() if k.startswith("grad_cos_") or k.startswith("dense_")}
        if grads:
            print("    " + "  ".join(f"{k}={v:.6g}" for k, v in grads.items()))

    ok = all(r["pass"] for r in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "scenes": rows, "pass": ok}, indent=2))
    print(("PASS" if ok else "FAIL") + f": results in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
