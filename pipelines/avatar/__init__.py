"""The UV Gaussian avatar: attribute maps -> Gaussians bound to the head mesh, animation, artifacts, .ply export."""

from .artifact import Avatar, load_avatar, save_avatar
from .binding import AvatarRig, Gaussians
from .maps import ATTRIBUTE_DIMS, ATTRIBUTE_SLICES, NUM_ATTRIBUTES, split_attributes, template_maps

__all__ = ["Avatar", "AvatarRig", "Gaussians", "ATTRIBUTE_DIMS", "ATTRIBUTE_SLICES", "NUM_ATTRIBUTES", "load_avatar",
           "save_avatar", "split_attributes", "template_maps"]
