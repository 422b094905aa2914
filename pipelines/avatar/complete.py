"""Completion of what the source photo never showed: a plausible 360° head without PanoHead (issue 18).

The paper takes the unseen head from PanoHead's full-head prior, which is not available here. This post-step works
on any attribute maps A (1, 14, K, K) and UV shape offsets Δp (1, 3, K, K) — the network's prediction or the
no-network unprojection — and changes only what the source view cannot contradict:

* **appearance**: texels the source never saw (``refine.seen_by_source``) take the colour of their mirror texel
  (u -> 1 - u) when that one was seen, else a fill from the seen texels of their *group*: the hair cap (the scalp
  region and the face region above the hairline height) from the visible hair, the skin (face, ears, neck) from the
  visible skin. The fill is a screened diffusion on the mesh's vertex graph — so it is seamless across UV seams —
  from the seen vertices into the unseen ones, fading with distance into the group's colour statistic (for the hair:
  the median colour of the photo's hair region, the matte minus the head's skin); a faint low-frequency texture
  (the visible hair's own colour variation, reflected front to back) keeps the back from being a flat plate;
* **geometry**: a hair volume. Head models have no hair, so the photo's hair sticks out of the head's silhouette.
  Vertices of the hair cap on the source view's contour are pushed along their normals as far as their projection
  stays inside the matte; a smooth offset field over the cap (least squares with a graph-Laplacian smoothness term,
  zero where the cap meets the face, ears and neck) carries these heights around the back, which therefore closes
  smoothly. Seen texels facing the camera move along their camera ray instead (their projection, hence the source
  view, stays); the grazing ones the contour consists of move along the normal. The Gaussians of the inflated cap
  grow with its area;
* **holes**: completed texels get an opacity and a size floor, and the invalid UV gutter around every island takes
  its nearest valid texel's attributes, so that bilinear sampling at island borders (the back-of-head seam) mixes
  no zeros in.

The seen texels keep their colour, opacity, scale and rotation; only their Δp (the hair volume) and the gutter
around them change. What the source view shows is decided by the render, not by the bare mesh: a network's offsets
and Δp draw texels the mesh hides (on the ICT head: under the nose, around the mouth, the face tile's sides) in view.
So the completed avatar is re-rendered from the source camera, and the (texel, attribute) changes that make that view
worse, to first order, get the prediction back (``CompleteConfig.guard_*``, issue 18 on the ICT head).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.camera import project_points, world_to_camera
from ..errors import ConfigError
from ..head.base import REGIONS, HeadModel
from ..uv.raster import rasterize_uv
from ..uv.space import UVSpace
from .binding import AvatarRig, posed_to_canonical_offsets
from .maps import ATTRIBUTE_SLICES

SKIN_REGIONS = ("face", "ears", "neck", "other")  # "other": the embedded head's ring around the ears


@dataclass
class CompleteConfig:
    """How the never-seen part of an avatar is completed (``ReconstructConfig.complete``; ``--complete`` on)."""

    # Off by default (docs/BACK_OF_HEAD.md, "The pixel guard"): with both guards the validation split's frontal
    # numbers no longer get worse (frame after the source 25.81 -> 26.12 dB, all frames 19.38 -> 19.66) and ΔE180 on
    # 37 photos falls 25.0 -> 8.6, but it costs ~1.5 min per avatar on a 2-core CPU, 7 of 185 photo x angle cells
    # still have > 1 % holes, and make demo with it (v5 weights) shows the face and front hair standing clear of the
    # completed skull at 45-90° (docs/BACK_OF_HEAD.md, status 2026-12-04 later). --complete.
    enabled: bool = False
    hairline_above_eyes: float = 0.045  # metres above the eye centres where the hair cap starts on the face region
    fill_falloff: float = 0.04  # metres over which the diffused seen colours fade into the group's statistic
    texture: float = 0.6  # share of the visible hair's colour variation carried to the back (0 = flat fill)
    hair_tolerance: float = 0.25  # seen cap colours farther than this (RGB, max channel) from the hair's are skin
    hair_volume: bool = True
    max_hair_offset: float = 0.05  # metres: the farthest the hair cap is pushed out
    contour_cos: float = 0.35  # |n . ray| below which a vertex is on the source view's contour (grazing)
    hair_smoothness: float = 4.0  # weight of the Laplacian term of the offset fit (per edge, against 1 per target)
    max_stretch: float = 3.0  # cap of the Gaussian growth with the inflated cap's area (linear factor)
    opacity_floor: float = 0.95  # completed texels are at least this opaque ...
    scale_floor: float = 1.2  # ... and at least this many texels wide (each axis) ...
    floor_reach: float = 0.015  # ... and no farther than this (metres) off the (inflated) surface
    grazing_cos: float = 0.2  # texels seen more edge-on than this (|n . ray|) are completed like unseen ones
    gutter: int = 3  # texels of the invalid UV border filled from the nearest valid texel
    # Texels lower than the ears' lowest point (the neck that a network uses for collars and shoulders, but also the
    # chin, the mouth and the back of the head down there) are not completed. Off: it keeps the source view of the
    # ICT network avatars (docs/BACK_OF_HEAD.md) but leaves the neck and the lower back of the head as predicted.
    keep_below_ears: bool = False
    # Texels of the neck region lower than the ears' lowest point are not completed; the face (chin, mouth, jaw
    # underside), the ears and the hair cap — the nape and the lower back of the head included — are completed as
    # usual (keep_below_ears leaves those as predicted: grey, see-through). Meant for a network that draws collars
    # and shoulders with the neck's texels; the ICT v2 network does not (it uses the face region's lower texels):
    # measured, it keeps no source view there (docs/BACK_OF_HEAD.md, "keep_neck"). See keep_lifted_below_ears.
    keep_neck: bool = False
    # Texels lower than the ears' lowest point that the prediction puts farther than this (metres, offset + Δp) off
    # the surface are not completed (0: off). On the ICT v2 network it is the face region's lower texels, thrown
    # 2-8 cm out, that draw the collars and shoulders (the neck's stay within ~1 cm); those on the surface — the chin,
    # the jaw's underside — and the lower back of the head are completed.
    keep_lifted_below_ears: float = 0.0
    # What the source view shows is what the render shows, not what the bare mesh shows: a network's offsets move
    # texels the mesh hides into view (on ICT: under the nose, around the mouth, the face tile's sides, the mouth,
    # eye and teeth items). After completion the source view is re-rendered and texels whose change makes it worse
    # (first order, refine.source_view_gradients) get the prediction back; this many passes (0: no check).
    guard_passes: int = 12
    guard_budget: float = 0.01  # first-order source-view error the completion may add (fraction of the prediction's)
    guard_size: int = 256  # pixels a side of those source-view renders
    # The first-order test misses what opaque layers hide from each other (a floored Gaussian that now covers the
    # face). Then the render itself decides: pixels the completion made worse blame the completed texels that paint
    # them (their blending weight there), and the most-blamed texels get the whole prediction back until the source
    # view's actual error is within guard_budget of the prediction's; at most this many re-renders (0: no check), and
    # fewer once the budget holds: 6 left the v5 weights' sample-portrait avatar 0.21 dB below its prediction.
    guard_pixel_passes: int = 12

    def __str__(self) -> str:  # what `fhavatar reconstruct --help` shows as the default of --complete/--no-complete
        return "on" if self.enabled else "off"

    def validate(self) -> "CompleteConfig":
        ranges = {"fill_falloff": self.fill_falloff > 0, "texture": 0 <= self.texture <= 1,
                  "max_hair_offset": 0 <= self.max_hair_offset <= 0.2, "contour_cos": 0 < self.contour_cos < 1,
                  "hair_smoothness": self.hair_smoothness >= 0, "max_stretch": self.max_stretch >= 1,
                  "opacity_floor": 0 <= self.opacity_floor < 1, "scale_floor": self.scale_floor >= 0,
                  "floor_reach": self.floor_reach >= 0, "keep_lifted_below_ears": self.keep_lifted_below_ears >= 0, "grazing_cos": 0 <= self.grazing_cos < 1, "hair_tolerance": self.hair_tolerance > 0,
                  "gutter": self.gutter >= 0, "guard_budget": self.guard_budget >= 0,
                  "guard_passes": self.guard_passes >= 0,
                  "guard_pixel_passes": self.guard_pixel_passes >= 0, "guard_size": self.guard_size >= 16}
        bad = [k for k, ok in ranges.items() if not ok]
        if bad:
            raise ConfigError(f"completion settings out of range: {', '.join(bad)}",
                              "see CompleteConfig in pipelines/avatar/complete.py")
        return self


# ------------------------------------------------------------------------------------------------ mesh helpers
def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (V, 3) of one mesh (V, 3)."""
    tri = verts[faces]
    n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    out = torch.zeros_like(verts).index_add_(0, faces.reshape(-1), n.repeat_interleave(3, 0))
    return F.normalize(out, dim=-1, eps=1e-12)


def hair_cap(head: HeadModel, canonical: torch.Tensor, hairline_above_eyes: float) -> torch.Tensor:
    """(V,) bool: the vertices hair may cover — the scalp region, and the face region above the hairline height
    (``hairline_above_eyes`` over the eyeballs' mean height; ICT's face region reaches over the top of the head)."""
    faces, region = head.faces, head.face_region
    V = canonical.shape[0]
    of = lambda names: torch.zeros(V, dtype=torch.bool, device=faces.device).index_fill_(  # noqa: E731
        0, faces[torch.isin(region, torch.tensor([REGIONS[n] for n in names], device=region.device))].reshape(-1),
        True)
    eyes = of(("eyes",))
    y_eye = canonical[eyes, 1].mean() if eyes.any() else canonical[:, 1].median()
    face = of(("face",)) & ~of(("ears", "neck", "mouth", "eyes"))
    return of(("scalp",)) | (face & (canonical[:, 1] > y_eye + hairline_above_eyes))


def _edges(faces: np.ndarray) -> np.ndarray:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(e, 1), axis=0)


def _laplacian(edges: np.ndarray, n: int):
    """Uniform graph Laplacian (n, n) of ``edges`` (E, 2), scipy sparse CSR."""
    from scipy.sparse import coo_matrix, diags

    W = coo_matrix((np.ones(2 * len(edges)), (np.r_[edges[:, 0], edges[:, 1]], np.r_[edges[:, 1], edges[:, 0]])),
                   shape=(n, n)).tocsr()
    return diags(np.asarray(W.sum(1)).ravel()) - W


def screened_fill(values: np.ndarray, known: np.ndarray, group: np.ndarray, faces: np.ndarray, target: np.ndarray,
                  mu: float) -> np.ndarray:
    """Fill ``values`` (V, C) at the group's unknown vertices: (L + mu) x = mu * target there, x = values at known
    vertices (Dirichlet); the graph Laplacian L of the group's edges. The seen values spread about 1 / sqrt(mu) edges
    and fade into ``target`` (C,) beyond; vertices outside ``group`` (V,) bool are left as they are."""
    from scipy.sparse import identity
    from scipy.sparse.linalg import spsolve

    out = values.copy()
    unknown = group & ~known
    if not unknown.any():
        return out
    gf = faces[group[faces].all(1)]
    L = _laplacian(_edges(gf), len(values)) if len(gf) else None
    U = np.flatnonzero(unknown)
    if L is None:
        out[U] = target
        return out
    Kn = np.flatnonzero(group & known)
    A = (L[U][:, U] + mu * identity(len(U))).tocsc()
    rhs = mu * np.broadcast_to(target, (len(U), values.shape[1])) - L[U][:, Kn] @ values[Kn]
    out[U] = np.asarray(spsolve(A, rhs)).reshape(len(U), -1)
    return out


def rasterize_mask(verts: torch.Tensor, faces: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor, size: int
                   ) -> np.ndarray:
    """(size, size) bool: pixels covered by the triangles ``faces`` of a mesh (V, 3) in a camera (w2c (4, 4), K (3, 3)
    normalized) — the exact, hole-free silhouette of a closed mesh. Triangles behind the camera are dropped."""
    uv, z = project_points(verts[None], w2c[None], K[None])
    uv, z = uv[0].cpu().numpy().astype(np.float64), z[0].cpu().numpy()
    f = faces.cpu().numpy()
    f = f[(z[f] > 1e-3).all(1)]
    # rasterize_uv wants v up: the image's y points down.
    face_index, _ = rasterize_uv(np.stack([uv[:, 0], 1.0 - uv[:, 1]], -1), f, size)
    return face_index >= 0


def image_hair_region(image_matte: torch.Tensor, head: HeadModel, verts: torch.Tensor, cap: torch.Tensor,
                      w2c: torch.Tensor, K: torch.Tensor) -> np.ndarray:
    """(H, W) bool: the photo's hair (or bare scalp) pixels — inside the matte (1, H, W), outside the head's skin
    (the posed mesh (V, 3) without the hair cap ``cap`` (V,) and without the inner parts), above the ears' lowest
    point (so no shoulders or clothes)."""
    H = image_matte.shape[-1]
    region = head.face_region
    skin_ids = torch.tensor([REGIONS[n] for n in ("face", "ears", "neck", "eyes", "mouth", "teeth")],
                            device=region.device)
    skin_faces = head.faces[torch.isin(region, skin_ids) & ~cap[head.faces].all(1)]
    skin = rasterize_mask(verts, skin_faces, w2c, K, H)
    ears = head.faces[region == REGIONS["ears"]].reshape(-1)
    pts = verts[ears] if len(ears) else verts
    uv, _ = project_points(pts[None], w2c[None], K[None])
    bottom = float(uv[0, :, 1].max()) * H  # image rows grow downwards
    rows = np.arange(H)[:, None] < bottom
    return (image_matte[0].cpu().numpy() > 0.5) & ~skin & rows


# ------------------------------------------------------------------------------------------- texel <-> vertex
class _TexelVertex:
    """Moves values between the valid texels of the K x K map and the mesh vertices through each texel's
    triangle and barycentrics."""

    def __init__(self, uv: UVSpace, faces: torch.Tensor, num_vertices: int) -> None:
        valid = uv.valid.cpu().numpy()
        self.rows, self.cols = np.nonzero(valid)
        fi = uv.face_index.cpu().numpy()[self.rows, self.cols]
        self.corner = faces.cpu().numpy()[fi]  # (T, 3)
        self.bary = uv.bary.cpu().numpy()[self.rows, self.cols].astype(np.float64)  # (T, 3)
        self.V = num_vertices

    def texels(self, m: torch.Tensor) -> np.ndarray:
        """(C, K, K) map -> (T, C) values at the valid texels."""
        return m.detach().cpu().numpy()[:, self.rows, self.cols].T.astype(np.float64)

    def to_vertices(self, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Texel values (T, C) with weights (T,) -> weighted vertex means (V, C) and their total weight (V,)."""
        acc = np.zeros((self.V, x.shape[1]))
        wsum = np.zeros(self.V)
        for k in range(3):
            wk = self.bary[:, k] * w
            np.add.at(acc, self.corner[:, k], x * wk[:, None])
            np.add.at(wsum, self.corner[:, k], wk)
        return acc / np.maximum(wsum, 1e-12)[:, None], wsum

    def to_texels(self, values: np.ndarray) -> np.ndarray:
        """Vertex values (V, C) -> (T, C) barycentric interpolation at the texels."""
        return (values[self.corner] * self.bary[..., None]).sum(1)


def fill_gutter(maps: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """maps (B, C, K, K) with the invalid texels within ``width`` texels of an island copied from their nearest valid
    texel, so that bilinear sampling at island borders does not mix in what lies outside (zeros, template values)."""
    if width <= 0:
        return maps
    from scipy.ndimage import distance_transform_edt

    inv = ~valid.cpu().numpy()
    dist, (ri, ci) = distance_transform_edt(inv, return_indices=True)
    near = torch.as_tensor((dist > 0) & (dist <= width), device=maps.device)
    src = maps[..., torch.as_tensor(ri, device=maps.device), torch.as_tensor(ci, device=maps.device)]
    return torch.where(near, src, maps)


# ------------------------------------------------------------------------------------------------ the fitting
def fit_hair_heights(verts: torch.Tensor, normals: torch.Tensor, cap: torch.Tensor, faces: torch.Tensor,
                     matte: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor, cfg: CompleteConfig,
                     eligible: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
    """Heights h (V,) in metres along the vertex normals that make the hair cap's silhouette in the source view
    cover the matte, zero outside the cap and on its border, smooth over it (and so closing behind).

    verts, normals (V, 3) the posed source mesh; cap (V,) bool; matte (1, H, W); w2c (4, 4), K (3, 3) normalized.
    Targets are the cap's contour vertices: grazing (|n . ray| < ``contour_cos``), on the outer silhouette (a few
    millimetres out along the normal leaves the mesh's projection) and ``eligible`` (V,) bool (default all); each
    wants the largest push whose projection stays inside the matte.
    """
    H = matte.shape[-1]
    V = verts.shape[0]
    eye = torch.linalg.inv(w2c)[:3, 3]
    ray = F.normalize(verts - eye, dim=-1)
    grazing = (normals * ray).sum(-1).abs() < cfg.contour_cos
    mesh = torch.as_tensor(rasterize_mask(verts, faces, w2c, K, H), device=verts.device)

    def project(points: torch.Tensor) -> torch.Tensor:
        uv, _ = project_points(points[None], w2c[None], K[None])
        return uv[0]

    def lookup(img: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        grid = (uv * 2 - 1).view(1, -1, 1, 2)
        return F.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False).view(-1)

    if eligible is not None:
        grazing = grazing & eligible
    candidates = torch.nonzero(cap & grazing).view(-1)
    outer = lookup(mesh[None], project(verts[candidates] + 0.004 * normals[candidates])) < 0.5
    candidates = candidates[outer]
    steps = torch.linspace(0, cfg.max_hair_offset, 26, device=verts.device)
    pts = verts[candidates, None] + steps[None, :, None] * normals[candidates, None]  # (n, S, 3)
    inside = lookup(matte, project(pts.reshape(-1, 3))).view(len(candidates), -1) > 0.5
    # The push stops at the first step outside the matte.
    run = torch.cumprod(inside.float(), 1)
    target = (run.sum(1) - 1).clamp(min=0) * (steps[1] - steps[0])
    target = torch.where(inside[:, 0], target, torch.zeros_like(target))

    cap_np = cap.cpu().numpy()
    f = faces.cpu().numpy()
    border = np.zeros(V, dtype=bool)
    border[f[~cap_np[f].all(1)].ravel()] = True  # cap vertices that touch a non-cap triangle stay at 0
    free = cap_np & ~border
    h = np.zeros(V)
    info = {"contour_vertices": int(len(candidates)), "target_mean_mm": float(target.mean() * 1e3) if len(target)
            else 0.0}
    if not free.any() or not len(candidates):
        return h, info
    from scipy.sparse import diags
    from scipy.sparse.linalg import spsolve

    cf = f[cap_np[f].all(1)]
    L = _laplacian(_edges(cf), V)
    w = np.zeros(V)
    d = np.zeros(V)
    ci = candidates.cpu().numpy()
    w[ci] = 1.0
    d[ci] = target.cpu().numpy()
    U = np.flatnonzero(free)
    A = (diags(w[U]) + cfg.hair_smoothness * L[U][:, U]).tocsc()
    # A tiny screening keeps cap parts with no path to a target (islands) at 0 rather than singular.
    A = A + diags(np.full(len(U), 1e-6))
    h[U] = np.clip(spsolve(A, w[U] * d[U]), 0.0, cfg.max_hair_offset)
    info.update(max_mm=float(h.max() * 1e3), mean_cap_mm=float(h[cap_np].mean() * 1e3))
    return h, info


def _reflected_texture(canonical: np.ndarray, source_v: np.ndarray, target_v: np.ndarray, colour: np.ndarray,
                       centre_z: float, reach: float = 0.03) -> np.ndarray:
    """(V, 3) colour variation for the ``target_v`` vertices: the high-pass (colour minus its 2 cm neighbourhood's
    mean, clipped to twice its spread) of the ``source_v`` vertex nearest to their front-to-back reflection
    (z -> 2 centre_z - z); zero where none is within ``reach`` metres."""
    from scipy.spatial import cKDTree

    out = np.zeros_like(colour)
    src, dst = np.flatnonzero(source_v), np.flatnonzero(target_v)
    if len(src) < 8 or not len(dst):
        return out
    tree = cKDTree(canonical[src])
    high = colour[src] - np.stack([colour[src[n]].mean(0) for n in tree.query_ball_point(canonical[src], 0.02)])
    spread = 2 * high.std(0) + 1e-6
    high = high.clip(-spread, spread)
    q = canonical[dst].copy()
    q[:, 2] = 2 * centre_z - q[:, 2]
    dist, idx = tree.query(q)
    ok = dist < reach
    out[dst[ok]] = high[idx[ok]]
    return out


# --------------------------------------------------------------------------------------------------- the step
@torch.no_grad()
def complete_maps(maps: torch.Tensor, delta_p: torch.Tensor, source, head: HeadModel, uv: UVSpace,
                  cfg: CompleteConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Complete the never-seen part of an avatar: maps (1, 14, K, K), delta_p (1, 3, K, K) canonical -> the same
    completed, and a record of what was done (for the avatar's metadata). ``source`` is a ``reconstruct.SourceFrame``.
    """
    from ..refine import seen_by_source

    info: dict = {"enabled": cfg.enabled}
    if not cfg.enabled:
        return maps, delta_p, info
    device = maps.device
    pred_maps, pred_dp = maps, delta_p
    maps, delta_p = maps.clone(), delta_p.clone()
    sl = ATTRIBUTE_SLICES
    valid = uv.valid.to(device)
    seen = seen_by_source(source, head, uv)[0][0, 0] & valid  # (K, K)
    posed = head(source.params)[0]  # (V, 3)
    canonical = head.canonical(source.params.shape)[0]
    faces = head.faces
    f_np = faces.cpu().numpy()
    V = posed.shape[0]
    cap = hair_cap(head, canonical, cfg.hairline_above_eyes)
    cap_np = cap.cpu().numpy()
    w2c = world_to_camera(source.c2w[None])[0]
    tv = _TexelVertex(uv, faces, V)
    region_t = uv.region.cpu().numpy()[tv.rows, tv.cols]
    cap_t = tv.to_texels(cap_np[:, None].astype(np.float64))[:, 0] > 0.5  # (T,) texels of the hair cap
    seen_t = seen.cpu().numpy()[tv.rows, tv.cols]
    n_posed = vertex_normals(posed, faces)
    n_t = F.normalize(torch.as_tensor(tv.to_texels(n_posed.cpu().numpy()), dtype=torch.float32, device=device), dim=-1)
    p_t = torch.as_tensor(tv.to_texels(posed.cpu().numpy()), dtype=torch.float32, device=device)
    ray = F.normalize(p_t - torch.linalg.inv(w2c)[:3, 3], dim=-1)
    cos = (n_t * ray).sum(-1)  # (T,) -1: facing the source camera, 0: edge-on
    # Texels the photo shows edge-on carry the matte's blended rim (background colour): not a colour to spread.
    shown_t = seen_t & (cos.abs().cpu().numpy() >= cfg.grazing_cos)
    shown = torch.zeros_like(valid)
    shown[tv.rows[shown_t], tv.cols[shown_t]] = True
    skin_ids = [REGIONS[n] for n in SKIN_REGIONS]
    group_t = cap_t | np.isin(region_t, skin_ids)  # the texels completion may touch
    if cfg.keep_below_ears:
        # Below the ears' lowest point the matte shows collars, shirts and shoulders, and a network draws them with
        # the neck's texels (mesh-hidden ones too): completing those as skin recolours the clothes in the source view.
        y_t = tv.to_texels(canonical.cpu().numpy()[:, 1:2])[:, 0]
        group_t &= y_t > _ear_bottom(head, canonical)
    if cfg.keep_neck:
        y_t = tv.to_texels(canonical.cpu().numpy()[:, 1:2])[:, 0]
        group_t &= ~((region_t == REGIONS["neck"]) & (y_t <= _ear_bottom(head, canonical)))
    if cfg.keep_lifted_below_ears > 0:
        y_t = tv.to_texels(canonical.cpu().numpy()[:, 1:2])[:, 0]
        r_, c_ = torch.as_tensor(tv.rows, device=device), torch.as_tensor(tv.cols, device=device)
        lifted = (delta_p[0] + maps[0, sl["offset"]])[:, r_, c_].norm(dim=0).cpu().numpy()
        group_t &= ~((lifted > cfg.keep_lifted_below_ears) & (y_t <= _ear_bottom(head, canonical)))

    # ---- appearance: mirror, then the screened diffusion per group
    color = maps[0, sl["color"]]
    mirror_seen = uv.flip(shown[None])[0] & ~shown & valid
    group_map = torch.zeros_like(valid)
    group_map[tv.rows[group_t], tv.cols[group_t]] = True
    color = torch.where((mirror_seen & group_map)[None], uv.flip(color[None])[0], color)
    known_t = shown_t | mirror_seen.cpu().numpy()[tv.rows, tv.cols]
    c_t = tv.texels(color)
    vcol, wk = tv.to_vertices(c_t, known_t.astype(np.float64))
    _, wall = tv.to_vertices(c_t, np.ones(len(c_t)))
    known_v = wk > 0.5 * np.maximum(wall, 1e-12)
    hair_px = image_hair_region(source.matte, head, posed, cap, w2c, source.K)
    img = source.image.cpu().numpy().reshape(3, -1)[:, hair_px.ravel()]
    hair_rgb = np.median(img, 1) if img.shape[1] > 64 else None
    skin_v = np.zeros(V, dtype=bool)
    skin_v[f_np[np.isin(head.face_region.cpu().numpy(), skin_ids)].ravel()] = True
    skin_v &= ~cap_np
    hair_like = known_v & cap_np
    if hair_rgb is not None:  # seen cap vertices that show skin (a high forehead) do not spread into the hair
        hair_like &= np.abs(vcol - hair_rgb).max(1) < cfg.hair_tolerance
    edge = float(np.median(np.linalg.norm(np.diff(canonical.cpu().numpy()[_edges(f_np)], axis=1)[:, 0], axis=-1)))
    mu = (edge / cfg.fill_falloff) ** 2 * 4.0
    filled = vcol.copy()
    stats = {}
    # The skin's statistic comes from the face only: the neck region runs down into collars and shirts.
    face_v = np.zeros(V, dtype=bool)
    face_v[f_np[head.face_region.cpu().numpy() == REGIONS["face"]].ravel()] = True
    for name, group, known in (("hair", cap_np, hair_like), ("skin", skin_v, known_v & skin_v)):
        ref = known & face_v if name == "skin" and (known & face_v).sum() > 8 else known
        if name == "hair" and hair_rgb is not None:
            target = hair_rgb
        elif ref.sum() > 8:
            target = np.median(vcol[ref], 0)
        else:
            from .maps import REGION_COLORS

            target = np.array(REGION_COLORS["scalp" if name == "hair" else "face"])
        stats[name] = [round(float(c), 4) for c in target]
        filled = screened_fill(filled, known | ~group, group, f_np, target, mu)
    if cfg.texture > 0:
        filled += cfg.texture * _reflected_texture(canonical.cpu().numpy(), hair_like, cap_np & ~known_v, vcol,
                                                   float(head.head_center()[2]))
    todo = ~known_t & group_t  # never seen, no seen mirror, in a completed group
    new = tv.to_texels(filled).clip(0, 1)
    c_np = color.cpu().numpy().copy()
    c_np[:, tv.rows[todo], tv.cols[todo]] = new[todo].T
    maps[0, sl["color"]] = torch.as_tensor(c_np, device=device, dtype=maps.dtype)
    info.update(seen_fraction=round(float(seen_t.mean()), 4), mirrored=int(mirror_seen.sum()), filled=int(todo.sum()),
                group_colour=stats)

    # ---- geometry: the hair volume
    moved = np.zeros(len(seen_t), dtype=bool)
    h = np.zeros(V)
    if cfg.hair_volume and cfg.max_hair_offset > 0:
        h, info["hair"] = fit_hair_heights(posed, n_posed, cap, faces, source.matte, w2c, source.K, cfg,
                                           eligible=canonical[:, 1] > _ear_bottom(head, canonical))
        if h.max() > 0:
            maps, delta_p, moved = _apply_heights(maps, delta_p, h, posed, canonical, n_t, p_t, ray, cos, seen_t,
                                                  tv, uv, head, source, cfg)

    # ---- floors: the completed texels, the grazing ones (seen edge-on, thin in the photo) and the moved ones
    grazing = cos.abs().cpu().numpy() < cfg.contour_cos
    rows, cols = torch.as_tensor(tv.rows, device=device), torch.as_tensor(tv.cols, device=device)
    lift = (delta_p[0] + maps[0, sl["offset"]])[:, rows, cols].norm(dim=0).cpu().numpy()
    reach = tv.to_texels(h[:, None])[:, 0] + cfg.floor_reach
    # Seen ones (edge-on or moved) only where they lie on the inflated surface: the photo placed those farther off.
    floor_t = group_t & (~seen_t | ((grazing | moved) & (lift <= reach)))
    done = torch.zeros_like(valid)
    done[tv.rows[floor_t], tv.cols[floor_t]] = True
    # Completed Gaussians lie on the (inflated) surface: wisps thrown farther off it (a network's offsets, which
    # are faint) are pulled back to it before they are made opaque.
    pull = np.where(floor_t & ~seen_t, np.minimum(1.0, reach / np.maximum(lift, 1e-9)), 1.0)
    pull_map = torch.ones_like(valid, dtype=maps.dtype)
    pull_map[rows, cols] = torch.as_tensor(pull, dtype=maps.dtype, device=device)
    maps[0, sl["offset"]] = maps[0, sl["offset"]] * pull_map
    delta_p = delta_p * pull_map
    op = maps[0, sl["opacity"]]
    maps[0, sl["opacity"]] = torch.where(done[None], op.clamp(min=cfg.opacity_floor), op)
    sc = maps[0, sl["scale"]]
    maps[0, sl["scale"]] = torch.where(done[None], sc.clamp(min=cfg.scale_floor), sc)
    info["floored"] = int(floor_t.sum())
    info["pulled_back"] = int((pull < 1).sum())
    if cfg.guard_passes:
        # The hair volume's push was fitted to the matte (its contour stops inside it): its position is not undone.
        volume = torch.zeros_like(valid)
        volume[tv.rows[moved], tv.cols[moved]] = True
        maps, delta_p = _guard_source_view(maps, delta_p, pred_maps, pred_dp, source, head, uv, cfg, info,
                                           keep_position=volume)
    # The gutter before the pixel guard, which may give a gutter texel its predicted value back: the network was
    # trained on renders without a gutter, so at the borders it shows the source (the hair grid's bilinear samples
    # of the scalp island's edge) it can cost that view (the v6 weights on lp_d0: 0.15 dB), while behind the head it
    # removes the seams.
    maps = fill_gutter(maps, valid, cfg.gutter)
    delta_p = fill_gutter(delta_p, valid, cfg.gutter)
    if cfg.guard_pixel_passes:
        maps, delta_p = _guard_source_pixels(maps, delta_p, pred_maps, pred_dp, source, head, uv, cfg, info)
    return maps, delta_p, info


def _guard_source_view(maps: torch.Tensor, delta_p: torch.Tensor, pred_maps: torch.Tensor, pred_dp: torch.Tensor,
                       source, head: HeadModel, uv: UVSpace, cfg: CompleteConfig, info: dict,
                       keep_position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Restore the prediction (maps (1, 14, K, K), Δp (1, 3, K, K)) at the texels whose completion makes the source
    view worse, for up to ``guard_passes`` re-renders of the completed avatar.

    The mesh's visibility (``seen_by_source``) is not what the source render shows: on a network's avatar, texels the
    mesh hides or sees edge-on are drawn in view (offsets and Δp move them; under the nose, around the mouth, at the
    face tile's sides and in the mouth, eye and teeth items of ICT's layout), and a transparent Gaussian in front of
    the face becomes opaque under the floors. So the render decides: per texel and attribute (colour, rotation,
    scale, opacity, position), the first-order change of the source view's squared error ``g * (completed -
    predicted)`` (g: its gradient at the completed avatar, ``refine.source_view_gradients``; the colour's from the
    pixels inside the matte only: outside it the fault is coverage, not colour), counted when positive.
    Texels the source does not show cost nothing. The costliest (texel, attribute) pairs are restored until
    what is left costs at most ``guard_budget`` of the predicted avatar's error — a small budget rather than none,
    since everything on the back of the head shows a little through a network's translucent face. Each pass exposes
    the layer behind what it restored, hence the passes. ``keep_position`` (K, K) bool: texels whose position
    change is exempt (the hair volume's).
    """
    from ..refine import source_view_gradients

    valid = uv.valid.to(maps.device)
    # The attribute groups a texel may get back separately: its colour, rotation, scale, opacity, position
    # (offset and Δp). A pulled-back wisp that now covers the cheek loses its position, not its colour.
    names = ("color", "rotation", "scale", "opacity")
    groups = [ATTRIBUTE_SLICES[n] for n in names]
    budget = None
    restored = torch.zeros(len(groups) + 1, dtype=torch.long)
    for _ in range(cfg.guard_passes):
        changed = torch.stack([(maps[0, g] != pred_maps[0, g]).any(0) for g in groups] + [
            (maps[0, ATTRIBUTE_SLICES["offset"]] != pred_maps[0, ATTRIBUTE_SLICES["offset"]]).any(0)
            | (delta_p[0] != pred_dp[0]).any(0)]) & valid  # (5, K, K)
        if keep_position is not None:
            changed[-1] &= ~keep_position
        if not changed.any():
            break
        if budget is None:
            budget = cfg.guard_budget * source_view_gradients(pred_maps, pred_dp, source, head, uv, cfg.guard_size)[2]
        g_maps, g_dp, _ = source_view_gradients(fill_gutter(maps, valid, cfg.gutter),
                                                fill_gutter(delta_p, valid, cfg.gutter), source, head, uv,
                                                cfg.guard_size, colour_in_matte=True)
        d = (g_maps * (maps - pred_maps))[0]
        terms = torch.stack([d[g].sum(0) for g in groups] + [
            d[ATTRIBUTE_SLICES["offset"]].sum(0) + (g_dp * (delta_p - pred_dp))[0].sum(0)])
        # A group's harm is not excused by another's first-order gain (the floors are large, non-linear jumps).
        cost = (terms.clamp_min(0) * changed).flatten()
        total = float(cost.sum())
        if total <= budget:
            break
        order = torch.argsort(cost, descending=True)
        left = total - torch.cumsum(cost[order], 0)  # what the rest costs once the first n are restored
        n = int((left > budget).sum()) + 1
        back = torch.zeros_like(cost, dtype=torch.bool)
        back[order[:n]] = True
        back = back.view_as(changed)
        for k, g in enumerate(groups):
            maps[:, g] = torch.where(back[k][None, None], pred_maps[:, g], maps[:, g])
        pos = back[-1][None, None]
        maps[:, ATTRIBUTE_SLICES["offset"]] = torch.where(pos, pred_maps[:, ATTRIBUTE_SLICES["offset"]],
                                                          maps[:, ATTRIBUTE_SLICES["offset"]])
        delta_p = torch.where(pos, pred_dp, delta_p)
        restored += back.flatten(1).sum(1).cpu()
        info.setdefault("guard_passes_restored", []).append(n)
    info["guard_restored"] = dict(zip((*names, "position"), restored.tolist()))
    return maps, delta_p


def _source_view_error(maps: torch.Tensor, delta_p: torch.Tensor, source, head: HeadModel, uv: UVSpace, size: int,
                       blame: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-pixel squared error (size, size) of the source-view render of the maps as given (no gutter added; both on
    white), and with ``blame`` (size, size) per-pixel weights, per texel (K, K) the sum over pixels of blame x that
    texel's blending weight there (the gradient of ``sum(blame * render)`` with respect to its colour, averaged over
    the channels: the weights of one pixel sum to its alpha, so a texel's blame is its share of the pixels' blame)."""
    from ..refine import source_target
    from ..train.forward import render_rig

    target, _ = source_target(source, size)
    A = maps.detach().clone().requires_grad_(blame is not None)
    with torch.set_grad_enabled(blame is not None):
        rig = AvatarRig(head, uv, A, source.params.shape, delta_p.detach())
        r = render_rig(rig, head(source.params).detach(), source.c2w[None], source.K[None], size)
        err = (r.rgb - target).pow(2).sum(1)[0]
        if blame is None:
            return err.detach(), None
        (g,) = torch.autograd.grad((r.rgb * blame).sum(), [A])
    return err.detach(), g[0, ATTRIBUTE_SLICES["color"]].mean(0)


def _guard_source_pixels(maps: torch.Tensor, delta_p: torch.Tensor, pred_maps: torch.Tensor, pred_dp: torch.Tensor,
                         source, head: HeadModel, uv: UVSpace, cfg: CompleteConfig, info: dict
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order check of the source view after ``_guard_source_view``: while the completed avatar's source-view
    error exceeds the prediction's by more than ``guard_budget`` of it, the pixels it made worse (by how much) blame
    the changed texels by their blending weight there, in the completed render (a texel that now covers them) and in
    the prediction's (a texel that painted them and was moved, shrunk or faded away), and the most-blamed texels, as
    many as the excess needs, get the prediction back (every attribute and Δp); ``guard_pixel_passes`` at most."""
    # No gutter added here: ``maps`` has it already, and the reference is the prediction as it would render without
    # completion. A changed texel may be a valid one or a gutter one.
    def view(m: torch.Tensor, dp: torch.Tensor, blame: torch.Tensor | None = None):
        return _source_view_error(m, dp, source, head, uv, cfg.guard_size, blame)

    colour_channels = torch.zeros(1, maps.shape[1], 1, 1, dtype=torch.bool, device=maps.device)
    colour_channels[:, ATTRIBUTE_SLICES["color"]] = True
    e_pred, _ = view(pred_maps, pred_dp)
    budget = cfg.guard_budget * float(e_pred.sum())
    restored, excess, excess_before = 0, 0.0, None
    for last in [False] * cfg.guard_pixel_passes + [True]:
        e_done, _ = view(maps, delta_p)
        excess = float((e_done - e_pred).sum())
        excess_before = excess if excess_before is None else excess_before
        changed = (maps != pred_maps).any(1)[0] | (delta_p != pred_dp).any(1)[0]
        if last or excess <= budget or not changed.any():
            break
        worse = (e_done - e_pred).clamp_min(0)
        _, blame_done = view(maps, delta_p, worse)
        _, blame_pred = view(pred_maps, pred_dp, worse)
        blame = ((blame_done.clamp_min(0) + blame_pred.clamp_min(0)) * changed).flatten()
        if float(blame.sum()) <= 0:
            break
        # Each worsened pixel's excess is shared among the texels painting it by their weight there. Restore the
        # most-blamed texels until their shares cover the excess over the budget; what a restored texel hid may
        # show and be worse in turn, hence the passes.
        order = torch.argsort(blame, descending=True)
        n = min(int((torch.cumsum(blame[order], 0) < excess - budget).sum()) + 1, int((blame > 0).sum()))
        back = torch.zeros_like(blame, dtype=torch.bool)
        back[order[:n]] = True
        back = back.view_as(changed)[None, None]
        # The cheapest undo first: a blamed texel whose geometry changed gets the prediction's geometry back (a hair
        # volume that overshoots the matte, a floored Gaussian over the face) and keeps its completed colour, which
        # matters for the views the source does not see; one whose geometry is the prediction's gets its colour.
        geometry = ((maps != pred_maps) & ~colour_channels).any(1, keepdim=True) | (delta_p != pred_dp).any(1, True)
        maps = torch.where(back & torch.where(geometry, ~colour_channels, colour_channels), pred_maps, maps)
        delta_p = torch.where(back & geometry, pred_dp, delta_p)
        restored += n
    info["guard_pixels"] = {"restored": restored, "prediction_error": float(e_pred.sum()),
                            "excess_before": excess_before or 0.0, "excess_left": excess}
    return maps, delta_p


def _ear_bottom(head: HeadModel, canonical: torch.Tensor) -> float:
    """Height (canonical y, metres) of the ears' lowest point: below it the matte shows long hair, shoulders and
    clothes, which a hair cap cannot follow (no contour targets there)."""
    ids = head.faces[head.face_region == REGIONS["ears"]].reshape(-1)
    return float(canonical[ids, 1].min()) if len(ids) else float(canonical[:, 1].min())


def _apply_heights(maps, delta_p, h, posed, canonical, n_t, p_t, ray, cos, seen_t, tv: _TexelVertex, uv: UVSpace,
                   head, source, cfg: CompleteConfig):
    """Add the hair heights h (V,) to Δp: unseen texels along their normal; seen ones along a blend of the normal
    (grazing: the contour grows to the matte) and their camera ray (facing: their projection stays); Gaussians grow
    with the inflated surface. A seen texel whose projection moves takes the photo's colour where it now lands.
    Returns maps, delta_p and the texels moved (T,) bool."""
    device = maps.device
    K = uv.size
    sl = ATTRIBUTE_SLICES
    h_t = torch.as_tensor(tv.to_texels(h[:, None])[:, 0], dtype=torch.float32, device=device)
    alpha = (1 - cos.abs() / cfg.contour_cos).clamp(0, 1)[:, None]
    seen = torch.as_tensor(seen_t, device=device)[:, None]
    along = torch.where(seen, alpha * n_t + (1 - alpha) * cos[:, None] * ray, n_t)
    # What the avatar already pushes out along the normal (the network's Δp and offsets) is not added twice.
    n_can = vertex_normals(canonical, head.faces)
    n_can_t = F.normalize(torch.as_tensor(tv.to_texels(n_can.cpu().numpy()), dtype=torch.float32, device=device), dim=-1)
    rows, cols = torch.as_tensor(tv.rows, device=device), torch.as_tensor(tv.cols, device=device)
    have = ((delta_p[0] + maps[0, sl["offset"]])[:, rows, cols].T * n_can_t).sum(-1)
    h_add = (h_t - have.clamp(min=0)).clamp(min=0)
    d_t = along * h_add[:, None]
    off = torch.zeros(1, 3, K, K, device=device)
    off[0, :, rows, cols] = d_t.T
    delta_p = delta_p + posed_to_canonical_offsets(uv, off, posed[None], canonical[None], head.faces)
    # Seen texels that moved sideways in the photo: recoloured from where they now project (a little inside, off the
    # matte's blended edge), when that is inside the matte.
    shift = (d_t - (d_t * ray).sum(-1, keepdim=True) * ray).norm(dim=-1)
    w2c = world_to_camera(source.c2w[None])
    uvp, _ = project_points((p_t + 0.85 * d_t)[None], w2c, source.K[None])
    grid = (uvp * 2 - 1).view(1, -1, 1, 2)
    col = F.grid_sample(source.image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, :, 0]
    inside = F.grid_sample(source.matte[None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0, 0, :, 0] > 0.5
    recolour = seen[:, 0] & (shift > 0.002) & inside
    c = maps[0, sl["color"]]
    c[:, rows[recolour], cols[recolour]] = col[:, recolour]
    # The inflated cap's triangles are larger: their Gaussians grow by the square root of the area ratio.
    faces = head.faces
    grown = canonical + torch.as_tensor(h, dtype=torch.float32, device=device)[:, None] * n_can
    area = lambda v: torch.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]], dim=-1).norm(dim=-1)  # noqa: E731
    stretch = (area(grown) / area(canonical).clamp(min=1e-12)).sqrt().clamp(1.0, cfg.max_stretch)
    s_map = torch.where(uv.valid.to(device), stretch[uv.face_index.clamp(min=0).to(device)], torch.ones((), device=device))
    maps[0, sl["scale"]] = maps[0, sl["scale"]] * s_map[None]
    return maps, delta_p, (h_add > 0.001).cpu().numpy()
