"""Generate ``pipelines/assets/mediapipe_reference_face.npy``: a frontal, normalized MediaPipe face-mesh layout.

The reference is MediaPipe face mesh (478 points, ``refine_landmarks=True``) run on scikit-image's public-domain
astronaut photo (``skimage.data.astronaut()``, NASA portrait of Eileen Collins). The head rotation is estimated from
the 3D landmarks themselves (MediaPipe's topology is left/right symmetric: the mirror pairing is found by an
assignment between the points and their mirror images, and the symmetry plane fixes yaw and roll; pitch is fixed by
putting the forehead-top (10) and chin (152) landmarks at equal depth) and removed. The frontal points are then made
exactly symmetric by averaging each point with its mirrored partner, centred between the irises and scaled to unit
inter-pupillary distance.

Output axes: x to the subject's left, y up, z towards the viewer (out of the face) - the head-model convention.
Also writes ``pipelines/assets/mediapipe_mirror_index.npy`` (478,) int: the mirror partner of every landmark.

Run once (the outputs are committed): ``python tools/make_reference_face.py``. Needs mediapipe and scikit-image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

ASSETS = Path(__file__).resolve().parents[1] / "pipelines" / "assets"
# Known mirror pairs (subject's right, subject's left) used for the initial frame: eye corners, mouth corners,
# cheek contour and iris centres.
SEED_PAIRS = ((33, 263), (133, 362), (61, 291), (234, 454), (468, 473))
FOREHEAD_TOP, CHIN = 10, 152
IRIS_RIGHT, IRIS_LEFT = 468, 473


def detect_landmarks(image: np.ndarray) -> np.ndarray:
    """(478, 3) MediaPipe landmarks in pixel-like units: x right, y up, z towards the camera."""
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=1) as mesh:
        result = mesh.process(image)
    if not result.multi_face_landmarks:
        raise RuntimeError("MediaPipe found no face in the reference image")
    h, w = image.shape[:2]
    raw = np.array([[p.x, p.y, p.z] for p in result.multi_face_landmarks[0].landmark], dtype=np.float64)
    # MediaPipe: x, y normalized by width/height with y down; z in the scale of x, negative towards the camera.
    return np.stack([raw[:, 0] * w, -raw[:, 1] * h, -raw[:, 2] * w], axis=1)


def _frame_from(x_axis: np.ndarray, up_hint: np.ndarray) -> np.ndarray:
    """(3, 3) rows = orthonormal x, y, z axes with x given and y as close as possible to ``up_hint``."""
    x = x_axis / np.linalg.norm(x_axis)
    y = up_hint - x * (up_hint @ x)
    y = y / np.linalg.norm(y)
    return np.stack([x, y, np.cross(x, y)])


def mirror_pairing(points: np.ndarray) -> np.ndarray:
    """(N,) permutation pairing each point with the one closest to its mirror image (x -> -x)."""
    mirrored = points * np.array([-1.0, 1.0, 1.0])
    cost = np.linalg.norm(points[:, None] - mirrored[None], axis=-1)
    _, perm = linear_sum_assignment(cost)
    return perm


def frontalize(points: np.ndarray, iterations: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Remove the head rotation. Returns frontal points (N, 3) and the mirror permutation (N,)."""
    x_axis = sum(points[b] - points[a] for a, b in SEED_PAIRS)
    q = (points - points.mean(0)) @ _frame_from(x_axis, points[FOREHEAD_TOP] - points[CHIN]).T
    perm = mirror_pairing(q)
    for _ in range(iterations):
        perm = mirror_pairing(q)
        paired = perm != np.arange(len(q))
        diff = q[paired] - q[perm[paired]]
        normal = np.linalg.eigh(diff.T @ diff)[1][:, -1]  # symmetry-plane normal: dominant pair direction
        normal = normal * np.sign(normal[0])
        q = q @ _frame_from(normal, q[FOREHEAD_TOP] - q[CHIN]).T
    if not np.array_equal(perm[perm], np.arange(len(q))):
        raise RuntimeError("mirror pairing of the reference landmarks is not an involution")
    for a, b in SEED_PAIRS:
        if perm[a] != b:
            raise RuntimeError(f"mirror pairing failed: {a} paired with {perm[a]}, expected {b}")
    return q, perm


def normalize(points: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Symmetrize with the mirror pairing, centre between the irises, scale to unit inter-pupillary distance."""
    sym = 0.5 * (points + points[perm] * np.array([-1.0, 1.0, 1.0]))
    centre = 0.5 * (sym[IRIS_RIGHT] + sym[IRIS_LEFT])
    sym = sym - centre
    return sym / np.linalg.norm(sym[IRIS_LEFT] - sym[IRIS_RIGHT])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    args = parser.parse_args()
    import skimage.data

    points = detect_landmarks(skimage.data.astronaut())
    frontal, perm = frontalize(points)
    reference = normalize(frontal, perm).astype(np.float32)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.save(args.out_dir / "mediapipe_reference_face.npy", reference)
    np.save(args.out_dir / "mediapipe_mirror_index.npy", perm.astype(np.int16))
    print(f"wrote {args.out_dir / 'mediapipe_reference_face.npy'} {reference.shape}, "
          f"{int((perm == np.arange(len(perm))).sum())} midline points")


if __name__ == "__main__":
    main()
