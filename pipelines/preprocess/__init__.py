"""Preprocess (paper section 4.1): crop and align every frame to 512x512, remove the background, estimate the camera
and the 478-point face mesh. ``run_preprocess`` writes ``<item>/preprocess/`` (see ``stage``)."""

from .config import PreprocessConfig
from .stage import PreprocessResult, frontal_camera, run_preprocess, stage_dir

__all__ = ["PreprocessConfig", "PreprocessResult", "run_preprocess", "frontal_camera", "stage_dir"]
