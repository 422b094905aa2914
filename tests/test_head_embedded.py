"""Tests for the embedded open head model and the MediaPipe landmark embedding."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from pipelines.head.base import REGIONS, HeadModel
from pipelines.head.embedded import (
    EXPRESSION_NAMES,
    JOINTS_REST,
    MOUTH_Y,
    NECK_BOTTOM_Y,
    REFERENCE_FACE_PATH,
    SHAPE_NAMES,
    EmbeddedHeadModel,
    build_embedded_head,
    load_reference_face,
)
from pipelines.head.landmarks import GROUPS, IRISES, MP_IBUG68, _project_front, align_reference
from pipelines.head.lbs import axis_angle_to_matrix

MIRROR = np.array([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def head() -> EmbeddedHeadModel:
    return EmbeddedHeadModel()


@pytest.fixture(scope="module")
def np_head(head):
    """Numpy views of the buffers."""
    return {k: v.detach().numpy() for k, v in head.named_buffers()}


def _posed(head: EmbeddedHeadModel, **values) -> torch.Tensor:
    p = head.zero_params(1)
    for name, v in values.items():
        getattr(p, name)[0, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return head(p)[0]


def _expression(head: EmbeddedHeadModel, name: str, value: float = 1.0) -> torch.Tensor:
    p = head.zero_params(1)
    p.expression[0, EXPRESSION_NAMES.index(name)] = value
    return head(p)[0]


def _edge_counts(faces: np.ndarray) -> tuple[Counter, Counter]:
    directed = Counter(map(tuple, np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).tolist()))
    undirected = Counter(tuple(sorted(e)) for e in directed.elements())
    return directed, undirected


# --- buffers -------------------------------------------------------------------------------------------------------


def test_buffers_have_the_interface_shapes_and_dtypes(head):
    V, F = head.num_vertices, head.faces.shape[0]
    assert isinstance(head, HeadModel)
    assert 5_000 <= V <= 12_000
    assert head.v_template.shape == (V, 3) and head.v_template.dtype == torch.float32
    assert head.faces.dtype == torch.long and head.faces.min() >= 0 and head.faces.max() < V
    assert head.uv_faces.shape == (F, 3) and head.uv_faces.dtype == torch.long
    assert head.uv_faces.max() < head.uv_coords.shape[0]
    assert head.shapedirs.shape == (V, 3, len(SHAPE_NAMES)) == (V, 3, 20)
    assert head.exprdirs.shape == (V, 3, len(EXPRESSION_NAMES)) == (V, 3, 24)
    assert head.posedirs.shape == (0, V * 3)
    assert head.J_regressor.shape == (5, V) and head.lbs_weights.shape == (V, 5)
    assert head.parents.tolist() == [-1, 0, 1, 1, 1]
    assert head.face_region.shape == (F,) and head.face_region.dtype == torch.long
    for name, buf in head.named_buffers():
        if buf.is_floating_point():
            assert torch.isfinite(buf).all(), name
    assert head.n_shape == 20 and head.n_expr == 24


def test_geometry_is_in_flame_frame_and_scale(head, np_head):
    v = np_head["v_template"][np_head["vertex_part"] == 0]
    above_neck = v[v[:, 1] > -0.125]
    width = np.ptp(above_neck[np.abs(above_neck[:, 1] - 0.03) < 0.02, 0])  # above the ears
    assert 0.15 < width < 0.17
    chin_y = min(y for (x, y) in [head.landmark_anchors()[152]])
    assert 0.21 < v[:, 1].max() - chin_y < 0.245  # chin to crown
    back_z = v[np.abs(v[:, 0]) < 0.01, 2].min()
    glabella_z = v[(np.abs(v[:, 0]) < 0.003) & (np.abs(v[:, 1] - 0.018) < 0.004), 2].max()
    assert 0.18 < glabella_z - back_z < 0.22
    assert torch.linalg.norm(head.head_center()) < 0.015
    # The nose tip is the most forward point, on the midline; the face looks along +z.
    tip = v[np.argmax(v[:, 2])]
    assert abs(tip[0]) < 1e-6 and -0.045 < tip[1] < -0.015
    # Neck reaches ~12 cm below the chin with an open rim at the bottom.
    assert math.isclose(v[:, 1].min(), NECK_BOTTOM_Y, abs_tol=1e-9)
    assert 0.11 < chin_y - NECK_BOTTOM_Y < 0.14


def test_eyeballs_are_spheres_at_the_eye_joints(np_head):
    for part, joint in ((2, 3), (3, 4)):
        ev = np_head["v_template"][np_head["vertex_part"] == part]
        r = np.linalg.norm(ev - JOINTS_REST[joint], axis=1)
        assert np.allclose(r, 0.012, atol=1e-6)
    # The left eyeball is on the subject's left (+x).
    assert np_head["v_template"][np_head["vertex_part"] == 2][:, 0].min() > 0


# --- topology and UV -----------------------------------------------------------------------------------------------


def test_mesh_is_closed_except_the_neck_rim_and_consistently_oriented(np_head):
    faces, part = np_head["faces"], np_head["vertex_part"]
    v = np_head["v_template"]
    skin = faces[part[faces[:, 0]] <= 1]  # head surface + mouth pocket
    directed, undirected = _edge_counts(skin)
    assert max(directed.values()) == 1  # every directed edge once: consistent winding, manifold
    boundary = [e for e, n in undirected.items() if n == 1]
    assert all(n <= 2 for n in undirected.values())
    # The only boundary is the open bottom of the neck.
    assert len(boundary) > 20
    assert np.allclose(v[np.array(boundary).ravel(), 1], NECK_BOTTOM_Y)
    n_v = len(np.unique(skin))
    assert n_v - len(undirected) + len(skin) == 1  # a disc: one boundary loop, no handles
    for eye in (2, 3):
        ef = faces[part[faces[:, 0]] == eye]
        d, u = _edge_counts(ef)
        assert max(d.values()) == 1 and set(u.values()) == {2}
        assert len(np.unique(ef)) - len(u) + len(ef) == 2  # a sphere
    # Outward winding: the face-normal of the nose tip triangle points forward.
    tip_face = skin[np.argmax(v[skin].mean(1)[:, 2])]
    a, b, c = v[tip_face]
    assert np.cross(b - a, c - a)[2] > 0


def test_uv_coordinates_are_in_the_unit_square_and_mirror_symmetric(np_head):
    uv, uvf, faces, v = np_head["uv_coords"], np_head["uv_faces"], np_head["faces"], np_head["v_template"]
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    # Every (vertex position, uv) corner has a mirrored partner (-x, y, z) with uv (1 - u, v).
    corners = np.unique(np.stack([faces.ravel(), uvf.ravel()], 1), axis=0)
    pts = np.concatenate([v[corners[:, 0]], uv[corners[:, 1]]], 1).astype(np.float64)
    mirrored = pts.copy()
    mirrored[:, 0] *= -1
    mirrored[:, 3] = 1.0 - mirrored[:, 3]
    dist, _ = cKDTree(pts).query(mirrored)
    assert dist.max() < 1e-4
    # The face midline maps to u = 0.5, the subject's left to u > 0.5.
    mid = corners[(np.abs(v[corners[:, 0], 0]) < 1e-7) & (v[corners[:, 0], 2] > 0.05)]
    assert np.allclose(uv[mid[:, 1], 0], 0.5, atol=1e-6)
    cv = v[corners[:, 0]]
    left = corners[(cv[:, 0] > 0.01) & (cv[:, 2] > 0.05) & (np_head["vertex_part"][corners[:, 0]] == 0)]
    assert (uv[left[:, 1], 0] > 0.5).all()


def test_uv_triangles_do_not_overlap(np_head):
    uv, uvf = np_head["uv_coords"].astype(np.float64), np_head["uv_faces"]
    tri = uv[uvf]
    area = 0.5 * ((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                  - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1]))
    assert (area > 0).all()  # no flipped or degenerate UV triangles
    # Rasterize onto a 1024^2 grid of sample points (offset off the grid lines) and count coverage.
    res = 1024
    offset = 0.5 + 1e-4 * math.sqrt(2)
    count = np.zeros((res, res), dtype=np.int32)
    lo = np.floor(tri.min(1) * res - offset).astype(int) + 1
    hi = np.floor(tri.max(1) * res - offset).astype(int)
    for t in np.nonzero((hi >= lo).all(1))[0]:
        xs = (np.arange(lo[t, 0], hi[t, 0] + 1) + offset) / res
        ys = (np.arange(lo[t, 1], hi[t, 1] + 1) + offset) / res
        X, Y = np.meshgrid(xs, ys)
        (x0, y0), (x1, y1), (x2, y2) = tri[t]
        e0 = (x1 - x0) * (Y - y0) - (y1 - y0) * (X - x0)
        e1 = (x2 - x1) * (Y - y1) - (y2 - y1) * (X - x1)
        e2 = (x0 - x2) * (Y - y2) - (y0 - y2) * (X - x2)
        inside = (e0 > 0) & (e1 > 0) & (e2 > 0)
        count[lo[t, 1]:hi[t, 1] + 1, lo[t, 0]:hi[t, 0] + 1] += inside
    assert count.max() == 1
    assert (count > 0).mean() > 0.85  # the layout uses most of the square
    assert math.isclose(area.sum(), (count > 0).mean(), abs_tol=0.01)


def test_face_gets_more_uv_area_per_surface_area_than_the_back(np_head):
    v, f, uv, uvf, reg = (np_head[k] for k in ("v_template", "faces", "uv_coords", "uv_faces", "face_region"))
    a3 = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    t = uv[uvf]
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    a2 = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1])
    centroid = v[f].mean(1)
    face, back = reg == REGIONS["face"], (reg == REGIONS["scalp"]) & (centroid[:, 2] < -0.05) & (centroid[:, 1] < 0.08)
    assert a2[face].sum() / a3[face].sum() > 2.0 * a2[back].sum() / a3[back].sum()


def test_regions_are_non_empty_and_sensible(np_head):
    reg, part, f, v = np_head["face_region"], np_head["vertex_part"], np_head["faces"], np_head["v_template"]
    for name, rid in REGIONS.items():
        if name != "teeth":  # the embedded head has none
            assert (reg == rid).sum() > 10, name
    fpart = part[f[:, 0]]
    assert ((reg == REGIONS["eyes"]) == (fpart >= 2)).all()
    assert (reg[fpart == 1] == REGIONS["mouth"]).all()
    c = v[f].mean(1)
    assert c[reg == REGIONS["scalp"], 1].mean() > 0.03
    assert c[reg == REGIONS["neck"], 1].max() < -0.07
    assert np.abs(c[reg == REGIONS["ears"], 0]).min() > 0.06
    assert (c[reg == REGIONS["face"], 2] > 0.0).all()


# --- rig -----------------------------------------------------------------------------------------------------------


def test_skinning_weights_are_a_partition_of_unity_and_eyes_are_rigid(np_head):
    w, part = np_head["lbs_weights"], np_head["vertex_part"]
    assert np.allclose(w.sum(1), 1.0, atol=1e-5) and w.min() >= 0.0
    assert np.allclose(w[part == 2], [0, 0, 0, 1, 0]) and np.allclose(w[part == 3], [0, 0, 0, 0, 1])
    v = np_head["v_template"]
    crown = np.argmax(v[:, 1])
    assert np.allclose(w[crown], [0, 1, 0, 0, 0], atol=1e-6)
    neck_bottom = np.argmin(v[:, 1])
    assert w[neck_bottom, 0] == pytest.approx(1.0)


def test_joint_regressor_reproduces_the_joints_and_follows_shape(head):
    joints = head.J_regressor @ head.v_template
    assert torch.allclose(joints, torch.tensor(JOINTS_REST, dtype=torch.float32), atol=1e-5)
    beta = torch.zeros(1, head.n_shape)
    beta[0, SHAPE_NAMES.index("eye_spacing")] = 2.0
    moved = head.J_regressor @ (head.v_template + torch.einsum("c,vdc->vd", beta[0], head.shapedirs))
    assert moved[3, 0] > joints[3, 0] + 1e-3 and moved[4, 0] < joints[4, 0] - 1e-3  # eyes move apart


def test_zero_params_give_the_template(head):
    assert torch.allclose(head(head.zero_params(2)), head.v_template.expand(2, -1, -1), atol=1e-6)


def test_root_rotation_rotates_every_vertex_rigidly(head):
    verts = _posed(head, rotation=[0.0, math.pi / 2, 0.0])
    root = head.J_regressor[0] @ head.v_template
    R = axis_angle_to_matrix(torch.tensor([0.0, math.pi / 2, 0.0]))
    expected = (head.v_template - root) @ R.T + root
    assert torch.allclose(verts, expected, atol=1e-5)
    # The face now looks along +x.
    tip = head.v_template[:, 2].argmax()
    assert verts[tip, 0] > 0.1


def test_opening_the_jaw_moves_chin_and_lower_lip_not_the_forehead(head, np_head):
    v0 = head.v_template
    verts = _posed(head, jaw=[0.25, 0.0, 0.0])
    d = (verts - v0).numpy()
    p = v0.numpy()
    lip_side = np_head["lip_side"]
    chin = np.argmin(np.abs(p[:, 1] + 0.095) + np.abs(p[:, 0]) + 10 * (p[:, 2] < 0.05))
    assert d[chin, 1] < -0.01 and d[chin, 2] < -0.002  # down and back
    forehead = (p[:, 1] > 0.04) & (np_head["vertex_part"] == 0)
    assert np.abs(d[forehead]).max() < 1e-7
    upper, lower = lip_side == 1, lip_side == -1
    assert np.abs(d[upper]).max() < 2e-4  # the upper lip follows the head...
    assert d[lower, 1].max() < 0.0  # ...the lower lip the jaw (fully in the middle, less towards the corners)
    centre = lower & (np.abs(p[:, 0]) < 0.01)
    assert d[centre, 1].max() < -0.01
    assert (np.abs(d[np_head["vertex_part"] >= 2]) < 1e-7).all()  # eyeballs stay


def test_mouth_pocket_closes_the_open_mouth(head, np_head):
    verts = _posed(head, jaw=[0.3, 0.0, 0.0]).double().numpy()
    faces, part = np_head["faces"], np_head["vertex_part"]
    skin = part[faces[:, 0]] <= 1
    lip_side = np_head["lip_side"]
    upper_y = verts[lip_side == 1, 1][np.argmin(np.abs(verts[lip_side == 1, 0]))]
    lower_y = verts[lip_side == -1, 1][np.argmin(np.abs(verts[lip_side == -1, 0]))]
    assert upper_y - lower_y > 0.015  # the mouth is open
    # Looking into the open mouth along -z we see the pocket, never the inside of the head.
    ys = np.linspace(lower_y + 0.002, upper_y - 0.002, 5)
    pts = np.stack([np.zeros_like(ys), ys], 1)
    pts = np.concatenate([pts, pts + [0.01, 0.0], pts - [0.01, 0.0]])
    f, _ = _project_front(pts, verts, faces[skin])
    hit_faces = faces[skin][f]
    assert (part[hit_faces] == 1).any(1).all()
    # The lips and the pocket stay connected: still one boundary loop (the neck).
    _, undirected = _edge_counts(faces[skin])
    boundary = np.array([e for e, n in undirected.items() if n == 1]).ravel()
    assert np.allclose(verts[boundary, 1], verts[boundary, 1].min(), atol=1e-3)


def test_eye_rotation_moves_only_the_eyeballs(head, np_head):
    verts = _posed(head, eyes=[0.0, 0.4, 0.0, 0.2, 0.0, 0.0])
    moved = (verts - head.v_template).norm(dim=1) > 1e-6
    part = np_head["vertex_part"]
    assert moved[torch.from_numpy(part == 2)].any() and moved[torch.from_numpy(part == 3)].any()
    assert not moved[torch.from_numpy(part <= 1)].any()
    # Rigid: distances to the eye centre are kept.
    c = JOINTS_REST[3]
    r = np.linalg.norm(verts.numpy()[part == 2] - c, axis=1)
    assert np.allclose(r, 0.012, atol=1e-6)


# --- blendshapes ---------------------------------------------------------------------------------------------------


def _width_above_ears(v: torch.Tensor) -> torch.Tensor:
    band = (v[..., 1] - 0.035).abs() < 0.015
    x = torch.where(band, v[..., 0], torch.zeros_like(v[..., 0]))
    return x.amax(-1) - x.amin(-1)


def test_shape_coefficients_in_range_give_plausible_heads(head):
    # Each coefficient alone at +-3 and random unit-variance combinations keep a plausible adult head.
    betas = torch.cat([3.0 * torch.eye(20), -3.0 * torch.eye(20),
                       torch.randn(8, 20, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)])
    v = head.canonical(betas)
    assert torch.isfinite(v).all()
    assert (v - head.v_template).norm(dim=-1).amax() < 0.03
    width = _width_above_ears(v)
    assert ((width > 0.135) & (width < 0.185)).all()
    height = v[..., 1].amax(1) - v[..., 1].amin(1)
    assert ((height > 0.33) & (height < 0.38)).all()
    # Each shape direction does something, with a comparable magnitude (~1-6 mm at its peak).
    peak = head.shapedirs.norm(dim=1).amax(0)
    assert (peak > 0.001).all() and (peak < 0.008).all()
    # All shape fields are mirror-symmetric, and no two are (nearly) the same direction.
    assert _is_mirror_symmetric(head, head.shapedirs).all()
    d = head.shapedirs.reshape(-1, 20)
    cos = (d.T @ d) / (d.norm(dim=0)[:, None] * d.norm(dim=0)[None])
    assert (cos - torch.eye(20)).abs().max() < 0.95


def _mirror_partner(head) -> np.ndarray:
    """Index of each vertex's mirror twin (the two copies of a lip-slit vertex are told apart by lip_side)."""
    v = head.v_template.double().numpy()
    side = head.lip_side.double().numpy()[:, None]
    key = np.concatenate([v, side], 1)
    mirrored = np.concatenate([v * MIRROR, side], 1)
    dist, partner = cKDTree(key).query(mirrored)
    assert dist.max() < 1e-6
    return partner


def _is_mirror_symmetric(head, dirs: torch.Tensor) -> torch.Tensor:
    partner = _mirror_partner(head)
    d = dirs.double().numpy()
    mirrored = d[partner] * MIRROR[None, :, None]
    return torch.from_numpy(np.abs(mirrored - d).max(axis=(0, 1)) < 1e-6)


def test_expressions_are_local_and_left_right_pairs_mirror(head, np_head):
    v = np_head["v_template"]
    part = np_head["vertex_part"]
    E = head.exprdirs.numpy()
    moved = np.linalg.norm(E, axis=1) > 1e-7  # (V, E)
    assert moved.any(0).all()
    assert not moved[part >= 2].any()  # eyeballs never move
    jaw_forward = EXPRESSION_NAMES.index("jaw_forward")  # moves the whole mandible, ramus included
    others = np.delete(moved, jaw_forward, axis=1)
    assert not others[v[:, 2] < 0.0].any()  # nothing on the back half of the head
    for name in EXPRESSION_NAMES:
        k = EXPRESSION_NAMES.index(name)
        pts = v[moved[:, k]]
        if name.endswith("_left"):
            assert pts[:, 0].min() > -0.01, name
        if name.endswith("_right"):
            assert pts[:, 0].max() < 0.01, name
        if name.startswith(("eye_close", "squint", "brow")):
            assert pts[:, 1].min() > -0.045, name  # upper face only
        if name.startswith(("mouth", "smile", "frown", "stretch", "pucker", "upper_lip", "lower_lip")):
            assert pts[:, 1].max() < -0.005, name  # lower face only
    # Left/right pairs are mirror images; symmetric ones are symmetric.
    partner = _mirror_partner(head)
    for k, name in enumerate(EXPRESSION_NAMES):
        if name.endswith("_left") and name.replace("_left", "_right") in EXPRESSION_NAMES:
            r = EXPRESSION_NAMES.index(name.replace("_left", "_right"))
            assert np.abs(E[partner, :, k] * MIRROR - E[:, :, r]).max() < 1e-6, name
    shift = EXPRESSION_NAMES.index("mouth_shift")  # antisymmetric: its mirror image is the opposite shift
    assert np.abs(E[partner, :, shift] * MIRROR + E[:, :, shift]).max() < 1e-6
    sym = [k for k, n in enumerate(EXPRESSION_NAMES) if not n.endswith(("_left", "_right")) and k != shift]
    symmetric = _is_mirror_symmetric(head, head.exprdirs).numpy()
    assert symmetric[sym].all()


def test_mouth_open_and_eye_close_do_what_they_say(head, np_head):
    lip_side = np_head["lip_side"]
    d = (_expression(head, "mouth_open") - head.v_template).numpy()
    assert d[lip_side == 1, 1].max() > 0.002 and d[lip_side == -1, 1].min() < -0.003
    # Closing the left eye covers its eyeball: the skin in front of the eye centre comes forward over the cornea.
    v = head.v_template.numpy()
    closed = _expression(head, "eye_close_left").numpy()
    c = JOINTS_REST[3]
    skin = (v[:, 2] > 0) & (np_head["vertex_part"] == 0)
    near = np.nonzero((np.hypot(v[:, 0] - c[0], v[:, 1] - c[1]) < 0.004) & skin)[0]
    assert v[near, 2].max() < c[2] + 0.012  # open: the skin there is behind the cornea
    assert closed[near, 2].min() > c[2] + 0.012  # closed: in front of it
    right_eye_skin = np.hypot(v[:, 0] + c[0], v[:, 1] - c[1]) < 0.02
    assert np.allclose(closed[right_eye_skin], v[right_eye_skin])


# --- landmarks -----------------------------------------------------------------------------------------------------


def test_reference_face_asset_is_frontal_and_symmetric():
    ref = load_reference_face()
    assert ref.shape == (478, 3) and np.isfinite(ref).all()
    mirror = np.load(REFERENCE_FACE_PATH.with_name("mediapipe_mirror_index.npy")).astype(np.int64)
    assert np.array_equal(mirror[mirror], np.arange(478))
    assert np.allclose(ref[mirror] * MIRROR, ref, atol=1e-6)
    assert np.linalg.norm(ref[473] - ref[468]) == pytest.approx(1.0, abs=1e-5)  # unit inter-pupillary distance
    assert ref[263, 0] > 0 > ref[33, 0]  # subject's left eye on +x
    assert ref[10, 1] > ref[1, 1] > ref[152, 1]  # forehead above nose above chin
    assert ref[1, 2] > ref[33, 2] and ref[1, 2] > ref[152, 2]  # nose tip towards the viewer


def test_landmark_embedding_puts_key_points_in_place(head, np_head):
    emb = head.landmarks
    assert emb.mp_index.tolist() == list(range(478))
    assert torch.allclose(emb.bary.sum(1), torch.ones(478)) and (emb.bary >= 0).all()
    lm = head.landmarks_3d(head.v_template[None])[0].numpy()
    v = np_head["v_template"][np_head["vertex_part"] == 0]
    tip = v[np.argmax(v[:, 2])]
    assert np.linalg.norm(lm[1] - tip) < 0.012 and abs(lm[1, 0]) < 1e-4
    # Mouth corners: left/right of the mouth centre, mirror-symmetric, at the lip line.
    r, l = lm[61], lm[291]
    assert r[0] < -0.02 and l[0] > 0.02
    assert abs(r[0] + l[0]) < 1e-3 and abs(r[1] - l[1]) < 1e-3
    assert abs(r[1] - MOUTH_Y) < 0.004 and abs(l[1] - MOUTH_Y) < 0.004
    # Eye corners at the designed canthi; irises on the eyeballs; the rest on the skin.
    anchors = head.landmark_anchors()
    for i in (33, 133, 362, 263):
        assert np.linalg.norm(lm[i, :2] - np.array(anchors[i])) < 0.003
    region = np_head["face_region"][emb.faces.numpy()]
    iris = np.isin(np.arange(478), IRISES)
    assert (region[iris] == REGIONS["eyes"]).all() and (region[~iris] != REGIONS["eyes"]).all()
    assert np.linalg.norm(lm[468] - JOINTS_REST[4]) == pytest.approx(0.012, abs=1e-3)
    assert np.linalg.norm(lm[473] - JOINTS_REST[3]) == pytest.approx(0.012, abs=1e-3)
    # Chin below the mouth below the nose below the eyes; the whole set faces the camera.
    assert lm[152, 1] < lm[17, 1] < lm[2, 1] < lm[4, 1] < lm[168, 1]
    assert (lm[:468, 2] > 0.0).all()


def test_landmark_sets_are_consistent():
    assert len(MP_IBUG68) == 68 and len(set(MP_IBUG68)) == 68
    ref = load_reference_face()
    jaw = ref[list(MP_IBUG68[:17])]
    # iBUG's jaw runs from the subject's right ear (x < 0) over the chin (point 8) to the left ear.
    assert (jaw[:8, 0] < 0).all() and (jaw[9:, 0] > 0).all() and jaw[8, 0] == pytest.approx(0.0, abs=1e-6)
    assert (np.diff(jaw[:9, 1]) < 0).all()
    assert ref[MP_IBUG68[36], 0] < ref[MP_IBUG68[45], 0]
    assert GROUPS["iris_left"][0] == 473 and GROUPS["iris_right"][0] == 468
    assert all(0 <= i < 478 for g in GROUPS.values() for i in g)


def test_alignment_maps_anchors_onto_the_head(head):
    ref = load_reference_face()
    anchors = head.landmark_anchors()
    aligned = align_reference(ref, anchors)
    err = [np.linalg.norm(aligned[i, :2] - np.array(a)) for i, a in anchors.items()]
    assert max(err) < 0.003


# --- differentiability, determinism, speed -------------------------------------------------------------------------


def test_gradients_flow_to_all_parameters(head):
    p = head.zero_params(2)
    gen = torch.Generator().manual_seed(1)
    for name, t in p.to_dict().items():
        t.copy_(0.1 * torch.randn(t.shape, generator=gen))
        t.requires_grad_(True)
    verts = head(p)
    weights = torch.randn(verts.shape, generator=gen)
    (verts * weights).sum().backward()
    for name, t in p.to_dict().items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    lm = head.landmarks_3d(head(p))
    assert lm.shape == (2, 478, 3)


def test_build_is_deterministic():
    first = build_embedded_head()
    build_embedded_head.cache_clear()
    second = build_embedded_head()
    for key, value in first.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, second[key]), key
