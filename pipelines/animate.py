"""The one render loop shared by reenactment and turntables: pose the avatar per frame, render, yield images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .avatar.artifact import Avatar
from .avatar.binding import AvatarRig
from .core.camera import Camera, to_pixel_intrinsics, world_to_camera
from .errors import InputError
from .head.base import HeadModel, HeadParams
from .uv.space import UVConfig, load_or_build_uv_space


def head_for_avatar(avatar: Avatar, device="cpu", avatar_name: str = "avatar") -> HeadModel:
    """Load the head model the avatar was made with and check it is the same one (by digest)."""
    from .head.registry import load_head_model
    from .uv.space import uv_layout_digest

    kind = avatar.head_model.get("kind", "embedded")
    head = load_head_model(kind, device=device)
    want = avatar.head_model.get("digest")
    if want and uv_layout_digest(head) != want:
        raise InputError(
            f"avatar '{avatar_name}' was made with a different {kind} head model (digest {want}, "
            f"found {uv_layout_digest(head)})",
            "use the same head model files (FHAVATAR_FLAME) as when it was reconstructed, or reconstruct again",
        )
    return head


def build_rig(avatar: Avatar, head: HeadModel, device="cpu") -> AvatarRig:
    uv = load_or_build_uv_space(head, UVConfig(size=avatar.uv_size), device=device)
    shape = torch.as_tensor(avatar.shape, dtype=torch.float32, device=device)
    return AvatarRig(head, uv, avatar.maps_tensor(device), shape, avatar.delta_p_tensor(device))


@dataclass
class Frame:
    """One rendered frame: rgb (H, W, 3) uint8, alpha (H, W) uint8."""

    rgb: np.ndarray
    alpha: np.ndarray


def render_sequence(
    rig: AvatarRig,
    params: HeadParams,
    cameras: Camera,
    size: int = 512,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    backend: str = "auto",
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Frame]:
    """Render T frames: params (T frames, or 1 broadcast) x cameras (T, or 1 broadcast).

    Frames are posed and rendered ``batch_size`` at a time (one batched LBS + deformation + one batched render).
    """
    from .render import render_gaussians

    device = rig.color.device
    T = max(params.batch, len(cameras))
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    for s in range(0, T, batch_size):
        idx = torch.arange(s, min(s + batch_size, T), device=device)
        p = params.index(idx if params.batch > 1 else torch.zeros_like(idx))
        cam = cameras[idx if len(cameras) > 1 else torch.zeros_like(idx).cpu()]
        with torch.no_grad():
            g = rig.pose_params(p)
            out = render_gaussians(
                g.means, g.quats, g.scales, g.opacities, g.colors,
                viewmats=world_to_camera(cam.c2w.to(device)),
                Ks=to_pixel_intrinsics(cam.K.to(device), size, size),
                width=size, height=size, backgrounds=bg.expand(len(idx), 3), backend=backend,
            )
        rgb = (out.rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        alpha = (out.alpha[..., 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        for b in range(len(idx)):
            yield Frame(rgb[b], alpha[b])
        if progress is not None:
            progress(len(idx))


def write_frames(frames: Iterable[Frame], video_path: str | Path | None, png_dir: str | Path | None,
                 fps: float) -> int:
    """Stream frames to an mp4 and/or an RGBA PNG sequence; returns the number of frames."""
    from .video import write_png, write_video

    def tee() -> Iterator[np.ndarray]:
        for i, fr in enumerate(frames):
            if png_dir is not None:
                write_png(Path(png_dir) / f"{i:06d}.png", np.concatenate([fr.rgb, fr.alpha[..., None]], -1))
            yield fr.rgb

    if video_path is not None:
        return write_video(video_path, tee(), fps=fps)
    return sum(1 for _ in tee())
