"""The FHAvatar network (paper sections 3.3-3.4 and B) as pure-tensor PyTorch modules."""

from .config import NetworkConfig
from .decoder import AttributeActivation, UVDecoder, split_attributes
from .encoders import ImageEncoder, UVEncoder
from .fusion import FusionBlock, ScaleFusion, WindowCrossAttention, gather_windows, symmetric_fill
from .local import (local_uv_features, pool_visible, project_position_map, sample_image_features, uv_normals,
                    visibility_mask)
from .model import FHAvatarNet, NetOutput
from .prior import (BuiltinPrior, GlobalPrior, PanoHeadPrior, PriorState, build_prior, eg3d_camera_label,
                    resolve_panohead_checkpoint, sample_triplane)
from .unet import RefineUNet

__all__ = [
    "NetworkConfig",
    "AttributeActivation", "UVDecoder", "split_attributes",
    "ImageEncoder", "UVEncoder",
    "FusionBlock", "ScaleFusion", "WindowCrossAttention", "gather_windows", "symmetric_fill",
    "local_uv_features", "pool_visible", "project_position_map", "sample_image_features", "uv_normals",
    "visibility_mask",
    "FHAvatarNet", "NetOutput",
    "BuiltinPrior", "GlobalPrior", "PanoHeadPrior", "PriorState", "build_prior", "eg3d_camera_label",
    "resolve_panohead_checkpoint", "sample_triplane",
    "RefineUNet",
]
