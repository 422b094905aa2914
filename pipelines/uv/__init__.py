"""UV space of a head model: texel -> surface lookup, position / relative-scale maps, masks, Gaussian sampling."""

from .space import UVConfig, UVSpace, build_uv_space, load_or_build_uv_space

__all__ = ["UVConfig", "UVSpace", "build_uv_space", "load_or_build_uv_space"]
