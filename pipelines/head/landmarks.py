"""MediaPipe face-mesh landmark sets and their embedding on a head-model surface.

MediaPipe's face mesh gives 478 points (468 face points + 10 iris points with ``refine_landmarks=True``). Index
conventions used here: "right"/"left" are the *subject's* right/left (MediaPipe's own naming; in a frontal image the
subject's right is on the image left). In head-model space the subject's left is +x.

``build_landmark_embedding`` ties each landmark to a surface point (triangle id + barycentrics) of a head model:
the frontal reference layout (``pipelines/assets/mediapipe_reference_face.npy``) is aligned to the head's frontal
face by an axis-aligned affine fit (x/y scale + translation) on a few semantic anchors, then every landmark is
projected orthographically along -z onto the front-facing surface (the closest hit; the nearest surface point when
the ray misses). Iris points go onto the eyeballs, all others onto the skin. Optional per-landmark ``offsets``
(in the head's frontal x/y plane, e.g. fitted to tracked footage by ``pipelines.tracking.landmark_offsets``) move
the aligned points before the projection, so the corrected points still land on the surface.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .base import REGIONS, HeadModel, LandmarkEmbedding

NUM_LANDMARKS = 478

NOSE_TIP = 1
PRONASALE = 4  # the most forward point of the nose
SUBNASALE = 2
CHIN = 152
FOREHEAD_TOP = 10
EYE_OUTER_RIGHT, EYE_INNER_RIGHT, EYE_INNER_LEFT, EYE_OUTER_LEFT = 33, 133, 362, 263
MOUTH_CORNER_RIGHT, MOUTH_CORNER_LEFT = 61, 291
LIP_UPPER_INNER, LIP_LOWER_INNER = 13, 14
IRIS_CENTER_RIGHT, IRIS_CENTER_LEFT = 468, 473

# The 68 iBUG / dlib / face-alignment points as MediaPipe indices (the mapping in common use, e.g. LatentSync's
# LM68_FROM_MP478). iBUG order: jaw 0-16 from the subject's right ear, brows 17-26, nose 27-35, eyes 36-47,
# outer lips 48-59, inner lips 60-67.
MP_IBUG68 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
)  # fmt: skip

# Ordered contours (from MediaPipe's FACEMESH_* connection sets).
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149,
    150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
JAW_CONTOUR = (
    127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454, 356,
)  # fmt: skip  (subject's right ear -> chin -> left ear)
BROW_RIGHT_UPPER = (70, 63, 105, 66, 107)
BROW_RIGHT_LOWER = (46, 53, 52, 65, 55)
BROW_LEFT_UPPER = (300, 293, 334, 296, 336)
BROW_LEFT_LOWER = (276, 283, 282, 295, 285)
NOSE_RIDGE = (168, 6, 197, 195, 5, 4, 1)
NOSE_BASE = (98, 97, 2, 326, 327)
EYE_RIGHT = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
EYE_LEFT = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
IRIS_RIGHT = (468, 469, 470, 471, 472)  # centre first
IRIS_LEFT = (473, 474, 475, 476, 477)
IRISES = IRIS_RIGHT + IRIS_LEFT

GROUPS: dict[str, tuple[int, ...]] = {
    "jaw_contour": JAW_CONTOUR,
    "face_oval": FACE_OVAL,
    "brow_right": BROW_RIGHT_UPPER + BROW_RIGHT_LOWER,
    "brow_left": BROW_LEFT_UPPER + BROW_LEFT_LOWER,
    "nose": NOSE_RIDGE + NOSE_BASE,
    "eye_right": EYE_RIGHT,
    "eye_left": EYE_LEFT,
    "lips_outer": LIPS_OUTER,
    "lips_inner": LIPS_INNER,
    "iris_right": IRIS_RIGHT,
    "iris_left": IRIS_LEFT,
}

# Anchors used to align the reference layout to a head: eye corners, nose, lips (outer borders, inner lip line,
# corners) and chin. Heads may give any subset with at least 3 points.
LIP_UPPER_TOP, LIP_LOWER_BOTTOM = 0, 17
ANCHOR_INDICES = (
    EYE_OUTER_RIGHT, EYE_INNER_RIGHT, EYE_INNER_LEFT, EYE_OUTER_LEFT, PRONASALE, SUBNASALE, LIP_UPPER_TOP,
    LIP_UPPER_INNER, LIP_LOWER_INNER, LIP_LOWER_BOTTOM, MOUTH_CORNER_RIGHT, MOUTH_CORNER_LEFT, CHIN,
)  # fmt: skip
_EYE_CORNERS = (EYE_OUTER_RIGHT, EYE_INNER_RIGHT, EYE_INNER_LEFT, EYE_OUTER_LEFT)
_MOUTH_CORNERS = (MOUTH_CORNER_RIGHT, MOUTH_CORNER_LEFT)


def fit_axis_affine(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares per-axis scale and offset with ``dst ~ src * scale + offset``. src, dst (K, D)."""
    scale, offset = np.empty(src.shape[1]), np.empty(src.shape[1])
    for d in range(src.shape[1]):
        A = np.stack([src[:, d], np.ones(len(src))], 1)
        (scale[d], offset[d]), *_ = np.linalg.lstsq(A, dst[:, d], rcond=None)
    return scale, offset


def _scale_from(reference: np.ndarray, anchors: Mapping[int, Sequence[float]], ids: Sequence[int]):
    """(ref height, x scale) from symmetric anchor pairs, or None when they are not all given."""
    if not all(i in anchors for i in ids):
        return None
    rx = np.array([reference[i, 0] for i in ids])
    ax = np.array([anchors[i][0] for i in ids], dtype=np.float64)
    return float(np.mean([reference[i, 1] for i in ids])), float((rx @ ax) / (rx @ rx))


def align_reference(reference: np.ndarray, anchors: Mapping[int, Sequence[float]]) -> np.ndarray:
    """(478, 3) reference landmarks mapped into the head's frontal frame.

    First an axis-aligned affine fit (x/y scale + offset) on all anchors. Then, when the anchors allow it, a
    refinement: heights are remapped by a monotone piecewise-linear warp through the midline anchors (plus the mean
    eye-corner height), and x is scaled by a height-dependent factor interpolated between the eye corners and the
    mouth corners, and the mouth region is bent so the mouth corners land on the head's corners. The warp also
    closes the reference's open mouth (inner-lip anchors on the head's lip line) and removes a smile.
    z is scaled by the mean of the fitted x/y scales.
    """
    ids = sorted(anchors)
    src = reference[ids, :2]
    dst = np.array([anchors[i][:2] for i in ids], dtype=np.float64)
    scale, offset = fit_axis_affine(src, dst)
    out = np.empty_like(reference, dtype=np.float64)
    out[:, :2] = reference[:, :2] * scale + offset
    out[:, 2] = reference[:, 2] * scale.mean()
    # Vertical warp through midline anchors (and the eye-corner line).
    knots = [(reference[i, 1], float(anchors[i][1])) for i in ids if abs(reference[i, 0]) < 1e-6]
    if all(i in anchors for i in _EYE_CORNERS):
        knots.append((np.mean([reference[i, 1] for i in _EYE_CORNERS]),
                      float(np.mean([anchors[i][1] for i in _EYE_CORNERS]))))
    knots.sort()
    ky = np.array(knots)
    if len(ky) >= 2 and np.all(np.diff(ky[:, 0]) > 0) and np.all(np.diff(ky[:, 1]) > 0):
        y = reference[:, 1]
        warped = np.interp(y, ky[:, 0], ky[:, 1])
        # Beyond the outermost knots continue with the global scale.
        warped = np.where(y < ky[0, 0], ky[0, 1] + (y - ky[0, 0]) * scale[1], warped)
        out[:, 1] = np.where(y > ky[-1, 0], ky[-1, 1] + (y - ky[-1, 0]) * scale[1], warped)
    # Height-dependent horizontal scale (eye corners -> mouth corners).
    eye, mouth = _scale_from(reference, anchors, _EYE_CORNERS), _scale_from(reference, anchors, _MOUTH_CORNERS)
    if eye is not None and mouth is not None and mouth[0] < eye[0]:
        sx = np.interp(reference[:, 1], [mouth[0], eye[0]], [mouth[1], eye[1]])
        out[:, 0] = reference[:, 0] * sx + offset[0]
        # Bend the mouth region so the mouth corners land on the head's corners (the reference may smile).
        corner = out[list(_MOUTH_CORNERS)]
        target = np.array([anchors[i][:2] for i in _MOUTH_CORNERS], dtype=np.float64)
        bend = float(np.mean(target[:, 1] - corner[:, 1]))
        half_width = float(np.mean(np.abs(target[:, 0])))
        lip_line = float(np.mean(corner[:, 1]))
        reach = np.clip(1.0 - ((out[:, 1] - lip_line) / (1.2 * half_width)) ** 2, 0.0, None) ** 2
        out[:, 1] += bend * np.clip((out[:, 0] / half_width) ** 2, 0.0, 1.0) * reach
    return out


def _project_front(points: np.ndarray, verts: np.ndarray, faces: np.ndarray, chunk: int = 64):
    """Orthographic projection along -z of points (L, 2+) onto triangles (front-facing ones only).

    Returns face ids (L,) and barycentrics (L, 3): the hit with the largest z; where the ray misses every
    triangle, the triangle nearest in the image plane with clamped barycentrics.
    """
    tri = verts[faces]  # (F, 3, 3)
    normal_z = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (tri[:, 1, 1] - tri[:, 0, 1]) * (
        tri[:, 2, 0] - tri[:, 0, 0])
    keep = np.nonzero(normal_z > 1e-12)[0]
    tri = tri[keep]
    x0, y0 = tri[:, 0, 0], tri[:, 0, 1]
    e1, e2 = tri[:, 1, :2] - tri[:, 0, :2], tri[:, 2, :2] - tri[:, 0, :2]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    centroid = tri[:, :, :2].mean(1)
    face_ids = np.empty(len(points), dtype=np.int64)
    barys = np.empty((len(points), 3))
    for s in range(0, len(points), chunk):
        p = points[s:s + chunk, :2]
        dx, dy = p[:, 0:1] - x0[None], p[:, 1:2] - y0[None]
        b1 = (dx * e2[None, :, 1] - dy * e2[None, :, 0]) / det[None]
        b2 = (e1[None, :, 0] * dy - e1[None, :, 1] * dx) / det[None]
        b0 = 1.0 - b1 - b2
        inside = (b0 >= -1e-9) & (b1 >= -1e-9) & (b2 >= -1e-9)
        z = b0 * tri[None, :, 0, 2] + b1 * tri[None, :, 1, 2] + b2 * tri[None, :, 2, 2]
        z = np.where(inside, z, -np.inf)
        best = np.argmax(z, axis=1)
        hit = np.isfinite(z[np.arange(len(p)), best])
        # Fallback for misses: the triangle whose centroid is nearest in the image plane.
        near = np.argmin(((p[:, None, :] - centroid[None]) ** 2).sum(-1), axis=1)
        best = np.where(hit, best, near)
        b = np.stack([b0, b1, b2], -1)[np.arange(len(p)), best]
        b = np.clip(b, 0.0, None)
        barys[s:s + chunk] = b / b.sum(1, keepdims=True)
        face_ids[s:s + chunk] = keep[best]
    return face_ids, barys


def build_landmark_embedding(
    head: HeadModel,
    reference: np.ndarray,
    anchors: Mapping[int, Sequence[float]] | None = None,
    indices: Sequence[int] | None = None,
    skin_regions: Sequence[str] | None = None,
    offsets: np.ndarray | None = None,
) -> LandmarkEmbedding:
    """Embed MediaPipe landmarks on ``head``'s template surface.

    Args:
        head: a head model; its ``face_region`` tells eyeball triangles (region "eyes") from the skin.
        reference: (478, 3) frontal reference layout (x to the subject's left, y up, z towards the viewer).
        anchors: MediaPipe index -> frontal (x, y) position on ``head``'s template for a few semantic points (see
            ``ANCHOR_INDICES``); default ``head.landmark_anchors()``.
        indices: which landmarks to embed (default: all 478).
        skin_regions: REGIONS names the non-iris landmarks may land on (default: every triangle but the eyeballs).
            A head with an eye socket or mouth interior behind its openings names its skin here, so an eyelid or
            inner-lip point that falls into an opening goes to the nearest lid or lip margin, not centimetres deep.
        offsets: (478, 2) shifts (head units) of each aligned landmark in the frontal x/y plane, indexed by
            MediaPipe index, applied before the projection onto the surface (default: none).
    Returns:
        LandmarkEmbedding with mp_index (L,), faces (L,) and bary (L, 3).
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != (NUM_LANDMARKS, 3):
        raise ValueError(f"reference landmarks must have shape (478, 3), got {reference.shape}")
    if anchors is None:
        if not hasattr(head, "landmark_anchors"):
            raise ValueError(f"head model {head.name!r} has no landmark_anchors(); pass anchors explicitly")
        anchors = head.landmark_anchors()
    if len(anchors) < 3:
        raise ValueError("need at least 3 anchor landmarks to align the reference layout")
    idx = np.arange(NUM_LANDMARKS) if indices is None else np.asarray(indices, dtype=np.int64)
    aligned = align_reference(reference, anchors)[idx]
    if offsets is not None:
        offsets = np.asarray(offsets, dtype=np.float64)
        if offsets.shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"landmark offsets must have shape (478, 2), got {offsets.shape}")
        aligned[:, :2] += offsets[idx]
    verts = head.v_template.detach().cpu().double().numpy()
    faces = head.faces.detach().cpu().numpy()
    region = head.face_region.detach().cpu().numpy()
    is_eye = region == REGIONS["eyes"]
    is_skin = ~is_eye if skin_regions is None else np.isin(region, [REGIONS[n] for n in skin_regions])
    is_iris = np.isin(idx, IRISES)
    face_ids = np.empty(len(idx), dtype=np.int64)
    bary = np.empty((len(idx), 3))
    for want_iris, tri_mask in ((True, is_eye), (False, is_skin)):
        sel = np.nonzero(is_iris == want_iris)[0]
        if len(sel) == 0:
            continue
        tri_ids = np.nonzero(tri_mask)[0]
        if len(tri_ids) == 0:  # e.g. a head without eyeballs: irises go onto the skin
            tri_ids = np.arange(len(faces))
        f, b = _project_front(aligned[sel], verts, faces[tri_ids])
        face_ids[sel], bary[sel] = tri_ids[f], b
    return LandmarkEmbedding(
        mp_index=torch.as_tensor(idx, dtype=torch.long),
        faces=torch.as_tensor(face_ids, dtype=torch.long),
        bary=torch.as_tensor(bary, dtype=torch.float32),
    )
