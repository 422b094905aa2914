"""A small FLAME-format pickle for tests, written the way the official files are.

The official FLAME pickles come from Python 2 with chumpy: ``shapedirs`` (and in some versions ``v_template``) are
``chumpy.ch.Ch`` objects whose pickled state is a dict with the array under ``'x'``; ``J_regressor`` is a
``scipy.sparse.csc_matrix`` (module path ``scipy.sparse.csc`` in those files); ``kintree_table[0, 0]`` is
4294967295. This module builds a head-like mesh (an ellipsoid icosphere with a neck and a mouth opening, plus two
eyeball spheres), random bases, a sparse random J_regressor near plausible joint locations, random skinning
weights that sum to 1, and pickles it with a throwaway ``chumpy.ch.Ch`` class that exists only while pickling.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse

N_COMPONENTS = 400  # 300 shape + 100 expression, like FLAME
JOINT_POSITIONS = np.array(
    [
        [0.0, -0.10, -0.02],  # root (base of the neck)
        [0.0, -0.06, -0.015],  # neck
        [0.0, -0.02, -0.005],  # jaw
        [0.032, 0.035, 0.062],  # eye_left (eyeball centre)
        [-0.032, 0.035, 0.062],  # eye_right
    ]
)
MOUTH_POINT_Y = -0.045


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices (V, 3), outward-oriented faces (F, 3)."""
    t = (1.0 + 5 ** 0.5) / 2.0
    v = [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
         [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]]
    f = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6],
         [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10],
         [8, 6, 7], [9, 8, 1]]
    verts = [np.array(p, dtype=np.float64) / np.linalg.norm(p) for p in v]
    faces = f
    for _ in range(subdivisions):
        cache: dict[tuple[int, int], int] = {}

        def mid(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
        faces = new
    return np.array(verts), np.array(faces, dtype=np.int64)


@dataclass
class FlameFixture:
    """The arrays that went into the pickle (float64), for independent reference computations."""

    path: Path
    v_template: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3)
    shapedirs: np.ndarray  # (V, 3, 400)
    posedirs: np.ndarray  # (V, 3, 36) as stored
    J_regressor: np.ndarray  # (5, V) dense copy of the sparse matrix
    weights: np.ndarray  # (V, 5)
    parents: np.ndarray  # (5,)
    vt: np.ndarray  # (T, 2)
    ft: np.ndarray  # (F, 3)
    head_vertices: np.ndarray  # ids of the head surface
    eye_vertices: tuple[np.ndarray, np.ndarray]  # left, right eyeball ids


def make_flame_arrays(seed: int = 0) -> dict:
    """Head-like mesh and random FLAME-shaped bases (float64 / int64 numpy)."""
    rng = np.random.default_rng(seed)
    sv, sf = icosphere(2)
    head = sv * np.array([0.078, 0.11, 0.095])
    centroids = head[sf].mean(1)
    # Openings like FLAME's: the neck (bottom cap) and the mouth (a disc on the front, below the nose).
    mouth_centre = np.array([0.0, MOUTH_POINT_Y, 0.095 * np.sqrt(1 - (MOUTH_POINT_Y / 0.11) ** 2)])
    keep = (centroids[:, 1] > -0.095) & (np.linalg.norm(centroids - mouth_centre, axis=1) > 0.022)
    hf = sf[keep]
    used = np.unique(hf)
    remap = -np.ones(len(head), dtype=np.int64)
    remap[used] = np.arange(len(used))
    head, hf = head[used], remap[hf]

    ev, ef = icosphere(1)
    parts_v, parts_f, offset = [head], [hf], len(head)
    eye_ids = []
    for centre in JOINT_POSITIONS[3:]:
        parts_v.append(ev * 0.0125 + centre)
        parts_f.append(ef + offset)
        eye_ids.append(np.arange(offset, offset + len(ev)))
        offset += len(ev)
    v = np.concatenate(parts_v)
    f = np.concatenate(parts_f)
    V = len(v)

    # J_regressor: each joint a sparse convex combination of the vertices nearest its intended location.
    J = np.zeros((5, V))
    for j, target in enumerate(JOINT_POSITIONS):
        pool = eye_ids[j - 3] if j >= 3 else np.arange(len(head))
        near = pool[np.argsort(np.linalg.norm(v[pool] - target, axis=1))[:6]]
        w = rng.uniform(0.2, 1.0, len(near))
        J[j, near] = w / w.sum()

    weights = rng.uniform(0.0, 1.0, (V, 5)) ** 3
    weights /= weights.sum(1, keepdims=True)

    # UVs: head in u < 0.7 (cylindrical), eyeballs in small squares at the bottom right; the rest is free.
    uv = np.zeros((V, 2))
    u = (np.arctan2(head[:, 0], head[:, 2]) / (2 * np.pi) + 0.5) * 0.7
    uv[: len(head)] = np.stack([u, (head[:, 1] + 0.11) / 0.22], 1)
    for k, ids in enumerate(eye_ids):
        d = ev
        uv[ids] = np.array([0.72 + 0.14 * k, 0.02]) + 0.06 * (d[:, :2] + 1.0)
    return {
        "v_template": v,
        "f": f.astype(np.uint32),
        "shapedirs": rng.normal(0.0, 1e-3, (V, 3, N_COMPONENTS)),
        "posedirs": rng.normal(0.0, 5e-3, (V, 3, 36)),
        "J_regressor": J,
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "vt": uv,
        "ft": f.copy(),
        "_head_vertices": np.arange(len(head)),
        "_eye_vertices": tuple(eye_ids),
    }


@contextlib.contextmanager
def fake_chumpy():
    """A throwaway ``chumpy.ch.Ch`` registered in sys.modules only inside the block."""
    pkg = types.ModuleType("chumpy")
    mod = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            # The attributes a real chumpy Ch carries in its pickled state (its __getstate__ copies __dict__
            # minus the weak references).
            self.x = np.asarray(x, dtype=np.float64)
            self._dirty_vars = set()
            self._itr = None
            self._depends_on_deps = {}
            self._make_dense = False
            self._make_sparse = False

        def __getstate__(self):
            return dict(self.__dict__)

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = Ch.__name__ = "Ch"
    mod.Ch = Ch
    pkg.ch = mod
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, mod
    try:
        yield Ch
    finally:
        for k, old in saved.items():
            if old is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = old


def official_style_bytes(obj: object, protocol: int = 2) -> bytes:
    """Pickle ``obj`` at a Python-2 protocol and rename modules to the paths the official files use."""
    assert protocol <= 2, "the official files use text GLOBAL opcodes (protocols 0-2)"
    data = pickle.dumps(obj, protocol=protocol)
    # Text GLOBAL opcodes are b"c<module>\n<name>\n", so a rename is a plain byte replacement.
    for new, old in ((b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"),
                     (b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")):
        data = data.replace(new, old)
    return data


def write_flame_fixture(
    folder: Path, name: str = "generic_model.pkl", seed: int = 0, protocol: int = 2, with_uv: bool = True,
    drop_key: str | None = None, replace: dict | None = None,
) -> FlameFixture:
    """Write a FLAME-format pickle to ``folder/name`` and return what went into it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = make_flame_arrays(seed)
    with fake_chumpy() as Ch:
        payload = {
            "v_template": Ch(a["v_template"]),
            "f": a["f"],
            "shapedirs": Ch(a["shapedirs"]),
            "posedirs": a["posedirs"],
            "J_regressor": scipy.sparse.csc_matrix(a["J_regressor"]),
            "weights": a["weights"],
            "kintree_table": a["kintree_table"],
            "J": a["J_regressor"] @ a["v_template"],
            "bs_style": "lbs",
            "bs_type": "lrotmin",
        }
        if with_uv:
            payload["vt"], payload["ft"] = a["vt"], a["ft"]
        if drop_key:
            payload.pop(drop_key)
        payload.update(replace or {})
        data = official_style_bytes(payload, protocol)
    assert "chumpy" not in sys.modules
    path = folder / name
    path.write_bytes(data)
    parents = a["kintree_table"][0].copy()
    parents[0] = -1
    return FlameFixture(
        path=path, v_template=a["v_template"], faces=a["f"].astype(np.int64), shapedirs=a["shapedirs"],
        posedirs=a["posedirs"], J_regressor=a["J_regressor"], weights=a["weights"], parents=parents,
        vt=a["vt"], ft=a["ft"], head_vertices=a["_head_vertices"], eye_vertices=a["_eye_vertices"],
    )


def write_masks(folder: Path, fx: FlameFixture) -> dict[str, np.ndarray]:
    """A FLAME_masks.pkl-style dict of vertex ids for the fixture mesh (protocol 2, plain numpy)."""
    v = fx.v_template
    head = fx.head_vertices
    hv = v[head]
    neck = head[hv[:, 1] < -0.075]
    scalp = head[(hv[:, 1] > 0.06) | (hv[:, 2] < -0.03)]
    ears = head[(np.abs(hv[:, 0]) > 0.06) & (np.abs(hv[:, 1]) < 0.03) & (hv[:, 2] > -0.03)]
    face = np.setdiff1d(head, np.concatenate([neck, scalp]))
    lips = head[np.linalg.norm(hv - np.array([0, MOUTH_POINT_Y, 0.08]), axis=1) < 0.045]
    masks = {
        "face": face, "scalp": scalp, "neck": neck, "lips": lips, "boundary": head[:3],
        "left_ear": ears[v[ears, 0] > 0], "right_ear": ears[v[ears, 0] < 0],
        "left_eyeball": fx.eye_vertices[0], "right_eyeball": fx.eye_vertices[1],
    }
    (Path(folder) / "FLAME_masks.pkl").write_bytes(pickle.dumps(masks, protocol=2))
    return masks
