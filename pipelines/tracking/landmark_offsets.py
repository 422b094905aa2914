"""Data-fitted per-landmark offsets of a head model's MediaPipe landmark embedding.

``build_landmark_embedding`` places each of MediaPipe's 478 points on a head's template by aligning a frontal
reference layout to a few anchors and projecting it onto the surface. Where the layout and the head's face differ
(ICT: cheeks, the face oval, the lower lip), a landmark sits millimetres away from the surface point MediaPipe
actually reports, and the tracker leaves a systematic residual at it in every frame of every clip.

The fix fitted here: a shift ``d_l`` (2,) of each aligned point in the template's frontal x/y plane, applied before
the projection (``build_landmark_embedding(..., offsets=...)``), so a moved point still lies on the skin. It is
found by alternation (``fit_landmark_offsets``):

1. track every training clip with the current embedding (``track(..., embedding=...)``);
2. per landmark, linearise its projected position in the shift: ``u_t(d) ~ u_t + J_t d`` with J_t (2, 2) from finite
   differences of re-embedded points, posed with each frame's tracked parameters;
3. solve ``min_d sum_t w_t |u_t + J_t d - o_t|^2 + ridge * N * |d|^2`` per landmark (Huber weights w_t against bad
   detections, a ridge scaled by the frame count N so the shift must pay for itself in every frame), add the step,
   clamp its length to ``max_offset``;
4. re-embed and track again (the per-clip shape and the per-frame expressions re-adapt to the moved points).

Iris points stay where they are (their offsets are 0): a systematic iris shift would bias the gaze, and the eyes
are fitted by their rotation anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..head.base import HeadModel, LandmarkEmbedding
from ..head.landmarks import IRISES, NUM_LANDMARKS
from .config import TrackingConfig
from .fit import REF_SIZE, _Problem, params_to_x, track
from .result import LOW_CONFIDENCE, TRACKED, TrackingResult
from .rig import LandmarkRig

log = logging.getLogger(__name__)

# Builds the embedding of all 478 landmarks for (478, 2) offsets (head units, frontal x/y plane).
EmbeddingFn = Callable[[np.ndarray], LandmarkEmbedding]


@dataclass(frozen=True)
class ClipLandmarks:
    """One clip's observations: lmk2d (T, 478, 2) px in a ``size`` crop (NaN = missing), valid (T,), K (3, 3)
    normalized intrinsics, c2w (4, 4) camera."""

    name: str
    lmk2d: np.ndarray
    valid: np.ndarray
    K: np.ndarray
    c2w: np.ndarray
    size: int = 512


@dataclass(frozen=True)
class OffsetFitConfig:
    """Settings of ``fit_landmark_offsets`` (lengths in head units: metres for ICT)."""

    rounds: int = 3  # track -> solve -> re-embed alternations
    step_m: float = 1.0e-3  # finite-difference step of the Jacobian (1 mm: well above float rounding, below a triangle)
    # Ridge, px^2 per frame per m^2: a 2 mm shift costs 1 px^2 of squared residual in each frame, so a landmark is
    # moved only where the data agree on a residual of that order (MediaPipe's own noise is ~1 px).
    ridge: float = 2.5e5
    huber_px: float = 4.0  # per-frame residuals beyond this count linearly (missed detections, occlusions)
    max_offset_m: float = 0.012  # no point moves farther than this from its reference position (keeps it on the face)
    max_frames: int = 300  # frames per clip used for the normal equations (evenly spread; tracking uses all)


def projected_landmarks(head: HeadModel, result: TrackingResult, embedding: LandmarkEmbedding,
                        frames: np.ndarray) -> np.ndarray:
    """(N, L, 2) reference pixels (512 crop) of ``embedding``'s points posed with ``result``'s parameters at
    ``frames`` (N,); L = len(embedding.mp_index)."""
    # All components: the tracker fits only the leading ones and leaves the rest of the result at 0.
    cfg = TrackingConfig(max_expression=10**6, max_shape=10**6)
    rig = LandmarkRig(head, n_available=NUM_LANDMARKS, embedding=embedding)
    problem = _Problem(rig, torch.as_tensor(result.K, dtype=torch.float32),
                       torch.as_tensor(result.c2w[0], dtype=torch.float32), cfg)
    beta = torch.as_tensor(result.params["shape"], dtype=torch.float32)
    X = params_to_x(problem, {k: v[frames] for k, v in result.params.items() if k != "shape"})
    with torch.no_grad():
        return problem.project_px(problem.landmarks(beta, X)).numpy().astype(np.float64)


class NormalEquations:
    """Per-landmark 2x2 normal equations of the offset step, summed over frames and clips.

    A (478, 2, 2) = sum w J^T J, b (478, 2) = sum w J^T r (r = model - observed, px), n (478,) frames.
    """

    def __init__(self) -> None:
        self.A = np.zeros((NUM_LANDMARKS, 2, 2))
        self.b = np.zeros((NUM_LANDMARKS, 2))
        self.n = np.zeros(NUM_LANDMARKS)
        self.sq = np.zeros(NUM_LANDMARKS)  # sum of squared residual lengths (px^2), for reporting

    def add(self, resid: np.ndarray, jac: np.ndarray, present: np.ndarray, mp_index: np.ndarray,
            huber_px: float) -> None:
        """resid (N, L, 2) px, jac (N, L, 2, 2) d px / d offset, present (N, L) bool, mp_index (L,)."""
        r_len = np.linalg.norm(resid, axis=-1)
        w = np.where(present, np.minimum(1.0, huber_px / np.maximum(r_len, 1e-9)), 0.0)  # (N, L) Huber IRLS
        resid = np.where(present[..., None], resid, 0.0)
        jac = np.where(present[..., None, None], jac, 0.0)
        np.add.at(self.A, mp_index, np.einsum("nl,nlij,nlik->ljk", w, jac, jac))
        np.add.at(self.b, mp_index, np.einsum("nl,nlij,nli->lj", w, jac, resid))
        np.add.at(self.n, mp_index, present.sum(0))
        np.add.at(self.sq, mp_index, np.where(present, r_len ** 2, 0.0).sum(0))

    def step(self, ridge: float, offsets: np.ndarray) -> np.ndarray:
        """(478, 2) update of ``offsets`` minimising the linearised data term plus ``ridge * n * |offsets + d|^2``
        (the prior acts on the total offset, not the step, so rounds do not walk away)."""
        lam = ridge * np.maximum(self.n, 1.0)
        A = self.A + lam[:, None, None] * np.eye(2)
        rhs = -(self.b + lam[:, None] * offsets)
        return np.linalg.solve(A, rhs[..., None])[..., 0]


def accumulate_clip(head: HeadModel, embed: EmbeddingFn, offsets: np.ndarray, clip: ClipLandmarks,
                    result: TrackingResult, eqs: NormalEquations, config: OffsetFitConfig) -> None:
    """Add one tracked clip's residuals and finite-difference Jacobians (w.r.t. each landmark's x/y offset)."""
    ok = np.flatnonzero(np.isin(result.status, [TRACKED, LOW_CONFIDENCE]) & clip.valid)
    if len(ok) == 0:
        return
    frames = ok[np.unique(np.linspace(0, len(ok) - 1, min(config.max_frames, len(ok))).round().astype(int))]
    base = embed(offsets)
    mp = base.mp_index.numpy()
    u0 = projected_landmarks(head, result, base, frames)  # (N, L, 2)
    jac = np.empty(u0.shape + (2,))
    for axis in range(2):
        shifted = offsets.copy()
        shifted[:, axis] += config.step_m
        jac[..., axis] = (projected_landmarks(head, result, embed(shifted), frames) - u0) / config.step_m
    obs = clip.lmk2d[frames][:, mp] * (REF_SIZE / clip.size)
    present = np.isfinite(obs).all(-1)
    eqs.add(u0 - np.where(present[..., None], obs, 0.0), jac, present, mp, config.huber_px)


def fit_landmark_offsets(
    head: HeadModel,
    embed: EmbeddingFn,
    clips: Sequence[ClipLandmarks],
    config: OffsetFitConfig = OffsetFitConfig(),
    tracking: TrackingConfig | None = None,
    initial: np.ndarray | None = None,
    report: Callable[[str], None] = log.info,
) -> tuple[np.ndarray, list[dict]]:
    """Fit (478, 2) embedding offsets on ``clips`` (see the module docstring).

    Args:
        head: the head model (its own landmark embedding is not used: every track gets ``embed(offsets)``).
        embed: offsets (478, 2) -> LandmarkEmbedding of all 478 points (e.g. ``ict_landmark_embedding``).
        clips: training clips' MediaPipe landmarks and cameras.
        tracking: tracker settings (default: the tracker's defaults, as ``tools/compare_tracking.py`` uses).
        initial: starting offsets (default zeros).
    Returns:
        (offsets (478, 2), history): per round the clips' median landmark errors before its step.
    """
    offsets = np.zeros((NUM_LANDMARKS, 2)) if initial is None else np.asarray(initial, dtype=np.float64).copy()
    frozen = np.zeros(NUM_LANDMARKS, bool)
    frozen[list(IRISES)] = True
    history = []
    for rnd in range(config.rounds):
        emb = embed(offsets)
        eqs = NormalEquations()
        medians = {}
        for clip in clips:
            res = track(head, clip.lmk2d, clip.valid, clip.K, clip.c2w, image_size=clip.size, config=tracking,
                        embedding=emb)
            ok = np.isin(res.status, [TRACKED, LOW_CONFIDENCE])
            medians[clip.name] = float(np.median(res.lmk_error_px[ok] * 512.0 / clip.size))
            accumulate_clip(head, embed, offsets, clip, res, eqs, config)
        step = eqs.step(config.ridge, offsets)
        step[frozen] = 0.0
        offsets = offsets + step
        length = np.linalg.norm(offsets, axis=1, keepdims=True)
        offsets *= np.minimum(1.0, config.max_offset_m / np.maximum(length, 1e-12))
        rms = float(np.sqrt(eqs.sq.sum() / max(eqs.n.sum(), 1.0)))
        history.append({"round": rnd, "mean_median_px": float(np.mean(list(medians.values()))),
                        "rms_landmark_px": rms, "medians": medians,
                        "mean_offset_mm": float(1e3 * np.linalg.norm(offsets, axis=1).mean()),
                        "max_offset_mm": float(1e3 * np.linalg.norm(offsets, axis=1).max())})
        report(f"round {rnd}: mean median {history[-1]['mean_median_px']:.3f} px, landmark rms {rms:.3f} px; "
               f"offsets mean {history[-1]['mean_offset_mm']:.2f} mm, max {history[-1]['max_offset_mm']:.2f} mm")
    return offsets, history


__all__ = ["ClipLandmarks", "OffsetFitConfig", "NormalEquations", "fit_landmark_offsets", "projected_landmarks",
           "accumulate_clip"]
