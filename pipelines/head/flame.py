"""FLAME (Li et al. 2017) loaded from the official pickle files, without chumpy.

Works with FLAME 2020 ``generic_model.pkl``, FLAME 2023 ``flame2023.pkl`` and the FLAME 2023 Open / no-jaw variants.
The official pickles were written by Python 2 and hold ``chumpy.ch.Ch`` objects (e.g. ``shapedirs``) and a
``scipy.sparse.csc_matrix`` (``J_regressor``). :class:`FlamePickleLoader` reads them without chumpy: it maps every
``chumpy.*`` class to :class:`ChumpyStandIn`, which keeps the pickled state (a ``Ch`` stores its array under
``'x'``), lets numpy arrays and scipy sparse matrices load normally and refuses every other global, so a pickle
cannot run code while being read.

Model (paper eq. 11-12)::

    V_P = T + B_S(beta; S) + B_P(theta; P) + B_E(psi; E)
    V   = W(V_P, J(beta), theta, W)

with pose order (global, neck, jaw, eye_left, eye_right) and the pose correctives multiplying ``(R_j - I)`` of the
four non-root joints flattened row-major in that order, which is how FLAME's own code builds its pose feature from
``posedirs`` (V, 3, 36) reshaped to (36, V*3).

Optional assets next to the model (or in ``weights/flame/``):

* ``FLAME_masks.pkl`` (official FLAME vertex masks) -> per-face regions; otherwise a geometric heuristic
  (:func:`regions_from_geometry`).
* ``mediapipe_landmark_embedding.npz`` (official FLAME asset) -> MediaPipe landmark embedding.
* UVs: ``vt``/``ft`` keys in the pickle, else ``flame_vt.npy``/``flame_ft.npy`` next to it, else the layout shipped
  in the ``flame-model`` package (``flame_model/assets``).

The mouth cavity is closed following FlashAvatar [45] (``close_mouth``): a fan of triangles from the inner-lip
boundary loop to one new vertex pushed back into the mouth. New vertices and faces are appended, so every FLAME
vertex/face index (masks, landmark embeddings) stays valid.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import warnings
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # the Python 2 -> 3 name table pickle itself uses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, WeightsError
from .base import JOINT_NAMES, PARENTS, REGIONS, HeadModel, LandmarkEmbedding

FLAME_FIX = (
    "download FLAME from https://flame.is.tue.mpg.de and put generic_model.pkl in weights/flame/ "
    "or set FHAVATAR_FLAME"
)
# Every official FLAME file stores 300 identity components first, then the expression components.
FLAME_SHAPE_COMPONENTS = 300
REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
MASKS_FILENAMES = ("FLAME_masks.pkl", "FLAME_masks/FLAME_masks.pkl")
LANDMARK_FILENAMES = (
    "mediapipe_landmark_embedding.npz",
    "mediapipe_landmark_embedding/mediapipe_landmark_embedding.npz",
)
UV_SIDECARS = (("flame_vt.npy", "flame_ft.npy"),)


@dataclass
class FlameConfig:
    """How to build a :class:`FlameHeadModel` from a FLAME file.

    n_shape / n_expr: identity / expression components kept (the tracker of the paper uses up to 300 / 100).
    close_mouth: add the mouth-cavity faces (the paper follows FlashAvatar [45]).
    masks_path / landmarks_path: explicit asset files; ``None`` searches next to the model, then ``weights/flame``.
    mouth_depth: how far the mouth-cavity centre sits behind the inner-lip loop, in loop radii.
    """

    n_shape: int = 300
    n_expr: int = 100
    close_mouth: bool = True
    masks_path: str | None = None
    landmarks_path: str | None = None
    mouth_depth: float = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Safe unpickling
# ----------------------------------------------------------------------------------------------------------------


class ChumpyStandIn:
    """Replaces any ``chumpy`` class while unpickling: keeps the pickled state, computes nothing.

    chumpy's ``Ch`` pickles as ``NEWOBJ``/``copyreg._reconstructor`` followed by ``BUILD`` with a state dict
    (``Ch.__getstate__`` returns a copy of ``__dict__``); a plain ``Ch`` keeps its value under ``'x'``.
    """

    chumpy_class = "chumpy.?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ passes whatever __getnewargs__ gave; chumpy's give none
        obj = super().__new__(cls)
        obj.state = {}
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs) -> None:  # copyreg._reconstructor may call base.__init__(obj, state)
        pass

    def __setstate__(self, state) -> None:
        # Protocol-2 BUILD may deliver (dict_state, slot_state).
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            state = {"x": state}
        self.state = state

    def array(self) -> np.ndarray:
        """The stored numeric value. Raises ValueError for chumpy expressions (they store operands, not values)."""
        if "x" in self.state:
            value = self.state["x"]
            if isinstance(value, ChumpyStandIn):
                return value.array()
            return np.asarray(value)
        if len(self.args) == 1 and not self.state:
            return np.asarray(self.args[0])
        raise ValueError(f"{self.chumpy_class} object stores no array (keys {sorted(self.state)})")

    def __repr__(self) -> str:
        return f"ChumpyStandIn({self.chumpy_class})"


_STANDINS: dict[str, type] = {}


def _chumpy_standin(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (ChumpyStandIn,), {"chumpy_class": key, "__module__": __name__})
    return _STANDINS[key]


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referred to a class/function a FLAME file never contains."""


class FlamePickleLoader(pickle.Unpickler):
    """Unpickler for FLAME files: numpy, scipy.sparse, chumpy stand-ins and a few builtins; nothing else.

    Names are first translated from Python 2 (``copy_reg``, ``__builtin__``) as the default unpickler would, and
    numpy's pre-2.0 ``numpy.core`` paths are sent to ``numpy._core`` (no deprecation shim is imported).
    """

    SAFE_BUILTINS = frozenset(
        {"object", "set", "frozenset", "list", "dict", "tuple", "slice", "complex", "bytearray", "bytes", "str",
         "int", "float", "bool", "range"}
    )
    NUMPY = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }
    SPARSE = frozenset({"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"})

    def find_class(self, module: str, name: str):
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        module = IMPORT_MAPPING.get(module, module)

        if module == "chumpy" or module.startswith("chumpy."):
            return _chumpy_standin(module, name)
        if module == "builtins" and name in self.SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module == "copyreg" and name in ("_reconstructor", "__newobj__"):
            return getattr(__import__("copyreg"), name)
        if (module, name) == ("_codecs", "encode"):  # Python 3 writes bytes this way at protocols < 3
            import codecs

            return codecs.encode
        if (module, name) in self.NUMPY:
            if module.startswith("numpy.core"):
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        if module.startswith("scipy.sparse") and name in self.SPARSE:
            import scipy.sparse

            return getattr(scipy.sparse, name)  # old pickles name scipy.sparse.csc; resolve without the shim
        raise RefusedGlobal(f"refers to '{module}.{name}', which a FLAME file never contains (refused for safety)")


def load_flame_pickle(path: str | Path, what: str = "FLAME file", fix: str = FLAME_FIX) -> object:
    """Read a (possibly Python 2, chumpy-containing) FLAME pickle safely. Raises WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} '{path}' does not exist", fix)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{what} '{path}' cannot be read ({e.strerror})", fix) from e
    if not data:
        raise WeightsError(f"{what} '{path}' is empty", fix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old numpy/scipy pickles trigger deprecation chatter
            return FlamePickleLoader(io.BytesIO(data), encoding="latin1").load()
    except RefusedGlobal as e:
        raise WeightsError(f"{what} '{path}' {e}", fix) from e
    except EOFError as e:
        raise WeightsError(f"{what} '{path}' is truncated (the pickle ends early)", fix) from e
    except Exception as e:  # noqa: BLE001 - anything else means "not a readable pickle"
        raise WeightsError(f"{what} '{path}' is not a readable pickle ({_one_line(e)})", fix) from e


def _one_line(e: BaseException, limit: int = 120) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_numpy(value: object) -> np.ndarray:
    """ndarray, chumpy stand-in or scipy sparse matrix -> dense ndarray. Raises ValueError otherwise."""
    if isinstance(value, ChumpyStandIn):
        return value.array()
    if isinstance(value, np.ndarray):
        return value
    import scipy.sparse

    if scipy.sparse.issparse(value):
        return _sparse_to_dense(value)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise ValueError(f"holds a {type(value).__name__}, not an array")


def _sparse_to_dense(m) -> np.ndarray:
    """Rebuild from the stored fields, so matrices pickled by old scipy versions (other private attributes) work."""
    import scipy.sparse

    d = m.__dict__
    shape = tuple(int(s) for s in (d.get("_shape") or d.get("shape") or m.shape))
    fmt = type(m).__name__[:3]
    if fmt in ("csc", "csr"):
        build = scipy.sparse.csc_matrix if fmt == "csc" else scipy.sparse.csr_matrix
        return build((np.asarray(d["data"]), np.asarray(d["indices"]), np.asarray(d["indptr"])), shape=shape).toarray()
    if fmt == "coo":
        row = d.get("row", d.get("coords", (None, None))[0])
        col = d.get("col", d.get("coords", (None, None))[1])
        ij = (np.asarray(row), np.asarray(col))
        return scipy.sparse.coo_matrix((np.asarray(d["data"]), ij), shape=shape).toarray()
    return m.toarray()


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating a FLAME file
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FlameArrays:
    """The numpy content of a FLAME file after validation (float64 / int64)."""

    v_template: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3)
    shapedirs: np.ndarray  # (V, 3, n_shape)
    exprdirs: np.ndarray  # (V, 3, n_expr)
    posedirs: np.ndarray  # (36, V*3)
    J_regressor: np.ndarray  # (5, V) dense
    weights: np.ndarray  # (V, 5)
    parents: np.ndarray  # (5,)
    vt: np.ndarray | None  # (T, 2) or None
    ft: np.ndarray | None  # (F, 3) or None


def read_flame_file(path: str | Path, n_shape: int = 300, n_expr: int = 100) -> FlameArrays:
    """Load and validate a FLAME pickle. Every problem raises WeightsError naming the file, the fault and the fix."""
    path = Path(path)
    if not 0 <= n_shape <= FLAME_SHAPE_COMPONENTS:
        raise ConfigError(
            f"n_shape={n_shape} is out of range", f"use 0..{FLAME_SHAPE_COMPONENTS} FLAME shape components"
        )
    if n_expr < 0:
        raise ConfigError(f"n_expr={n_expr} is negative", "use 0..100 FLAME expression components")
    raw = load_flame_pickle(path)

    def bad(what: str) -> WeightsError:
        return WeightsError(f"FLAME file '{path}' is not a usable FLAME model: {what}", FLAME_FIX)

    if not isinstance(raw, dict):
        raise bad(f"it holds a {type(raw).__name__}, expected a dict with keys {', '.join(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise bad(f"missing key '{key}'")

    def arr(key: str) -> np.ndarray:
        try:
            a = as_numpy(raw[key])
        except ValueError as e:
            raise bad(f"'{key}' {e}") from e
        if a.dtype == object or not np.issubdtype(a.dtype, np.number):
            raise bad(f"'{key}' is not numeric (dtype {a.dtype})")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise bad(f"'{key}' contains NaN or inf")
        return a

    def expect(key: str, a: np.ndarray, ok: bool, expected: str) -> None:
        if not ok:
            raise bad(f"{key} has shape {tuple(a.shape)}, expected {expected}")

    v = arr("v_template").astype(np.float64)
    expect("v_template", v, v.ndim == 2 and v.shape[1] == 3 and v.shape[0] >= 4, "(V,3)")
    V = v.shape[0]
    f = arr("f")
    expect("f", f, f.ndim == 2 and f.shape[1] == 3 and f.shape[0] >= 1, "(F,3)")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= V:
        raise bad(f"'f' indexes vertices {f.min()}..{f.max()} but v_template has {V}")

    need = FLAME_SHAPE_COMPONENTS + n_expr if n_expr > 0 else n_shape
    sd = arr("shapedirs")
    expect("shapedirs", sd, sd.ndim == 3 and sd.shape[:2] == (V, 3) and sd.shape[2] >= need, f"({V},3,>={need})")
    shapedirs = sd[:, :, :n_shape].astype(np.float64)
    exprdirs = sd[:, :, FLAME_SHAPE_COMPONENTS : FLAME_SHAPE_COMPONENTS + n_expr].astype(np.float64)

    J = len(JOINT_NAMES)
    P = (J - 1) * 9
    pd = arr("posedirs")
    expect("posedirs", pd, pd.shape in ((V, 3, P), (V * 3, P)), f"({V},3,{P})")
    # FLAME: posedirs (V, 3, 36) -> (V*3, 36) -> transpose, so row k is the offset field of pose feature k.
    posedirs = pd.reshape(V * 3, P).T.astype(np.float64)

    jr = arr("J_regressor").astype(np.float64)
    expect("J_regressor", jr, jr.shape == (J, V), f"({J},{V})")
    w = arr("weights").astype(np.float64)
    expect("weights", w, w.shape == (V, J), f"({V},{J})")
    kt = arr("kintree_table")
    expect("kintree_table", kt, kt.shape == (2, J), f"(2,{J})")
    parents = kt[0].astype(np.int64)
    parents[0] = -1  # stored as uint32 max (4294967295) in the official files
    if tuple(parents.tolist()) != PARENTS:
        raise bad(f"kintree_table parents {tuple(parents.tolist())}, expected FLAME's {PARENTS}")

    vt = ft = None
    if "vt" in raw and "ft" in raw:
        vt, ft = arr("vt").astype(np.float64), arr("ft").astype(np.int64)
        _check_uv(vt, ft, len(f), f"FLAME file '{path}' keys vt/ft")
    return FlameArrays(v, f, shapedirs, exprdirs, posedirs, jr, w, parents, vt, ft)


def _check_uv(vt: np.ndarray, ft: np.ndarray, n_faces: int, source: str) -> None:
    if vt.ndim != 2 or vt.shape[1] != 2 or ft.shape != (n_faces, 3) or ft.min() < 0 or ft.max() >= len(vt):
        raise WeightsError(
            f"{source}: UV layout vt {tuple(vt.shape)} / ft {tuple(ft.shape)} does not fit a mesh of {n_faces} faces",
            "supply vt (T,2) and ft (F,3) matching the model's faces",
        )


def packaged_flame_uv() -> tuple[np.ndarray, np.ndarray] | None:
    """FLAME's UV layout (vt (5118, 2), ft (9976, 3)) from the installed ``flame-model`` package, or None.

    Located through the package spec rather than ``importlib.resources.files``: the latter would import
    ``flame_model/__init__.py`` (its own FLAME layer with smplx) just to find two data files.
    """
    spec = importlib.util.find_spec("flame_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    assets = Path(list(spec.submodule_search_locations)[0]) / "assets"
    vt_path, ft_path = assets / "flame_vt.npy", assets / "flame_ft.npy"
    if not (vt_path.is_file() and ft_path.is_file()):
        return None
    return np.load(vt_path).astype(np.float64), np.load(ft_path).astype(np.int64)


def find_uv_layout(arrays: FlameArrays, model_path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(vt, ft, source): pickle keys, then sidecar ``flame_vt.npy``/``flame_ft.npy``, then the packaged layout."""
    n_faces = len(arrays.faces)
    if arrays.vt is not None:
        return arrays.vt, arrays.ft, "pickle vt/ft"
    for vt_name, ft_name in UV_SIDECARS:
        vt_path, ft_path = model_path.parent / vt_name, model_path.parent / ft_name
        if vt_path.is_file() and ft_path.is_file():
            vt, ft = np.load(vt_path).astype(np.float64), np.load(ft_path).astype(np.int64)
            _check_uv(vt, ft, n_faces, f"'{vt_path}'")
            return vt, ft, str(vt_path.name)
    packaged = packaged_flame_uv()
    if packaged is not None and len(packaged[1]) == n_faces:
        return packaged[0], packaged[1], "flame_model package"
    raise WeightsError(
        f"FLAME file '{model_path}' has {n_faces} faces and no UV layout fits it "
        f"(the flame-model package layout is for 9976 faces{'' if packaged else ' and is not installed'})",
        "install flame-model==0.0.3, or put flame_vt.npy/flame_ft.npy next to the model, or add vt/ft keys",
    )


# ----------------------------------------------------------------------------------------------------------------
# Mesh utilities: components and boundary loops
# ----------------------------------------------------------------------------------------------------------------


def connected_components(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """(V,) component label per vertex (vertices in no face get their own label)."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components as cc

    e = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    adj = scipy.sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices))
    return cc(adj, directed=False)[1]


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a consistently oriented mesh, each (n,) vertex ids in the faces' edge direction.

    A directed edge a->b is on the boundary when no face has b->a. Loops that pinch (a vertex with two outgoing
    boundary edges) are not returned.
    """
    e = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).astype(np.int64)
    n = int(faces.max()) + 1
    key, rev = e[:, 0] * n + e[:, 1], e[:, 1] * n + e[:, 0]
    be = e[~np.isin(key, rev)]
    starts, counts = np.unique(be[:, 0], return_counts=True)
    pinched = set(starts[counts > 1].tolist())
    nxt = {int(a): int(b) for a, b in be if int(a) not in pinched}
    loops, seen = [], set()
    for start in list(nxt):
        if start in seen:
            continue
        loop, cur = [], start
        while cur in nxt and cur not in seen:
            seen.add(cur)
            loop.append(cur)
            cur = nxt[cur]
        if cur == start and len(loop) >= 3:
            loops.append(np.asarray(loop, dtype=np.int64))
    return loops


# ----------------------------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------------------------

# FLAME_masks.pkl key -> REGIONS name. Lips, nose, forehead and eye regions are part of the face surface; 'mouth'
# is the mouth cavity (the faces added by close_mouth). 'boundary' is FLAME's outer rim and carries no region.
MASK_TO_REGION = {
    "left_eyeball": "eyes", "right_eyeball": "eyes",
    "left_ear": "ears", "right_ear": "ears",
    "neck": "neck",
    "scalp": "scalp",
    "face": "face", "lips": "face", "nose": "face", "forehead": "face",
    "eye_region": "face", "left_eye_region": "face", "right_eye_region": "face",
}
# When a vertex is in several masks (FLAME's 'face' contains 'lips', ...), the first of these wins.
REGION_PRIORITY = ("eyes", "ears", "neck", "scalp", "face")


def faces_from_vertex_labels(vertex_region: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) region per face: the label most of its vertices carry (ties -> REGION_PRIORITY order)."""
    labels = vertex_region[faces]  # (F, 3)
    order = [REGIONS[r] for r in REGION_PRIORITY] + [REGIONS["other"]]
    counts = np.stack([(labels == r).sum(1) for r in order], 1)  # (F, R) in priority order
    return np.asarray(order)[counts.argmax(1)]  # argmax keeps the first (highest priority) on ties


def regions_from_masks(masks: dict, faces: np.ndarray, n_vertices: int, source: str) -> np.ndarray:
    """Per-face regions from FLAME_masks.pkl ({name: vertex ids}). Unlisted vertices are 'other'."""
    vertex_region = np.full(n_vertices, REGIONS["other"], dtype=np.int64)
    for region in reversed(REGION_PRIORITY):  # lowest priority first, so higher ones overwrite
        for key, name in MASK_TO_REGION.items():
            if name != region or key not in masks:
                continue
            try:
                ids = as_numpy(masks[key]).astype(np.int64).ravel()
            except ValueError as e:
                raise WeightsError(f"FLAME masks '{source}' key '{key}' {e}", "re-download FLAME_masks.pkl") from e
            if ids.size and (ids.min() < 0 or ids.max() >= n_vertices):
                raise WeightsError(
                    f"FLAME masks '{source}' key '{key}' indexes vertex {ids.max()} but the model has {n_vertices}",
                    "use the FLAME_masks.pkl that belongs to this FLAME version",
                )
            vertex_region[ids] = REGIONS[region]
    return faces_from_vertex_labels(vertex_region, faces)


def regions_from_geometry(verts: np.ndarray, faces: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """Per-face regions (eyes, scalp, neck, face) from the template geometry, when FLAME_masks.pkl is absent.

    Approximate by design; no ears/mouth regions. Conventions: y up, face along +z (FLAME's).

    * eyes: every connected component except the largest (the head). In FLAME 2020's layout these are the two
      eyeballs, vertices 3931-4476 and 4477-5022 (546 each); the rule does not rely on those numbers.
    * neck: below the jaw line, a side-view (z, y) line from the chin (the lowest head vertex in the front 20% of
      the head's depth) back to the jaw joint, continued horizontally at the jaw joint's height behind it.
    * scalp: above the forehead (eye height + 45% of the way up to the crown) or behind the ears (the jaw joint's
      depth minus 15% of the head length), and not neck.
    * face: the rest.
    """
    V = len(verts)
    comp = connected_components(faces, V)
    used = np.unique(faces)
    head_label = np.bincount(comp[used]).argmax()
    is_head = comp == head_label
    hv = verts[is_head & np.isin(np.arange(V), used)]
    jaw = joints[JOINT_NAMES.index("jaw")]
    eye_y = joints[[JOINT_NAMES.index("eye_left"), JOINT_NAMES.index("eye_right")], 1].mean()
    top_y = hv[:, 1].max()
    front_z, back_z = hv[:, 2].max(), hv[:, 2].min()
    front_part = hv[:, 2] > front_z - 0.2 * (front_z - back_z)  # nose, lips, chin; not the throat
    chin_y, chin_z = hv[front_part][np.argmin(hv[front_part, 1])][1:3]

    y, z = verts[:, 1], verts[:, 2]
    t = np.clip((z - jaw[2]) / max(chin_z - jaw[2], 1e-9), 0.0, 1.0)
    jaw_line = jaw[1] + t * (chin_y - jaw[1])
    neck = y < jaw_line
    forehead_y = eye_y + 0.45 * (top_y - eye_y)
    ear_back_z = jaw[2] - 0.15 * (front_z - back_z)
    scalp = ~neck & ((y > forehead_y) | (z < ear_back_z))

    vertex_region = np.full(V, REGIONS["face"], dtype=np.int64)
    vertex_region[scalp] = REGIONS["scalp"]
    vertex_region[neck] = REGIONS["neck"]
    vertex_region[~is_head] = REGIONS["eyes"]
    return faces_from_vertex_labels(vertex_region, faces)


# ----------------------------------------------------------------------------------------------------------------
# Mouth cavity (FlashAvatar [45]-style)
# ----------------------------------------------------------------------------------------------------------------


def find_mouth_loop(verts: np.ndarray, faces: np.ndarray, joints: np.ndarray) -> np.ndarray | None:
    """The inner-lip boundary loop, or None.

    FLAME's mesh is open at the neck, at the mouth and around the eyes. The mouth loop is the most frontal (+z)
    loop whose centre lies below the eyes and in front of the jaw joint; the neck loop sits further back and the
    eye loops are at eye height.
    """
    eye_y = joints[[JOINT_NAMES.index("eye_left"), JOINT_NAMES.index("eye_right")], 1].min()
    jaw = joints[JOINT_NAMES.index("jaw")]
    margin = 0.1 * abs(eye_y - jaw[1])
    best, best_z = None, -np.inf
    for loop in boundary_loops(faces):
        c = verts[loop].mean(0)
        if c[1] < eye_y - margin and c[2] > jaw[2] and c[2] > best_z:
            best, best_z = loop, c[2]
    return best


def free_uv_disk(vt: np.ndarray, ft: np.ndarray, grid: int = 128) -> tuple[np.ndarray, float]:
    """Centre (2,) and radius of the largest disk of the unit UV square that no triangle covers (coarse grid)."""
    from scipy.ndimage import binary_dilation, distance_transform_edt

    # Dense barycentric samples per triangle mark covered cells; a dilation closes gaps between samples.
    s = np.linspace(0.0, 1.0, 6)
    a, b = np.meshgrid(s, s, indexing="ij")
    keep = a + b <= 1.0
    bary = np.stack([1 - a[keep] - b[keep], a[keep], b[keep]], 1)  # (S, 3)
    pts = np.einsum("sk,fkd->fsd", bary, vt[ft]).reshape(-1, 2)
    ij = np.clip((pts * grid).astype(np.int64), 0, grid - 1)
    covered = np.zeros((grid, grid), dtype=bool)
    covered[ij[:, 1], ij[:, 0]] = True
    covered = binary_dilation(covered, iterations=1)
    free = np.pad(~covered, 1, constant_values=False)  # the square's border counts as covered
    dist = distance_transform_edt(free)[1:-1, 1:-1]
    r, c = np.unravel_index(np.argmax(dist), dist.shape)
    return np.array([(c + 0.5) / grid, (r + 0.5) / grid]), float(max(dist[r, c] - 1.0, 0.5) / grid)


@dataclass
class MouthCavity:
    loop: np.ndarray  # (n,) inner-lip vertex ids
    centre: np.ndarray  # (3,) new vertex position
    faces: np.ndarray  # (n, 3) new faces (centre id = V)
    uv: np.ndarray  # (n+1, 2) new UV coords: loop then centre
    uv_faces: np.ndarray  # (n, 3) indices into the full (T+n+1) UV table


def build_mouth_cavity(
    verts: np.ndarray, faces: np.ndarray, vt: np.ndarray, ft: np.ndarray, joints: np.ndarray, depth: float = 0.5
) -> MouthCavity | None:
    """Fan from the inner-lip loop to a centre pushed back by ``depth`` loop radii along -z (into the mouth).

    The fan faces take the loop's edges reversed (b, a, centre), so they are oriented like their neighbours. Their
    UVs are a front-view projection of the loop placed in the largest UV area no triangle uses.
    """
    loop = find_mouth_loop(verts, faces, joints)
    if loop is None:
        return None
    V, T = len(verts), len(vt)
    p = verts[loop]
    c = p.mean(0)
    radius = np.linalg.norm(p - c, axis=1).mean()
    centre = c - np.array([0.0, 0.0, depth * radius])
    a, b = loop, np.roll(loop, -1)
    new_faces = np.stack([b, a, np.full_like(a, V)], 1)

    disk_c, disk_r = free_uv_disk(vt, ft)
    xy = p[:, :2] - c[:2]
    xy = xy / max(np.linalg.norm(xy, axis=1).max(), 1e-12) * (0.9 * disk_r)
    uv = np.concatenate([disk_c + xy, disk_c[None]], 0)
    n = len(loop)
    ia = T + np.arange(n)
    new_uv_faces = np.stack([np.roll(ia, -1), ia, np.full(n, T + n)], 1)
    return MouthCavity(loop, centre, new_faces, uv, new_uv_faces)


@dataclass
class RiggedMesh:
    """Everything per vertex / per face that the mouth cavity extends (numpy)."""

    v: np.ndarray  # (V, 3)
    f: np.ndarray  # (F, 3)
    vt: np.ndarray  # (T, 2)
    ft: np.ndarray  # (F, 3)
    region: np.ndarray  # (F,)
    shapedirs: np.ndarray  # (V, 3, S)
    exprdirs: np.ndarray  # (V, 3, E)
    posedirs: np.ndarray  # (P, V*3)
    J_regressor: np.ndarray  # (J, V)
    weights: np.ndarray  # (V, J)


def attach_mouth_cavity(mesh: RiggedMesh, cavity: MouthCavity) -> RiggedMesh:
    """Append the cavity's centre vertex, fan faces and UVs; existing vertex and face ids are unchanged.

    The centre follows the lips under shape / expression / pose correctives (mean of the loop's rows), does not
    move the joints (zero J_regressor column) and is skinned half head (neck joint) / half jaw, so it opens
    halfway with the jaw.
    """
    V, loop = len(mesh.v), cavity.loop
    P = mesh.posedirs.shape[0]
    pd = mesh.posedirs.reshape(P, V, 3)
    w_centre = np.zeros((1, mesh.weights.shape[1]))
    w_centre[0, [JOINT_NAMES.index("neck"), JOINT_NAMES.index("jaw")]] = 0.5
    return RiggedMesh(
        v=np.concatenate([mesh.v, cavity.centre[None]]),
        f=np.concatenate([mesh.f, cavity.faces]),
        vt=np.concatenate([mesh.vt, cavity.uv]),
        ft=np.concatenate([mesh.ft, cavity.uv_faces]),
        region=np.concatenate([mesh.region, np.full(len(cavity.faces), REGIONS["mouth"])]),
        shapedirs=np.concatenate([mesh.shapedirs, mesh.shapedirs[loop].mean(0, keepdims=True)]),
        exprdirs=np.concatenate([mesh.exprdirs, mesh.exprdirs[loop].mean(0, keepdims=True)]),
        posedirs=np.concatenate([pd, pd[:, loop].mean(1, keepdims=True)], 1).reshape(P, -1),
        J_regressor=np.concatenate([mesh.J_regressor, np.zeros((len(mesh.J_regressor), 1))], 1),
        weights=np.concatenate([mesh.weights, w_centre]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Landmarks
# ----------------------------------------------------------------------------------------------------------------


def read_mediapipe_embedding(path: Path, n_faces: int) -> LandmarkEmbedding:
    """FLAME's official ``mediapipe_landmark_embedding.npz`` (lmk_face_idx, lmk_b_coords, landmark_indices)."""
    fix = "re-download mediapipe_landmark_embedding.npz from the FLAME website (it must match this FLAME mesh)"
    try:
        with np.load(path, allow_pickle=False) as z:
            face_idx = np.asarray(z["lmk_face_idx"]).astype(np.int64).ravel()
            bary = np.asarray(z["lmk_b_coords"], dtype=np.float64).reshape(-1, 3)
            mp_index = np.asarray(z["landmark_indices"]).astype(np.int64).ravel()
    except KeyError as e:
        raise WeightsError(f"landmark embedding '{path}' is missing key {e}", fix) from e
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"landmark embedding '{path}' is not a readable .npz ({_one_line(e)})", fix) from e
    if not (len(face_idx) == len(bary) == len(mp_index)) or face_idx.min() < 0 or face_idx.max() >= n_faces:
        raise WeightsError(f"landmark embedding '{path}' does not fit a mesh of {n_faces} faces", fix)
    if mp_index.min() < 0 or mp_index.max() >= 478:
        raise WeightsError(f"landmark embedding '{path}' has MediaPipe indices outside 0..477", fix)
    return LandmarkEmbedding(
        mp_index=torch.from_numpy(mp_index),
        faces=torch.from_numpy(face_idx),
        bary=torch.from_numpy(bary).float(),
    )


def _default_asset_dirs(model_path: Path) -> list[Path]:
    repo_weights = Path(__file__).resolve().parents[2] / "weights" / "flame"
    dirs = [model_path.parent]
    if repo_weights.resolve() != model_path.parent.resolve():
        dirs.append(repo_weights)
    return dirs


def _find_asset(explicit: str | None, names: tuple[str, ...], model_path: Path) -> Path | None:
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise WeightsError(
                f"FLAME asset '{p}' does not exist", "fix the path or leave it unset to search weights/flame/"
            )
        return p
    for d in _default_asset_dirs(model_path):
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


# ----------------------------------------------------------------------------------------------------------------
# The head model
# ----------------------------------------------------------------------------------------------------------------


class FlameHeadModel(HeadModel):
    """FLAME behind the :class:`HeadModel` interface.

    Args:
        path: an official FLAME pickle (generic_model.pkl, flame2023.pkl, ...).
        config: see :class:`FlameConfig` (defaults: 300 shape / 100 expression components, mouth closed).

    Buffers as in :class:`HeadModel`; with ``close_mouth`` the last vertex is the mouth-cavity centre (skinned
    half head (neck joint) / half jaw, blendshapes = mean of the inner-lip loop's) and the last faces are the
    cavity fan (region 'mouth'). The landmark embedding is stored as buffers so ``.to(device)`` moves it.
    """

    kind = "flame"

    def __init__(self, path: str | Path, config: FlameConfig | None = None) -> None:
        super().__init__()
        cfg = config or FlameConfig()
        self.config = cfg
        self.source = Path(path)
        self.name = f"flame:{self.source.stem}"
        arrays = read_flame_file(self.source, cfg.n_shape, cfg.n_expr)
        vt, ft, self.uv_source = find_uv_layout(arrays, self.source)
        self.num_flame_vertices = len(arrays.v_template)
        self.num_flame_faces = len(arrays.faces)
        joints = arrays.J_regressor @ arrays.v_template
        region, self.region_source = self._regions(arrays, joints)
        mesh = RiggedMesh(arrays.v_template, arrays.faces, vt, ft, region, arrays.shapedirs, arrays.exprdirs,
                          arrays.posedirs, arrays.J_regressor, arrays.weights)

        self.mouth_vertex: int | None = None
        self.num_mouth_faces = 0
        self.mouth_status = "not closed (close_mouth=False)"
        if cfg.close_mouth:
            cavity = build_mouth_cavity(mesh.v, mesh.f, mesh.vt, mesh.ft, joints, cfg.mouth_depth)
            if cavity is None:
                self.mouth_status = "not closed: no inner-lip boundary loop found"
                warnings.warn(f"{self.source}: {self.mouth_status}; the mouth stays open", stacklevel=2)
            else:
                self.mouth_vertex, self.num_mouth_faces = len(mesh.v), len(cavity.faces)
                mesh = attach_mouth_cavity(mesh, cavity)
                self.mouth_status = f"closed: {len(cavity.faces)} faces on a {len(cavity.loop)}-vertex inner-lip loop"

        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        i64 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long)  # noqa: E731
        self.register_buffer("v_template", f32(mesh.v))
        self.register_buffer("faces", i64(mesh.f))
        self.register_buffer("uv_coords", f32(mesh.vt))
        self.register_buffer("uv_faces", i64(mesh.ft))
        self.register_buffer("shapedirs", f32(mesh.shapedirs))
        self.register_buffer("exprdirs", f32(mesh.exprdirs))
        self.register_buffer("posedirs", f32(mesh.posedirs))
        self.register_buffer("J_regressor", f32(mesh.J_regressor))
        self.register_buffer("lbs_weights", f32(mesh.weights))
        self.register_buffer("parents", i64(arrays.parents))
        self.register_buffer("face_region", i64(mesh.region))
        self.register_buffer("lmk_mp_index", None)
        self.register_buffer("lmk_faces", None)
        self.register_buffer("lmk_bary", None)

        lmk_path = _find_asset(cfg.landmarks_path, LANDMARK_FILENAMES, self.source)
        if lmk_path is not None:
            self.landmarks = read_mediapipe_embedding(lmk_path, self.num_flame_faces)
            self.landmark_source = lmk_path.name
        else:
            self._fallback_landmarks()

    def _regions(self, arrays: FlameArrays, joints: np.ndarray) -> tuple[np.ndarray, str]:
        """(F,) face regions and where they came from: FLAME_masks.pkl if found, else the geometric heuristic."""
        masks_path = _find_asset(self.config.masks_path, MASKS_FILENAMES, self.source)
        if masks_path is None:
            region = regions_from_geometry(arrays.v_template, arrays.faces, joints)
            return region, "geometric heuristic (no FLAME_masks.pkl)"
        fix = "re-download FLAME_masks.pkl from the FLAME website"
        masks = load_flame_pickle(masks_path, "FLAME masks", fix)
        if not isinstance(masks, dict):
            raise WeightsError(f"FLAME masks '{masks_path}' holds a {type(masks).__name__}, expected a dict", fix)
        return regions_from_masks(masks, arrays.faces, len(arrays.v_template), str(masks_path)), masks_path.name

    # -- landmarks live in buffers so they follow .to(device) and enter state_dict / head_model_id ----------------

    @property
    def landmarks(self) -> LandmarkEmbedding | None:  # type: ignore[override]
        if self.lmk_faces is None:
            return None
        return LandmarkEmbedding(mp_index=self.lmk_mp_index, faces=self.lmk_faces, bary=self.lmk_bary)

    @landmarks.setter
    def landmarks(self, value: LandmarkEmbedding | None) -> None:
        device = self.v_template.device
        if value is None:
            self.lmk_mp_index = self.lmk_faces = self.lmk_bary = None
            return
        self.lmk_mp_index = torch.as_tensor(value.mp_index, dtype=torch.long, device=device)
        self.lmk_faces = torch.as_tensor(value.faces, dtype=torch.long, device=device)
        self.lmk_bary = torch.as_tensor(value.bary, dtype=torch.float32, device=device)

    def _fallback_landmarks(self) -> None:
        """No official embedding was found: the model has no landmarks (``describe()`` says so).

        LANDMARK FALLBACK CALL SITE: ``pipelines/head/landmarks.py`` (``build_landmark_embedding(head, reference)``)
        is being written separately. Once it exists, wire it in here, e.g.
        ``self.landmarks = build_landmark_embedding(self, reference)`` with the reference it documents, and set
        ``self.landmark_source`` to say the embedding was derived rather than official.
        """
        self.landmarks = None
        self.landmark_source = "none (no mediapipe_landmark_embedding.npz next to the model or in weights/flame/)"

    # -- reporting ------------------------------------------------------------------------------------------------

    def rest_joints(self, shape: torch.Tensor) -> torch.Tensor:
        """(B, J, 3) rest joints J(beta) regressed from the shaped (identity-only) vertices, as eq. 12 uses them."""
        v_id = self.v_template[None] + torch.einsum("bc,vdc->bvd", shape, self.shapedirs)
        return torch.einsum("jv,bvd->bjd", self.J_regressor, v_id)

    def describe(self) -> str:
        counts = torch.bincount(self.face_region, minlength=len(REGIONS)).tolist()
        regions = ", ".join(f"{n} {counts[i]}" for n, i in REGIONS.items() if counts[i])
        lmk = f"{len(self.lmk_faces)} landmarks ({self.landmark_source})" if self.lmk_faces is not None else (
            f"landmarks: {self.landmark_source}"
        )
        return (
            f"FLAME '{self.source.name}': {self.num_vertices} vertices, {self.faces.shape[0]} faces, "
            f"{self.n_shape} shape / {self.n_expr} expression components; UV from {self.uv_source}; "
            f"regions from {self.region_source} ({regions}); mouth {self.mouth_status}; {lmk}"
        )
