"""Fit a head model to 2D face landmarks: shape per clip; expression, jaw, eyes and head pose per frame.

Schedule:

1. **Rigid initialisation** per frame: PnP (``cv2.solvePnP``, SQPnP) between the model's neutral landmarks and
   the observed ones (only landmarks that neither the jaw nor the eyes move, and not the silhouette), with the
   normalized intrinsics scaled to pixels; converted to the head's root rotation and translation.
2. **Shape stage** on up to ``shape_frames`` key frames spread over the clip: shape (shared) and every per-frame
   parameter of those frames jointly.
3. **Per-frame stage** on all frames with landmarks, in chunks of ``chunk_frames`` with the shape fixed:
   expression, jaw, eyes and pose jointly, with a second-difference smoothness penalty across frames. Each chunk
   sees the last two solved frames of the previous one as fixed context, so smoothing does not break at borders.
4. Frames without landmarks get parameters interpolated from their tracked neighbours (``temporal.fill_invalid``).

Both stages are Levenberg-Marquardt (Gauss-Newton with damping) on the robust loss through iteratively
re-weighted least squares; they converge in 5-10 iterations. The Jacobians are exact and in closed form
(``LandmarkRig.linear_jacobian`` / ``joint_shift_jacobian`` for blendshape coefficients, ``pose_jacobian`` for the
joint rotations). The normal equations are block-diagonal per frame, plus an arrow (the shape shared by the key
frames: Schur complement) or a band (smoothness couples each frame to two neighbours on each side: exact block
Cholesky, O(T P^3)). With the embedded head model (478 landmarks), a 200-frame clip takes ~2-4 s on one CPU core.

Landmarks only; ``photometric.refine_photometric`` optionally refines the result with the frames' colours.

The head moves, the camera stays: ``rotation`` / ``translation`` are the root joint's global pose, and the neck
stays at zero: the whole head, neck included, turns rigidly (face landmarks carry no evidence to split a turn
between the root and the neck joint).

Loss, in reference pixels of a 512 crop (``REF_SIZE``): per frame, the weighted mean over landmarks of a robust
penalty of the 2D reprojection residual; L2 priors on expression, jaw and eyes; range limits on jaw and eyes; a
same-gaze prior between the eyes. Across frames, second differences of the parameters, each scaled by its pixel
sensitivity (RMS landmark motion per unit), so smoothness weights read as landmark pixels for all parameters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.camera import world_to_camera
from ..errors import InputError
from ..head.base import HeadModel, LandmarkEmbedding
from .config import TrackingConfig
from .result import LOW_CONFIDENCE, TRACKED, TrackingResult
from .rig import LandmarkRig
from .temporal import fill_invalid, smoothness_triples

log = logging.getLogger(__name__)
REF_SIZE = 512  # residuals are measured in pixels of a REF_SIZE x REF_SIZE image
JAW, EYE_LEFT, EYE_RIGHT = 2, 3, 4  # joint ids (pipelines.head.base.JOINT_NAMES)

Progress = Callable[[str, int, int], None]


# -------------------------------------------------------------------------------------------------- landmark weights
def default_landmark_groups() -> dict[str, np.ndarray]:
    """MediaPipe index groups by name from ``pipelines.head.landmarks`` ({} when that module is unavailable)."""
    try:
        from ..head import landmarks as lm
    except ImportError:
        return {}
    groups = getattr(lm, "GROUPS", {})
    return {name: np.asarray(list(idx), dtype=np.int64) for name, idx in groups.items()}


def landmark_weights(
    mp_index: torch.Tensor, config: TrackingConfig, groups: dict[str, np.ndarray] | None = None
) -> torch.Tensor:
    """Per-landmark data weights (L,): ``config.group_weights[g]`` for members of group g, else other_weight."""
    if groups is None:
        groups = default_landmark_groups() if config.landmark_groups is None else config.landmark_groups
    idx = mp_index.cpu().numpy()
    w = np.full(idx.shape[0], float(config.other_weight))
    for name, weight in config.group_weights.items():
        if name in groups:
            w[np.isin(idx, np.asarray(list(groups[name]), dtype=np.int64))] = float(weight)
    return torch.as_tensor(w, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------ losses
def robust_penalty(r2: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """Robust penalty of squared residual norms r2 (any shape); all behave like r2 for r << scale."""
    c2 = scale * scale
    if kind == "charbonnier":  # quadratic near 0, linear (L1-like) for large residuals
        return 2.0 * c2 * (torch.sqrt(1.0 + r2 / c2) - 1.0)
    if kind == "gm":  # Geman-McClure: saturates at c^2, outliers stop pulling
        return c2 * r2 / (r2 + c2)
    return r2


def robust_weight(r2: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """IRLS weight d penalty / d r2 (1 in the quadratic zone)."""
    c2 = scale * scale
    if kind == "charbonnier":
        return 1.0 / torch.sqrt(1.0 + r2 / c2)
    if kind == "gm":
        return c2 * c2 / (r2 + c2) ** 2
    return torch.ones_like(r2)


# ---------------------------------------------------------------------------------------------------------- problem
@dataclass
class _Data:
    """Observations of N frames: obs (N, L, 2) normalized image coords, weights (N, L) summing to 1 per frame."""

    obs: torch.Tensor
    weights: torch.Tensor

    def __getitem__(self, idx) -> "_Data":
        return _Data(self.obs[idx], self.weights[idx])


def _chain(Jp: torch.Tensor, dX: torch.Tensor) -> torch.Tensor:
    """(N, L, 2, 3) x (N, L, 3, C) -> (N, L, 2, C) as six fused multiply-adds (batched 2x3 matmuls are slow)."""
    rows = [sum(Jp[..., i, d, None] * dX[..., d, :] for d in range(3)) for i in range(2)]
    return torch.stack(rows, -2)


class _Problem:
    """The landmark fitting problem: rig, camera, settings and the layout of the per-frame parameter vector.

    Per frame x = [expression (E'), rotation (3), translation (3), jaw (3), eyes (6)]  (P = E' + 15);
    shared beta = shape (S'). E' and S' are the leading components the tracker fits (the rest stay 0).
    """

    def __init__(self, rig: LandmarkRig, K: torch.Tensor, c2w: torch.Tensor, config: TrackingConfig) -> None:
        self.rig, self.cfg = rig, config
        self.K = K.float()
        w2c = world_to_camera(c2w[None].float())[0]
        self.Rw, self.tw = w2c[:3, :3], w2c[:3, 3]
        self.E = min(rig.n_expr, config.max_expression)
        self.S = min(rig.n_shape, config.max_shape)
        self.P = self.E + 15
        E = self.E
        self.sl = {"expression": slice(0, E), "rotation": slice(E, E + 3), "translation": slice(E + 3, E + 6),
                   "jaw": slice(E + 6, E + 9), "eyes": slice(E + 9, E + 15)}
        self.jaw_lo = torch.tensor([config.jaw_pitch_range[0], -config.jaw_side_max, -config.jaw_side_max])
        self.jaw_hi = torch.tensor([config.jaw_pitch_range[1], config.jaw_side_max, config.jaw_side_max])
        # (lo, hi) of every fitted expression coefficient, or None (unbounded basis or limits off).
        rng = rig.expression_range if config.expression_limits else None
        self.expr_range = None if rng is None else (float(rng[0]), float(rng[1]))
        # Prior curvature per component (diagonal part) of the per-frame vector.
        d = torch.zeros(self.P)
        d[self.sl["expression"]] = config.expression_prior
        d[self.sl["jaw"]] = config.jaw_prior
        d[self.sl["eyes"]] = config.eye_prior
        self.prior_diag = d
        self.shape_tail = torch.zeros(rig.n_shape - self.S)  # components beyond S' (kept from shape_init)

    # ----------------------------------------------------------------------------------------------- unpacking
    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: x[..., s] for k, s in self.sl.items()}

    def pose(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 5, 3) joint axis-angles (neck zero) from x (N, P)."""
        f = self.split(x)
        eyes = f["eyes"]
        return torch.stack([f["rotation"], torch.zeros_like(f["rotation"]), f["jaw"], eyes[..., :3], eyes[..., 3:]], -2)

    def full_shape(self, beta: torch.Tensor) -> torch.Tensor:
        return torch.cat([beta, self.shape_tail.to(beta)]).reshape(1, -1)

    def full_expression(self, x: torch.Tensor) -> torch.Tensor:
        e = x[..., self.sl["expression"]]
        return torch.cat([e, e.new_zeros(*e.shape[:-1], self.rig.n_expr - self.E)], -1)

    # ---------------------------------------------------------------------------------------------- projection
    def to_camera(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.Rw.T + self.tw

    def project_px(self, X: torch.Tensor) -> torch.Tensor:
        """World points (..., 3) -> reference pixels (..., 2)."""
        c = self.to_camera(X)
        uvw = c @ self.K.T
        return uvw[..., :2] / c[..., 2:].clamp(min=1e-6) * REF_SIZE

    def projection_jacobian(self, X: torch.Tensor) -> torch.Tensor:
        """d reference px / d world point (..., 2, 3)."""
        c = self.to_camera(X)
        z = c[..., 2].clamp(min=1e-6)
        K = self.K
        # u = (K00 cx + K01 cy + K02 cz) / cz, v = (K11 cy + K12 cz) / cz (pinhole, any skew).
        num = c @ K[:2].T  # (..., 2)
        dc = K[:2].expand(*c.shape[:-1], 2, 3) / z[..., None, None]
        dc = dc - (num / z[..., None] ** 2)[..., :, None] * torch.tensor([0.0, 0.0, 1.0])
        return dc @ self.Rw * REF_SIZE

    def landmarks(self, beta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        f = self.split(x)
        return self.rig.landmarks(self.full_shape(beta), self.full_expression(x), self.pose(x), f["translation"])

    # -------------------------------------------------------------------------------------------------- costs
    def frame_costs(self, beta: torch.Tensor, x: torch.Tensor, data: _Data) -> torch.Tensor:
        """(N,) robust data term + per-frame priors and limits."""
        cfg = self.cfg
        r = self.project_px(self.landmarks(beta, x)) - data.obs * REF_SIZE
        rho = robust_penalty((r * r).sum(-1), cfg.robust, cfg.robust_scale_px)
        f = self.split(x)
        eyes = f["eyes"]
        prior = (x * x * self.prior_diag).sum(-1) + cfg.eye_symmetry * ((eyes[:, :3] - eyes[:, 3:]) ** 2).sum(-1)
        limits = sum((_overshoot(x[:, sl], lo, hi) ** 2).sum(-1) for sl, lo, hi in self.limit_boxes())
        return (rho * data.weights).sum(-1) + prior + cfg.limit_weight * limits

    def limit_boxes(self) -> list[tuple[slice, torch.Tensor | float, torch.Tensor | float]]:
        """(slice of x, low, high) of every range-limited block: the jaw, the eyes and, for a head model with an
        ``expression_range`` (when ``expression_limits`` is on), the expressions."""
        m = self.cfg.eye_max
        boxes = [(self.sl["jaw"], self.jaw_lo, self.jaw_hi), (self.sl["eyes"], -m, m)]
        if self.expr_range is not None:
            boxes.append((self.sl["expression"], *self.expr_range))
        return boxes

    # ------------------------------------------------------------------------------------------- linearization
    def linearize(self, beta: torch.Tensor, x: torch.Tensor, data: _Data, with_shape: bool):
        """Residuals and Jacobians at (beta, x) (call under ``torch.no_grad``: all derivatives are explicit).

        Returns r (N, L, 2) ref px, J_x (N, L, 2, P), J_beta (N, L, 2, S') or None, row weights (N, L) (data
        weight times the IRLS weight of the robust penalty).
        """
        rig, cfg = self.rig, self.cfg
        N = x.shape[0]
        shape = self.full_shape(beta).expand(N, -1)
        expr = self.full_expression(x)
        pose = self.pose(x)
        joints = rig.joints(shape, expr)
        q = rig.linear_q(shape, expr)  # (N, L, k, 3)
        if rig.q_pose.shape[0]:
            q = q + (rig.pose_features(pose) @ rig.q_pose).reshape(q.shape)
        R, t = rig.joint_transforms(pose, joints)
        X = rig.skin(q, R, t) + self.split(x)["translation"][:, None]
        dX_dpose = rig.pose_jacobian(pose, joints, q, [0, JAW, EYE_LEFT, EYE_RIGHT])  # (N, L, 3, 12)
        dX_dt = torch.eye(3).expand(*X.shape[:2], 3, 3)
        dX_dp = torch.cat([dX_dpose[..., :3], dX_dt, dX_dpose[..., 3:]], -1)  # rot, trans, jaw, eyes
        dX_de = rig.linear_jacobian(R, rig.q_expr[: self.E])  # (N, L, 3, E')
        dX_de = dX_de + rig.joint_shift_jacobian(R, rig.J_exprdirs[:, : self.E])
        Jp = self.projection_jacobian(X)  # (N, L, 2, 3)
        J_x = torch.cat([_chain(Jp, dX_de), _chain(Jp, dX_dp)], -1)
        r = self.project_px(X) - data.obs * REF_SIZE
        w = data.weights * robust_weight((r * r).sum(-1), cfg.robust, cfg.robust_scale_px)
        J_b = None
        if with_shape:
            dX_db = rig.linear_jacobian(R, rig.q_shape[: self.S])
            dX_db = dX_db + rig.joint_shift_jacobian(R, rig.J_shapedirs[:, : self.S])  # joints move too
            J_b = _chain(Jp, dX_db)
        return r, J_x, J_b, w

    def prior_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gauss-Newton curvature (N, P, P) and gradient (N, P) of the per-frame priors and limits."""
        cfg = self.cfg
        N, P = x.shape
        H = torch.diag_embed(self.prior_diag.expand(N, P)).clone()
        g = x * self.prior_diag
        e = self.sl["eyes"].start
        # Same gaze: w |l - r|^2.
        diff = x[:, e:e + 3] - x[:, e + 3:e + 6]
        for i in range(3):
            a, b = e + i, e + 3 + i
            H[:, a, a] += cfg.eye_symmetry
            H[:, b, b] += cfg.eye_symmetry
            H[:, a, b] -= cfg.eye_symmetry
            H[:, b, a] -= cfg.eye_symmetry
        g[:, e:e + 3] += cfg.eye_symmetry * diff
        g[:, e + 3:e + 6] -= cfg.eye_symmetry * diff
        # Range limits: quadratic outside the allowed interval.
        for sl, lo, hi in self.limit_boxes():
            viol = _overshoot(x[:, sl], lo, hi)
            idx = torch.arange(sl.start, sl.stop)
            H[:, idx, idx] += cfg.limit_weight * (viol != 0).float()
            g[:, sl] += cfg.limit_weight * viol
        return H, g


# ------------------------------------------------------------------------------------------------------- smoothness
class _Smoothness:
    """Second-difference penalty sum_m |sqrt(c) * (x_a - 2 x_b + x_c)|^2 over triples, c (P,) per component.

    Frames are indexed [context (fixed, C), free (N)]; only free frames are unknowns. Triples are consecutive
    frames, so the Hessian D^T D (x) diag(c) is block-pentadiagonal: ``band[d]`` (N - d,) holds the scalar
    coefficients of D^T D between free frames i and i - d, d = 0, 1, 2.
    """

    def __init__(self, triples: np.ndarray, coef: torch.Tensor, n_context: int, n_free: int) -> None:
        self.tri = torch.as_tensor(triples, dtype=torch.long)
        self.coef, self.C, self.N = coef, n_context, n_free
        B = np.zeros((n_context + n_free,) * 2)
        for row in np.asarray(triples):
            for u, au in zip(row, (1.0, -2.0, 1.0)):
                for v, av in zip(row, (1.0, -2.0, 1.0)):
                    B[u, v] += au * av
        B = B[n_context:, n_context:]
        if n_free > 2 and np.abs(np.triu(B, 3)).max() > 0:
            raise AssertionError("smoothness triples must be consecutive frames")
        self.band = [torch.as_tensor(np.diagonal(B, -d).copy()) for d in range(3)]

    def second_diff(self, x_all: torch.Tensor) -> torch.Tensor:
        t = self.tri
        return x_all[t[:, 0]] - 2.0 * x_all[t[:, 1]] + x_all[t[:, 2]]

    def cost(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        d = self.second_diff(torch.cat([ctx.to(x), x], 0))
        return (d * d * self.coef.to(x)).sum()

    def gradient(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """D^T (c * D x) on the free frames (N, P)."""
        d = self.second_diff(torch.cat([ctx.to(x), x], 0)) * self.coef.to(x)
        out = d.new_zeros(self.C + self.N, d.shape[1])
        out.index_add_(0, self.tri[:, 0], d)
        out.index_add_(0, self.tri[:, 1], -2.0 * d)
        out.index_add_(0, self.tri[:, 2], d)
        return out[self.C:]


def _solve_block_banded(H: torch.Tensor, smooth: _Smoothness, g: torch.Tensor) -> torch.Tensor:
    """Solve (blockdiag(H) + D^T D (x) diag(c)) v = g exactly by block Cholesky (bandwidth two blocks).

    H (N, P, P) float64 SPD, g (N, P). O(N P^3): the frames are coupled only to their two neighbours each side.
    """
    N, P = g.shape
    c = smooth.coef.to(H)
    b0, b1, b2 = (band.to(H) for band in smooth.band)
    solve_lower = lambda Lm, rhs: torch.linalg.solve_triangular(Lm, rhs, upper=False)  # noqa: E731
    L0: list[torch.Tensor] = []  # diagonal blocks
    L1: list[torch.Tensor | None] = []  # block (i, i-1)
    L2: list[torch.Tensor | None] = []  # block (i, i-2)
    eye = torch.eye(P, dtype=H.dtype)
    for i in range(N):
        S = H[i] + torch.diag(b0[i] * c)
        l2 = l1 = None
        if i >= 2:
            l2 = solve_lower(L0[i - 2], torch.diag(b2[i - 2] * c)).T  # A(i,i-2) L(i-2,i-2)^-T  (A symmetric diag)
            S = S - l2 @ l2.T
        if i >= 1:
            a1 = torch.diag(b1[i - 1] * c)
            if l2 is not None and L1[i - 1] is not None:
                a1 = a1 - l2 @ L1[i - 1].T
            l1 = solve_lower(L0[i - 1], a1.T).T
            S = S - l1 @ l1.T
        Lii, info = torch.linalg.cholesky_ex(S)
        if int(info):
            Lii = torch.linalg.cholesky(S + 1e-9 * S.diagonal().abs().max() * eye)
        L0.append(Lii)
        L1.append(l1)
        L2.append(l2)
    y = []
    for i in range(N):
        r = g[i]
        if i >= 1:
            r = r - L1[i] @ y[i - 1]
        if i >= 2:
            r = r - L2[i] @ y[i - 2]
        y.append(solve_lower(L0[i], r[:, None])[:, 0])
    x: list[torch.Tensor] = [g.new_zeros(P)] * N
    for i in reversed(range(N)):
        r = y[i]
        if i + 1 < N:
            r = r - L1[i + 1].T @ x[i + 1]
        if i + 2 < N:
            r = r - L2[i + 2].T @ x[i + 2]
        x[i] = torch.linalg.solve_triangular(L0[i].T, r[:, None], upper=True)[:, 0]
    return torch.stack(x)


# ------------------------------------------------------------------------------------------------------ the solver
def _gauss_newton_blocks(problem: _Problem, r, J_x, w, x):
    """Per-frame normal equations (N, P, P), (N, P) in float64, data + priors."""
    Jw = J_x * w[..., None, None]
    N, L = w.shape
    Jf = J_x.reshape(N, L * 2, -1)
    H = (Jw.reshape(N, L * 2, -1).transpose(1, 2) @ Jf).double()
    g = (Jw.reshape(N, L * 2, -1).transpose(1, 2) @ r.reshape(N, L * 2, 1))[..., 0].double()
    Hp, gp = problem.prior_terms(x)
    return H + Hp.double(), g + gp.double()


def _damped_step(
    H: torch.Tensor,
    g: torch.Tensor,
    lam: float,
    smooth: _Smoothness | None,
    shape_terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Levenberg-Marquardt step (d_x (N, P), d_beta (S',) or None) for curvature H (N, P, P), gradient g (N, P).

    shape_terms = (H_xb (N, P, S'), H_bb (S', S'), g_b (S',)) when the shared shape is solved too (Schur
    complement: eliminate the per-frame blocks, solve the shape, back-substitute); smooth couples neighbouring
    frames (banded solve). Raises ``torch.linalg.LinAlgError`` when a system is not positive definite.
    """
    Hd = H + lam * torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1) + 1e-6)
    if shape_terms is not None:
        H_xb, H_bb, g_b = shape_terms
        Lc = torch.linalg.cholesky(Hd)
        Hinv_xb = torch.cholesky_solve(H_xb, Lc)  # (N, P, S')
        Hinv_g = torch.cholesky_solve(g[..., None], Lc)[..., 0]  # (N, P)
        Hbd = H_bb + lam * torch.diag(torch.diagonal(H_bb) + 1e-6)
        S_mat = Hbd - (H_xb.transpose(1, 2) @ Hinv_xb).sum(0)
        rhs = g_b - (H_xb.transpose(1, 2) @ Hinv_g[..., None])[..., 0].sum(0)
        d_b = -torch.linalg.solve(S_mat, rhs)
        return -(Hinv_g + (Hinv_xb @ d_b[:, None])[..., 0]), d_b
    if smooth is not None:
        return -_solve_block_banded(Hd, smooth, g), None
    return -torch.cholesky_solve(g[..., None], torch.linalg.cholesky(Hd))[..., 0], None


def _levenberg_marquardt(
    problem: _Problem,
    data: _Data,
    beta: torch.Tensor,
    x: torch.Tensor,
    *,
    fit_shape: bool,
    iters: int,
    smooth: _Smoothness | None = None,
    context: torch.Tensor | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise the tracking cost over x (N, P) (and beta (S',) when fit_shape). Returns the solution."""
    cfg = problem.cfg
    N = x.shape[0]
    shape_w = cfg.shape_prior * N  # the shape prior balances the per-frame data terms of all N frames
    ctx = context if context is not None else x.new_zeros(0, x.shape[1])

    def total_cost(b: torch.Tensor, xx: torch.Tensor) -> float:
        c = problem.frame_costs(b, xx, data).sum()
        if fit_shape:
            c = c + shape_w * (b * b).sum()
        if smooth is not None:
            c = c + smooth.cost(xx, ctx)
        return float(c)

    lam = cfg.lm_damping
    with torch.no_grad():
        cost = total_cost(beta, x)
    for it in range(iters):
        r, J_x, J_b, w = problem.linearize(beta, x, data, with_shape=fit_shape)
        H, g = _gauss_newton_blocks(problem, r, J_x, w, x)
        if smooth is not None:  # its Hessian enters the banded solve
            g = g + smooth.gradient(x.double(), ctx).double()
        shape_terms = None
        if fit_shape:
            Jbw = (J_b * w[..., None, None]).reshape(N, -1, problem.S)
            Jxf = J_x.reshape(N, -1, problem.P)
            H_xb = (Jxf.transpose(1, 2) @ Jbw).double()  # (N, P, S')
            H_bb = (Jbw.transpose(1, 2) @ J_b.reshape(N, -1, problem.S)).sum(0).double()
            H_bb = H_bb + shape_w * torch.eye(problem.S, dtype=torch.float64)
            g_b = (Jbw.transpose(1, 2) @ r.reshape(N, -1, 1))[..., 0].sum(0).double() + shape_w * beta.double()
            shape_terms = (H_xb, H_bb, g_b)
        improved = False
        while lam < 1e8:
            try:
                d_x, d_b = _damped_step(H, g, lam, smooth, shape_terms)
            except torch.linalg.LinAlgError:  # not positive definite at this damping: damp more
                lam *= 8.0
                continue
            x_new = x + d_x.float()
            b_new = beta if d_b is None else beta + d_b.float()
            with torch.no_grad():
                new_cost = total_cost(b_new, x_new)
            if np.isfinite(new_cost) and new_cost <= cost:
                improved = True
                break
            lam *= 8.0
        if progress is not None:
            progress(label, it + 1, iters)
        if not improved:
            break
        rel = (cost - new_cost) / max(cost, 1e-12)
        log.debug("%s: LM iteration %d, cost %.5f -> %.5f (damping %.1e)", label, it, cost, new_cost, lam)
        x, beta, cost = x_new, b_new, new_cost
        lam = max(lam / 4.0, 1e-7)
        if rel < cfg.lm_tolerance:
            break
    return beta, x


# --------------------------------------------------------------------------------------------- rigid initialisation
def rigid_init(
    problem: _Problem, beta: torch.Tensor, obs_px: np.ndarray, use: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """PnP per frame -> root rotation (N, 3) and translation (N, 3) of the neutral head in front of the camera.

    obs_px (N, L, 2) pixels at ``image_size``; use (N, L) bool: landmarks to use (present and rigid).
    """
    import cv2

    rig = problem.rig
    with torch.no_grad():
        shape = problem.full_shape(beta)
        canon = rig.canonical_landmarks(shape[0]).double().cpu().numpy()  # (L, 3)
        J0 = rig.joints(shape)[0, 0].double().cpu().numpy()
    K_pix = problem.K.double().cpu().numpy().copy()
    K_pix[:2] *= image_size
    Rw, tw = problem.Rw.double().cpu().numpy(), problem.tw.double().cpu().numpy()
    N = obs_px.shape[0]
    rot, trans = np.zeros((N, 3)), np.zeros((N, 3))
    for i in range(N):
        ok, rvec, tvec = cv2.solvePnP(canon[use[i]], obs_px[i, use[i]].astype(np.float64), K_pix, None,
                                      flags=cv2.SOLVEPNP_SQPNP)
        if not ok:
            raise InputError(f"frame {i}: rigid pose fit failed", "check that the landmarks belong to one face")
        Rc, _ = cv2.Rodrigues(rvec)
        # camera point = Rw (R (X - J0) + J0 + t) + tw  must equal  Rc X + tc.
        R = Rw.T @ Rc
        trans[i] = Rw.T @ (tvec[:, 0] - tw) - J0 + R @ J0
        rot[i] = cv2.Rodrigues(R)[0][:, 0]
    return rot, trans


def smoothness_coefficients(problem: _Problem, sens: torch.Tensor) -> torch.Tensor:
    """(P,) float64 weights of the second-difference penalty: the config's weight per parameter group times the
    squared pixel sensitivity, so that every weight reads as landmark pixels."""
    cfg = problem.cfg
    coef = torch.zeros(problem.P, dtype=torch.float64)
    for name, w in (("expression", cfg.smooth_expression), ("rotation", cfg.smooth_pose),
                    ("translation", cfg.smooth_pose), ("jaw", cfg.smooth_jaw), ("eyes", cfg.smooth_eyes)):
        coef[problem.sl[name]] = w
    return coef * sens.double() ** 2


def chunk_smoothness(chunk: np.ndarray, prev: np.ndarray | None, coef: torch.Tensor, max_gap: int
                     ) -> tuple[_Smoothness | None, np.ndarray]:
    """The smoothness penalty of a chunk of frame ids, with the last two solved frames of the previous chunk
    (``prev``) as fixed context, so smoothing does not break at chunk borders. Returns (penalty, or None when it has
    nothing to act on; the context frame ids (C,))."""
    ctx_ids = prev[-2:] if prev is not None else np.zeros(0, dtype=np.int64)
    if len(chunk) + len(ctx_ids) < 3 or float(coef.max()) <= 0:
        return None, ctx_ids
    tri = smoothness_triples(np.concatenate([ctx_ids, chunk]), max_gap)
    return (_Smoothness(tri, coef, len(ctx_ids), len(chunk)) if len(tri) else None), ctx_ids


def pixel_sensitivity(J_x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(P,) RMS landmark motion (ref px) per unit of each parameter, from Jacobians (N, L, 2, P)."""
    w = (weights > 0).float()[..., None, None]
    ms = (J_x.pow(2) * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)  # (N, P)
    return ms.mean(0).sqrt()


# ------------------------------------------------------------------------------------------------------------- track
def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


class _threads:
    """Run torch single-threaded inside: these ops are small, and extra threads only contend (shared CPUs)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.prev = torch.get_num_threads()
        if self.n > 0:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def track(
    head: HeadModel,
    lmk2d: np.ndarray,
    valid: np.ndarray,
    K_norm: np.ndarray | torch.Tensor,
    c2w: np.ndarray | torch.Tensor,
    image_size: int = 512,
    config: TrackingConfig | None = None,
    shape_init: np.ndarray | torch.Tensor | None = None,
    progress: Progress | None = None,
    embedding: LandmarkEmbedding | None = None,
) -> TrackingResult:
    """Track ``head`` on per-frame MediaPipe landmarks.

    Args:
        head: a head model with a landmark embedding.
        lmk2d: (T, L, 2) landmarks in pixels of an ``image_size`` square crop, in MediaPipe face-mesh order
            (L = 478 with irises or 468 without); NaN marks a missing point.
        valid: (T,) bool, frames where a face was detected.
        K_norm: (3, 3) normalized intrinsics; c2w: (4, 4) the fixed camera-to-world.
        config: tracker settings (defaults: ``TrackingConfig()``).
        shape_init: (S,) initial identity (kept as is when ``config.optimize_shape`` is False).
        progress: called as ``progress(stage, done, total)``.
        embedding: the surface points of the observed landmarks (default: ``head.landmarks``; e.g.
            ``head.landmark_embedding("dlib")`` for 68-point observations).
    Returns:
        TrackingResult with per-frame parameters for all T frames (untracked ones interpolated).
    """
    cfg = config or TrackingConfig()
    lmk2d = np.asarray(lmk2d, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool).reshape(-1)
    if lmk2d.ndim != 3 or lmk2d.shape[-1] != 2:
        raise InputError(f"landmarks have shape {lmk2d.shape}, expected (T, L, 2) pixels")
    T = lmk2d.shape[0]
    if valid.shape != (T,):
        raise InputError(f"valid flags have shape {valid.shape}, expected ({T},)")
    K = _as_tensor(K_norm).reshape(3, 3)
    c2w_t = _as_tensor(c2w)
    if c2w_t.shape != (4, 4):
        raise InputError(f"camera c2w has shape {tuple(c2w_t.shape)}, expected (4, 4)")
    with _threads(cfg.num_threads), torch.no_grad():
        return _track(head, lmk2d, valid, K, c2w_t, int(image_size), cfg, shape_init, progress, embedding)


def landmark_data(rig: LandmarkRig, lmk2d: np.ndarray, valid: np.ndarray, cfg: TrackingConfig, image_size: int):
    """The tracker's observations: (data (_Data over all T frames), obs_px (T, L, 2), present (T, L) bool,
    group weights (L,), tracked (T,) bool: valid frames with at least 6 landmarks)."""
    obs_px = lmk2d[:, rig.mp_index.numpy()]  # (T, L, 2)
    present = np.isfinite(obs_px).all(-1)
    group_w = landmark_weights(rig.mp_index, cfg).numpy()
    weights = np.where(present, group_w[None], 0.0)
    tracked = valid & (present.sum(1) >= 6)
    obs_px = np.where(present[..., None], obs_px, 0.0)
    wsum = weights.sum(1, keepdims=True)
    data = _Data(torch.as_tensor(obs_px / image_size, dtype=torch.float32),
                 torch.as_tensor(weights / np.maximum(wsum, 1e-12), dtype=torch.float32))
    return data, obs_px, present, group_w, tracked


def _track(head, lmk2d, valid, K, c2w, image_size, cfg, shape_init, progress, embedding=None) -> TrackingResult:
    t_start = time.perf_counter()
    T = lmk2d.shape[0]
    rig = LandmarkRig(head, n_available=lmk2d.shape[1], embedding=embedding)
    problem = _Problem(rig, K, c2w, cfg)
    data_all, obs_px, present, group_w, tracked = landmark_data(rig, lmk2d, valid, cfg, image_size)
    ids = np.flatnonzero(tracked)
    if len(ids) == 0:
        raise InputError("no frame has a detected face with enough landmarks", "check the input shows a face")
    # Rigid landmarks for PnP: reliable (not the silhouette) and moved by neither the jaw nor the eyes.
    moving = rig.joint_weight[:, [JAW, EYE_LEFT, EYE_RIGHT]].sum(1).numpy() > 0.05
    rigid = (group_w >= 1.0) & ~moving
    if rigid.sum() < 6:
        rigid = ~moving if (~moving).sum() >= 6 else np.ones_like(moving)
    pnp_use = present & rigid[None]
    pnp_use = np.where(pnp_use.sum(1, keepdims=True) >= 6, pnp_use, present)

    beta = torch.zeros(problem.S)
    if shape_init is not None:
        s0 = _as_tensor(shape_init).reshape(-1)
        if s0.numel() != rig.n_shape:
            raise InputError(f"shape_init has {s0.numel()} values, head model '{head.name}' has {rig.n_shape}")
        beta = s0[: problem.S].clone()
        problem.shape_tail = s0[problem.S:].clone()

    def init_x(frame_ids: np.ndarray, b: torch.Tensor) -> torch.Tensor:
        rot, trans = rigid_init(problem, b, obs_px[frame_ids], pnp_use[frame_ids], image_size)
        x = torch.zeros(len(frame_ids), problem.P)
        x[:, problem.sl["rotation"]] = torch.as_tensor(rot, dtype=torch.float32)
        x[:, problem.sl["translation"]] = torch.as_tensor(trans, dtype=torch.float32)
        return init_jaw(problem, b, x, data_all[frame_ids])

    # ---- 1-2: shape on key frames
    n_key = min(cfg.shape_frames, len(ids))
    key = ids[np.unique(np.linspace(0, len(ids) - 1, n_key).round().astype(int))]
    x_key = init_x(key, beta)
    _, J_x, _, _ = problem.linearize(beta, x_key, data_all[key], with_shape=False)
    sens = pixel_sensitivity(J_x, data_all.weights[key])
    if cfg.optimize_shape:
        beta, x_key = _levenberg_marquardt(problem, data_all[key], beta, x_key, fit_shape=True,
                                           iters=cfg.shape_iters, progress=progress, label="shape")

    # ---- 3: all tracked frames, chunked, shape fixed
    X = torch.zeros(T, problem.P)
    X[key] = x_key
    smooth_coef = smoothness_coefficients(problem, sens)
    single = len(ids) == 1 and cfg.optimize_shape  # a photo: the shape stage already fitted its only frame
    prev: np.ndarray | None = None
    n_chunks = 0 if single else int(np.ceil(len(ids) / cfg.chunk_frames))
    for c in range(n_chunks):
        commit = ids[c * cfg.chunk_frames:(c + 1) * cfg.chunk_frames]
        # Solve a few frames past the chunk too (look-ahead) but keep only the chunk: its last frames then see
        # their future like interior frames do, and the next chunk starts from well-placed context frames.
        chunk = ids[c * cfg.chunk_frames:(c + 1) * cfg.chunk_frames + cfg.chunk_overlap]
        x0 = init_x(chunk, beta)
        is_key = torch.as_tensor(np.isin(chunk, key))
        x0[is_key] = X[chunk[is_key.numpy()]]  # warm start from the shape stage
        smooth, ctx_ids = chunk_smoothness(chunk, prev, smooth_coef, cfg.max_gap)
        context = X[ctx_ids].double() if len(ctx_ids) else None
        _, x = _levenberg_marquardt(problem, data_all[chunk], beta, x0, fit_shape=False, iters=cfg.frame_iters,
                                    smooth=smooth, context=context, progress=progress,
                                    label=f"frames {c + 1}/{n_chunks}")
        X[commit] = x[: len(commit)]
        prev = commit

    result = assemble_result(problem, beta, X, data_all, present, tracked, K, c2w, image_size, head, lmk2d)
    if progress is not None:
        progress(f"done in {time.perf_counter() - t_start:.1f}s", 1, 1)
    return result


@torch.no_grad()
def init_jaw(problem: _Problem, beta: torch.Tensor, x: torch.Tensor, data: _Data) -> torch.Tensor:
    """x (N, P) with each frame's jaw pitch set to the ``jaw_init_pitches`` candidate of lowest landmark cost.

    The other parameters stay as given (rigid pose, expressions 0), so an open mouth can only be explained by the
    jaw here; the fit then starts in the basin where the jaw carries the opening.
    """
    pitches = [p for p in problem.cfg.jaw_init_pitches if problem.jaw_lo[0] <= p <= problem.jaw_hi[0]]
    if len(pitches) < 2:
        return x
    j = problem.sl["jaw"].start
    costs = []
    for p in pitches:
        xp = x.clone()
        xp[:, j] = p
        costs.append(problem.frame_costs(beta, xp, data))
    best = torch.stack(costs, 0).argmin(0)  # (N,)
    x = x.clone()
    x[:, j] = torch.tensor(pitches, dtype=x.dtype)[best]
    return x


def clamp_to_limits(problem: _Problem, X: torch.Tensor) -> torch.Tensor:
    """X (N, P) with every range-limited block (``_Problem.limit_boxes``) clamped into its range (in place; returned
    for chaining)."""
    for sl, lo, hi in problem.limit_boxes():
        X[:, sl] = torch.clamp(X[:, sl], min=lo, max=hi)
    return X


def _overshoot(v: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    """(..., n) signed distance of ``v`` past [lo, hi]: v - hi above, v - lo below, 0 inside."""
    return torch.where(v < lo, v - lo, torch.where(v > hi, v - hi, torch.zeros_like(v)))


def frame_errors(problem: _Problem, beta: torch.Tensor, X: torch.Tensor, data: _Data, present: np.ndarray,
                 ids: np.ndarray) -> np.ndarray:
    """(T,) mean landmark reprojection error (reference px) of frames ``ids``; NaN elsewhere."""
    errors = np.full(X.shape[0], np.nan, dtype=np.float32)
    for start in range(0, len(ids), problem.cfg.chunk_frames):
        chunk = ids[start:start + problem.cfg.chunk_frames]
        uv = problem.project_px(problem.landmarks(beta, X[chunk]))
        err = (uv - data.obs[chunk] * REF_SIZE).norm(dim=-1).numpy()
        m = present[chunk]
        errors[chunk] = (err * m).sum(1) / m.sum(1)
    return errors


def params_to_x(problem: _Problem, params: dict[str, np.ndarray]) -> torch.Tensor:
    """Per-frame vector X (T, P) from a tracking's parameter arrays (the inverse of ``assemble_result``)."""
    T = params["rotation"].shape[0]
    X = torch.zeros(T, problem.P)
    for name in ("rotation", "translation", "jaw", "eyes"):
        X[:, problem.sl[name]] = _as_tensor(params[name])
    X[:, problem.sl["expression"]] = _as_tensor(params["expression"])[:, : problem.E]
    return X


def assemble_result(problem: _Problem, beta, X, data, present, tracked, K, c2w, image_size, head, lmk2d
                    ) -> TrackingResult:
    """Clamp, measure the landmark errors, fill untracked frames and pack a ``TrackingResult``."""
    cfg = problem.cfg
    T = X.shape[0]
    ids = np.flatnonzero(tracked)
    clamp_to_limits(problem, X)
    errors = frame_errors(problem, beta, X, data, present, ids)
    f = problem.split(X)
    per_frame = {
        "expression": problem.full_expression(X).numpy(),
        "rotation": f["rotation"].numpy(),
        "translation": f["translation"].numpy(),
        "neck": np.zeros((T, 3), dtype=np.float32),
        "jaw": f["jaw"].numpy(),
        "eyes": f["eyes"].numpy(),
    }
    filled, status = fill_invalid(per_frame, tracked)
    status[(status == TRACKED) & (errors > cfg.max_error_px)] = LOW_CONFIDENCE
    params = {"shape": problem.full_shape(beta)[0].numpy().astype(np.float32)}
    params |= {k: v.astype(np.float32) for k, v in filled.items()}
    return TrackingResult(
        params=params,
        K=K.numpy().astype(np.float32),
        c2w=np.repeat(c2w.numpy()[None].astype(np.float32), T, axis=0),
        lmk_error_px=errors,
        status=status,
        image_size=image_size,
        head_model=getattr(head, "name", ""),
        landmarks=lmk2d.astype(np.float32),
    )


__all__ = ["track", "rigid_init", "landmark_weights", "default_landmark_groups", "robust_penalty", "REF_SIZE"]
