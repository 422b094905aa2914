"""Cameras in the paper's (EG3D / PanoHead) convention.

* Intrinsics are *normalized*: ``K = [[f, 0, cx], [0, f, cy], [0, 0, 1]]`` with ``f = 4.2647`` and
  ``cx = cy = 0.5``, in units of the image side. That is a vertical FOV of 13.37 deg; EG3D's quoted 18.837 deg is
  the diagonal FOV of the same camera (their ``FOV_to_intrinsics`` divides by 1.414). Multiply the first two rows by the image size for pixels.
* Extrinsics are camera-to-world 4x4 matrices in OpenCV axes (x right, y down, z forward). ``world_to_camera``
  inverts them for renderers (gsplat's ``viewmats``).
* World space is the head model's space (FLAME convention: metres, y up, the face looks along +z). PanoHead puts
  its camera at radius 2.7 around a head of its own scale; we frame whole heads the same way with the camera
  ``DEFAULT_RADIUS`` = 1.35 m from the head centre (so 1 PanoHead unit = 0.5 m). The frontal camera then sees a
  ``DEFAULT_RADIUS / EG3D_FOCAL`` = 0.317 m wide square at the head: a whole head, chin to crown, fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EG3D_FOCAL = 4.2647
EG3D_VFOV = 13.373  # degrees, vertical FOV of EG3D_FOCAL
DEFAULT_RADIUS = 1.35
PANOHEAD_UNITS_PER_METRE = 2.7 / DEFAULT_RADIUS


def fov_to_focal(fov_deg: float) -> float:
    """Normalized focal length for a vertical field of view in degrees."""
    return 0.5 / math.tan(math.radians(fov_deg) / 2.0)


def focal_to_fov(focal: float) -> float:
    return math.degrees(2.0 * math.atan(0.5 / focal))


def normalized_intrinsics(focal: float = EG3D_FOCAL, batch: int = 1, device=None) -> torch.Tensor:
    """(B, 3, 3) normalized intrinsics."""
    K = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], device=device)
    return K.expand(batch, 3, 3).clone()


def to_pixel_intrinsics(K_norm: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(..., 3, 3) normalized intrinsics -> pixel intrinsics for a ``width x height`` image."""
    K = K_norm.clone()
    K[..., 0, :] = K[..., 0, :] * width
    K[..., 1, :] = K[..., 1, :] * height
    return K


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world (B, 4, 4) in OpenCV axes for cameras at ``eye`` (B, 3) looking at ``target`` (B, 3).

    ``up`` is the world up direction (default +y); the camera's y axis points *down*, i.e. along -up.
    """
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], device=eye.device, dtype=eye.dtype).expand_as(eye)
    z = torch.nn.functional.normalize(target - eye, dim=-1)
    x = torch.nn.functional.normalize(torch.cross(-up, z, dim=-1), dim=-1)
    # Degenerate when looking straight along up: pick any perpendicular x.
    bad = x.norm(dim=-1) < 1e-6
    if bad.any():
        x[bad] = torch.tensor([1.0, 0.0, 0.0], device=eye.device, dtype=eye.dtype)
    y = torch.cross(z, x, dim=-1)
    c2w = torch.eye(4, device=eye.device, dtype=eye.dtype).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = x, y, z, eye
    return c2w


def orbit_cameras(
    yaw_deg: torch.Tensor,
    pitch_deg: torch.Tensor,
    radius: float = DEFAULT_RADIUS,
    target: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """Camera-to-world (B, 4, 4) on a sphere around ``target``.

    yaw 0 / pitch 0 is the frontal camera on +z; positive yaw moves the camera towards +x (the subject's left),
    positive pitch moves it up (+y).
    """
    yaw = torch.deg2rad(yaw_deg.float())
    pitch = torch.deg2rad(pitch_deg.float())
    t = torch.tensor(target, dtype=torch.float32).expand(yaw.shape[0], 3)
    eye = t + radius * torch.stack(
        [torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), torch.cos(yaw) * torch.cos(pitch)], dim=-1
    )
    return look_at(eye, t)


def world_to_camera(c2w: torch.Tensor) -> torch.Tensor:
    """Invert rigid (B, 4, 4) camera-to-world matrices."""
    R = c2w[..., :3, :3]
    t = c2w[..., :3, 3:]
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = R.transpose(-1, -2)
    w2c[..., :3, 3:] = -R.transpose(-1, -2) @ t
    w2c[..., 3, 3] = 1.0
    return w2c


def project_points(points: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points (B, N, 3) with w2c (B, 4, 4) and intrinsics K (B, 3, 3).

    Returns (uv (B, N, 2) in K's units, depth (B, N)). With normalized K, uv is in [0, 1] across the image.
    """
    cam = points @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    z = cam[..., 2]
    uvw = cam @ K.transpose(1, 2)
    uv = uvw[..., :2] / z.clamp(min=1e-8)[..., None]
    return uv, z


@dataclass
class Camera:
    """A batch of cameras: normalized intrinsics (B, 3, 3) and camera-to-world (B, 4, 4)."""

    K: torch.Tensor
    c2w: torch.Tensor

    @property
    def w2c(self) -> torch.Tensor:
        return world_to_camera(self.c2w)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device) -> "Camera":
        return Camera(self.K.to(device), self.c2w.to(device))

    def __getitem__(self, idx) -> "Camera":
        return Camera(self.K[idx], self.c2w[idx])
