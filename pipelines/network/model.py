"""FHAvatarNet: source image + FLAME position map -> UV Gaussian attribute maps (sections 3.3-3.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import NetworkConfig
from .decoder import UVDecoder, split_attributes
from .encoders import ImageEncoder, UVEncoder
from .fusion import ScaleFusion
from .local import local_uv_features, project_position_map, visibility_mask
from .prior import GlobalPrior, build_prior
from .unet import RefineUNet


@dataclass
class NetOutput:
    """Everything the losses, the avatar binding and the tests need. Per-scale lists are coarse -> fine.

    A, A1: (B, 14, K, K) activated attribute maps (A1 only with ``with_aux``); delta_p, p_r: (B, 3, K, K) metres;
    M_v: (B, 1, K, K) visibility of p_r in the source view; uv (B, K, K, 2) / depth (B, K, K): p_r projected;
    F_T_p, F_g: (B, C_g, K, K); F_l, M_v_scales, F_c: per scale; M_o, F_m, F_f: per scale, None at scale 1.
    """

    A: torch.Tensor
    A1: torch.Tensor | None
    delta_p: torch.Tensor
    p_r: torch.Tensor
    M_v: torch.Tensor
    uv: torch.Tensor
    depth: torch.Tensor
    F_T_p: torch.Tensor
    F_g: torch.Tensor
    F_l: list[torch.Tensor]
    M_v_scales: list[torch.Tensor]
    F_c: list[torch.Tensor]
    M_o: list[torch.Tensor | None]
    F_m: list[torch.Tensor | None]
    F_f: list[torch.Tensor | None]

    def attributes(self, aux: bool = False) -> dict[str, torch.Tensor]:
        """Named attribute maps of A (or A1 with ``aux``): color, rotation, scale (texels), opacity, offset (m)."""
        A = self.A1 if aux else self.A
        if A is None:
            raise ValueError("A1 was not computed: call the network with with_aux=True")
        return split_attributes(A)


class FHAvatarNet(nn.Module):
    """The whole generator: prior, shape refinement, image / UV encoders, symmetric fusion and D_uv.

    Sub-modules: ``prior`` (GlobalPrior), ``refine`` (RefineUNet), ``image_encoder``, ``uv_encoder``,
    ``fusion`` (one ScaleFusion per scale, coarse -> fine) and ``decoder``.
    """

    def __init__(self, config: NetworkConfig | None = None, prior: GlobalPrior | None = None) -> None:
        super().__init__()
        cfg = config or NetworkConfig()
        self.config = cfg
        self.prior = prior if prior is not None else build_prior(cfg)
        C_g = self.prior.out_channels
        self.refine = RefineUNet(cfg, C_g)
        self.image_encoder = ImageEncoder(cfg)
        self.uv_encoder = UVEncoder(cfg, C_g)
        self.fusion = nn.ModuleList(ScaleFusion(cfg, i) for i in range(1, cfg.num_scales + 1))
        self.decoder = UVDecoder(cfg)
        self.register_buffer("head_center", torch.tensor(cfg.head_center).view(1, 3, 1, 1), persistent=False)

    def normalize_points(self, p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """World position map -> roughly [-1, 1] network input, 0 at invalid texels."""
        return (p - self.head_center.to(p)) / self.config.head_extent * valid

    def forward(
        self,
        image: torch.Tensor,
        p: torch.Tensor,
        valid: torch.Tensor,
        w2c: torch.Tensor,
        K_norm: torch.Tensor,
        with_aux: bool | None = None,
    ) -> NetOutput:
        """Predict UV Gaussian attribute maps.

        Args:
            image: (B, 3, H, W) source image in [0, 1] (resized to ``image_size`` if needed).
            p: (B, 3, K, K) FLAME position map of the source mesh (world metres).
            valid: (B, 1, K, K) or (1, 1, K, K) texel mask (1 = covered by the mesh).
            w2c: (B, 4, 4) source world-to-camera; K_norm: (B, 3, 3) normalized intrinsics.
            with_aux: also decode A^1 from F_c^1 alone (default: in training mode).
        """
        cfg = self.config
        B, _, K, _ = p.shape
        if K != cfg.uv_size or p.shape[1] != 3:
            raise ValueError(f"position map must be (B, 3, {cfg.uv_size}, {cfg.uv_size}), got {tuple(p.shape)}")
        with_aux = self.training if with_aux is None else with_aux
        if image.shape[-2:] != (cfg.image_size, cfg.image_size):
            image = F.interpolate(image, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
        valid = valid.to(p.dtype).expand(B, 1, K, K)

        # 3.3 full-head prior and UV shape refinement (eq. 2)
        state = self.prior.encode(image, w2c, K_norm)
        F_T_p = self.prior.sample(state, p, valid)
        delta_p = self.refine(F_T_p, self.normalize_points(p, valid), valid)
        p_r = p + delta_p
        F_g = self.prior.sample(state, p_r, valid)

        # 3.3 local features: visibility is a hard mask (no gradient); the projection itself is differentiable
        M_v = visibility_mask(p_r.detach(), valid, w2c, K_norm, cfg.image_size, cfg.depth_tol, cfg.zbuffer_size,
                              cfg.zbuffer_dilate, cfg.check_facing)
        uv, depth = project_position_map(p_r, w2c, K_norm)
        F_s = self.image_encoder(image)
        resolutions = [cfg.uv_resolution(i) for i in range(1, cfg.num_scales + 1)]
        F_l, M_vs = local_uv_features(F_s, image if cfg.local_rgb else None, uv, M_v, resolutions)

        # 3.4 symmetric fusion per scale and decoding
        F_gs = self.uv_encoder(F_g, self.normalize_points(p_r, valid), valid)
        fused = [fuse(fg, fl, mv) for fuse, fg, fl, mv in zip(self.fusion, F_gs, F_l, M_vs)]
        F_c = [f["F_c"] for f in fused]
        F_f = [f["F_f"] for f in fused]
        A = self.decoder(F_c[0], F_f[1:])
        A1 = self.decoder(F_c[0], None) if with_aux else None
        return NetOutput(
            A=A, A1=A1, delta_p=delta_p, p_r=p_r, M_v=M_v, uv=uv, depth=depth, F_T_p=F_T_p, F_g=F_g,
            F_l=F_l, M_v_scales=M_vs, F_c=F_c, M_o=[f["M_o"] for f in fused], F_m=[f["F_m"] for f in fused], F_f=F_f,
        )

    def named_parts(self) -> dict[str, nn.Module]:
        """The trainable parts by name (for optimiser groups, logging and tests)."""
        return {"prior": self.prior, "refine": self.refine, "image_encoder": self.image_encoder,
                "uv_encoder": self.uv_encoder, "fusion": self.fusion, "decoder": self.decoder}
