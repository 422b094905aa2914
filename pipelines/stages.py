"""Per-item stage jobs used by the CLI and ``fhavatar run``: each reads artifacts and writes artifacts.

Every job returns ``(status, outputs)`` with status ``done`` or ``skipped`` (up to date) and raises a
``FhavatarError`` naming the input on bad inputs; ``pipelines.batch.run_batch`` isolates failures.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from .batch import run_stage
from .errors import InputError
from .store import IMAGE_EXTS, VIDEO_EXTS, Manifest, hash_file, item_id, outputs_intact

Progress = Callable[[int], None] | None


def make_track_hook(head, tracking_cfg=None, landmarks: str = "mediapipe", photometric=None):
    """The preprocess hook that fits the head model to the landmarks and writes ``tracking.npz``.

    ``landmarks``: "mediapipe" tracks on the 478-point mesh of ``landmarks.npz``; "fan" / "dlib" first detects 68
    points on the crops (``landmarks68.npz``) and tracks on those, placed at their MediaPipe indices.
    ``photometric``: a ``PhotometricConfig`` to refine the tracking with the crops' colours afterwards (videos;
    writes ``photometric.json`` with what it changed), or None.
    """
    from .preprocess.landmarks68 import LANDMARKS68, run_landmarks68, to_mediapipe_layout
    from .tracking.fit import track
    from .tracking.photometric import PHOTOMETRIC_REPORT
    from .tracking.result import save_tracking

    def hook(stage_dir: Path, result) -> list[str]:
        with np.load(stage_dir / "landmarks.npz", allow_pickle=False) as z:
            lmk, valid, K, c2w = z["lmk478"][..., :2], z["valid"], z["K"], z["c2w"]
            size = int(z["size"]) if "size" in z.files else 512
        files = ["tracking.npz"]
        if landmarks != "mediapipe":
            lmk68, valid = run_landmarks68(stage_dir, landmarks, lmk, valid)
            lmk = to_mediapipe_layout(lmk68)
            if not valid.any():
                raise InputError(f"the {landmarks} 68-point model found no face in any frame of '{stage_dir}'",
                                 "use --landmarks mediapipe (the default)")
            files.append(LANDMARKS68)
        res = track(head, lmk, valid, K, c2w[0], image_size=size, config=tracking_cfg,
                    embedding=head.landmark_embedding(landmarks))
        if photometric is not None:
            res = _refine_photometric(stage_dir, head, res, tracking_cfg, photometric)
            files.append(PHOTOMETRIC_REPORT)
        save_tracking(stage_dir / "tracking.npz", res, head.name)
        return files

    return hook


def _refine_photometric(stage_dir: Path, head, res, tracking_cfg, cfg):
    """Photometric refinement of a fresh tracking on the stage's crops and mattes; writes ``photometric.json``."""
    from .preprocess.stage import read_frame, read_matte
    from .store import write_json
    from .tracking.photometric import PHOTOMETRIC_REPORT, refine_photometric

    def load(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.stack([read_frame(stage_dir, t) for t in ids]),
                np.stack([read_matte(stage_dir, t) for t in ids]))

    refined, report = refine_photometric(head, res, load, tracking_cfg, cfg)
    write_json(stage_dir / PHOTOMETRIC_REPORT, {"settings": cfg.to_dict(), **asdict(report)})
    return refined


def preprocess_item(input_path: Path, out: Path, head, pp_cfg=None, tracking_cfg=None, progress: Progress = None,
                    force: bool = False, overlay: str | None = None, landmarks: str = "mediapipe",
                    photometric=None) -> tuple[str, dict]:
    """``<out>/<id>/preprocess/``: frames, mattes, landmarks and tracking of one image or video.

    ``landmarks``: the tracking's landmark source, "mediapipe" (478 points), "fan" or "dlib" (68 points);
    ``photometric``: a ``PhotometricConfig`` to refine the tracking with the frames' colours (None: off). Changing
    either re-runs only the tracking (the frames and mattes are reused).

    ``overlay`` ("shaded" | "wireframe" | "none"): also draw the tracked mesh and landmarks over the frames
    (``overlay.mp4`` / ``overlay.png``, a derived view outside the stage manifest, redrawn on every request).
    """
    from .preprocess.config import PreprocessConfig
    from .preprocess.stage import run_preprocess, stage_dir

    item_dir = out / item_id(input_path)
    if force:
        _invalidate(stage_dir(item_dir))
    cfg = pp_cfg or PreprocessConfig()
    total = {"n": 0}

    def pp_progress(done: int, total_frames: int) -> None:
        if progress is not None:
            progress(done - total["n"])
        total["n"] = done

    res = run_preprocess(input_path, item_dir, cfg, progress=pp_progress,
                         track_fn=make_track_hook(head, tracking_cfg, landmarks, photometric),
                         track_settings=_track_settings(head, tracking_cfg, landmarks, photometric))
    outputs = {"frames": res.num_frames, "status": res.status_counts, "dir": str(res.stage_dir)}
    if overlay is not None:
        from .tracking.overlay import write_tracking_overlay

        outputs["overlay"] = str(write_tracking_overlay(res.stage_dir, head, style=overlay, fps=cfg.fps or 25.0))
    return ("skipped" if res.skipped else "done"), outputs


def _track_settings(head, tracking_cfg=None, landmarks: str = "mediapipe", photometric=None) -> dict:
    """The tracking part of the preprocess manifest's settings, with the head model's digest (a changed model, e.g.
    a new asset or other components, re-tracks rather than reusing)."""
    from .head.registry import head_model_id

    track = {"head": head.name, "head_id": head_model_id(head),
             "tracking": asdict(tracking_cfg) if tracking_cfg is not None else "default"}
    # Recorded only when not the default, so manifests of earlier runs stay valid.
    if landmarks != "mediapipe":
        track["landmarks"] = landmarks
    if photometric is not None:
        track["photometric"] = photometric.to_dict()
    return track


def _invalidate(stage: Path) -> None:
    m = stage / "manifest.json"
    if m.exists():
        m.unlink()


def preprocessed_dir(spec: Path, out: Path, head, progress: Progress = None,
                     force: bool = False) -> tuple[Path, str]:
    """A preprocessed folder for an input, and "done" when this call preprocessed it, else "skipped".

    A folder made by ``fhavatar preprocess`` is used as it is. For a photo or video, a finished preprocess of it in
    ``<out>/<id>/preprocess`` is reused whatever its settings (``--landmarks dlib``, ``--photometric``, a crop size,
    ...) when it tracked ``head``; with none, the input is preprocessed with the default settings. A preprocess
    that cannot be reused (unfinished, or tracked with another head model) and has other settings than the default
    is never overwritten unless ``force``: that is an ``InputError`` naming the settings that differ. (``force``
    redoes only such a preprocess: a reusable one is kept, whatever else the caller redoes.)
    """
    from .preprocess.config import PreprocessConfig

    for cand in (spec / "preprocess", spec):
        if (cand / "tracking.npz").is_file():
            return cand, "skipped"
    if not (spec.is_file() and spec.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS):
        raise InputError(f"input '{spec}' is neither an image, a video nor a preprocessed folder",
                         f"pass a photo ({', '.join(IMAGE_EXTS)}), a video or a folder made by `fhavatar preprocess`")
    stage = out / item_id(spec) / "preprocess"
    m = Manifest.load(stage)
    if m is not None:
        # What preprocess_item writes for the defaults (run_preprocess's manifest settings: config + tracking).
        default = {**PreprocessConfig().to_dict(), "tracking": _track_settings(head)}
        finished = (m.status == "done" and m.inputs.get("input") == hash_file(spec) and outputs_intact(stage, m))
        same_head = m.settings.get("tracking", {}).get("head") == head.name
        if finished and same_head:
            return stage, "skipped"
        differ = _differences(m.settings, default)
        if differ and not force:
            why = ("was tracked with another head model" if finished else f"is unfinished ({m.status})"
                   if m.status != "done" else "has missing or changed files")
            raise InputError(f"the preprocess of '{spec}' in '{stage}' {why} and has other settings than the "
                             f"defaults: {'; '.join(differ[:4])}",
                             "finish it with `fhavatar preprocess` and those settings, or pass --force to redo it "
                             "with the defaults")
    status, _ = preprocess_item(spec, out, head, progress=progress)
    return stage, status


def _differences(have: dict, default: dict, prefix: str = "") -> list[str]:
    """``key: value (default: value)`` for every leaf where two settings dicts differ."""
    out = []
    for k in sorted(set(have) | set(default)):
        a, b = have.get(k), default.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} (default: {b})")
    return out


def avatar_item_dir(avatar: Path, out: Path | None = None) -> Path:
    """The item folder that holds an avatar's turntable/ and reenact/ stages.

    ``<item>/avatar/avatar.npz`` (what reconstruct writes) -> ``<item>`` (``<out>/<item name>`` with ``out``); any
    other avatar file, e.g. ``x/a.npz`` -> ``<out or x>/<avatar id>``, so two avatars of one folder never share one.
    """
    avatar = Path(avatar)
    if avatar.name == "avatar.npz" and avatar.parent.name == "avatar":
        item = avatar.parent.parent
        return item if out is None else Path(out) / item.name
    return Path(out if out is not None else avatar.parent) / item_id(avatar)


def file_stage(path: Path) -> Path:
    """The stage folder (manifest, lock) of an output file the user named (``--output``): hidden beside it, one per
    file, so two outputs of one folder never share a manifest."""
    return path.parent / f".{path.name}.fhavatar"


def reconstruct_item(spec: Path, out: Path, head, cfg, device: str = "cpu", net_loader=None,
                     progress: Progress = None, force: bool = False, export_ply: bool = False,
                     backend: str = "auto") -> tuple[str, dict]:
    """``<out>/<id>/avatar/avatar.npz`` (+ ``avatar.ply``) from a photo, video or preprocessed folder.

    Status "done" when anything was made (the preprocess included), "skipped" when all was up to date.
    """
    from .avatar.artifact import save_avatar
    from .reconstruct import load_source, reconstruct
    from .uv.space import UVConfig, load_or_build_uv_space

    cfg = cfg.for_device(device)  # "auto" refinement steps -> the number this device runs (kept in the settings)
    pp, pp_status = preprocessed_dir(spec, out, head, progress, force=force)
    item_dir = pp.parent
    inputs = {"tracking": pp / "tracking.npz", "frame": pp / "frames" / f"{cfg.source_frame:06d}.png"}
    settings = {**asdict(cfg), "head": head.name}
    weights_hash = None
    if cfg.method == "network":
        from .network.weights import resolve_weights

        wpath = resolve_weights(cfg.weights)
        weights_hash = wpath if isinstance(wpath, str) else hash_file(wpath)  # "random": seeded, untrained
        inputs["weights"] = weights_hash

    def work(folder: Path) -> list[str]:
        uv = load_or_build_uv_space(head, UVConfig(size=cfg.uv_size), device=device)
        source = load_source(pp, cfg.source_frame).to(device)
        net = net_loader(cfg) if (cfg.method == "network" and net_loader) else None
        avatar = reconstruct(source, head, uv, cfg, net, progress=progress, backend=backend)
        avatar.meta.update({"input": str(spec), "weights_sha256": weights_hash})
        save_avatar(folder / "avatar.npz", avatar)
        files = ["avatar.npz"]
        if export_ply:
            from .avatar.head import build_rig
            from .avatar.ply import write_ply

            rig = build_rig(avatar, head, device)
            write_ply(folder / "avatar.ply", rig.pose_params(source.params))
            files.append("avatar.ply")
        return files

    status, outputs = run_stage(item_dir / "avatar", {**settings, "ply": export_ply}, inputs, work, force=force)
    return ("done" if pp_status == "done" else status), {"avatar": str(item_dir / "avatar" / "avatar.npz"), **outputs}


def _output_stage(default_stage: Path, name: str, video: Path | None) -> tuple[Path, Path, Path]:
    """(stage folder, output file, lock folder) of a derived stage: its own folder (locked at the item), or the
    file the user named with the stage hidden beside it (``file_stage``, locked there)."""
    if video is None:
        return default_stage, default_stage / name, default_stage.parent
    stage = file_stage(Path(video))
    return stage, Path(video), stage


def turntable_item(avatar: Path, cfg, video: Path | None = None, png_dir: Path | None = None, backend: str = "auto",
                   device: str = "cpu", progress: Progress = None, force: bool = False,
                   out: Path | None = None) -> tuple[str, dict]:
    """``<item>/turntable/turntable.mp4`` (``avatar_item_dir``; or ``video``) for an avatar; skipped when avatar and
    settings are unchanged."""
    from .turntable import run_turntable

    stage, target, lock = _output_stage(avatar_item_dir(avatar, out) / "turntable", "turntable.mp4", video)

    def work(folder: Path) -> list[str]:
        run_turntable(avatar, target, png_dir, cfg, backend=backend, device=device, progress=progress)
        return [os.path.relpath(target, folder)]

    settings = {**asdict(cfg), "png_dir": str(png_dir) if png_dir else None}
    status, outputs = run_stage(stage, settings, {"avatar": avatar}, work, force=force or png_dir is not None,
                                lock_dir=lock)
    return status, {"video": str(target), **outputs}


def reenact_item(avatar: Path, driving: Path, out: Path, head, cfg, video: Path | None = None,
                 png_dir: Path | None = None, backend: str = "auto", device: str = "cpu", progress: Progress = None,
                 force: bool = False) -> tuple[str, dict]:
    """``<item>/reenact/<driving-id>/video.mp4`` (``avatar_item_dir`` under ``out``; or ``video``): the avatar driven
    by a video (preprocessed under ``out``, or its finished preprocess reused), tracking file or preprocessed folder."""
    from .reenact import driving_tracking, run_reenact

    name, pp_status = str(driving), "skipped"
    if driving.is_file() and driving.suffix.lower() != ".npz":
        driving, pp_status = preprocessed_dir(driving, out, head)
    trk_file = next(p for p in (driving, driving / "tracking.npz", driving / "preprocess" / "tracking.npz")
                    if p.is_file()) if not driving.is_file() else driving
    default_stage = avatar_item_dir(avatar, out) / "reenact" / item_id(trk_file)
    stage, target, lock = _output_stage(default_stage, "video.mp4", video)

    def work(folder: Path) -> list[str]:
        run_reenact(avatar, driving_tracking(trk_file), target, png_dir, cfg, backend=backend, device=device,
                    progress=progress, driving_name=name)
        return [os.path.relpath(target, folder)]

    settings = {**asdict(cfg), "png_dir": str(png_dir) if png_dir else None}
    status, outputs = run_stage(stage, settings, {"avatar": avatar, "driving": trk_file}, work,
                                force=force or png_dir is not None, lock_dir=lock)
    return ("done" if pp_status == "done" else status), {"video": str(target), **outputs}
