"""``fhavatar reenact``: drive an avatar with tracked motion and render it.

Driving inputs: a tracking file (``tracking.npz`` or a motion ``.npz`` in the same format), a preprocessed item
folder, or a raw video (preprocessed first by the caller). Self-reenactment uses the driving pose as is
(``--motion absolute``); cross-identity keeps the source's pose and adds the driving head motion relative to its
first frame (``--motion relative``, the default). Expression, jaw and eyes always come from the driving frames, the
shape from the avatar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .animate import render_sequence, write_frames
from .avatar.head import build_rig, head_for_avatar
from .avatar.artifact import Avatar, load_avatar
from .core.camera import Camera, orbit_cameras
from .errors import InputError
from .head.base import HeadParams
from .tracking.motion import transfer_motion
from .tracking.result import TrackingResult, load_tracking


@dataclass
class ReenactConfig:
    size: int = 512
    fps: float = 25.0
    motion: str = "relative"  # relative (cross-identity) | absolute (self-reenactment)
    camera: str = "driving"  # driving | source | orbit
    orbit_degrees: float = 360.0  # with camera=orbit: yaw swept over the clip
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    max_frames: int = 0  # 0 = all
    batch_size: int = 8


def source_tracking(avatar: Avatar) -> TrackingResult:
    """The avatar's source frame as a one-frame tracking result (for motion transfer)."""
    p = {k: np.asarray(v) for k, v in avatar.source_params.items()}
    p["shape"] = np.asarray(avatar.shape)
    return TrackingResult(params=p, K=avatar.source_K, c2w=avatar.source_c2w[None], lmk_error_px=np.zeros(1),
                          status=np.zeros(1, np.uint8))


def driving_tracking(path: str | Path) -> TrackingResult:
    """A tracking file, or a preprocessed item folder holding ``preprocess/tracking.npz``."""
    p = Path(path)
    for cand in (p, p / "preprocess" / "tracking.npz", p / "tracking.npz"):
        if cand.is_file():
            return load_tracking(cand)
    raise InputError(f"driving input '{path}' has no tracking", "pass a tracking.npz, a preprocessed folder or a video")


def reenact_cameras(cfg: ReenactConfig, avatar: Avatar, driving: TrackingResult, target, T: int) -> Camera:
    K = torch.as_tensor(np.asarray(driving.K if cfg.camera == "driving" else avatar.source_K), dtype=torch.float32)
    if cfg.camera == "driving":
        c2w = torch.as_tensor(np.asarray(driving.c2w[:T]), dtype=torch.float32)
    elif cfg.camera == "source":
        c2w = torch.as_tensor(np.asarray(avatar.source_c2w), dtype=torch.float32)[None]
    elif cfg.camera == "orbit":
        src = np.asarray(avatar.source_c2w)[:3, 3] - np.asarray(target)
        radius = float(np.linalg.norm(src))
        yaw = torch.linspace(0.0, cfg.orbit_degrees, T + 1)[:T]
        c2w = orbit_cameras(yaw, torch.zeros(T), radius=radius, target=tuple(target))
    else:
        raise InputError(f"--camera '{cfg.camera}' is not one of driving, source, orbit")
    return Camera(K.expand(c2w.shape[0], 3, 3).clone(), c2w)


def run_reenact(
    avatar_path: str | Path,
    driving: TrackingResult,
    video_path: str | Path | None,
    png_dir: str | Path | None = None,
    cfg: ReenactConfig = ReenactConfig(),
    backend: str = "auto",
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> int:
    """Render the avatar driven by ``driving``; returns the number of frames written."""
    avatar = load_avatar(avatar_path)
    head = head_for_avatar(avatar, device, str(avatar_path)).to(device)
    if cfg.max_frames:
        driving = driving.select(slice(0, cfg.max_frames))
    if cfg.motion not in ("relative", "absolute"):
        raise InputError(f"--motion '{cfg.motion}' is not relative or absolute")
    params: HeadParams = transfer_motion(source_tracking(avatar), driving, cfg.motion).to(device)
    rig = build_rig(avatar, head, device)
    T = params.batch
    target = [float(x) for x in head.head_center().tolist()]
    cams = reenact_cameras(cfg, avatar, driving, target, T)
    frames = render_sequence(rig, params, cams, cfg.size, cfg.background, backend, cfg.batch_size, progress)
    return write_frames(frames, video_path, png_dir, cfg.fps)

