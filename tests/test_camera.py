"""Camera convention: OpenCV axes, frontal camera on +z, orbit directions, projection."""


import torch

from pipelines.core.camera import (
    DEFAULT_RADIUS, EG3D_FOCAL, focal_to_fov, fov_to_focal, look_at, normalized_intrinsics, orbit_cameras, project_points,
    world_to_camera,
)


def test_frontal_camera_axes_and_projection():
    c2w = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), radius=1.0)
    R = c2w[0, :3, :3]
    # Camera on +z looking at the origin: forward -z, image right = world +x (the subject's left), image down = -y.
    torch.testing.assert_close(R[:, 2], torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(R[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(R[:, 1], torch.tensor([0.0, -1.0, 0.0]))
    assert torch.det(R) > 0.999
    K = normalized_intrinsics()
    pts = torch.tensor([[[0.0, 0.0, 0.0], [0.05, 0.0, 0.0], [0.0, 0.05, 0.0]]])
    uv, z = project_points(pts, world_to_camera(c2w), K)
    torch.testing.assert_close(uv[0, 0], torch.tensor([0.5, 0.5]))
    assert uv[0, 1, 0] > 0.5 and abs(uv[0, 1, 1] - 0.5) < 1e-6  # +x appears right of centre
    assert uv[0, 2, 1] < 0.5  # +y (up) appears above centre (smaller row)
    torch.testing.assert_close(uv[0, 1, 0], torch.tensor(0.5 + EG3D_FOCAL * 0.05))
    torch.testing.assert_close(z[0], torch.ones(3))


def test_orbit_yaw_moves_camera_towards_plus_x_and_fov_roundtrip():
    c2w = orbit_cameras(torch.tensor([90.0, 180.0]), torch.tensor([0.0, 30.0]), radius=2.0)
    torch.testing.assert_close(c2w[0, :3, 3], torch.tensor([2.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert c2w[1, 2, 3] < 0 and c2w[1, 1, 3] > 0.99  # behind the head and above it
    # EG3D quotes 18.837 deg: the *diagonal* FOV of this camera (their 1.414 factor); ours is vertical.
    assert abs(focal_to_fov(EG3D_FOCAL) - 13.373) < 1e-2
    assert abs(fov_to_focal(focal_to_fov(3.0)) - 3.0) < 1e-9
    w2c = world_to_camera(c2w)
    torch.testing.assert_close(w2c @ c2w, torch.eye(4).expand(2, 4, 4), atol=1e-5, rtol=0)
    eye = torch.tensor([[0.0, 0.0, DEFAULT_RADIUS]])
    torch.testing.assert_close(look_at(eye, torch.zeros(1, 3)), orbit_cameras(torch.zeros(1), torch.zeros(1)))
