"""Tests of the FHAvatar network (pipelines/network): tiny CPU settings, real behaviour checked with values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pipelines.core.camera import normalized_intrinsics, orbit_cameras, world_to_camera
from pipelines.errors import ConfigError, WeightsError
from pipelines.network import (
    FHAvatarNet,
    NetworkConfig,
    PanoHeadPrior,
    WindowCrossAttention,
    gather_windows,
    pool_visible,
    sample_triplane,
    symmetric_fill,
    visibility_mask,
)
from pipelines.network import prior as prior_module

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------ fixtures
def sphere_map(K: int, radius: float = 0.08, center=(0.0, 0.0, 0.0), cols: int | None = None) -> torch.Tensor:
    """(1, 3, K, cols) equirectangular position map of a sphere: u -> longitude (0 at +z), v -> latitude."""
    cols = cols or K
    v = 1.0 - (torch.arange(K) + 0.5) / K
    u = (torch.arange(cols) + 0.5) / cols
    lat, lon = torch.meshgrid((v - 0.5) * math.pi, (u - 0.5) * 2 * math.pi, indexing="ij")
    p = torch.stack([torch.cos(lat) * torch.sin(lon), torch.sin(lat), torch.cos(lat) * torch.cos(lon)]) * radius
    return (p + torch.tensor(center).view(3, 1, 1))[None]


def cameras(yaw_deg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    B = len(yaw_deg)
    w2c = world_to_camera(orbit_cameras(torch.tensor(yaw_deg), torch.zeros(B)))
    return w2c, normalized_intrinsics(batch=B)


def make_inputs(cfg: NetworkConfig, yaw_deg=(0.0, 50.0), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, K = len(yaw_deg), cfg.uv_size
    image = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g)
    p = sphere_map(K).expand(B, -1, -1, -1).clone()
    valid = torch.ones(B, 1, K, K)
    w2c, K_norm = cameras(list(yaw_deg))
    return image, p, valid, w2c, K_norm


@pytest.fixture(scope="module")
def tiny_net() -> FHAvatarNet:
    torch.manual_seed(0)
    return FHAvatarNet(NetworkConfig.tiny()).eval()


# ------------------------------------------------------------------------------------------- shapes and outputs
def test_output_shapes_and_valid_gaussian_attributes(tiny_net):
    cfg = tiny_net.config
    with torch.no_grad():
        out = tiny_net(*make_inputs(cfg), with_aux=True)
    B, K = 2, cfg.uv_size
    assert out.A.shape == out.A1.shape == (B, 14, K, K)
    assert out.delta_p.shape == out.p_r.shape == (B, 3, K, K)
    assert out.M_v.shape == (B, 1, K, K)
    assert [f.shape[-1] for f in out.F_l] == [4, 8, 16, 32]  # K / 2^(N - i), coarse -> fine
    assert [f.shape[1] for f in out.F_l] == [24, 16, 12, 8 + 3]  # finest scale carries the source RGB
    assert [f.shape[-1] for f in out.F_c] == [4, 8, 16, 32]
    assert out.M_o[0] is None and all(m.shape == (B, 1, r, r) for m, r in zip(out.M_o[1:], (8, 16, 32)))

    for aux in (False, True):
        a = out.attributes(aux=aux)
        assert torch.allclose(a["rotation"].norm(dim=1), torch.ones(B, K, K), atol=1e-5)
        assert (a["scale"] > 0).all() and (a["scale"] <= cfg.max_scale_texels).all()
        assert ((a["opacity"] > 0) & (a["opacity"] < 1)).all()
        assert ((a["color"] > 0) & (a["color"] < 1)).all()
        assert (a["offset"].abs() <= cfg.offset_range).all()
        # Fresh net: near the chosen initial values (identity rotation, 1-texel scale, opacity 0.9, no offset).
        assert a["rotation"][:, 0].min() > 0.95
        assert abs(a["scale"].mean().item() - cfg.init_scale_texels) < 0.2
        assert abs(a["opacity"].mean().item() - cfg.init_opacity) < 0.05
        assert a["offset"].abs().max() < 0.25 * cfg.offset_range


def test_fresh_net_predicts_zero_shape_offset(tiny_net):
    image, p, valid, w2c, K_norm = make_inputs(tiny_net.config)
    with torch.no_grad():
        out = tiny_net(image, p, valid, w2c, K_norm)
    assert torch.count_nonzero(out.delta_p) == 0
    assert torch.equal(out.p_r, p)


def test_aux_map_is_the_decoder_without_skips(tiny_net):
    cfg = tiny_net.config
    with torch.no_grad():
        out = tiny_net(*make_inputs(cfg), with_aux=True)
        A1 = tiny_net.decoder(out.F_c[0], None)
        A = tiny_net.decoder(out.F_c[0], out.F_f[1:])
    assert torch.allclose(out.A1, A1) and torch.allclose(out.A, A)
    assert not torch.allclose(out.A, out.A1, atol=1e-4)  # the skips F_f^i matter


# ------------------------------------------------------------------------------- symmetric windows and attention
def test_gather_windows_matches_brute_force_and_mirrors_columns():
    Gh, Gw, w = 5, 8, 3
    x = torch.randn(2, 3, Gh, Gw)
    direct, mirrored, in_bounds = gather_windows(x, w)
    p = w // 2
    for r in range(Gh):
        for c in range(Gw):
            for dr in range(-p, p + 1):
                for dc in range(-p, p + 1):
                    slot, L = (dr + p) * w + (dc + p), r * Gw + c
                    rr, cd, cm = r + dr, c + dc, Gw - 1 - c - dc
                    inside_d = 0 <= rr < Gh and 0 <= cd < Gw
                    inside_m = 0 <= rr < Gh and 0 <= cm < Gw
                    assert inside_d == inside_m == bool(in_bounds[0, 0, slot, L])
                    want_d = x[:, :, rr, cd] if inside_d else torch.zeros(2, 3)
                    want_m = x[:, :, rr, cm] if inside_m else torch.zeros(2, 3)
                    assert torch.equal(direct[:, :, slot, L], want_d)
                    assert torch.equal(mirrored[:, :, slot, L], want_m)

    # A distinctive token at (r0, c0) is the centre of the mirrored window of the query at (r0, Gw - 1 - c0)
    # and of no direct window there.
    r0, c0 = 2, 1
    y = torch.zeros(1, 1, Gh, Gw)
    y[0, 0, r0, c0] = 7.0
    direct, mirrored, _ = gather_windows(y, w)
    q = r0 * Gw + (Gw - 1 - c0)
    centre = (w * w) // 2
    assert mirrored[0, 0, centre, q] == 7.0
    assert direct[0, 0, :, q].abs().sum() == 0
    # Mirrored contents: the token one column to the subject's other side sits in the mirrored slot dc = -1.
    y2 = torch.zeros(1, 1, Gh, Gw)
    y2[0, 0, r0, c0 - 1] = 1.0
    _, mirrored2, _ = gather_windows(y2, w)
    assert mirrored2[0, 0, centre + 1, q] == 1.0  # slot (dr=0, dc=+1)


@pytest.mark.parametrize("impl", ["shift", "unfold"])
def test_attention_changes_only_queries_whose_direct_or_mirrored_window_covers_the_token(impl):
    torch.manual_seed(1)
    D, heads, w, Gh, Gw = 8, 2, 3, 6, 10
    attn = WindowCrossAttention(D, heads, w)
    torch.nn.init.normal_(attn.rel_bias)
    query = torch.randn(1, D, Gh, Gw)
    empty = torch.zeros(1, D, Gh, Gw)
    r0, c0 = 3, 1
    one = empty.clone()
    one[0, :, r0, c0] = torch.randn(D) * 3
    with torch.no_grad():
        changed = (attn(query, one, impl=impl) - attn(query, empty, impl=impl)).abs().amax(1)[0] > 1e-6
    rows = torch.arange(Gh)[:, None]
    cols = torch.arange(Gw)[None, :]
    near_row = (rows - r0).abs() <= w // 2
    direct = near_row & ((cols - c0).abs() <= w // 2)
    mirrored = near_row & ((Gw - 1 - cols - c0).abs() <= w // 2)
    assert torch.equal(changed, direct | mirrored)
    assert mirrored[r0, Gw - 1 - c0] and not direct[r0, Gw - 1 - c0]  # the mirrored side really is reached


def test_shift_and_unfold_attention_agree():
    torch.manual_seed(2)
    attn = WindowCrossAttention(16, 4, 7)
    torch.nn.init.normal_(attn.rel_bias)
    q, ctx = torch.randn(2, 16, 9, 12), torch.randn(2, 16, 9, 12)
    with torch.no_grad():
        a, wa = attn(q, ctx, return_attention=True, impl="shift")
        b, wb = attn(q, ctx, return_attention=True, impl="unfold")
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(wa, wb, atol=1e-6)
    # Padded slots get no weight; each query's weights sum to 1.
    assert torch.allclose(wa.sum(2), torch.ones_like(wa.sum(2)))
    assert wa[0, 0, :, 0].view(2, 7, 7)[:, :3].sum() == 0  # query (0, 0): rows above the grid are padding


# ------------------------------------------------------------------------------------------ visibility and local
def test_visibility_of_a_sphere_seen_from_the_front():
    K = 64
    p, valid = sphere_map(K), torch.ones(1, 1, K, K)
    w2c, K_norm = cameras([0.0])
    M = visibility_mask(p, valid, w2c, K_norm, image_size=256)[0, 0].bool()
    z = p[0, 2] / 0.08
    assert M[z > 0.2].float().mean() > 0.99  # the front hemisphere (away from the silhouette) is visible
    assert not M[z < 0.0].any()  # the back hemisphere is not
    # The z-buffer alone (no normal test) already hides the back hemisphere.
    M_z = visibility_mask(p, valid, w2c, K_norm, image_size=256, check_facing=False)[0, 0].bool()
    assert not M_z[z < -0.05].any()
    # Seen from the subject's left (yaw 90: camera on +x) the +x half is visible instead.
    w2c, K_norm = cameras([90.0])
    M = visibility_mask(p, valid, w2c, K_norm, image_size=256)[0, 0].bool()
    x = p[0, 0] / 0.08
    assert M[x > 0.2].float().mean() > 0.99 and not M[x < 0.0].any()


def test_zbuffer_hides_front_facing_surface_behind_an_occluder():
    # Two UV islands separated by an invalid column pair: a head-sized sphere and a small one 12 cm in front.
    K = 64
    big = sphere_map(K, 0.08, cols=K // 2)
    small = sphere_map(K, 0.02, center=(0.0, 0.0, 0.12), cols=K // 2)
    p = torch.cat([big, small], dim=-1)
    valid = torch.ones(1, 1, K, K)
    valid[..., K // 2 - 1 : K // 2 + 1] = 0
    w2c, K_norm = cameras([0.0])
    M = visibility_mask(p, valid, w2c, K_norm, image_size=512)[0, 0].bool()
    bp = big[0]
    radial = bp[:2].norm(dim=0)
    front = bp[2] > 0
    shadowed = front & (radial < 0.012)  # behind the small sphere as seen from the camera
    clear = front & (radial > 0.03) & (bp[2] > 0.016)
    assert shadowed.sum() > 0 and not M[:, : K // 2][shadowed].any()
    assert M[:, : K // 2][clear & valid[0, 0, :, : K // 2].bool()].float().mean() > 0.99
    assert not M[valid[0, 0] == 0].any()
    sp = small[0]
    assert M[:, K // 2 + 1 :][(sp[2, :, 1:] > 0.125)].all()  # the occluder's own front is visible


def test_invisible_texels_get_no_local_features(tiny_net):
    cfg = tiny_net.config
    image, p, valid, w2c, K_norm = make_inputs(cfg, yaw_deg=(0.0, 70.0))
    valid[:, :, :, :3] = 0  # an invalid strip as well
    with torch.no_grad():
        out = tiny_net(image, p, valid, w2c, K_norm)
    assert 0.2 < out.M_v.mean() < 0.7  # some texels visible, many not
    assert not out.M_v[valid == 0].any()
    for F_l, M_v in zip(out.F_l, out.M_v_scales):
        hidden = (M_v == 0).expand_as(F_l)
        assert hidden.any() and torch.count_nonzero(F_l[hidden]) == 0
        assert torch.count_nonzero(F_l[~hidden]) > 0.5 * (~hidden).sum()
    assert torch.equal(out.M_v_scales[-1], out.M_v)  # finest scale is the texel-level mask


def test_pool_visible_averages_only_visible_texels():
    f = torch.arange(16.0).view(1, 1, 4, 4)
    M = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float32).view(1, 1, 4, 4)
    F_l, M_c = pool_visible(f, M, 2)
    assert torch.allclose(F_l[0, 0], torch.tensor([[(0 + 4) / 2, 0.0], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14) / 3]]))
    assert torch.allclose(M_c[0, 0], torch.tensor([[0.5, 0.0], [1.0, 0.75]]))


# -------------------------------------------------------------------------------------------------------- eq. 4
def test_symmetric_fill_fills_exactly_the_masked_out_area():
    torch.manual_seed(3)
    F_l = torch.randn(2, 5, 6, 8)
    M_v = (torch.rand(2, 1, 6, 8) > 0.4).float()
    M_o = (torch.rand(2, 1, 6, 8) > 0.3).float()
    F_lm, F_m = symmetric_fill(F_l, M_v, M_o)
    assert torch.equal(F_lm, M_o * F_l)
    kept = (M_v * M_o == 1).expand_as(F_m)
    mirror = F_lm[..., torch.arange(7, -1, -1)]  # column c <- column W - 1 - c
    assert torch.equal(F_m[kept], F_lm[kept])
    assert torch.allclose(F_m[~kept], (F_lm + mirror)[~kept])
    # Soft masks follow eq. 4 literally.
    M_o = torch.rand(2, 1, 6, 8)
    F_lm, F_m = symmetric_fill(F_l, M_v, M_o)
    assert torch.allclose(F_m, M_o * F_l + (M_o * F_l)[..., torch.arange(7, -1, -1)] * (1 - M_v * M_o))


def test_network_fusion_uses_eq4_on_its_own_masks(tiny_net):
    with torch.no_grad():
        out = tiny_net(*make_inputs(tiny_net.config, yaw_deg=(60.0,)))
    for i in range(1, 4):
        F_l, M_v, M_o, F_m = out.F_l[i], out.M_v_scales[i], out.M_o[i], out.F_m[i]
        assert ((M_o > 0) & (M_o < 1)).all()
        assert torch.allclose(F_m, symmetric_fill(F_l, M_v, M_o)[1])
        # Texels invisible in the source view receive their mirror's (visible) local features.
        hidden_mirror_seen = ((M_v == 0) & (M_v.flip(-1) > 0)).expand_as(F_m)
        assert hidden_mirror_seen.any() and (F_m[hidden_mirror_seen].abs() > 0).float().mean() > 0.5


# ---------------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_every_trainable_module():
    torch.manual_seed(4)
    cfg = NetworkConfig.tiny()
    net = FHAvatarNet(cfg).train()
    image, p, valid, w2c, K_norm = make_inputs(cfg, yaw_deg=(30.0,))
    out = net(image, p, valid, w2c, K_norm)
    target = torch.rand_like(out.A)
    loss = (out.A - target).abs().mean() + 0.5 * (out.A1 - target).abs().mean()
    loss.backward()
    for name, prm in net.named_parameters():
        assert prm.requires_grad
        assert prm.grad is not None, name
        assert torch.isfinite(prm.grad).all(), name
    parts = dict(net.named_parts())
    parts.update({f"fusion.scale{i + 1}": m for i, m in enumerate(net.fusion)})
    for part, module in parts.items():
        assert any(prm.grad.abs().sum() > 0 for prm in module.parameters()), part
    # Delta p is learnable through the sampling positions even though it starts at exactly 0.
    assert net.refine.head[-1].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ priors
def test_sample_triplane_uses_panohead_plane_axes():
    R = 8
    ramp = (2 * torch.arange(R) + 1.0) / R - 1.0  # texel centres, align_corners=False
    planes = torch.zeros(1, 3, 2, 1, R, R)
    planes[:, :, 0] = ramp.view(1, R)  # channel 0: the plane's W coordinate
    planes[:, :, 1] = ramp.view(R, 1)  # channel 1: the plane's H coordinate
    pts = (torch.rand(1, 3, 5, 7) * 2 - 1) * (1 - 1.0 / R)
    f = sample_triplane(planes, pts, reduce="concat").view(1, 3, 2, 5, 7)
    x, y, z = pts[0]
    for k, (a, b) in enumerate([(x, y), (x, z), (y, z)]):  # XY, XZ, YZ
        assert torch.allclose(f[0, k, 0], a, atol=1e-5) and torch.allclose(f[0, k, 1], b, atol=1e-5)
    assert torch.allclose(sample_triplane(planes, pts)[0, 0], (x + x + y) / 3, atol=1e-5)


def test_builtin_prior_gives_image_dependent_features_all_around_the_head(tiny_net):
    cfg = tiny_net.config
    prior = tiny_net.prior
    image, p, valid, w2c, K_norm = make_inputs(cfg)
    with torch.no_grad():
        state = prior.encode(image, w2c, K_norm)
        f = prior.sample(state, p, valid)
    back = (p[:, 2:3] < -0.04).expand_as(f)
    front = (p[:, 2:3] > 0.04).expand_as(f)
    assert f[back].abs().mean() > 1e-3 and f[front].abs().mean() > 1e-3
    assert (f[0] - f[1]).abs().mean() > 1e-4  # two different source images -> different full-head features


def test_panohead_prior_without_checkpoint_raises_helpful_weights_error(monkeypatch, tmp_path):
    monkeypatch.delenv("FHAVATAR_PANOHEAD", raising=False)
    monkeypatch.setattr(prior_module, "PANOHEAD_DIR", tmp_path / "weights" / "panohead")
    with pytest.raises(WeightsError) as e:
        FHAvatarNet(NetworkConfig.tiny(prior="panohead"))
    msg = str(e.value)
    assert "PanoHead" in msg and "inversion" in msg
    assert "weights/panohead" in msg and "FHAVATAR_PANOHEAD" in msg and "--prior builtin" in msg
    with pytest.raises(WeightsError, match="does not exist"):
        PanoHeadPrior(NetworkConfig.tiny(), checkpoint=tmp_path / "missing.ts")
    (tmp_path / "not_a_model.pt").write_bytes(b"not torchscript")
    with pytest.raises(WeightsError, match="not a torch.export / TorchScript export"):
        PanoHeadPrior(NetworkConfig.tiny(), checkpoint=tmp_path / "not_a_model.pt")


class _RampInversion(torch.nn.Module):
    """Stand-in for a user's PanoHead export: tri-grid whose channel 0 is the plane's W ramp, channel 1 the
    image brightness, constant along depth."""

    def forward(self, image: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        B, R, C, D = image.shape[0], 16, 8, 3
        ramp = (2 * torch.arange(R, dtype=image.dtype) + 1.0) / R - 1.0
        planes = torch.zeros(B, 3, C, D, R, R, dtype=image.dtype)
        planes[:, :, 0] = ramp.view(1, 1, 1, R)
        planes[:, :, 1] = image.mean(dim=(1, 2, 3)).view(B, 1, 1, 1, 1) + 0.0 * camera[:, :1].view(B, 1, 1, 1, 1)
        return planes.view(B, 3, C * D, R, R)


@pytest.mark.parametrize("fmt", ["pt2", "ts"])
def test_panohead_prior_loads_an_export_and_samples_it(monkeypatch, tmp_path, fmt):
    folder = tmp_path / "panohead"
    folder.mkdir()
    if fmt == "pt2":
        example = (torch.rand(2, 3, 512, 512), torch.rand(2, 25))
        torch.export.save(torch.export.export(_RampInversion(), example), str(folder / "inversion.pt2"))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still a valid user format
            torch.jit.save(torch.jit.script(_RampInversion()), str(folder / "inversion.ts"))
    monkeypatch.setenv("FHAVATAR_PANOHEAD", str(folder))
    cfg = NetworkConfig.tiny(prior="panohead", panohead_channels=8, panohead_depth=3)
    net = FHAvatarNet(cfg).eval()
    assert isinstance(net.prior, PanoHeadPrior)
    assert not any("inverter" in k for k in net.state_dict())
    assert sum(p.numel() for p in net.prior.parameters()) == 0  # frozen and not ours
    image, p, valid, w2c, K_norm = make_inputs(cfg)
    with torch.no_grad():
        state = net.prior.encode(image, w2c, K_norm)
        f = net.prior.sample(state, p, valid)
        out = net(image, p, valid, w2c, K_norm)
    assert state.planes.shape == (2, 3, 8, 3, 16, 16)
    # Channel 0 = mean over planes of the W coordinates (x, x, y) in PanoHead's normalized cube.
    q = p * cfg.panohead_units_per_metre * 2 / cfg.panohead_box_warp
    assert torch.allclose(f[:, 0], (2 * q[:, 0] + q[:, 1]) / 3, atol=1e-5)
    seen = torch.nn.functional.interpolate(image, size=(512, 512), mode="bilinear", antialias=True) * 2 - 1
    assert torch.allclose(f[:, 1], seen.mean(dim=(1, 2, 3)).view(2, 1, 1).expand(2, 32, 32), atol=1e-5)
    assert out.A.shape == (2, 14, 32, 32)


# ------------------------------------------------------------------------------------------------------- config
def test_config_defaults_follow_the_paper_and_reject_bad_values():
    cfg = NetworkConfig()
    assert (cfg.uv_size, cfg.num_scales, cfg.fusion_layers, cfg.window, cfg.image_size) == (256, 4, 2, 7, 512)
    assert cfg.attribute_dim == 14 and cfg.prior == "builtin"
    assert [cfg.uv_resolution(i) for i in (1, 2, 3, 4)] == [32, 64, 128, 256]
    assert [cfg.patch_size(i) for i in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert [cfg.image_size // cfg.image_stride(i) for i in (1, 2, 3, 4)] == [16, 32, 64, 128]
    with pytest.raises(ConfigError):
        NetworkConfig.tiny(window=4)
    with pytest.raises(ConfigError):
        NetworkConfig.tiny(prior="stylegan")
    with pytest.raises(ConfigError):
        NetworkConfig.tiny(uv_channels=(8, 8))
