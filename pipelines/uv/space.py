"""UV space Gaussian modelling (paper section 3.2 and B).

For a head model this precomputes, once (cached under ``weights/cache/``):

* the K x K texel -> (triangle id, barycentrics) lookup, the valid-texel mask and region masks;
* the Gaussian sampling set X of eq. 1: one sample per valid texel of the K x K grid, except in the hair (scalp)
  region, which is sampled on a denser ``hair_grid`` = 1024 x 128 grid over the region's UV bounding box, plus the
  UV coordinates of the mesh vertices (about 78K samples for FLAME at K = 256);
* per-triangle ratios between 3D and UV edge lengths (from a canonical mesh) that give the relative scale map s.

Conventions: texel (i, j) is centred at u = (j + 0.5) / K, v = 1 - (i + 0.5) / K; maps are (C, K, K) tensors;
``grid_sample`` coordinates are x = 2u - 1, y = 1 - 2v with ``align_corners=False``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..head.base import REGIONS, HeadModel
from .raster import barycentric, rasterize_uv, uv_to_pixel

CACHE_VERSION = 3


@dataclass
class UVConfig:
    size: int = 256  # K
    hair_grid_cols: int = 1024
    hair_grid_rows: int = 128
    include_vertices: bool = True
    dense_hair: bool = True


def uv_layout_digest(head: HeadModel) -> str:
    """Short hash of what the UV space depends on (topology, UV layout, regions, template)."""
    h = hashlib.sha256()
    for t in (head.faces, head.uv_coords, head.uv_faces, head.face_region, head.v_template):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _face_ratio(verts: np.ndarray, faces: np.ndarray, uv: np.ndarray, uv_faces: np.ndarray,
                max_over_median: float = np.inf) -> np.ndarray:
    """(F,) sqrt(3D area / UV area): metres per UV unit for each triangle, capped at ``max_over_median`` times the
    median."""
    a3 = 0.5 * np.linalg.norm(np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]]), axis=-1)
    t = uv[uv_faces]
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    a2 = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    ratio = np.sqrt(a3 / np.maximum(a2, 1e-12))
    # Degenerate UV triangles would explode the scale: fall back to the median ratio.
    bad = (a2 < 1e-12) | ~np.isfinite(ratio)
    ratio[bad] = np.median(ratio[~bad]) if (~bad).any() else 1.0
    return np.minimum(ratio, max_over_median * np.median(ratio)).astype(np.float32)


@dataclass
class UVSpace:
    """Precomputed UV space of one head model. Arrays are torch tensors on ``device``.

    face_index (K, K) long, -1 where invalid; bary (K, K, 3); region (K, K) long (-1 invalid);
    sample_uv (G, 2) UV positions of the Gaussians; sample_face (G,) long; sample_bary (G, 3);
    sample_spacing (G,) UV distance between neighbouring samples (1/K on the base grid, finer in the hair grid);
    face_ratio (F,) metres per UV unit of each triangle, from the canonical mesh.
    """

    size: int
    face_index: torch.Tensor
    bary: torch.Tensor
    region: torch.Tensor
    sample_uv: torch.Tensor
    sample_face: torch.Tensor
    sample_bary: torch.Tensor
    sample_spacing: torch.Tensor
    face_ratio: torch.Tensor
    digest: str = ""

    # ----------------------------------------------------------------------------------------------- derived views
    @property
    def valid(self) -> torch.Tensor:
        """(K, K) bool mask of texels covered by the mesh."""
        return self.face_index >= 0

    @property
    def num_samples(self) -> int:
        return self.sample_uv.shape[0]

    def region_mask(self, *names: str) -> torch.Tensor:
        """(K, K) bool mask of the union of the named regions (see ``REGIONS``)."""
        m = torch.zeros_like(self.valid)
        for n in names:
            m |= self.region == REGIONS[n]
        return m

    def sample_grid(self) -> torch.Tensor:
        """(1, G, 1, 2) grid_sample coordinates of the Gaussian samples."""
        u, v = self.sample_uv[:, 0], self.sample_uv[:, 1]
        return torch.stack([2 * u - 1, 1 - 2 * v], -1)[None, :, None, :]

    def to(self, device) -> "UVSpace":
        kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return UVSpace(**kw)

    # ------------------------------------------------------------------------------------------- geometry on maps
    def position_map(self, verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """UV position map p (B, 3, K, K) of posed/canonical vertices (B, V, 3); zero at invalid texels."""
        B = verts.shape[0]
        fi = self.face_index.clamp(min=0)
        tri = verts[:, faces[fi]]  # (B, K, K, 3 corners, 3)
        p = (tri * self.bary[None, ..., None]).sum(-2)
        p = p * self.valid[None, ..., None]
        return p.permute(0, 3, 1, 2).reshape(B, 3, self.size, self.size)

    def sample_surface(self, verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """(B, G, 3) surface points of the Gaussian samples on vertices (B, V, 3)."""
        tri = verts[:, faces[self.sample_face]]  # (B, G, 3, 3)
        return (tri * self.sample_bary[None, :, :, None]).sum(2)

    def scale_map(self) -> torch.Tensor:
        """Relative scale map s (1, K, K): metres covered by one texel of the K x K map (0 where invalid)."""
        s = self.face_ratio[self.face_index.clamp(min=0)] / self.size
        return (s * self.valid)[None]

    def sample_scale(self) -> torch.Tensor:
        """(G,) metres per sample spacing: the relative scale s at each Gaussian, for its own sampling density."""
        return self.face_ratio[self.sample_face] * self.sample_spacing

    def sample_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Eq. 1: bilinear grid_sample of UV maps (B, C, K, K) at the Gaussian samples -> (B, G, C)."""
        grid = self.sample_grid().to(maps.dtype).expand(maps.shape[0], -1, -1, -1)
        out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[..., 0].transpose(1, 2)

    def flip(self, maps: torch.Tensor) -> torch.Tensor:
        """Horizontal flip in UV (u -> 1 - u): maps the subject's left to right on symmetric layouts."""
        return maps.flip(-1)

    # ------------------------------------------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        from ..store import atomic_path

        arrays = {k: v.cpu().numpy() for k, v in self.__dict__.items() if torch.is_tensor(v)}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, size=self.size, digest=self.digest, cache_version=CACHE_VERSION, **arrays)

    @classmethod
    def load(cls, path: Path, device="cpu") -> "UVSpace":
        with np.load(path) as z:
            if int(z["cache_version"]) != CACHE_VERSION:
                raise ValueError("stale UV cache")
            kw = {k: torch.from_numpy(z[k]).to(device) for k in z.files if k not in ("size", "digest", "cache_version")}
            return cls(size=int(z["size"]), digest=str(z["digest"]), **kw)


def _locate(points_uv: np.ndarray, uv: np.ndarray, uv_faces: np.ndarray, lookup: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangle id and exact barycentrics of UV points, using a high-resolution face-id lookup map.

    Points whose lookup texel is empty get the nearest covered texel's triangle; their barycentrics are clamped.
    """
    R = lookup.shape[0]
    px = uv_to_pixel(points_uv, R, R)
    col = np.clip(px[:, 0].astype(np.int64), 0, R - 1)
    row = np.clip(px[:, 1].astype(np.int64), 0, R - 1)
    fid = lookup[row, col]
    miss = fid < 0
    if miss.any():
        from scipy.ndimage import distance_transform_edt

        _, (ri, ci) = distance_transform_edt(lookup < 0, return_indices=True)
        fid[miss] = lookup[ri[row[miss], col[miss]], ci[row[miss], col[miss]]]
    t = uv[uv_faces[fid]]
    w = barycentric(points_uv, t[:, 0], t[:, 1], t[:, 2])
    w = np.clip(w, 0.0, 1.0)
    w /= w.sum(-1, keepdims=True)
    return fid, w.astype(np.float32)


def build_uv_space(head: HeadModel, config: UVConfig = UVConfig(), canonical: torch.Tensor | None = None) -> UVSpace:
    """Rasterize the head model's UV layout and build the Gaussian sampling set (section B)."""
    K = config.size
    uv = head.uv_coords.detach().cpu().numpy().astype(np.float64)
    uvf = head.uv_faces.detach().cpu().numpy()
    faces = head.faces.detach().cpu().numpy()
    fregion = head.face_region.detach().cpu().numpy()
    face_index, bary = rasterize_uv(uv, uvf, K)
    region = np.where(face_index >= 0, fregion[face_index.clip(0)], -1)

    # Base grid: one sample per valid texel; hair texels are replaced by the denser hair grid.
    hair = REGIONS["scalp"]
    rows, cols = np.nonzero(face_index >= 0)
    use_dense = config.dense_hair and (region == hair).any()
    keep = region[rows, cols] != hair if use_dense else np.ones_like(rows, dtype=bool)
    rows, cols = rows[keep], cols[keep]
    uv_list = [np.stack([(cols + 0.5) / K, 1.0 - (rows + 0.5) / K], -1)]
    spacing = [np.full(len(rows), 1.0 / K)]
    face_list = [face_index[rows, cols]]
    bary_list = [bary[rows, cols]]

    R = max(1024, config.hair_grid_cols, K)
    lookup, _ = rasterize_uv(uv, uvf, R)
    if use_dense:
        hair_faces = np.nonzero(fregion == hair)[0]
        huv = uv[uvf[hair_faces]].reshape(-1, 2)
        (u0, v0), (u1, v1) = huv.min(0), huv.max(0)
        gc, gr = config.hair_grid_cols, config.hair_grid_rows
        gu = u0 + (np.arange(gc) + 0.5) / gc * (u1 - u0)
        gv = v0 + (np.arange(gr) + 0.5) / gr * (v1 - v0)
        pts = np.stack(np.meshgrid(gu, gv, indexing="xy"), -1).reshape(-1, 2)
        pix = uv_to_pixel(pts, R, R).astype(np.int64).clip(0, R - 1)
        fid = lookup[pix[:, 1], pix[:, 0]]
        inside = (fid >= 0) & (fregion[fid.clip(0)] == hair)
        pts = pts[inside]
        f, w = _locate(pts, uv, uvf, lookup)
        uv_list.append(pts)
        spacing.append(np.full(len(pts), np.sqrt((u1 - u0) / gc * (v1 - v0) / gr)))
        face_list.append(f)
        bary_list.append(w)

    if config.include_vertices:
        # One sample at each UV vertex (vertices on UV seams appear once per chart).
        f_of_vt = np.full(len(uv), -1, dtype=np.int64)
        corner = np.full(len(uv), -1, dtype=np.int64)
        for c in range(3):
            f_of_vt[uvf[:, c]] = np.arange(len(uvf))
            corner[uvf[:, c]] = c
        used = f_of_vt >= 0
        w = np.zeros((used.sum(), 3), dtype=np.float32)
        w[np.arange(used.sum()), corner[used]] = 1.0
        uv_list.append(uv[used])
        spacing.append(np.full(used.sum(), 1.0 / K))
        face_list.append(f_of_vt[used])
        bary_list.append(w)

    verts = (canonical if canonical is not None else head.v_template).detach().cpu().numpy().reshape(-1, 3)
    # Triangles squeezed in UV (nostril and eyeball-pole triangles of a tile-based layout such as ICT's) would get
    # centimetre-sized Gaussians: the head model may cap their metres-per-UV ratio at a multiple of the median.
    ratio = _face_ratio(verts.astype(np.float64), faces, uv, uvf, head.max_uv_ratio_over_median)
    t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    return UVSpace(
        size=K,
        face_index=t(face_index, torch.long),
        bary=t(bary),
        region=t(region, torch.long),
        sample_uv=t(np.concatenate(uv_list)),
        sample_face=t(np.concatenate(face_list), torch.long),
        sample_bary=t(np.concatenate(bary_list)),
        sample_spacing=t(np.concatenate(spacing)),
        face_ratio=t(ratio),
        digest=uv_layout_digest(head),
    )


def default_cache_dir() -> Path:
    import os

    env = os.environ.get("FHAVATAR_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "weights" / "cache"


def load_or_build_uv_space(head: HeadModel, config: UVConfig = UVConfig(), cache_dir: Path | None = None,
                           device="cpu") -> UVSpace:
    """The head model's UV space, from the cache when its layout digest and settings match, else built and cached."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    settings = f"{uv_layout_digest(head)}-{sorted(asdict(config).items())}-{head.max_uv_ratio_over_median}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    path = cache_dir / f"uvspace-{head.name}-{config.size}-{key}.npz"
    if path.exists():
        try:
            return UVSpace.load(path, device)
        except Exception:  # a stale or corrupt cache is rebuilt, never fatal
            pass
    space = build_uv_space(head, config)
    try:
        space.save(path)
    except Exception:  # read-only install: work without a cache
        pass
    return space.to(device)
