"""The shipped ICT-FaceKit asset (``weights/ict_facekit/ict_head.npz``, MIT): find it, read it, check it.

The file is made once from ICT-FaceKit's OBJs by ``tools/make_ict_head.py`` (see there for what it keeps). Search
order: ``FHAVATAR_ICT`` (the file or its folder), then the repository's ``weights/ict_facekit/``. A damaged or
foreign file is refused with one line naming it.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import WeightsError

ENV_VAR = "FHAVATAR_ICT"
FILE_NAME = "ict_head.npz"
FORMAT = 1
ICT_FIX = ("restore it from the repository (git checkout weights/ict_facekit) or rebuild it with "
           "`python tools/make_ict_head.py`")
_KEYS = {  # name -> (dtype kind, ndim)
    "neutral": ("f", 2), "identity_q": ("i", 3), "identity_scale": ("f", 2), "expression_q": ("i", 3),
    "expression_scale": ("f", 2), "expression_names": ("U", 1), "faces": ("i", 2), "faces_uv": ("i", 2),
    "uvs": ("f", 2), "face_material": ("i", 1), "material_names": ("U", 1), "landmarks68": ("i", 1),
}


@dataclass(frozen=True)
class IctAsset:
    """ICT-FaceKit's numbers, in metres. V vertices, F triangles, T UVs, C identity and E expression components.

    neutral (V, 3); identity (C, V, 3) one standard deviation per component; expression (E, V, 3) full ARKit
    shapes (weight 1); faces, faces_uv (F, 3); uvs (T, 2) per-part tiles (u in [0, 7)); face_material (F,) index
    into material_names; landmarks68 (68,) vertex ids of the iBUG 68 points; source: provenance.
    """

    neutral: np.ndarray
    identity: np.ndarray
    expression: np.ndarray
    expression_names: tuple[str, ...]
    faces: np.ndarray
    faces_uv: np.ndarray
    uvs: np.ndarray
    face_material: np.ndarray
    material_names: tuple[str, ...]
    landmarks68: np.ndarray
    source: dict
    path: Path

    def material_faces(self, *names: str) -> np.ndarray:
        """Triangle ids of the named materials (e.g. ``"M_Teeth"``)."""
        ids = [self.material_names.index(n) for n in names]
        return np.flatnonzero(np.isin(self.face_material, ids))


def default_asset_path() -> Path:
    return Path(__file__).resolve().parents[3] / "weights" / "ict_facekit" / FILE_NAME


def find_asset() -> Path:
    """The asset file: ``FHAVATAR_ICT`` (file or folder) if set, else the repository's copy."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser()
        p = p / FILE_NAME if p.is_dir() else p
        if not p.is_file():
            raise WeightsError(f"{ENV_VAR} '{env}' is not an ICT head file ({FILE_NAME})", ICT_FIX)
        return p
    p = default_asset_path()
    if not p.is_file():
        raise WeightsError(f"the ICT head model file '{p}' is missing", ICT_FIX)
    return p


def load_asset(path: str | Path | None = None) -> IctAsset:
    """Read and check the asset; raises WeightsError (one line) for a missing, damaged or foreign file."""
    path = find_asset() if path is None else Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or int(z["format"]) != FORMAT:
                raise WeightsError(f"'{path}' is not an ICT head file of format {FORMAT}", ICT_FIX)
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise WeightsError(f"ICT head file '{path}' lacks {', '.join(missing)}", ICT_FIX)
            a = {k: z[k] for k in (*_KEYS, "source")}
    except WeightsError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise WeightsError(f"ICT head file '{path}' is unreadable or damaged ({type(e).__name__}: {e})", ICT_FIX) from e
    for k, (kind, ndim) in _KEYS.items():
        if not isinstance(a[k], np.ndarray):  # a member that is not an .npy array comes back as raw bytes
            raise WeightsError(f"ICT head file '{path}': '{k}' is not an array", ICT_FIX)
        if a[k].dtype.kind != kind or a[k].ndim != ndim:
            raise WeightsError(f"ICT head file '{path}': '{k}' has dtype {a[k].dtype} and {a[k].ndim} dims", ICT_FIX)
    V = a["neutral"].shape[0]
    F = a["faces"].shape[0]
    checks = [
        (a["neutral"].shape == (V, 3), "neutral"),
        (a["identity_q"].shape[1:] == (V, 3) and a["identity_scale"].shape == (a["identity_q"].shape[0], 3),
         "identity"),
        (a["expression_q"].shape[1:] == (V, 3) and a["expression_scale"].shape == (a["expression_q"].shape[0], 3)
         and len(a["expression_names"]) == a["expression_q"].shape[0], "expression"),
        (a["faces"].shape == (F, 3) and a["faces_uv"].shape == (F, 3) and a["face_material"].shape == (F,), "faces"),
        (F > 0 and a["faces"].min() >= 0 and a["faces"].max() < V, "face indices"),
        (a["faces_uv"].min() >= 0 and a["faces_uv"].max() < len(a["uvs"]), "UV indices"),
        (a["landmarks68"].shape == (68,) and a["landmarks68"].min() >= 0 and a["landmarks68"].max() < V, "landmarks"),
        (all(np.isfinite(a[k]).all() for k in ("neutral", "identity_scale", "expression_scale", "uvs")),
         "finite values"),
    ]
    bad = [name for ok, name in checks if not ok]
    if bad:
        raise WeightsError(f"ICT head file '{path}' is damaged ({', '.join(bad)} inconsistent)", ICT_FIX)
    f32 = np.float32
    return IctAsset(
        neutral=a["neutral"].astype(np.float64),
        identity=(a["identity_q"].astype(f32) * a["identity_scale"][:, None, :]).astype(np.float64),
        expression=(a["expression_q"].astype(f32) * a["expression_scale"][:, None, :]).astype(np.float64),
        expression_names=tuple(str(n) for n in a["expression_names"]),
        faces=a["faces"].astype(np.int64),
        faces_uv=a["faces_uv"].astype(np.int64),
        uvs=a["uvs"].astype(np.float64),
        face_material=a["face_material"].astype(np.int64),
        material_names=tuple(str(n) for n in a["material_names"]),
        landmarks68=a["landmarks68"].astype(np.int64),
        source=json.loads(str(a["source"])),
        path=path,
    )
