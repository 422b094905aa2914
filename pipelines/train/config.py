"""Training configuration (paper section 3.5 and B), loadable from YAML/JSON with ``key.sub=value`` overrides.

Defaults are the paper's: Adam, lr 1e-4, batch 4, 37 500 iterations; λ_3d = 50 (100 from iteration 25 000),
λ_eye = 5, λ_pos = 1, λ_shape = 1, λ_shape^tv = 10, λ_id = 0.25, λ^1 = 0.5, ε = 0.1; L_3d, L_eye, L_shape^tv and
L_id are switched on at iteration 7 500.

**Milestone scaling rule.** The paper's milestones are fractions of its 37 500-iteration schedule (7 500 = 20 %,
25 000 = 66.7 %). A shorter (or longer) run keeps those fractions: a milestone ``m`` becomes
``round(m * iterations / 37 500)`` (see :meth:`TrainConfig.milestone`). E.g. ``iterations=3000`` switches the
regularisers on at step 600 and raises λ_3d at step 2000. Steps are 0-based: a term is active at step ``s`` when
``s >= milestone``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..network.config import NetworkConfig

PAPER_ITERATIONS = 37_500  # the schedule the paper's milestones refer to
LR_SCHEDULES = ("constant", "cosine")  # TrainConfig.lr_schedule choices
PERCEPTUAL = ("auto", "lpips", "ssim", "msssim_grad", "dlib_features")  # LossConfig.perceptual choices


@dataclass
class LossConfig:
    """Loss weights of eq. 6-10 (paper values) plus the choices the paper leaves open (documented per field)."""

    lambda_3d: float = 50.0
    lambda_3d_late: float = 100.0  # λ_3d after ``TrainConfig.lambda_3d_boost_at``
    lambda_eye: float = 5.0
    lambda_pos: float = 1.0
    lambda_shape: float = 1.0
    lambda_shape_tv: float = 10.0
    # L_id: 1 - cos of face descriptors of the render and the target (paper: ArcFace; here dlib's descriptor network,
    # pipelines/identity), on dlib's face chips aligned by the tracked head's landmarks, for frontal targets only.
    lambda_id: float = 0.25
    id_max_angle: float = 30.0  # "frontal": the face's forward axis within this many degrees of the camera
    lambda_aux: float = 0.5  # λ^1: weight of the auxiliary branch's losses on I_o^1 and I_α^1
    epsilon: float = 0.1  # ε of L_shape (metres, the head model's unit)
    # Ours, not the paper's (0 = off): λ_slide max(||Δp_t|| - slide_epsilon, 0), Δp_t the part of Δp tangent to the
    # source mesh. Eq. 7's ε of 10 cm lets the network slide texels along the surface: on the ICT head the v5 weights
    # move the face region's texels 2.1 cm tangentially (median; 5.5 cm p90) to paint hair and clothes, and a texel
    # animates with the triangle it is bound to, so the smile's lips and teeth are painted by cheek and chin texels
    # that do not open. Moving along the normal (the hair volume Δp is for) stays free.
    lambda_slide: float = 0.0
    slide_epsilon: float = 0.005  # metres of tangential slide that cost nothing
    lambda_l1: float = 1.0  # L_re = L1 + LPIPS
    lambda_lpips: float = 1.0
    lambda_alpha: float = 1.0
    # The perceptual term of L_re and of the auxiliary branch's loss (see losses.PERCEPTUAL): "auto" = LPIPS (VGG)
    # when its ImageNet backbone is in the torch hub cache (it never is here), else "ssim" = lambda_ssim (1 - SSIM);
    # or "msssim_grad" = lambda_msssim (1 - MS-SSIM) + lambda_grad L1(image gradients), "dlib_features" =
    # lambda_dlib_features x distance of the face-descriptor network's early-block features, "lpips".
    perceptual: str = "auto"
    lambda_ssim: float = 0.5
    lambda_msssim: float = 0.5
    lambda_grad: float = 1.0
    lambda_dlib_features: float = 1.0
    dlib_features_size: int = 256  # dlib_features compares images resized to this side (its chips are 150 px)
    alpha_min: float = 0.05  # I_α is clamped from below by this in eq. 6 (the division is unstable near 0)
    # Our choice: L_3d only counts neighbour pairs inside the target matte (> 0.5 at both pixels). Without it the
    # silhouette edge itself (normalized position jumps to 0) dominates the TV and fights L_α.
    tv3d_in_matte: bool = True


@dataclass
class DataConfig:
    """Sampling and augmentation of training pairs (section 3.5, "Training Strategy")."""

    recon_prob: float = 0.3  # probability of 3D-reconstruction mode (source = target); the paper gives none
    flip_prob: float = 0.5  # horizontal flip of both images + mirrored tracking (needs a mirror-symmetric model)
    brightness: float = 0.1  # colour jitter, the same for source and target: factor in [1 - b, 1 + b]
    contrast: float = 0.1
    saturation: float = 0.1
    val_items: tuple[str, ...] = ()  # item-folder names (or their prefix before '-<hash>') held out for validation
    val_frames: int = 32  # target frames per validation clip (after the source frame)
    preload: bool = True  # decode every frame once into memory (else read from disk per sample)


@dataclass
class TrainConfig:
    """Everything ``train`` needs besides the data folders."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: str = "ict"  # head model kind: ict | flame | embedded (the weights record it; reconstruct follows it)
    iterations: int = PAPER_ITERATIONS
    batch_size: int = 4  # per process (with torchrun, the total is batch_size * WORLD_SIZE)
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear lr warm-up (the paper uses none)
    # After warm-up: "constant" (the paper) or "cosine" from lr down to lr * lr_final_ratio at the last step. A
    # fine-tuning continuation from earlier weights (a fresh optimiser) is where the decay pays.
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    amp: bool = True  # bf16 autocast for the network on CUDA (renderer and losses stay fp32)
    reg_start: int = 7_500  # paper milestone: L_3d, L_eye, L_shape^tv, L_id switched on
    lambda_3d_boost_at: int = 25_000  # paper milestone: λ_3d -> lambda_3d_late
    render_size: int = 0  # supervision resolution; 0 = network.image_size
    # Gaussian sampling grid of the hair region (section B: 1024 x 128). Inference uses the default, so change it
    # only for tests / quick experiments.
    uv_hair_grid: tuple[int, int] = (1024, 128)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    val_every: int = 1000  # 0 = only at the start and the end
    export_every: int = 0  # also write fp16 network weights every N steps (0 = only at the end)

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        self.uv_hair_grid = tuple(int(v) for v in self.uv_hair_grid)  # type: ignore[assignment]
        self.data.val_items = tuple(self.data.val_items)
        if self.iterations < 1:
            raise ConfigError(f"iterations={self.iterations} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r} is unknown", f"use one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.lr_final_ratio <= 1.0:
            raise ConfigError(f"lr_final_ratio={self.lr_final_ratio} must be in [0, 1]")
        if not 0.0 <= self.data.recon_prob <= 1.0 or not 0.0 <= self.data.flip_prob <= 1.0:
            raise ConfigError("data.recon_prob and data.flip_prob must be probabilities in [0, 1]")
        if self.loss.alpha_min <= 0:
            raise ConfigError(f"loss.alpha_min={self.loss.alpha_min} must be > 0 (it clamps a divisor)")
        if self.loss.perceptual not in PERCEPTUAL:
            raise ConfigError(f"loss.perceptual={self.loss.perceptual!r} is unknown",
                              f"use one of {', '.join(PERCEPTUAL)}")

    # ------------------------------------------------------------------------------------------------ schedule
    def milestone(self, paper_step: int) -> int:
        """A paper milestone (on the 37 500-step schedule) scaled to ``iterations``: round(m * iterations / 37500)."""
        return int(round(paper_step * self.iterations / PAPER_ITERATIONS))

    @property
    def reg_start_step(self) -> int:
        return self.milestone(self.reg_start)

    @property
    def boost_step(self) -> int:
        return self.milestone(self.lambda_3d_boost_at)

    def weights_at(self, step: int) -> dict[str, float]:
        """Loss weights in effect at (0-based) ``step``: late terms are 0 before ``reg_start_step``."""
        L = self.loss
        late = step >= self.reg_start_step
        return {
            "l1": L.lambda_l1,
            "perceptual": L.lambda_lpips,  # the non-LPIPS options carry their own weights (LossConfig)
            "alpha": L.lambda_alpha,
            "id": L.lambda_id if late else 0.0,
            "aux": L.lambda_aux,
            "3d": (L.lambda_3d_late if step >= self.boost_step else L.lambda_3d) if late else 0.0,
            "eye": L.lambda_eye if late else 0.0,
            "pos": L.lambda_pos,
            "shape": L.lambda_shape,
            "slide": L.lambda_slide,
            "shape_tv": L.lambda_shape_tv if late else 0.0,
        }

    def uv_config(self):
        from ..uv.space import UVConfig

        return UVConfig(size=self.network.uv_size, hair_grid_cols=self.uv_hair_grid[0],
                        hair_grid_rows=self.uv_hair_grid[1])

    def lr_at(self, step: int) -> float:
        """Learning rate at (0-based) ``step``: linear warm-up, then constant or a cosine to lr * lr_final_ratio."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        span = max(self.iterations - 1 - self.warmup_steps, 1)
        t = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.lr * (self.lr_final_ratio + (1.0 - self.lr_final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))

    @property
    def supervision_size(self) -> int:
        return self.render_size or self.network.image_size

    # --------------------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of the settings that change the optimisation (logging/checkpoint cadence excluded)."""
        d = self.to_dict()
        for k in ("log_every", "checkpoint_every", "val_every", "export_every"):
            d.pop(k)
        d["data"].pop("val_frames")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML/JSON file <- ``key.sub=value`` overrides (e.g. ``loss.lambda_3d=100``, ``network.uv_size=128``)."""
    return load_config(TrainConfig, path, overrides)
