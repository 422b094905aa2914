"""dlib's face-chip alignment (``get_face_chip_details`` + ``extract_image_chip``) by ``grid_sample``, so that it
runs batched on the GPU and is differentiable in the image (rendered images, (B, 3, H, W) in [0, 1]).

What dlib does (dlib/image_transforms/interpolation.h, image_pyramid.h, geometry/drectangle.h), reproduced here:

1. ``get_face_chip_details(shape, size, padding)``: template points of a mean face, placed in a chip of ``size``
   pixels with ``padding`` (a fraction of the face width) around it, are mapped onto the detected points by the
   least-squares similarity transform (Umeyama). 5-point shapes (dlib's ``shape_predictor_5_face_landmarks``: left
   eye outer and inner corner, right eye outer and inner corner, bottom of the nose; "left" is the subject's left,
   the image's right) use dlib's 5-point template; 68-point shapes (iBUG 300-W) use the 33 points of the nose,
   eyes, outer mouth and upper inner lip (17-26 brows, 55-59 and 65-67 lower lip and the jaw are ignored).
2. ``chip_details``: from that transform only its rotation angle and scale s are kept, as a rectangle
   ``centered_drect(T(size/2, size/2), size*s, size*s)`` (dlib rectangles span width - 1) and the angle. Chip pixel
   (c, r) maps to center + R(angle) ((c / (size-1) - 1/2) (size s - 1), (r / (size-1) - 1/2) (size s - 1)).
3. ``extract_image_chips``: when the rectangle is large (its 2x-downsampled area still exceeds size^2), the chip is
   taken from a level of dlib's image pyramid (``pyramid_down<2>``: separable [1 4 6 4 1]/16 filter over each
   5x5 window, keeping every other row and column, 8-bit values truncated; its coordinates map by p/2 - (1.25,
   0.75)) built on the image cropped to the rotated rectangle grown by 2 (+2 per level, doubled), else from that
   crop directly; bilinear interpolation, black where a 2x2 neighbourhood leaves the crop, values truncated to 8
   bits.

``quantize=True`` adds dlib's 8-bit truncations (pyramid levels and chip) for inputs that are 8-bit images: then the
chip equals dlib's up to float rounding (a pixel that dlib computes as 127.99999 may come out 128). Without it
(training) everything is a linear function of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHIP_SIZE = 150  # the descriptor network's input (input_rgb_image_sized<150>)
CHIP_PADDING = 0.25  # dlib's compute_face_descriptor / get_face_chip default

# dlib's 5-point template (get_face_chip_details), in face-width units before padding.
TEMPLATE_5 = np.array([
    (0.8595674595992, 0.2134981538014),  # left eye, outer corner
    (0.6460604764104, 0.2289674387677),  # left eye, inner corner
    (0.1205750620789, 0.2137274526848),  # right eye, outer corner
    (0.3340850613712, 0.2290642403242),  # right eye, inner corner
    (0.4901123135679, 0.6277975316475),  # bottom of the nose
])

# dlib's mean face for iBUG points 17..67 (get_face_chip_details), x then y.
_MEAN_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004, 0.490127,
    0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825,
    0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149, 0.340985,
    0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721, 0.490127, 0.423532, 0.338094, 0.290379,
    0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127, 0.42689,
)
_MEAN_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915, 0.106454,
    0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758,
    0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099, 0.780233,
    0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805, 0.902192, 0.909281, 0.902192, 0.864805,
    0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182, 0.831803, 0.824182,
)
# The iBUG points dlib aligns 68-point shapes on, and their template positions.
IBUG68_ALIGN = tuple(i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67))
TEMPLATE_68 = np.array([(_MEAN_X[i - 17], _MEAN_Y[i - 17]) for i in IBUG68_ALIGN])
# The iBUG point at each of dlib's 5 points (the 5-point template matches these mean-face positions).
IBUG68_OF_5 = (45, 42, 36, 39, 33)

# pyramid_down<2>'s separable filter (integer taps; the 5x5 sum is divided by 256).
_PYR_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def template(n_points: int, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the shape, (M, 2) chip-pixel positions) of dlib's template for 5- or 68-point shapes."""
    if n_points == 5:
        idx, t = np.arange(5), TEMPLATE_5
    elif n_points == 68:
        idx, t = np.array(IBUG68_ALIGN), TEMPLATE_68
    else:
        raise ValueError(f"dlib aligns 5- or 68-point shapes, got {n_points} points")
    return idx, (padding + t) / (2 * padding + 1) * size


def similarity(src: np.ndarray, dst: np.ndarray, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity dst ~ A src + t of (B, M, 2) point sets (Umeyama; in 2D the closed form below).

    ``weight`` (B, M) in {0, 1} drops points (missing landmarks). Returns A (B, 2, 2) = s R(angle), t (B, 2).
    """
    w = np.ones(src.shape[:2]) if weight is None else np.asarray(weight, dtype=np.float64)
    n = w.sum(1, keepdims=True)
    ms = (src * w[..., None]).sum(1) / n
    md = (dst * w[..., None]).sum(1) / n
    a, b = src - ms[:, None], dst - md[:, None]
    norm = (w * (a**2).sum(-1)).sum(1)
    c = (w * (a * b).sum(-1)).sum(1) / norm  # s cos(angle)
    s = (w * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0])).sum(1) / norm  # s sin(angle)
    A = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    return A, md - np.einsum("bij,bj->bi", A, ms)


@dataclass
class ChipDetails:
    """dlib's ``chip_details`` of B faces: rectangle centre (B, 2) and width (B,) in image pixels (the chip is
    square, rows = cols = ``size``), rotation angle (B,) in radians."""

    center: np.ndarray
    width: np.ndarray
    angle: np.ndarray
    size: int = CHIP_SIZE

    def __len__(self) -> int:
        return len(self.angle)

    def __getitem__(self, idx) -> "ChipDetails":
        """The faces ``idx`` (a slice or an index array)."""
        return ChipDetails(self.center[idx], self.width[idx], self.angle[idx], self.size)


def face_chip_details(points: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING,
                      valid: np.ndarray | None = None) -> ChipDetails:
    """``get_face_chip_details`` of (B, 5, 2) or (B, 68, 2) points (x, y image pixels, dlib's point orders).

    ``valid`` (B, N) bool marks the points to use (default: all finite ones); 68-point shapes need not be complete.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 2:
        pts = pts[None]
    idx, tmpl = template(pts.shape[1], size, padding)
    dst = pts[:, idx]
    ok = np.isfinite(dst).all(-1) if valid is None else (np.asarray(valid)[:, idx] & np.isfinite(dst).all(-1))
    if (ok.sum(1) < 2).any():
        raise ValueError("a face needs at least 2 of the alignment points")
    A, t = similarity(np.broadcast_to(tmpl, dst.shape), np.where(ok[..., None], dst, 0.0), ok)
    p = A[:, :, 0]  # T(1, 0) - T(0, 0)
    angle = np.arctan2(p[:, 1], p[:, 0])
    scale = np.hypot(p[:, 0], p[:, 1])
    center = np.einsum("bij,j->bi", A, np.array([size / 2.0, size / 2.0])) + t
    return ChipDetails(center, size * scale, angle, size)


def dlib_points_from_mediapipe(lmk: np.ndarray, n_points: int = 5) -> np.ndarray:
    """(..., 478, 2+) MediaPipe face-mesh points (our pixel convention: pixel i covers [i, i + 1)) -> (..., 5 or 68,
    2) points in dlib's order and convention (pixel centres on integers), through ``MEDIAPIPE_TO_IBUG68``: the 5
    points are the mesh vertices 263, 362, 33, 133 (eye corners) and 2 (bottom of the nose)."""
    from ..preprocess.landmarks68 import MEDIAPIPE_TO_IBUG68

    ibug = np.asarray(MEDIAPIPE_TO_IBUG68)
    idx = ibug[list(IBUG68_OF_5)] if n_points == 5 else ibug
    return np.asarray(lmk)[..., idx, :2] - 0.5


# ------------------------------------------------------------------------------------------ dlib's chip extraction
def _rotate(center: np.ndarray, p: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = p - center
    return center + np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])


def _area(l: float, t: float, r: float, b: float) -> float:
    return 0.0 if (t > b or l > r) else (r - l + 1) * (b - t + 1)


def _down(rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """``pyramid_down<2>::rect_down``: corners mapped by p/2 - (1.25, 0.75)."""
    l, t, r, b = rect
    return l / 2 - 1.25, t / 2 - 0.75, r / 2 - 1.25, b / 2 - 0.75


@dataclass
class ChipPlan:
    """How dlib extracts one chip: the crop of the image (integer box x0, y0, x1, y1, inclusive), the pyramid
    level (0 = the crop itself), and the affine map from chip pixels (c, r, 1) to pixels of that level (2, 3)."""

    box: tuple[int, int, int, int]
    levels: int
    affine: np.ndarray


def plan_chip(details: ChipDetails, i: int, width: int, height: int) -> ChipPlan:
    """dlib's ``extract_image_chips`` decisions for face ``i`` in a ``width`` x ``height`` image."""
    size = details.size
    w = float(details.width[i])
    cx, cy = (float(v) for v in details.center[i])
    angle = float(details.angle[i])
    half = (w - 1) / 2  # centered_drect: the rectangle spans width - 1
    rect = (cx - half, cy - half, cx + half, cy + half)
    # Pyramid depth: halve while the halved rectangle still holds more than size^2 pixels.
    depth, grow, r = 0, 2.0, _down(rect)
    while _area(*r) > size * size:
        r = _down(r)
        depth += 1
        grow = grow * 2 + 2
    center = np.array([cx, cy])
    corners = [_rotate(center, np.array(p), angle) for p in ((rect[0], rect[1]), (rect[2], rect[1]),
                                                             (rect[0], rect[3]), (rect[2], rect[3]))]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    grown = (min(xs) - grow, min(ys) - grow, max(xs) + grow, max(ys) + grow)
    inter = (max(grown[0], 0.0), max(grown[1], 0.0), min(grown[2], width - 1.0), min(grown[3], height - 1.0))
    box = tuple(int(math.floor(v + 0.5)) for v in inter)  # drectangle -> rectangle rounds each side
    # The chip's rectangle in the crop, halved once per pyramid level used.
    rect = (rect[0] - box[0], rect[1] - box[1], rect[2] - box[0], rect[3] - box[1])
    levels = 0
    while _area(*_down(rect)) > size * size:
        levels += 1
        rect = _down(rect)
    c = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
    p00 = _rotate(c, np.array([rect[0], rect[1]]), angle)
    p10 = _rotate(c, np.array([rect[2], rect[1]]), angle)
    p01 = _rotate(c, np.array([rect[0], rect[3]]), angle)
    affine = np.stack([(p10 - p00) / (size - 1), (p01 - p00) / (size - 1), p00], 1)
    return ChipPlan(box, levels, affine)  # type: ignore[arg-type]


def pyramid_down(x: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """dlib's ``pyramid_down<2>`` of (B, C, H, W) values on the 0..255 scale: ((H-3)//2, (W-3)//2) output."""
    taps = torch.tensor(_PYR_TAPS, dtype=x.dtype, device=x.device)
    k = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, 5, 5)
    # Output pixel (r, c) is the window of rows 2r..2r+4 and columns 2c..2c+4: a stride-2 'valid' filter, which
    # keeps (n - 3) // 2 rows and columns as dlib does.
    y = F.conv2d(x, k, stride=2, groups=x.shape[1])
    return torch.floor(y / 256.0) if quantize else y / 256.0


def _sample(src: torch.Tensor, affine: torch.Tensor, size: int, box: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear samples of src (B, C, h, w) at affine (B, 2, 3) @ (c, r, 1) for a size x size chip; 0 where a 2x2
    neighbourhood leaves the box (B, 4) x0, y0, x1, y1 (inclusive; default: all of src), as dlib's
    interpolate_bilinear + black background on ``sub_image(img, box)``."""
    b, _, h, w = src.shape
    g = torch.arange(size, dtype=affine.dtype, device=affine.device)
    ones = torch.ones(size, size, dtype=g.dtype, device=g.device)
    cr = torch.stack(torch.meshgrid(g, g, indexing="xy") + (ones,), -1)  # (size, size, 3): c, r, 1
    xy = torch.einsum("bij,rcj->brci", affine, cr)  # (B, size, size, 2) pixel coordinates in src
    if box is None:
        box = torch.tensor([0, 0, w - 1, h - 1], dtype=affine.dtype, device=affine.device).expand(b, 4)
    fx, fy = torch.floor(xy[..., 0]), torch.floor(xy[..., 1])
    x0, y0, x1, y1 = (box[:, i, None, None] for i in range(4))
    inside = (fx >= x0) & (fy >= y0) & (fx + 1 <= x1) & (fy + 1 <= y1)
    grid = torch.stack([2 * xy[..., 0] / max(w - 1, 1) - 1, 2 * xy[..., 1] / max(h - 1, 1) - 1], -1)
    out = F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out * inside[:, None].to(out.dtype)


def extract_chips(images: torch.Tensor, details: ChipDetails, quantize: bool = False) -> torch.Tensor:
    """(B, 3, size, size) chips in [0, 1] of (B, 3, H, W) images in [0, 1] (face i from image i), as dlib's
    ``extract_image_chip(img, details, chip)`` makes them (see the module docstring).

    Faces that dlib reads straight from the image are sampled in one batched ``grid_sample``; faces that need its
    pyramid are done one by one on their crops.
    """
    if images.shape[0] != len(details):
        raise ValueError(f"{images.shape[0]} images for {len(details)} faces")
    _, _, h, w = images.shape
    size = details.size
    x = images * 255.0
    if quantize:
        x = torch.round(x)
    plans = [plan_chip(details, i, w, h) for i in range(len(details))]
    out = x.new_zeros(x.shape[0], x.shape[1], size, size)
    direct = [i for i, p in enumerate(plans) if p.levels == 0]
    if direct:
        # Sampling the crop = sampling the image at shifted coordinates, black outside the crop.
        aff = torch.tensor(np.stack([_shifted(plans[i]) for i in direct]), dtype=torch.float64, device=x.device)
        box = torch.tensor([plans[i].box for i in direct], dtype=torch.float64, device=x.device)
        if len(direct) == len(plans):
            out = _sample(x, aff, size, box)
        else:
            out[direct] = _sample(x[direct], aff, size, box)
    for i, p in enumerate(plans):
        if p.levels == 0:
            continue
        x0, y0, x1, y1 = p.box
        level = x[i : i + 1, :, y0 : y1 + 1, x0 : x1 + 1]
        for _ in range(p.levels):
            if min(level.shape[-2:]) <= 8:  # dlib's pyramid_down leaves such images empty: a black chip
                break
            level = pyramid_down(level, quantize)
        else:
            aff = torch.tensor(p.affine[None], dtype=torch.float64, device=x.device)
            out[i : i + 1] = _sample(level, aff, size)
    if quantize:
        # dlib truncates to 8 bits; the margin absorbs float32 rounding of blends that are whole numbers (measured:
        # 2 of 67 500 chip values then differ from dlib's, by 1, against 9 without it and 81 with 1e-3).
        out = torch.floor(out + 3e-5)
    return out / 255.0


def _shifted(plan: ChipPlan) -> np.ndarray:
    """The plan's chip -> crop affine as a chip -> full-image affine."""
    a = plan.affine.copy()
    a[:, 2] += (plan.box[0], plan.box[1])
    return a
