"""Visual check of a tracking: the posed mesh and landmarks drawn over the frames."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core.camera import project_points, world_to_camera
from ..errors import ConfigError
from ..head.base import HeadModel
from .result import TrackingResult

MESH_COLOR = np.array([90, 170, 255], dtype=np.float32)  # RGB
OBSERVED_COLOR = (40, 230, 40)
MODEL_COLOR = (255, 40, 40)


def _draw_mesh(img: np.ndarray, px: np.ndarray, cam: torch.Tensor, faces: torch.Tensor, style: str, alpha: float):
    """Front-facing triangles of one frame: px (V, 2) pixels, cam (V, 3) camera-space vertices."""
    import cv2

    tri_cam = cam[faces]  # (F, 3, 3)
    normal = torch.cross(tri_cam[:, 1] - tri_cam[:, 0], tri_cam[:, 2] - tri_cam[:, 0], dim=-1)
    centre = tri_cam.mean(1)
    facing = -(normal * centre).sum(-1) / (normal.norm(dim=-1) * centre.norm(dim=-1)).clamp(min=1e-12)
    front = (facing > 0) & (tri_cam[..., 2].min(1).values > 0)
    ids = torch.nonzero(front)[:, 0]
    ids = ids[torch.argsort(centre[ids, 2], descending=True)]  # painter's order: far first
    tris = np.round(px[faces[ids].numpy()] * 16).astype(np.int32)  # 4 fractional bits
    layer = img.copy()
    if style == "shaded":
        # Lambert with a light above-left of the camera (camera axes: y down, z forward), so relief shows.
        light = torch.nn.functional.normalize(torch.tensor([-0.5, -0.7, -1.0]), dim=0)
        n = torch.nn.functional.normalize(normal[ids], dim=-1)
        shade = (0.15 + 0.85 * (n @ light).clamp(0, 1)).numpy()
        for tri, s in zip(tris, shade):
            cv2.fillConvexPoly(layer, tri, tuple(float(c) for c in MESH_COLOR * s), cv2.LINE_AA, shift=4)
    else:
        cv2.polylines(layer, list(tris), True, tuple(float(c) for c in MESH_COLOR), 1, cv2.LINE_AA, shift=4)
    return cv2.addWeighted(layer, alpha, img, 1.0 - alpha, 0.0)


def tracking_overlay(
    frames: np.ndarray | list[np.ndarray],
    head: HeadModel,
    result: TrackingResult,
    style: str = "shaded",
    draw_landmarks: bool = True,
    alpha: float = 0.45,
    batch: int = 32,
) -> np.ndarray:
    """Draw the tracked mesh and the landmarks over ``frames`` for a visual check.

    Args:
        frames: (T, H, W, 3) uint8 RGB, the crops the landmarks were measured on (any size: coordinates are
            rescaled from ``result.image_size``).
        head: the head model that was tracked.
        result: the tracking of these frames.
        style: "shaded" (flat-shaded translucent surface) or "wireframe" (triangle edges, ``cv2.polylines``);
            "none" draws landmarks only.
        alpha: opacity of the mesh layer.
    Returns:
        (T, H, W, 3) uint8 images; observed landmarks green, the model's landmarks red (only those that have an
        observation in that frame, e.g. 68 of them for a 68-point source).
    """
    import cv2

    if style not in ("shaded", "wireframe", "none"):
        raise ConfigError(f"overlay style '{style}' is unknown", "use shaded, wireframe or none")
    frames = np.asarray(frames)
    T = min(len(frames), result.num_frames)
    H, W = frames.shape[1:3]
    scale = torch.tensor([W, H], dtype=torch.float32)
    K = torch.as_tensor(result.K, dtype=torch.float32)
    faces = head.faces.cpu()
    out = frames[:T].copy()
    mp_index = head.landmarks.mp_index.cpu().numpy() if head.landmarks is not None else None
    for start in range(0, T, batch):
        idx = np.arange(start, min(start + batch, T))
        with torch.no_grad():
            verts = head(result.select(idx).head_params(device=head.v_template.device)).float().cpu()
        w2c = world_to_camera(torch.as_tensor(result.c2w[idx], dtype=torch.float32))
        Ks = K.expand(len(idx), 3, 3)
        uv, _ = project_points(verts, w2c, Ks)
        px = (uv * scale).numpy()
        cam = verts @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
        model_px = None
        if head.landmarks is not None:
            with torch.no_grad():
                luv, _ = project_points(head.landmarks_3d(verts), w2c, Ks)
            model_px = (luv * scale).numpy()
        for b, t in enumerate(idx):
            img = np.ascontiguousarray(out[t])
            if style != "none":
                img = _draw_mesh(img, px[b], cam[b], faces, style, alpha)
            if draw_landmarks:
                shown = None  # model landmarks to draw: those with an observation (a 68-point source has 68)
                radius = 1
                if result.landmarks is not None:
                    obs = result.landmarks[t] * np.array([W, H]) / result.image_size
                    present = np.isfinite(obs).all(-1)
                    radius = 1 if present.sum() > 100 else 2
                    for x, y in obs[present]:
                        cv2.circle(img, (int(round(x)), int(round(y))), radius, OBSERVED_COLOR, -1, cv2.LINE_AA)
                    if present.any() and mp_index is not None:
                        shown = np.zeros(len(mp_index), bool)
                        inside = mp_index < len(present)
                        shown[inside] = present[mp_index[inside]]
                if model_px is not None:
                    for x, y in model_px[b] if shown is None else model_px[b][shown]:
                        cv2.circle(img, (int(round(x)), int(round(y))), radius, MODEL_COLOR, -1, cv2.LINE_AA)
            out[t] = img
    return out


def write_tracking_overlay(stage_dir: str | Path, head: HeadModel, style: str = "shaded", fps: float = 25.0,
                           chunk: int = 32) -> Path:
    """Draw the tracking of a preprocessed item over its frames: ``overlay.mp4`` for a video, ``overlay.png`` for a
    single image, next to ``tracking.npz``. Frames are read ``chunk`` at a time (bounded memory); written atomically.
    """
    from ..preprocess.stage import read_frame
    from ..video import write_png, write_video
    from .result import load_tracking

    stage = Path(stage_dir)
    result = load_tracking(stage / "tracking.npz")
    T = result.num_frames

    def frames() -> Iterator[np.ndarray]:
        for start in range(0, T, chunk):
            idx = np.arange(start, min(start + chunk, T))
            imgs = np.stack([read_frame(stage, t) for t in idx])
            sub = result.select(idx)
            yield from tracking_overlay(imgs, head, sub, style=style)

    if T == 1:
        path = stage / "overlay.png"
        write_png(path, next(frames()))
    else:
        path = stage / "overlay.mp4"
        write_video(path, frames(), fps=fps)
    return path
