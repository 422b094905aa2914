"""Head models (FLAME and the embedded open head model) behind one interface.

``load_head_model("auto" | "flame" | "embedded")`` picks one; see ``registry.py`` for where FLAME files are found.
"""

from .base import JOINT_NAMES, PARENTS, REGIONS, HeadModel, HeadParams, LandmarkEmbedding
from .registry import find_flame_file, head_model_id, load_head_model

__all__ = ["JOINT_NAMES", "PARENTS", "REGIONS", "HeadModel", "HeadParams", "LandmarkEmbedding", "find_flame_file",
           "head_model_id", "load_head_model"]
