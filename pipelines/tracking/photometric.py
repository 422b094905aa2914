"""Photometric refinement of a landmark tracking (``fhavatar preprocess --photometric``).

Landmarks pin the face at a few dozen points, each with a detector's bias and jitter. The refinement adds the
image colours: the head model's face-skin vertices should see the same colour in every frame. Per chunk of frames:

1. **Visibility** (no gradients): the full mesh is posed; a vertex counts in a frame if it faces the camera (not
   at a grazing angle), passes a coarse z-buffer of all vertices, lies inside the image and the matte.
2. **Appearance** (no gradients): one albedo per vertex, shared by the chunk's frames, and a per-frame, per-channel
   gain (exposure / white balance), estimated in closed form by alternating least squares.
3. **Fit**: Adam on expression, jaw, eyes and head pose of every frame (shape fixed) minimising
   ``landmark cost + priors (as the tracker) + weight * mean_v rho(|I_t(pi(X_v)) - g_t a_v|) / sigma^2
   + temporal smoothness (as the tracker)``, with the image sampled bilinearly (gradients reach the projected
   positions through the image gradients). Parameters are scaled by their pixel sensitivity so one step size
   fits rotations, translations and blendshape coefficients alike.

Steps 1-3 repeat ``rounds`` times. What it does not model: shading (the albedo absorbs the lighting, which must not
change much within a chunk), specularities, and hair or glasses over the skin (the robust loss limits their pull).
A single photo gains nothing (the albedo is the photo itself), so photos are left as they are.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..head.base import REGIONS, HeadModel, HeadParams, LandmarkEmbedding
from .config import TrackingConfig
from .fit import (
    REF_SIZE,
    _Data,
    _Problem,
    assemble_result,
    chunk_smoothness,
    clamp_to_limits,
    landmark_data,
    params_to_x,
    pixel_sensitivity,
    robust_penalty,
    smoothness_coefficients,
)
from .result import LOW_CONFIDENCE, TRACKED, TrackingResult
from .rig import LandmarkRig

PHOTOMETRIC_REPORT = "photometric.json"  # what the preprocess hook writes next to tracking.npz

# (frame ids) -> images (N, H, W, 3) uint8 RGB and mattes (N, H, W) uint8 of those frames (the tracked crops).
FrameLoader = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class PhotometricConfig:
    """Settings of the photometric refinement (see the module docstring)."""

    iterations: int = 60  # Adam steps per chunk, split evenly over the rounds
    rounds: int = 3  # visibility + appearance re-estimated before each block of steps
    points: int = 2500  # face-skin vertices sampled (evenly, seeded)
    sigma: float = 0.05  # colour residual (0..1) where the robust photometric loss leaves its quadratic zone
    # Photometric cost at a residual of sigma, in landmark px^2 (the data term's unit). Chosen on a synthetic clip
    # with known motion (vertex error 3.4 -> 1.8 px; higher weights fit it better still) and lp_d0 (held-out
    # vertices' colour residual 0.031 -> 0.022 for +0.3 px landmark error; at 100 the expressions drift).
    weight: float = 30.0
    step_px: float = 0.15  # Adam step in pixels of landmark motion
    chunk_frames: int = 48  # frames refined together (bounds memory; appearance is estimated per chunk)
    zbuffer: int = 128  # side of the visibility z-buffer (cells of 4 px at 512^2)
    depth_tol: float = 0.008  # metres a vertex may lie behind the z-buffer and still be visible
    min_cos: float = 0.3  # vertices seen more obliquely than this (cosine) are left out: they mix in background
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.rounds < 1 or self.iterations < self.rounds:
            raise ConfigError(f"photometric iterations={self.iterations} / rounds={self.rounds} invalid",
                              "use iterations >= rounds >= 1")
        if self.points < 16 or self.chunk_frames < 2:
            raise ConfigError("photometric points must be >= 16 and chunk_frames >= 2")
        if self.sigma <= 0 or self.weight < 0 or self.step_px <= 0:
            raise ConfigError("photometric sigma and step_px must be > 0, weight >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhotometricReport:
    """What the refinement changed (means over the refined frames)."""

    frames: int
    residual_before: float  # mean |I - g a| over visible vertices, colour units 0..1
    residual_after: float
    lmk_error_before_px: float  # median landmark error (reference px)
    lmk_error_after_px: float
    seconds: float
    skipped: str = ""  # why nothing was done (e.g. a single photo)


# ----------------------------------------------------------------------------------------------------- geometry
def face_vertex_embedding(head: HeadModel, n: int, seed: int = 0) -> tuple[LandmarkEmbedding, np.ndarray]:
    """Up to ``n`` vertices of the face-skin region as a point embedding (each vertex = a one-hot barycentric on a
    triangle that contains it). Returns the embedding and the vertex ids (P,)."""
    faces = head.faces.cpu().numpy()
    region = head.face_region.cpu().numpy()
    skin = faces[region == REGIONS["face"]]
    verts = np.unique(skin)
    if len(verts) > n:
        verts = np.sort(np.random.default_rng(seed).choice(verts, n, replace=False))
    # One triangle per vertex and the vertex's corner in it.
    tri_of = np.full(head.num_vertices, -1, np.int64)
    corner_of = np.zeros(head.num_vertices, np.int64)
    face_ids = np.flatnonzero(region == REGIONS["face"])
    for c in range(3):
        vs = faces[face_ids, c]
        tri_of[vs], corner_of[vs] = face_ids, c
    bary = np.zeros((len(verts), 3), np.float32)
    bary[np.arange(len(verts)), corner_of[verts]] = 1.0
    emb = LandmarkEmbedding(mp_index=torch.arange(len(verts)), faces=torch.as_tensor(tri_of[verts]),
                            bary=torch.as_tensor(bary))
    return emb, verts


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (B, V, 3), unit length, from posed vertices (B, V, 3) and faces (F, 3)."""
    a, b, c = (verts[:, faces[:, i]] for i in range(3))
    fn = torch.cross(b - a, c - a, dim=-1)
    n = torch.zeros_like(verts)
    for i in range(3):
        n.index_add_(1, faces[:, i], fn)
    return F.normalize(n, dim=-1)


@torch.no_grad()
def visible_vertices(head: HeadModel, problem: _Problem, params_x: torch.Tensor, beta: torch.Tensor,
                     vertex_ids: np.ndarray, mattes: torch.Tensor, cfg: PhotometricConfig) -> torch.Tensor:
    """(N, P) bool: sampled vertex p is visible and on the matte in frame n (see the module docstring)."""
    N = params_x.shape[0]
    f = problem.split(params_x)
    params = HeadParams(
        shape=problem.full_shape(beta).expand(N, -1), expression=problem.full_expression(params_x),
        rotation=f["rotation"], neck=torch.zeros_like(f["rotation"]), jaw=f["jaw"], eyes=f["eyes"],
        translation=f["translation"],
    )
    verts = head(params.to(head.v_template.device)).float().cpu()  # (N, V, 3)
    faces = head.faces.cpu()
    normals = vertex_normals(verts, faces)
    # Outward normals: the mesh's winding decides the sign; make the mean normal point away from the centre.
    centred = verts - verts.mean(1, keepdim=True)
    if float((normals * centred).sum(-1).mean()) < 0:
        normals = -normals
    cam = verts @ problem.Rw.T + problem.tw  # (N, V, 3) camera coordinates
    z = cam[..., 2]
    px = problem.project_px(verts) / REF_SIZE  # (N, V, 2) in [0, 1]
    R = cfg.zbuffer
    ix, iy = (px[..., 0] * R).floor().long(), (px[..., 1] * R).floor().long()
    inside = (ix >= 0) & (ix < R) & (iy >= 0) & (iy < R) & (z > 1e-6)
    cell = iy.clamp(0, R - 1) * R + ix.clamp(0, R - 1)
    zbuf = torch.full((N, R * R), float("inf"))
    zbuf.scatter_reduce_(1, cell, torch.where(inside, z, torch.full_like(z, float("inf"))), reduce="amin")
    zbuf = -F.max_pool2d(-zbuf.view(N, 1, R, R), 3, stride=1, padding=1).view(N, -1)  # close 1-cell holes
    cam_center = -(problem.Rw.T @ problem.tw)  # (3,) in world
    view = F.normalize(cam_center - verts, dim=-1)
    cos = (normals * view).sum(-1)
    vis = inside & (z <= zbuf.gather(1, cell) + cfg.depth_tol) & (cos > cfg.min_cos)
    vis = vis[:, torch.as_tensor(vertex_ids)]
    on_matte = sample(mattes, px[:, torch.as_tensor(vertex_ids)])[..., 0] > 0.5
    return vis & on_matte


def sample(images: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (N, P, C) of images (N, C, H, W) at uv (N, P, 2) in [0, 1] (pixel i covers [i, i+1)).
    Outside the image reads 0; differentiable in uv."""
    g = F.grid_sample(images, (uv * 2.0 - 1.0)[:, :, None], mode="bilinear", padding_mode="zeros",
                      align_corners=False)  # (N, C, P, 1)
    return g[..., 0].transpose(1, 2)


def appearance(colours: torch.Tensor, vis: torch.Tensor, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vertex albedo (P, 3) and per-frame gain (N, 3) with colours (N, P, 3) ~ gain[n] * albedo[p] on the
    visible samples (N, P), by alternating least squares (gains normalised to mean 1)."""
    w = vis.float()[..., None]
    gain = torch.ones(colours.shape[0], 3)
    for _ in range(iters):
        albedo = (w * colours * gain[:, None]).sum(0) / (w * gain[:, None] ** 2).sum(0).clamp_min(1e-6)
        gain = (w * colours * albedo[None]).sum(1) / (w * albedo[None] ** 2).sum(1).clamp_min(1e-6)
        gain = gain / gain.mean(0, keepdim=True).clamp_min(1e-6)
    return albedo, gain


# ------------------------------------------------------------------------------------------------------- refine
def refine_photometric(
    head: HeadModel,
    result: TrackingResult,
    load_frames: FrameLoader,
    tracking_config: TrackingConfig | None = None,
    config: PhotometricConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TrackingResult, PhotometricReport]:
    """Refine a landmark tracking with the frames' colours (see the module docstring).

    Args:
        head: the head model that was tracked.
        result: its landmark tracking (with ``landmarks``, as ``track`` returns it).
        load_frames: gives the crops and mattes of requested frame ids (called once per chunk).
        tracking_config: the tracker's settings (landmark weights, priors, smoothness); defaults as ``track``.
        config: refinement settings.
        progress: called as ``progress(frames_done, frames_total)``.
    Returns:
        the refined tracking (same frames; untracked frames re-interpolated) and a report.
    """
    t0 = time.perf_counter()
    cfg = config or PhotometricConfig()
    tcfg = tracking_config or TrackingConfig()
    if result.landmarks is None:
        raise ConfigError("photometric refinement needs the tracking's landmarks", "re-run the tracking")
    lmk2d = np.asarray(result.landmarks, dtype=np.float64)
    image_size = int(result.image_size)
    K = torch.as_tensor(result.K, dtype=torch.float32)
    c2w = torch.as_tensor(result.c2w[0], dtype=torch.float32)
    rig = LandmarkRig(head, n_available=lmk2d.shape[1])
    problem = _Problem(rig, K, c2w, tcfg)
    valid = np.isin(result.status, [TRACKED, LOW_CONFIDENCE])
    data, _, present, _, tracked = landmark_data(rig, lmk2d, valid, tcfg, image_size)
    ids = np.flatnonzero(tracked)
    shape = torch.as_tensor(result.params["shape"], dtype=torch.float32)
    beta = shape[: problem.S].clone()
    problem.shape_tail = shape[problem.S:].clone()
    X = params_to_x(problem, result.params)
    before_err = float(np.nanmedian(result.lmk_error_px[ids])) if len(ids) else float("nan")
    if len(ids) < 2:
        return result, PhotometricReport(len(ids), 0.0, 0.0, before_err, before_err, time.perf_counter() - t0,
                                         skipped="fewer than 2 tracked frames (a photo): nothing to compare")

    emb, vertex_ids = face_vertex_embedding(head, cfg.points, cfg.seed)
    dense = _Problem(LandmarkRig(head, n_available=len(vertex_ids), embedding=emb), K, c2w, tcfg)
    dense.shape_tail = problem.shape_tail
    with torch.no_grad():  # pixel sensitivity per parameter, from up to 16 frames (it varies little over a clip)
        some = ids[:16]
        _, J_x, _, _ = problem.linearize(beta, X[some], data[some], False)
        sens = pixel_sensitivity(J_x, data.weights[some]).clamp_min(1e-3)
    smooth_coef = smoothness_coefficients(problem, sens)
    res_before, res_after, n_done = [], [], 0
    prev: np.ndarray | None = None
    steps = max(cfg.iterations // cfg.rounds, 1)
    for start in range(0, len(ids), cfg.chunk_frames):
        chunk = ids[start:start + cfg.chunk_frames]
        rgb, alpha = load_frames(chunk)
        images = torch.as_tensor(np.asarray(rgb), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        mattes = torch.as_tensor(np.asarray(alpha), dtype=torch.float32)[:, None] / 255.0
        smooth, ctx_ids = chunk_smoothness(chunk, prev, smooth_coef, tcfg.max_gap)
        context = X[ctx_ids] if len(ctx_ids) else torch.zeros(0, problem.P)
        x = X[chunk].clone()
        chunk_data = data[chunk]
        for r in range(cfg.rounds):
            vis, albedo, gain, res = _appearance_step(head, dense, x, beta, vertex_ids, images, mattes, cfg)
            if r == 0:
                res_before.append((res, len(chunk)))
            x = _fit_step(problem, dense, x, beta, chunk_data, images, vis, albedo, gain, sens, smooth, context,
                          cfg, steps)
        *_, res = _appearance_step(head, dense, x, beta, vertex_ids, images, mattes, cfg)
        res_after.append((res, len(chunk)))
        X[chunk] = x
        prev = chunk
        n_done += len(chunk)
        if progress is not None:
            progress(n_done, len(ids))
    with torch.no_grad():
        refined = assemble_result(problem, beta, X, data, present, tracked, K, c2w, image_size, head, lmk2d)
    refined.status = np.where(np.isin(result.status, [TRACKED, LOW_CONFIDENCE]), refined.status, result.status)

    def mean(pairs):
        return float(sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1))

    report = PhotometricReport(len(ids), mean(res_before), mean(res_after), before_err,
                               float(np.nanmedian(refined.lmk_error_px[ids])), time.perf_counter() - t0)
    return refined, report


@torch.no_grad()
def _appearance_step(head, dense: _Problem, x, beta, vertex_ids, images, mattes, cfg: PhotometricConfig):
    """Visibility, albedo, gains and the mean colour residual at the current parameters."""
    vis = visible_vertices(head, dense, x, beta, vertex_ids, mattes, cfg)
    seen = vis.sum(0) >= 2  # a vertex seen in one frame only constrains nothing
    vis = vis & seen[None]
    colours = sample(images, dense.project_px(dense.landmarks(beta, x)) / REF_SIZE)
    albedo, gain = appearance(colours, vis)
    r = (colours - gain[:, None] * albedo[None]).norm(dim=-1)
    res = float((r * vis).sum() / vis.sum().clamp_min(1))
    return vis, albedo, gain, res


def _fit_step(problem: _Problem, dense: _Problem, x0, beta, data: _Data, images, vis, albedo, gain, sens, smooth,
              context, cfg: PhotometricConfig, steps: int) -> torch.Tensor:
    """``steps`` Adam steps on the chunk's per-frame parameters (pixel-scaled), appearance fixed."""
    scale = sens.float()
    z = (x0 * scale).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.step_px)
    # Decay the step to a tenth over the block so the parameters settle instead of hovering at Adam's step size.
    decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=max(steps - 1, 1))
    target = (gain[:, None] * albedo[None]).detach()
    w = vis.float()
    denom = w.sum(1).clamp_min(1.0)
    for _ in range(steps):
        opt.zero_grad()
        x = z / scale
        cost = problem.frame_costs(beta, x, data).sum()
        colours = sample(images, dense.project_px(dense.landmarks(beta, x)) / REF_SIZE)
        r2 = ((colours - target) ** 2).sum(-1)
        photo = (robust_penalty(r2, "charbonnier", cfg.sigma) * w).sum(1) / denom
        cost = cost + cfg.weight / cfg.sigma**2 * photo.sum()
        if smooth is not None:
            cost = cost + smooth.cost(x, context)
        cost.backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        return clamp_to_limits(problem, (z / scale).detach().clone())


__all__ = ["PHOTOMETRIC_REPORT", "PhotometricConfig", "PhotometricReport", "refine_photometric", "face_vertex_embedding", "appearance"]
