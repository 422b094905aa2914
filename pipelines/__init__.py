"""fhavatar library: one portrait photo -> animatable 3D full-head Gaussian avatar.

Stages (one module or sub-package each) read artifacts from disk and write artifacts to disk:
``preprocess`` -> ``reconstruct`` -> ``reenact`` / ``turntable`` -> ``evaluate``; ``train`` fits the network.
Shared cores: ``head`` (head models + landmark embedding), ``uv`` (UV space), ``avatar`` (UV Gaussian avatar and
rigging), ``render`` (gsplat and a pure-PyTorch reference rasterizer), ``network``, ``store`` (artifacts).
"""

__version__ = "0.1.0"
