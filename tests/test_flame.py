"""FLAME loading without chumpy, eq. 11-12 against an independent numpy implementation, assets, errors, registry."""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_flame import write_flame_fixture, write_masks  # noqa: E402

from pipelines.errors import ConfigError, WeightsError  # noqa: E402
from pipelines.head.base import REGIONS, HeadParams  # noqa: E402
from pipelines.head.flame import (  # noqa: E402
    ChumpyStandIn,
    FlameConfig,
    FlameHeadModel,
    FlamePickleLoader,
    boundary_loops,
    connected_components,
    packaged_flame_uv,
)
from pipelines.head import flame as flame_module  # noqa: E402
from pipelines.head import registry  # noqa: E402

S0 = 300  # FLAME's expression block starts after 300 shape components


# ------------------------------------------------------------------------------------------------------------------
# Independent numpy FLAME (Rodrigues, kinematic chain, blend) - shares no code with pipelines.head.lbs
# ------------------------------------------------------------------------------------------------------------------


def rodrigues(r: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(r)
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.cos(theta) * np.eye(3) + (1 - np.cos(theta)) * np.outer(k, k) + np.sin(theta) * K


def homogeneous(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = R, t
    return M


def flame_numpy(fx, shape, expr, pose, transl):
    """One sample. shape (S,), expr (E,), pose (5, 3) axis-angle, transl (3,) -> (V, 3)."""
    sd = fx.shapedirs
    v_id = fx.v_template + sd[:, :, : len(shape)] @ shape
    v_shaped = v_id + sd[:, :, S0 : S0 + len(expr)] @ expr
    joints = fx.J_regressor @ v_shaped  # J(beta, psi), as in FLAME's official code
    R = [rodrigues(p) for p in pose]
    feature = np.concatenate([(R[j] - np.eye(3)).ravel() for j in range(1, 5)])
    v_posed = v_shaped + np.einsum("vdk,k->vd", fx.posedirs, feature)
    G = [None] * 5
    for j in range(5):
        p = fx.parents[j]
        if p < 0:
            G[j] = homogeneous(R[j], joints[j])
        else:
            G[j] = G[p] @ homogeneous(R[j], joints[j] - joints[p])
    skin = np.stack([G[j] @ homogeneous(np.eye(3), -joints[j]) for j in range(5)])  # (5, 4, 4)
    T = np.einsum("vj,jab->vab", fx.weights, skin)
    vh = np.concatenate([v_posed, np.ones((len(v_posed), 1))], 1)
    return np.einsum("vab,vb->va", T, vh)[:, :3] + transl


def random_params(model, batch: int, seed: int, scale: float = 0.3) -> HeadParams:
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(batch, n, generator=g)  # noqa: E731
    return HeadParams(r(model.n_shape), r(model.n_expr), scale * r(3), 0.05 * r(3), scale * r(3), scale * r(3),
                      scale * r(6))


@pytest.fixture(scope="module", autouse=True)
def _assets_next_to_model_only():
    """Keep real FLAME assets a developer may have in weights/flame/ out of these fixture-based tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flame_module, "_default_asset_dirs", lambda model_path: [model_path.parent])
        yield


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_flame_fixture(tmp_path_factory.mktemp("flame"))


@pytest.fixture(scope="module")
def model_open(fx):
    return FlameHeadModel(fx.path, FlameConfig(close_mouth=False))


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2])
def test_loads_chumpy_pickle_without_chumpy(tmp_path, protocol):
    fx = write_flame_fixture(tmp_path, protocol=protocol)
    raw = fx.path.read_bytes()
    assert b"chumpy.ch\nCh\n" in raw and b"scipy.sparse.csc\ncsc_matrix\n" in raw  # references like the real files
    if protocol == 0:
        assert b"copy_reg\n_reconstructor\n" in raw
    assert "chumpy" not in sys.modules

    m = FlameHeadModel(fx.path, FlameConfig(close_mouth=False))
    assert "chumpy" not in sys.modules  # the stand-in was used, chumpy (even if installed) was never imported
    V = len(fx.v_template)
    np.testing.assert_allclose(m.v_template.numpy(), fx.v_template, atol=1e-7)
    np.testing.assert_array_equal(m.faces.numpy(), fx.faces)
    np.testing.assert_allclose(m.shapedirs.numpy(), fx.shapedirs[:, :, :300], atol=1e-8)
    np.testing.assert_allclose(m.exprdirs.numpy(), fx.shapedirs[:, :, 300:400], atol=1e-8)
    # FLAME's layout: row k of posedirs is pose feature k's offset field, flattened (V*3).
    assert m.posedirs.shape == (36, V * 3)
    for k in (0, 7, 35):
        np.testing.assert_allclose(m.posedirs[k].numpy(), fx.posedirs[:, :, k].reshape(-1), atol=1e-7)
    np.testing.assert_allclose(m.J_regressor.numpy(), fx.J_regressor, atol=1e-7)  # the sparse matrix, densified
    np.testing.assert_allclose(m.lbs_weights.sum(1).numpy(), 1.0, atol=1e-6)
    assert m.parents.tolist() == [-1, 0, 1, 1, 1]
    assert m.uv_faces.shape == m.faces.shape


def test_chumpy_classes_map_to_standin():
    import io

    loader = FlamePickleLoader(io.BytesIO(b""))
    cls = loader.find_class("chumpy.ch", "Ch")
    assert issubclass(cls, ChumpyStandIn) and cls.chumpy_class == "chumpy.ch.Ch"
    obj = cls.__new__(cls)
    obj.__setstate__({"x": np.arange(3.0), "_dirty_vars": set()})
    np.testing.assert_array_equal(obj.array(), [0.0, 1.0, 2.0])
    expression = cls.__new__(cls)
    expression.__setstate__({"a": obj, "b": obj})  # a chumpy expression stores operands, not a value
    with pytest.raises(ValueError, match="stores no array"):
        expression.array()


def test_other_sparse_formats(tmp_path):
    a = write_flame_fixture(tmp_path / "a")
    fx = write_flame_fixture(tmp_path / "b", replace={"J_regressor": scipy.sparse.csr_matrix(a.J_regressor)})
    m = FlameHeadModel(fx.path, FlameConfig(close_mouth=False))
    np.testing.assert_allclose(m.J_regressor.numpy(), fx.J_regressor, atol=1e-7)


def test_component_counts_configurable(fx):
    m = FlameHeadModel(fx.path, FlameConfig(n_shape=50, n_expr=20, close_mouth=False))
    assert (m.n_shape, m.n_expr) == (50, 20)
    np.testing.assert_allclose(m.exprdirs.numpy(), fx.shapedirs[:, :, 300:320], atol=1e-8)
    with pytest.raises(ConfigError):
        FlameHeadModel(fx.path, FlameConfig(n_shape=301))
    with pytest.raises(WeightsError, match=r"shapedirs has shape \(\d+, 3, 400\), expected \(\d+,3,>=450\)"):
        FlameHeadModel(fx.path, FlameConfig(n_expr=150))


# ------------------------------------------------------------------------------------------------------------------
# Eq. 11-12
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_shape,n_expr", [(300, 100), (40, 10)])
def test_lbs_matches_numpy_reference(fx, n_shape, n_expr):
    m = FlameHeadModel(fx.path, FlameConfig(n_shape=n_shape, n_expr=n_expr, close_mouth=False))
    params = random_params(m, batch=3, seed=1)
    out = m(params).detach().numpy()
    for b in range(3):
        p = {k: v[b].double().numpy() for k, v in params.to_dict().items()}
        pose = np.stack([p["rotation"], p["neck"], p["jaw"], p["eyes"][:3], p["eyes"][3:]])
        ref = flame_numpy(fx, p["shape"], p["expression"], pose, p["translation"])
        assert np.abs(ref - fx.v_template).max() > 1e-2  # the sample really deforms the mesh
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_zero_params_give_template(model_open, fx):
    out = model_open(model_open.zero_params(2))
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(fx.v_template, out.shape), atol=1e-7)


def test_joints_regress_from_shaped_vertices(model_open, fx):
    # Rotating only the root moves every vertex rigidly about the root joint J_0(beta) (all skinning transforms
    # coincide and the pose feature of the other joints is zero), so the pivot exposes which joints were used.
    g = torch.Generator().manual_seed(3)
    shape = 3.0 * torch.randn(1, model_open.n_shape, generator=g)
    v_id = fx.v_template + fx.shapedirs[:, :, :300] @ shape[0].double().numpy()
    j_shaped = fx.J_regressor @ v_id
    j_template = fx.J_regressor @ fx.v_template
    assert np.linalg.norm(j_shaped[0] - j_template[0]) > 5e-3  # the test can tell the two apart
    np.testing.assert_allclose(model_open.rest_joints(shape)[0].numpy(), j_shaped, atol=1e-6)

    params = model_open.zero_params(1)
    params.shape = shape
    params.rotation = torch.tensor([[0.2, -0.4, 0.3]])
    R = rodrigues(params.rotation[0].double().numpy())
    expected = (v_id - j_shaped[0]) @ R.T + j_shaped[0]
    np.testing.assert_allclose(model_open(params)[0].numpy(), expected, atol=1e-5)


def test_gradients_flow(model_open):
    params = random_params(model_open, batch=2, seed=4)
    for t in params.to_dict().values():
        t.requires_grad_(True)
    model_open(params).square().sum().backward()
    for name, t in params.to_dict().items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def _bad_file(tmp_path: Path, case: str) -> tuple[Path, str]:
    p = tmp_path / f"{case}.pkl"
    if case == "missing_key":
        return write_flame_fixture(tmp_path, name=p.name, drop_key="posedirs").path, "missing key 'posedirs'"
    if case == "wrong_shape":
        bad = {"shapedirs": np.zeros((239, 3, 50))}
        return (write_flame_fixture(tmp_path, name=p.name, replace=bad).path,
                r"shapedirs has shape \(239, 3, 50\), expected \(239,3,>=400\)")
    if case == "wrong_tree":
        bad = {"kintree_table": np.array([[4294967295, 0, 1, 2, 1], [0, 1, 2, 3, 4]])}
        return write_flame_fixture(tmp_path, name=p.name, replace=bad).path, "kintree_table parents"
    if case == "truncated":
        good = write_flame_fixture(tmp_path, name="good.pkl").path.read_bytes()
        p.write_bytes(good[: len(good) // 2])
        return p, "truncated"
    if case == "random_pickle":
        p.write_bytes(pickle.dumps([1, 2, 3]))
        return p, "holds a list"
    if case == "not_a_pickle":
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
        return p, "not a readable pickle"
    if case == "empty":
        p.write_bytes(b"")
        return p, "is empty"
    if case == "code":
        p.write_bytes(pickle.dumps({"v_template": _Evil()}, protocol=2))
        return p, r"refers to '(posix|nt|os)\.getcwd'.*refused"
    if case == "missing":
        return p, "does not exist"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["missing_key", "wrong_shape", "wrong_tree", "truncated", "random_pickle", "not_a_pickle", "empty", "code",
     "missing"],
)
def test_bad_files_raise_weights_error(tmp_path, case):
    path, message = _bad_file(tmp_path, case)
    with pytest.raises(WeightsError) as info:
        FlameHeadModel(path)
    line = str(info.value)
    assert "\n" not in line
    assert str(path) in line
    assert re.search(message, line), line
    assert "https://flame.is.tue.mpg.de" in line and "FHAVATAR_FLAME" in line


# ------------------------------------------------------------------------------------------------------------------
# UVs, regions, landmarks, mouth
# ------------------------------------------------------------------------------------------------------------------


def test_packaged_uv_layout():
    layout = packaged_flame_uv()
    if layout is None:
        pytest.skip("flame-model package not installed")
    vt, ft = layout
    assert vt.shape == (5118, 2) and ft.shape == (9976, 3)
    assert vt.min() >= 0 and vt.max() <= 1 and ft.max() == 5117


def test_uv_from_sidecar_and_missing_uv(tmp_path, fx):
    nouv = write_flame_fixture(tmp_path, with_uv=False)
    with pytest.raises(WeightsError, match="no UV layout fits"):
        FlameHeadModel(nouv.path)
    np.save(tmp_path / "flame_vt.npy", fx.vt)
    np.save(tmp_path / "flame_ft.npy", fx.ft)
    m = FlameHeadModel(nouv.path, FlameConfig(close_mouth=False))
    assert m.uv_source == "flame_vt.npy"
    np.testing.assert_allclose(m.uv_coords.numpy(), fx.vt, atol=1e-7)


def _centroids(m):
    return m.v_template[m.faces].mean(1).numpy()


def test_regions_heuristic(model_open, fx):
    region = model_open.face_region.numpy()
    comp = connected_components(fx.faces, len(fx.v_template))
    eyeball_face = np.isin(fx.faces[:, 0], np.concatenate(fx.eye_vertices))
    assert (region[eyeball_face] == REGIONS["eyes"]).all() and (region[~eyeball_face] != REGIONS["eyes"]).all()
    assert len(np.unique(comp)) == 3
    c = _centroids(model_open)
    face, neck, scalp = (region == REGIONS[n] for n in ("face", "neck", "scalp"))
    assert face.sum() > 20 and neck.sum() > 5 and scalp.sum() > 20
    assert c[neck, 1].max() < c[face, 1].mean() < c[scalp, 1].mean()
    assert c[face, 2].mean() > c[scalp, 2].mean()
    head = ~eyeball_face
    assert region[head][np.argmax(c[head, 2])] == REGIONS["face"]  # the most frontal triangle is face
    assert region[head][np.argmax(c[head, 1])] == REGIONS["scalp"]  # the top of the head is scalp
    assert "heuristic" in model_open.describe()


def test_regions_from_masks(tmp_path):
    fx = write_flame_fixture(tmp_path)
    masks = write_masks(tmp_path, fx)
    m = FlameHeadModel(fx.path, FlameConfig(close_mouth=False))
    assert m.region_source == "FLAME_masks.pkl"
    region = m.face_region.numpy()

    def faces_within(ids):
        return np.isin(fx.faces, ids).all(1)

    assert (region[faces_within(masks["left_eyeball"])] == REGIONS["eyes"]).all()
    assert (region[faces_within(np.concatenate([masks["left_ear"], masks["right_ear"]]))] == REGIONS["ears"]).all()
    neck_only = faces_within(masks["neck"]) & ~np.isin(fx.faces, masks["scalp"]).any(1)
    assert neck_only.any() and (region[neck_only] == REGIONS["neck"]).all()
    lips_only = faces_within(masks["lips"]) & ~np.isin(fx.faces, np.concatenate(
        [masks["neck"], masks["scalp"], masks["left_ear"], masks["right_ear"]])).any(1)
    assert lips_only.any() and (region[lips_only] == REGIONS["face"]).all()  # lips are face surface


def test_landmark_embedding(tmp_path):
    fx = write_flame_fixture(tmp_path)
    m0 = FlameHeadModel(fx.path, FlameConfig(close_mouth=False))
    assert m0.landmarks is None and "landmark" in m0.describe()
    rng = np.random.default_rng(5)
    face_idx = rng.integers(0, len(fx.faces), 12)
    bary = rng.dirichlet(np.ones(3), 12)
    mp = rng.choice(478, 12, replace=False)
    np.savez(tmp_path / "mediapipe_landmark_embedding.npz", lmk_face_idx=face_idx, lmk_b_coords=bary,
             landmark_indices=mp)
    m = FlameHeadModel(fx.path)  # mouth closed: appended faces must not disturb the FLAME face ids
    assert m.landmarks is not None and m.landmarks.mp_index.tolist() == mp.tolist()
    assert "lmk_bary" in m.state_dict()
    params = random_params(m, batch=1, seed=6)
    verts = m(params)
    lm = m.landmarks_3d(verts)[0].detach().numpy()
    v = verts[0].detach().numpy()
    ref = np.einsum("lk,lkd->ld", bary, v[fx.faces[face_idx]])
    np.testing.assert_allclose(lm, ref, atol=1e-6)

    np.savez(tmp_path / "mediapipe_landmark_embedding.npz", lmk_face_idx=face_idx + 10_000, lmk_b_coords=bary,
             landmark_indices=mp)
    with pytest.raises(WeightsError, match="mediapipe_landmark_embedding.npz"):
        FlameHeadModel(fx.path)


def test_close_mouth(fx, model_open):
    m = FlameHeadModel(fx.path)  # close_mouth is the default, as in the paper
    V, F = len(fx.v_template), len(fx.faces)
    assert m.num_vertices == V + 1 and m.mouth_vertex == V
    new_faces = m.faces[F:].numpy()
    assert len(new_faces) == m.num_mouth_faces > 0
    assert (m.face_region[F:] == REGIONS["mouth"]).all() and (m.face_region[:F] != REGIONS["mouth"]).all()

    loops_before = boundary_loops(fx.faces)
    loops_after = boundary_loops(m.faces.numpy())
    assert len(loops_after) == len(loops_before) - 1
    closed = [lp for lp in loops_before if not any(set(lp) == set(a) for a in loops_after)]
    assert len(closed) == 1
    mouth = closed[0]
    c = fx.v_template[mouth].mean(0)
    assert c[2] > 0.05 and c[1] < 0.0  # the chosen loop is the front one below the eyes, not the neck
    centre = m.v_template[V].numpy()
    assert centre[2] < c[2] - 1e-3 and np.linalg.norm(centre[:2] - c[:2]) < 1e-6  # pushed back into the mouth

    # Consistent orientation: every fan edge pairs with an existing boundary edge in reverse.
    boundary = {(int(a), int(b)) for a, b in zip(mouth, np.roll(mouth, -1))}
    edges = {(int(f[i]), int(f[(i + 1) % 3])) for f in new_faces for i in range(3)}
    fan_edges = {e for e in edges if V not in e}
    assert fan_edges == {(b, a) for a, b in boundary}

    # The cavity is skinned half head (neck joint) / half jaw and follows the lips' blendshapes.
    assert m.lbs_weights[V].tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]
    assert m.J_regressor[:, V].abs().sum() == 0
    np.testing.assert_allclose(m.exprdirs[V].numpy(), m.exprdirs[mouth].mean(0).numpy(), atol=1e-7)

    # New UVs lie inside [0, 1] and outside every original UV triangle.
    new_uv = m.uv_coords[m.uv_faces[F:].unique()].numpy()
    assert new_uv.min() >= 0 and new_uv.max() <= 1
    tri = fx.vt[fx.ft]  # (F, 3, 2)
    for p in new_uv:
        e = [tri[:, (i + 1) % 3] - tri[:, i] for i in range(3)]
        d = [e[i][:, 0] * (p - tri[:, i])[:, 1] - e[i][:, 1] * (p - tri[:, i])[:, 0] for i in range(3)]
        inside = ((d[0] >= 0) & (d[1] >= 0) & (d[2] >= 0)) | ((d[0] <= 0) & (d[1] <= 0) & (d[2] <= 0))
        assert not inside.any()

    # Original vertices deform exactly as without the cavity.
    params = random_params(m, batch=2, seed=7)
    np.testing.assert_allclose(m(params)[:, :V].detach().numpy(), model_open(params).detach().numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------------------------


def test_find_flame_file(tmp_path, monkeypatch, fx):
    folder = tmp_path / "flame"
    folder.mkdir()
    write_masks(folder, fx)  # FLAME_masks.pkl is never taken for a model
    monkeypatch.setenv(registry.ENV_VAR, str(folder))
    with pytest.raises(WeightsError, match="without a FLAME pickle"):
        registry.find_flame_file()
    (folder / "zz_custom.pkl").write_bytes(b"x")
    assert registry.find_flame_file() == folder / "zz_custom.pkl"
    (folder / "flame2023.pkl").write_bytes(b"x")
    assert registry.find_flame_file() == folder / "flame2023.pkl"
    monkeypatch.setenv(registry.ENV_VAR, str(fx.path))
    assert registry.find_flame_file() == fx.path
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path / "nope.pkl"))
    with pytest.raises(WeightsError, match="FHAVATAR_FLAME .*nope.pkl' does not exist"):
        registry.find_flame_file()

    monkeypatch.delenv(registry.ENV_VAR)
    empty = tmp_path / "empty"
    assert registry.find_flame_file([empty]) is None
    nested = tmp_path / "weights" / "FLAME2020"
    nested.mkdir(parents=True)
    (nested / "generic_model.pkl").write_bytes(b"x")
    monkeypatch.setattr(registry, "default_search_dirs", lambda: [empty, tmp_path / "weights"])
    assert registry.find_flame_file() == nested / "generic_model.pkl"


def _weights_for_head(path, head: str | None, **record):
    """A tiny network checkpoint whose metadata records ``head`` (None: a file from before heads were recorded) and
    ``record`` (e.g. ``head_digest``)."""
    from pipelines.network import NetworkConfig
    from pipelines.network.model import FHAvatarNet
    from pipelines.network.weights import save_checkpoint

    save_checkpoint(path, FHAvatarNet(NetworkConfig.tiny()), extra={"step": 1, **({"head": head} if head else {}),
                                                                    **record})
    return str(path)


def test_load_head_model_kinds(tmp_path, monkeypatch, fx):
    """``auto`` follows the head the network weights were trained on: FLAME only for FLAME-trained weights, the
    embedded head for files that record none (the first shipped weights), ICT-FaceKit without a network."""
    monkeypatch.setattr(registry, "default_search_dirs", lambda: [tmp_path / "none"])
    monkeypatch.setenv(registry.ENV_VAR, str(fx.path))
    flame_weights = _weights_for_head(tmp_path / "flame.safetensors", "flame")
    m = registry.load_head_model("auto", weights=flame_weights)
    assert isinstance(m, FlameHeadModel) and m.source == fx.path
    m2 = registry.load_head_model("flame", flame_path=str(fx.path.parent))
    assert isinstance(m2, FlameHeadModel)
    with pytest.raises(ConfigError, match="unknown head model kind 'smpl'"):
        registry.load_head_model("smpl")
    # a FLAME file present does not make auto pick FLAME for weights trained on another head, or for no network
    assert registry.resolve_head_kind("auto", _weights_for_head(tmp_path / "ict.safetensors", "ict")) == "ict"
    assert registry.resolve_head_kind("auto", "random") == registry.DEFAULT_KIND == "ict"
    assert registry.resolve_head_kind("auto", _weights_for_head(tmp_path / "old.safetensors", None)) == "embedded"
    assert registry.resolve_head_kind("embedded", flame_weights) == "embedded"

    monkeypatch.delenv(registry.ENV_VAR)
    with pytest.raises(WeightsError, match="flame.is.tue.mpg.de"):
        registry.load_head_model("flame")
    with pytest.raises(WeightsError, match="flame.is.tue.mpg.de"):
        registry.load_head_model("auto", weights=flame_weights)
    from pipelines.head.embedded import EmbeddedHeadModel

    monkeypatch.setenv(registry.ENV_VAR, str(fx.path))
    assert isinstance(registry.load_head_model("embedded"), EmbeddedHeadModel)


def test_head_model_id(fx):
    a = FlameHeadModel(fx.path)
    b = FlameHeadModel(fx.path)
    ida = registry.head_model_id(a)
    assert re.fullmatch(r"[0-9a-f]{12}", ida) and ida == registry.head_model_id(b)
    assert registry.head_model_id(FlameHeadModel(fx.path, FlameConfig(close_mouth=False))) != ida
    assert registry.head_model_id(FlameHeadModel(fx.path, FlameConfig(n_expr=50))) != ida


def test_reconstruct_refuses_weights_trained_on_another_head(tmp_path):
    """A network is refused on a head it was not trained on, and on another UV layout of the same kind, in one
    line naming both; the matching head passes."""
    from pipelines.head.embedded import EmbeddedHeadModel
    from pipelines.reconstruct import ReconstructConfig, with_network

    head = EmbeddedHeadModel()
    cfg = lambda w: ReconstructConfig(method="network", weights=w, uv_size=32)  # noqa: E731
    with pytest.raises(ConfigError, match="trained on the 'ict' head model, not 'embedded'"):
        with_network(cfg(_weights_for_head(tmp_path / "ict.safetensors", "ict")), "cpu", None, head)
    other = _weights_for_head(tmp_path / "other.safetensors", "embedded", head_digest="0" * 16)
    with pytest.raises(ConfigError, match="another version of the 'embedded' head model"):
        with_network(cfg(other), "cpu", None, head)
    assert with_network(cfg(_weights_for_head(tmp_path / "old.safetensors", None)), "cpu", None, head)[1] is not None
