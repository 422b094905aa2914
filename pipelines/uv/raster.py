"""A small, exact 2D triangle rasterizer for UV layouts (numpy, vectorized over triangles).

Texel (row i, col j) of a K x K map has its centre at u = (j + 0.5) / K, v = 1 - (i + 0.5) / K (v points up, as in
FLAME's and OpenGL's UV convention; row 0 is the top of the image).
"""

from __future__ import annotations

import numpy as np


def uv_to_pixel(uv: np.ndarray, width: int, height: int) -> np.ndarray:
    """(..., 2) UV in [0,1] (v up) -> continuous pixel coords (..., 2) as (x=col, y=row), texel centres at +0.5."""
    return np.stack([uv[..., 0] * width, (1.0 - uv[..., 1]) * height], axis=-1)


def barycentric(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (N, 3) of 2D points p (N, 2) in triangles (a, b, c) (N, 2 each)."""
    v0, v1, v2 = b - a, c - a, p - a
    d00 = (v0 * v0).sum(-1)
    d01 = (v0 * v1).sum(-1)
    d11 = (v1 * v1).sum(-1)
    d20 = (v2 * v0).sum(-1)
    d21 = (v2 * v1).sum(-1)
    den = d00 * d11 - d01 * d01
    den = np.where(np.abs(den) < 1e-20, 1e-20, den)
    w1 = (d11 * d20 - d01 * d21) / den
    w2 = (d00 * d21 - d01 * d20) / den
    return np.stack([1.0 - w1 - w2, w1, w2], axis=-1)


def rasterize_uv(
    uv_coords: np.ndarray, uv_faces: np.ndarray, width: int, height: int | None = None, eps: float = 1e-6,
    chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterize UV triangles into a (H, W) map of triangle ids and barycentrics.

    Args:
        uv_coords: (T, 2) UV coordinates in [0, 1], v up.
        uv_faces: (F, 3) indices into uv_coords.
        width, height: map size (height defaults to width).
        eps: inclusion tolerance on barycentrics, so texel centres on shared edges are covered.
    Returns:
        face_index (H, W) int64 (-1 where no triangle covers the texel centre), bary (H, W, 3) float32.
        Where triangles overlap, the later triangle wins (layouts should not overlap).
    """
    height = width if height is None else height
    face_index = np.full((height, width), -1, dtype=np.int64)
    bary = np.zeros((height, width, 3), dtype=np.float32)
    tri = uv_to_pixel(uv_coords[uv_faces].astype(np.float64), width, height)  # (F, 3, 2)
    lo = np.floor(tri.min(1) - 0.5).astype(np.int64)
    hi = np.ceil(tri.max(1) - 0.5).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi[:, 0] = np.minimum(hi[:, 0], width - 1)
    hi[:, 1] = np.minimum(hi[:, 1], height - 1)
    for s in range(0, len(tri), chunk):
        t = tri[s : s + chunk]
        l, h = lo[s : s + chunk], hi[s : s + chunk]
        nx = np.maximum(h[:, 0] - l[:, 0] + 1, 0)
        ny = np.maximum(h[:, 1] - l[:, 1] + 1, 0)
        counts = nx * ny
        if counts.sum() == 0:
            continue
        fid = np.repeat(np.arange(len(t)), counts)
        # Offset of each candidate inside its triangle's bounding box.
        start = np.repeat(np.cumsum(counts) - counts, counts)
        k = np.arange(counts.sum()) - start
        cx = l[fid, 0] + k % nx[fid]
        cy = l[fid, 1] + k // nx[fid]
        p = np.stack([cx + 0.5, cy + 0.5], -1)
        w = barycentric(p, t[fid, 0], t[fid, 1], t[fid, 2])
        inside = (w >= -eps).all(-1)
        fid, cx, cy, w = fid[inside], cx[inside], cy[inside], w[inside]
        face_index[cy, cx] = fid + s
        bary[cy, cx] = np.clip(w, 0.0, 1.0) / np.clip(w, 0.0, 1.0).sum(-1, keepdims=True)
    return face_index, bary
