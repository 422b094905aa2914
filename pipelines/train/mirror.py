"""Mirroring tracked head-model parameters, for the horizontal-flip augmentation.

Flipping a training image horizontally shows the mirror image of the person. The tracking must follow, so that the
flipped image and the flipped parameters still agree: the mirrored mesh is ``S v[perm]`` with S = diag(-1, 1, 1)
(world x -> -x; our world has the face looking along +z, so x -> -x is the face's left-right mirror) and ``perm``
the vertex correspondence of the mirror-symmetric template. In parameters:

* rotations (global, neck, jaw): axis-angle (x, y, z) -> (x, -y, -z), since S R S for R = exp([a]) is exp([S a] * det S);
* eyes: left and right swapped, each mirrored the same way;
* translation: (x, y, z) -> (-x, y, z);
* shape and expression: the linear map W with ``basis @ W == mirror(basis)`` (least squares). For a model whose
  basis is closed under mirroring (left/right blendshape pairs, symmetric ones, signed ones like a mouth shift) this
  is exact - a permutation with signs for the embedded model. A head model can also provide it as
  ``expression_mirror`` / ``shape_mirror`` ((E, E) tensors) itself;
* camera: c2w -> S4 c2w S4 with S4 = diag(-1, 1, 1, 1) on both sides (world mirror, then camera x axis), which
  projects every mirrored point to u -> 1 - u of the original: exactly the flipped image. The frontal tracking
  camera on the z axis is unchanged by it.

``HeadMirror.build`` checks the whole chain on random parameters (mirrored parameters must pose to the mirrored
mesh within ``tolerance`` metres). Models that fail (an asymmetric template, or expression/shape bases not closed
under mirroring, e.g. FLAME components with pose correctives that break symmetry) get ``None`` plus the reason,
and training then skips the flip augmentation and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..head.base import HeadModel, HeadParams

MIRROR = (-1.0, 1.0, 1.0)


def mirror_axis_angle(a: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle rotations -> their mirror images under x -> -x: (x, -y, -z)."""
    return a * a.new_tensor([1.0, -1.0, -1.0])


def mirror_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) camera-to-world -> the camera that sees the x-mirrored world as the horizontally flipped image."""
    S = torch.diag(c2w.new_tensor([-1.0, 1.0, 1.0, 1.0]))
    return S @ c2w @ S


def vertex_mirror_permutation(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, float]:
    """Index of each vertex's mirror twin (x -> -x) and the largest match distance (metres).

    Matching is by position; coincident vertices (e.g. the upper and lower lip along a closed lip slit) are then told
    apart by the centroid of their one-ring neighbours, which lies on their own side.
    """
    from scipy.spatial import cKDTree

    V = len(verts)
    acc, cnt = np.zeros((V, 3)), np.zeros(V)
    for c in range(3):
        for o in range(3):
            if o != c:
                np.add.at(acc, faces[:, c], verts[faces[:, o]])
                np.add.at(cnt, faces[:, c], 1)
    ring = acc / np.maximum(cnt, 1)[:, None]
    S = np.array(MIRROR)
    k = min(8, V)
    dist, cand = cKDTree(verts).query(verts * S, k=k)
    dist, cand = dist.reshape(V, k), cand.reshape(V, k)
    tie = dist <= dist[:, :1] + 1e-9  # candidates as close as the best one (coincident twins)
    ring_err = np.linalg.norm(ring[cand] - (ring * S)[:, None], axis=-1)
    pick = np.argmin(np.where(tie, ring_err, np.inf), axis=1)
    perm = cand[np.arange(V), pick]
    return perm.astype(np.int64), float(dist[np.arange(V), pick].max())


def basis_mirror_map(basis: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(N, N) map W (coefficients c -> c @ W.T) with basis @ W ~= mirror(basis), and its relative residual.

    basis: (V, 3, N) displacement fields; mirror(f)[v] = S f[perm[v]].
    """
    N = basis.shape[-1]
    if N == 0:
        return basis.new_zeros(0, 0), 0.0
    A = basis.double().reshape(-1, N)
    M = (basis.double()[perm] * basis.new_tensor(MIRROR).double()[None, :, None]).reshape(-1, N)
    W = torch.linalg.lstsq(A, M).solution
    rel = float((A @ W - M).norm() / M.norm().clamp_min(1e-12))
    W = torch.where(W.abs() < 1e-9, torch.zeros_like(W), W)  # exact zeros keep a permutation map clean
    return W.float(), rel


@dataclass
class HeadMirror:
    """Mirror maps of one head model (see the module docstring).

    vertex_perm (V,) long; shape_map (S, S); expression_map (E, E); error: the self-check's max vertex error (m).
    """

    vertex_perm: torch.Tensor
    shape_map: torch.Tensor
    expression_map: torch.Tensor
    error: float

    @classmethod
    def build(cls, head: HeadModel, tolerance: float = 1e-4, seed: int = 0) -> tuple["HeadMirror | None", str]:
        """The model's mirror maps, or (None, why) when the model is not mirror-symmetric within ``tolerance`` m."""
        verts = head.v_template.detach().cpu().double().numpy()
        faces = head.faces.detach().cpu().numpy()
        perm_np, dist = vertex_mirror_permutation(verts, faces)
        if dist > tolerance:
            return None, f"template of head model '{head.name}' is not mirror-symmetric ({dist * 1e3:.2f} mm)"
        perm = torch.as_tensor(perm_np)
        maps, why = {}, []
        for kind, basis in (("shape", head.shapedirs), ("expression", head.exprdirs)):
            given = getattr(head, f"{kind}_mirror", None)
            if given is not None:
                maps[kind] = torch.as_tensor(given, dtype=torch.float32)
                continue
            W, rel = basis_mirror_map(basis.detach().cpu(), perm)
            maps[kind] = W
            if rel > 1e-3:
                why.append(f"its {kind} basis is not closed under mirroring (residual {rel:.3f})")
        mirror = cls(perm, maps["shape"], maps["expression"], 0.0)
        if why:
            return None, f"head model '{head.name}': " + "; ".join(why)
        mirror.error = mirror.self_check(head, seed)
        if mirror.error > tolerance:
            return None, (f"head model '{head.name}' does not pose mirror-symmetrically (mirrored parameters miss "
                          f"the mirrored mesh by {mirror.error * 1e3:.2f} mm: rig or pose correctives asymmetric)")
        return mirror, "ok"

    def to(self, device) -> "HeadMirror":
        return HeadMirror(self.vertex_perm.to(device), self.shape_map.to(device), self.expression_map.to(device),
                          self.error)

    # ---------------------------------------------------------------------------------------------- mirroring
    def params(self, p: HeadParams) -> HeadParams:
        """Mirrored parameters (B, ...) whose posed mesh is ``verts(head(p))``."""
        eyes = p.eyes.reshape(-1, 2, 3).flip(1)  # swap left/right
        return HeadParams(
            shape=p.shape @ self.shape_map.to(p.shape).T,
            expression=p.expression @ self.expression_map.to(p.expression).T,
            rotation=mirror_axis_angle(p.rotation),
            translation=p.translation * p.translation.new_tensor(MIRROR),
            neck=mirror_axis_angle(p.neck),
            jaw=mirror_axis_angle(p.jaw),
            eyes=mirror_axis_angle(eyes).reshape(-1, 6),
        )

    def verts(self, verts: torch.Tensor) -> torch.Tensor:
        """(B, V, 3) mesh -> its mirror image, vertex order kept (vertex i becomes the mirror of its twin)."""
        return verts[:, self.vertex_perm.to(verts.device)] * verts.new_tensor(MIRROR)

    @torch.no_grad()
    def self_check(self, head: HeadModel, seed: int = 0, batch: int = 4) -> float:
        """Max distance (m) between head(mirrored params) and the mirrored head(params) on random parameters."""
        g = torch.Generator().manual_seed(seed)
        dev = head.v_template.device
        r = lambda n, s: (torch.randn(batch, n, generator=g) * s).to(dev)  # noqa: E731
        p = HeadParams(r(head.n_shape, 0.7), r(head.n_expr, 0.3), r(3, 0.25), r(3, 0.02), r(3, 0.1), r(3, 0.08),
                       r(6, 0.1))
        m = self.to(dev)
        return float((head(m.params(p)) - m.verts(head(p))).norm(dim=-1).max())
