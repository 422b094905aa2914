"""Unit quaternions (w, x, y, z) for posing Gaussians: from rotation matrices, products, and the product as a matrix.
Everything here is element-wise or a gather, with no device synchronisation (the posing runs in CUDA graphs)."""

from __future__ import annotations

import functools

import torch


# The four candidate quaternions of a rotation matrix m (row-major m00..m22), times 4 * their largest-denominator
# component: entry [i, j] = sum_t _QUAT_SIGN[i, j, t] * m[_QUAT_INDEX[i, j, t]] (+ 1 on the diagonal). Row i is the
# candidate whose component i is computed from the diagonal, e.g. row 0 = (1 + m00 + m11 + m22, m21 - m12, ...).
_QUAT_TERMS = (
    ((("+", 0), ("+", 4), ("+", 8)), (("+", 7), ("-", 5)), (("+", 2), ("-", 6)), (("+", 3), ("-", 1))),
    ((("+", 7), ("-", 5)), (("+", 0), ("-", 4), ("-", 8)), (("+", 3), ("+", 1)), (("+", 2), ("+", 6))),
    ((("+", 2), ("-", 6)), (("+", 3), ("+", 1)), (("-", 0), ("+", 4), ("-", 8)), (("+", 5), ("+", 7))),
    ((("+", 3), ("-", 1)), (("+", 6), ("+", 2)), (("+", 7), ("+", 5)), (("-", 0), ("-", 4), ("+", 8))),
)


@functools.lru_cache(maxsize=8)
def _quat_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather indices (48,), signs (4, 4, 3) and the 4x4 identity for ``matrix_to_quat``, cached per device: a
    host-to-device copy every call would stall the stream (and cannot be captured in a CUDA graph)."""
    index = torch.tensor([[[t[1] for t in e] + [0] * (3 - len(e)) for e in row] for row in _QUAT_TERMS])
    sign = torch.tensor([[[1.0 if t[0] == "+" else -1.0 for t in e] + [0.0] * (3 - len(e)) for e in row]
                         for row in _QUAT_TERMS])
    return index.flatten().to(device), sign.to(device, dtype), torch.eye(4, dtype=dtype, device=device)


def matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) w,x,y,z with w >= 0.

    Builds the four algebraically equivalent candidates (Shepperd's method) and keeps, per matrix, the one with the
    largest denominator, which is accurate to float precision everywhere (no sign or small-component issues). The
    candidates come from one gather of the matrix entries (a handful of kernels, not ~50: this runs every frame).
    """
    m = R.reshape(*R.shape[:-2], 9)
    index, sign, eye = _quat_tables(R.device, R.dtype)
    cand = (m[..., index].unflatten(-1, (4, 4, 3)) * sign).sum(-1) + eye  # (..., 4, 4)
    best = cand.diagonal(dim1=-2, dim2=-1).argmax(-1)  # largest (1 +- m00 +- m11 +- m22)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    # Normalize and pick the w >= 0 sign in one division (w == 0 keeps the candidate's sign).
    return q / torch.where(q[..., :1] < 0, -1.0, 1.0) / q.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of quaternions (..., 4) w,x,y,z: the rotation b followed by a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )


def quat_right_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) matrices M(q) with ``M(q) @ p == quat_multiply(p, q)`` for quaternions q (..., 4) w,x,y,z.

    The Hamilton product is linear in its left factor; with the right factor fixed per Gaussian, the product with a
    per-frame rotation becomes one multiply-and-sum (instead of ~30 element-wise kernels of ``quat_multiply``).
    """
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([w, -x, -y, -z], -1),
        torch.stack([x, w, z, -y], -1),
        torch.stack([y, -z, w, x], -1),
        torch.stack([z, y, -x, w], -1),
    ], -2)
