"""Head models (FLAME and the embedded open head model) behind one interface."""

from .base import JOINT_NAMES, PARENTS, REGIONS, HeadModel, HeadParams, LandmarkEmbedding

__all__ = ["JOINT_NAMES", "PARENTS", "REGIONS", "HeadModel", "HeadParams", "LandmarkEmbedding"]
