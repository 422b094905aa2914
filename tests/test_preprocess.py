"""Preprocess stage: reading, detection, framing, smoothing, matting, artifacts, resume."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipelines.errors import InputError
from pipelines.preprocess import PreprocessConfig, run_preprocess
from pipelines.preprocess.crop import apply_matrix, crop_box_from_landmarks, crop_matrix, smooth_boxes, warp
from pipelines.preprocess.detect import LEFT_EYE_CORNERS, RIGHT_EYE_CORNERS
from pipelines.preprocess.io import load_image, open_source, select_indices
from pipelines.preprocess.config import EYE_DISTANCE_M, VISIBLE_WIDTH_M
from pipelines.core.camera import DEFAULT_RADIUS
from pipelines.store import Manifest
from video_files import write_video

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository
EYE_FRACTION = EYE_DISTANCE_M / VISIBLE_WIDTH_M  # the framing rule: inter-ocular distance / crop width


def _read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _eyes(lmk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return lmk[list(RIGHT_EYE_CORNERS), :2].mean(0), lmk[list(LEFT_EYE_CORNERS), :2].mean(0)




def _face_on_flat(size: int = 640, colour=(40, 150, 70), scale: float = 1.0, center=None) -> np.ndarray:
    """The astronaut's head (an elliptical cut-out with a soft edge) pasted on a flat colour."""
    astro = skimage.data.astronaut()
    head = astro[0:230, 140:320]  # hair to chin: an ellipse tight around the head, centred at (228, 100) in astro
    mask = np.zeros(head.shape[:2], np.float32)
    cv2.ellipse(mask, (88, 100), (78, 100), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 2)
    if scale != 1.0:
        head = cv2.resize(head, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    mask = mask[..., None]
    hh, hw = head.shape[:2]
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = colour
    cy, cx = center if center is not None else (size // 2, size // 2)
    y0, x0 = cy - hh // 2, cx - hw // 2
    region = canvas[y0:y0 + hh, x0:x0 + hw]
    canvas[y0:y0 + hh, x0:x0 + hw] = head * mask + region * (1 - mask)
    return canvas.round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------------- geometry
def test_crop_matrix_maps_points_like_the_warp():
    """A bright dot lands where ``crop_transform`` says (continuous pixel coordinates), also with roll."""
    img = np.zeros((300, 400), np.uint8)
    img[120:123, 250:253] = 255  # 3x3 dot centred at (251.5, 121.5)
    for box, roll in (((260.0, 130.0, 90.0, 0.0), False), ((240.0, 140.0, 170.0, 0.3), True)):
        M = crop_matrix(np.array(box), 128, use_roll=roll)
        crop = warp(img, M, 128, border="constant").astype(np.float64)
        ys, xs = np.mgrid[:128, :128]
        got = np.array([(xs * crop).sum() / crop.sum() + 0.5, (ys * crop).sum() / crop.sum() + 0.5])
        want = apply_matrix(M, np.array([[251.5, 121.5]]))[0]
        assert np.allclose(got, want, atol=0.3), (got, want)
    # Box centre -> crop centre, box side -> crop side.
    M = crop_matrix(np.array([100.0, 50.0, 64.0, 0.0]), 512)
    assert np.allclose(apply_matrix(M, np.array([[100.0, 50.0], [132.0, 50.0]])), [[256, 256], [512, 256]])


def test_crop_box_rule_on_a_synthetic_face():
    """Eyes 63 px apart (1 px = 1 mm), frontal: side = 63 / 0.199, centre 9 cm behind the eyes (no 2-D shift)."""
    lmk = np.zeros((478, 3))
    lmk[list(RIGHT_EYE_CORNERS)] = [[170.0, 200.0, 0], [200.0, 200.0, 0]]  # right eye centre (185, 200)
    lmk[list(LEFT_EYE_CORNERS)] = [[233.0, 200.0, 0], [263.0, 200.0, 0]]  # left eye centre (248, 200)
    lmk[[61, 291]] = [[196.0, 270.0, 0], [236.0, 270.0, 0]]
    box = crop_box_from_landmarks(lmk, eye_fraction=EYE_FRACTION, head_center_up_m=0.01)
    assert box[2] == pytest.approx(63 / EYE_FRACTION)
    assert box[0] == pytest.approx(216.5) and box[1] == pytest.approx(200 - 10.0)  # 1 cm up = 10 px
    assert box[3] == pytest.approx(0.0)
    # Turned head (yaw): the head centre behind the face shifts the crop towards the back of the head.
    yaw = np.radians(30)
    R = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    turned = (lmk - [216.5, 200, 0]) @ R.T + [216.5, 200, 0]
    box_t = crop_box_from_landmarks(turned, eye_fraction=EYE_FRACTION, head_center_up_m=0.0)
    assert box_t[2] == pytest.approx(63 / EYE_FRACTION)  # 3-D eye distance: scale unaffected by yaw
    assert box_t[0] - 216.5 == pytest.approx(90 * np.sin(yaw), abs=1e-6)


def test_smooth_boxes_fills_gaps_and_removes_jitter():
    rng = np.random.default_rng(0)
    T = 60
    t = np.arange(T)
    truth = np.stack([100 + 2.0 * t, 80 + 0.5 * t, np.full(T, 200.0), np.zeros(T)], 1)
    raw = truth + np.concatenate([rng.normal(0, 2.0, (T, 2)), rng.normal(0, 0.02, (T, 1)) * 200, np.zeros((T, 1))], 1)
    raw[20:24] = np.nan
    raw[5] += [40, 0, 0, 0]  # one wrong detection
    valid = np.isfinite(raw[:, 0])
    sm = smooth_boxes(raw, valid, window=15)
    assert np.isfinite(sm).all()
    d2_raw = np.abs(np.diff(raw[valid][:, :2], 2, axis=0)).mean()
    d2_sm = np.abs(np.diff(sm[:, :2], 2, axis=0)).mean()
    assert d2_sm < 0.1 * d2_raw
    assert np.abs(sm[3:-3, :2] - truth[3:-3, :2]).max() < 2.5  # follows the motion, outlier at t=5 suppressed
    assert np.abs(sm[3:-3, 2] - 200).max() < 0.03 * 200
    assert np.allclose(smooth_boxes(raw, valid, window=1)[valid], raw[valid])


def test_select_indices():
    idx, fps = select_indices(100, 30.0, 10.0, 1, None)
    assert idx[:4].tolist() == [0, 3, 6, 9] and fps == 10.0 and idx[-1] == 99
    idx, fps = select_indices(100, 30.0, 10.0, 2, 5)
    assert idx.tolist() == [0, 6, 12, 18, 24] and fps == 5.0
    idx, fps = select_indices(10, 25.0, 50.0, 3, None)  # never upsamples
    assert idx.tolist() == [0, 3, 6, 9] and fps == pytest.approx(25 / 3)


# ----------------------------------------------------------------------------------------------------------- reading
def test_load_image_exif_grey_rgba(tmp_path):
    astro = skimage.data.astronaut()
    # Stored rotated, with EXIF orientation 6 ("rotate 90 CW to display"): loads upright.
    rotated = Image.fromarray(np.rot90(astro, 1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    up = load_image(tmp_path / "rot.jpg")
    assert up.shape == astro.shape
    assert np.abs(up.astype(int) - astro).mean() < 6
    Image.fromarray(astro).convert("L").save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (512, 512, 3) and (grey[..., 0] == grey[..., 2]).all()
    rgba = np.dstack([astro, np.full(astro.shape[:2], 255, np.uint8)])
    rgba[:100, :100, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert (out[:100, :100] == 255).all() and (out[200:, 200:] == astro[200:, 200:]).all()


def test_unreadable_inputs_raise_input_error_naming_the_file(tmp_path):
    buf = tmp_path / "full.jpg"
    Image.fromarray(skimage.data.astronaut()).save(buf, quality=90)
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(buf.read_bytes()[: buf.stat().st_size // 3])
    with pytest.raises(InputError, match="truncated.jpg"):
        run_preprocess(trunc, tmp_path / "a")
    text = tmp_path / "notanimage.png"
    text.write_text("hello")
    with pytest.raises(InputError, match="notanimage.png"):
        open_source(text)
    video = tmp_path / "ok.mp4"
    write_video(video, [np.full((64, 64, 3), i * 10, np.uint8) for i in range(10)])
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.mp4"):
        src = open_source(bad)
        list(src.frames(range(len(src))))


def test_blank_image_has_no_face(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(blank)
    with pytest.raises(InputError, match=r"no face found in '.*blank.png'"):
        run_preprocess(blank, tmp_path / "item")
    m = Manifest.load(tmp_path / "item" / "preprocess")
    assert m is not None and m.status == "failed" and "no face" in m.error


def test_video_without_any_face(tmp_path):
    path = tmp_path / "empty.mp4"
    write_video(path, [np.full((64, 64, 3), 100 + i, np.uint8) for i in range(5)])
    with pytest.raises(InputError, match=r"no face found in any frame of '.*empty.mp4'"):
        run_preprocess(path, tmp_path / "item")


# ----------------------------------------------------------------------------------------------------- portraits
def test_astronaut_portrait(tmp_path):
    path = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    res = run_preprocess(path, tmp_path / "item", PreprocessConfig())
    assert res.num_frames == 1 and res.status_counts == {"ok": 1}
    frame, matte = _read_png(res.frame_path(0)), _read_png(res.matte_path(0))
    assert frame.shape == (512, 512, 3) and matte.shape == (512, 512) and matte.dtype == np.uint8
    z = np.load(res.landmarks_path)
    assert z["lmk478"].shape == (1, 478, 3) and z["valid"].tolist() == [True]
    lmk = z["lmk478"][0].astype(np.float64)
    er, el = _eyes(lmk)
    # Eyes where the rule puts them: 0.199 of the width apart (2-D, near-frontal), level, centred left-right, on
    # the upper-middle band.
    assert np.linalg.norm(el - er) / 512 == pytest.approx(EYE_FRACTION, rel=0.08)
    assert er[0] < el[0] and abs((er[0] + el[0]) / 2 - 256) < 0.04 * 512
    assert 0.45 * 512 < (er[1] + el[1]) / 2 < 0.62 * 512
    # Fixed point: the rule applied to the landmarks found in the crop gives back (nearly) the crop itself.
    box = crop_box_from_landmarks(lmk, EYE_FRACTION, 0.0, 0.09)
    assert np.allclose(box[:2], 256, atol=0.03 * 512) and box[2] == pytest.approx(512, rel=0.05)
    # Paste-back: crop landmarks mapped back through crop_transform land on the source eyes' pixels.
    src_lmk = apply_matrix(np.linalg.inv(z["crop_transform"][0]), lmk)
    er_src, el_src = _eyes(src_lmk)
    assert np.allclose(er_src, [204, 103], atol=6) and np.allclose(el_src, [246, 104], atol=6)
    # Cameras: normalized EG3D intrinsics and the frontal camera 1 m away on +z.
    assert np.allclose(z["K"], [[4.2647, 0, 0.5], [0, 4.2647, 0.5], [0, 0, 1]], atol=1e-4)
    assert z["c2w"].shape == (1, 4, 4) and np.allclose(z["c2w"][0, :3, 3], [0, 0, DEFAULT_RADIUS])
    # Upright and not mirrored: a point above the head centre projects above the crop centre, the subject's left
    # (+x) to the image's right, as the subject's left eye does in the crop.
    w2c = np.linalg.inv(z["c2w"][0])
    cam = (np.array([[0.0, 0.05, 0.0], [0.03, 0.0, 0.0]]) @ w2c[:3, :3].T + w2c[:3, 3]) @ z["K"].T
    uv = cam[:, :2] / cam[:, 2:]
    assert uv[0, 1] < 0.5 and uv[1, 0] > 0.5 and el[0] > 256
    m = Manifest.load(res.stage_dir)
    assert m.status == "done" and m.extra["status_counts"] == {"ok": 1} and "landmarks.npz" in m.outputs
    # Same settings and input: the whole item is skipped; other settings: re-run.
    assert run_preprocess(path, tmp_path / "item", PreprocessConfig()).skipped
    res2 = run_preprocess(path, tmp_path / "item", PreprocessConfig(background=(0, 0, 255)))
    assert not res2.skipped and res2.frames_processed == 1


def test_matte_on_flat_background(tmp_path):
    """A head pasted on a flat colour: matte ~1 on the face, ~0 on the backdrop above and beside the head.

    (Not below it: the selfie segmenter's body prior guesses shoulders under any head, which real photos have.) A
    looser framing than the default keeps plenty of backdrop in the crop.
    """
    path = tmp_path / "pasted.png"
    Image.fromarray(_face_on_flat()).save(path)
    res = run_preprocess(path, tmp_path / "item", PreprocessConfig(background=(10, 20, 250), visible_width_m=0.35))
    matte = _read_png(res.matte_path(0)).astype(np.float64) / 255
    frame = _read_png(res.frame_path(0))
    lmk = np.load(res.landmarks_path)["lmk478"][0]
    nose = lmk[4, :2].astype(int)  # nose tip: face centre
    assert matte[nose[1] - 5:nose[1] + 5, nose[0] - 5:nose[0] + 5].min() > 0.95
    eye_y = int(np.mean(_eyes(lmk), 0)[1])
    beside = slice(eye_y - 20, eye_y + 20)
    backdrop = [matte[:40, :40], matte[:40, -40:], matte[beside, :40], matte[beside, -40:]]
    assert max(b.max() for b in backdrop) < 0.05
    assert np.abs(frame[:40, :40].astype(int) - [10, 20, 250]).max() <= 2


def test_remove_roll_levels_the_eyes(tmp_path):
    astro = skimage.data.astronaut()
    M = cv2.getRotationMatrix2D((228, 110), 20, 1.0)  # head rolled by 20 degrees
    path = tmp_path / "rolled.png"
    Image.fromarray(cv2.warpAffine(astro, M, (512, 512), borderMode=cv2.BORDER_REFLECT)).save(path)
    # The astronaut's own eye line is at -3 degrees: rolled by 20 it is at 17; with remove_roll it is level.
    for remove, want in ((False, 17.0), (True, 0.0)):
        z = np.load(run_preprocess(path, tmp_path / str(remove), PreprocessConfig(remove_roll=remove)).landmarks_path)
        er, el = _eyes(z["lmk478"][0])
        angle = np.degrees(np.arctan2(-(el[1] - er[1]), el[0] - er[0]))  # image y is down
        assert angle == pytest.approx(want, abs=1.5)


def test_face_index_picks_largest_or_second(tmp_path):
    img = _face_on_flat(size=900, scale=1.0, center=(300, 260))
    small = _face_on_flat(size=900, scale=0.6, center=(600, 680))
    img[480:, 480:] = small[480:, 480:]
    path = tmp_path / "two.png"
    Image.fromarray(img).save(path)
    big = np.load(run_preprocess(path, tmp_path / "a", PreprocessConfig(face_index=0)).landmarks_path)
    sec = np.load(run_preprocess(path, tmp_path / "b", PreprocessConfig(face_index=1)).landmarks_path)
    assert big["boxes"][0, 0] < 450 < sec["boxes"][0, 0]
    assert sec["boxes"][0, 2] / big["boxes"][0, 2] == pytest.approx(0.6, rel=0.1)


# ----------------------------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def moving_video(tmp_path_factory) -> tuple[Path, list[int]]:
    """22 frames: the astronaut's head moving 3 px / frame to the right, frames 9 and 10 blank."""
    base = _face_on_flat(size=320 + 64, colour=(90, 90, 90))
    blank = [9, 10]
    frames = [np.full((320, 320, 3), 90, np.uint8) if t in blank else np.roll(base, 3 * t, axis=1)[32:352, 32:352]
              for t in range(22)]
    path = tmp_path_factory.mktemp("video") / "moving.mp4"
    write_video(path, frames)
    return path, blank


@pytest.fixture(scope="module")
def clean_run(moving_video, tmp_path_factory):
    path, _ = moving_video
    out = tmp_path_factory.mktemp("clean")
    return run_preprocess(path, out, PreprocessConfig(size=256))


def test_video_statuses_smooth_boxes_and_bounded_reads(moving_video, clean_run, tmp_path, monkeypatch):
    path, blank = moving_video
    z = np.load(clean_run.landmarks_path)
    T = 22
    assert clean_run.num_frames == T and z["fps"] == pytest.approx(25.0)
    assert [i for i, s in enumerate(z["status"]) if s == "no_face"] == blank
    assert z["valid"].sum() == T - len(blank) and set(z["status"]) == {"ok", "no_face"}
    assert np.abs(z["lmk478"][blank]).max() == 0
    assert len(list((clean_run.stage_dir / "frames").glob("*.png"))) == T
    boxes = z["boxes"]
    assert np.abs(np.diff(boxes[:, :3], 2, axis=0)).max() < 0.6  # no jitter, also across the gap
    # The crop follows the motion: the eyes, mapped back to source pixels, move 3 px per frame.
    ok = np.flatnonzero(z["valid"])
    src_x = [np.mean(_eyes(apply_matrix(np.linalg.inv(z["crop_transform"][t]), z["lmk478"][t].astype(float))),
                     0)[0] for t in ok]
    slope = np.polyfit(ok, src_x, 1)[0]
    assert slope == pytest.approx(3.0, abs=0.3)
    # In the crop the face stays put (box follows it).
    crop_x = [np.mean(_eyes(z["lmk478"][t]), 0)[0] for t in ok]
    assert np.ptp(crop_x) < 6.0
    # Decoding goes chunk by chunk: never more than `chunk` frames per get_batch call.
    import decord

    sizes = []
    real = decord.VideoReader.get_batch

    def spy(self, indices):
        sizes.append(len(indices))
        return real(self, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", spy)
    res = run_preprocess(path, tmp_path / "item", PreprocessConfig(size=128, chunk=4, max_frames=12, stride=2))
    assert max(sizes) <= 4 and sum(sizes) == 2 * 11  # two passes over the 11 kept frames
    assert np.load(res.landmarks_path)["source_frame_index"].tolist() == list(range(0, 22, 2))


def test_video_reading_memory_is_bounded(tmp_path):
    """Iterating a video holds about two chunks of frames (the one being consumed and the next), not the video
    (numpy allocations are traced)."""
    frames = [np.full((240, 320, 3), (i * 7) % 255, np.uint8) for i in range(40)]
    path = tmp_path / "long.mp4"
    write_video(path, frames)
    src = open_source(path)
    frame_bytes = 240 * 320 * 3
    tracemalloc.start()
    n = 0
    for _, frame, _ in src.frames(range(len(src)), chunk=4):
        n += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 40 and peak < 3 * 4 * frame_bytes  # 40 frames would be 40 * frame_bytes


def test_resume_after_crash_equals_clean_run(moving_video, clean_run, tmp_path):
    path, _ = moving_video
    out = tmp_path / "item"

    class Crash(RuntimeError):
        pass

    def crash_after_7(done, total):
        if done == 7:
            raise Crash

    with pytest.raises(Crash):
        run_preprocess(path, out, PreprocessConfig(size=256), progress=crash_after_7)
    assert Manifest.load(out / "preprocess").status == "failed"
    assert len(list((out / "preprocess" / "frames").glob("*.png"))) == 7
    # Make it harder: a torn last record (killed mid-write) and a finished frame whose matte went missing.
    with open(out / "preprocess" / "progress.jsonl", "a") as f:
        f.write('{"t": 7, "status": "o')
    (out / "preprocess" / "mattes" / "000003.png").unlink()
    seen = []
    res = run_preprocess(path, out, PreprocessConfig(size=256), progress=lambda d, t: seen.append(d))
    assert res.frames_skipped == 6 and res.frames_processed == 22 - 6 and seen[0] == 6 and seen[-1] == 22
    a, b = np.load(clean_run.landmarks_path), np.load(res.landmarks_path)
    for k in ("lmk478", "valid", "status", "crop_transform", "boxes", "source_frame_index"):
        assert np.array_equal(a[k], b[k]), k
    for t in range(22):
        assert clean_run.frame_path(t).read_bytes() == res.frame_path(t).read_bytes()
        assert clean_run.matte_path(t).read_bytes() == res.matte_path(t).read_bytes()
    assert run_preprocess(path, out, PreprocessConfig(size=256)).skipped


def test_track_hook_outputs_are_recorded(tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(_face_on_flat(size=400)).save(path)
    calls = []

    def track(stage_dir, result):
        calls.append(result.num_frames)
        (stage_dir / "tracking.npz").write_bytes(b"x")
        return ["tracking.npz"]

    run_preprocess(path, tmp_path / "i", track_fn=track, track_settings={"iters": 1})
    assert calls == [1] and "tracking.npz" in Manifest.load(tmp_path / "i" / "preprocess").outputs
    assert run_preprocess(path, tmp_path / "i", track_fn=track, track_settings={"iters": 1}).skipped
    res = run_preprocess(path, tmp_path / "i", track_fn=track, track_settings={"iters": 2})
    assert calls == [1, 1] and res.frames_skipped == 1 and res.frames_processed == 0 and not res.skipped
    # A damaged output is noticed and only that frame is redone.
    frame = tmp_path / "i" / "preprocess" / "frames" / "000000.png"
    good = frame.read_bytes()
    frame.write_bytes(good[:100])
    res = run_preprocess(path, tmp_path / "i", track_fn=track, track_settings={"iters": 2})
    assert res.frames_processed == 1 and frame.read_bytes() == good


# -------------------------------------------------------------------------------------------------- shared data
PHOTOS = ["lp_d30.jpg", "lp_d8.jpg", "lp_d9.jpg", "lp_s1.jpg", "lp_s2.jpg", "lp_s12.jpg"]


@pytest.mark.shared
@pytest.mark.parametrize("name", PHOTOS)
def test_shared_portraits(name, tmp_path):
    path = SHARED / "portraits" / name
    if not path.is_file():
        pytest.skip("shared data absent")
    res = run_preprocess(path, tmp_path / "i")
    z = np.load(res.landmarks_path)
    assert z["status"].tolist() == ["ok"]
    er, el = _eyes(z["lmk478"][0])
    assert 0.18 < np.linalg.norm(el - er) / 512 < 0.30  # yaw shortens the 2-D distance
    assert 0.40 * 512 < (er[1] + el[1]) / 2 < 0.65 * 512


@pytest.mark.shared
@pytest.mark.parametrize("name", ["lp_d13.mp4", "st_WDA_KatieHill_000.mp4"])
def test_shared_clips(name, tmp_path):
    path = SHARED / "clips" / name
    if not path.is_file():
        pytest.skip("shared data absent")
    res = run_preprocess(path, tmp_path / "i", PreprocessConfig(max_frames=4, size=256))
    z = np.load(res.landmarks_path)
    assert z["status"].tolist() == ["ok"] * 4
    for t in range(4):
        er, el = _eyes(z["lmk478"][t])
        assert abs((er[0] + el[0]) / 2 - 128) < 0.08 * 256 and 0.18 < np.linalg.norm(el - er) / 256 < 0.30
    if name == "lp_d13.mp4":  # 720x1280 with the face off-centre: the box is not the frame centre
        assert z["source_size"].tolist() == [720, 1280]
        assert abs(z["boxes"][0, 1] - 640) > 50 or abs(z["boxes"][0, 0] - 360) > 50
