"""Make ``weights/ict_facekit/ict_head.npz``, the compact ICT-FaceKit asset that the ICT head model loads.

Input: ICT-FaceKit's ``ict_facekit.npz`` (MIT, ``../shared/assets/ict-facekit/``: the OBJs of the toolkit's
``FaceXModel`` folder as float32, see its README). What this keeps and how:

* Parts: face, back of head and neck, mouth socket, gums and tongue, teeth, eye sockets, sclera and iris (vertices
  0-24590). Left out: lacrimal fluid, eye blend and eye occlusion strips and eyelashes (thin transparent or
  hair-like shells that give Gaussians nothing: the lids' Gaussians cover them).
* Units: metres (the OBJs are in centimetres), axes unchanged (y up, the face looks along +z, x to the subject's left).
* Triangles: the OBJ's quads were fan-triangulated, so a quad and its mirror image are often split along different
  diagonals. Each quad on the subject's right (x < 0) is re-split along the mirror of its partner's diagonal, which
  makes the triangulation exactly mirror-symmetric away from the midline (UV mirroring then maps a surface point to its
  mirror image exactly, not up to a quad's bilinear bend).
* Identity: all 100 principal components as int8 with a per-component, per-axis scale (max error 0.05 mm per
  component); expressions: all 53 ARKit shapes as int16 (max error < 0.001 mm). The head model picks how many it uses.
* Landmarks: ICT's 68 iBUG landmark vertices (``idx_to_landmark_verts``).

Run once (the output is committed, with ICT-FaceKit's LICENSE beside it):
``python tools/make_ict_head.py [--src ../shared/assets/ict-facekit/ict_facekit.npz]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "assets" / "ict-facekit" / "ict_facekit.npz"
DEFAULT_OUT = REPO / "weights" / "ict_facekit" / "ict_head.npz"
SOURCE = {"repository": "ICT-VGL/ICT-FaceKit", "commit": "da5f95a607f5e6b37755b38d3385d7f2853732e5",
          "folder": "FaceXModel", "licence": "MIT (c) 2020 USC Institute for Creative Technologies"}
KEEP_VERTICES = 24591  # vertices 0..24590: everything up to and including the irises
DROPPED_MATERIALS = ("M_LacrimalFluid", "M_EyeBlend", "M_EyeOcclusion", "M_EyeLashes")


def quantize(deltas: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, V, 3) float -> integers of ``bits`` bits and a (C, 3) scale with deltas ~ q * scale."""
    top = 2 ** (bits - 1) - 1
    scale = np.abs(deltas).max(axis=1) / top  # (C, 3)
    scale[scale == 0] = 1.0
    q = np.round(deltas / scale[:, None, :]).astype(np.int8 if bits == 8 else np.int16)
    return q, scale.astype(np.float32)


def symmetric_triangulation(verts: np.ndarray, faces: np.ndarray, faces_uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-split mirrored quads along mirrored diagonals.

    The OBJ's quads were fan-triangulated into consecutive pairs (a, b, c), (a, c, d). A quad on the subject's right
    whose mirror quad (on the left) is split along the other diagonal is re-split as (b, c, d), (b, d, a).
    """
    mirror = cKDTree(verts).query(verts * [-1.0, 1.0, 1.0])[1]
    faces, faces_uv = faces.copy(), faces_uv.copy()
    pairs = [i for i in range(len(faces) - 1)
             if faces[i, 0] == faces[i + 1, 0] and faces[i, 2] == faces[i + 1, 1]]
    quads = {}
    for i in pairs:
        a, b, c = faces[i]
        d = faces[i + 1, 2]
        quads[frozenset((a, b, c, d))] = (i, (a, c))  # first triangle index, its diagonal
    changed = 0
    for key, (i, diag) in quads.items():
        a, b, c = faces[i]
        d = faces[i + 1, 2]
        if verts[[a, b, c, d], 0].mean() >= 0:
            continue
        partner = quads.get(frozenset(mirror[[a, b, c, d]]))
        if partner is None:
            continue
        want = {mirror[partner[1][0]], mirror[partner[1][1]]}
        if want == {a, c}:
            continue
        ta, tb, tc = faces_uv[i]
        td = faces_uv[i + 1, 2]
        faces[i], faces[i + 1] = (b, c, d), (b, d, a)
        faces_uv[i], faces_uv[i + 1] = (tb, tc, td), (tb, td, ta)
        changed += 1
    print(f"re-split {changed} of {len(quads)} quads along mirrored diagonals")
    return faces, faces_uv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    z = np.load(args.src)
    V = KEEP_VERTICES
    names = [str(n) for n in z["material_names"]]
    material = z["face_material"].astype(np.int64)
    keep = ~np.isin(material, [names.index(n) for n in DROPPED_MATERIALS])
    faces, faces_uv = z["faces"][keep].astype(np.int64), z["faces_uv"][keep].astype(np.int64)
    assert faces.max() < V, "kept triangles must use only the kept vertices"
    neutral = z["neutral"][:V].astype(np.float64) * 0.01
    faces, faces_uv = symmetric_triangulation(neutral, faces, faces_uv)
    used_uv = np.unique(faces_uv)
    remap = np.full(len(z["uvs"]), -1, dtype=np.int64)
    remap[used_uv] = np.arange(len(used_uv))
    identity_q, identity_scale = quantize(z["identity_deltas"][:, :V].astype(np.float64) * 0.01, 8)
    expression_q, expression_scale = quantize(z["expression_deltas"][:, :V].astype(np.float64) * 0.01, 16)
    meta = json.loads(str(z["vertex_indices_json"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        format=np.int64(1),
        neutral=neutral.astype(np.float32),
        identity_q=identity_q, identity_scale=identity_scale,
        expression_q=expression_q, expression_scale=expression_scale,
        expression_names=np.array([str(n) for n in z["expression_names"]]),
        faces=faces.astype(np.int32), faces_uv=remap[faces_uv].astype(np.int32),
        uvs=z["uvs"][used_uv].astype(np.float32),
        face_material=z["face_material"][keep].astype(np.int8),
        material_names=np.array(names),
        landmarks68=np.array(meta["idx_to_landmark_verts"], dtype=np.int32),
        source=np.array(json.dumps(SOURCE)),
    )
    shutil.copy(args.src.parent / "LICENSE", args.out.parent / "LICENSE")
    err_id = np.abs(identity_q * identity_scale[:, None] - z["identity_deltas"][:, :V] * 0.01).max()
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.2f} MB, {V} vertices, {len(faces)} triangles, "
          f"identity max error {err_id * 1e3:.3f} mm")


if __name__ == "__main__":
    main()
