"""Settings of the landmark-based head-model tracker (``pipelines.tracking.fit.track``).

Units. Every loss term is expressed in *reference pixels*: pixels of a 512x512 crop, whatever the input resolution.
Temporal smoothness acts on parameters scaled by their *pixel sensitivity* (how many reference pixels the landmarks
move, RMS, per unit of the parameter), so its weights read as landmark pixels for rotations, translations and
blendshape coefficients alike and do not depend on the head model's units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Landmark groups (names of ``pipelines.head.landmarks`` index groups) and their data-term weights. The face oval
# (jaw contour) is a silhouette: where the model's outline differs from the person's it cannot be matched exactly
# and would drag the pose and shape, so it counts less. Interior features (eyes, brows, nose, lips) are both
# reliable in MediaPipe and well defined on the model, so they count more. Later entries win where groups overlap.
DEFAULT_GROUP_WEIGHTS = {
    "face_oval": 0.3,
    "jaw_contour": 0.3,
    "brow_right": 1.5,
    "brow_left": 1.5,
    "nose": 1.5,
    "eye_right": 2.0,
    "eye_left": 2.0,
    "lips_outer": 2.0,
    "lips_inner": 2.0,
    "iris_right": 1.0,
    "iris_left": 1.0,
}


@dataclass
class TrackingConfig:
    """Tracker settings. Defaults are tuned for MediaPipe's 478 landmarks on a 512x512 face crop."""

    # ---- data term
    robust: str = "charbonnier"  # "charbonnier" (smooth L1), "gm" (Geman-McClure, redescending) or "l2"
    robust_scale_px: float = 3.0  # residual (reference px) where the robust loss leaves its quadratic zone
    group_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GROUP_WEIGHTS))
    other_weight: float = 0.5  # landmarks in no named group (cheeks, forehead: less distinct surface points)
    landmark_groups: dict[str, list[int]] | None = None  # name -> MediaPipe indices; None: pipelines.head.landmarks

    # ---- priors (coefficient units; FLAME-like bases have unit-variance coefficients)
    shape_prior: float = 0.05  # w * |shape|^2, against the per-frame mean data term (px^2)
    expression_prior: float = 0.05  # w * |expression|^2 per frame
    jaw_prior: float = 0.2  # w * |jaw|^2 (rad^2) per frame: keeps the jaw closed unless the lips say otherwise
    eye_prior: float = 0.5  # w * |eyes|^2 (rad^2)
    eye_symmetry: float = 5.0  # w * |left eye - right eye|^2: the eyes rotate together (conjugate gaze)

    # ---- range limits (rad); outside them a steep quadratic penalty, and the result is clamped into them
    jaw_pitch_range: tuple[float, float] = (-0.05, 0.6)  # x axis: positive opens the mouth (FLAME convention)
    jaw_side_max: float = 0.1  # |y|, |z| components of the jaw rotation
    eye_max: float = 0.6  # |each component| of the eye rotations
    # Keep expressions inside the head model's ``expression_range`` (ICT: [0, 1]). Unbounded, the ICT fit opens the
    # mouth with out-of-range ARKit shapes and leaves the jaw joint shut, so the lower teeth never move. Off by
    # default until weights are trained on such tracking: with the v2 weights (trained on unbounded tracking) it
    # costs 0.5 dB self-reenactment PSNR on lp_d0 and smirk_dafoe, while the no-network path gains expression
    # accuracy (AED 0.068 -> 0.056 on lp_d0) — weights/TRAINING.md, "v3 candidate".
    expression_limits: bool = False
    limit_weight: float = 1.0e4

    # ---- temporal smoothness (video): second differences of the px-scaled parameters over consecutive frames
    smooth_pose: float = 0.2  # head rotation and translation
    smooth_expression: float = 0.1
    smooth_jaw: float = 0.3
    smooth_eyes: float = 0.1
    max_gap: int = 2  # frames; valid frames farther apart than this are not smoothed together

    # ---- schedule (Levenberg-Marquardt)
    shape_frames: int = 24  # key frames (evenly spread over the valid ones) that fit the shared shape
    shape_iters: int = 25  # LM iterations of the shape stage (shape + all parameters of the key frames)
    frame_iters: int = 12  # LM iterations per chunk of the per-frame stage (shape fixed)
    # Jaw pitches (rad) tried per frame before the fit, expressions at 0; the one whose landmarks fit best starts
    # Levenberg-Marquardt. Started shut, the fit explains an open mouth with lip expressions and stays in that
    # basin (the lower teeth never move); () starts every frame shut.
    # With expression_limits on this lowers smirk_dafoe's median landmark error from 5.62 to 5.28 px; unbounded
    # expressions pull the jaw shut again whatever its start, so it goes with them (the default is off with them).
    jaw_init_pitches: tuple[float, ...] = ()
    lm_damping: float = 1e-3  # initial Levenberg-Marquardt damping (relative to the curvature's diagonal)
    lm_tolerance: float = 1e-6  # stop when an iteration lowers the cost by less than this fraction
    chunk_frames: int = 200  # frames solved together in the per-frame stage (bounds memory)
    chunk_overlap: int = 8  # look-ahead frames solved with each chunk (then re-solved in the next) for seamless borders
    optimize_shape: bool = True  # False: keep ``shape_init`` (or zeros) as the identity
    max_expression: int = 50  # leading expression components fitted (landmarks do not determine more)
    max_shape: int = 100  # leading shape components fitted
    num_threads: int = 1  # torch threads while tracking (small ops: more threads mostly contend); 0 = leave as is

    # ---- reporting
    max_error_px: float = 8.0  # tracked frames with a larger mean landmark error get status LOW_CONFIDENCE

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.robust not in ("charbonnier", "gm", "l2"):
            raise ConfigError(f"tracking robust loss '{self.robust}' is unknown", "use charbonnier, gm or l2")
        if self.robust_scale_px <= 0:
            raise ConfigError("tracking robust_scale_px must be positive")
        lo, hi = self.jaw_pitch_range
        if not lo < hi:
            raise ConfigError(f"tracking jaw_pitch_range {self.jaw_pitch_range} is empty",
                              "give (low, high) with low < high")
        if self.chunk_frames < 8 or self.chunk_overlap < 0:
            raise ConfigError(f"tracking chunk_frames={self.chunk_frames} / chunk_overlap={self.chunk_overlap} invalid",
                              "use chunk_frames >= 8 and chunk_overlap >= 0")
