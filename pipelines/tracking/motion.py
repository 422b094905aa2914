"""Motion transfer between tracked clips (reenactment)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..head.base import HeadParams
from ..head.lbs import axis_angle_to_matrix, matrix_to_axis_angle
from .result import TrackingResult


def transfer_motion(source: TrackingResult, driving: TrackingResult, mode: str = "relative") -> HeadParams:
    """Animate the source identity with the driving clip's motion.

    Keeps the source shape, takes the driving expression, jaw and eyes (neck stays as tracked: zero). Head pose:

    * ``"relative"`` (cross-identity): the source pose composed with the driving pose relative to the driving's
      first frame, ``R_t = (R_drv_t R_drv_0^T) R_src`` and ``t_t = t_src + (t_drv_t - t_drv_0)``; a source that
      faces the camera keeps facing it while the driving head turns, and the driver's own framing is ignored.
    * ``"absolute"`` (self-reenactment): the driving pose as is.

    Args:
        source: a tracked photo (its first frame is used).
        driving: the tracked driving clip (T frames).
    Returns:
        HeadParams with batch T.
    """
    if mode not in ("relative", "absolute"):
        raise InputError(f"motion transfer mode '{mode}' is unknown", "use relative or absolute")
    for k in ("shape", "expression"):
        if source.params[k].shape[-1] != driving.params[k].shape[-1]:
            raise InputError(
                f"source and driving were tracked with different head models ({k}: "
                f"{source.params[k].shape[-1]} vs {driving.params[k].shape[-1]} coefficients)",
                "track both with the same --head-model",
            )
    T = driving.num_frames
    f32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    drv = {k: f32(v) for k, v in driving.params.items()}
    src = {k: f32(v) for k, v in source.params.items()}
    if mode == "absolute":
        rotation, translation = drv["rotation"], drv["translation"]
    else:
        R_drv = axis_angle_to_matrix(drv["rotation"].double())
        R_src = axis_angle_to_matrix(src["rotation"][0].double())
        R = R_drv @ R_drv[0].T @ R_src
        rotation = matrix_to_axis_angle(R).float()
        translation = src["translation"][0] + (drv["translation"] - drv["translation"][0])
    return HeadParams(
        shape=src["shape"].reshape(1, -1).expand(T, -1).clone(),
        expression=drv["expression"].clone(),
        rotation=rotation.clone(),
        translation=translation.clone(),
        neck=drv["neck"].clone(),
        jaw=drv["jaw"].clone(),
        eyes=drv["eyes"].clone(),
    )
