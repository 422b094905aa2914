"""ICT-FaceKit (MIT) as a head model: the shipped asset, a symmetric UV atlas, our rig (see ``model.py``)."""

from .asset import ENV_VAR, IctAsset, find_asset, load_asset
from .model import IctHeadConfig, IctHeadModel, build_ict_head

__all__ = ["ENV_VAR", "IctAsset", "IctHeadConfig", "IctHeadModel", "build_ict_head", "find_asset", "load_asset"]
