"""Pure-PyTorch reference 3D Gaussian rasterizer (CPU or CUDA, differentiable through autograd).

It reproduces gsplat 1.5.3's ``rasterization(..., packed=False, rasterize_mode="classic", render_mode="RGB+ED")``
step by step, so either backend can render the same avatar:

* **Projection** (``projection_ewa_3dgs_fused``): covariance ``R S S^T R^T`` from a quaternion (w, x, y, z),
  normalized first, and scales; world-to-camera ``W Sigma W^T``; the EWA Jacobian ``J`` of the pinhole
  projection evaluated at the mean with ``x/z``, ``y/z`` clamped to 1.3x the frustum (so Gaussians far off-screen do
  not blow up); ``J W Sigma W^T J^T + eps2d * I`` (the 0.3 px low-pass dilation); culling when the camera-space
  ``z`` is outside ``[near, far]``, the opacity is below 1/255, or the footprint misses the image.
* **Footprint**: gsplat 1.5's opacity-aware axis-aligned box, ``radius_x = ceil(e * sqrt(cov2d_xx))`` with
  ``e = min(3.33, sqrt(2 ln(255 * opacity)))``. This box exactly contains every pixel where the Gaussian's alpha
  reaches the 1/255 threshold, so tiling never clips a visible footprint.
* **Tiles** (``isect_tiles``): 16x16 px tiles; each Gaussian is listed in every tile its box overlaps; the lists
  are sorted by camera-space depth (stable, ties by index, like gsplat's radix sort).
* **Compositing** (``rasterize_to_pixels_3dgs_fwd``): pixel centres at ``(j + 0.5, i + 0.5)`` in K's pixel
  units; ``alpha = min(0.999, o * exp(-sigma))`` with ``sigma`` the Mahalanobis half-distance; a Gaussian with
  ``alpha < 1/255`` is skipped; front to back, a pixel stops *before* the Gaussian that would bring its
  transmittance to ``<= 1e-4`` (gsplat's exclusive stop); ``colour = sum w_i c_i + T * background``,
  ``alpha = 1 - T``; expected depth ``sum w_i z_i / max(alpha, 1e-10)``.

Note gsplat clamps alpha at 0.999 (the original 3DGS CUDA code uses 0.99); we follow gsplat.

The compositor is vectorized. Each step takes the next ``k`` Gaussians of every still-active tile (padded with
a transparent sentinel), evaluates all ``(tile, 256 pixels, k)`` alphas at once (the Mahalanobis term is
separable into per-row and per-column parts plus one cross term), composites them with a cumulative product of
``1 - alpha`` carried from step to step, and drops tiles whose pixels are all done (``T <= 1e-4``) or whose lists
are exhausted; ``k`` grows as tiles drop out. One step evaluates at most ``max_elements`` (pixel, Gaussian) pairs,
so memory stays bounded (about 10 float buffers of that size, ~170 MB at the default 4M in float32) when no
gradient is recorded. With autograd every step's buffers are kept for the backward pass: memory then grows with
the total number of evaluated pairs (~40 bytes each), fine for tests and small fits, not for 80K Gaussians at 512
px (use gsplat on a GPU for training).

Not reproduced, all at the level of float32 rounding: gsplat skips a Gaussian at a pixel where the rounded
Mahalanobis term is negative (the conic is positive definite, so only rounding can make it so); gsplat evaluates
``o * __expf(-sigma)`` where we evaluate ``exp(log(o) - sigma)``; gsplat multiplies T sequentially where we use
cumulative products (and get the final T as ``T_in - sum w_i``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat ALPHA_THRESHOLD: contributions below this are skipped
MAX_ALPHA = 0.999  # gsplat clamps a single Gaussian's alpha here
TRANSMITTANCE_THRESHOLD = 1e-4  # a pixel is done before the Gaussian that would bring T to <= this
EPS2D = 0.3  # low-pass dilation added to the 2D covariance diagonal (pixels^2)
MAX_EXTEND = 3.33  # cap of the footprint half-size in standard deviations
TILE_SIZE = 16


# --------------------------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------------------------


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices (..., 3, 3) from quaternions (..., 4) in (w, x, y, z) order; normalized first."""
    q = torch.nn.functional.normalize(quats, dim=-1)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """3D covariances (..., 3, 3) = R diag(s)^2 R^T from quaternions (..., 4) wxyz and scales (..., 3)."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


@dataclass
class ProjectedGaussians:
    """Gaussians of one view that survived culling, sorted front to back (M of them).

    ids: (M,) long, index of each into the input arrays.
    means2d: (M, 2) pixel coordinates of the projected means.
    conics: (M, 3) upper triangle (a, b, c) of the inverse 2D covariance.
    depths: (M,) camera-space z.
    opacities: (M,) opacities.
    radii: (M, 2) long, half-size of the footprint box in pixels (x, y); no gradient.
    """

    ids: Tensor
    means2d: Tensor
    conics: Tensor
    depths: Tensor
    opacities: Tensor
    radii: Tensor


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = EPS2D,
) -> ProjectedGaussians:
    """EWA-project N Gaussians into one pinhole view, cull, and sort the survivors by depth.

    Args:
        means (N, 3), quats (N, 4) wxyz (not necessarily normalized), scales (N, 3), opacities (N,).
        viewmat: (4, 4) world-to-camera in OpenCV axes. K: (3, 3) pixel intrinsics (fx, fy, cx, cy are used).
    """
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]

    # Cull by depth *before* any division so culled Gaussians cannot put NaNs into the backward pass.
    with torch.no_grad():
        z_all = means.detach() @ R[2].detach() + t[2].detach()
        ids = torch.nonzero((z_all >= near) & (z_all <= far) & (opacities.detach() >= ALPHA_THRESHOLD)).squeeze(1)
    means_c = means[ids] @ R.T + t  # (M, 3)
    covar_c = R @ quat_scale_to_covar(quats[ids], scales[ids]) @ R.T  # (M, 3, 3)

    x, y, z = means_c.unbind(-1)
    rz = 1.0 / z
    # The Jacobian is evaluated with x/z, y/z clamped to 1.3x the image's half-extent (gsplat's persp_proj).
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(torch.maximum(x * rz, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y * rz, -lim_y_neg), lim_y_pos)
    zeros = torch.zeros_like(z)
    J = torch.stack(
        [fx * rz, zeros, -fx * tx * rz * rz, zeros, fy * rz, -fy * ty * rz * rz], dim=-1
    ).reshape(-1, 2, 3)
    cov2d = J @ covar_c @ J.transpose(-1, -2)  # (M, 2, 2)
    a = cov2d[:, 0, 0] + eps2d
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + eps2d
    det = a * c - b * b
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    opac = opacities[ids]

    with torch.no_grad():
        extend = torch.sqrt(2.0 * torch.log(opac.detach() / ALPHA_THRESHOLD)).clamp(max=MAX_EXTEND)
        radius_x = torch.ceil(extend * torch.sqrt(a.detach().clamp(min=0)))
        radius_y = torch.ceil(extend * torch.sqrt(c.detach().clamp(min=0)))
        mx, my = means2d.detach().unbind(-1)
        keep = (det.detach() > 0) & (radius_x > 0) & (radius_y > 0)
        keep &= ~((mx + radius_x <= 0) | (mx - radius_x >= width) | (my + radius_y <= 0) | (my - radius_y >= height))
        keep &= torch.isfinite(mx) & torch.isfinite(my)
        sel = torch.nonzero(keep).squeeze(1)
        # Stable sort by depth: ties keep input order, like gsplat's radix sort on (tile, depth) keys.
        order = sel[torch.sort(z.detach()[sel], stable=True).indices]
    det_o = det[order]
    conics = torch.stack([c[order] / det_o, -b[order] / det_o, a[order] / det_o], dim=-1)
    radii = torch.stack([radius_x[order], radius_y[order]], dim=-1).long()
    return ProjectedGaussians(ids[order], means2d[order], conics, z[order], opac[order], radii)


# --------------------------------------------------------------------------------------------------------------
# Tile binning
# --------------------------------------------------------------------------------------------------------------


def isect_tiles(
    means2d: Tensor, radii: Tensor, width: int, height: int, tile_size: int = TILE_SIZE
) -> tuple[Tensor, Tensor]:
    """Bin depth-sorted Gaussians into the tiles their footprint box overlaps.

    Args:
        means2d: (M, 2) projected means, already sorted front to back. radii: (M, 2) long box half-sizes.

    Returns:
        tile_offsets: (n_tiles + 1,) long; tile ``t`` holds ``flatten_ids[tile_offsets[t]:tile_offsets[t + 1]]``.
        flatten_ids: (P,) long indices into the M Gaussians, grouped by tile, front to back within a tile.
    """
    device = means2d.device
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tiles_x * tiles_y
    with torch.no_grad():
        m = means2d.detach().float() / tile_size  # float32, as gsplat computes the box edges
        r = radii.float() / tile_size
        x0 = torch.floor(m[:, 0] - r[:, 0]).clamp(0, tiles_x).long()
        x1 = torch.ceil(m[:, 0] + r[:, 0]).clamp(0, tiles_x).long()
        y0 = torch.floor(m[:, 1] - r[:, 1]).clamp(0, tiles_y).long()
        y1 = torch.ceil(m[:, 1] + r[:, 1]).clamp(0, tiles_y).long()
        w = x1 - x0
        counts = w * (y1 - y0)
        gauss = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(len(gauss), device=device) - first[gauss]
        wg = w[gauss]
        tile_ids = (y0[gauss] + local // wg) * tiles_x + x0[gauss] + local % wg
        # Gaussians are in depth order, so a stable sort by tile keeps each tile's list front to back.
        tile_ids, perm = torch.sort(tile_ids, stable=True)
        flatten_ids = gauss[perm]
        per_tile = torch.bincount(tile_ids, minlength=n_tiles)
        tile_offsets = torch.zeros(n_tiles + 1, dtype=torch.long, device=device)
        tile_offsets[1:] = torch.cumsum(per_tile, 0)
    return tile_offsets, flatten_ids


# --------------------------------------------------------------------------------------------------------------
# Compositing
# --------------------------------------------------------------------------------------------------------------


def composite_tiles(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    tile_offsets: Tensor,
    flatten_ids: Tensor,
    width: int,
    height: int,
    tile_size: int = TILE_SIZE,
    max_elements: int = 1 << 22,
    first_layer: int = 32,
    weight_sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of binned Gaussians, vectorized over tiles, pixels and Gaussians.

    Args:
        means2d (M, 2), conics (M, 3), opacities (M,), features (M, D): per-Gaussian data.
        tile_offsets (n_tiles + 1,), flatten_ids (P,): from :func:`isect_tiles`.
        max_elements: bound on the number of (pixel, Gaussian) pairs evaluated at once; each float tensor of that
            size takes 4 bytes per element and a step holds a few of them (more when autograd records them).
        first_layer: how many Gaussians per tile the first step takes; later steps take more, as tiles drop out.
        weight_sums: (M + 1,) buffer to which each Gaussian's ``sum over pixels of w_i`` is added (in place; the
            last entry collects the padding), or None.

    Returns:
        accum (H, W, D): ``sum_i w_i f_i`` (no background). transmittance (H, W): ``T`` after the last Gaussian.
    """
    device, dtype = means2d.device, means2d.dtype
    # Without autograd the steps can work in place, which saves most of the allocations.
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, opacities, features))
    D = features.shape[-1]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    n_tiles = tiles_x * tiles_y
    n_pix = tile_size * tile_size

    starts = tile_offsets[:-1]
    counts = tile_offsets[1:] - starts
    tile_ids = torch.arange(n_tiles, device=device)
    # Pixel centres (gsplat: px = j + 0.5), split into tile origin + offset inside the tile.
    local = torch.arange(tile_size, device=device, dtype=dtype) + 0.5
    tile_ox = (tile_ids % tiles_x * tile_size).to(dtype)
    tile_oy = (tile_ids // tiles_x * tile_size).to(dtype)

    # One row per Gaussian with everything the compositor reads, so a step gathers once: the mean, the terms of
    # log(alpha) = log(o) - sigma with sigma = 0.5 a dx^2 + b dx dy + 0.5 c dy^2, the features, and a column of ones
    # so that the colour matmul also returns sum_i w_i (= T_in - T_out). A last sentinel row with log(o) = -inf
    # (alpha = 0) pads tiles with shorter lists.
    table = torch.cat(
        [
            means2d,
            -0.5 * conics[:, :1],
            -conics[:, 1:2],
            -0.5 * conics[:, 2:3],
            torch.log(opacities)[:, None],
            features,
            torch.ones_like(features[:, :1]),
        ],
        dim=-1,
    )
    sentinel = torch.zeros(1, table.shape[1], device=device, dtype=dtype)
    sentinel[0, _LOG_O] = -torch.inf
    table = torch.cat([table, sentinel], dim=0)
    pad_id = table.shape[0] - 1

    accum = torch.zeros(n_tiles, D + 1, n_pix, device=device, dtype=dtype)  # channel-major, like the matmul output
    trans = torch.ones(n_tiles, n_pix, device=device, dtype=dtype)
    # Pixels outside the image (partial edge tiles) start "done" so they never keep a tile alive.
    pix = torch.arange(n_pix, device=device)
    iy = (tile_ids // tiles_x * tile_size)[:, None] + pix // tile_size
    ix = (tile_ids % tiles_x * tile_size)[:, None] + pix % tile_size
    done = (iy >= height) | (ix >= width)

    active = torch.nonzero(counts > 0).squeeze(1)
    pos = 0  # every active tile has consumed the first `pos` Gaussians of its list
    layer = first_layer
    while len(active) > 0:
        k = max(1, int(min(layer, int(counts[active].max()) - pos)))
        tiles_per_chunk = max(1, max_elements // (n_pix * k))
        slot = pos + torch.arange(k, device=device)
        for chunk in active.split(tiles_per_chunk):
            idx = starts[chunk, None] + slot[None, :]
            valid = slot[None, :] < counts[chunk, None]  # (nt, k): padding beyond a tile's list
            g = torch.where(valid, flatten_ids[idx.clamp(max=max(len(flatten_ids) - 1, 0))], pad_id)
            # Done pixels enter with T = 0 so nothing more is added to them; their T is restored below.
            done_c = done[chunk]
            trans_c = trans[chunk]
            trans_in = trans_c.masked_fill(done_c, 0.0)
            acc_c, stopped, weights = _composite_chunk(
                table[g], tile_ox[chunk], tile_oy[chunk], local, trans_in, inplace=not track
            )
            if weight_sums is not None:
                weight_sums.index_add_(0, g.flatten(), weights.detach().sum(1).flatten())
            trans_out = torch.where(done_c, trans_c, trans_in - acc_c[:, -1])
            if track:
                accum = accum.index_add(0, chunk, acc_c)
                trans = trans.index_copy(0, chunk, trans_out)
            else:
                accum.index_add_(0, chunk, acc_c)
                trans.index_copy_(0, chunk, trans_out)
            done[chunk] = done_c | stopped
        pos += k
        active = active[(counts[active] > pos) & ~done[active].all(dim=1)]
        # Grow the step once only few tiles remain (edges, semi-transparent regions) to save Python overhead.
        layer = max(layer, min(4 * layer, max_elements // max(1, n_pix * len(active))))

    def untile(v: Tensor) -> Tensor:
        """(n_tiles, X, ts*ts) -> (H, W, X)."""
        v = v.reshape(tiles_y, tiles_x, -1, tile_size, tile_size).permute(0, 3, 1, 4, 2)
        return v.reshape(tiles_y * tile_size, tiles_x * tile_size, -1)[:height, :width]

    return untile(accum[:, :D]), untile(trans[:, None])[..., 0]


# Columns of the compositor's per-Gaussian table.
_MX, _MY, _NEG_HALF_A, _NEG_B, _NEG_HALF_C, _LOG_O, _FEATURES = range(7)


def _composite_chunk(
    rows: Tensor,
    tile_ox: Tensor,
    tile_oy: Tensor,
    local: Tensor,
    trans_in: Tensor,
    inplace: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Composite k Gaussians per tile, in depth order, over the pixels of nt tiles.

    Args:
        rows: (nt, k, 6 + D + 1) table rows of each tile's next k Gaussians (padding rows have log(o) = -inf).
        tile_ox, tile_oy: (nt,) tile origins in pixels. local: (ts,) pixel-centre offsets inside a tile.
        trans_in: (nt, ts*ts) transmittance before these Gaussians (0 for pixels already done).
        inplace: reuse buffers (only when autograd is not recording).

    Returns:
        accum (nt, D + 1, ts*ts): sum_i w_i f_i, the last channel being sum_i w_i.
        stopped (nt, ts*ts): the pixel reached T <= 1e-4 within these Gaussians (gsplat's "done").
        weights (nt, ts*ts, k): w_i = T_i alpha_i of each pixel and Gaussian.
    """
    nt, k, _ = rows.shape
    ts = len(local)
    col = rows.unbind(-1)
    # Offsets from the pixel centres to the means, separable in x and y: (nt, ts, k) each.
    dx = col[_MX][:, None, :] - (tile_ox[:, None, None] + local[None, :, None])
    dy = col[_MY][:, None, :] - (tile_oy[:, None, None] + local[None, :, None])
    x_term = col[_NEG_HALF_A][:, None, :] * dx * dx
    y_term = col[_NEG_HALF_C][:, None, :] * dy * dy + col[_LOG_O][:, None, :]
    cross = (col[_NEG_B][:, None, :] * dy)[:, :, None, :]  # (nt, ts_y, 1, k)
    # log(alpha) for every pixel (row i, column j) and Gaussian: (nt, ts, ts, k), later viewed as (nt, ts*ts, k).
    log_alpha = y_term[:, :, None, :] + x_term[:, None, :, :]
    features_t = rows[..., _FEATURES:].transpose(1, 2)  # (nt, D + 1, k)
    # alpha = min(0.999, o exp(-sigma)), zeroed below 1/255 (F.threshold keeps x > t; t is the float just below
    # 1/255 so that alpha == 1/255 is kept, as in gsplat). The transmittance after each Gaussian, t_incl, is an
    # inclusive cumulative product; gsplat stops *before* the Gaussian that brings it to <= 1e-4, and since T only
    # decreases the kept Gaussians form a prefix: zeroing t_incl at <= 1e-4 and using
    # w_i = alpha_i T_(i-1) = alpha_i / (1 - alpha_i) * t_incl_i gives every weight with the stop applied.
    alpha_floor = _float_below(ALPHA_THRESHOLD, log_alpha.dtype)
    thr = TRANSMITTANCE_THRESHOLD
    if inplace:
        alpha = log_alpha.addcmul_(cross, dx[:, None, :, :]).exp_().clamp_(max=MAX_ALPHA).reshape(nt, ts * ts, k)
        alpha = F.threshold_(alpha, alpha_floor, 0.0)
        one_minus = torch.rsub(alpha, 1.0)
        odds = alpha.div_(one_minus)
        t_incl = one_minus.cumprod_(dim=-1).mul_(trans_in[..., None])
        stopped = t_incl[..., -1] <= thr
        weights = odds.mul_(F.threshold_(t_incl, thr, 0.0))
    else:
        alpha = torch.exp(torch.addcmul(log_alpha, cross, dx[:, None, :, :])).clamp(max=MAX_ALPHA)
        alpha = F.threshold(alpha.reshape(nt, ts * ts, k), alpha_floor, 0.0)
        one_minus = 1.0 - alpha
        t_incl = torch.cumprod(one_minus, dim=-1) * trans_in[..., None]
        stopped = t_incl[..., -1].detach() <= thr
        weights = alpha / one_minus * F.threshold(t_incl, thr, 0.0)
    # (nt, D+1, k) @ (nt, k, P): much faster than (nt, P, k) @ (nt, k, D+1) for few channels.
    return torch.bmm(features_t, weights.transpose(1, 2)), stopped, weights


def _float_below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` below ``value``."""
    v = torch.tensor(value, dtype=dtype)
    return torch.nextafter(v, torch.zeros_like(v)).item()


def composite_dense(
    means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, width: int, height: int
) -> tuple[Tensor, Tensor]:
    """Brute-force compositor: every Gaussian at every pixel, one Gaussian at a time, as gsplat's kernel loop.

    Slow (a Python loop over Gaussians); for tests and debugging. Inputs must be sorted front to back.
    Returns accum (H, W, D) and transmittance (H, W), like :func:`composite_tiles`.
    """
    device, dtype = means2d.device, means2d.dtype
    py, px = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    px, py = px.reshape(-1), py.reshape(-1)
    T = torch.ones_like(px)
    done = torch.zeros_like(px, dtype=torch.bool)
    accum = torch.zeros(px.shape[0], features.shape[-1], device=device, dtype=dtype)
    for i in range(means2d.shape[0]):
        dx, dy = means2d[i, 0] - px, means2d[i, 1] - py
        sigma = 0.5 * (conics[i, 0] * dx * dx + conics[i, 2] * dy * dy) + conics[i, 1] * dx * dy
        alpha = (opacities[i] * torch.exp(-sigma)).clamp(max=MAX_ALPHA)
        skip = (sigma < 0) | (alpha < ALPHA_THRESHOLD) | done
        next_T = T * (1.0 - alpha)
        stop = ~skip & (next_T <= TRANSMITTANCE_THRESHOLD)
        use = ~skip & ~stop
        done = done | stop
        accum = accum + torch.where(use, alpha * T, torch.zeros_like(T))[:, None] * features[i]
        T = torch.where(use, next_T, T)
    return accum.reshape(height, width, -1), T.reshape(height, width)


# --------------------------------------------------------------------------------------------------------------
# One view
# --------------------------------------------------------------------------------------------------------------


def rasterize_view(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = EPS2D,
    dense: bool = False,
    max_elements: int = 1 << 22,
) -> tuple[Tensor, Tensor, Tensor]:
    """Render one view of N Gaussians with the reference rasterizer.

    Args:
        means (N, 3), quats (N, 4) wxyz, scales (N, 3), opacities (N,), colors (N, C): Gaussians in world space.
        viewmat (4, 4) world-to-camera (OpenCV axes), K (3, 3) pixel intrinsics, background (C,) or None (black).
        dense: use the brute-force compositor (:func:`composite_dense`) instead of tiles; for testing.

    Returns:
        rgb (H, W, C), alpha (H, W, 1), expected depth (H, W, 1) (0 where nothing was drawn).
    """
    proj = project_gaussians(means, quats, scales, opacities, viewmat, K, width, height, near, far, eps2d)
    features = torch.cat([colors[proj.ids], proj.depths[:, None]], dim=-1)  # depth rides along as a channel
    if dense:
        accum, trans = composite_dense(proj.means2d, proj.conics, proj.opacities, features, width, height)
    else:
        tile_offsets, flatten_ids = isect_tiles(proj.means2d, proj.radii, width, height)
        accum, trans = composite_tiles(
            proj.means2d, proj.conics, proj.opacities, features, tile_offsets, flatten_ids, width, height,
            max_elements=max_elements,
        )  # fmt: skip
    alpha = (1.0 - trans)[..., None]
    rgb = accum[..., :-1]
    if background is not None:
        rgb = rgb + trans[..., None] * background
    depth = accum[..., -1:] / alpha.clamp(min=1e-10)
    return rgb, alpha, depth


def gaussian_contributions(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = EPS2D,
    max_elements: int = 1 << 22,
) -> Tensor:
    """(N,) ``sum over pixels of w_i`` of each Gaussian in one view (0 for culled ones), by the tile compositor.

    Inputs as :func:`rasterize_view`. No gradient is recorded (the weights are summed as they are evaluated).
    """
    with torch.no_grad():
        proj = project_gaussians(means, quats, scales, opacities, viewmat, K, width, height, near, far, eps2d)
        tile_offsets, flatten_ids = isect_tiles(proj.means2d, proj.radii, width, height)
        sums = torch.zeros(len(proj.ids) + 1, device=means.device, dtype=proj.means2d.dtype)
        features = proj.depths[:, None]
        composite_tiles(proj.means2d, proj.conics, proj.opacities, features, tile_offsets, flatten_ids, width, height,
                        max_elements=max_elements, weight_sums=sums)
        out = torch.zeros(means.shape[0], device=means.device, dtype=sums.dtype)
        return out.index_copy_(0, proj.ids, sums[:-1])
