"""One fused Triton kernel for the per-frame "triangle frame -> Gaussian" step of :meth:`AvatarRig.pose`.

The PyTorch path builds a per-face table (frame, quaternion, size, corners), gathers it per Gaussian and applies
3x3 / 4x4 products as multiply-and-sum: about 40 kernels and ~1 ms of device time for 8 frames of 80K Gaussians on
an H200 (bench/profile_pose.py), as long as the render it should hide behind. Here one program per block of
Gaussians and frame reads its triangle's three corners, rebuilds the frame (the same formulas as
``binding.triangle_frames`` and ``quaternion.matrix_to_quat``) and writes means, quaternions and scales: the step is
bound by reading the corners and writing 10 floats a Gaussian.

Inference only (no backward): ``AvatarRig.pose`` uses it on CUDA when nothing needs gradients and Triton imports.
The kernel also runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests
check it against the PyTorch path without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK = 256  # Gaussians per program


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel, built on first use (``triton.jit`` reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def pose_kernel(verts, faces, face_of, bary, size_can, offset, quat, scale, means_out, quats_out, scales_out,
                    G, V, rig_batched, BLOCK: tl.constexpr):
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        b = tl.program_id(1)
        m = g < G
        f = tl.load(face_of + g, mask=m, other=0)
        vb = verts + b * V * 3
        i0 = tl.load(faces + f * 3 + 0, mask=m, other=0) * 3
        i1 = tl.load(faces + f * 3 + 1, mask=m, other=0) * 3
        i2 = tl.load(faces + f * 3 + 2, mask=m, other=0) * 3
        p0x = tl.load(vb + i0, mask=m, other=0.0)
        p0y = tl.load(vb + i0 + 1, mask=m, other=0.0)
        p0z = tl.load(vb + i0 + 2, mask=m, other=0.0)
        p1x = tl.load(vb + i1, mask=m, other=0.0)
        p1y = tl.load(vb + i1 + 1, mask=m, other=0.0)
        p1z = tl.load(vb + i1 + 2, mask=m, other=0.0)
        p2x = tl.load(vb + i2, mask=m, other=0.0)
        p2y = tl.load(vb + i2 + 1, mask=m, other=0.0)
        p2z = tl.load(vb + i2 + 2, mask=m, other=0.0)
        # Frame: tangent t = e1 / |e1|, normal n = e1 x e2 / |e1 x e2|, bitangent = n x t; size = sqrt(|e1 x e2|).
        e1x = p1x - p0x
        e1y = p1y - p0y
        e1z = p1z - p0z
        e2x = p2x - p0x
        e2y = p2y - p0y
        e2z = p2z - p0z
        nx = e1y * e2z - e1z * e2y
        ny = e1z * e2x - e1x * e2z
        nz = e1x * e2y - e1y * e2x
        nn = tl.sqrt(nx * nx + ny * ny + nz * nz)
        size = tl.sqrt(tl.maximum(nn, 1e-12))
        nn = tl.maximum(nn, 1e-12)
        nx = nx / nn
        ny = ny / nn
        nz = nz / nn
        te = tl.maximum(tl.sqrt(e1x * e1x + e1y * e1y + e1z * e1z), 1e-12)
        tx = e1x / te
        ty = e1y / te
        tz = e1z / te
        bx = ny * tz - nz * ty
        by = nz * tx - nx * tz
        bz = nx * ty - ny * tx
        # R's columns are (t, b, n): m00 = tx, m01 = bx, m02 = nx, m10 = ty, ... (matrix_to_quat's Shepperd
        # candidates; the one with the largest diagonal term wins, the first on ties as torch.argmax).
        d0 = 1.0 + tx + by + nz
        d1 = 1.0 + tx - by - nz
        d2 = 1.0 - tx + by - nz
        d3 = 1.0 - tx - by + nz
        qw = d0
        qx = bz - ny
        qy = nx - tz
        qz = ty - bx
        best = d0
        c = d1 > best
        qw = tl.where(c, bz - ny, qw)
        qx = tl.where(c, d1, qx)
        qy = tl.where(c, ty + bx, qy)
        qz = tl.where(c, nx + tz, qz)
        best = tl.where(c, d1, best)
        c = d2 > best
        qw = tl.where(c, nx - tz, qw)
        qx = tl.where(c, ty + bx, qx)
        qy = tl.where(c, d2, qy)
        qz = tl.where(c, bz + ny, qz)
        best = tl.where(c, d2, best)
        c = d3 > best
        qw = tl.where(c, ty - bx, qw)
        qx = tl.where(c, tz + nx, qx)
        qy = tl.where(c, ny + bz, qy)
        qz = tl.where(c, d3, qz)
        qn = tl.maximum(tl.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), 1e-12)
        qn = tl.where(qw < 0, -qn, qn)
        qw = qw / qn
        qx = qx / qn
        qy = qy / qn
        qz = qz / qn
        # The Gaussian on its triangle: barycentric point + growth * R @ local offset; q_face (x) local rotation.
        rg = b * rig_batched * G + g  # the rig's own Gaussian (its batch is 1 or the frames')
        k = size / tl.load(size_can + rg, mask=m, other=1.0)
        w0 = tl.load(bary + g * 3, mask=m, other=0.0)
        w1 = tl.load(bary + g * 3 + 1, mask=m, other=0.0)
        w2 = tl.load(bary + g * 3 + 2, mask=m, other=0.0)
        o = offset + rg * 3
        ox = tl.load(o, mask=m, other=0.0)
        oy = tl.load(o + 1, mask=m, other=0.0)
        oz = tl.load(o + 2, mask=m, other=0.0)
        out = means_out + (b * G + g) * 3
        tl.store(out, w0 * p0x + w1 * p1x + w2 * p2x + k * (tx * ox + bx * oy + nx * oz), mask=m)
        tl.store(out + 1, w0 * p0y + w1 * p1y + w2 * p2y + k * (ty * ox + by * oy + ny * oz), mask=m)
        tl.store(out + 2, w0 * p0z + w1 * p1z + w2 * p2z + k * (tz * ox + bz * oy + nz * oz), mask=m)
        lq = quat + rg * 4
        lw = tl.load(lq, mask=m, other=1.0)
        lx = tl.load(lq + 1, mask=m, other=0.0)
        ly = tl.load(lq + 2, mask=m, other=0.0)
        lz = tl.load(lq + 3, mask=m, other=0.0)
        qo = quats_out + (b * G + g) * 4
        tl.store(qo, qw * lw - qx * lx - qy * ly - qz * lz, mask=m)
        tl.store(qo + 1, qw * lx + qx * lw + qy * lz - qz * ly, mask=m)
        tl.store(qo + 2, qw * ly - qx * lz + qy * lw + qz * lx, mask=m)
        tl.store(qo + 3, qw * lz + qx * ly - qy * lx + qz * lw, mask=m)
        s = scale + rg * 3
        so = scales_out + (b * G + g) * 3
        tl.store(so, tl.load(s, mask=m, other=0.0) * k, mask=m)
        tl.store(so + 1, tl.load(s + 1, mask=m, other=0.0) * k, mask=m)
        tl.store(so + 2, tl.load(s + 2, mask=m, other=0.0) * k, mask=m)

    return pose_kernel


def fused_pose_available(device: torch.device) -> bool:
    """Whether :func:`pose_gaussians` can run on ``device``: CUDA with Triton importable, or Triton's interpreter."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pose_gaussians(verts: torch.Tensor, faces: torch.Tensor, face_of: torch.Tensor, bary: torch.Tensor,
                   size_can: torch.Tensor, offset_local: torch.Tensor, quat_local: torch.Tensor,
                   scale_base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means (B, G, 3), quaternions (B, G, 4) w,x,y,z and scales (B, G, 3) of Gaussians on posed meshes.

    Args:
        verts: (B, V, 3) posed vertices; faces: (F, 3) int32 vertex indices; face_of: (G,) int32 each Gaussian's
            face; bary: (G, 3) its barycentrics;
        size_can, offset_local, quat_local, scale_base: the rig's (R, G), (R, G, 3), (R, G, 4) (unit), (R, G, 3)
            with R = 1 (one avatar for every frame) or R = B; float32, contiguous.
    Same maths as ``AvatarRig.pose``'s PyTorch path, to float32 rounding.
    """
    B, V, _ = verts.shape
    G = face_of.shape[0]
    R = offset_local.shape[0]
    if R not in (1, B):
        raise ValueError(f"the rig holds {R} avatars; pose 1 or {R} frames a call, got {B}")
    means = torch.empty(B, G, 3, device=verts.device, dtype=verts.dtype)
    quats = torch.empty(B, G, 4, device=verts.device, dtype=verts.dtype)
    scales = torch.empty(B, G, 3, device=verts.device, dtype=verts.dtype)
    grid = ((G + BLOCK - 1) // BLOCK, B)
    _kernel(os.environ.get("TRITON_INTERPRET") == "1")[grid](
        verts.contiguous(), faces, face_of, bary, size_can, offset_local, quat_local, scale_base,
        means, quats, scales, G, V, int(R == B and B > 1), BLOCK=BLOCK)
    return means, quats, scales
