"""Tracked head-model parameters of a clip (or a photo), their file format and pose helpers."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..head.base import HeadModel, HeadParams
from ..head.lbs import axis_angle_to_matrix
from ..store import save_npz

# Per-frame status codes (``TrackingResult.status``).
TRACKED = 0  # fitted to this frame's landmarks
INTERPOLATED = 1  # no landmarks: parameters interpolated between the nearest tracked frames
HELD = 2  # no landmarks before/after: parameters copied from the nearest tracked frame (clip ends)
LOW_CONFIDENCE = 3  # fitted, but the mean landmark error exceeds ``TrackingConfig.max_error_px``
STATUS_NAMES = ("tracked", "interpolated", "held", "low_confidence")

PARAM_NAMES = tuple(f.name for f in fields(HeadParams))
FORMAT_VERSION = 1


@dataclass
class TrackingResult:
    """Head-model parameters tracked on T frames.

    params: numpy arrays keyed like ``HeadParams`` fields: shape (S,) shared by all frames, and expression (T, E),
        rotation (T, 3), translation (T, 3), neck (T, 3), jaw (T, 3), eyes (T, 6).
    K: (3, 3) normalized intrinsics; c2w: (T, 4, 4) camera-to-world per frame (the tracker keeps the camera fixed
        and moves the head, so all T are equal).
    lmk_error_px: (T,) mean landmark reprojection error in pixels of a 512x512 crop (NaN where not tracked).
    status: (T,) uint8 codes TRACKED / INTERPOLATED / HELD / LOW_CONFIDENCE.
    landmarks: (T, L, 2) the observed landmarks in pixels of ``image_size`` (NaN where missing), or None.
    """

    params: dict[str, np.ndarray]
    K: np.ndarray
    c2w: np.ndarray
    lmk_error_px: np.ndarray
    status: np.ndarray
    image_size: int = 512
    head_model: str = ""
    landmarks: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.params["expression"].shape[0])

    def __len__(self) -> int:
        return self.num_frames

    def head_params(self, device=None) -> HeadParams:
        """All frames as a ``HeadParams`` batch (T, ...), the shared shape repeated per frame."""
        T = self.num_frames
        d = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in self.params.items()}
        d["shape"] = d["shape"].reshape(1, -1).expand(T, -1).clone()
        return HeadParams(**d)

    def select(self, idx) -> "TrackingResult":
        """The frames ``idx`` (an int, slice or index array) as a new result."""
        idx = np.arange(self.num_frames)[idx].reshape(-1)
        p = {k: (v if k == "shape" else v[idx]) for k, v in self.params.items()}
        return TrackingResult(
            params=p,
            K=self.K,
            c2w=self.c2w[idx],
            lmk_error_px=self.lmk_error_px[idx],
            status=self.status[idx],
            image_size=self.image_size,
            head_model=self.head_model,
            landmarks=None if self.landmarks is None else self.landmarks[idx],
        )

    def status_counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in enumerate(STATUS_NAMES)}


# ------------------------------------------------------------------------------------------------------- file format
def save_tracking(path: str | Path, result: TrackingResult, head_model_name: str | None = None) -> None:
    """Write ``result`` to ``path`` (.npz), atomically (a killed writer never leaves a partial file)."""
    name = head_model_name if head_model_name is not None else result.head_model
    arrays = {f"param_{k}": np.asarray(v, dtype=np.float32) for k, v in result.params.items()}
    arrays.update(
        K=np.asarray(result.K, dtype=np.float32),
        c2w=np.asarray(result.c2w, dtype=np.float32),
        lmk_error_px=np.asarray(result.lmk_error_px, dtype=np.float32),
        status=np.asarray(result.status, dtype=np.uint8),
        image_size=np.int64(result.image_size),
        head_model=np.array(name),
        format_version=np.int64(FORMAT_VERSION),
    )
    if result.landmarks is not None:
        arrays["landmarks"] = np.asarray(result.landmarks, dtype=np.float32)
    save_npz(path, **arrays)


def load_tracking(path: str | Path) -> TrackingResult:
    """Read a file written by ``save_tracking``; a missing, corrupt or foreign file raises ``InputError``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"tracking file '{path}' not found", "run preprocess first (it writes tracking.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"tracking file '{path}' is unreadable ({e.__class__.__name__})", "re-run preprocess") from e
    required = [f"param_{k}" for k in PARAM_NAMES] + ["K", "c2w", "lmk_error_px", "status", "image_size"]
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"tracking file '{path}' is corrupt: missing {', '.join(missing)}", "re-run preprocess")
    version = int(data.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise InputError(f"tracking file '{path}' has format {version}, newer than this tool's {FORMAT_VERSION}",
                         "upgrade fhavatar or re-run preprocess")
    params = {k: data[f"param_{k}"] for k in PARAM_NAMES}
    T = params["expression"].shape[0]
    if any(params[k].shape[0] != T for k in PARAM_NAMES if k != "shape") or data["c2w"].shape != (T, 4, 4):
        raise InputError(f"tracking file '{path}' is corrupt: inconsistent frame counts", "re-run preprocess")
    return TrackingResult(
        params=params,
        K=data["K"],
        c2w=data["c2w"],
        lmk_error_px=data["lmk_error_px"],
        status=data["status"],
        image_size=int(data["image_size"]),
        head_model=str(data["head_model"]) if "head_model" in data else "",
        landmarks=data.get("landmarks"),
    )


# ------------------------------------------------------------------------------------------------------ pose helpers
def head_pose_angles(rotation: np.ndarray | torch.Tensor) -> np.ndarray:
    """Yaw, pitch, roll in degrees (T, 3) of global head rotations (T, 3) axis-angle, in world axes (y up, face +z).

    yaw > 0: the face turns towards +x (the subject's left, the image's right for the frontal camera);
    pitch > 0: the face looks up; roll: right-handed rotation about the face's own forward axis.
    """
    R = axis_angle_to_matrix(torch.as_tensor(np.asarray(rotation), dtype=torch.float64)).numpy()
    x_face, fwd = R[..., :, 0], R[..., :, 2]
    yaw = np.degrees(np.arctan2(fwd[..., 0], fwd[..., 2]))
    pitch = np.degrees(np.arctan2(fwd[..., 1], np.hypot(fwd[..., 0], fwd[..., 2])))
    # Roll: angle from the horizontal vector perpendicular to forward to the face's x axis, about forward.
    level = np.cross(np.array([0.0, 1.0, 0.0]), fwd)
    level /= np.maximum(np.linalg.norm(level, axis=-1, keepdims=True), 1e-12)
    roll = np.degrees(np.arctan2((np.cross(level, x_face) * fwd).sum(-1), (level * x_face).sum(-1)))
    return np.stack([yaw, pitch, roll], axis=-1)


def root_transforms(head: HeadModel, result: TrackingResult) -> np.ndarray:
    """(T, 4, 4) world transforms of the head's root joint: x -> R (x - J0) + J0 + t (neck, jaw, eyes excluded).

    J0 is the root joint regressed like ``HeadModel.forward`` does (from the shaped mesh with expression).
    """
    params = result.head_params(device=head.v_template.device)
    with torch.no_grad():
        J0 = torch.einsum("v,bvd->bd", head.J_regressor[0], head.shaped(params.shape, params.expression))
    J0 = J0.double().cpu().numpy()  # (T, 3)
    R = axis_angle_to_matrix(torch.as_tensor(np.asarray(result.params["rotation"]), dtype=torch.float64)).numpy()
    t = np.asarray(result.params["translation"], dtype=np.float64)
    M = np.tile(np.eye(4), (R.shape[0], 1, 1))
    M[:, :3, :3] = R
    M[:, :3, 3] = J0 - (R @ J0[..., None])[..., 0] + t
    return M


def cameras_in_head_frame(head: HeadModel, result: TrackingResult) -> np.ndarray:
    """(T, 4, 4) camera-to-world of each frame expressed in the head's canonical (unposed) frame.

    The tracker moves the head in front of a fixed camera; renderers of a canonical avatar need the opposite: the
    head at rest and the camera moved by the inverse of the head's root motion (``M^-1 c2w``).
    """
    M = root_transforms(head, result)
    return (np.linalg.inv(M) @ np.asarray(result.c2w, dtype=np.float64)).astype(np.float32)
