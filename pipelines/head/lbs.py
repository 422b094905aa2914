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


def joint_rotations(pose: torch.Tensor, joints: torch.Tensor, translation: torch.Tensor, neck_share: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local joint rotations (B, J, 3, 3) and the global translation (B, 3) of a pose, the head turn shared with the neck.

    Trackers give the whole head turn to the root (``pose[:, 0]``): the chest turns with the face. Real shoulders
    stay while the head turns, so with ``neck_share`` = s the root keeps (1 - s) of its axis-angle and the neck joint
    (joint 1, the root's child) takes the rest, ``R_neck' = R(s * root) R_neck``; the translation is corrected by
    ``(R_root - R_root') (J_neck - J_root)`` so that every vertex skinned to the neck and its children (the face, its
    landmarks) lands exactly where the rigid turn put it. Only the neck's blend into the chest moves.

    Args:
        pose: (B, J, 3) axis-angle per joint (root first, neck second).
        joints: (B, J, 3) rest joint locations.
        translation: (B, 3) global translation.
        neck_share: fraction of the root's turn carried by the neck, in [0, 1]; 0 leaves the pose as it is.
    """
    if neck_share == 0.0:
        return axis_angle_to_matrix(pose), translation
    root = pose[:, 0]
    rot = axis_angle_to_matrix(torch.cat([((1.0 - neck_share) * root)[:, None], pose[:, 1:],
                                          (neck_share * root)[:, None]], 1))  # (B, J + 1, 3, 3)
    R_root_rigid = axis_angle_to_matrix(root)
    neck = rot[:, -1] @ rot[:, 1]
    rot = torch.cat([rot[:, :1], neck[:, None], rot[:, 2:-1]], 1)
    lever = (joints[:, 1] - joints[:, 0])[..., None]  # (B, 3, 1)
    return rot, translation + ((R_root_rigid - rot[:, 0]) @ lever)[..., 0]


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
        pose: (B, J, 3) axis-angle per joint (root first), or (B, J, 3, 3) local rotation matrices.
        joints: (B, J, 3) rest joints J(beta).
        parents: (J,) kinematic tree.
        weights: (V, J) skinning weights.
        posedirs: (P, V*3) pose-corrective basis with P = (J-1)*9, or None.
    Returns:
        vertices (B, V, 3), posed joints (B, J, 3).
    """
    B, V, _ = v_shaped.shape
    rot = pose if pose.dim() == 4 else axis_angle_to_matrix(pose)  # (B, J, 3, 3)
    v_posed = v_shaped
    if posedirs is not None:
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(B, -1)
        v_posed = v_shaped + (pose_feature @ posedirs).reshape(B, V, 3)
    posed_joints, A = rigid_transforms(rot, joints, parents)
    T = torch.einsum("vj,bjkl->bvkl", weights, A)  # (B, V, 4, 4)
    verts = (T[..., :3, :3] @ v_posed[..., None])[..., 0] + T[..., :3, 3]
    return verts, posed_joints
