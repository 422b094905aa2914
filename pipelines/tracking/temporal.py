"""Temporal helpers: smoothness penalty and filling frames without landmarks."""

from __future__ import annotations

import numpy as np
import torch

from ..head.lbs import axis_angle_to_matrix, matrix_to_axis_angle
from .result import HELD, INTERPOLATED, TRACKED


def smoothness_triples(frame_ids: np.ndarray, max_gap: int) -> np.ndarray:
    """Index triples (N, 3) of consecutive entries of sorted ``frame_ids`` whose two gaps are both <= max_gap.

    Second differences are taken over these triples only, so a long run of invalid frames (a cut, an occlusion)
    does not tie together frames that may legitimately differ.
    """
    if len(frame_ids) < 3:
        return np.zeros((0, 3), dtype=np.int64)
    gaps = np.diff(frame_ids)
    i = np.arange(len(frame_ids) - 2)
    ok = (gaps[:-1] <= max_gap) & (gaps[1:] <= max_gap)
    return np.stack([i[ok], i[ok] + 1, i[ok] + 2], axis=1)


def _slerp_axis_angle(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Geodesic interpolation between rotations a, b (N, 3) axis-angle with weights w (N,) in [0, 1]."""
    Ra = axis_angle_to_matrix(torch.as_tensor(a, dtype=torch.float64))
    Rb = axis_angle_to_matrix(torch.as_tensor(b, dtype=torch.float64))
    delta = matrix_to_axis_angle(Ra.transpose(-1, -2) @ Rb)  # rotation from a to b, in a's frame
    R = Ra @ axis_angle_to_matrix(delta * torch.as_tensor(w, dtype=torch.float64)[:, None])
    return matrix_to_axis_angle(R).numpy()


# Per-frame parameters that are rotations (interpolated on the sphere) vs. vectors (interpolated linearly). Eyes
# and jaw stay small (range-limited), so linear interpolation of their axis-angles is accurate enough.
_ROTATIONS = ("rotation",)


def fill_invalid(params: dict[str, np.ndarray], tracked: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Interpolate per-frame parameters into the frames that were not tracked.

    Args:
        params: per-frame arrays (T, D) (any "shape" entry is passed through untouched).
        tracked: (T,) bool, frames whose parameters are fitted (at least one must be True).
    Returns:
        filled params, status (T,) uint8: TRACKED, INTERPOLATED (between two tracked frames) or HELD (before the
        first / after the last tracked frame: the nearest tracked frame's parameters).
    """
    T = tracked.shape[0]
    ids = np.flatnonzero(tracked)
    status = np.full(T, TRACKED, dtype=np.uint8)
    missing = np.flatnonzero(~tracked)
    if len(missing) == 0:
        return {k: v.copy() for k, v in params.items()}, status
    # For each missing frame: the tracked neighbours before/after (clamped at the ends -> held).
    after = np.searchsorted(ids, missing)
    lo = ids[np.clip(after - 1, 0, len(ids) - 1)]
    hi = ids[np.clip(after, 0, len(ids) - 1)]
    inside = (after > 0) & (after < len(ids))
    w = np.where(inside, (missing - lo) / np.maximum(hi - lo, 1), 0.0)
    lo = np.where(inside, lo, np.where(after == 0, hi, lo))  # held frames copy the only neighbour
    status[missing] = np.where(inside, INTERPOLATED, HELD)
    out = {}
    for k, v in params.items():
        if k == "shape":
            out[k] = v.copy()
            continue
        v = v.copy()
        if k in _ROTATIONS:
            v[missing] = _slerp_axis_angle(v[lo], v[hi], w).astype(v.dtype)
        else:
            v[missing] = (1.0 - w[:, None]) * v[lo] + w[:, None] * v[hi]
        out[k] = v
    return out, status
