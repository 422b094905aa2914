"""Gaussian renderer tests (CPU, pure-PyTorch reference backend).

Expected values come from closed forms (pinhole projection, the EWA 2D Gaussian with gsplat's 0.3 px dilation and
pixel centres at +0.5, front-to-back compositing) or from the independent brute-force compositor.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.errors import ConfigError, FhavatarError
from pipelines.render import render_gaussians
from pipelines.render.reference import rasterize_view

W, H = 64, 48
FOCAL = 80.0


def intrinsics(B: int = 1, cx: float = W / 2, cy: float = H / 2, f: float = FOCAL) -> torch.Tensor:
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]]).expand(B, 3, 3).clone()


def identity_view(B: int = 1) -> torch.Tensor:
    return torch.eye(4).expand(B, 4, 4).clone()


def gaussians(means, scales, opacities, colors, quats=None):
    means = torch.as_tensor(means, dtype=torch.float32).reshape(-1, 3)
    n = means.shape[0]
    scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1, 3).expand(n, 3).clone()
    opacities = torch.as_tensor(opacities, dtype=torch.float32).reshape(-1).expand(n).clone()
    colors = torch.as_tensor(colors, dtype=torch.float32).reshape(n, -1)
    quats = torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4).clone() if quats is None else torch.as_tensor(quats)
    return means, quats.float(), scales, opacities, colors


def render(g, backgrounds=None, K=None, viewmats=None, width=W, height=H, **kw):
    K = intrinsics() if K is None else K
    viewmats = identity_view(K.shape[0]) if viewmats is None else viewmats
    return render_gaussians(*g, viewmats, K, width, height, backgrounds=backgrounds, backend="torch", **kw)


def footprint_variance(scale: float, z: float, f: float = FOCAL) -> float:
    """Pixel variance of an isotropic Gaussian seen head-on at the image centre: (f s / z)^2 + eps2d."""
    return (f * scale / z) ** 2 + 0.3


# ----------------------------------------------------------------------------------------------------------------


def test_centred_gaussian_colour_alpha_and_pixel_centres():
    z, s, o = 2.0, 0.05, 0.7
    g = gaussians([0.0, 0.0, z], [s, s, s], o, [1.0, 0.0, 0.0])
    out = render(g, backgrounds=torch.tensor([[0.0, 0.0, 1.0]]))
    # The mean projects to (W/2, H/2), the corner shared by 4 pixels whose centres are 0.5 px away in x and y.
    var = footprint_variance(s, z)
    alpha_centre = o * math.exp(-0.5 * (0.25 + 0.25) / var)
    i, j = H // 2, W // 2
    for di, dj in [(0, 0), (-1, 0), (0, -1), (-1, -1)]:
        assert out.alpha[0, i + di, j + dj, 0].item() == pytest.approx(alpha_centre, abs=1e-5)
        rgb = out.rgb[0, i + di, j + dj]
        assert rgb.tolist() == pytest.approx([alpha_centre, 0.0, 1.0 - alpha_centre], abs=1e-5)
    for ci, cj in [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1)]:
        assert out.alpha[0, ci, cj, 0].item() == 0.0
        assert out.rgb[0, ci, cj].tolist() == [0.0, 0.0, 1.0]
    # A principal point on a pixel centre puts the peak exactly there, at alpha == opacity.
    out = render(g, K=intrinsics(cx=W / 2 + 0.5, cy=H / 2 + 0.5))
    assert out.alpha[0, i, j, 0].item() == pytest.approx(o, abs=1e-6)
    assert out.alpha[0, i, j + 1, 0].item() == pytest.approx(o * math.exp(-0.5 / var), abs=1e-6)
    # A single Gaussian's alpha is clamped at 0.999 (gsplat), so an opaque one still lets 0.1% background through.
    g = gaussians([0.0, 0.0, z], [s, s, s], 1.0, [1.0, 0.0, 0.0])
    out = render(g, backgrounds=torch.tensor([[0.0, 0.0, 1.0]]), K=intrinsics(cx=W / 2 + 0.5, cy=H / 2 + 0.5))
    assert out.alpha[0, i, j, 0].item() == pytest.approx(0.999, abs=1e-6)
    assert out.rgb[0, i, j].tolist() == pytest.approx([0.999, 0.0, 0.001], abs=1e-6)


def test_shifted_gaussian_lands_on_projected_pixel():
    K = intrinsics()
    for X in ([0.3, -0.1, 2.0], [-0.25, 0.2, 3.0], [0.05, 0.05, 1.5]):
        g = gaussians(X, [0.01] * 3, 0.9, [1.0, 1.0, 1.0])
        alpha = render(g, K=K).alpha[0, ..., 0]
        uvw = K[0] @ torch.tensor(X)
        u, v = (uvw[:2] / uvw[2]).tolist()
        i, j = divmod(int(alpha.argmax()), W)
        assert abs(j + 0.5 - u) <= 0.5 and abs(i + 0.5 - v) <= 0.5, (X, (u, v), (j, i))


def test_depth_ordering_front_gaussian_wins():
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    # Listed back-to-front on purpose: the renderer must sort by depth, not by input order.
    K = intrinsics(cx=W / 2 + 0.5, cy=H / 2 + 0.5)  # the optical axis through a pixel centre
    g = gaussians([[0.02, 0.0, 3.0], [0.0, 0.0, 2.0]], [0.05] * 3, 0.98, [blue, red])
    centre = render(g, K=K).rgb[0, H // 2, W // 2]
    assert centre[0] == pytest.approx(0.98, abs=1e-5) and 0 < centre[2] <= 0.02
    g = gaussians([[0.0, 0.0, 2.0], [0.02, 0.0, 3.0]], [0.05] * 3, 0.98, [blue, red])
    centre = render(g, K=K).rgb[0, H // 2, W // 2]
    assert centre[2] == pytest.approx(0.98, abs=1e-5) and 0 < centre[0] <= 0.02
    # Two semi-transparent layers: front colour weighted a1, back colour a2 (1 - a1).
    g = gaussians([[0.0, 0.0, 3.0], [0.0, 0.0, 2.0]], [0.5] * 3, [0.6, 0.5], [blue, red])
    out = render(g, K=intrinsics(cx=W / 2 + 0.5, cy=H / 2 + 0.5))
    a_front, a_back = 0.5, 0.6  # large Gaussians: exp(-sigma) == 1 at the pixel on the projected centre
    assert out.rgb[0, H // 2, W // 2].tolist() == pytest.approx([a_front, 0.0, a_back * (1 - a_front)], abs=1e-5)


def test_anisotropic_scale_elongates_along_the_right_axis():
    def extents(out):
        mask = out.alpha[0, ..., 0] > 0.3
        cols = mask.any(0).nonzero()
        rows = mask.any(1).nonzero()
        return int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)

    g = gaussians([0.0, 0.0, 2.0], [0.2, 0.02, 0.02], 0.9, [1.0, 1.0, 1.0])
    wx, wy = extents(render(g))
    assert wx > 4 * wy, (wx, wy)
    # The same Gaussian rotated 90 degrees about the camera's z axis (quaternion w, x, y, z) lies along y.
    half = math.sqrt(0.5)
    g = gaussians([0.0, 0.0, 2.0], [0.2, 0.02, 0.02], 0.9, [1.0, 1.0, 1.0], quats=[[half, 0.0, 0.0, half]])
    wx_r, wy_r = extents(render(g, width=48, height=64, K=intrinsics(cx=24, cy=32)))
    assert wy_r > 4 * wx_r and abs(wy_r - wx) <= 1, (wx_r, wy_r, wx)
    # Unnormalized quaternions are normalized first: scaling q changes nothing.
    g2 = gaussians([0.0, 0.0, 2.0], [0.2, 0.02, 0.02], 0.9, [1.0, 1.0, 1.0], quats=[[3 * half, 0.0, 0.0, 3 * half]])
    kw = dict(width=48, height=64, K=intrinsics(cx=24, cy=32))
    assert torch.allclose(render(g, **kw).alpha, render(g2, **kw).alpha, atol=1e-6)


def test_expected_depth():
    g = gaussians([0.1, -0.05, 2.5], [0.05] * 3, 0.8, [1.0, 1.0, 1.0])
    out = render(g)
    drawn = out.alpha[0, ..., 0] > 0
    assert drawn.sum() > 20
    assert torch.allclose(out.depth[0, ..., 0][drawn], torch.tensor(2.5), atol=1e-5)
    assert (out.depth[0, ..., 0][~drawn] == 0).all()
    # Two layers on the optical axis: (a1 z1 + a2 (1 - a1) z2) / (a1 + a2 (1 - a1)).
    g = gaussians([[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]], [0.5] * 3, [0.5, 0.8], [[1.0], [1.0]])
    out = render(g, K=intrinsics(cx=W / 2 + 0.5, cy=H / 2 + 0.5))
    w1, w2 = 0.5, 0.8 * 0.5
    assert out.depth[0, H // 2, W // 2, 0].item() == pytest.approx((w1 * 2 + w2 * 4) / (w1 + w2), abs=1e-5)


def test_near_far_culling():
    g = gaussians([[0.0, 0.0, -1.0], [0.0, 0.0, 0.005], [0.0, 0.0, 50.0]], [0.05] * 3, 0.9, [[1.0]] * 3)
    assert render(g, near=0.01, far=10.0).alpha.max().item() == 0.0
    assert render(g, near=0.001, far=100.0).alpha.max().item() > 0.5


def random_scene(n: int, seed: int, channels: int = 3, dtype=torch.float32):
    """Gaussians in front of (and a few behind / beside) the camera, plus an opaque stack that saturates T."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=gen) * torch.tensor([0.5, 0.4, 0.6]) + torch.tensor([0.0, 0.0, 2.5])
    quats = torch.randn(n, 4, generator=gen)
    scales = 0.03 * torch.exp(0.5 * torch.randn(n, 3, generator=gen))
    opacities = torch.rand(n, generator=gen) * 0.9 + 0.05
    if n >= 30:
        means[:5, 2] = -0.5  # behind the camera
        means[5:10, 0] = 3.0  # well off-screen
        means[10:30] = torch.tensor([0.1, 0.05, 2.0]) + 0.02 * torch.randn(20, 3, generator=gen)  # dense stack
        opacities[10:30] = 0.97
    colors = torch.rand(n, channels, generator=gen)
    return tuple(t.to(dtype) for t in (means, quats, scales, opacities, colors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_elements", [1 << 22, 4096])
def test_tiles_match_brute_force(max_elements, dtype):
    """Tiled, chunked compositing == every Gaussian at every pixel, one at a time (gsplat's kernel loop)."""
    width, height = 72, 56  # not multiples of the 16 px tile: partial edge tiles
    g = random_scene(200, seed=1, channels=4, dtype=dtype)
    K = intrinsics(cx=36.3, cy=27.8)[0].to(dtype)
    view = torch.eye(4, dtype=dtype)
    view[:3, 3] = torch.tensor([0.05, -0.02, 0.1])
    bg = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=dtype)
    rgb, alpha, depth = rasterize_view(*g, view, K, width, height, bg, max_elements=max_elements)
    rgb_d, alpha_d, depth_d = rasterize_view(*g, view, K, width, height, bg, dense=True)
    assert (alpha_d > 0.9999 - 1e-6).any(), "scene should saturate some pixels (exercises the T stop)"
    assert (alpha_d > 0.01).float().mean() > 0.3
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (rgb - rgb_d).abs().max().item() < tol
    assert (alpha - alpha_d).abs().max().item() < tol
    # Expected depth divides by alpha, which amplifies float32 rounding where alpha is tiny: compare depth * alpha.
    assert (depth * alpha - depth_d * alpha_d).abs().max().item() < tol
    solid = alpha_d > 0.5
    assert (depth[solid] - depth_d[solid]).abs().max().item() < tol


def test_autograd_path_matches_brute_force():
    """With inputs that require grad the compositor takes its out-of-place path; it must render the same."""
    width, height = 48, 40
    g = [t.requires_grad_(True) for t in random_scene(120, seed=8)]
    K = intrinsics(cx=22.0, cy=18.0)[0]
    tiled = rasterize_view(*g, torch.eye(4), K, width, height, max_elements=4096)
    with torch.no_grad():
        dense = rasterize_view(*g, torch.eye(4), K, width, height, dense=True)
    assert tiled[0].requires_grad
    assert (dense[1] > 0.9999 - 1e-6).any()
    for a, b in zip(tiled[:2], dense[:2]):
        assert (a.detach() - b).abs().max().item() < 1e-5


def test_colour_channels_3_and_5():
    g3 = random_scene(150, seed=2, channels=3)
    extra = torch.rand(150, 2, generator=torch.Generator().manual_seed(3))
    g5 = g3[:4] + (torch.cat([g3[4], extra], dim=-1),)
    K, views = intrinsics(2), identity_view(2)
    views[1, :3, 3] = torch.tensor([0.1, 0.0, 0.2])
    bg3 = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    bg5 = torch.cat([bg3, torch.tensor([[0.5, 0.0], [0.0, 0.5]])], dim=-1)
    out3 = render(g3, bg3, K, views)
    out5 = render(g5, bg5, K, views)
    out2 = render(g3[:4] + (extra,), bg5[:, 3:], K, views)
    assert out3.rgb.shape == (2, H, W, 3) and out5.rgb.shape == (2, H, W, 5)
    assert out3.alpha.shape == (2, H, W, 1) and out3.depth.shape == (2, H, W, 1)
    assert torch.allclose(out5.rgb[..., :3], out3.rgb, atol=1e-6)
    assert torch.allclose(out5.rgb[..., 3:], out2.rgb, atol=1e-6)
    assert torch.allclose(out5.alpha, out3.alpha) and torch.allclose(out5.depth, out3.depth)
    # Background shows through exactly where nothing was drawn.
    empty = out5.alpha[..., 0] == 0
    assert empty.any()
    assert torch.equal(out5.rgb[empty], bg5[:, None, None, :].expand(2, H, W, 5)[empty])


def test_per_view_gaussians_and_shared_backgrounds():
    a = random_scene(80, seed=4)
    b = random_scene(80, seed=5)
    K, views = intrinsics(2), identity_view(2)
    batched = tuple(torch.stack([x, y]) for x, y in zip(a, b))
    bg = torch.tensor([0.3, 0.3, 0.3])
    out = render(batched, bg, K, views)
    ref_a = render(a, bg[None], K[:1], views[:1])
    ref_b = render(b, bg[None], K[:1], views[:1])
    assert torch.equal(out.rgb[0], ref_a.rgb[0]) and torch.equal(out.rgb[1], ref_b.rgb[0])
    assert torch.equal(out.depth[1], ref_b.depth[0])
    assert not torch.equal(out.rgb[0], out.rgb[1])


def test_gradients_flow_to_all_parameters():
    g = [t.clone().requires_grad_(True) for t in random_scene(60, seed=6)]
    out = render(g, torch.tensor([[0.5, 0.5, 0.5]]))
    weights = torch.rand(out.rgb.shape, generator=torch.Generator().manual_seed(0))
    loss = (out.rgb * weights).sum() + out.depth.sum() * 0.01 + out.alpha.sum()
    loss.backward()
    for name, t in zip(["means", "quats", "scales", "opacities", "colors"], g):
        assert t.grad is not None, name
        assert torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name
    # Culled Gaussians (behind the camera) get zero gradient; visible ones do not.
    assert g[0].grad[:5].abs().sum() == 0
    assert (g[3].grad[30:].abs() > 0).float().mean() > 0.5


def test_gradient_matches_finite_differences():
    """Directional derivative of a scalar loss, autograd vs central differences, in float64."""
    g = list(random_scene(12, seed=7, dtype=torch.float64))
    g[0][:, 2] = g[0][:, 2].abs() + 1.5  # all in front of the camera
    K = intrinsics(cx=16.0, cy=12.0, f=40.0).double()[0]
    view = torch.eye(4, dtype=torch.float64)
    weights = torch.rand(24, 32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(params):
        rgb, alpha, depth = rasterize_view(*params, view, K, 32, 24)
        return (rgb * weights).sum() + 0.1 * (depth * alpha).sum()

    params = [t.clone().requires_grad_(True) for t in g]
    loss(params).backward()
    gen = torch.Generator().manual_seed(2)
    for i, name in enumerate(["means", "quats", "scales", "opacities", "colors"]):
        direction = torch.randn(g[i].shape, generator=gen, dtype=torch.float64)
        eps = 1e-6
        plus = [t.clone() for t in g]
        minus = [t.clone() for t in g]
        plus[i] = plus[i] + eps * direction
        minus[i] = minus[i] - eps * direction
        numeric = (loss(plus) - loss(minus)).item() / (2 * eps)
        analytic = (params[i].grad * direction).sum().item()
        assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-6), name


def test_unknown_backend_raises_config_error():
    g = gaussians([0.0, 0.0, 2.0], [0.05] * 3, 0.5, [1.0, 0.0, 0.0])
    with pytest.raises(ConfigError) as err:
        render_gaussians(*g, identity_view(), intrinsics(), W, H, backend="vulkan")
    message = str(err.value)
    assert "vulkan" in message and "'auto'" in message and "'gsplat'" in message and "'torch'" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_gsplat_backend_without_cuda_is_a_clear_error():
    g = gaussians([0.0, 0.0, 2.0], [0.05] * 3, 0.5, [1.0, 0.0, 0.0])
    with pytest.raises(FhavatarError, match="gsplat"):
        render_gaussians(*g, identity_view(), intrinsics(), W, H, backend="gsplat")
    # "auto" falls back to the reference renderer.
    out = render_gaussians(*g, identity_view(), intrinsics(), W, H, backend="auto")
    assert out.alpha.max() > 0.4


def test_shape_errors_name_the_argument():
    g = list(gaussians([[0.0, 0.0, 2.0]] * 3, [0.05] * 3, 0.5, [[1.0, 0.0, 0.0]] * 3))
    g[3] = g[3][:2]
    with pytest.raises(ValueError, match="opacities"):
        render_gaussians(*g, identity_view(), intrinsics(), W, H, backend="torch")


def test_auto_backend_on_cuda_without_gsplat_warns_once(monkeypatch, caplog):
    """gsplat failing to import on a CUDA machine silently fell back to the ~50x slower reference rasterizer."""
    import logging

    from pipelines.render import api

    monkeypatch.setattr(api, "gsplat_available", lambda: False)
    monkeypatch.setattr(api, "gsplat_import_error", lambda: "ImportError: libcudart.so.12: cannot open shared object")
    api._warn_slow_fallback.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=api.__name__):
            assert [api.resolve_backend("auto", d) for d in ("cuda", "cuda:0", "cpu")] == ["torch"] * 3
    finally:
        api._warn_slow_fallback.cache_clear()
    (msg,) = [r.getMessage() for r in caplog.records if r.name == api.__name__]
    assert "gsplat cannot be imported (ImportError: libcudart.so.12" in msg and "50x slower" in msg
    assert "pip install gsplat==1.5.3" in msg
    from pipelines.render.gsplat_backend import _import_gsplat, gsplat_import_error

    if _import_gsplat() is None:  # the real reason, as the warning shows it
        assert "gsplat" in gsplat_import_error() and "\n" not in gsplat_import_error()
