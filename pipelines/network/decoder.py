"""UV map decoder D_uv (section 3.4, "UV Gaussian Attribute Map Generation") and the attribute activations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..avatar.maps import ATTRIBUTE_SLICES, NUM_ATTRIBUTES, split_attributes  # noqa: F401 - split_attributes re-exported
from .blocks import ResBlock, Upsample, group_norm
from .config import NetworkConfig


class AttributeActivation(nn.Module):
    """Raw decoder output (B, 14, K, K) -> valid Gaussian attributes (the avatar's layout, ``ATTRIBUTE_SLICES``).

    * color: sigmoid, in (0, 1) (0.5 at init);
    * rotation: unit quaternion (w, x, y, z), raw + (1, 0, 0, 0) normalized, so ~identity at init;
    * scale: softplus, in *texel units* (the caller multiplies by the relative scale map s, metres per texel),
      ``init_scale_texels`` at init, clamped to ``max_scale_texels``;
    * opacity: sigmoid, ``init_opacity`` at init;
    * offset (A_position): ``offset_range * tanh``, metres, 0 at init.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.slices = ATTRIBUTE_SLICES
        self.scale_bias = math.log(math.expm1(cfg.init_scale_texels))  # softplus^-1
        self.opacity_bias = math.log(cfg.init_opacity / (1.0 - cfg.init_opacity))  # logit
        self.max_scale = cfg.max_scale_texels
        self.offset_range = cfg.offset_range
        self.register_buffer("identity", torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1), persistent=False)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        s = self.slices
        color = torch.sigmoid(raw[:, s["color"]])
        rotation = F.normalize(raw[:, s["rotation"]] + self.identity.to(raw), dim=1, eps=1e-6)
        scale = (F.softplus(raw[:, s["scale"]] + self.scale_bias) + 1e-4).clamp(max=self.max_scale)
        opacity = torch.sigmoid(raw[:, s["opacity"]] + self.opacity_bias)
        offset = self.offset_range * torch.tanh(raw[:, s["offset"]])
        return torch.cat([color, rotation, scale, opacity, offset], dim=1)


class UVDecoder(nn.Module):
    """D_uv: F_c^1 (coarsest) -> upsample x2 + ResBlock per scale -> attributes A (B, 14, K, K).

    At scale i >= 2 the fused map F_f^i is added to the intermediate map of the same size. The auxiliary A^1 is the
    *same* decoder run with no skip inputs (F_c^1 only): that is exactly what keeps D_uv from relying too much on the
    high-resolution inputs (section 3.4), and it adds no parameters.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        ch, N = cfg.uv_channels, cfg.num_scales
        self.stem = ResBlock(ch[0])
        self.ups = nn.ModuleList(Upsample(ch[i - 1], ch[i]) for i in range(1, N))
        self.blocks = nn.ModuleList(ResBlock(ch[i]) for i in range(1, N))
        self.head = nn.Sequential(group_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], NUM_ATTRIBUTES, 3, padding=1))
        with torch.no_grad():  # small raw outputs: start at the activations' chosen initial values
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()
        self.activation = AttributeActivation(cfg)

    def forward(self, F_c1: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """F_c1 (B, C_1, K_1, K_1), skips [F_f^2, ..., F_f^N] or None -> A (B, 14, K, K) activated."""
        x = self.stem(F_c1)
        for j, (up, block) in enumerate(zip(self.ups, self.blocks)):
            x = up(x)
            if skips is not None:
                x = x + skips[j]
            x = block(x)
        return self.activation(self.head(x))
