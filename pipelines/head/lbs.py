"""Blendshapes and linear blend skinning, as in FLAME (paper eq. 11-12).

Written from the equations (no SMPL/FLAME code copied). All functions are batched and differentiable.
"""

from __future__ import annotations

import torch


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues: axis-angle (..., 3) -> rotation matrices (..., 3, 3). Safe (finite gradients) at zero."""
    theta2 = (aa * aa).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-16)
    k = aa / theta
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    Kmat = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], dim=-1).reshape(*aa.shape[:-1], 3, 3)
    s = torch.sin(theta)[..., None]
    c = torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(Kmat.shape)
    return eye + s * Kmat + (1.0 - c) * (Kmat @ Kmat)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> axis-angle (..., 3) (angles in [0, pi))."""
    cos = ((R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1.0) / 2.0).clamp(-1 + 1e-7, 1 - 1e-7)
    angle = torch.acos(cos)
    axis = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = torch.sin(angle)[..., None]
    small = sin.abs() < 1e-6
    axis = torch.where(small, axis * 0.5, axis / (2.0 * sin.clamp(min=1e-6)) * angle[..., None])
    return axis


def blend_shapes(coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """coeffs (B, C) x dirs (V, 3, C) -> offsets (B, V, 3)."""
    return torch.einsum("bc,vdc->bvd", coeffs, dirs)


def rigid_transforms(rot: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kinematics.

    Args:
        rot: (B, J, 3, 3) local joint rotations.
        joints: (B, J, 3) rest joint locations.
        parents: (J,) parent index per joint, -1 for the root (joints are topologically sorted).
    Returns:
        posed_joints (B, J, 3), relative transforms A (B, J, 4, 4) that map rest-pose points to posed points.
    """
    B, J = joints.shape[:2]
    rel = joints.clone()
    rel[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.zeros(B, J, 4, 4, dtype=rot.dtype, device=rot.device)
    local[..., :3, :3] = rot
    local[..., :3, 3] = rel
    local[..., 3, 3] = 1.0
    chain = [local[:, 0]]
    for j in range(1, J):
        chain.append(chain[int(parents[j])] @ local[:, j])
    world = torch.stack(chain, dim=1)
    posed_joints = world[..., :3, 3]
    # Remove the rest-pose joint location so A maps rest points (not joint-relative points).
    rest = torch.cat([joints, torch.zeros_like(joints[..., :1])], dim=-1)[..., None]  # (B, J, 4, 1)
    A = world.clone()
    A[..., :3, 3] = world[..., :3, 3] - (world @ rest)[..., :3, 0]
    return posed_joints, A


def lbs(
    v_shaped: torch.Tensor,
    pose: torch.Tensor,
    joints: torch.Tensor,
    parents: torch.Tensor,
    weights: torch.Tensor,
    posedirs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear blend skinning with pose-corrective blendshapes (FLAME eq. 11-12).

    Args:
        v_shaped: (B, V, 3) template + shape + expression offsets.
        pose: (B, J, 3) axis-angle per joint (root first).
        joints: (B, J, 3) rest joints J(beta).
        parents: (J,) kinematic tree.
        weights: (V, J) skinning weights.
        posedirs: (P, V*3) pose-corrective basis with P = (J-1)*9, or None.
    Returns:
        vertices (B, V, 3), posed joints (B, J, 3).
    """
    B, V, _ = v_shaped.shape
    rot = axis_angle_to_matrix(pose)  # (B, J, 3, 3)
    v_posed = v_shaped
    if posedirs is not None:
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(B, -1)
        v_posed = v_shaped + (pose_feature @ posedirs).reshape(B, V, 3)
    posed_joints, A = rigid_transforms(rot, joints, parents)
    T = torch.einsum("vj,bjkl->bvkl", weights, A)  # (B, V, 4, 4)
    verts = (T[..., :3, :3] @ v_posed[..., None])[..., 0] + T[..., :3, 3]
    return verts, posed_joints
