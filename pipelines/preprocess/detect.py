"""Face boxes and the 478-point face mesh with MediaPipe's legacy solutions (``mediapipe==0.10.14``).

* ``face_detection`` (BlazeFace, full-range model, the short-range one as a fallback) gives face boxes.
* ``face_mesh`` with ``refine_landmarks=True`` gives 478 points (468 mesh + 2 x 5 iris points). Its own detector only
  finds fairly large faces, so it is run on a generous square crop around a detected box (``mesh_around``) and, by
  the stage, again on the aligned crop where the face is centred and large.

Landmarks are returned as (478, 3) float64 in the pixel units of the image they were asked for: x, y in continuous
pixel coordinates (pixel i covers [i, i + 1)), z = MediaPipe's relative depth scaled like x (smaller = nearer).
All graphs run in static-image mode so a frame's result does not depend on the frames before it (needed for resume).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

# MediaPipe's glog / absl chatter on import and graph start-up; keep user-set levels.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NUM_LANDMARKS = 478
# Face-mesh indices (MediaPipe topology). "right" is the subject's right eye (on the image's left in a frontal view).
RIGHT_EYE_CORNERS = (33, 133)
LEFT_EYE_CORNERS = (362, 263)
MOUTH_CORNERS = (61, 291)
RIGHT_IRIS, LEFT_IRIS = 468, 473


@dataclass
class FaceBox:
    """An axis-aligned face box in pixels of the image it was detected in."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2])

    @property
    def side(self) -> float:
        return max(self.x1 - self.x0, self.y1 - self.y0)

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    def scaled(self, s: float) -> "FaceBox":
        return FaceBox(self.x0 * s, self.y0 * s, self.x1 * s, self.y1 * s, self.score)

    def iou(self, other: "FaceBox") -> float:
        ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def pick_face(boxes: list[FaceBox], face_index: int = 0, previous: FaceBox | None = None) -> FaceBox | None:
    """The face to follow: the box overlapping the previous frame's face most (video), else the ``face_index``-th
    largest. Returns None when there is no face (or fewer than ``face_index + 1`` faces and no previous face)."""
    if not boxes:
        return None
    if previous is not None:
        best = max(boxes, key=previous.iou)
        if previous.iou(best) > 0.1:
            return best
    ranked = sorted(boxes, key=lambda b: b.area, reverse=True)
    return ranked[face_index] if face_index < len(ranked) else None


class FaceDetector:
    """Face boxes + face mesh. Use as a context manager (closes the MediaPipe graphs)."""

    def __init__(self, min_confidence: float = 0.5) -> None:
        import mediapipe as mp

        sol = mp.solutions
        self._full = sol.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_confidence)
        self._short = sol.face_detection.FaceDetection(model_selection=0, min_detection_confidence=min_confidence)
        self._mesh = sol.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=2, refine_landmarks=True,
                                            min_detection_confidence=min_confidence)

    def __enter__(self) -> "FaceDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for g in (self._full, self._short, self._mesh):
            g.close()

    # ------------------------------------------------------------------------------------------------------ boxes
    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        """All face boxes in an (H, W, 3) uint8 RGB image, largest first (full-range model, then short-range)."""
        h, w = rgb.shape[:2]
        rgb = np.ascontiguousarray(rgb)
        for graph in (self._full, self._short):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = graph.process(rgb)
            if res.detections:
                boxes = []
                for d in res.detections:
                    b = d.location_data.relative_bounding_box
                    boxes.append(FaceBox(b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h,
                                         float(d.score[0])))
                return sorted(boxes, key=lambda b: b.area, reverse=True)
        return []

    # ------------------------------------------------------------------------------------------------- landmarks
    def mesh(self, rgb: np.ndarray) -> np.ndarray | None:
        """(478, 3) landmarks of the face nearest the image centre, in ``rgb``'s pixels; None when no face."""
        h, w = rgb.shape[:2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = self._mesh.process(np.ascontiguousarray(rgb))
        if not res.multi_face_landmarks:
            return None
        faces = [np.array([(p.x, p.y, p.z) for p in f.landmark], dtype=np.float64) for f in res.multi_face_landmarks]
        best = min(faces, key=lambda f: float(np.sum((f[:, :2].mean(0) - 0.5) ** 2)))
        return best * np.array([w, h, w], dtype=np.float64)

    def mesh_around(self, rgb: np.ndarray, box: FaceBox, expand: float = 2.2, side: int = 384) -> np.ndarray | None:
        """Face mesh on a square crop of ``expand`` x the box side around ``box`` (resampled to ``side``), mapped
        back to ``rgb``'s pixels. The face mesh's own detector wants a large, centred face; this gives it one."""
        from .crop import apply_matrix, warp

        s = expand * box.side
        if s < 4:
            return None
        a = side / s
        c = box.center
        M = np.array([[a, 0.0, side / 2 - a * c[0]], [0.0, a, side / 2 - a * c[1]], [0.0, 0.0, 1.0]])
        crop = warp(rgb, M, side, border="replicate")
        lmk = self.mesh(crop)
        if lmk is None:
            return None
        out = apply_matrix(np.linalg.inv(M), lmk)
        return out


def eye_centers(lmk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) eye centres (3,) as the mid-points of each eye's corners (gaze-independent, unlike irises)."""
    right = lmk[list(RIGHT_EYE_CORNERS)].mean(0)
    left = lmk[list(LEFT_EYE_CORNERS)].mean(0)
    return right, left
