"""Evaluation: the paper's metrics (section 4.1) with offline models. See ``metrics.compute_metrics``."""

from .metrics import (
    METRICS,
    UNITS,
    MetricsConfig,
    MetricsResult,
    compute_metrics,
    composite,
    expression_and_pose_distance,
    psnr,
    ssim,
)
from .models import MEDIAPIPE_TO_IBUG68, ModelCard, ModelUnavailable, model_status

__all__ = [
    "METRICS",
    "UNITS",
    "MEDIAPIPE_TO_IBUG68",
    "MetricsConfig",
    "MetricsResult",
    "ModelCard",
    "ModelUnavailable",
    "compute_metrics",
    "composite",
    "expression_and_pose_distance",
    "model_status",
    "psnr",
    "ssim",
]
