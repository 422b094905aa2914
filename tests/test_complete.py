"""Completion of the never-seen head (pipelines/avatar/complete.py, issue 18), on a synthetic source.

The embedded head at K = 64 with a sparse hair grid, a frontal source camera, and a photo painted from the head's own
projection: skin where the head's skin (face below the hairline, ears, neck) projects, a known hair colour elsewhere
inside a matte that reaches 12 px above the head (hair the head model lacks). CPU, 64-128 px renders.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation, binary_erosion

from pipelines.avatar.binding import AvatarRig
from pipelines.avatar.complete import (CompleteConfig, complete_maps, fill_gutter, hair_cap, rasterize_mask,
                                       vertex_normals)
from pipelines.avatar.maps import ATTRIBUTE_SLICES, template_maps
from pipelines.core.camera import DEFAULT_RADIUS, normalized_intrinsics, orbit_cameras, world_to_camera
from pipelines.errors import ConfigError
from pipelines.head.base import REGIONS
from pipelines.head.registry import load_head_model
from pipelines.reconstruct import ReconstructConfig, SourceFrame, reconstruct, unproject_maps
from pipelines.refine import seen_by_source
from pipelines.train.forward import render_rig
from pipelines.uv.space import UVConfig, build_uv_space

torch.set_num_threads(1)
HAIR = (0.30, 0.15, 0.05)
SKIN = (0.85, 0.65, 0.55)
SIZE = 128


@pytest.fixture(scope="module")
def head():
    return load_head_model("embedded")


@pytest.fixture(scope="module")
def uv(head):
    return build_uv_space(head, UVConfig(size=64, hair_grid_cols=64, hair_grid_rows=16, include_vertices=False))


def camera(head, yaw: float = 0.0) -> torch.Tensor:
    target = tuple(float(x) for x in head.head_center())
    return orbit_cameras(torch.tensor([yaw]), torch.tensor([0.0]), DEFAULT_RADIUS, target)[0]


@pytest.fixture(scope="module")
def source(head) -> SourceFrame:
    return synthetic_source(head)


def synthetic_source(head) -> SourceFrame:
    params = head.zero_params()
    c2w, K = camera(head), normalized_intrinsics()[0]
    verts = head(params)[0]
    w2c = world_to_camera(c2w[None])[0]
    cap = hair_cap(head, head.canonical()[0], CompleteConfig().hairline_above_eyes)
    skin_faces = head.faces[~cap[head.faces].all(1)]
    skin = rasterize_mask(verts, skin_faces, w2c, K, SIZE)
    whole = rasterize_mask(verts, head.faces, w2c, K, SIZE)
    matte = whole.copy()
    top = np.zeros_like(whole)
    top[:, :] = np.arange(SIZE)[:, None] < SIZE * 0.45  # the upper part of the head: hair grows out of it
    matte |= binary_dilation(whole, iterations=12) & top
    image = np.ones((3, SIZE, SIZE), np.float32)
    for c in range(3):
        image[c][matte] = HAIR[c]
        image[c][skin & ~top | skin & whole & ~binary_dilation(~skin, iterations=2)] = SKIN[c]
    return SourceFrame(torch.from_numpy(image), torch.from_numpy(matte.astype(np.float32))[None], params, K, c2w)


# The completion's own steps on the synthetic source, without the pixel guard: at K = 64 the blobs' blur renders the
# head ~25 % wider than the painted photo (the unprojected avatar's source view is already 14 dB off), so its
# source-view error measures the blur, not the completion, and the guard would undo the hair volume it is here to
# test. The guard is tested on the shipped network's avatars below.
SYNTHETIC = CompleteConfig(enabled=True, guard_pixel_passes=0)


@pytest.fixture(scope="module")
def completed(source, head, uv):
    maps = unproject_maps(source, head, uv)
    delta_p = torch.zeros(1, 3, uv.size, uv.size)
    out, dp, info = complete_maps(maps, delta_p, source, head, uv, SYNTHETIC)
    return maps, out, dp, info


def back_scalp_texels(head, uv, seen):
    """(rows, cols) of never-seen scalp texels on the back of the head (canonical z < -5 cm)."""
    p = uv.position_map(head.canonical(), head.faces)[0]
    m = uv.region_mask("scalp") & ~seen & (p[2] < head.head_center()[2] - 0.05)
    return torch.nonzero(m, as_tuple=True)


def test_never_seen_scalp_takes_the_visible_hair_colour(source, head, uv, completed):
    maps, out, _, info = completed
    seen = seen_by_source(source, head, uv)[0][0, 0]
    r, c = back_scalp_texels(head, uv, seen)
    assert len(r) > 20
    # A grey shell where the photo shows nothing (today's network) gets the hair colour too.
    grey = maps.clone()
    grey[0, ATTRIBUTE_SLICES["color"]] = torch.where(seen, grey[0, ATTRIBUTE_SLICES["color"]], torch.tensor(0.5))
    filled = complete_maps(grey, torch.zeros(1, 3, uv.size, uv.size), source, head, uv, SYNTHETIC)[0]
    np.testing.assert_allclose(filled[0, ATTRIBUTE_SLICES["color"]][:, r, c].mean(1).numpy(), HAIR, atol=0.03)
    colour = out[0, ATTRIBUTE_SLICES["color"]][:, r, c]  # (3, n)
    # Before completion the unprojection filled them with the scalp's mean over seen and mirrored texels, which
    # mixes in the skin of a high forehead; after, the visible hair's colour (the photo's hair median).
    np.testing.assert_allclose(colour.mean(1).numpy(), HAIR, atol=0.03)
    assert float((colour - torch.tensor(HAIR)[:, None]).abs().max()) < 0.12  # texture stays faint
    assert info["group_colour"]["hair"] == pytest.approx(list(HAIR), abs=0.01)


def test_seen_texels_keep_their_attributes(source, head, uv, completed):
    maps, out, dp, _ = completed
    seen = seen_by_source(source, head, uv)[0][0, 0]
    face = seen & uv.region_mask("face")
    cap = hair_cap(head, head.canonical()[0], CompleteConfig().hairline_above_eyes)
    from pipelines.avatar.complete import _TexelVertex

    tv = _TexelVertex(uv, head.faces, head.num_vertices)
    cap_map = torch.zeros_like(uv.valid)
    cap_t = tv.to_texels(cap.numpy()[:, None].astype(float))[:, 0] > 0.5
    cap_map[tv.rows[cap_t], tv.cols[cap_t]] = True
    # Facing the camera (texels seen edge-on carry the matte's rim and are completed like unseen ones).
    verts = head(source.params)[0]
    n = torch.nn.functional.normalize(torch.as_tensor(tv.to_texels(vertex_normals(verts, head.faces).numpy())), dim=-1)
    p = torch.as_tensor(tv.to_texels(verts.numpy()))
    cos = (n * torch.nn.functional.normalize(p - source.c2w[:3, 3].double(), dim=-1)).sum(-1).abs()
    facing = torch.zeros_like(uv.valid)
    ok = (cos >= CompleteConfig().contour_cos).numpy()
    facing[tv.rows[ok], tv.cols[ok]] = True
    keep = face & ~cap_map & facing  # the seen face below the hairline: no hair volume reaches it
    assert keep.sum() > 200
    assert torch.equal(out[0][:, keep], maps[0][:, keep])
    assert torch.equal(dp[0][:, keep], torch.zeros_like(dp[0][:, keep]))


def test_hair_volume_grows_the_silhouette_to_the_matte(source, head, uv, completed):
    maps, out, dp, info = completed
    assert info["hair"]["contour_vertices"] > 10 and info["hair"]["max_mm"] > 10
    rig = lambda A, d: AvatarRig(head, uv, A, source.params.shape, d)  # noqa: E731
    verts = head(source.params)
    K = source.K[None]
    before = render_rig(rig(maps, torch.zeros_like(dp)), verts, source.c2w[None], K, SIZE, backend="torch")
    after = render_rig(rig(out, dp), verts, source.c2w[None], K, SIZE, backend="torch")
    # The crown's Gaussians rise to the matte's top, 12 px (3 cm at the head) above the head's own.
    px = DEFAULT_RADIUS / normalized_intrinsics()[0, 0, 0] / SIZE
    top = lambda A, d: float(rig(A, d).pose(verts).means[0, :, 1].max())  # noqa: E731
    rise = top(out, dp) - top(maps, torch.zeros_like(dp))
    assert 8 * px < rise < 13 * px
    # The face (seen, below the hairline) renders as before in the source view (to the K = 64 blobs' blur).
    centre = (slice(SIZE // 2, SIZE * 3 // 4), slice(SIZE * 3 // 8, SIZE * 5 // 8))
    diff = (after.rgb[0][:, centre[0], centre[1]] - before.rgb[0][:, centre[0], centre[1]]).abs()
    assert float(diff.max()) < 0.03


def test_no_holes_at_180_after_completion(source, head, uv):
    """A template avatar made faint (as a network's back of the head): alpha < 0.5 inside the head's silhouette at
    180° drops below 1 % once completed."""
    faint = template_maps(uv)
    faint[:, ATTRIBUTE_SLICES["opacity"]] = 0.03
    faint[:, ATTRIBUTE_SLICES["scale"]] = 0.4
    dp = torch.zeros(1, 3, uv.size, uv.size)
    done, dp2, _ = complete_maps(faint, dp, source, head, uv, CompleteConfig(enabled=True, hair_volume=False))
    params = head.zero_params()
    c2w = camera(head, 180.0)
    ref = binary_erosion(rasterize_mask(head(params)[0], head.faces, world_to_camera(c2w[None])[0],
                                        normalized_intrinsics()[0], 64), iterations=2)

    def holes(A, d):
        r = render_rig(AvatarRig(head, uv, A, params.shape, d), head(params), c2w[None], normalized_intrinsics(), 64,
                       backend="torch")
        return float((r.alpha[0, 0].numpy()[ref] < 0.5).mean())

    assert holes(faint, dp) > 0.3
    assert holes(done, dp2) < 0.01


def test_gutter_takes_the_nearest_valid_texel():
    valid = torch.zeros(8, 8, dtype=torch.bool)
    valid[2:6, 2:6] = True
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0][valid] = torch.arange(16.0)
    out = fill_gutter(maps, valid, 1)
    assert torch.equal(out[0][:, valid], maps[0][:, valid])
    assert out[0, 0, 1, 2] == maps[0, 0, 2, 2] and out[0, 0, 3, 6] == maps[0, 0, 3, 5]
    assert out[0, 0, 0, 0] == 0  # farther than the gutter width: untouched


def test_config_flows_and_is_recorded(source, head, uv):
    cfg = ReconstructConfig(method="unproject", uv_size=64, complete=False).validate()
    assert cfg.complete.enabled is False and str(cfg.complete) == "off"
    assert asdict(ReconstructConfig())["complete"]["enabled"] is False  # off by default, in the stage settings
    off = reconstruct(source, head, uv, cfg)
    on = reconstruct(source, head, uv, replace(cfg, complete=CompleteConfig(enabled=True)))
    assert off.meta["complete"] == {"enabled": False} and off.meta["config"]["complete"]["enabled"] is False
    assert on.meta["complete"]["filled"] > 0 and on.meta["config"]["complete"]["opacity_floor"] == 0.95
    assert np.abs(on.delta_p).max() > 0.005 and np.abs(off.delta_p).max() == 0
    with pytest.raises(ConfigError):
        ReconstructConfig(complete=CompleteConfig(opacity_floor=1.5)).validate()
    assert REGIONS["scalp"] == 1


# ----------------------------------------------------------------------------- the shipped network on the ICT head
def network_prediction(spec, tmp_path_factory) -> dict:
    """The shipped weights' prediction (ICT head, K = 256) of frame 0 of ``spec`` (a photo or a clip, preprocessed
    with the defaults) and that frame as a source at 128 px: {"head", "uv", "src", "pred": (A, delta_p)}."""
    import torch.nn.functional as F

    from pipelines.network.inference import predict_avatar
    from pipelines.network.weights import load_network
    from pipelines.reconstruct import load_source
    from pipelines.stages import preprocessed_dir
    from pipelines.uv.space import load_or_build_uv_space

    ict = load_head_model("auto")  # the head of the shipped weights (ICT-FaceKit)
    full = load_source(preprocessed_dir(spec, tmp_path_factory.mktemp("out"), ict)[0], 0)
    mp = pytest.MonkeyPatch()
    mp.setenv("FHAVATAR_CACHE", str(tmp_path_factory.mktemp("uvcache")))
    uv256 = load_or_build_uv_space(ict, UVConfig(size=256))
    mp.undo()
    with torch.no_grad():
        pred = predict_avatar(load_network(None), ict, uv256, full.image[None], full.params, full.c2w[None],
                              full.K[None])

    def small(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=(128, 128), mode="bilinear", antialias=True)[0]

    src = SourceFrame(small(full.image), small(full.matte), full.params, full.K, full.c2w)
    return {"head": ict, "uv": uv256, "src": src, "pred": (pred.A, pred.delta_p_canonical)}


def source_view_psnr(f: dict, A: torch.Tensor, dp: torch.Tensor) -> float:
    """PSNR (dB) of the avatar's render from ``f``'s source camera against the source on white, at 128 px."""
    from pipelines.refine import on_white

    head, src = f["head"], f["src"]
    target = on_white(src.image[None], src.matte[None])[0]
    with torch.no_grad():
        r = render_rig(AvatarRig(head, f["uv"], A, src.params.shape, dp), head(src.params), src.c2w[None],
                       src.K[None], 128, backend="torch")
    return float(-10 * torch.log10((r.rgb[0] - target).pow(2).mean()))


@pytest.fixture(scope="module")
def ict_network_avatar(tmp_path_factory):
    """The shipped weights' prediction of the sample portrait, completed with the defaults and with the source-view
    guards off (the completion as it was)."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "sample_inputs" / "astronaut.jpg"
    f = network_prediction(sample, tmp_path_factory)
    A, dp = f["pred"]
    f["on"] = complete_maps(A, dp, f["src"], f["head"], f["uv"], CompleteConfig(enabled=True, guard_size=128))
    f["unguarded"] = complete_maps(A, dp, f["src"], f["head"], f["uv"],
                                   CompleteConfig(enabled=True, guard_passes=0, guard_pixel_passes=0))
    return f


def test_completion_keeps_the_source_view_of_the_ict_network_avatar(ict_network_avatar):
    """Issue 18 on the ICT head: completing the shipped network's avatar of the sample portrait lowered its
    source-view PSNR by 4.7 dB (hair colour over the nose and mouth: texels the network draws in view that the bare
    mesh hides or sees edge-on were recoloured, floored and pulled back). Now it stays within 0.15 dB of the
    prediction's (measured at 128 px: 19.71 -> 19.63; the completion without its source-view guard: 14.97), while
    the back of the head still turns from the network's pale shell to the visible hair's colour. With the v5 weights
    six pixel-guard passes left it 0.21 dB below (20.36 -> 20.16); the default twelve keep it (20.38)."""
    from pipelines.avatar.complete import image_hair_region

    f = ict_network_avatar
    head, uv, src = f["head"], f["uv"], f["src"]

    def render(A, dp, c2w, size=128):
        with torch.no_grad():
            return render_rig(AvatarRig(head, uv, A, src.params.shape, dp), head(src.params), c2w[None],
                              src.K[None], size, backend="torch")

    pred = source_view_psnr(f, *f["pred"])
    assert source_view_psnr(f, *f["unguarded"][:2]) < pred - 2.0  # the defect, still there without the guards
    assert source_view_psnr(f, *f["on"][:2]) > pred - 0.15
    assert f["on"][2]["filled"] > 1000 and sum(f["on"][2]["guard_restored"].values()) > 0
    # Seen from behind, the head's colour gets closer to the photo's hair (mean over the head above the ears' height:
    # the upper half of the 180° view).
    verts = head(src.params)[0]
    cap = hair_cap(head, head.canonical(src.params.shape)[0], CompleteConfig().hairline_above_eyes)
    hair = image_hair_region(src.matte, head, verts, cap, world_to_camera(src.c2w[None])[0], src.K)
    hair_rgb = src.image[:, torch.from_numpy(hair)].mean(1)
    back = camera(head, 180.0)

    def back_distance(A, dp) -> float:
        r = render(A, dp, back, 64)
        top = r.alpha[0, 0, :32] > 0.9
        return float((r.rgb[0][:, :32][:, top] - hair_rgb[:, None]).abs().mean())

    before, after = back_distance(*f["pred"]), back_distance(*f["on"][:2])
    assert after < 0.6 * before, (before, after)


@pytest.mark.shared
def test_pixel_guard_keeps_the_source_view_where_the_first_order_guard_does_not(tmp_path_factory):
    """Issue 18's "the source-view numbers do not get worse", on a real clip (lp_d0, frame 0, shipped weights): the
    first-order guard alone left the completed avatar's source view 1.6 dB below the prediction's (measured at 128 px:
    25.35 -> 23.72 dB; its error 66 above the prediction's 142, i.e. +47 %): a floored or moved Gaussian that now
    covers the face, which a first-order test per texel cannot see. The pixel guard blames the worsened pixels on the
    changed texels that paint them (in both renders) and restores those: 25.38 dB, excess 0.02."""
    clip = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips" / "lp_d0.mp4"
    if not clip.is_file():
        pytest.skip("shared data absent")
    f = network_prediction(clip, tmp_path_factory)
    A, dp = f["pred"]
    cfg = CompleteConfig(enabled=True, guard_size=128)
    done, done_dp, info = complete_maps(A, dp, f["src"], f["head"], f["uv"], cfg)
    g = info["guard_pixels"]
    assert g["excess_before"] > 0.2 * g["prediction_error"]  # the defect the first-order guard leaves
    assert g["excess_left"] <= cfg.guard_budget * g["prediction_error"] and g["restored"] > 0
    assert source_view_psnr(f, done, done_dp) > source_view_psnr(f, A, dp) - 0.05
    assert info["filled"] > 1000  # the completion itself still happened


# ------------------------------------------------------------------------------ keep_neck (ICT head, synthetic source)
@pytest.fixture(scope="module")
def ict64():
    """The ICT head at K = 64 with the synthetic source painted from its own projection (as the embedded head's)."""
    ict = load_head_model("ict")
    return ict, build_uv_space(ict, UVConfig(size=64, hair_grid_cols=64, hair_grid_rows=16, include_vertices=False)), \
        synthetic_source(ict)


def test_keep_neck_leaves_the_neck_and_completes_the_back_of_the_head(ict64):
    """A network draws collars and shoulders with the neck's texels (docs/BACK_OF_HEAD.md, "keep_neck"):
    ``keep_neck`` leaves the neck region below the ears' lowest point as predicted — a blue "shirt" on a faint
    avatar keeps its colour, opacity and size — while the never-seen back of the scalp still takes the hair colour
    and the opacity floor, and the face below the ears (chin, jaw underside) is still completed, which
    ``keep_below_ears`` skips."""
    from pipelines.avatar.complete import _ear_bottom

    head, uv, src = ict64
    faint = template_maps(uv)
    faint[:, ATTRIBUTE_SLICES["opacity"]] = 0.03
    faint[:, ATTRIBUTE_SLICES["scale"]] = 0.4
    shirt = torch.tensor([0.1, 0.2, 0.8])
    faint[0, ATTRIBUTE_SLICES["color"]] = torch.where(uv.region_mask("neck")[None], shirt[:, None, None],
                                                      faint[0, ATTRIBUTE_SLICES["color"]])
    dp = torch.zeros(1, 3, uv.size, uv.size)
    seen = seen_by_source(src, head, uv)[0][0, 0]
    canonical = head.canonical()
    p = uv.position_map(canonical, head.faces)[0]
    below = uv.valid & (p[1] <= _ear_bottom(head, canonical[0]))
    neck = uv.region_mask("neck") & below
    chin = uv.region_mask("face") & below & ~seen
    back = back_scalp_texels(head, uv, seen)
    assert neck.sum() > 100 and chin.sum() > 20 and len(back[0]) > 20
    cfg = CompleteConfig(enabled=True, hair_volume=False, guard_passes=0)
    op = ATTRIBUTE_SLICES["opacity"]
    plain = complete_maps(faint, dp, src, head, uv, cfg)[0]
    # Without it the shirt turns skin-coloured and opaque (the defect on the ICT network's avatars).
    assert float((plain[0, ATTRIBUTE_SLICES["color"]][:, neck] - shirt[:, None]).abs().max(0)[0].mean()) > 0.2
    assert float((plain[0, op][:, neck] >= 0.95).float().mean()) > 0.5
    kept, kept_dp, _ = complete_maps(faint, dp, src, head, uv, replace(cfg, keep_neck=True))
    assert torch.equal(kept[0][:, neck], faint[0][:, neck]) and torch.equal(kept_dp[0][:, neck], dp[0][:, neck])
    for out in (plain, kept):  # the back of the head and the chin are completed either way
        np.testing.assert_allclose(out[0, ATTRIBUTE_SLICES["color"]][:, back[0], back[1]].mean(1).numpy(), HAIR,
                                   atol=0.03)
        assert bool((out[0, op][:, back[0], back[1]] >= 0.95).all())
        assert float((out[0, op][:, chin] >= 0.95).float().mean()) > 0.9
    below_ears = complete_maps(faint, dp, src, head, uv, replace(cfg, keep_below_ears=True))[0]
    assert float((below_ears[0, op][:, chin] >= 0.95).float().mean()) < 0.1


def test_keep_lifted_below_ears_leaves_what_the_network_threw_off_the_head(ict64):
    """The ICT v2 network draws collars and shoulders with the face region's lower texels, thrown centimetres off
    the surface (docs/BACK_OF_HEAD.md, "keep_neck"): ``keep_lifted_below_ears`` leaves texels below the ears' lowest
    point lifted farther than it as predicted; those on the surface below the ears (here the face's other half and
    the neck) and the back of the head are completed."""
    from pipelines.avatar.complete import _ear_bottom

    head, uv, src = ict64
    faint = template_maps(uv)
    faint[:, ATTRIBUTE_SLICES["opacity"]] = 0.03
    faint[:, ATTRIBUTE_SLICES["scale"]] = 0.4
    canonical = head.canonical()
    p = uv.position_map(canonical, head.faces)[0]
    below = uv.valid & (p[1] <= _ear_bottom(head, canonical[0]))
    thrown = uv.region_mask("face") & below & (p[0] > 0.005)  # one half of the lower face, 5 cm out and down
    on_surface = uv.region_mask("face", "neck") & below & (p[0] < -0.005) & ~seen_by_source(src, head, uv)[0][0, 0]
    dp = torch.zeros(1, 3, uv.size, uv.size)
    dp[0] = torch.where(thrown[None], torch.tensor([0.0, -0.03, 0.04])[:, None, None], dp[0])
    faint[0, ATTRIBUTE_SLICES["color"]] = torch.where(thrown[None], torch.tensor([0.1, 0.2, 0.8])[:, None, None],
                                                      faint[0, ATTRIBUTE_SLICES["color"]])
    assert thrown.sum() > 50 and on_surface.sum() > 50
    cfg = CompleteConfig(enabled=True, hair_volume=False, guard_passes=0)
    op = ATTRIBUTE_SLICES["opacity"]
    plain = complete_maps(faint, dp, src, head, uv, cfg)[0]
    assert not torch.equal(plain[0][:, thrown], faint[0][:, thrown])
    kept, kept_dp, _ = complete_maps(faint, dp, src, head, uv, replace(cfg, keep_lifted_below_ears=0.02))
    assert torch.equal(kept[0][:, thrown], faint[0][:, thrown]) and torch.equal(kept_dp[0][:, thrown], dp[0][:, thrown])
    assert float((kept[0, op][:, on_surface] >= 0.95).float().mean()) > 0.9
    back = back_scalp_texels(head, uv, seen_by_source(src, head, uv)[0][0, 0])
    np.testing.assert_allclose(kept[0, ATTRIBUTE_SLICES["color"]][:, back[0], back[1]].mean(1).numpy(), HAIR, atol=0.03)
    with pytest.raises(ConfigError):
        CompleteConfig(keep_lifted_below_ears=-0.01).validate()
