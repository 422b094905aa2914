"""Training (pipelines/train): config schedule, losses, flip augmentation, data sampling, steps and exact resume.

Everything runs on CPU at tiny sizes: a SphereHead avatar rendered with known tracking is written in the preprocess
artifact layout and trained on for a few steps.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from pipelines.avatar.binding import AvatarRig
from pipelines.errors import ConfigError
from pipelines.avatar.maps import template_maps
from pipelines.core.camera import normalized_intrinsics, orbit_cameras, project_points, world_to_camera
from pipelines.head.base import HeadParams
from pipelines.network import NetworkConfig
from pipelines.render import render_gaussians
from pipelines.core.camera import to_pixel_intrinsics
from pipelines.tracking.result import LOW_CONFIDENCE, TRACKED, TrackingResult, load_tracking, save_tracking
from pipelines.train import TrainConfig, load_train_config, train
from pipelines.train.checkpoint import load_sharded, save_sharded
from pipelines.train.config import DataConfig, LossConfig
from pipelines.train.data import Clip, jitter_colors, make_batch, sample_plan
from pipelines.train.losses import position_tv, shape_hinge, ssim, tangential_slide, total_variation
from pipelines.train.mirror import HeadMirror, mirror_c2w
from pipelines.uv.space import UVConfig, build_uv_space

from synthetic_head import SphereHead

torch.set_num_threads(1)

IMAGE = 64
UV_GRID = dict(size=32, hair_grid_cols=32, hair_grid_rows=8)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def head():
    return SphereHead()


def frame_params(head, T: int, seed: int = 0) -> HeadParams:
    g = torch.Generator().manual_seed(seed)
    p = head.zero_params(T)
    p.shape = torch.tensor([[0.3, -0.2]]).expand(T, -1).clone()
    p.expression = torch.rand(T, head.n_expr, generator=g)
    p.rotation = (torch.rand(T, 3, generator=g) - 0.5) * torch.tensor([0.2, 0.6, 0.1])
    p.translation = (torch.rand(T, 3, generator=g) - 0.5) * 0.02
    p.jaw = torch.rand(T, 3, generator=g) * torch.tensor([0.2, 0.0, 0.0])
    return p


def write_clip(folder, head, T: int = 4, seed: int = 0, status=None) -> None:
    """Render a template SphereHead avatar for T tracked frames into <folder>/{frames,mattes,tracking.npz}."""
    from PIL import Image

    uv = build_uv_space(head, UVConfig(**UV_GRID))
    p = frame_params(head, T, seed)
    c2w = orbit_cameras(torch.zeros(T), torch.zeros(T))
    K = normalized_intrinsics()
    maps = template_maps(uv, checker=4)
    rig = AvatarRig(head, uv, maps, p.shape[:1])
    with torch.no_grad():
        g = rig.pose(head(p))
        out = render_gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, world_to_camera(c2w),
                               to_pixel_intrinsics(K.expand(T, 3, 3), IMAGE, IMAGE), IMAGE, IMAGE,
                               torch.ones(T, 3), backend="torch")
    (folder / "frames").mkdir(parents=True)
    (folder / "mattes").mkdir()
    for t in range(T):
        Image.fromarray((out.rgb[t].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(
            folder / "frames" / f"{t:06d}.png")
        Image.fromarray((out.alpha[t, ..., 0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(
            folder / "mattes" / f"{t:06d}.png")
    params = {k: v.numpy() for k, v in p.to_dict().items()}
    params["shape"] = params["shape"][0]
    status = np.full(T, TRACKED, np.uint8) if status is None else np.asarray(status, np.uint8)
    save_tracking(folder / "tracking.npz", TrackingResult(params, K[0].numpy(), c2w.numpy(), np.zeros(T), status,
                                                          image_size=IMAGE, head_model=head.name))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, head):
    root = tmp_path_factory.mktemp("traindata")
    write_clip(root / "clip_a-0123456789", head, T=4, seed=1, status=[TRACKED, TRACKED, LOW_CONFIDENCE, TRACKED])
    write_clip(root / "clip_b-abcdef0123", head, T=3, seed=2)
    write_clip(root / "held_out", head, T=3, seed=3)
    return root


def tiny_config(**over) -> TrainConfig:
    kw = dict(network=NetworkConfig.tiny(), iterations=5, batch_size=2, log_every=1, checkpoint_every=2,
              val_every=0, uv_hair_grid=(UV_GRID["hair_grid_cols"], UV_GRID["hair_grid_rows"]),
              data=DataConfig(val_items=("held_out",), val_frames=2, recon_prob=0.3, flip_prob=0.5))
    kw.update(over)
    return TrainConfig(**kw)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -------------------------------------------------------------------------------------------------------- config
def test_milestones_scale_with_iterations():
    paper = TrainConfig()
    assert (paper.iterations, paper.reg_start_step, paper.boost_step) == (37_500, 7_500, 25_000)
    short = TrainConfig(iterations=3_000)
    assert (short.reg_start_step, short.boost_step) == (600, 2_000)  # 20 % and 66.7 % of the run
    w = short.weights_at
    assert w(599)["3d"] == 0 and w(599)["eye"] == 0 and w(599)["shape_tv"] == 0
    assert w(600)["3d"] == 50 and w(600)["eye"] == 5 and w(600)["shape_tv"] == 10
    assert w(1_999)["3d"] == 50 and w(2_000)["3d"] == 100
    assert w(0)["pos"] == 1 and w(0)["shape"] == 1 and w(0)["aux"] == 0.5  # always on


def test_cosine_lr_schedule_decays_from_lr_to_the_final_ratio():
    assert {TrainConfig().lr_at(s) for s in (0, 10_000, 37_499)} == {1e-4}  # the paper: constant
    cfg = TrainConfig(iterations=1_001, lr=2e-4, lr_schedule="cosine", lr_final_ratio=0.1, warmup_steps=0)
    assert cfg.lr_at(0) == pytest.approx(2e-4)
    assert cfg.lr_at(500) == pytest.approx(2e-4 * 0.55)  # half-way: the mean of lr and the floor
    assert cfg.lr_at(1_000) == pytest.approx(2e-5) and cfg.lr_at(5_000) == pytest.approx(2e-5)
    rates = [cfg.lr_at(s) for s in range(1_001)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    warm = TrainConfig(iterations=1_010, lr_schedule="cosine", warmup_steps=10)
    assert warm.lr_at(4) == pytest.approx(0.5e-4) and warm.lr_at(10) == pytest.approx(1e-4)
    with pytest.raises(ConfigError):
        TrainConfig(lr_schedule="step")


def test_config_loads_yaml_with_nested_overrides(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("iterations: 3000\nloss:\n  lambda_3d: 20\nnetwork:\n  uv_size: 128\n")
    cfg = load_train_config(f, ["loss.epsilon=0.05", "data.val_items=[a, b]", "network.image_size=256"])
    assert cfg.iterations == 3000 and cfg.loss.lambda_3d == 20.0 and cfg.loss.epsilon == 0.05
    assert cfg.network.uv_size == 128 and cfg.network.image_size == 256 and cfg.network.num_scales == 4
    assert cfg.data.val_items == ("a", "b") and cfg.loss.lambda_eye == 5.0  # untouched defaults stay the paper's
    assert cfg.digest() != TrainConfig().digest()


# -------------------------------------------------------------------------------------------------------- losses
def test_position_tv_is_zero_for_constant_positions_and_positive_for_noise():
    cfg = LossConfig(tv3d_in_matte=False)
    B, H = 2, 16
    p = torch.tensor([0.03, -0.02, 0.1]).view(1, 3, 1, 1)
    alpha = torch.rand(B, 1, H, H) * 0.9 + 0.1  # partial coverage everywhere
    i3d = p * alpha + (1 - alpha)  # a constant position rendered over a background of 1
    assert position_tv(i3d, alpha, cfg).item() == pytest.approx(0.0, abs=1e-7)
    noisy = i3d + 0.01 * torch.randn(B, 3, H, H)
    assert position_tv(noisy, alpha, cfg).item() > 1e-3


def test_position_tv_clamps_alpha_from_below():
    cfg = LossConfig(tv3d_in_matte=False, alpha_min=0.1)
    alpha = torch.zeros(1, 1, 4, 4)
    i3d = torch.ones(1, 3, 4, 4)
    i3d[..., 0, 0] = 1.001  # a tiny leak where nothing is rendered
    v = position_tv(i3d, alpha, cfg).item()
    assert math.isfinite(v) and v == pytest.approx(0.001 / 0.1 * 2 / 24, rel=1e-4)  # 2 of 24 neighbour pairs differ by 0.01


def test_shape_hinge_is_zero_below_epsilon_and_linear_above():
    valid = torch.ones(1, 1, 4, 4)
    d = torch.zeros(1, 3, 4, 4)
    d[:, 0] = 0.09
    assert shape_hinge(d, valid, 0.1).item() == 0.0
    d[:, 0] = 0.13
    assert shape_hinge(d, valid, 0.1).item() == pytest.approx(0.03, abs=1e-6)
    valid[..., :2, :] = 0  # invalid texels do not count
    d[..., :2, :] = 5.0
    assert shape_hinge(d, valid, 0.1).item() == pytest.approx(0.03, abs=1e-6)


def _sphere_position_map(K: int = 16, radius: float = 0.1) -> torch.Tensor:
    """(1, 3, K, K) position map of a sphere's band (latitude ±60°, longitude ±90°) on a regular UV grid."""
    lat = torch.linspace(-1.0, 1.0, K).view(K, 1).expand(K, K)
    lon = torch.linspace(-1.5, 1.5, K).view(1, K).expand(K, K)
    return radius * torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()])[None]


def test_tangential_slide_ignores_motion_along_the_normal_and_counts_sliding_beyond_epsilon():
    p = _sphere_position_map()
    valid = torch.ones(1, 1, 16, 16)
    radial = torch.nn.functional.normalize(p, dim=1)
    assert tangential_slide(0.04 * radial, p, valid, 0.005).item() == pytest.approx(0.0, abs=1e-4)  # 4 cm outwards
    # 2 cm along the surface's latitude direction (tangent everywhere): 2 - 0.5 cm beyond ε at every texel
    east = torch.stack([torch.cos(torch.linspace(-1.5, 1.5, 16)).view(1, 16).expand(16, 16),
                        torch.zeros(16, 16), -torch.sin(torch.linspace(-1.5, 1.5, 16)).view(1, 16).expand(16, 16)])[None]
    assert tangential_slide(0.02 * east, p, valid, 0.005).item() == pytest.approx(0.015, rel=0.02)
    assert tangential_slide(0.004 * east, p, valid, 0.005).item() == 0.0
    valid[..., :8, :] = 0  # invalid texels do not count, also when they slide far
    d = 0.004 * east
    d[..., :8, :] = 1.0
    assert tangential_slide(d, p, valid, 0.005).item() == 0.0


def test_total_variation_respects_mask():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :, 2:] = 1.0  # an edge between columns 1 and 2
    assert total_variation(x).item() == pytest.approx(0.5 * (0 + 4 / 12))
    left = torch.zeros(1, 1, 4, 4)
    left[..., :, :2] = 1
    assert total_variation(x, left).item() == 0.0  # the edge is outside the mask


def test_ssim_loss_matches_the_evaluation_metric():
    from pipelines.evaluate.metrics import ssim as metric_ssim

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 24, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 24, 24, generator=g)).clamp(0, 1)
    ref = metric_ssim(a.permute(0, 2, 3, 1).numpy(), b.permute(0, 2, 3, 1).numpy()).mean()
    assert ssim(a, b).item() == pytest.approx(float(ref), abs=1e-5)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------- flip
def test_flip_mirrors_the_tracked_sphere_head(head):
    mirror, why = HeadMirror.build(head)
    assert mirror is not None, why
    p = frame_params(head, 3)
    verts = head(p)
    flipped = head(mirror.params(p))
    # Mirrored parameters pose the mirror image of the mesh (x -> -x), vertex i onto the twin of vertex i.
    torch.testing.assert_close(flipped, mirror.verts(verts), atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped[..., 0].sort(-1).values, (-verts[..., 0]).sort(-1).values.flip(-1).sort(-1).values,
                               atol=1e-6, rtol=0)
    # Seen from the mirrored camera, every point lands where the flipped image has it: u -> 1 - u.
    c2w = orbit_cameras(torch.tensor([20.0, 0.0, -10.0]), torch.tensor([5.0, 0.0, 0.0]))
    K = normalized_intrinsics(batch=3)
    uv0, z0 = project_points(verts, world_to_camera(c2w), K)
    # (the points themselves mirrored, x -> -x; mirror.verts also re-indexes them onto their twins)
    uv1, z1 = project_points(verts * verts.new_tensor([-1.0, 1.0, 1.0]), world_to_camera(mirror_c2w(c2w)), K)
    torch.testing.assert_close(uv1[..., 0], 1 - uv0[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(uv1[..., 1], uv0[..., 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(z1, z0, atol=1e-6, rtol=0)
    # Flipping twice is the identity.
    twice = mirror.params(mirror.params(p))
    for k, v in p.to_dict().items():
        torch.testing.assert_close(getattr(twice, k), v, atol=1e-6, rtol=0)


def test_embedded_head_mirror_swaps_left_and_right_expressions():
    from pipelines.head.embedded import EXPRESSION_NAMES
    from pipelines.head.registry import load_head_model

    mirror, why = HeadMirror.build(load_head_model("embedded"))
    assert mirror is not None, why
    W = mirror.expression_map
    names = list(EXPRESSION_NAMES)
    assert W[names.index("smile_right"), names.index("smile_left")] == pytest.approx(1.0, abs=1e-6)
    assert W[names.index("eye_close_left"), names.index("eye_close_right")] == pytest.approx(1.0, abs=1e-6)
    assert W[names.index("mouth_open"), names.index("mouth_open")] == pytest.approx(1.0, abs=1e-6)
    assert W[names.index("mouth_shift"), names.index("mouth_shift")] == pytest.approx(-1.0, abs=1e-6)
    assert (W.abs().sum(0) - 1).abs().max() < 1e-5  # a signed permutation
    assert mirror.error < 1e-6


def test_flipped_batch_shows_mirrored_images_and_tracking(dataset, head):
    clip = Clip(dataset / "clip_b-abcdef0123", IMAGE)
    mirror, _ = HeadMirror.build(head)
    cfg = DataConfig(brightness=0, contrast=0, saturation=0)
    plans = [sample_plan([clip], cfg, 0, 0, 0, True)]
    plans[0].flip = False
    plain = make_batch([clip], plans, "cpu", mirror)
    plans[0].flip = True
    flipped = make_batch([clip], plans, "cpu", mirror)
    torch.testing.assert_close(flipped.src_img, plain.src_img.flip(-1))
    torch.testing.assert_close(flipped.tgt_matte, plain.tgt_matte.flip(-1))
    torch.testing.assert_close(head(flipped.tgt_params), mirror.verts(head(plain.tgt_params)), atol=1e-6, rtol=0)
    # The tracking still explains the flipped image: the mirrored mesh's silhouette covers the flipped matte.
    uv, _ = project_points(head(flipped.tgt_params), world_to_camera(flipped.tgt_c2w), flipped.K)
    px = (uv[0] * IMAGE).long().clamp(0, IMAGE - 1)
    assert flipped.tgt_matte[0, 0, px[:, 1], px[:, 0]].float().mean() > 0.5


# ---------------------------------------------------------------------------------------------------------- data
def test_sampling_is_a_pure_function_of_the_step(dataset):
    clips = [Clip(dataset / n, IMAGE) for n in ("clip_a-0123456789", "clip_b-abcdef0123")]
    cfg = DataConfig(recon_prob=0.3)
    a = [sample_plan(clips, cfg, 7, s, b, True) for s in range(50) for b in range(2)]
    b = [sample_plan(clips, cfg, 7, s, b, True) for s in range(50) for b in range(2)]
    assert a == b
    assert 0.1 < np.mean([p.recon for p in a]) < 0.5
    for p in a:
        assert (p.source == p.target) == p.recon
        assert p.source in clips[p.clip].frames and p.target in clips[p.clip].frames
    assert 2 not in clips[0].frames  # the low-confidence frame is never used


def test_colour_jitter_keeps_the_background_white():
    img = torch.full((2, 3, 8, 8), 1.0)
    img[..., 2:6, 2:6] = torch.tensor([0.6, 0.4, 0.3]).view(1, 3, 1, 1)
    matte = torch.zeros(2, 1, 8, 8)
    matte[..., 2:6, 2:6] = 1
    out = jitter_colors(img, matte, torch.tensor([[1.1, 0.9, 1.1], [1.0, 1.0, 1.0]]))
    assert (out[..., 0, 0] == 1).all()
    torch.testing.assert_close(out[1], img[1])
    assert not torch.allclose(out[0], img[0])


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_sharded_state_round_trips(tmp_path):
    net = torch.nn.Linear(40, 30)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 40)).sum().backward()
    opt.step()
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 7}
    files = save_sharded(tmp_path, state, max_bytes=3000)
    assert len(files) > 2 and all(f.stat().st_size < 3000 + 4096 for f in files)  # the 4800-byte weight is split
    back = load_sharded(tmp_path)
    assert back["step"] == 7
    torch.testing.assert_close(back["model"]["weight"], net.weight.detach())
    opt2 = torch.optim.Adam(torch.nn.Linear(40, 30).parameters())
    opt2.load_state_dict(back["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])


# ------------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FHAVATAR_CACHE", str(tmp_path_factory.mktemp("uvcache")))
    yield
    mp.undo()


def test_three_steps_log_finite_losses_and_write_outputs(dataset, head, tmp_path, cache_env):
    cfg = tiny_config()
    res = train(cfg, [dataset], tmp_path / "run", head=head, stop_at_step=3)
    assert res.step == 3 and res.stopped == "stop_at"
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("total", "l1", "perceptual", "alpha", "aux_perceptual", "aux_alpha", "3d", "eye", "pos", "shape",
                  "shape_tv", "grad_norm"):
            assert math.isfinite(float(r[k])), (k, r[k])
        assert float(r["slide"]) == 0.0  # not in the paper: off unless loss.lambda_slide asks for it
    assert float(rows[0]["3d"]) == 0.0 and float(rows[1]["3d"]) > 0.0  # L_3d switched on at step 1 (= 7500 / 7500)
    val = read_csv(tmp_path / "run" / "val.csv")
    assert {(r["method"], int(r["step"])) for r in val} == {("baseline", 0), ("untrained", 0), ("network", 3)}
    assert all(math.isfinite(float(r["psnr"])) for r in val)
    for f in ("checkpoints/last.pt", "fhavatar.safetensors", "losses.png", "val_grid_000003.png", "notes.json"):
        assert (tmp_path / "run" / f).is_file(), f
    from pipelines.network.weights import load_network

    net = load_network(tmp_path / "run" / "fhavatar.safetensors")
    assert net.config.uv_size == 32


def test_slide_term_is_logged_when_switched_on(dataset, head, tmp_path, cache_env):
    cfg = tiny_config()
    cfg.loss.lambda_slide, cfg.loss.slide_epsilon = 1.0, 0.0
    train(cfg, [dataset], tmp_path / "run", head=head, stop_at_step=2)
    first, second = read_csv(tmp_path / "run" / "train_log.csv")
    assert float(first["slide"]) == 0.0  # the refinement UNet starts at Δp = 0
    assert 0.0 < float(second["slide"]) < 0.1  # one step later Δp slides a little (metres), never decimetres


def test_shared_prediction_path_leaves_the_training_numbers_unchanged(dataset, head, tmp_path, cache_env):
    """Training predicts with ``network.inference.predict_avatar``, the function reconstruction uses. The first two
    steps of the tiny run give the losses and validation recorded with training's own copy before it was shared."""
    train(tiny_config(), [dataset], tmp_path / "run", head=head, stop_at_step=2)
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert [float(r["total"]) for r in rows] == pytest.approx([0.5510190725326538, 0.6494495272636414], rel=1e-5)
    assert [float(r["l1"]) for r in rows] == pytest.approx([0.10488516837358475, 0.0987275168299675], rel=1e-5)
    val = {r["method"]: float(r["psnr"]) for r in read_csv(tmp_path / "run" / "val.csv")}
    assert val == pytest.approx({"baseline": 19.629070835164292, "untrained": 14.474329294706077,
                                 "network": 14.650556633368328}, rel=1e-5)


def test_resume_continues_exactly_like_an_uninterrupted_run(dataset, head, tmp_path, cache_env):
    cfg = tiny_config(val_every=0, data=DataConfig(val_items=("held_out",), val_frames=1))
    whole = train(cfg, [dataset], tmp_path / "whole", head=head, stop_at_step=3)
    train(cfg, [dataset], tmp_path / "split", head=head, stop_at_step=2)
    resumed = train(cfg, [dataset], tmp_path / "split", head=head, stop_at_step=3)
    assert whole.step == resumed.step == 3
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    la, lb = read_csv(tmp_path / "whole" / "train_log.csv"), read_csv(tmp_path / "split" / "train_log.csv")
    assert [r["step"] for r in lb] == ["1", "2", "3"]
    assert la[-1]["total"] == lb[-1]["total"] and la[-1]["l1"] == lb[-1]["l1"]


def test_init_weights_start_the_network_from_a_trained_file(dataset, head, tmp_path, cache_env):
    """``--init-weights`` (how the shipped weights were continued): step-0 validation scores the given weights
    (labelled "init"), not a fresh network."""
    cfg = tiny_config()
    first = train(cfg, [dataset], tmp_path / "first", head=head, stop_at_step=2)
    cont = train(cfg, [dataset], tmp_path / "cont", head=head, stop_at_step=1, init_weights=first.weights)
    assert cont.step == 1
    a, b = read_csv(tmp_path / "first" / "val.csv"), read_csv(tmp_path / "cont" / "val.csv")
    end_of_first = {r["clip"]: float(r["psnr"]) for r in a if r["method"] == "network" and int(r["step"]) == 2}
    init = {r["clip"]: float(r["psnr"]) for r in b if r["method"] == "init"}
    assert init and not any(r["method"] == "untrained" for r in b)
    for clip, psnr in init.items():  # the fp16 file scores what the network scored when it was written
        assert abs(psnr - end_of_first[clip]) < 0.05, (clip, psnr, end_of_first[clip])


# --------------------------------------------------------------------------------------------------------- packing
def test_pack_keeps_tracked_frames_spread_and_renumbered(dataset, tmp_path):
    """clip_a has frames 0, 1, 3 tracked (2 is low-confidence): packing 2 of them keeps the first and the last, renumbers
    them 0..1 with their own pixels and tracking rows, and the packed item loads as a training clip."""
    from pipelines.train.pack import pack_item, spread_indices

    assert spread_indices(np.arange(10), 4).tolist() == [0, 3, 6, 9]
    assert spread_indices(np.arange(3), None).tolist() == [0, 1, 2]
    src = dataset / "clip_a-0123456789"
    out = pack_item(src, tmp_path, max_frames=2, jpeg_quality=95)
    assert out.name == "clip_a-0123456789"
    packed, orig = load_tracking(out / "tracking.npz"), load_tracking(src / "tracking.npz")
    assert len(packed) == 2 and (packed.status == TRACKED).all()
    np.testing.assert_array_equal(packed.params["expression"], orig.params["expression"][[0, 3]])
    np.testing.assert_array_equal(packed.c2w, orig.c2w[[0, 3]])
    clip, ref = Clip(out, 32), Clip(src, 32)
    img, mat = clip.pixels(1)
    want_img, want_mat = ref.pixels(3)
    assert np.abs(img.astype(int) - want_img.astype(int)).mean() < 3  # JPEG q95
    np.testing.assert_array_equal(mat, want_mat)  # mattes stay lossless
    first = pack_item(src, tmp_path / "first", first=2)
    assert load_tracking(first / "tracking.npz").params["expression"].shape[0] == 2
    np.testing.assert_array_equal(load_tracking(first / "tracking.npz").c2w, orig.c2w[[0, 1]])


def test_video_pack_keeps_the_pixels_and_loads_as_a_clip(dataset, tmp_path):
    """--video packing: frames.mp4 / mattes.mp4 of the kept frames, in tracking order, close to the source pixels;
    the packed tracking drops the observed 2D landmarks."""
    from pipelines.train.pack import pack_item

    src = dataset / "clip_a-0123456789"
    out = pack_item(src, tmp_path, video=True, crf=12)
    assert (out / "frames.mp4").is_file() and not (out / "frames").exists()
    packed, orig = load_tracking(out / "tracking.npz"), load_tracking(src / "tracking.npz")
    assert len(packed) == 3 and packed.landmarks is None
    clip, ref = Clip(out, 32), Clip(src, 32)
    for new, old in enumerate([0, 1, 3]):
        img, mat = clip.pixels(new)
        want_img, want_mat = ref.pixels(old)
        assert np.abs(img.astype(int) - want_img.astype(int)).mean() < 4
        assert np.abs(mat.astype(int) - want_mat.astype(int)).mean() < 3


def test_silhouette_overlap_measures_a_head_rendered_too_small():
    """The validation's size check: a disc of half the matte's radius covers a quarter of it (coverage 0.25,
    IoU 0.25); the same disc covers it fully."""
    from pipelines.train.validate import silhouette_overlap

    yy, xx = np.mgrid[:64, :64] - 31.5
    r = np.hypot(yy, xx)
    matte = (r < 24).astype(np.float32)[None]
    small = (r < 12).astype(np.float32)[None]
    coverage, iou = silhouette_overlap(small, matte)
    assert coverage[0] == pytest.approx(0.25, abs=0.02) and iou[0] == pytest.approx(0.25, abs=0.02)
    coverage, iou = silhouette_overlap(matte, matte)
    assert coverage[0] == 1.0 and iou[0] == 1.0


def test_best_weights_follow_the_highest_mean_validation_psnr_across_calls(tmp_path):
    from pipelines.train.loop import _keep_best

    saved: list[int] = []

    def saver(step):
        return lambda path: (path.write_bytes(b"w%d" % step), saved.append(step))

    assert _keep_best(tmp_path, 400, {"a": {"psnr": 20.0}, "b": {"psnr": 22.0}}, saver(400))
    assert not _keep_best(tmp_path, 800, {"a": {"psnr": 21.0}, "b": {"psnr": 20.0}}, saver(800))  # mean 20.5 < 21
    assert _keep_best(tmp_path, 1200, {"a": {"psnr": 21.5}, "b": {"psnr": 21.0}}, saver(1200))  # 21.25 > 21
    record = json.loads((tmp_path / "best.json").read_text())
    assert saved == [400, 1200] and record["step"] == 1200 and abs(record["mean_psnr"] - 21.25) < 1e-9
    assert (tmp_path / "best.safetensors").read_bytes() == b"w1200"
