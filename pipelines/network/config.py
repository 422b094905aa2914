"""Configuration of the FHAvatar network (paper sections 3.3, 3.4 and B).

Scale indexing follows the paper: scale ``i = 1`` is the *coarsest* (``F_c^1`` has the smallest resolution) and
scale ``N`` the finest. Tuples of per-scale widths are stored coarse -> fine, i.e. ``widths[i - 1]`` is scale ``i``.

At the paper's settings (K = 256, N = 4, 512 x 512 input):

=========  ======================  =======================  ============================
scale i    UV resolution K_i        image feature stride     fusion patch size (32^2 tokens)
=========  ======================  =======================  ============================
1          32                       32 (16 x 16 features)    1
2          64                       16 (32 x 32)             2
3          128                      8  (64 x 64)             4
4          256                      4  (128 x 128)           8
=========  ======================  =======================  ============================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..avatar.maps import NUM_ATTRIBUTES
from ..core.camera import PANOHEAD_UNITS_PER_METRE
from ..errors import ConfigError


@dataclass
class NetworkConfig:
    """All sizes of the network. Defaults are the paper's (K = 256, N = 4, 2 fusion layers, w = 7, 512 input)."""

    # ---------------------------------------------------------------------------------------------- sizes
    uv_size: int = 256  # K
    image_size: int = 512  # source image side (square)
    num_scales: int = 4  # N

    # ------------------------------------------------------------------------- widths, coarse -> fine (scale 1..N)
    image_channels: tuple[int, ...] = (128, 96, 64, 32)  # image encoder F_s^i
    uv_channels: tuple[int, ...] = (128, 96, 64, 32)  # UV encoder F_g^i, fusion outputs and decoder stages
    refine_channels: tuple[int, ...] = (96, 64, 32, 16)  # refinement UNet levels (K/8 .. K)

    # ------------------------------------------------------------------------------- symmetric fusion (3.4)
    fusion_layers: int = 2  # transformer blocks per scale
    fusion_dim: int = 128  # token width
    fusion_heads: int = 4
    window: int = 7  # w: each query sees 2 * w * w local tokens (direct + mirrored window)
    token_grid: int = 32  # tokens per side at every scale (capped by the scale's resolution)
    ffn_ratio: int = 2

    # ------------------------------------------------------------------------------------- global prior (3.3)
    prior: str = "builtin"  # "builtin" (trainable, no external weights) | "panohead" (user-supplied checkpoint)
    head_center: tuple[float, float, float] = (0.0, 0.0, 0.0)  # metres, world (head-model) space
    head_extent: float = 0.3  # half side of the cube (metres) that the builtin tri-plane covers; input scaling
    prior_channels: int = 32  # builtin tri-plane channels C_g
    prior_triplane_res: int = 64  # builtin tri-plane resolution
    prior_image_size: int = 128  # builtin prior encodes a downsampled copy of the source image
    prior_code_dim: int = 256  # builtin prior global code
    panohead_checkpoint: str | None = None  # TorchScript file; see prior.PanoHeadPrior
    panohead_channels: int = 32  # C of PanoHead's tri-grid
    panohead_depth: int = 3  # D of PanoHead's tri-grid (1 = plain EG3D tri-plane)
    panohead_units_per_metre: float = PANOHEAD_UNITS_PER_METRE  # PanoHead's radius 2.7 <-> our DEFAULT_RADIUS
    panohead_box_warp: float = 1.0  # EG3D's box_warp: side of the tri-plane cube in PanoHead units

    # --------------------------------------------------------------------------------------- visibility (3.3)
    visibility_buffer: int = 0  # z-buffer side in pixels; 0 = image_size // 4
    depth_tol: float = 0.005  # metres a texel may lie behind the z-buffer (plus a slope-scaled bias) and be visible
    zbuffer_dilate: int = 1  # min-filter radius that closes holes between splatted texels
    check_facing: bool = True  # also require the UV-finite-difference normal to face the camera
    local_rgb: bool = True  # append the projected source colour to the finest local map F_l^N

    # ----------------------------------------------------------------------------------- outputs (3.2, 3.3)
    delta_p_scale: float = 0.05  # metres per unit of the refinement UNet's output
    offset_range: float = 0.02  # A_position = offset_range * tanh(raw), metres
    init_scale_texels: float = 1.0  # Gaussian scale at init, in texels (the caller multiplies by s)
    max_scale_texels: float = 32.0
    init_opacity: float = 0.9

    # --------------------------------------------------------------------------------------------- helpers
    def __post_init__(self) -> None:
        self.image_channels = tuple(self.image_channels)
        self.uv_channels = tuple(self.uv_channels)
        self.refine_channels = tuple(self.refine_channels)
        self.head_center = tuple(float(c) for c in self.head_center)
        self.validate()

    @classmethod
    def tiny(cls, **overrides) -> "NetworkConfig":
        """Small CPU-test settings: K = 32, 64 x 64 input, narrow channels, 3 x 3 windows on an 8 x 8 token grid."""
        kw = dict(
            uv_size=32,
            image_size=64,
            image_channels=(24, 16, 12, 8),
            uv_channels=(24, 16, 12, 8),
            refine_channels=(24, 16, 8, 8),
            fusion_dim=16,
            fusion_heads=2,
            window=3,
            token_grid=8,
            prior_channels=8,
            prior_triplane_res=16,
            prior_image_size=32,
            prior_code_dim=32,
            panohead_channels=8,
        )
        kw.update(overrides)
        return cls(**kw)

    def with_(self, **overrides) -> "NetworkConfig":
        return replace(self, **overrides)

    @property
    def attribute_dim(self) -> int:
        """Channels of the attribute maps A: the avatar's layout (``pipelines.avatar.maps.ATTRIBUTE_DIMS``)."""
        return NUM_ATTRIBUTES

    def uv_resolution(self, i: int) -> int:
        """K_i = K / 2^(N - i): UV resolution of scale i (1-based, 1 = coarsest)."""
        return self.uv_size // 2 ** (self.num_scales - i)

    def image_stride(self, i: int) -> int:
        """Stride of the image feature map F_s^i: 4 at the finest scale, doubling towards scale 1."""
        return 4 * 2 ** (self.num_scales - i)

    def tokens_per_side(self, i: int) -> int:
        return min(self.token_grid, self.uv_resolution(i))

    def patch_size(self, i: int) -> int:
        return self.uv_resolution(i) // self.tokens_per_side(i)

    def local_channels(self, i: int) -> int:
        """Channels of F_l^i: the image features of scale i (+ RGB at the finest scale when ``local_rgb``)."""
        extra = 3 if (self.local_rgb and i == self.num_scales) else 0
        return self.image_channels[i - 1] + extra

    @property
    def zbuffer_size(self) -> int:
        return self.visibility_buffer or max(self.image_size // 4, 8)

    def validate(self) -> None:
        N = self.num_scales
        if N < 2:
            raise ConfigError(f"num_scales={N} is too small", "use at least 2 scales (the paper uses 4)")
        for name in ("image_channels", "uv_channels", "refine_channels"):
            if len(getattr(self, name)) != N:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries but num_scales={N}",
                                  f"give one width per scale (coarse -> fine)")
        if self.uv_size % 2 ** (N - 1):
            raise ConfigError(f"uv_size={self.uv_size} is not divisible by 2^(num_scales-1)={2 ** (N - 1)}",
                              "pick a power of two such as 256")
        if self.image_size % self.image_stride(1):
            raise ConfigError(f"image_size={self.image_size} is not divisible by {self.image_stride(1)}",
                              "use a multiple of 4 * 2^(num_scales-1), e.g. 512")
        for i in range(1, N + 1):
            if self.uv_resolution(i) % self.tokens_per_side(i):
                raise ConfigError(f"UV resolution {self.uv_resolution(i)} of scale {i} is not a multiple of "
                                  f"token_grid={self.token_grid}", "use a power-of-two token_grid")
        if self.window % 2 == 0:
            raise ConfigError(f"window={self.window} must be odd", "use an odd window such as 7")
        if self.fusion_dim % self.fusion_heads:
            raise ConfigError(f"fusion_dim={self.fusion_dim} is not divisible by fusion_heads={self.fusion_heads}")
        if self.prior not in ("builtin", "panohead"):
            raise ConfigError(f"unknown prior {self.prior!r}", "use --prior builtin or --prior panohead")
        if self.prior_triplane_res < 4 or self.prior_triplane_res & (self.prior_triplane_res - 1):
            raise ConfigError(f"prior_triplane_res={self.prior_triplane_res} must be a power of two >= 4")
        if not 0.0 < self.init_opacity < 1.0:
            raise ConfigError(f"init_opacity={self.init_opacity} must be in (0, 1)")
        if not 0.0 < self.init_scale_texels < self.max_scale_texels:
            raise ConfigError("init_scale_texels must be in (0, max_scale_texels)")
