"""Tests for the ICT-FaceKit head model: asset checks, symmetric UV atlas, rig (jaw, eyes, neck), landmarks, teeth."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import torch

from pipelines.avatar.binding import AvatarRig
from pipelines.avatar.maps import ATTRIBUTE_SLICES, template_maps
from pipelines.errors import WeightsError
from pipelines.head.base import REGIONS
from pipelines.head.ict import IctHeadModel, load_asset
from pipelines.head.ict.asset import default_asset_path
from pipelines.head.lbs import axis_angle_to_matrix
from pipelines.head.registry import load_head_model
from pipelines.uv.space import UVConfig, build_uv_space

MIRROR = np.array([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def head() -> IctHeadModel:
    return IctHeadModel()


@pytest.fixture(scope="module")
def uv(head):
    return build_uv_space(head, UVConfig(size=128))


@pytest.fixture(scope="module")
def uv256(head):
    return build_uv_space(head, UVConfig(size=256))


def _posed(head: IctHeadModel, **values) -> torch.Tensor:
    p = head.zero_params(1)
    for name, v in values.items():
        if name in head.expression_names:
            p.expression[0, head.expression_names.index(name)] = float(v)
        else:
            getattr(p, name)[0, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return head(p)[0]


# ------------------------------------------------------------------------------------------------------- asset
def test_shipped_asset_is_small_and_complete():
    path = default_asset_path()
    assert path.stat().st_size < 15e6
    a = load_asset()
    assert a.identity.shape == (100, a.neutral.shape[0], 3) and a.expression.shape[0] == 53
    assert "jawOpen" in a.expression_names and a.source["licence"].startswith("MIT")
    assert (path.parent / "LICENSE").read_text().startswith("MIT License")
    # One identity component is one standard deviation: RMS over vertices of a few millimetres, not metres.
    rms = np.sqrt((a.identity[0] ** 2).sum(-1).mean())
    assert 5e-4 < rms < 1e-2


@pytest.mark.parametrize("damage", ["truncated", "not_npz", "missing_key", "bad_index"])
def test_loader_refuses_a_damaged_asset_with_one_line(tmp_path, damage):
    src = default_asset_path()
    bad = tmp_path / "ict_head.npz"
    if damage == "truncated":
        bad.write_bytes(src.read_bytes()[: 100_000])
    elif damage == "not_npz":
        bad.write_text("hello")
    else:
        with np.load(src) as z:
            arrays = {k: z[k] for k in z.files}
        if damage == "missing_key":
            del arrays["faces"]
        else:
            arrays["faces"] = arrays["faces"].copy()
            arrays["faces"][0, 0] = 10 ** 7
        np.savez(bad, **arrays)
    with pytest.raises(WeightsError) as e:
        load_asset(bad)
    msg = e.value.line()
    assert "\n" not in msg and str(bad) in msg and "tools/make_ict_head.py" in msg


def test_env_var_pointing_nowhere_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FHAVATAR_ICT", str(tmp_path / "nothing"))
    with pytest.raises(WeightsError, match="FHAVATAR_ICT"):
        load_asset()


def test_zip_reader_errors_are_caught(tmp_path):
    bad = tmp_path / "ict_head.npz"
    shutil.copy(default_asset_path(), bad)
    with zipfile.ZipFile(bad, "a") as z:  # a valid zip whose members no longer match
        z.writestr("neutral.npy", b"garbage")
    with pytest.raises(WeightsError):
        load_asset(bad)


# ----------------------------------------------------------------------------------------------- model basics
def test_registry_builds_it_with_the_interface_shapes(head):
    h = load_head_model("ict")
    assert h.kind == "ict" and h.n_shape == 100 and h.n_expr == 44
    V = h.num_vertices
    assert h.v_template.shape == (V, 3) and h.lbs_weights.shape == (V, 5)
    assert h.posedirs.shape == (36, V * 3)
    assert torch.allclose(h.lbs_weights.sum(1), torch.ones(V), atol=1e-5)
    assert "jawOpen" not in h.expression_names and not any(n.startswith("eyeLook") for n in h.expression_names)
    assert h.landmarks is not None and len(h.landmarks.mp_index) == 478


def test_frame_is_flame_like(head):
    v = head.v_template.numpy()
    eyes = (head.J_regressor @ head.v_template)[3:].numpy()
    assert np.allclose(eyes[:, 1], 0, atol=1e-3) and np.allclose(eyes[:, 2], 0.069, atol=1e-3)
    assert 0.055 < eyes[0, 0] - eyes[1, 0] < 0.07  # inter-pupillary distance of an adult
    assert eyes[0, 0] > 0  # the left eye is at +x
    assert 0.14 < np.ptp(v[:, 0]) < 0.40  # head and shoulders, metres


# ------------------------------------------------------------------------------------------------------- UV
def test_uv_atlas_is_in_the_unit_square_and_covers_the_map(head, uv):
    uvc = head.uv_coords.numpy()
    assert uvc.min() >= 0 and uvc.max() <= 1
    assert uv.valid.float().mean() > 0.5  # the packing uses most of the square


def test_mirrored_texel_is_the_mirrored_surface_point(head, uv):
    """Texel (i, j) and its mirror (i, K-1-j) land on mirror-image points (x -> -x) of the template."""
    p = uv.position_map(head.v_template[None], head.faces)[0].permute(1, 2, 0).numpy()  # (K, K, 3)
    both = (uv.valid & uv.flip(uv.valid)).numpy()
    mirrored = p[:, ::-1] * MIRROR
    err = np.linalg.norm(p - mirrored, axis=-1)[both]
    assert both.mean() > 0.45
    assert np.median(err) < 1e-4 and np.percentile(err, 99) < 1e-3  # metres
    assert np.array_equal(both, uv.valid.numpy())  # the valid mask itself is symmetric


def test_regions_are_where_they_belong(head, uv):
    region = head.face_region.numpy()
    c = head.v_template[head.faces].mean(1).numpy()
    for name in REGIONS:
        if name != "other":
            assert (region == REGIONS[name]).sum() > 100, name
        assert (uv.region == REGIONS[name]).any(), name
    teeth = c[region == REGIONS["teeth"]]
    assert np.abs(teeth[:, 0]).max() < 0.04 and teeth[:, 1].mean() < -0.03  # in the mouth, below the eyes
    scalp, neck = c[region == REGIONS["scalp"]], c[region == REGIONS["neck"]]
    assert scalp[:, 1].mean() > 0.03 and neck[:, 1].mean() < -0.1
    ears = c[region == REGIONS["ears"]]
    assert np.abs(ears[:, 0]).min() > 0.05


# ------------------------------------------------------------------------------------------------------- rig
def test_opening_the_jaw_moves_lower_teeth_and_chin_down_together_upper_teeth_stay(head):
    rest = _posed(head)
    opened = _posed(head, jaw=[0.3, 0.0, 0.0])
    d = (opened - rest).numpy()
    lower, upper = head.lower_teeth.numpy(), head.upper_teeth.numpy()
    chin = head.landmarks68[8].item()
    assert d[lower, 1].mean() < -0.012 and d[chin, 1] < -0.012  # both drop more than 1 cm
    assert abs(d[lower, 1].mean() - d[chin, 1]) < 0.008  # together
    assert np.abs(d[upper]).max() < 1e-4  # upper teeth stay
    forehead = head.landmarks68[27].item()  # nose bridge
    assert np.abs(d[forehead]).max() < 1e-4


def test_jaw_joint_reproduces_jaw_open_at_its_fitted_angle(head):
    """jawOpen left the expression basis: the jaw joint at jaw_fit's angle (skinning + corrective) is jawOpen."""
    a = load_asset()
    target = a.expression[a.expression_names.index("jawOpen")]
    d = (_posed(head, jaw=[head.jaw_fit["angle"], 0, 0]) - _posed(head)).double().numpy()
    err = np.linalg.norm(d - target, axis=1)
    skin = np.unique(head.faces[head.face_region == REGIONS["face"]].numpy())
    assert np.percentile(err[skin], 99) < 1e-3 and head.jaw_fit["rms"] < 5e-4


def test_gaze_rotates_the_iris_about_the_eye_centre(head):
    centre = (head.J_regressor @ head.v_template)[3]
    iris = head.iris_left[head.v_template[head.iris_left, 2] > centre[2] + 0.008]  # the visible front of the iris
    rest = _posed(head)[iris]
    turned = _posed(head, eyes=[0.0, 0.3, 0.0, 0.0, 0.3, 0.0])[iris]  # yaw both eyes
    R = axis_angle_to_matrix(torch.tensor([[0.0, 0.3, 0.0]]))[0]
    expect = (rest - centre) @ R.T + centre
    assert torch.allclose(turned, expect, atol=1e-5)
    assert (turned - rest)[:, 0].mean() > 0.003  # the iris moves sideways by millimetres
    skin = _posed(head, eyes=[0.0, 0.3, 0.0, 0.0, 0.3, 0.0])[head.landmarks68[30]]
    assert torch.allclose(skin, _posed(head)[head.landmarks68[30]])  # the nose does not


def test_neck_rotation_bends_the_head_not_the_chest(head):
    p = _posed(head, neck=[0.4, 0.0, 0.0])
    d = (p - _posed(head)).norm(dim=1).numpy()
    v = head.v_template.numpy()
    assert d[v[:, 1] < v[:, 1].min() + 0.02].max() < 1e-4  # chest still
    assert d[head.landmarks68[30].item()] > 0.02  # nose tip moves centimetres


def test_neck_share_keeps_the_face_in_place_and_the_chest_still():
    """A head turn shared with the neck (``neck_share``) moves every face vertex exactly where the rigid turn put it,
    while the chest stays put instead of swinging round with the face."""
    rigid, shared = IctHeadModel(), IctHeadModel()
    rigid.neck_share, shared.neck_share = 0.0, 1.0
    p = rigid.zero_params(3)
    p.rotation = torch.tensor([[0.0, 0.7, 0.0], [0.4, 0.0, 0.0], [0.2, -0.5, 0.2]])  # yaw, nod, mixed with a tilt
    p.jaw[:, 0] = 0.2
    # A person turning the head about the neck, as a rigid tracker sees it: the turn about the root joint plus the
    # translation that puts the face back, t = -(R - I)(J_neck - J_root).
    J = rigid.J_regressor @ rigid.shaped(p.shape, p.expression)[0]
    R = axis_angle_to_matrix(p.rotation)
    p.translation = -((R - torch.eye(3)) @ (J[1] - J[0]))
    a, b = rigid(p), shared(p)
    face = torch.as_tensor(rigid.landmarks68)
    assert (a[:, face] - b[:, face]).norm(dim=-1).max() < 1e-6
    still = rigid.zero_params(3)
    still.jaw = p.jaw  # (the jaw's corrective shape reaches the throat)
    rest = rigid(still)
    chest = rigid.lbs_weights[:, 0] > 0.999
    swing_rigid = (a - rest)[:, chest].norm(dim=-1).mean(1)
    swing_shared = (b - rest)[:, chest].norm(dim=-1).max(1).values
    assert (swing_rigid > 0.01).all()  # centimetres: the chest turns with a rigid head
    assert (swing_shared < 1e-5).all()  # still
    # The avatar's fast posing path shares the turn the same way.
    uv = build_uv_space(shared, UVConfig(size=32))
    rig = AvatarRig(shared, uv, template_maps(uv), torch.zeros(shared.n_shape))
    torch.testing.assert_close(rig.posed_vertices(p), b, atol=1e-6, rtol=0)


def test_expression_pairs_mirror_each_other(head):
    left = (_posed(head, mouthSmile_L=1.0) - _posed(head)).numpy()
    right = (_posed(head, mouthSmile_R=1.0) - _posed(head)).numpy()
    m = head.mirror.numpy()
    # Scanned shapes are mirror images to within a millimetre, for displacements of a centimetre and more.
    assert np.abs(left[m] * MIRROR - right).max() < 1.5e-3
    assert np.abs(left).max() > 0.008


# ----------------------------------------------------------------------------------------------- landmarks
def test_landmark_embedding_sits_on_ict_own_landmarks(head):
    """The MediaPipe points that correspond to iBUG points land near ICT's own 68 landmark vertices."""
    from pipelines.preprocess.landmarks68 import MEDIAPIPE_TO_IBUG68

    verts = head.v_template[None]
    lm = head.landmarks_3d(verts)[0].numpy()
    pos = {int(i): lm[k] for k, i in enumerate(head.landmarks.mp_index)}
    ict = head.v_template[head.landmarks68].numpy()
    interior = range(17, 68)  # brows, nose, eyes, lips (the jaw contour is a silhouette)
    err = [np.linalg.norm(pos[MEDIAPIPE_TO_IBUG68[k]][:2] - ict[k, :2]) for k in interior]
    assert np.median(err) < 0.003 and max(err) < 0.012  # the detectors' point definitions differ by millimetres


def test_eye_and_lip_contours_sit_on_the_lid_and_lip_skin_not_in_the_sockets(head):
    """Contour points that fall into the lid or lip opening go to the skin's margin: before, 11 of each eye's 16
    points fell through onto the eye socket behind the eyeball, 2.6 cm deep (eye errors tripled under yaw)."""
    from pipelines.head.landmarks import GROUPS, IRISES

    emb = head.landmarks
    lm = head.landmarks_3d(head.v_template[None])[0].numpy()
    region = head.face_region[emb.faces].numpy()
    idx = emb.mp_index.numpy()
    assert (region[~np.isin(idx, IRISES)] == REGIONS["face"]).all()
    ict = head.v_template[head.landmarks68].numpy()
    for group, ibug in (("eye_left", range(42, 48)), ("eye_right", range(36, 42)), ("lips_inner", range(60, 68))):
        z = lm[np.isin(idx, GROUPS[group]), 2]
        assert np.abs(z - ict[list(ibug), 2].mean()).max() < 0.012, group  # metres


def test_68_point_sources_use_ict_landmark_vertices(head):
    emb = head.landmark_embedding("dlib")
    pts = (head.v_template[head.faces[emb.faces]] * emb.bary[..., None]).sum(1)
    assert torch.allclose(pts, head.v_template[head.landmarks68])
    assert head.landmark_embedding("mediapipe") is head.landmarks or len(head.landmark_embedding().mp_index) == 478


# --------------------------------------------------------------------------------------------------- render
@pytest.mark.slow
def test_rendered_open_smile_shows_teeth_in_the_mouth(head, uv256):
    """A template avatar (K = 256) with green teeth, smiling with the jaw a little open: the mouth shows green."""
    from pipelines.animate import render_sequence
    from pipelines.core.camera import Camera, fov_to_focal, normalized_intrinsics, orbit_cameras

    uv = uv256
    maps = template_maps(uv)
    teeth = uv.region == REGIONS["teeth"]
    col = maps[0, ATTRIBUTE_SLICES["color"]]
    col[:, teeth] = torch.tensor([0.0, 1.0, 0.0])[:, None]
    rig = AvatarRig(head, uv, maps, torch.zeros(head.n_shape))
    p = head.zero_params(2)
    p.jaw[1, 0] = 0.2
    for name in ("mouthSmile_L", "mouthSmile_R", "mouthUpperUp_L", "mouthUpperUp_R"):
        p.expression[1, head.expression_names.index(name)] = 1.0
    mouth = head.landmarks_3d(head(p))[:, head.landmarks.mp_index == 13]  # inner upper lip
    target = tuple(float(x) for x in mouth[1, 0])
    c2w = orbit_cameras(torch.zeros(2), torch.zeros(2), radius=0.35, target=target)
    cams = Camera(normalized_intrinsics(fov_to_focal(13.373), 2), c2w)
    frames = list(render_sequence(rig, p, cams, 128, (1, 1, 1), "torch", 2))
    green = [((f.rgb[..., 1].astype(int) - f.rgb[..., 0]) > 80).sum() for f in frames]
    assert green[0] < 5  # closed, neutral mouth: no teeth
    assert green[1] > 300  # smiling: a band of teeth (~4 % of the frame)


def test_model_is_its_own_mirror_image_so_training_can_flip(head):
    """Template, expression pairs, identity prior and rig are made exactly symmetric: the flip augmentation's
    mirrored parameters pose to the mirrored mesh."""
    from pipelines.train.mirror import HeadMirror

    for seed in range(3):
        mirror, why = HeadMirror.build(head, tolerance=head.mirror_tolerance, seed=seed)
        assert mirror is not None, why
        assert mirror.error < 5e-4  # float32 rounding of the posing; exact in exact arithmetic
