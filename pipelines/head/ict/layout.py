"""A horizontally symmetric UV atlas for a mirror-symmetric mesh whose own UVs are per-part tiles (ICT-FaceKit).

The paper's symmetric fusion (eq. 4) flips UV maps (u -> 1 - u) to borrow the other half of the face, so the layout
must map a surface point and its mirror image (x -> -x) to mirrored texels. ICT-FaceKit's UVs are seven tiles of
islands (face, back of head, gums and tongue, teeth, eyes, ...) with left and right parts placed anywhere. This module
re-packs them into one unit square:

* **Items.** Each item is a set of UV islands that keeps its own relative layout (the face tile's front face and the
  surrounding ring, say) at one texel density (``Item.density``, relative to the face).
* **Symmetry.** An item is either *self-symmetric* (its mirror image is itself: the face, the tongue) or one of a
  *mirror pair* (a left tooth and its right twin). Self-symmetric items are made exactly symmetric about their own
  axis (the subject's right half takes the mirror of the left half's UVs) and centred on u = 0.5; of a pair, the
  subject's left member (x > 0) is placed on the right half of the atlas (u > 0.5) and its twin gets the mirrored
  UVs. Items whose own UVs are not symmetric within ``tolerance`` are re-parameterised by a two-sided planar
  projection (front-facing triangles above, back-facing ones below), whose u is the mirror-symmetric x coordinate.
* **Packing.** Self-symmetric items stack down the centre line; pair items are shelf-packed into the atlas' right
  half beside and below them; one global scale is found by bisection so that everything fits with ``gap_texels``
  texels between items. Corners that share a vertex and a UV position share one UV index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


@dataclass
class Item:
    """A group of triangles laid out together.

    name: for messages; faces: (n,) triangle ids; density: texels per metre relative to the face;
    symmetric: True for a self-symmetric item, False for the placed member of a mirror pair;
    twin: (m,) triangle ids of the mirror twin (pairs only), laid out as the mirror image of ``faces``.
    """

    name: str
    faces: np.ndarray
    density: float = 1.0
    symmetric: bool = True
    twin: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def mirror_vertices(verts: np.ndarray, tolerance: float = 1e-3) -> np.ndarray:
    """(V,) index of each vertex's mirror image (x -> -x), an involution (mirror[mirror[v]] == v); raises if the mesh
    is not symmetric within ``tolerance`` (metres). Vertices whose nearest mirror points do not pair up (near-
    coincident ones) are paired by an optimal assignment among themselves."""
    from scipy.optimize import linear_sum_assignment

    flipped = verts * np.array([-1.0, 1.0, 1.0])
    dist, idx = cKDTree(verts).query(flipped)
    if dist.max() > tolerance:
        raise ValueError(f"mesh is not mirror-symmetric: a vertex is {dist.max() * 1e3:.2f} mm from any mirror image")
    loose = np.flatnonzero(idx[idx] != np.arange(len(idx)))
    if len(loose):
        loose = np.union1d(loose, idx[loose])
        cost = np.linalg.norm(flipped[loose][:, None] - verts[loose][None], axis=-1)
        rows, cols = linear_sum_assignment(cost)
        idx[loose[rows]] = loose[cols]
    return idx


def uv_islands(faces_uv: np.ndarray, face_ids: np.ndarray) -> list[np.ndarray]:
    """Connected components (triangles sharing a UV index) of the triangles ``face_ids``, largest first."""
    n, T = len(face_ids), int(faces_uv.max()) + 1
    rows = np.repeat(np.arange(n), 3)
    cols = faces_uv[face_ids].ravel() + n
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n + T, n + T))
    _, label = connected_components(graph, directed=False)
    label = label[:n]
    groups = [face_ids[label == k] for k in np.unique(label)]
    return sorted(groups, key=len, reverse=True)


def mirror_island(island: np.ndarray, islands: list[np.ndarray], faces: np.ndarray, mirror: np.ndarray) -> int:
    """Index in ``islands`` of the island whose vertex set best matches the mirror image of ``island``'s (Jaccard
    index: islands share vertices along seams, so plain overlap would favour large neighbours)."""
    want = set(mirror[np.unique(faces[island])].tolist())
    scores = []
    for isl in islands:
        have = set(np.unique(faces[isl]).tolist())
        scores.append(len(want & have) / len(want | have))
    return int(np.argmax(scores))


def _face_ratio(verts: np.ndarray, faces: np.ndarray, uv: np.ndarray) -> float:
    """sqrt(3D area / UV area) of a set of triangles (``uv`` (n, 3, 2) per corner): metres per UV unit."""
    t = verts[faces]
    a3 = 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=-1).sum()
    e1, e2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    a2 = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()
    return float(np.sqrt(a3 / max(a2, 1e-20)))


def _corner_uv(faces: np.ndarray, faces_uv: np.ndarray, uvs: np.ndarray, face_ids: np.ndarray) -> dict[int, np.ndarray]:
    """vertex id -> its UV in these triangles (the first corner's, where a seam gives a vertex several)."""
    out: dict[int, np.ndarray] = {}
    for f in face_ids:
        for v, t in zip(faces[f], faces_uv[f]):
            out.setdefault(int(v), uvs[t])
    return out


def _symmetrize(corner: dict[int, np.ndarray], verts: np.ndarray, mirror: np.ndarray,
                tolerance: float) -> dict[int, np.ndarray] | None:
    """Per-vertex UVs made exactly symmetric about their best axis, or None when they are not symmetric within
    ``tolerance`` (a fraction of the item's UV width)."""
    ids = np.array(sorted(corner))
    uv = np.stack([corner[v] for v in ids])
    have = np.isin(mirror[ids], ids)
    if not have.all():
        return None
    partner = np.stack([corner[int(mirror[v])] for v in ids])
    axis = float(np.median(uv[:, 0] + partner[:, 0]) / 2)
    width = float(np.ptp(uv[:, 0])) + 1e-12
    err = max(np.abs(uv[:, 0] + partner[:, 0] - 2 * axis).max(), np.abs(uv[:, 1] - partner[:, 1]).max())
    if err > tolerance * width:
        return None
    out = {}
    for v, p in zip(ids, uv):
        x = verts[v, 0]
        if abs(x) < 1e-6 or mirror[v] == v:
            out[int(v)] = np.array([axis, p[1]])
        elif x > 0:
            out[int(v)] = p.copy()
    for v in ids:
        if int(v) not in out:
            q = out[int(mirror[v])]
            out[int(v)] = np.array([2 * axis - q[0], q[1]])
    return {v: np.array([uv_[0] - axis, uv_[1]]) for v, uv_ in out.items()}  # axis at u = 0


def _planar(verts: np.ndarray, faces: np.ndarray, face_ids: np.ndarray) -> tuple[np.ndarray, float]:
    """Two-sided planar projection of a self-symmetric item: per-corner UVs (n, 3, 2) with the symmetry axis at u = 0
    and metres per UV unit (1: coordinates are metres).

    The projection plane contains x and the in-plane direction of least normal alignment; triangles facing the
    plane's normal go above v = 0, the others (mirrored) below, so a folded surface (top and bottom of a tongue) does
    not overlap itself.
    """
    t = verts[faces[face_ids]]  # (n, 3, 3)
    normal = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
    yz = normal[:, 1:].sum(0)
    axis = yz / (np.linalg.norm(yz) + 1e-12)  # mean normal in the y-z plane: the projection direction
    other = np.array([-axis[1], axis[0]])  # the in-plane direction in the y-z plane
    front = normal[:, 1:] @ axis >= 0
    s = t[..., 1:] @ other  # (n, 3)
    lo = s.min()
    v = np.where(front[:, None], s - lo + 0.001, -(s - lo) - 0.001)  # 1 mm apart at the fold
    return np.stack([t[..., 0], v], -1), 1.0


def _mirror_corners(verts: np.ndarray, faces: np.ndarray, primary: np.ndarray, corner_uv: np.ndarray,
                    twin: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """(m, 3, 2) UVs of the twin triangles: each corner takes the mirrored UV (u -> -u) of its partner corner in the
    mirror-image primary triangle (per corner, so seams inside an island stay seams). A twin triangle without an exact
    mirror image (rare) takes, per corner, the UV of the nearest primary vertex to its mirror point."""
    by_key = {frozenset(tri.tolist()): k for k, tri in enumerate(faces[primary])}
    per_vertex: dict[int, np.ndarray] = {}
    for tri, c in zip(faces[primary], corner_uv):
        for v, q in zip(tri, c):
            per_vertex.setdefault(int(v), q)
    ids = np.array(sorted(per_vertex))
    nearest = cKDTree(verts[ids])
    out = np.zeros((len(twin), 3, 2))
    for t, tri in enumerate(faces[twin]):
        k = by_key.get(frozenset(mirror[tri].tolist()))
        for c, v in enumerate(tri):
            if k is not None:
                q = corner_uv[k][list(faces[primary[k]]).index(mirror[v])]
            else:
                q = per_vertex.get(int(mirror[v]))
                if q is None:
                    q = per_vertex[int(ids[nearest.query(verts[v] * np.array([-1.0, 1.0, 1.0]))[1]])]
            out[t, c] = (-q[0], q[1])
    return out


@dataclass
class _Placed:
    item: Item
    corner_uv: np.ndarray  # (n, 3, 2) per-corner UVs of item.faces, axis (self) or left edge (pairs) at u = 0
    twin_uv: np.ndarray  # (m, 3, 2) for the twin, in the same frame (mirrored)
    width: float
    height: float


def _item_uvs(item: Item, verts, faces, faces_uv, uvs, mirror, tolerance) -> _Placed:
    """The item's UVs in metres (its own UVs rescaled isotropically by their 3D/UV ratio), before packing.

    Self-symmetric items have their axis at u = 0 (``width`` is the half width); pairs their left edge at u = 0.
    Both have their bottom at v = 0.
    """
    fa = faces[item.faces]
    own = uvs[faces_uv[item.faces]]  # (n, 3, 2)
    twin = np.zeros((0, 3, 2))
    if item.symmetric:
        corner = _symmetrize(_corner_uv(faces, faces_uv, uvs, item.faces), verts, mirror, tolerance)
        if corner is None:
            cuv, ratio = _planar(verts, faces, item.faces)
        else:
            cuv = np.stack([[corner[int(v)] for v in tri] for tri in fa])
            ratio = _face_ratio(verts, fa, own)
        cuv = cuv * ratio * item.density
        cuv[..., 1] -= cuv[..., 1].min()
        width = float(np.abs(cuv[..., 0]).max())
    else:
        cuv = own * _face_ratio(verts, fa, own) * item.density
        cuv = cuv - cuv.reshape(-1, 2).min(0)
        if cuv[..., 1].max() > cuv[..., 0].max():  # landscape packs better on shelves (a pair may turn freely)
            cuv = np.stack([cuv[..., 1], cuv[..., 0].max() - cuv[..., 0]], -1)
        width = float(cuv[..., 0].max())
        twin = _mirror_corners(verts, faces, item.faces, cuv, item.twin, mirror)
    return _Placed(item, cuv, twin, width, float(cuv[..., 1].max()))


def _fill(items: list[_Placed], x0: float, x1: float, top: float, bottom: float, scale: float, gap: float
          ) -> tuple[list[tuple[_Placed, float, float]], list[_Placed]]:
    """Shelf-pack pair items (tallest first) into the box [x0, x1] x [bottom, top]: (placed (item, left u, top v),
    the items that did not fit)."""
    placed, rest = [], sorted(items, key=lambda p: -p.height)
    while rest:
        first = next((p for p in rest if p.width * scale <= x1 - x0 + 1e-12 and p.height * scale <= top - bottom + 1e-12),
                     None)
        if first is None:
            break
        h, x, keep = first.height * scale, x0, []
        for p in rest:
            w = p.width * scale
            if p.height * scale <= h + 1e-12 and x + w <= x1 + 1e-12:
                placed.append((p, x, top))
                x += w + gap
            else:
                keep.append(p)
        rest = keep
        top -= h + gap
    return placed, rest


def _pack(placed: list[_Placed], scale: float, gap: float) -> list[tuple[_Placed, float, float]] | None:
    """Pack the atlas' right half at ``scale`` (UV units per metre): [(item, left u, top v)], or None when it does not
    fit in the unit square.

    Self-symmetric items stack down the centre line (their other half lies on the left side); the pair items fill
    the room beside each of them, then the rest below, by shelves (their twins mirror them on the left side).
    """
    centre = sorted((p for p in placed if p.item.symmetric), key=lambda p: -p.height)
    pairs = [p for p in placed if not p.item.symmetric]
    out: list[tuple[_Placed, float, float]] = []
    top, x_pair = 1.0 - gap, 0.5 + 0.5 * gap  # a pair's twin ends 0.5 * gap left of the centre line
    for c in centre:
        h, w = c.height * scale, c.width * scale
        if top - h < gap - 1e-12 or 0.5 + w > 1.0 - gap:
            return None
        out.append((c, 0.5, top))
        beside, pairs = _fill(pairs, 0.5 + w + gap, 1.0 - gap, top, top - h, scale, gap)
        out += beside
        top -= h + gap
    below, pairs = _fill(pairs, x_pair, 1.0 - gap, top, gap, scale, gap)
    return None if pairs else out + below


def split_halves(face_ids: np.ndarray, faces: np.ndarray, verts: np.ndarray, mirror: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A self-symmetric set of triangles as a mirror pair of halves: (subject's left half x > 0, right half).

    Lets a symmetric part be packed anywhere, at the price of a seam along its midline (the face is kept whole).
    """
    cx = verts[faces[face_ids]].mean(1)[:, 0]
    return face_ids[cx >= 0], face_ids[cx < 0]


def symmetric_atlas(verts: np.ndarray, faces: np.ndarray, faces_uv: np.ndarray, uvs: np.ndarray, items: list[Item],
                    mirror: np.ndarray, resolution: int = 256, gap_texels: float = 2.0,
                    tolerance: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``items`` into one mirror-symmetric unit square.

    Args:
        verts (V, 3) metres, faces (F, 3), faces_uv (F, 3) and uvs (T, 2): the mesh and its own UVs.
        items: every triangle in exactly one item (as ``faces`` or ``twin``).
        mirror: (V,) mirror vertex of each vertex (:func:`mirror_vertices`).
        resolution: the map size K the gaps are measured for (``gap_texels`` texels between items).
        tolerance: how far (a fraction of an item's width) its own UVs may be from symmetric before it is
            re-parameterised by a planar projection.
    Returns:
        uv_coords (T, 2) in [0, 1] (v up) and uv_faces (F, 3) indices into them.
    """
    covered = np.concatenate([np.concatenate([it.faces, it.twin]) for it in items])
    if len(covered) != len(faces) or len(np.unique(covered)) != len(faces):
        raise ValueError("atlas items must cover every triangle exactly once")
    placed = [_item_uvs(it, verts, faces, faces_uv, uvs, mirror, tolerance) for it in items]
    gap = gap_texels / resolution
    lo, hi = 0.0, 100.0
    for _ in range(40):  # bisection on the global scale (UV units per metre)
        mid = 0.5 * (lo + hi)
        if _pack(placed, mid, gap) is None:
            hi = mid
        else:
            lo = mid
    packing = _pack(placed, lo, gap)
    assert packing is not None
    corner = np.zeros((len(faces), 3, 2))
    for p, left, top in packing:
        off = np.array([left, top - p.height * lo])
        corner[p.item.faces] = p.corner_uv * lo + off
        if len(p.item.twin):
            corner[p.item.twin] = p.twin_uv * lo + np.array([1.0 - left, off[1]])
    # One UV index per (vertex, UV position): corners of a vertex inside an island share it, seams keep two.
    key = np.concatenate([faces.reshape(-1, 1).astype(np.float64), np.round(corner.reshape(-1, 2) * 2 ** 20)], 1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return corner.reshape(-1, 2)[first], inverse.reshape(-1, 3)
