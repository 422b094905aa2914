"""Measure the back of the head (issue 18): colour at 180°, holes at 0/45/90/135/180°, completion off vs on.

For every photo (default: the 25 ``d3dfr_*`` and the 12 LivePortrait ``lp_*`` portraits of ../shared/data/portraits)
the avatar is built twice — ``ReconstructConfig.complete`` off ("before") and on ("after"), the rest identical — and
rendered as a turntable does (the source expression, head rotation and translation removed, camera on the
``TurntableConfig`` orbit around the head centre) at each yaw of ``--yaws``. Per photo and condition:

* **ΔE180**: the mean CIE76 colour distance (CIELAB, D65) between the 180° render's head pixels and the mean colour of
  the source's visible hair. Hair pixels of the source: inside the matte, outside the head's skin (the posed source
  mesh without its hair cap, ``complete.image_hair_region``: face below the hairline height, ears, neck), above
  the ears' lowest point. Head pixels of the render: alpha > 0.5 (colour un-premultiplied from the white
  background), above the ears' lowest point in that view (the neck is skin, not hair);
* **holes@yaw**: the fraction of near-transparent pixels (alpha < 0.5) inside the head's silhouette. The silhouette
  is a closed reference: the head mesh itself (posed as rendered, without the avatar's offsets) rasterized exactly
  (``complete.rasterize_mask``) and eroded by ``--erode`` pixels so that the anti-aliased rim does not count,
  intersected with the avatar's own silhouette closed (alpha > 0.5, morphological closing by ``--close`` pixels,
  holes filled): a network that pulls the head's Gaussians inside the mesh where the matte is smaller (the embedded
  head's crown) draws a smaller head, not a hole. **holes_mesh@yaw** is the same inside the mesh's silhouette
  alone (that shrinkage counted);
* **source view**: PSNR of the render from the source camera against the source photo over the matte (both on
  white) — the frontal/source-view check: completion must not make it worse.

``--clips`` (preprocessed video folders) adds the validation check: the avatar of frame 0 renders frame 0 and
``--clip-frames`` later frames with their tracking; PSNR over the matte against the frames, before vs after.

Writes ``<out>/measure_360.json`` (everything), ``measure_360.md`` (tables, means) and, with ``--contact-sheet``,
a JPEG: per photo of ``--sheet-photos`` a row before and a row after, columns source | 0° | 45° | 90° | 135° | 180°.

CPU, both heads (a few minutes each, 256² renders)::

    python tools/measure_360.py --method unproject --head-model ict --pp-root /work/pp --pp-root /tmp/pp_ict \\
        --out /tmp/m360_unproject --contact-sheet docs/back_of_head_contact_unproject.jpg
    python tools/measure_360.py --method network --head-model embedded --pp-root /tmp/pp_emb --out /tmp/m360_net \\
        --clips /work/pp/lp_d0-63f6f9962e,...   # the network needs the head its weights were trained on

Photos without a preprocess under a ``--pp-root`` are preprocessed into ``<out>/pp`` with the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.animate import render_sequence  # noqa: E402
from pipelines.avatar.artifact import Avatar  # noqa: E402
from pipelines.avatar.binding import AvatarRig  # noqa: E402
from pipelines.avatar.complete import CompleteConfig, hair_cap, image_hair_region, rasterize_mask  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.core.camera import Camera, fov_to_focal, normalized_intrinsics, orbit_cameras, world_to_camera  # noqa: E402
from pipelines.head.base import REGIONS  # noqa: E402
from pipelines.turntable import TurntableConfig  # noqa: E402

PORTRAITS = ROOT.parent / "shared" / "data" / "portraits"
DEFAULT_SHEET = ("d3dfr_000002", "d3dfr_000050", "d3dfr_015270", "d3dfr_vd025", "lp_s0", "lp_s5")


# ------------------------------------------------------------------------------------------------- colour space
def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (..., 3), D65 white."""
    c = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    M = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ M.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# ---------------------------------------------------------------------------------------------------- renders
def orbit(yaws: list[float], size: int, target) -> Camera:
    tc = TurntableConfig(frames=len(yaws), size=size)
    c2w = orbit_cameras(torch.tensor(yaws, dtype=torch.float32), torch.zeros(len(yaws)), tc.radius, target)
    return Camera(normalized_intrinsics(fov_to_focal(tc.fov), len(yaws)), c2w)


def render(rig: AvatarRig, params, cams: Camera, size: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """rgb (B, H, W, 3) and alpha (B, H, W) in [0, 1] on white."""
    frames = list(render_sequence(rig, params, cams, size, (1.0, 1.0, 1.0), backend, batch_size=len(cams)))
    return (np.stack([f.rgb for f in frames]).astype(np.float64) / 255, np.stack([f.alpha for f in frames])
            .astype(np.float64) / 255)


def ear_bottom_row(head, verts: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor, size: int) -> float:
    """Image row (pixels, down) of the ears' lowest point."""
    from pipelines.core.camera import project_points

    ids = head.faces[head.face_region == REGIONS["ears"]].reshape(-1)
    pts = verts[ids] if len(ids) else verts
    uv, _ = project_points(pts[None], w2c[None], K[None])
    return float(uv[0, :, 1].max()) * size


def source_view_target(frame) -> np.ndarray:
    """(H, W, 3) float64: what a render of ``frame``'s view is scored against, the photo on white as the product and
    the pixel guard see it (``refine.source_target``). ``frame.image`` is already composited on the preprocess
    background, so compositing it on white again with the matte would brighten every soft-matte rim pixel."""
    from pipelines.refine import source_target

    return source_target(frame, frame.image.shape[-1])[0][0].permute(1, 2, 0).cpu().numpy().astype(np.float64)


def measure_photo(name: str, pp: Path, head, uv, rcfg, net, yaws, size, erode, close, backend, device) -> dict:
    from scipy.ndimage import binary_closing, binary_erosion, binary_fill_holes

    from pipelines.reconstruct import load_source, reconstruct

    source = load_source(pp).to(device)
    posed = head(source.params)[0]
    canonical = head.canonical(source.params.shape)[0]
    cap = hair_cap(head, canonical, CompleteConfig().hairline_above_eyes)
    w2c_src = world_to_camera(source.c2w[None])[0]
    hair = image_hair_region(source.matte, head, posed, cap, w2c_src, source.K)
    img = source.image.permute(1, 2, 0).cpu().numpy().astype(np.float64)
    hair_lab = rgb_to_lab(img[hair]).mean(0) if hair.sum() > 64 else None
    # The turntable pose and its reference silhouettes (the mesh without offsets).
    params = replace(source.params)
    params.rotation = torch.zeros_like(params.rotation)
    params.translation = torch.zeros_like(params.translation)
    cams = orbit(yaws, size, tuple(float(x) for x in head.head_center().tolist()))
    verts = head(params)[0]
    ref, rows = [], []
    for b in range(len(yaws)):
        w2c = world_to_camera(cams.c2w[b : b + 1].to(device))[0]
        m = rasterize_mask(verts, head.faces, w2c, cams.K[b].to(device), size)
        ref.append(binary_erosion(m, iterations=erode) if erode else m)
        rows.append(ear_bottom_row(head, verts, w2c, cams.K[b].to(device), size))
    src_cam = Camera(source.K[None].cpu(), source.c2w[None].cpu())
    gt = source_view_target(source)
    matte = source.matte[0].cpu().numpy() > 0.5
    out = {"photo": name, "hair_pixels": int(hair.sum()),
           "hair_rgb": [round(float(c), 4) for c in img[hair].mean(0)] if hair.sum() else None}
    views = {}
    for cond, on in (("before", False), ("after", True)):
        cfg = replace(rcfg, complete=replace(rcfg.complete, enabled=on))
        t0 = time.time()
        avatar: Avatar = reconstruct(source, head, uv, cfg, net)
        seconds = time.time() - t0
        rig = AvatarRig(head, uv, avatar.maps_tensor(device), source.params.shape,
                        avatar.delta_p_tensor(device))
        rgb, alpha = render(rig, params, cams, size, backend)
        res = {}
        for b, y in enumerate(yaws):
            closed = binary_fill_holes(binary_closing(alpha[b] > 0.5, iterations=close, border_value=0))
            res[f"holes@{int(y)}"] = round(float((alpha[b][ref[b] & closed] < 0.5).mean()), 5)
        for b, y in enumerate(yaws):
            res[f"holes_mesh@{int(y)}"] = round(float((alpha[b][ref[b]] < 0.5).mean()), 5)
        res["seconds"] = round(seconds, 2)
        if 180.0 in yaws and hair_lab is not None:
            b = yaws.index(180.0)
            a = alpha[b]
            sel = (a > 0.5) & (np.arange(size)[:, None] < rows[b])
            col = ((rgb[b] - (1 - a[..., None])) / np.maximum(a[..., None], 1e-6)).clip(0, 1)
            res["dE180"] = round(float(np.linalg.norm(rgb_to_lab(col[sel]) - hair_lab, axis=-1).mean()), 2)
        s_rgb, s_alpha = render(rig, source.params, src_cam, source.image.shape[-1], backend)
        err = ((s_rgb[0] - gt) ** 2)[matte].mean()
        res["source_psnr"] = round(float(-10 * np.log10(max(err, 1e-12))), 3)
        err_all = ((s_rgb[0] - gt) ** 2).mean()  # every pixel, both on white
        res["source_psnr_all"] = round(float(-10 * np.log10(max(err_all, 1e-12))), 3)
        res["source_alpha_iou"] = round(float(((s_alpha[0] > 0.5) & matte).sum() / ((s_alpha[0] > 0.5) | matte).sum()), 4)
        if on:
            res["complete"] = avatar.meta.get("complete")
        out[cond] = res
        views[cond] = rgb
    return out, views, (gt * 255).astype(np.uint8)


def measure_clip(name: str, pp: Path, head, uv, rcfg, net, frames: int, backend, device) -> dict:
    """Frame 0 is the source; it and ``frames`` later tracked frames (evenly spaced) are rendered and scored."""
    from pipelines.reconstruct import load_source, reconstruct
    from pipelines.tracking.result import load_tracking

    n = load_tracking(pp / "tracking.npz").num_frames
    idx = [0] + sorted(set(np.linspace(0, n - 1, frames + 1).round().astype(int).tolist()[1:]))
    source = load_source(pp, 0).to(device)
    targets = [load_source(pp, i).to(device) for i in idx]
    out = {"clip": name, "frames": idx}
    for cond, on in (("before", False), ("after", True)):
        cfg = replace(rcfg, complete=replace(rcfg.complete, enabled=on))
        avatar = reconstruct(source, head, uv, cfg, net)
        rig = AvatarRig(head, uv, avatar.maps_tensor(device), source.params.shape, avatar.delta_p_tensor(device))
        psnrs = []
        for t in targets:
            rgb, _ = render(rig, t.params, Camera(t.K[None].cpu(), t.c2w[None].cpu()), t.image.shape[-1], backend)
            m = t.matte[0, ..., None].cpu().numpy()
            gt = source_view_target(t)
            psnrs.append(float(-10 * np.log10(max(((rgb[0] - gt) ** 2)[m[..., 0] > 0.5].mean(), 1e-12))))
        out[cond] = {"source_psnr": round(psnrs[0], 3), "later_psnr": round(float(np.mean(psnrs[1:])), 3)}
    return out


# ---------------------------------------------------------------------------------------------------- outputs
def contact_sheet(rows: list[tuple[str, np.ndarray, dict]], path: Path, tile: int) -> None:
    """Per photo: a row before, a row after; columns source | each yaw. JPEG (quality lowered until < 1 MB)."""
    import io

    from PIL import Image, ImageDraw

    def t(img: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((tile, tile), Image.LANCZOS))

    lines = []
    for name, src, views in rows:
        for cond in ("before", "after"):
            cells = [t(src)] + [t((v * 255).round().astype(np.uint8)) for v in views[cond]]
            line = Image.fromarray(np.concatenate(cells, 1))
            ImageDraw.Draw(line).text((4, 4), f"{name} {cond}", fill=(0, 0, 0))
            lines.append(np.asarray(line))
    sheet = Image.fromarray(np.concatenate(lines, 0))
    for q in (88, 80, 70, 60, 50):
        buf = io.BytesIO()
        sheet.save(buf, "JPEG", quality=q, optimize=True)
        if buf.tell() < 1_000_000:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def mean_of(results: list[dict], cond: str, key: str) -> float | None:
    vals = [r[cond][key] for r in results if key in r.get(cond, {})]
    return round(float(np.mean(vals)), 4) if vals else None


def markdown(results: list[dict], clips: list[dict], yaws, header: str) -> str:
    """Two tables (colour and source view; holes as before -> after) with the means, then the clips."""
    fmt = lambda v, pct=False: "–" if v is None else (f"{100 * v:.2f}" if pct else f"{v:.2f}")  # noqa: E731
    pair = lambda r, k, pct=False: f"{fmt(r['before'].get(k), pct)} → {fmt(r['after'].get(k), pct)}"  # noqa: E731
    mean = ({c: {k: mean_of(results, c, k) for k, v in results[0][c].items() if isinstance(v, (int, float))}
             for c in ("before", "after")} if results else {})
    rows = results + ([{"photo": "**mean**", **mean}] if results else [])
    out = [header, "", "| photo | ΔE180 | source PSNR (dB) | source alpha IoU |", "|---|---|---|---|"]
    out += [f"| {r['photo']} | {pair(r, 'dE180')} | {pair(r, 'source_psnr')} | {pair(r, 'source_alpha_iou')} |"
            for r in rows]
    for key, title in (("holes", "holes (% of the closed head silhouette, alpha < 0.5)"),
                       ("holes_mesh", "holes inside the mesh silhouette alone (%)")):
        out += ["", f"{title}, before → after:", "",
                "| photo | " + " | ".join(f"{int(y)}°" for y in yaws) + " |", "|---|" + "---|" * len(yaws)]
        out += [f"| {r['photo']} | " + " | ".join(pair(r, f"{key}@{int(y)}", True) for y in yaws) + " |" for r in rows]
        worst = [max(r["after"].get(f"{key}@{int(y)}", 0) for r in results) for y in yaws] if results else []
        out.append("| worst after | " + " | ".join(fmt(w, True) for w in worst) + " |")
    if clips:
        out += ["", "| clip | source PSNR before → after | later-frame PSNR before → after |", "|---|---|---|"]
        out += [f"| {c['clip']} | {c['before']['source_psnr']:.2f} → {c['after']['source_psnr']:.2f} | "
                f"{c['before']['later_psnr']:.2f} → {c['after']['later_psnr']:.2f} |" for c in clips]
    return "\n".join(out) + "\n"


def find_preprocess(photo: Path, roots: list[Path], work: Path, head) -> Path:
    """A finished preprocess of ``photo`` under one of ``roots`` (``<root>/<stem>-<hash>/preprocess``), else one
    made in ``work`` with the defaults."""
    from pipelines.stages import preprocessed_dir
    from pipelines.store import item_id

    iid = item_id(photo)
    for r in roots:
        cand = r / iid / "preprocess"
        if (cand / "tracking.npz").is_file() and (cand / "frames" / "000000.png").is_file():
            man = json.loads((cand / "manifest.json").read_text()) if (cand / "manifest.json").is_file() else {}
            if man.get("settings", {}).get("tracking", {}).get("head", head.name) == head.name:
                return cand
    return preprocessed_dir(photo, work, head)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("photos", nargs="*", type=Path, help="Portraits (default: the d3dfr_* and lp_* of ../shared).")
    ap.add_argument("--method", default="unproject", choices=("unproject", "network"))
    ap.add_argument("--head-model", default="ict")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--pp-root", action="append", type=Path, default=[], help="Folders of preprocessed items.")
    ap.add_argument("--clips", default="", help="Comma-separated preprocessed clip folders (the validation check).")
    ap.add_argument("--clip-frames", type=int, default=3)
    ap.add_argument("--yaws", default="0,45,90,135,180")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--erode", type=int, default=2, help="Pixels the reference silhouette is eroded by.")
    ap.add_argument("--close", type=int, default=6, help="Pixels of the closing of the avatar's own silhouette.")
    ap.add_argument("--uv-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--renderer", default="auto")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contact-sheet", type=Path, default=None)
    ap.add_argument("--sheet-photos", default=",".join(DEFAULT_SHEET))
    ap.add_argument("--tile", type=int, default=160)
    ap.add_argument("--report-only", action="store_true", help="Rewrite measure_360.md from <out>/measure_360.json.")
    ap.add_argument("--complete-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="A CompleteConfig field for the 'after' avatars, e.g. keep_neck=true (repeatable).")
    a = ap.parse_args(argv)
    if a.report_only:
        data = json.loads((a.out / "measure_360.json").read_text())
        st = data["settings"]
        header = (f"measure_360: --method {st['method']} --head-model {st['head_model']}, {len(data['photos'])} "
                  f"photos, {st['size']}² renders")
        (a.out / "measure_360.md").write_text(markdown(data["photos"], data["clips"],
                                                       [float(y) for y in st["yaws"].split(",")], header))
        print((a.out / "measure_360.md").read_text())
        return 0

    from pipelines.head.registry import load_head_model
    from pipelines.reconstruct import ReconstructConfig, with_network
    from pipelines.uv.space import UVConfig, load_or_build_uv_space

    torch.set_grad_enabled(False)
    photos = a.photos or sorted(PORTRAITS.glob("d3dfr_*")) + sorted(PORTRAITS.glob("lp_*"))
    yaws = [float(y) for y in a.yaws.split(",")]
    head = load_head_model(a.head_model, device=a.device)
    complete = load_config(CompleteConfig, None, a.complete_set)  # --complete-set FIELD=VALUE, values in YAML syntax
    rcfg, net = with_network(ReconstructConfig(method=a.method, uv_size=a.uv_size, weights=a.weights,
                                               complete=complete).validate(), a.device)
    uv = load_or_build_uv_space(head, UVConfig(size=rcfg.uv_size), device=a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    sheet_names = [s for s in a.sheet_photos.split(",") if s]
    results, sheet = [], {}
    for photo in photos:
        pp = find_preprocess(photo, a.pp_root, a.out / "pp", head)
        r, views, src = measure_photo(photo.stem, pp, head, uv, rcfg, net, yaws, a.size, a.erode, a.close,
                                     a.renderer, a.device)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k in ("photo", "before", "after")} | {
            "after": {k: v for k, v in r["after"].items() if k != "complete"}}), flush=True)
        if photo.stem in sheet_names:
            sheet[photo.stem] = (photo.stem, src, views)
    clips = []
    for c in [Path(c) for c in a.clips.split(",") if c]:
        pp = c / "preprocess" if (c / "preprocess").is_dir() else c
        clips.append(measure_clip(c.name, pp, head, uv, rcfg, net, a.clip_frames, a.renderer, a.device))
        print(json.dumps(clips[-1]), flush=True)
    header = (f"measure_360: --method {a.method} --head-model {a.head_model}, {len(results)} photos, "
              f"{a.size}² renders, K = {rcfg.uv_size}"
              + (f", after with --complete-set {' '.join(a.complete_set)}" if a.complete_set else ""))
    (a.out / "measure_360.json").write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "photos": results,
                                                        "clips": clips}, indent=1, default=str))
    (a.out / "measure_360.md").write_text(markdown(results, clips, yaws, header))
    if a.contact_sheet and sheet:
        contact_sheet([sheet[n] for n in sheet_names if n in sheet], a.contact_sheet, a.tile)
    print((a.out / "measure_360.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
