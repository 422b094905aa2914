"""Gaussian renderers: gsplat 1.5.3 on CUDA and a pure-PyTorch reference with the same conventions.

Use :func:`render_gaussians`; ``backend="auto"`` picks gsplat on CUDA when it imports, else the reference.
"""

from pipelines.render.api import BACKENDS, RenderOutput, render_contributions, render_gaussians, resolve_backend
from pipelines.render.gsplat_backend import GsplatOptions, gsplat_available

__all__ = ["BACKENDS", "GsplatOptions", "RenderOutput", "gsplat_available", "render_contributions", "render_gaussians",
           "resolve_backend"]
