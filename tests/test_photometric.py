"""Photometric refinement of a tracking (``pipelines.tracking.photometric``): on a synthetic clip with known motion
(textured embedded head, noisy landmarks) it must move the fit towards the truth; through preprocess on a real
face it must lower the colour residual."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core.camera import normalized_intrinsics, orbit_cameras, project_points, world_to_camera
from pipelines.head.base import REGIONS
from pipelines.tracking import TRACKED, track
from pipelines.tracking.photometric import PhotometricConfig, appearance, refine_photometric

SIZE = 256


@pytest.fixture(scope="module")
def head():
    from pipelines.head.registry import load_head_model

    return load_head_model("embedded")


def camera():
    K = normalized_intrinsics()[0]
    c2w = orbit_cameras(torch.zeros(1), torch.zeros(1))[0]
    return K, c2w, world_to_camera(c2w[None])


def face_colours(head) -> np.ndarray:
    """(F, 3) a smooth, busy colour pattern over the canonical surface (gives image gradients everywhere)."""
    x, y, z = head.canonical()[0].numpy()[head.faces.numpy()].mean(1).T
    col = np.stack([0.55 + 0.3 * np.sin(90 * x + 3 * np.sin(70 * y)),
                    0.45 + 0.3 * np.sin(80 * y + 2) * np.cos(60 * x),
                    0.40 + 0.25 * np.cos(110 * z + 50 * x)], 1)
    return np.clip(col, 0, 1)


def render(head, params, colours) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Flat-coloured triangles, painter's algorithm, back faces culled: images (T, S, S, 3) uint8, mattes (T, S, S)
    uint8, projected vertices (T, V, 2) in [0, 1]."""
    import cv2

    K, _, w2c = camera()
    with torch.no_grad():
        v = head(params)
    T = v.shape[0]
    uv, _ = project_points(v, w2c.expand(T, 4, 4), K.expand(T, 3, 3))
    depth = (v @ w2c[0, :3, :3].T + w2c[0, :3, 3])[..., 2].numpy()
    faces = head.faces.numpy()
    images = np.full((T, SIZE, SIZE, 3), 255, np.uint8)
    mattes = np.zeros((T, SIZE, SIZE), np.uint8)
    for b in range(T):
        tri = uv[b].numpy()[faces] * SIZE
        e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        cross = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        front = cross * np.sign(np.median(cross)) > 0
        for f in np.argsort(-depth[b][faces].mean(1)):
            if front[f]:
                pts = np.round(tri[f] * 16).astype(np.int32)
                cv2.fillConvexPoly(images[b], pts, tuple(int(c) for c in colours[f] * 255), cv2.LINE_AA, 4)
                cv2.fillConvexPoly(mattes[b], pts, 255, cv2.LINE_AA, 4)
    return images, mattes, uv


def test_appearance_recovers_albedo_and_per_frame_gains():
    rng = np.random.default_rng(0)
    albedo = torch.as_tensor(rng.uniform(0.2, 0.8, (50, 3)), dtype=torch.float32)
    gain = torch.as_tensor([[1.2, 1.0, 0.9], [0.8, 1.0, 1.1], [1.0, 1.0, 1.0]], dtype=torch.float32)
    colours = gain[:, None] * albedo[None]
    vis = torch.ones(3, 50, dtype=torch.bool)
    vis[0, :10] = False
    a, g = appearance(colours, vis, iters=20)
    assert torch.allclose(g[:, None] * a[None], colours, atol=1e-3)  # the model explains the data exactly
    assert torch.allclose(g / g.mean(0), gain / gain.mean(0), atol=1e-3)  # gains up to the global scale


def test_refinement_moves_a_noisy_landmark_fit_towards_the_true_motion(head):
    rng = np.random.default_rng(0)
    T = 6
    p = head.zero_params(T)
    p.rotation = torch.as_tensor(np.stack([rng.uniform(-.1, .1, T), np.linspace(-.3, .3, T),
                                           rng.uniform(-.05, .05, T)], 1), dtype=torch.float32)
    p.translation = torch.as_tensor(rng.normal(0, .004, (T, 3)), dtype=torch.float32)
    p.expression[:, :6] = torch.as_tensor(rng.uniform(0, .5, (T, 6)), dtype=torch.float32)
    p.jaw[:, 0] = torch.as_tensor(rng.uniform(0, .15, T), dtype=torch.float32)
    images, mattes, uv_true = render(head, p, face_colours(head))
    K, c2w, w2c = camera()
    with torch.no_grad():
        luv, _ = project_points(head.landmarks_3d(head(p)), w2c.expand(T, 4, 4), K.expand(T, 3, 3))
    # A detector's errors: per-point noise plus a per-frame offset of the whole face.
    lmk = luv.numpy() * SIZE + rng.normal(0, 1.0, luv.shape) + rng.normal(0, 2.0, (T, 1, 2))
    fit = track(head, lmk, np.ones(T, bool), K, c2w, image_size=SIZE)
    skin = np.unique(head.faces.numpy()[head.face_region.numpy() == REGIONS["face"]])

    def vertex_error(result) -> float:
        with torch.no_grad():
            uv, _ = project_points(head(result.head_params()), w2c.expand(T, 4, 4), K.expand(T, 3, 3))
        return float(np.linalg.norm((uv - uv_true).numpy()[:, skin] * SIZE, axis=-1).mean())

    refined, report = refine_photometric(head, fit, lambda ids: (images[ids], mattes[ids]))
    before, after = vertex_error(fit), vertex_error(refined)
    assert before > 2.0, before  # the landmark fit is off by the detector's errors...
    assert after < 0.7 * before, (before, after)  # ...and the colours pull it most of the way back
    assert report.frames == T and report.residual_after < 0.7 * report.residual_before, report
    assert report.lmk_error_after_px < report.lmk_error_before_px + 1.5  # it stays near the landmarks
    assert (refined.status == TRACKED).all()
    assert np.array_equal(refined.params["shape"], fit.params["shape"])  # identity is not touched


def test_a_single_photo_is_left_as_it_is(head):
    K, c2w, w2c = camera()
    p = head.zero_params(1)
    with torch.no_grad():
        luv, _ = project_points(head.landmarks_3d(head(p)), w2c, K[None])
    fit = track(head, luv.numpy() * SIZE, np.ones(1, bool), K, c2w, image_size=SIZE)
    refined, report = refine_photometric(head, fit, lambda ids: pytest.fail("a photo needs no frames"))
    assert refined is fit and "photo" in report.skipped


def test_preprocess_with_photometric_refinement_on_a_moving_face(tmp_path, head):
    """--photometric through preprocess: a 6-frame clip of the astronaut sliding and turning slightly."""
    import cv2
    import skimage.data as skimage_data

    from pipelines.stages import preprocess_item
    from pipelines.tracking.result import load_tracking
    from video_files import write_video

    img = skimage_data.astronaut()
    frames = [cv2.warpAffine(img, cv2.getRotationMatrix2D((256, 200), 2.0 * i, 1.0 + 0.01 * i), (512, 512),
                             borderMode=cv2.BORDER_REPLICATE) for i in range(6)]
    path = tmp_path / "moving.mp4"
    write_video(path, frames)
    out = tmp_path / "out"
    _, o = preprocess_item(path, out, head)
    stage = Path(o["dir"])
    plain = load_tracking(stage / "tracking.npz")
    cfg = PhotometricConfig(iterations=24, rounds=2, points=1500)
    status, _ = preprocess_item(path, out, head, photometric=cfg)
    assert status == "done"
    report = json.loads((stage / "photometric.json").read_text())
    assert report["frames"] == 6 and report["settings"]["points"] == 1500
    assert report["residual_after"] < 0.95 * report["residual_before"], report
    assert report["lmk_error_after_px"] < report["lmk_error_before_px"] + 1.0, report
    refined = load_tracking(stage / "tracking.npz")
    assert not np.allclose(refined.params["expression"], plain.params["expression"])
    manifest = json.loads((stage / "manifest.json").read_text())
    assert "photometric.json" in manifest["outputs"] and manifest["settings"]["tracking"]["photometric"]["points"] == 1500
