"""Head-model tracking: fit shape, expression, jaw, eyes and head pose to MediaPipe landmarks (paper sec. 4.1).

The paper uses an external FLAME tracker [31]; this is our landmark-based replacement, written against the
``HeadModel`` interface so it works with FLAME and the embedded open head model alike.
"""

from .config import DEFAULT_GROUP_WEIGHTS, TrackingConfig
from .fit import track
from .motion import transfer_motion
from .overlay import tracking_overlay
from .result import (
    HELD,
    INTERPOLATED,
    LOW_CONFIDENCE,
    STATUS_NAMES,
    TRACKED,
    TrackingResult,
    cameras_in_head_frame,
    head_pose_angles,
    load_tracking,
    root_transforms,
    save_tracking,
)
from .rig import LandmarkRig

__all__ = [
    "DEFAULT_GROUP_WEIGHTS",
    "HELD",
    "INTERPOLATED",
    "LOW_CONFIDENCE",
    "STATUS_NAMES",
    "TRACKED",
    "LandmarkRig",
    "TrackingConfig",
    "TrackingResult",
    "cameras_in_head_frame",
    "head_pose_angles",
    "load_tracking",
    "root_transforms",
    "save_tracking",
    "track",
    "tracking_overlay",
    "transfer_motion",
]
