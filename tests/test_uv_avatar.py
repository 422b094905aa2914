"""UV space, Gaussian binding, avatar artifact and .ply export, on a small analytic head."""

import numpy as np
import pytest
import torch

from pipelines.avatar import Avatar, AvatarRig, load_avatar, save_avatar, template_maps
from pipelines.avatar.quaternion import matrix_to_quat, quat_multiply
from pipelines.avatar.ply import read_ply, write_ply
from pipelines.errors import InputError
from pipelines.head.lbs import axis_angle_to_matrix
from pipelines.uv.raster import rasterize_uv
from pipelines.uv.space import UVConfig, build_uv_space

from synthetic_head import SphereHead


@pytest.fixture(scope="module")
def head():
    return SphereHead()


@pytest.fixture(scope="module")
def uv(head):
    return build_uv_space(head, UVConfig(size=64, hair_grid_cols=128, hair_grid_rows=32))


def test_rasterize_uv_barycentrics_reproduce_texel_centres():
    vt = np.array([[0.1, 0.1], [0.9, 0.2], [0.4, 0.95]])
    fi, bary = rasterize_uv(vt, np.array([[0, 1, 2]]), 32)
    rows, cols = np.nonzero(fi == 0)
    assert 200 < len(rows) < 32 * 32  # a large triangle, but not the whole square
    uv = bary[rows, cols] @ vt
    np.testing.assert_allclose(uv[:, 0], (cols + 0.5) / 32, atol=1e-5)
    np.testing.assert_allclose(uv[:, 1], 1 - (rows + 0.5) / 32, atol=1e-5)
    assert (fi[0, 0] == -1) and (fi[31, 31] == -1)


def test_position_map_lies_on_the_sphere_and_is_mirror_symmetric(head, uv):
    p = uv.position_map(head.v_template[None], head.faces)[0]  # (3, K, K)
    valid = uv.valid
    r = p.norm(dim=0)[valid]
    # Points on a triangulated sphere lie between the inscribed and circumscribed radius.
    assert r.max() <= 0.1 + 1e-5 and r.min() > 0.09
    # Symmetric layout: flipping u mirrors x and keeps y, z.
    pf = uv.flip(p)
    both = valid & uv.flip(valid[None])[0]
    torch.testing.assert_close(pf[0][both], -p[0][both], atol=3e-3, rtol=0)
    torch.testing.assert_close(pf[1][both], p[1][both], atol=3e-3, rtol=0)


def test_sampling_set_dense_hair_and_vertices(head, uv):
    K = uv.size
    n_base = int((uv.valid & ~uv.region_mask("scalp")).sum())
    n_vt = head.uv_coords.shape[0]
    n_hair = uv.num_samples - n_base - n_vt
    assert n_hair > int(uv.region_mask("scalp").sum())  # the hair grid is denser than the base grid
    surf = uv.sample_surface(head.v_template[None], head.faces)[0]
    r = surf.norm(dim=-1)
    assert torch.all(r < 0.1 + 1e-5) and torch.all(r > 0.09)
    # Vertex samples sit exactly on their vertices.
    vt_surf = surf[-n_vt:]
    d = torch.cdist(vt_surf, head.v_template, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert d.max() < 1e-5
    # Hair samples are spaced more finely than base texels.
    sp = uv.sample_spacing
    assert sp[n_base : n_base + n_hair].max() < 1.0 / K


def test_scale_map_is_metres_per_texel(head, uv):
    s = uv.scale_map()[0]
    # Circumference 2*pi*r spans u in [0,1]: at the equator one texel covers about 2*pi*0.1/K metres.
    K = uv.size
    eq_row = K // 2
    val = s[eq_row, K // 2].item()
    lat_span = np.pi * 0.95 * 0.1  # metres spanned by v in [0,1]
    expect = np.sqrt((2 * np.pi * 0.1 / K) * (lat_span / K))
    assert val == pytest.approx(expect, rel=0.15)


def test_quaternion_helpers_agree_with_matrices():
    aa = torch.randn(50, 3)
    R = axis_angle_to_matrix(aa)
    q = matrix_to_quat(R)
    w, x, y, z = q.unbind(-1)
    R2 = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    torch.testing.assert_close(R2, R, atol=1e-5, rtol=0)
    q2 = matrix_to_quat(axis_angle_to_matrix(torch.randn(50, 3)))
    R12 = axis_angle_to_matrix(aa) @ axis_angle_to_matrix(torch.zeros(50, 3))
    torch.testing.assert_close(matrix_to_quat(R12), q, atol=1e-5, rtol=0)
    # quat_multiply(a, b) is the rotation R_a @ R_b.
    Rb = axis_angle_to_matrix(torch.randn(50, 3))
    qa, qb = q, matrix_to_quat(Rb)
    qab = quat_multiply(qa, qb)
    qab = qab * torch.sign(qab[:, :1])
    ref = matrix_to_quat(R @ Rb)
    torch.testing.assert_close(qab, ref * torch.sign(ref[:, :1]), atol=1e-5, rtol=0)
    del q2


def test_gaussians_follow_a_rigid_motion_of_the_mesh(head, uv):
    maps = template_maps(uv)
    maps[:, 11:14] = 0.004  # non-zero local offsets must rotate with the triangles
    maps[:, 3:7] = torch.nn.functional.normalize(torch.tensor([0.9, 0.3, -0.2, 0.1]), dim=0)[None, :, None, None]
    rig = AvatarRig(head, uv, maps, torch.zeros(head.n_shape))
    g0 = rig.pose(head.v_template[None])
    R = axis_angle_to_matrix(torch.tensor([[0.3, -1.1, 0.4]]))[0]
    t = torch.tensor([0.05, -0.02, 0.3])
    g1 = rig.pose((head.v_template @ R.T + t)[None])
    torch.testing.assert_close(g1.means[0], g0.means[0] @ R.T + t, atol=1e-5, rtol=0)
    torch.testing.assert_close(g1.scales, g0.scales, atol=1e-7, rtol=1e-4)
    # Rotations compose: R_new = R @ R_old.
    qR = matrix_to_quat(R[None])[0]
    q_expect = quat_multiply(qR.expand_as(g0.quats[0]), g0.quats[0])
    sign = torch.sign((q_expect * g1.quats[0]).sum(-1, keepdim=True))
    torch.testing.assert_close(g1.quats[0], q_expect * sign, atol=1e-4, rtol=0)
    # Offsets actually moved the Gaussians off the surface along the local frame.
    surf = uv.sample_surface(head.v_template[None], head.faces)[0]
    assert (g0.means[0] - surf).norm(dim=-1).mean() > 0.005


def test_gaussians_scale_with_their_triangles(head, uv):
    rig = AvatarRig(head, uv, template_maps(uv), torch.zeros(head.n_shape))
    g0 = rig.pose(head.v_template[None])
    g2 = rig.pose(2.0 * head.v_template[None])
    torch.testing.assert_close(g2.scales, 2.0 * g0.scales, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g2.means, 2.0 * g0.means, rtol=1e-4, atol=1e-6)


def test_jaw_rotation_moves_only_jaw_gaussians(head, uv):
    rig = AvatarRig(head, uv, template_maps(uv), torch.zeros(head.n_shape))
    p = head.zero_params(1)
    g0 = rig.pose_params(p)
    p.jaw = torch.tensor([[0.3, 0.0, 0.0]])
    g1 = rig.pose_params(p)
    moved = (g1.means - g0.means).norm(dim=-1)[0] > 1e-6
    low = g0.means[0, :, 1] < -0.04
    assert moved.any() and not moved[g0.means[0, :, 1] > 0.0].any()
    assert moved[low].float().mean() > 0.5


def _avatar(head, uv):
    maps = template_maps(uv)[0].numpy()
    params = {k: v.numpy() for k, v in head.zero_params(1).to_dict().items()}
    return Avatar(maps, np.zeros((3, uv.size, uv.size), np.float32), np.zeros(head.n_shape, np.float32), params,
                  np.eye(3, dtype=np.float32), np.eye(4, dtype=np.float32),
                  {"kind": "sphere", "name": "sphere", "digest": uv.digest}, {"method": "template"})


def test_avatar_roundtrip_and_corruption_errors(tmp_path, head, uv):
    av = _avatar(head, uv)
    path = tmp_path / "a b ü.npz"
    save_avatar(path, av)
    back = load_avatar(path)
    np.testing.assert_allclose(back.maps, av.maps, atol=1e-3)
    assert back.head_model == av.head_model and back.meta["method"] == "template"
    assert set(back.source_params) == set(av.source_params)
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(InputError, match="corrupt.npz"):
        load_avatar(bad)
    with pytest.raises(InputError, match="not found"):
        load_avatar(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(InputError, match="not an fhavatar avatar"):
        load_avatar(other)


def test_ply_export_roundtrip(tmp_path, head, uv):
    rig = AvatarRig(head, uv, template_maps(uv), torch.zeros(head.n_shape))
    g = rig.pose(head.v_template[None])
    write_ply(tmp_path / "a.ply", g)
    d = read_ply(tmp_path / "a.ply")
    assert len(d["x"]) == len(g)
    np.testing.assert_allclose(np.stack([d["x"], d["y"], d["z"]], -1), g.means[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-d["opacity"])), g.opacities[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.exp(d["scale_0"]), g.scales[0, :, 0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(d["f_dc_0"] * 0.28209479177387814 + 0.5, g.colors[0, :, 0].numpy(), atol=1e-5)


def test_fused_pose_kernel_matches_the_pytorch_path(head, uv, monkeypatch):
    """The Triton kernel of ``AvatarRig.pose`` (CUDA inference path), run on the CPU by Triton's interpreter, gives
    the PyTorch path's Gaussians on a deformed, rotated mesh, for one avatar and for one avatar per frame."""
    pytest.importorskip("triton")
    from pipelines.avatar import pose_kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(3)
    maps = template_maps(uv).repeat(2, 1, 1, 1)
    maps[:, 3:7] += 0.5 * torch.randn(maps[:, 3:7].shape, generator=g)  # arbitrary local rotations ...
    maps[:, 11:14] = 0.01 * torch.randn(maps[:, 11:14].shape, generator=g)  # ... and offsets off the surface
    R = axis_angle_to_matrix(torch.tensor([[0.3, -1.1, 0.4], [-2.0, 0.5, 2.9]]))
    verts = head.v_template[None] @ R.transpose(1, 2) * torch.tensor([[[1.0]], [[1.3]]])
    verts = verts + 0.01 * torch.randn(verts.shape, generator=g)  # non-rigid: every triangle its own frame
    for rig in (AvatarRig(head, uv, maps[:1], torch.zeros(head.n_shape)),
                AvatarRig(head, uv, maps, torch.zeros(2, head.n_shape))):
        with torch.no_grad():
            assert rig._use_fused(verts)
            fused = rig.pose(verts)
            rig.fused = False
            ref = rig.pose(verts)
        for k in ("means", "quats", "scales"):
            torch.testing.assert_close(getattr(fused, k), getattr(ref, k), atol=2e-6, rtol=1e-5)
        assert fused.means.shape == (2, rig.num_gaussians, 3)
        assert (fused.means[0] - fused.means[1]).abs().max() > 0.05  # the two frames really differ
    # Training needs gradients: with them enabled and the maps differentiable, the PyTorch path is taken.
    rig = AvatarRig(head, uv, maps[:1].clone().requires_grad_(True), torch.zeros(head.n_shape))
    assert not rig._use_fused(verts)
    rig.pose(verts).means.sum().backward()
    assert pose_kernel.fused_pose_available(torch.device("cpu"))
