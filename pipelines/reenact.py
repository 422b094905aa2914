"""``fhavatar reenact``: drive an avatar with tracked motion and render it.

Driving inputs: a tracking file (``tracking.npz`` or a motion ``.npz`` in the same format), a preprocessed item
folder, or a raw video (preprocessed first by the caller). Self-reenactment uses the driving pose as is
(``--motion absolute``); cross-identity keeps the source's pose and adds the driving head motion relative to its
first frame (``--motion relative``, the default). Expression, jaw and eyes always come from the driving frames, the
shape from the avatar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .animate import render_sequence, write_frames
from .avatar.head import build_rig, head_for_avatar
from .avatar.artifact import Avatar, load_avatar
from .avatar.skinning import SkinningConfig
from .core.camera import Camera, orbit_cameras
from .errors import ConfigError, InputError
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
    skinning: SkinningConfig = field(default_factory=SkinningConfig)

    def __post_init__(self) -> None:
        self.background = tuple(float(c) for c in self.background)  # type: ignore[assignment]
        if self.motion not in ("relative", "absolute"):
            raise ConfigError(f"--motion '{self.motion}' is not relative or absolute")
        if self.camera not in ("driving", "source", "orbit"):
            raise ConfigError(f"--camera '{self.camera}' is not one of driving, source, orbit")
        if self.size < 16 or self.size % 2:
            raise ConfigError(f"--size {self.size} must be even and >= 16", "the mp4 is yuv420p, e.g. 512")
        if self.fps <= 0 or self.max_frames < 0:
            raise ConfigError(f"--fps {self.fps} must be > 0 and --max-frames {self.max_frames} >= 0")


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


# Per-frame parameters and their trailing sizes (None: the head model's shape / expression count).
_PARAM_DIMS = {"expression": None, "rotation": 3, "translation": 3, "neck": 3, "jaw": 3, "eyes": 6}


def check_driving(driving: TrackingResult, name: str, head_name: str | None = None, n_shape: int | None = None,
                  n_expr: int | None = None) -> None:
    """Refuse motion that cannot drive the avatar, with one line naming ``name``, before anything is rendered.

    Checked: every parameter, K and c2w finite (a NaN expression would render an empty, white video); the shapes
    (T frames of each parameter, K (3, 3), c2w (T, 4, 4)); and, when given, the avatar's head model: its name and its
    ``n_shape`` / ``n_expr`` coefficient counts.
    """
    fix = "re-run `fhavatar preprocess` on the driving video (or repair the file)"
    if head_name and driving.head_model and driving.head_model != head_name:
        raise InputError(f"driving '{name}' was tracked with head model '{driving.head_model}', the avatar was made "
                         f"with '{head_name}'", "track the driving video with the avatar's --head-model")
    p = driving.params
    T = driving.num_frames
    if T < 1:
        raise InputError(f"driving '{name}' has no frames", fix)
    for k in ("shape", *_PARAM_DIMS):
        shp = np.shape(p[k])
        width = _PARAM_DIMS.get(k) or (n_shape if k == "shape" else n_expr)
        lead = () if k == "shape" else (T,)
        if len(shp) != len(lead) + 1 or shp[:-1] != lead or (width is not None and shp[-1] != width):
            want = str((*lead, width)) if width is not None else f"{len(lead) + 1} dimensions" + (f", {T} frames"
                                                                                                  if lead else "")
            raise InputError(f"driving '{name}' has {k} of shape {shp}, expected {want}"
                             + (" for the avatar's head model" if _PARAM_DIMS.get(k) is None else ""),
                             "track it with the avatar's --head-model" if _PARAM_DIMS.get(k) is None else fix)
    if np.shape(driving.K) != (3, 3) or np.shape(driving.c2w) != (T, 4, 4):
        raise InputError(f"driving '{name}' has cameras K {np.shape(driving.K)} / c2w {np.shape(driving.c2w)}, "
                         f"expected (3, 3) / ({T}, 4, 4)", fix)
    for k, v in (*p.items(), ("K", driving.K), ("c2w", driving.c2w)):
        bad = ~np.isfinite(np.asarray(v, dtype=np.float64))
        if bad.any():
            where = f", frame {int(np.argwhere(bad)[0][0])}" if k in (*_PARAM_DIMS, "c2w") else ""
            raise InputError(f"driving '{name}' has non-finite values (NaN/inf) in {k}{where}", fix)


def avatar_head(avatar: Avatar) -> tuple[str | None, int, int]:
    """The avatar's head model as ``check_driving`` takes it: (name, shape count, expression count)."""
    return (avatar.head_model.get("name"), int(np.shape(avatar.shape)[-1]),
            int(np.shape(avatar.source_params["expression"])[-1]))


def check_driving_files(avatar_path: str | Path, drivings: list[Path]) -> None:
    """``check_driving`` for tracking files / preprocessed folders against an avatar, all before any work."""
    if not drivings:
        return
    head = avatar_head(load_avatar(avatar_path))
    for d in drivings:
        check_driving(driving_tracking(d), str(d), *head)


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
    driving_name: str = "motion",
) -> int:
    """Render the avatar driven by ``driving`` (checked first, see ``check_driving``; ``driving_name`` names it in
    errors); returns the number of frames written."""
    avatar = load_avatar(avatar_path)
    check_driving(driving, driving_name, *avatar_head(avatar))
    head = head_for_avatar(avatar, device, str(avatar_path)).to(device)
    if cfg.max_frames:
        driving = driving.select(slice(0, cfg.max_frames))
    params: HeadParams = transfer_motion(source_tracking(avatar), driving, cfg.motion).to(device)
    rig = build_rig(avatar, head, device, cfg.skinning)
    T = params.batch
    target = [float(x) for x in head.head_center().tolist()]
    cams = reenact_cameras(cfg, avatar, driving, target, T)
    frames = render_sequence(rig, params, cams, cfg.size, cfg.background, backend, cfg.batch_size, progress)
    return write_frames(frames, video_path, png_dir, cfg.fps)

