"""Crop boxes from landmarks, temporal smoothing, and the similarity warp to the aligned crop.

Framing rule (PanoHead-like whole heads, matched to ``pipelines/core/camera.py`` where the frontal camera at
``DEFAULT_RADIUS`` = 1.35 m with normalized focal 4.2647 sees a ``VISIBLE_WIDTH_M`` = 0.317 m wide square at the
head centre):

1. From the 3-D face mesh (x, y in pixels, z scaled like x) take the eye centres ``e_r``, ``e_l`` (mid-points of each
   eye's corners) and the mouth centre ``m`` (mid-point of the mouth corners). Build the face frame: ``x`` along
   ``e_l - e_r``, ``y`` (down) along ``m - mid(e)`` made orthogonal to ``x``, ``z = x cross y`` (into the image, i.e.
   towards the back of the head for a frontal face).
2. Metric scale: pixels per metre ``k = |e_l - e_r|_3D / 0.063``; the 3-D eye distance is nearly independent of yaw
   and pitch, unlike its 2-D projection.
3. Head centre = ``mid(e) + k * (0.09 * z - up * y)``: 9 cm behind the eye mid-point and ``up`` above it, in the
   face frame (``head_center_back_m`` / ``head_center_up_m``). Its image projection (dropping z: weak perspective)
   is the crop centre, so a turned head stays centred on the skull, not on the face. ``up`` defaults to 0: the eyes
   land on the crop's middle row (plus the head's pitch: 0.09 m * sin(pitch) of vertical shift). The crown (~0.12 m
   above the eyes) and the chin (~0.11 m below) both fit in the 0.317 m crop with a margin.
4. Crop side = ``k * 0.317`` pixels, i.e. the eye distance is 0.063 / 0.317 = 0.199 of the crop width (the 9 cm
   by which the eyes are nearer the camera than the head centre is ignored: weak perspective at the eyes' scale).
5. Rotation: none by default (the crop is axis-aligned; head roll is part of the tracked head rotation and pasting
   back is a scale + shift). With ``remove_roll`` the crop is rotated about its centre so the eye line is level.

A crop box is ``(cx, cy, side, roll)`` in source pixels / radians. ``crop_matrix`` turns it into a 3x3 map from
source to crop pixels, both in continuous coordinates (pixel i covers [i, i + 1), so its centre is i + 0.5).
"""

from __future__ import annotations

import math

import numpy as np

from .detect import MOUTH_CORNERS, eye_centers
from .config import EYE_DISTANCE_M, VISIBLE_WIDTH_M


def face_frame(lmk: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Eye mid-point (3,), face axes (3, 3) as rows x (subject's right->left eye), y (down), z (backwards), and the
    3-D eye distance in the landmarks' units."""
    er, el = eye_centers(lmk)
    mid = (er + el) / 2
    x = el - er
    iod = float(np.linalg.norm(x))
    x = x / max(iod, 1e-9)
    down = lmk[list(MOUTH_CORNERS)].mean(0) - mid
    y = down - np.dot(down, x) * x
    y = y / max(float(np.linalg.norm(y)), 1e-9)
    z = np.cross(x, y)
    return mid, np.stack([x, y, z]), iod


def crop_box_from_landmarks(
    lmk: np.ndarray,
    eye_fraction: float = EYE_DISTANCE_M / VISIBLE_WIDTH_M,
    head_center_up_m: float = 0.0,
    head_center_back_m: float = 0.09,
    eye_distance_m: float = 0.063,
) -> np.ndarray:
    """(4,) crop box ``(cx, cy, side, roll)`` for (478, 3) landmarks, following the module's framing rule."""
    mid, axes, iod = face_frame(lmk)
    k = iod / eye_distance_m  # pixels per metre at the face
    center = mid + k * (head_center_back_m * axes[2] - head_center_up_m * axes[1])
    side = iod / eye_fraction
    roll = math.atan2(axes[0, 1], axes[0, 0])
    return np.array([center[0], center[1], side, roll], dtype=np.float64)


def smooth_boxes(boxes: np.ndarray, valid: np.ndarray, window: int) -> np.ndarray:
    """Fill and smooth per-frame crop boxes (T, 4) over the whole clip.

    Frames without a face (``valid`` False) are filled by linear interpolation in time (held at the ends). Then a
    5-frame median removes single-frame outliers and a Gaussian (``window`` frames = +-3 sigma) removes jitter, on
    (cx, cy, log side, unwrapped roll). ``window`` 1 returns the filled boxes unchanged.
    """
    from scipy.ndimage import gaussian_filter1d, median_filter

    boxes = np.asarray(boxes, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    T = len(boxes)
    if not valid.any():
        raise ValueError("no valid box to smooth")
    x = boxes.copy()
    x[:, 2] = np.log(np.maximum(x[:, 2], 1e-6))
    t = np.arange(T)
    for j in range(4):
        x[:, j] = np.interp(t, t[valid], x[valid, j])
    x[:, 3] = np.unwrap(x[:, 3])
    if window > 1 and T > 2:
        med = min(5, window if window % 2 else window - 1)
        if med >= 3 and T >= med:
            x = median_filter(x, size=(med, 1), mode="nearest")
        sigma = (window - 1) / 6.0
        r = int(np.ceil(3.0 * sigma))
        # Pad by point reflection about each end's linear-fit value, so a steady motion is not pulled back towards
        # the clip's ends (holding the end value would make the box lag there).
        xp = np.concatenate([_reflect_end(x, r, window), x, _reflect_end(x[::-1], r, window)[::-1]])
        x = gaussian_filter1d(xp, sigma=sigma, axis=0, mode="nearest", truncate=3.0)[r:r + T]
    x[:, 2] = np.exp(x[:, 2])
    return x


def _reflect_end(x: np.ndarray, r: int, window: int) -> np.ndarray:
    """(r, D) values before x[0]: ``2 a - x[k]`` for k = r..1, with ``a`` the value at t = 0 of a line fitted to
    the first ``window`` samples (robust to a noisy first sample)."""
    n = min(len(x), window)
    t = np.arange(n, dtype=np.float64)
    slope, icept = np.polyfit(t, x[:n], 1) if n >= 2 else (np.zeros(x.shape[1]), x[0])
    k = np.minimum(np.arange(r, 0, -1), len(x) - 1)
    fit_k = icept[None] + slope[None] * k[:, None]
    # Reflect the fitted line (plus the samples' deviations from it) through the line's value at t = 0.
    return 2 * icept[None] - fit_k - (x[k] - fit_k)


def crop_matrix(box: np.ndarray, size: int, use_roll: bool = False) -> np.ndarray:
    """(3, 3) map from source to crop pixels (continuous coordinates) for a box ``(cx, cy, side, roll)``."""
    cx, cy, side, roll = (float(v) for v in box)
    a = size / side
    c, s = (math.cos(roll), math.sin(roll)) if use_roll else (1.0, 0.0)
    # crop = size/2 + a * R(-roll) (p - center)
    R = np.array([[c, s], [-s, c]])
    M = np.eye(3)
    M[:2, :2] = a * R
    M[:2, 2] = size / 2 - a * R @ np.array([cx, cy])
    return M


def apply_matrix(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map (N, 2+) points' x, y with a 3x3 affine matrix; z (if any) is scaled by the matrix's scale."""
    out = np.array(pts, dtype=np.float64, copy=True)
    out[:, :2] = pts[:, :2] @ M[:2, :2].T + M[:2, 2]
    if pts.shape[1] > 2:
        out[:, 2:] = pts[:, 2:] * math.sqrt(abs(np.linalg.det(M[:2, :2])))
    return out


_BORDERS = {"replicate": "BORDER_REPLICATE", "reflect": "BORDER_REFLECT_101", "constant": "BORDER_CONSTANT"}


def warp(img: np.ndarray, M: np.ndarray, size: int, border: str = "replicate", fill=0) -> np.ndarray:
    """Resample ``img`` (H, W[, C]) into a ``size`` x ``size`` crop with the continuous-coordinate map ``M`` (3, 3).

    Downscaling is anti-aliased: the image is first area-resized to the crop's scale, then warped bilinearly.
    """
    import cv2

    M = np.asarray(M, dtype=np.float64)
    scale = math.sqrt(abs(np.linalg.det(M[:2, :2])))
    if scale < 0.8:  # area-resize first so the bilinear warp does not alias
        h, w = img.shape[:2]
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        M = M @ np.diag([w / nw, h / nh, 1.0])
    # Continuous -> cv2 index coordinates: idx = cont - 0.5 on both sides.
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    Mi = np.linalg.inv(shift) @ M @ shift
    value = tuple(fill) if isinstance(fill, (tuple, list)) else fill
    return cv2.warpAffine(img, Mi[:2], (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=getattr(cv2, _BORDERS[border]), borderValue=value)


def inside_mask(M: np.ndarray, size: int, width: int, height: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: how much of each crop pixel comes from inside the source frame (1 inside,
    0 in padding; a one-pixel soft edge)."""
    Minv = np.linalg.inv(M)
    u = np.arange(size) + 0.5
    uu, vv = np.meshgrid(u, u)
    x = Minv[0, 0] * uu + Minv[0, 1] * vv + Minv[0, 2]
    y = Minv[1, 0] * uu + Minv[1, 1] * vv + Minv[1, 2]
    px = 1.0 / math.sqrt(abs(np.linalg.det(M[:2, :2])))  # one crop pixel in source pixels
    fx = np.clip(np.minimum(x, width - x) / px + 0.5, 0.0, 1.0)
    fy = np.clip(np.minimum(y, height - y) / px + 0.5, 0.0, 1.0)
    return (fx * fy).astype(np.float32)
