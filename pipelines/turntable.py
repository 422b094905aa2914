"""``fhavatar turntable``: a 360-degree orbit around an avatar, to mp4 and/or a PNG sequence."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .avatar.artifact import load_avatar
from .core.camera import DEFAULT_RADIUS, Camera, fov_to_focal, normalized_intrinsics, orbit_cameras
from .animate import render_sequence, write_frames
from .avatar.head import build_rig, head_for_avatar
from .avatar.skinning import SkinningConfig
from .errors import ConfigError


@dataclass
class TurntableConfig:
    frames: int = 120
    size: int = 512
    fps: float = 30.0
    yaw_start: float = 0.0  # degrees; 0 = frontal
    yaw_range: float = 360.0
    pitch: float = 0.0  # constant elevation in degrees
    pitch_amplitude: float = 0.0  # optional sinusoidal pitch wobble (degrees)
    radius: float = DEFAULT_RADIUS  # metres: PanoHead's framing at our scale (see core/camera.py)
    fov: float = 13.373  # vertical degrees; EG3D/PanoHead's focal 4.2647 (their 18.837 deg is the diagonal)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    skinning: SkinningConfig = field(default_factory=SkinningConfig)  # torso_follow is 1 here: see run_turntable
    expression: str = "source"  # source | neutral
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.background = tuple(float(c) for c in self.background)  # type: ignore[assignment]
        if self.frames < 1:
            raise ConfigError(f"--frames {self.frames} must be >= 1")
        if self.size < 16 or self.size % 2:
            raise ConfigError(f"--size {self.size} must be even and >= 16", "the mp4 is yuv420p, e.g. 512")
        if self.fps <= 0:
            raise ConfigError(f"--fps {self.fps} must be > 0")
        if not 0.0 < self.fov < 180.0 or self.radius <= 0:
            raise ConfigError(f"camera --fov {self.fov} / --radius {self.radius} out of range",
                              "the field of view must be in (0, 180) degrees and the radius > 0 metres")
        if self.expression not in ("source", "neutral"):
            raise ConfigError(f"--expression '{self.expression}' must be source or neutral")


def turntable_cameras(cfg: TurntableConfig, target: tuple[float, float, float]) -> Camera:
    t = torch.arange(cfg.frames, dtype=torch.float32) / cfg.frames
    yaw = cfg.yaw_start + cfg.yaw_range * t
    pitch = cfg.pitch + cfg.pitch_amplitude * torch.sin(2 * np.pi * t)
    c2w = orbit_cameras(yaw, pitch, radius=cfg.radius, target=target)
    return Camera(normalized_intrinsics(fov_to_focal(cfg.fov), cfg.frames), c2w)


def run_turntable(
    avatar_path: str | Path,
    video_path: str | Path | None,
    png_dir: str | Path | None = None,
    cfg: TurntableConfig = TurntableConfig(),
    backend: str = "auto",
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> int:
    """Render the orbit; returns the number of frames written. The head is posed with the source frame's expression
    (``expression='source'``) or neutral, with the global head rotation/translation removed so it faces +z."""
    avatar = load_avatar(avatar_path)
    head = head_for_avatar(avatar, device, str(avatar_path)).to(device)
    # The orbit poses the whole head at the origin, chest included: the chest follows the removed translation.
    rig = build_rig(avatar, head, device, replace(cfg.skinning, torso_follow=1.0))
    params = avatar.source_head_params(device) if avatar.source_params else head.zero_params()
    params.rotation = torch.zeros_like(params.rotation)
    params.translation = torch.zeros_like(params.translation)
    if cfg.expression == "neutral":
        params = head.zero_params()
    target = tuple(float(x) for x in head.head_center().tolist())
    cams = turntable_cameras(cfg, target)
    frames = render_sequence(rig, params, cams, cfg.size, cfg.background, backend, cfg.batch_size, progress)
    return write_frames(frames, video_path, png_dir, cfg.fps)

