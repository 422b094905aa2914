"""Test-time refinement (pipelines/refine.py) through reconstruct(), and the one prediction path.

CPU, small sizes: the sample portrait preprocessed once; the shipped weights' K = 256 prediction pooled to a K = 64
avatar with a sparse hair grid (``avatar.maps.pool_maps``), fitted and rendered at 64 px.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipelines.avatar.binding import AvatarRig
from pipelines.avatar.maps import ATTRIBUTE_DIMS, ATTRIBUTE_SLICES, NUM_ATTRIBUTES, pool_maps, split_attributes
from pipelines.core.camera import orbit_cameras
from pipelines.errors import ConfigError
from pipelines.head.registry import load_head_model
from pipelines.network import NetworkConfig
from pipelines.network.inference import predict_avatar
from pipelines.network.weights import load_network
from pipelines.reconstruct import ReconstructConfig, SourceFrame, load_source, reconstruct
from pipelines.refine import RefineConfig, observation_weights, refine_maps
from pipelines.stages import preprocessed_dir
from pipelines.train.forward import render_rig
from pipelines.uv.space import UVConfig, build_uv_space, load_or_build_uv_space

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_inputs" / "astronaut.jpg"
SPARSE = dict(hair_grid_cols=32, hair_grid_rows=8, include_vertices=False)  # few Gaussians: cheap CPU renders
SIZE = 64
STEPS = 20


@pytest.fixture(scope="module")
def head():
    return load_head_model("auto")  # the head of the shipped weights (ICT-FaceKit)


@pytest.fixture(scope="module")
def source(head, tmp_path_factory) -> SourceFrame:
    """The sample portrait's preprocessed source frame at full size (512)."""
    return load_source(preprocessed_dir(SAMPLE, tmp_path_factory.mktemp("out"), head)[0], 0)


def resized(src: SourceFrame, size: int) -> SourceFrame:
    def f(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]

    return SourceFrame(f(src.image), f(src.matte), src.params, src.K, src.c2w)


@pytest.fixture(scope="module")
def uv64(head):
    return build_uv_space(head, UVConfig(size=64, **SPARSE))


@pytest.fixture(scope="module")
def uv256(head, tmp_path_factory):
    """The product's UV space (K = 256) of the shipped weights, built into a temporary cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FHAVATAR_CACHE", str(tmp_path_factory.mktemp("uvcache")))
    uv = load_or_build_uv_space(head, UVConfig(size=256))
    mp.undo()
    return uv


@pytest.fixture(scope="module")
def shipped(head, source, uv256):
    """The shipped network's prediction for the sample portrait at K = 256."""
    with torch.no_grad():
        return predict_avatar(load_network(None), head, uv256, source.image[None], source.params, source.c2w[None],
                              source.K[None])


def test_shipped_weights_beat_unproject_on_the_sample_portrait(head, source, uv256, shipped):
    """The shipped weights at K = 256: the frontal (source-camera) render of the sample portrait's avatar is closer
    to the preprocessed source than the no-network baseline's (``--method unproject``), by more than 2 dB at 128 px
    on the whole frame (the baseline has no hair outside the head mesh and no shape offsets)."""
    from pipelines.reconstruct import unproject_maps

    src = resized(source, 128)

    def frontal_psnr(A: torch.Tensor, dp: torch.Tensor | None) -> float:
        with torch.no_grad():
            r = render_rig(AvatarRig(head, uv256, A, source.params.shape, dp), head(source.params), source.c2w[None],
                           source.K[None], 128, backend="torch")
        return psnr(r.rgb[0], src.image)

    net = frontal_psnr(shipped.A, shipped.delta_p_canonical)
    base = frontal_psnr(unproject_maps(source, head, uv256), None)
    assert net > base + 2.0, (net, base)


def test_shipped_weights_keep_the_face_texels_where_they_animate(head, source, uv256, shipped):
    """A Gaussian animates with the triangle its texel is bound to, so the shape offsets must not slide the face's
    texels along the surface (issue 14: the v5 weights slid them 18 mm in the median on this portrait, and a smile's
    lips and teeth were painted by cheek and chin texels). Median tangential part of Δp over the face region < 5 mm,
    over the mouth and teeth < 2 mm."""
    from pipelines.network.inference import network_inputs
    from pipelines.train.losses import tangential_offsets

    p = network_inputs(head, uv256, source.params, source.c2w[None])["p"]
    tangential = tangential_offsets(shipped.delta_p, p, uv256.valid[None, None]).norm(dim=1)[0]
    assert float(tangential[uv256.region_mask("face")].median()) < 0.005
    assert float(tangential[uv256.region_mask("mouth", "teeth")].median()) < 0.002


@pytest.fixture(scope="module")
def fitted(head, source, uv64, shipped):
    """The shipped network's avatar of the sample portrait (pooled to K = 64), before and after STEPS steps."""
    pred = shipped
    A0, dp = pool_maps(pred.A, 64), F.avg_pool2d(pred.delta_p_canonical, 4)
    src = resized(source, SIZE)
    calls = []
    A, report = refine_maps(A0, dp, src, head, uv64, STEPS, backend="torch",
                            progress=lambda n, **kw: calls.append((n, kw)))
    return {"A0": A0, "A": A, "dp": dp, "src": src, "report": report, "calls": calls}


def render(head, uv, A, dp, src: SourceFrame, yaw: float | None = None):
    """rgb (3, S, S), alpha (S, S) of the avatar from the source camera (yaw None) or a turntable yaw."""
    c2w = src.c2w[None] if yaw is None else orbit_cameras(torch.tensor([yaw]), torch.tensor([0.0]),
                                                          target=tuple(head.head_center().tolist()))
    with torch.no_grad():
        r = render_rig(AvatarRig(head, uv, A, src.params.shape, dp), head(src.params), c2w, src.K[None], SIZE,
                       backend="torch")
    return r.rgb[0], r.alpha[0, 0]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).pow(2).mean()))


# ------------------------------------------------------------------------------------------------- the bug
def test_reconstruct_refines_a_network_avatar_instead_of_failing(head, source):
    """reconstruct() predicts under no_grad, and refinement used to run inside it: every item failed with "element 0
    of tensors does not require grad". Now the maps change and the source view gets closer."""
    torch.manual_seed(0)
    net = load_network("random", config=NetworkConfig.tiny())
    uv = build_uv_space(head, UVConfig(size=32, **SPARSE))
    src = resized(source, SIZE)
    plain = reconstruct(src, head, uv, ReconstructConfig(method="network", uv_size=32), net)
    refined = reconstruct(src, head, uv, ReconstructConfig(method="network", uv_size=32, refine_steps=4),
                          net)
    assert np.abs(refined.maps - plain.maps).max() > 1e-3
    rep = refined.meta["refine"]
    assert rep["steps"] == 4 and rep["source_psnr_after"] > rep["source_psnr_before"] + 0.3
    # The settings are in the avatar (and, through the stage settings, in its manifest).
    assert refined.meta["config"]["refine_steps"] == 4
    assert refined.meta["config"]["refine"] == asdict(RefineConfig()) == rep["config"]


# --------------------------------------------------------------------------------------------- the design
def test_refinement_fits_the_source_view_by_4_db(fitted):
    """20 steps at 64 px lift the source-view PSNR of the shipped network's avatar by more than 4 dB, to above 14 dB
    (the K = 64 pooling; measured on the v2 weights: 9.67 -> 15.64 dB, 15.30 with unseen texels left to the
    proximity term; on v6, whose face texels no longer slide to where the photo needs them: 10.39 -> 15.02 dB)."""
    rep = fitted["report"]
    assert rep["source_psnr_after"] > rep["source_psnr_before"] + 4.0 and rep["source_psnr_after"] > 14.0
    assert [c[0] for c in fitted["calls"]] == [1] * STEPS and fitted["calls"][-1][1]["total"] == STEPS
    assert "dB" in fitted["calls"][-1][1]["status"]
    A = split_attributes(fitted["A"])
    assert ((A["color"] >= 0) & (A["color"] <= 1)).all() and (A["scale"] > 0).all()
    assert torch.allclose(A["rotation"].norm(dim=1), torch.ones(1), atol=1e-4)


def test_refinement_keeps_the_back_of_the_head(head, uv64, fitted):
    """Seen from behind (turntable 180°) the refined avatar's colours stay within 0.02 mean absolute difference of
    the unrefined one where both cover the head (measured on the ICT head: 0.0003; 0.085 before unseen texels were
    held, issue 19); without the hold and the proximity and mirror terms they move by more than 0.04 (measured:
    0.12, colour blotches of the face on the back). The silhouette may grow where the photo shows more head (hair
    volume, shoulders in the matte), by less than a quarter of its area (measured: 0.002).
    """
    f = fitted

    def back_change(A: torch.Tensor) -> tuple[float, float]:
        rgb0, a0 = render(head, uv64, f["A0"], f["dp"], f["src"], yaw=180.0)
        rgb1, a1 = render(head, uv64, A, f["dp"], f["src"], yaw=180.0)
        inside = (a0 > 0.95) & (a1 > 0.95)
        assert inside.float().mean() > 0.15  # the head fills a good part of the view
        return float((rgb1 - rgb0).abs().mean(0)[inside].mean()), float((a1 - a0).abs().sum() / a0.sum())

    colour, silhouette = back_change(f["A"])
    assert colour < 0.02 and silhouette < 0.25
    free = RefineConfig(proximity=0.0, proximity_seen=0.0, mirror=0.0, hold_unseen=False)
    unregularised, _ = refine_maps(f["A0"], f["dp"], f["src"], head, uv64, STEPS, free, backend="torch")
    assert back_change(unregularised)[0] > max(0.04, 3 * colour)


def test_unseen_texels_keep_the_prediction_and_mirrored_ones_follow_their_mirror(head, uv64, fitted):
    """Texels that neither the source nor the mirror shows change by under a tenth of what seen texels change
    (measured on the ICT head: 0, they are held; 0.145 before, issue 19); texels seen less than their mirror take
    over a third of the mirror's colour change, in its direction (measured: 1.4 after 20 steps)."""
    f = fitted
    w = observation_weights(f["src"], head, uv64)[0, 0]
    valid = uv64.valid
    hidden = valid & (w == 0) & (uv64.flip(w) == 0)
    mirrored = valid & (w <= 0.5) & (uv64.flip(w) >= 0.5)
    # Enough texels of each kind for the means below (ICT at K = 64 with the sparse hair grid: about 650 and 30).
    assert hidden.sum() > 500 and mirrored.sum() > 20
    dc = (f["A"] - f["A0"])[0, ATTRIBUTE_SLICES["color"]]
    seen_change = dc.abs().mean(0)[valid & (w == 1)].mean()
    assert dc.abs().mean(0)[hidden].mean() < 0.1 * seen_change
    own, mirror = dc[:, mirrored], uv64.flip(dc)[:, mirrored]
    assert float((own * mirror).sum() / (mirror * mirror).sum()) > 0.33


# ------------------------------------------------------------------------------------------- settings
def test_refine_steps_auto_is_a_number_on_cuda_and_zero_on_the_cpu():
    cfg = ReconstructConfig(refine_steps="auto").validate()
    assert cfg.for_device("cpu").refine_steps == 0
    assert cfg.for_device("cuda").refine_steps == RefineConfig().auto_steps > 0
    assert ReconstructConfig(method="template", refine_steps="auto").validate().for_device("cuda").refine_steps == 0
    assert ReconstructConfig(refine_steps="12").validate().refine_steps == 12
    for bad in ("-1", "many", -3, 2.5):
        with pytest.raises(ConfigError, match="refine-steps"):
            ReconstructConfig(refine_steps=bad).validate()
    with pytest.raises(ConfigError, match="template"):
        ReconstructConfig(method="template", refine_steps=5).validate()
    with pytest.raises(ConfigError, match="channels"):
        RefineConfig(channels=("colour",)).validate()


def test_learning_rate_warms_up_then_decays_to_its_final_fraction():
    cfg = RefineConfig(warmup=0.1, final_lr=0.1)
    f = [cfg.lr_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))


def test_cli_takes_refine_steps_auto_and_rejects_nonsense(tmp_path):
    from fhavatar_cli.main import app

    runner = CliRunner()
    bad = runner.invoke(app, ["reconstruct", str(SAMPLE), "--out", str(tmp_path), "--refine-steps", "lots"])
    assert bad.exit_code == 2 and "refine-steps" in bad.output
    ok = runner.invoke(app, ["--quiet", "reconstruct", str(SAMPLE), "--out", str(tmp_path), "--method", "unproject",
                             "--uv-size", "16", "--head-model", "embedded", "--device", "cpu",
                             "--refine-steps", "auto"])
    assert ok.exit_code == 0, ok.output
    import json

    manifest = json.loads(next(tmp_path.glob("*/avatar/manifest.json")).read_text())
    assert manifest["settings"]["refine_steps"] == 0  # auto on the CPU, resolved before the settings are hashed
    assert manifest["settings"]["refine"]["auto_steps"] == RefineConfig().auto_steps


# ---------------------------------------------------------------------------------- one layout, one path
def test_one_attribute_layout_everywhere():
    from pipelines.network.decoder import UVDecoder
    from pipelines.train import forward

    assert NUM_ATTRIBUTES == sum(ATTRIBUTE_DIMS.values()) == NetworkConfig.tiny().attribute_dim == 14
    stops = [s.stop for s in ATTRIBUTE_SLICES.values()]
    assert [s.start for s in ATTRIBUTE_SLICES.values()] == [0] + stops[:-1] and stops[-1] == 14
    assert UVDecoder(NetworkConfig.tiny()).head[-1].out_channels == NUM_ATTRIBUTES
    assert forward.predict_avatar is predict_avatar  # training, validation and reconstruction share one prediction
