"""Evaluation (paper section 4.1): the metrics with offline models (``metrics.compute_metrics``), the self- and
cross-identity reenactment protocols over videos (``protocol.evaluate`` / ``protocol.run_evaluate``) and the reports
(``report.merge``, ``report.write_reports``)."""

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
from .protocol import PROTOCOL_METRICS, PROTOCOLS, EvalConfig, EvalPair, evaluate, plan_pairs, run_evaluate
from .report import Report, markdown_report, merge, write_reports

__all__ = [
    "METRICS",
    "PROTOCOLS",
    "PROTOCOL_METRICS",
    "EvalConfig",
    "EvalPair",
    "Report",
    "evaluate",
    "markdown_report",
    "merge",
    "plan_pairs",
    "run_evaluate",
    "write_reports",
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
