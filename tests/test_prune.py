"""Pruning at reconstruct time (issue 16): Gaussians that never change a pixel are dropped, with values.

CPU, the reference renderer, the embedded head at K = 32 with a small hair grid (a few thousand Gaussians).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipelines.avatar.artifact import Avatar, load_avatar, save_avatar
from pipelines.avatar.binding import AvatarRig
from pipelines.avatar.head import head_record
from pipelines.avatar.maps import ATTRIBUTE_SLICES, template_maps
from pipelines.avatar.prune import PruneConfig, contribution_scores, prune_avatar, prune_mask, select_samples
from pipelines.core.camera import DEFAULT_RADIUS, normalized_intrinsics, orbit_cameras, to_pixel_intrinsics
from pipelines.core.camera import world_to_camera
from pipelines.errors import ConfigError, InputError
from pipelines.head.registry import load_head_model
from pipelines.render import render_contributions, render_gaussians
from pipelines.uv.space import UVConfig, build_uv_space

OPACITY = ATTRIBUTE_SLICES["opacity"].start
SCORING = dict(views=4, pitches=(0.0,), size=64)  # a cheap scoring set for the tests


@pytest.fixture(scope="module")
def setup():
    head = load_head_model("embedded")
    uv = build_uv_space(head, UVConfig(size=32, hair_grid_cols=96, hair_grid_rows=12))
    maps = template_maps(uv)
    shape = torch.zeros(1, head.n_shape)
    return head, uv, maps, shape


def frontal_view(head, size: int):
    target = tuple(float(x) for x in head.head_center().tolist())
    c2w = orbit_cameras(torch.zeros(1), torch.zeros(1), radius=DEFAULT_RADIUS, target=target)
    return world_to_camera(c2w), to_pixel_intrinsics(normalized_intrinsics(), size, size)


def render_rig(rig: AvatarRig, head, size: int = 64):
    g = rig.pose_params(head.zero_params(1))
    vm, K = frontal_view(head, size)
    return render_gaussians(g.means, g.quats, g.scales, g.opacities, g.colors, vm, K, size, size,
                            torch.ones(1, 3), backend="torch")


def test_contributions_equal_the_gradient_of_the_image_by_colour():
    """sum_p w_i(p) from the compositor == d(sum of the rendered channel)/d(colour_i) by autograd."""
    g = torch.Generator().manual_seed(0)
    n = 40
    means = torch.cat([torch.rand(n, 2, generator=g) * 0.6 - 0.3, 2.0 + torch.rand(n, 1, generator=g)], 1)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = 0.02 + 0.06 * torch.rand(n, 3, generator=g)
    opac = 0.2 + 0.79 * torch.rand(n, generator=g)
    vm, K = torch.eye(4)[None], torch.tensor([[[60.0, 0, 24], [0, 60.0, 24], [0, 0, 1]]])
    w = render_contributions(means, quats, scales, opac, vm, K, 48, 48, backend="torch")
    colors = torch.zeros(n, 1, requires_grad=True)
    out = render_gaussians(means, quats, scales, opac, colors, vm, K, 48, 48, backend="torch")
    (grad,) = torch.autograd.grad(out.rgb.sum(), colors)
    assert w.shape == (1, n) and float(w.sum()) > 10.0  # the scene covers many pixels
    torch.testing.assert_close(w[0], grad[:, 0], rtol=1e-4, atol=1e-5)


def test_a_transparent_gaussian_is_pruned_an_opaque_one_in_view_kept(setup):
    head, uv, maps, shape = setup
    rig = AvatarRig(head, uv, maps, shape)
    g = rig.pose_params(head.zero_params(1))
    # The most frontal face Gaussian (largest z, near the centre line) and another one made nearly transparent.
    front = int(torch.argmax(g.means[0, :, 2] - 10 * g.means[0, :, 0].abs()))
    faint = (front + 1) % rig.num_gaussians
    sample_maps = uv.sample_maps(maps)[0]
    assert float(sample_maps[front, OPACITY]) == pytest.approx(0.95, abs=1e-6)
    rig.opacity[0, faint] = 0.001
    keep, info = prune_mask(rig, torch.zeros(1, head.n_expr), PruneConfig(**SCORING, min_contribution=0.5))
    assert not keep[faint] and keep[front]
    assert info["before"] == rig.num_gaussians and info["below_opacity"] == 1 and info["kept"] == int(keep.sum())
    scores = contribution_scores(rig, torch.zeros(1, head.n_expr), PruneConfig(**SCORING))
    assert float(scores[front]) > 50.0  # in pixels at 512²: a frontal texel-sized Gaussian draws a lot
    assert float(scores[faint]) == 0.0  # below 1/255 opacity: never composited


def test_opacity_pruning_is_lossless_and_contribution_pruning_within_tolerance(setup):
    head, uv, maps, shape = setup
    maps = maps.clone()
    g = torch.Generator().manual_seed(3)
    # A third of the map, in blocks of 4 x 4 texels, all but invisible (bilinear sampling keeps block interiors).
    faint = torch.rand(1, 1, uv.size // 4, uv.size // 4, generator=g) < 0.33
    faint = torch.nn.functional.interpolate(faint.float(), scale_factor=4.0, mode="nearest").bool()
    maps[:, OPACITY:OPACITY + 1][faint] = 0.002
    full = AvatarRig(head, uv, maps, shape)
    ref = render_rig(full, head)

    keep, info = prune_mask(full, torch.zeros(1, head.n_expr), PruneConfig())  # the default: opacity only
    assert info["below_opacity"] > 0.1 * info["before"]
    pruned = render_rig(AvatarRig(head, select_samples(uv, keep), maps, shape), head)
    assert torch.equal(pruned.rgb, ref.rgb) and torch.equal(pruned.alpha, ref.alpha)  # exactly nothing changes

    keep, info = prune_mask(full, torch.zeros(1, head.n_expr), PruneConfig(**SCORING, min_contribution=1.0))
    assert info["below_contribution"] > 0.05 * info["before"]  # hidden Gaussians go too
    pruned = render_rig(AvatarRig(head, select_samples(uv, keep), maps, shape), head)
    d = (pruned.rgb - ref.rgb).abs()
    # Stated tolerance: each dropped Gaussian drew < 1 px at 512² (1/64 px here), so the view moves by little.
    assert float(d.mean()) < 2e-4 and float(d.max()) < 0.02


def test_a_budget_keeps_the_largest_contributions(setup):
    head, uv, maps, shape = setup
    rig = AvatarRig(head, uv, maps, shape)
    cfg = PruneConfig(**SCORING, max_gaussians=500)
    keep, info = prune_mask(rig, torch.zeros(1, head.n_expr), cfg)
    scores = contribution_scores(rig, torch.zeros(1, head.n_expr), cfg)
    assert int(keep.sum()) == 500 == info["kept"]
    assert float(scores[keep].min()) >= float(scores[~keep].max())


def test_the_mask_travels_in_the_avatar_file_and_the_manifest(setup, tmp_path):
    head, uv, maps, shape = setup
    params = {k: v.numpy() for k, v in head.zero_params(1).to_dict().items() if k != "shape"}
    avatar = Avatar(maps[0].numpy(), np.zeros((3, uv.size, uv.size), np.float32), shape[0].numpy(), params,
                    normalized_intrinsics()[0].numpy(), np.eye(4, dtype=np.float32), head_record(head))
    a = avatar.maps.copy()
    a[OPACITY, :8] = 0.0
    pruned = prune_avatar(dataclasses.replace(avatar, maps=a), head, uv, PruneConfig())
    assert pruned.keep is not None and pruned.keep.dtype == bool and pruned.keep.shape == (uv.num_samples,)
    assert pruned.meta["prune"]["kept"] == int(pruned.keep.sum()) < uv.num_samples
    assert pruned.meta["prune"]["config"]["min_opacity"] == pytest.approx(1 / 255)
    save_avatar(tmp_path / "a.npz", pruned)
    back = load_avatar(tmp_path / "a.npz")
    assert np.array_equal(back.keep, pruned.keep)
    assert back.meta["prune"] == json.loads(json.dumps(pruned.meta["prune"]))  # tuples come back as lists
    assert prune_avatar(avatar, head, uv, PruneConfig()).keep is None  # nothing to drop: no mask stored
    assert select_samples(uv, torch.from_numpy(back.keep)).num_samples == int(back.keep.sum())
    with pytest.raises(InputError, match="pruning mask"):
        select_samples(uv, torch.ones(uv.num_samples + 1, dtype=torch.bool))
    with pytest.raises(ConfigError):
        PruneConfig(min_opacity=1.5).validate()
