"""Local UV features (section 3.3, "Local UV Feature Extraction"): project p_r into the source view, sample the image
features, and keep only texels that the source camera actually sees (visibility mask M_v).

Image coordinates: ``project_points`` with normalized intrinsics gives uv in [0, 1] across the image (x right,
y down); ``grid_sample`` with ``align_corners=False`` wants x = 2u - 1, y = 2v - 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.camera import project_points


def project_position_map(p: torch.Tensor, w2c: torch.Tensor, K_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project a position map (B, 3, K, K) -> (uv (B, K, K, 2) in [0, 1] image units, depth (B, K, K) metres)."""
    B, _, H, W = p.shape
    uv, z = project_points(p.flatten(2).transpose(1, 2), w2c.to(p), K_norm.to(p))
    return uv.view(B, H, W, 2), z.view(B, H, W)


def uv_normals(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Outward surface normals (B, 3, K, K) of a position map from finite differences in UV (not normalized).

    Central differences where both neighbours are valid, one-sided at island borders, 0 where neither exists.
    The cross product's sign depends on the UV layout's orientation, so it is fixed per batch element by making the
    normals agree on average with the direction from the centroid (right for any closed, roughly convex head).
    """
    v = valid.to(p.dtype)

    def derivative(dim: int) -> torch.Tensor:
        pad = (0, 0, 1, 1) if dim == 2 else (1, 1, 0, 0)
        pp, vp = F.pad(p, pad), F.pad(v, pad)
        n = p.shape[dim]
        nxt, prv = pp.narrow(dim, 2, n), pp.narrow(dim, 0, n)
        ok_n, ok_p = vp.narrow(dim, 2, n) * v, vp.narrow(dim, 0, n) * v
        fwd, bwd = (nxt - p) * ok_n, (p - prv) * ok_p
        both = ok_n * ok_p
        return both * 0.5 * (fwd + bwd) + (1 - both) * (fwd + bwd)  # one of fwd/bwd is 0 when not both

    d_col, d_row = derivative(3), derivative(2)
    n = torch.cross(d_col, d_row, dim=1) * v
    centroid = (p * v).sum((2, 3), keepdim=True) / v.sum((2, 3), keepdim=True).clamp_min(1.0)
    sign = torch.sign((F.normalize(n, dim=1) * (p - centroid) * v).sum((1, 2, 3), keepdim=True))
    return n * torch.where(sign == 0, torch.ones_like(sign), sign)


@torch.no_grad()
def visibility_mask(
    p_r: torch.Tensor,
    valid: torch.Tensor,
    w2c: torch.Tensor,
    K_norm: torch.Tensor,
    image_size: int,
    depth_tol: float = 0.005,
    buffer_size: int | None = None,
    dilate: int = 1,
    check_facing: bool = True,
    max_slope: float = 4.0,
) -> torch.Tensor:
    """UV visibility mask M_v (B, 1, K, K) in {0, 1} of a position map seen by the source camera.

    A z-buffer of the texels' own projected depths is built by scatter-min into a ``buffer_size``^2 grid (default
    image_size / 4, coarse enough that neighbouring texels leave no holes; a ``dilate``-radius min filter closes the
    rest). A texel is visible if it is valid, in front of the camera, inside the image, at most ``depth_tol`` metres
    behind the z-buffer at its pixel and - with ``check_facing`` - its UV normal faces the camera. With normals the
    tolerance grows with the surface slope (``tan(theta)`` clamped to ``max_slope``) like a shadow map's
    slope-scaled bias, so tilted front surfaces are not self-occluded by their own splats in the coarse buffer.
    """
    B, _, K, _ = p_r.shape
    R = buffer_size or max(image_size // 4, 8)
    uv, z = project_position_map(p_r, w2c, K_norm)
    uv, z = uv.view(B, -1, 2), z.view(B, -1)
    px = torch.floor(uv[..., 0] * R).long()
    py = torch.floor(uv[..., 1] * R).long()
    ok = valid.view(B, -1).bool() & (z > 1e-6) & (px >= 0) & (px < R) & (py >= 0) & (py < R)
    idx = py.clamp(0, R - 1) * R + px.clamp(0, R - 1)
    inf = torch.full_like(z, float("inf"))
    zbuf = torch.full((B, R * R), float("inf"), dtype=z.dtype, device=z.device)
    zbuf.scatter_reduce_(1, idx, torch.where(ok, z, inf), reduce="amin", include_self=True)
    if dilate > 0:
        zbuf = -F.max_pool2d(-zbuf.view(B, 1, R, R), 2 * dilate + 1, stride=1, padding=dilate).view(B, -1)
    tol = torch.full_like(z, depth_tol)
    if check_facing:
        n = F.normalize(uv_normals(p_r, valid), dim=1)
        R_wc, t_wc = w2c[:, :3, :3].to(p_r), w2c[:, :3, 3].to(p_r)
        cam_center = -(R_wc.transpose(1, 2) @ t_wc[..., None])[..., 0]  # (B, 3)
        view = F.normalize(cam_center[:, :, None, None] - p_r, dim=1)
        cos = (n * view).sum(1).view(B, -1)
        degenerate = (n.norm(dim=1) < 0.5).view(B, -1)  # no usable normal: rely on the z-buffer alone
        ok = ok & ((cos > 0) | degenerate)
        # Slope-scaled bias (as in shadow mapping): the buffer holds the nearest depth anywhere within
        # (dilate + 1) pixels, which on a surface tilted by theta is up to footprint * tan(theta) closer.
        tan = (1 - cos.clamp(0, 1) ** 2).sqrt() / cos.clamp_min(1e-3)
        metres_per_pixel = z / (K_norm[:, 0, 0, None].to(z) * R)
        tol = tol + torch.where(degenerate, 0.0, (dilate + 1) * metres_per_pixel * tan.clamp(max=max_slope))
    visible = ok & (z <= zbuf.gather(1, idx) + tol)
    return visible.view(B, 1, K, K).to(p_r.dtype)


def sample_image_features(features: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of an image-space map (B, C, h, w) at uv (B, K, K, 2) in [0, 1] -> (B, C, K, K).

    Outside the image reads 0. Differentiable in uv, so the loss reaches Delta p through the projection.
    """
    return F.grid_sample(features, uv * 2.0 - 1.0, mode="bilinear", padding_mode="zeros", align_corners=False)


def pool_visible(features: torch.Tensor, M_v: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Downsample masked UV features by ``factor`` keeping invisible texels out of the average.

    Returns (F_l (B, C, K/f, K/f): mean feature of the visible texels in each block, exactly 0 where none is;
    M_v at the coarse resolution (B, 1, K/f, K/f): the visible fraction of each block, in [0, 1]).
    """
    if factor == 1:
        return features * M_v, M_v
    num = F.avg_pool2d(features * M_v, factor)
    frac = F.avg_pool2d(M_v, factor)
    return num / frac.clamp_min(1e-6), frac


def local_uv_features(
    image_features: list[torch.Tensor],
    image: torch.Tensor | None,
    uv: torch.Tensor,
    M_v: torch.Tensor,
    uv_resolutions: list[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """{F_s^i} -> {F_l^i} (coarse -> fine) and the per-scale visibility {M_v^i}.

    Every scale is sampled at the full K x K position map and then visibility-pooled to K_i, so coarse scales
    never average positions across UV island borders. ``image`` (B, 3, H, W), if given, is sampled too and
    appended to the finest scale (the raw source colour keeps detail that a stride-4 feature map loses).
    """
    K = uv.shape[1]
    F_l, M_vs = [], []
    last = len(image_features) - 1
    for i, (feat, res) in enumerate(zip(image_features, uv_resolutions)):
        f = sample_image_features(feat, uv)
        if image is not None and i == last:
            f = torch.cat([f, sample_image_features(image, uv)], dim=1)
        fl, mv = pool_visible(f, M_v, K // res)
        F_l.append(fl)
        M_vs.append(mv)
    return F_l, M_vs
