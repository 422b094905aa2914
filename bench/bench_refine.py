"""Test-time refinement (``--refine-steps``) on held-out clips: what N steps buy, and what they cost.

For each clip (a preprocessed item folder: ``<out>/<item-id>``, its ``preprocess/`` or a packed item of
``tools/pack_training_data.py --first N``) the first tracked frame is the source and the next ``--frames - 1``
tracked frames drive the avatar (self-reenactment, as ``fhavatar evaluate --protocol self``). The network predicts
once; each step count of ``--steps`` refines that prediction (``pipelines.refine.refine_maps``) and is scored:

* PSNR of the frame after the source (the view refinement fits, one frame of motion later);
* self-reenactment PSNR / SSIM / CSIM over all driven frames: 512², the matted foreground (prediction and ground
  truth composited on white with the ground-truth matte), ``pipelines.evaluate.metrics`` (CSIM: dlib's face
  descriptor against the source image; *unavailable* without its wheels);
* seconds per avatar: the prediction plus the refinement, synchronised with the device.

Variants (``--variant "NAME:key=value;key=value"``, RefineConfig fields, values in YAML) compare refinement designs on
the same predictions. Writes ``refine.json`` (everything), ``refine.md`` (the tables) and ``views.png``: per clip,
rows = variant x steps, columns = source | frame after source (truth) | ours | ours at 90° | ours at 180° of a
turntable, to look at what refinement does where the source shows nothing. With ``--save-avatars`` also
``avatars_<clip>.npz`` (the maps of every run, fp16), so that ``--score-avatars DIR`` can add CSIM on another machine
(the GPU machine lacks dlib's and MediaPipe's wheels): it re-renders the saved avatars there (PyTorch rasterizer)
and rewrites DIR's ``refine.json`` / ``refine.md`` with CSIM filled in (PSNR, SSIM and the seconds stay the GPU's).

On the H200 (gsplat; the validation clips preprocessed and carried, e.g. packed with ``--first 60``)::

    . tools/gpu_env.sh
    python3 bench/bench_refine.py build/valdata --out $OUT --device cuda --no-csim --save-avatars

then, on a CPU machine with the same clips::

    python bench/bench_refine.py build/valdata --score-avatars RESULTS_DIR --out RESULTS_DIR

On the CPU at tiny sizes (proves the script; the avatar is the network's K = 256 prediction pooled to K = 64 and a
sparse hair grid, so its numbers say nothing about the product)::

    python bench/bench_refine.py OUT_OF_PREPROCESS --clips lp_d0,st_WDA_KatieHill_000 --steps 0,5 --frames 4 \\
        --size 96 --uv-size 64 --hair-grid 32x8 --no-vertex-samples --device cpu --out /tmp/refine_cpu \\
        --no-csim --save-avatars
    python bench/bench_refine.py OUT_OF_PREPROCESS --clips lp_d0,st_WDA_KatieHill_000 --device cpu \\
        --score-avatars /tmp/refine_cpu --out /tmp/refine_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.avatar.binding import AvatarRig  # noqa: E402
from pipelines.avatar.complete import CompleteConfig, complete_maps  # noqa: E402
from pipelines.avatar.maps import pool_maps  # noqa: E402
from pipelines.config import from_dict  # noqa: E402
from pipelines.evaluate.metrics import MetricsConfig, compute_metrics  # noqa: E402
from pipelines.head.registry import load_head_model  # noqa: E402
from pipelines.network.inference import predict_avatar  # noqa: E402
from pipelines.network.weights import load_network  # noqa: E402
from pipelines.reconstruct import SourceFrame  # noqa: E402
from pipelines.refine import RefineConfig, refine_maps  # noqa: E402
from pipelines.train.data import Clip, find_items, item_name, load_val_clip, matches, resize_images  # noqa: E402
from pipelines.train.forward import render_rig  # noqa: E402
from pipelines.train.validate import render_reenactment  # noqa: E402
from pipelines.turntable import TurntableConfig, turntable_cameras  # noqa: E402
from pipelines.uv.space import UVConfig, load_or_build_uv_space  # noqa: E402

VALIDATION = ("lp_d0", "st_WDA_KatieHill_000", "vrt_4", "pcavs_00104", "smirk_dafoe")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_fields(text: str) -> tuple[str, dict]:
    """"name:key=value;key=value" -> (name, {key: value}), values in YAML syntax."""
    import yaml

    name, _, rest = text.partition(":")
    fields = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        fields[key.strip()] = yaml.safe_load(value)
    return name, fields


def parse_variant(text: str) -> tuple[str, RefineConfig]:
    """"name:key=value;key=value" -> (name, RefineConfig with those fields); "default" alone is the defaults."""
    name, fields = parse_fields(text)
    return name, from_dict(RefineConfig, fields).validate()


def parse_completion(text: str) -> tuple[str, CompleteConfig | None]:
    """"none" -> no completion; "name:key=value;..." -> (name, CompleteConfig(enabled=True) with those fields)."""
    name, fields = parse_fields(text)
    if name == "none" and not fields:
        return name, None
    return name, from_dict(CompleteConfig, {"enabled": True, **fields}).validate()


def turntable_views(rig: AvatarRig, head, src: SourceFrame, size: int, yaws=(90.0, 180.0)) -> list[np.ndarray]:
    """Renders (size, size, 3) of the avatar at the given turntable yaws (source expression, head facing +z)."""
    params = src.params.to(src.image.device)  # a copy
    params.rotation = torch.zeros_like(params.rotation)
    params.translation = torch.zeros_like(params.translation)
    cams = turntable_cameras(TurntableConfig(frames=4, yaw_range=360.0), tuple(head.head_center().tolist()))
    out = []
    with torch.no_grad():
        verts = head(params)
        for yaw in yaws:
            i = int(round(yaw / 90.0)) % 4
            r = render_rig(rig, verts, cams.c2w[i : i + 1].to(verts), cams.K[i : i + 1].to(verts), size)
            out.append(r.rgb[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    return out


def score(frames: np.ndarray, clip, with_csim: bool) -> dict:
    gt = clip.tgt_img.permute(0, 2, 3, 1).cpu().numpy()
    mask = clip.tgt_matte.permute(0, 2, 3, 1).cpu().numpy()
    source = clip.src_img[0].permute(1, 2, 0).cpu().numpy()
    which = {"psnr", "ssim"} | ({"csim"} if with_csim else set())
    res = compute_metrics(frames, gt, source, mask, which, foreground=True, config=MetricsConfig())
    out = {"frames": int(res.n_frames), "after_source_psnr": float(res.per_frame["psnr"][0])}
    out.update({k: res.mean.get(k) for k in sorted(which)})
    out["models"] = dict(res.models)
    out["unavailable"] = dict(res.unavailable)
    return out


def run_clip(folder: Path, args, head, net, variants, device, completions=(("none", None),)
             ) -> tuple[dict, np.ndarray]:
    size = args.size
    clip = Clip(folder, size)
    clip.name = next((n for n in args.clips.split(",") if matches(clip.name, (n,))), clip.name)  # without the hash
    vc = load_val_clip(clip, args.frames - 1).to(device)
    src = SourceFrame(vc.src_img[0], vc.src_matte[0], vc.src_params, vc.K[0], vc.src_c2w[0])
    uv_net = load_or_build_uv_space(head, UVConfig(size=net.config.uv_size), device=device)
    img = resize_images(vc.src_img, net.config.image_size)
    uv = avatar_uv(head, args, net.config.uv_size, device)
    for timed in (False, True):  # the first pass warms up kernels (gsplat, cuDNN) and is not timed
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            pred = predict_avatar(net, head, uv_net, img, vc.src_params, vc.src_c2w, vc.K)
        sync(device)
        predict_s = time.perf_counter() - t0
        maps = pool_maps(pred.A, uv.size)  # no-op at the network's K
        dp = F.avg_pool2d(pred.delta_p_canonical, net.config.uv_size // uv.size)
        if not timed:
            refine_maps(maps, dp, src, head, uv, 2, variants[0][1], backend=args.renderer)
    result = {"name": clip.name, "folder": str(folder), "targets": len(vc.frames) - 1, "predict_seconds": predict_s,
              "runs": []}
    view = max(64, size // 2)
    picture = []
    saved = {"delta_p": dp[0].half().cpu().numpy()}
    pred_maps, pred_dp = maps, dp
    for cname, ccfg in completions:
        complete_s, complete_info = 0.0, {}
        maps, dp = pred_maps, pred_dp
        if ccfg is not None:  # as reconstruct(): completion on the prediction, then refinement
            sync(device)
            t0 = time.perf_counter()
            maps, dp, complete_info = complete_maps(pred_maps, pred_dp, src, head, uv, ccfg)
            sync(device)
            complete_s = time.perf_counter() - t0
            saved[f"delta_p__{cname}"] = dp[0].half().cpu().numpy()
        unrefined = None  # 0 steps is the same avatar for every variant: scored once
        for vname0, cfg in variants:
            vname = vname0 if len(completions) == 1 and ccfg is None else f"{cname}+{vname0}"
            cfg = dataclasses.replace(cfg, render_size=args.refine_size or cfg.render_size)
            for steps in args.steps:
                if steps == 0 and unrefined is not None:
                    result["runs"].append({**unrefined[0], "variant": vname})
                    picture.append(unrefined[1])
                    saved[f"{vname}__0"] = saved[unrefined[2]]
                    continue
                sync(device)
                t0 = time.perf_counter()
                A, report = refine_maps(maps, dp, src, head, uv, steps, cfg, backend=args.renderer) if steps \
                    else (maps, {})
                sync(device)
                refine_s = time.perf_counter() - t0
                saved[f"{vname}__{steps}"] = A[0].half().cpu().numpy()
                rig = AvatarRig(head, uv, A, vc.src_params.shape, dp)
                frames, _ = render_reenactment(rig, head, vc, size, backend=args.renderer)
                run = {"variant": vname, "completion": cname, "steps": steps, "refine_seconds": refine_s,
                       "complete_seconds": complete_s, "seconds_per_avatar": predict_s + complete_s + refine_s,
                       **score(frames, vc, not args.no_csim),
                       "source_psnr": [report.get("source_psnr_before"), report.get("source_psnr_after")],
                       "guard_pixels": complete_info.get("guard_pixels")}
                result["runs"].append(run)
                print(f"{clip.name:28s} {vname:12s} {steps:4d} steps: after-source {run['after_source_psnr']:.2f} dB, "
                      f"PSNR {run['psnr']:.2f}, SSIM {run['ssim']:.4f}, CSIM {run.get('csim')}, "
                      f"{run['seconds_per_avatar']:.2f} s", flush=True)
                small = lambda x: F.interpolate(torch.as_tensor(x).permute(2, 0, 1)[None], size=(view, view),  # noqa
                                                mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
                side = turntable_views(rig, head, src, view)
                picture.append(np.concatenate([small(vc.src_img[0].permute(1, 2, 0).cpu().numpy()),
                                               small(vc.tgt_img[0].permute(1, 2, 0).cpu().numpy()),
                                               small(frames[0]), *side], 1))
                if steps == 0:
                    unrefined = (run, picture[-1], f"{vname}__0")
    if args.save_avatars:
        np.savez_compressed(args.out / f"avatars_{clip.name}.npz", **saved)
    return result, (np.concatenate(picture, 0) * 255 + 0.5).astype(np.uint8)


def avatar_uv(head, args, network_K: int, device):
    """The UV space the avatars are bound with: the product's (K of the network, 1024 x 128 hair grid, vertex
    samples) unless the CPU-proof options shrink it."""
    cols, rows = args.hair_grid
    return load_or_build_uv_space(head, UVConfig(size=args.uv_size or network_K, hair_grid_cols=cols,
                                                 hair_grid_rows=rows, include_vertices=args.vertex_samples),
                                  device=device)


def score_saved(args, items: list[Path], head, device) -> int:
    """``--score-avatars DIR``: CSIM of the avatars saved by a ``--save-avatars`` run, merged into its results."""
    done = json.loads((args.score_avatars / "refine.json").read_text())
    meta = done["meta"]
    args.uv_size, args.hair_grid, args.vertex_samples = meta["uv_size"], tuple(meta["hair_grid"]), meta["vertex_samples"]
    uv = avatar_uv(head, args, meta["uv_size"], device)
    by_name = {item_name(d): d for d in items}
    for clip_res in done["clips"]:
        folder = next(d for n, d in by_name.items() if matches(n, (clip_res["name"],)))
        vc = load_val_clip(Clip(folder, meta["size"]), meta["frames"] - 1).to(device)
        with np.load(args.score_avatars / f"avatars_{clip_res['name']}.npz") as z:
            for run in clip_res["runs"]:
                key = f"delta_p__{run.get('completion')}"
                dp = torch.from_numpy(z[key if key in z.files else "delta_p"]).float()[None].to(device)
                A = torch.from_numpy(z[f"{run['variant']}__{run['steps']}"]).float()[None].to(device)
                rig = AvatarRig(head, uv, A, vc.src_params.shape, dp)
                res = score(render_reenactment(rig, head, vc, meta["size"], backend="torch")[0], vc, True)
                run["csim"], run["csim_scored_on"] = res["csim"], "cpu (saved avatars)"
                run["models"].update(res["models"])
                run["unavailable"] = {k: v for k, v in res["unavailable"].items() if k == "csim"}
                print(f"{clip_res['name']:24s} {run['variant']:12s} {run['steps']:4d} steps: CSIM {run['csim']}",
                      flush=True)
    done["summary"] = summarise(done["clips"])
    write_results(args.out, done)
    return 0


def write_results(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "refine.json").write_text(json.dumps(results, indent=1))
    text = markdown(results["summary"], results["clips"], results["meta"])
    (out / "refine.md").write_text(text)
    print(text)


def summarise(clips: list[dict]) -> list[dict]:
    """Per (variant, steps): frame-weighted means over all driven frames, mean over clips of the frame after the
    source and of the seconds per avatar."""
    keys = sorted({(r["variant"], r["steps"]) for c in clips for r in c["runs"]}, key=lambda k: (k[0] != "default",
                                                                                                   k[0], k[1]))
    rows = []
    for variant, steps in keys:
        runs = [r for c in clips for r in c["runs"] if (r["variant"], r["steps"]) == (variant, steps)]
        n = np.array([r["frames"] for r in runs], float)
        row = {"variant": variant, "steps": steps, "clips": len(runs), "frames": int(n.sum()),
               "after_source_psnr": float(np.mean([r["after_source_psnr"] for r in runs])),
               "seconds_per_avatar": float(np.mean([r["seconds_per_avatar"] for r in runs]))}
        for m in ("psnr", "ssim", "csim"):
            vals = [r.get(m) for r in runs]
            row[m] = None if any(v is None for v in vals) else float(np.sum(n * np.array(vals)) / n.sum())
        rows.append(row)
    return rows


def markdown(summary: list[dict], clips: list[dict], meta: dict) -> str:
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"Refinement on {len(clips)} clip(s) ({', '.join(c['name'] for c in clips)}), {meta['device_name']}, "
             f"{meta['size']}² matted, UV {meta['uv_size']}; frames = driven frames over all clips.", "",
             "| variant | steps | PSNR frame after source ↑ | PSNR ↑ | SSIM ↑ | CSIM ↑ | s / avatar |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary:
        lines.append(f"| {r['variant']} | {r['steps']} | {f(r['after_source_psnr'])} | {f(r['psnr'])} | "
                     f"{f(r['ssim'], 4)} | {f(r['csim'], 4)} | {f(r['seconds_per_avatar'])} |")
    lines += ["", "| clip | variant | steps | frame after source | PSNR | SSIM | source view before → after | s |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for c in clips:
        for r in c["runs"]:
            b, a = r["source_psnr"]
            fit = f"{f(b)} → {f(a)}" if a is not None else "—"
            lines.append(f"| {c['name']} | {r['variant']} | {r['steps']} | {f(r['after_source_psnr'])} | "
                         f"{f(r['psnr'])} | {f(r['ssim'], 4)} | {fit} | {f(r['seconds_per_avatar'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="+", type=Path, help="preprocessed item folders, or folders of them")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clips", default=",".join(VALIDATION), help="names of the clips to use (the validation split)")
    ap.add_argument("--steps", default="0,50,200,500", help="comma-separated refinement step counts")
    ap.add_argument("--frames", type=int, default=60, help="frames per clip, the source included")
    ap.add_argument("--size", type=int, default=512, help="frame and render size")
    ap.add_argument("--refine-size", type=int, default=0, help="RefineConfig.render_size (0: the variant's)")
    ap.add_argument("--uv-size", type=int, default=0, help="pool the predicted maps to this K (CPU proofs only)")
    ap.add_argument("--hair-grid", default="1024x128", help="UV hair grid columns x rows (the product's: 1024x128)")
    ap.add_argument("--no-vertex-samples", dest="vertex_samples", action="store_false",
                    help="no Gaussians at the mesh vertices (CPU proofs only)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value;... RefineConfig overrides")
    ap.add_argument("--head-model", default="embedded", help="the head model the clips were tracked with")
    ap.add_argument("--weights", default=None, help="network checkpoint (default: the shipped weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--renderer", default="auto")
    ap.add_argument("--no-csim", action="store_true", help="skip CSIM (dlib on the CPU: ~0.1 s a frame)")
    ap.add_argument("--complete", action="append", default=[],
                    help='completion before refinement: "none", or NAME:key=value;... CompleteConfig overrides '
                         '(enabled); each one runs every --variant and --steps')
    ap.add_argument("--save-avatars", action="store_true", help="also write avatars_<clip>.npz (for --score-avatars)")
    ap.add_argument("--score-avatars", type=Path, default=None,
                    help="a --save-avatars results folder: add CSIM to it here (CPU), no refinement run")
    args = ap.parse_args()
    args.steps = [int(s) for s in args.steps.split(",")]
    args.hair_grid = tuple(int(x) for x in args.hair_grid.lower().split("x"))
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    completions = [parse_completion(c) for c in (args.complete or ["none"])]
    device = torch.device(args.device)
    torch.manual_seed(0)

    names = tuple(n for n in args.clips.split(",") if n)
    items = [d for d in find_items(args.data) if matches(item_name(d), names)]
    missing = [n for n in names if not any(matches(item_name(d), (n,)) for d in items)]
    if missing:
        print(f"error: clip(s) {missing} not found under {[str(d) for d in args.data]}", file=sys.stderr)
        return 2
    head = load_head_model(args.head_model, device=device)
    if args.score_avatars is not None:
        return score_saved(args, items, head, device)
    net = load_network(args.weights, str(device))
    args.out.mkdir(parents=True, exist_ok=True)
    clips, pictures = [], []
    for folder in items:
        res, picture = run_clip(folder, args, head, net, variants, device, completions)
        clips.append(res)
        pictures.append(picture)
    import imageio.v3 as iio

    iio.imwrite(args.out / "views.png", np.concatenate(pictures, 0))
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "CPU", "torch": torch.__version__, "size": args.size,
            "uv_size": args.uv_size or net.config.uv_size, "hair_grid": list(args.hair_grid),
            "vertex_samples": args.vertex_samples, "frames": args.frames, "steps": args.steps,
            "variants": {n: dataclasses.asdict(c) for n, c in variants}, "renderer": args.renderer,
            "completions": {n: c and dataclasses.asdict(c) for n, c in completions},
            "threads": torch.get_num_threads()}
    write_results(args.out, {"meta": meta, "summary": summarise(clips), "clips": clips})
    return 0


if __name__ == "__main__":
    sys.exit(main())
