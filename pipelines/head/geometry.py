"""Small numpy helpers shared by the head models that our code builds (embedded, ICT)."""

from __future__ import annotations

import numpy as np


def smoothstep(e0: float | np.ndarray, e1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    """0 below e0, 1 above e1, cubic Hermite between."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) unit area-weighted vertex normals."""
    n = np.zeros_like(verts)
    fn = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    return n / (np.linalg.norm(n, axis=1, keepdims=True) + 1e-12)


def affine_regressor(verts: np.ndarray, ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(V,) weights on ``ids`` closest to uniform with sum 1 that reproduce ``target`` exactly on ``verts``.

    A joint regressed with these weights follows the surface when the shape changes (an affine combination).
    """
    A = np.concatenate([verts[ids].T, np.ones((1, len(ids)))])  # (4, K)
    w0 = np.full(len(ids), 1.0 / len(ids))
    b = np.concatenate([target, [1.0]])
    w = w0 + A.T @ np.linalg.solve(A @ A.T, b - A @ w0)
    out = np.zeros(len(verts))
    out[ids] = w
    return out
