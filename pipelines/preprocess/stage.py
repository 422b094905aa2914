"""The preprocess stage: one image or video -> aligned 512x512 frames, mattes, landmarks and cameras.

Artifacts in ``<item_dir>/preprocess/``::

    frames/%06d.png      composited RGB crops (background colour from the settings)
    mattes/%06d.png      8-bit alpha mattes
    landmarks.npz        per frame: lmk478 (T, 478, 3) float32 in crop pixels (z scaled like x; zeros where not
                         valid), valid (T,) bool, status (T,) str ("ok" | "coarse" | "no_face"), crop_transform
                         (T, 3, 3) source -> crop pixels, boxes (T, 4) smoothed (cx, cy, side, roll) in source pixels,
                         boxes_raw (T, 4) per-frame boxes (NaN without a face), source_frame_index (T,), fps,
                         K (3, 3) normalized intrinsics, c2w (T, 4, 4) camera-to-world, size, source_size (W, H)
    manifest.json        written last (``pipelines.store.Manifest``)

Two passes over a video. Pass 1 decodes small frames (``detect_max_side``), finds the face (box -> mesh on a generous
crop) and a crop box per frame; the boxes are filled where no face was found and smoothed over the whole clip, then
cached in ``boxes.npz``. Pass 2 decodes full frames chunk by chunk, warps each to the crop, re-runs the face mesh on
the aligned crop (accurate landmarks), mattes and composites, writes the frame's two PNGs atomically and appends the
frame's record to ``progress.jsonl`` (fsynced per chunk). A re-run skips frames that have both PNGs and a record, so
an interrupted run resumes at the next unfinished frame; a re-run with the same settings and input hash that finds a
``done`` manifest with intact outputs skips the item (one with damaged outputs redoes only the damaged frames). The
two resume files stay after a successful run so that a change of only the tracking settings reuses every frame.
The work is done holding the item's lock (``<item_dir>/.lock``, ``pipelines.store.take_stage``), so two jobs never
write one item; taking it also removes the temporary files a killed earlier run left.

Status per frame: "ok" (mesh found on the aligned crop), "coarse" (only the first pass found the face; its landmarks
are mapped into the crop), "no_face" (neither; the crop box is interpolated from neighbouring frames and the frame is
still written, so ``frames/%06d.png`` number t is always entry t of every array in ``landmarks.npz``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FhavatarError, InputError
from ..store import Manifest, atomic_path, hash_file, hash_obj, is_up_to_date, save_npz, take_stage
from .config import PreprocessConfig
from .crop import apply_matrix, crop_box_from_landmarks, crop_matrix, inside_mask, smooth_boxes, warp
from .detect import NUM_LANDMARKS, FaceBox, FaceDetector, pick_face
from .io import FrameSource, open_source
from .matting import Segmenter, alpha_to_u8, composite, refine_matte

STAGE = "preprocess"
PROGRESS = "progress.jsonl"
BOXES = "boxes.npz"
LANDMARKS = "landmarks.npz"

ProgressFn = Callable[[int, int], None]
# (stage folder, result so far) -> relative paths of the files it wrote there (hashed into the manifest).
TrackFn = Callable[[Path, "PreprocessResult"], "list[str] | None"]


@dataclass
class PreprocessResult:
    """What ``run_preprocess`` produced (paths under the given item folder)."""

    stage_dir: Path
    landmarks_path: Path
    num_frames: int
    status_counts: dict[str, int]
    frames_processed: int  # frames cropped / matted in this call (0 when the item was up to date)
    frames_skipped: int  # frames found finished from an interrupted earlier run
    skipped: bool = False  # the whole item was up to date
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def frame_path(self, t: int) -> Path:
        return frame_file(self.stage_dir, t)

    def matte_path(self, t: int) -> Path:
        return matte_file(self.stage_dir, t)


def frame_file(stage: Path, t: int) -> Path:
    """``frames/%06d.png`` of a preprocess stage folder: frame t's composited crop."""
    return Path(stage) / "frames" / f"{t:06d}.png"


def matte_file(stage: Path, t: int) -> Path:
    """``mattes/%06d.png`` of a preprocess stage folder: frame t's 8-bit alpha matte."""
    return Path(stage) / "mattes" / f"{t:06d}.png"


def read_frame(stage: Path, t: int) -> np.ndarray:
    """Frame t's crop as (H, W, 3) uint8 RGB (the file is closed at once: long videos read thousands)."""
    return _read_png_as(frame_file(stage, t), "RGB")


def read_matte(stage: Path, t: int) -> np.ndarray:
    """Frame t's matte as (H, W) uint8."""
    return _read_png_as(matte_file(stage, t), "L")


def _read_png_as(path: Path, mode: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (OSError, SyntaxError) as e:  # PIL's errors for missing, truncated or non-image files
        raise InputError(f"'{path}' is missing or unreadable ({e})", "re-run `fhavatar preprocess` with --force") from e


def stage_dir(item_dir: str | Path) -> Path:
    return Path(item_dir) / STAGE


def run_preprocess(
    input_path: str | Path,
    item_dir: str | Path,
    settings: PreprocessConfig | None = None,
    progress: ProgressFn | None = None,
    track_fn: TrackFn | None = None,
    track_settings: dict | None = None,
) -> PreprocessResult:
    """Preprocess one image or video into ``<item_dir>/preprocess/`` (see the module docstring).

    Args:
        input_path: an image or a video.
        item_dir: the item's folder (``<out>/<item-id>``).
        settings: preprocess settings (defaults: the paper's 512x512 on white).
        progress: called as ``progress(done, total)`` after every finished frame (finished includes resumed ones).
        track_fn: optional hook run after ``landmarks.npz`` is written (head-model tracking); it returns the
            relative paths of the files it wrote so they are hashed into the manifest.
        track_settings: the hook's settings, recorded in the manifest (changing them re-runs the hook; finished
            frames are still reused).

    Raises:
        InputError: unreadable input, or no face in the image / in any frame of the video.
        ItemLocked: another job holds the item (and its preprocessing is not finished).
    """
    cfg = settings or PreprocessConfig()
    input_path = Path(input_path)
    out = stage_dir(item_dir)
    if not input_path.is_file():
        raise InputError(f"input '{input_path}' not found", "check the path")
    digest = hash_file(input_path)
    inputs = {"input": digest}
    manifest_settings = {**cfg.to_dict(), **({"tracking": track_settings} if track_settings is not None else {})}
    # Skipping needs no lock (another job may hold the item for a later stage); doing the work does, and a second
    # look under it, in case another job finished the item meanwhile.
    done = _finished(out, manifest_settings, inputs)
    if done is None:
        with take_stage(out, item_dir):
            done = _finished(out, manifest_settings, inputs)
            if done is None:
                done = _preprocess(input_path, out, cfg, digest, manifest_settings, inputs, progress, track_fn)
    return done


def _finished(out: Path, manifest_settings: dict, inputs: dict) -> PreprocessResult | None:
    """The result of a finished, up-to-date preprocessing of ``out`` (skipped), else None."""
    if not is_up_to_date(out, manifest_settings, inputs):
        return None
    m = Manifest.load(out)
    assert m is not None
    return PreprocessResult(out, out / LANDMARKS, int(m.extra.get("num_frames", 0)),
                            dict(m.extra.get("status_counts", {})), 0, 0, skipped=True)


def _preprocess(input_path: Path, out: Path, cfg: PreprocessConfig, digest: str, manifest_settings: dict,
                inputs: dict, progress: ProgressFn | None, track_fn: TrackFn | None) -> PreprocessResult:
    """Do the preprocessing of one item (its lock held): resume finished frames, write the manifest last."""
    started = time.time()
    key = hash_obj({"settings": cfg.to_dict(), "input": digest})  # what the frames depend on
    old = Manifest.load(out)
    # Hashes a finished earlier run recorded for these very frames: a resumed frame must still match them.
    trusted = old.outputs if old is not None and old.status == "done" and old.extra.get("key") == key else {}
    manifest = Manifest(stage=STAGE, settings=manifest_settings, inputs=inputs, started=started)
    out.mkdir(parents=True, exist_ok=True)
    # A stale "done" manifest must not survive a run that fails half-way.
    (out / "manifest.json").unlink(missing_ok=True)
    try:
        result = _run(input_path, out, cfg, key, progress, trusted)
        result.seconds = time.time() - started
        outputs = _output_files(out, result.num_frames)
        if track_fn is not None:
            outputs += list(track_fn(out, result) or [])
        manifest.status = "done"
        manifest.outputs = {rel: hash_file(out / rel) for rel in outputs}
        manifest.extra = {"num_frames": result.num_frames, "status_counts": result.status_counts,
                          "source": str(input_path), "timings": result.timings, "key": key}
    except FhavatarError as e:
        manifest.status = "failed"
        manifest.error = e.line()
        _finish(manifest, out, started)
        raise
    except Exception as e:  # record, then let the caller see the real traceback
        manifest.status = "failed"
        manifest.error = f"{type(e).__name__}: {e}"
        _finish(manifest, out, started)
        raise
    _finish(manifest, out, started)
    return result


def _finish(manifest: Manifest, out: Path, started: float) -> None:
    manifest.finished = time.time()
    manifest.seconds = manifest.finished - started
    manifest.save(out)


def _output_files(out: Path, n: int) -> list[str]:
    return [LANDMARKS] + [f"frames/{t:06d}.png" for t in range(n)] + [f"mattes/{t:06d}.png" for t in range(n)]


# ------------------------------------------------------------------------------------------------------- the passes
def _run(input_path: Path, out: Path, cfg: PreprocessConfig, key: str, progress: ProgressFn | None,
         trusted: dict[str, str]) -> PreprocessResult:
    timings: dict[str, float] = {}
    src = open_source(input_path, fps=cfg.fps, stride=cfg.stride, max_frames=cfg.max_frames)
    try:
        with FaceDetector(cfg.min_detection_confidence) as det:
            t0 = time.time()
            boxes = _cached_boxes(out, key)
            if boxes is None:
                boxes = box_pass(src, det, cfg)
                save_npz(out / BOXES, key=np.array(key), **boxes)
            timings["box_pass"] = time.time() - t0
            if not boxes["detected"].any():
                where = "any frame of " if src.kind == "video" else ""
                hint = f" (asked for face #{cfg.face_index}, counting from the largest = 0)" if cfg.face_index else ""
                raise InputError(f"no face found in {where}'{input_path}'{hint}",
                                 "use a photo or video with a clearly visible, roughly frontal face")
            t0 = time.time()
            table, processed, skipped = crop_pass(src, det, cfg, out, key, boxes, progress, trusted)
            timings["crop_pass"] = time.time() - t0
    finally:
        src.close()
    T = len(src)
    status = table.status
    valid = status != "no_face"
    K, c2w = frontal_camera(T)
    save_npz(out / LANDMARKS, lmk478=table.lmk, valid=valid, status=status, crop_transform=table.M,
              boxes=boxes["smoothed"], boxes_raw=boxes["raw"], source_frame_index=src.indices,
              fps=np.float64(src.fps), K=K, c2w=c2w, size=np.int64(cfg.size),
              source_size=np.array([src.width, src.height]))
    counts = dict(Counter(status.tolist()))
    return PreprocessResult(out, out / LANDMARKS, T, counts, processed, skipped, timings=timings)


def frontal_camera(T: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized EG3D intrinsics (3, 3) and the frontal camera-to-world repeated (T, 4, 4): head pose is tracked
    as the head model's global rotation / translation, the camera stays put."""
    import torch

    from ..core.camera import normalized_intrinsics, orbit_cameras

    K = normalized_intrinsics()[0].numpy().astype(np.float64)
    c2w = orbit_cameras(torch.zeros(1), torch.zeros(1))[0].numpy().astype(np.float64)
    return K, np.repeat(c2w[None], T, axis=0)


def box_pass(src: FrameSource, det: FaceDetector, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Per-frame crop boxes from small frames, filled and smoothed.

    Returns raw (T, 4) (NaN without a face), smoothed (T, 4), detected (T,) bool and lmk (T, 478, 3) float32 first-
    pass landmarks in source pixels (NaN without a face).
    """
    T = len(src)
    raw = np.full((T, 4), np.nan)
    lmk_all = np.full((T, NUM_LANDMARKS, 3), np.nan, np.float32)
    previous: FaceBox | None = None
    for t, frame, scale in src.frames(range(T), chunk=cfg.chunk, max_side=cfg.detect_max_side):
        face = pick_face(det.detect(frame), cfg.face_index, previous)
        if face is None:
            continue
        lmk = det.mesh_around(frame, face)
        if lmk is None:
            continue
        previous = face
        lmk = lmk / scale  # back to full-resolution pixels (z scales like x)
        lmk_all[t] = lmk
        raw[t] = crop_box_from_landmarks(lmk, cfg.eye_fraction, cfg.head_center_up_m, cfg.head_center_back_m,
                                         cfg.eye_distance_m)
    detected = np.isfinite(raw[:, 0])
    smoothed = smooth_boxes(raw, detected, cfg.smooth_window) if detected.any() else np.full((T, 4), np.nan)
    return {"raw": raw, "smoothed": smoothed, "detected": detected, "lmk": lmk_all}


@dataclass
class FrameTable:
    """Per-frame results of the crop pass: lmk (T, 478, 3) float32 crop pixels (zeros without landmarks),
    M (T, 3, 3) crop transforms, status (T,) ("" = not finished yet)."""

    lmk: np.ndarray
    M: np.ndarray
    status: np.ndarray

    @classmethod
    def empty(cls, T: int) -> "FrameTable":
        return cls(np.zeros((T, NUM_LANDMARKS, 3), np.float32), np.zeros((T, 3, 3)), np.full(T, "", dtype="<U8"))

    def set(self, rec: dict) -> None:
        t = rec["t"]
        self.status[t] = rec["status"]
        self.M[t] = np.asarray(rec["M"], dtype=np.float64)
        self.lmk[t] = 0.0 if rec["lmk"] is None else np.asarray(rec["lmk"], dtype=np.float32)


def crop_pass(src: FrameSource, det: FaceDetector, cfg: PreprocessConfig, out: Path, key: str,
              boxes: dict[str, np.ndarray], progress: ProgressFn | None, trusted: dict[str, str] | None = None
              ) -> tuple[FrameTable, int, int]:
    """Crop, re-landmark, matte and write every unfinished frame; returns (table, processed, skipped)."""
    T = len(src)
    table = _load_progress(out, key, T, trusted or {})
    (out / "frames").mkdir(exist_ok=True)
    (out / "mattes").mkdir(exist_ok=True)
    todo = [t for t in range(T) if not table.status[t]]
    skipped = T - len(todo)
    done = skipped
    if progress is not None and skipped:
        progress(done, T)
    with Segmenter() as seg, open(out / PROGRESS, "a", encoding="utf-8") as log:
        for i, (t, frame, _) in enumerate(src.frames(todo, chunk=cfg.chunk)):
            rec = process_frame(frame, t, int(src.indices[t]), boxes, det, seg, cfg, out)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if (i + 1) % cfg.chunk == 0 or i + 1 == len(todo):
                os.fsync(log.fileno())
            table.set(rec)
            done += 1
            if progress is not None:
                progress(done, T)
    return table, len(todo), skipped


def process_frame(frame: np.ndarray, t: int, source_index: int, boxes: dict[str, np.ndarray], det: FaceDetector,
                  seg: Segmenter, cfg: PreprocessConfig, out: Path) -> dict:
    """Crop one full-resolution frame, landmark it, matte it, write its PNGs; returns its progress record."""
    import cv2

    h, w = frame.shape[:2]
    M = crop_matrix(boxes["smoothed"][t], cfg.size, use_roll=cfg.remove_roll)
    crop = warp(frame, M, cfg.size, border=cfg.border, fill=cfg.background)
    inside = inside_mask(M, cfg.size, w, h)
    lmk = det.mesh(crop)
    status = "ok"
    if lmk is None:
        if boxes["detected"][t]:
            lmk, status = apply_matrix(M, boxes["lmk"][t].astype(np.float64)), "coarse"
        else:
            status = "no_face"
    raw = seg(crop)
    alpha = refine_matte(raw, crop, lmk, inside, refine=cfg.matting_refine)
    rgb = composite(crop, alpha, cfg.background)
    _write_png(frame_file(out, t), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    _write_png(matte_file(out, t), alpha_to_u8(alpha))
    return {"t": t, "src": source_index, "status": status, "M": M.tolist(),
            "lmk": None if lmk is None else np.round(lmk, 3).tolist()}


# ------------------------------------------------------------------------------------------------- files & resume
def _write_png(path: Path, img: np.ndarray) -> None:
    import cv2

    from ..video import write_file_bytes

    # Encoded in memory (the same bytes as cv2.imwrite), so a failed write reports its cause (a full disk).
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"could not encode '{path}'")
    write_file_bytes(path, png.tobytes())


def _cached_boxes(out: Path, key: str) -> dict[str, np.ndarray] | None:
    p = out / BOXES
    if not p.is_file():
        return None
    try:
        with np.load(p) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in ("raw", "smoothed", "detected", "lmk")}
    except Exception:  # a corrupt cache is just recomputed
        return None


def _load_progress(out: Path, key: str, T: int, trusted: dict[str, str]) -> FrameTable:
    """Finished frames from an earlier run with the same settings and input (else start afresh).

    A frame counts as finished when its record is in ``progress.jsonl`` and both PNGs exist (a later record of a
    frame wins) and, where ``trusted`` (relative path -> sha256, from the last finished run's manifest) lists them,
    still have those hashes. The first line holds the run's key; a half-written last line (killed mid-write) is cut
    off so new records start on a fresh line.
    """
    p = out / PROGRESS
    table = FrameTable.empty(T)
    if p.is_file():
        with open(p, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # torn last line
                f.truncate(end)
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        header = _parse(lines[0]) if lines else None
        if header is not None and header.get("key") == key:
            for line in lines[1:]:
                r = _parse(line)
                if r is None or not isinstance(r.get("t"), int) or not 0 <= r["t"] < T:
                    continue
                t = r["t"]
                files = (f"frames/{t:06d}.png", f"mattes/{t:06d}.png")
                if all((out / f).is_file() and (f not in trusted or hash_file(out / f) == trusted[f]) for f in files):
                    table.set(r)
    if not (table.status != "").any():  # fresh start: drop anything a run with other settings left behind
        for d in ("frames", "mattes"):
            shutil.rmtree(out / d, ignore_errors=True)
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps({"key": key}) + "\n", encoding="utf-8")
    return table


def _parse(line: str) -> dict | None:
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        return None
    return r if isinstance(r, dict) else None
