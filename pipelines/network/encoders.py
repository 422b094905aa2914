"""CNN encoders: the source-image encoder {F_s^i} and the UV map encoder {F_g^i} (sections 3.3, 3.4).

Both return lists ordered coarse -> fine: element ``i - 1`` is scale ``i`` (scale 1 = coarsest, as in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvNormAct, Downsample, ResBlock
from .config import NetworkConfig


class ImageEncoder(nn.Module):
    """Source image (B, 3, H, W) in [0, 1] -> N feature maps; scale i has stride ``cfg.image_stride(i)``.

    For the paper's 512 input and N = 4: strides 32, 16, 8, 4 -> 16^2, 32^2, 64^2, 128^2 maps.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        ch = cfg.image_channels  # coarse -> fine
        N = cfg.num_scales
        self.stem = nn.Sequential(
            ConvNormAct(3, max(ch[-1] // 2, 8), stride=2),
            ConvNormAct(max(ch[-1] // 2, 8), ch[-1], stride=2),
            ResBlock(ch[-1]),
        )
        # down[j] goes from scale N - j to scale N - j - 1.
        self.down = nn.ModuleList(
            nn.Sequential(Downsample(ch[i], ch[i - 1]), ResBlock(ch[i - 1])) for i in range(N - 1, 0, -1)
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(image * 2.0 - 1.0)
        feats = [x]
        for block in self.down:
            x = block(x)
            feats.append(x)
        return feats[::-1]


class UVEncoder(nn.Module):
    """Global UV features F_g (B, C_g, K, K) (+ normalized p_r and the valid mask) -> {F_g^i}, i = 1..N.

    Scale i has resolution K_i = K / 2^(N - i) and ``cfg.uv_channels[i - 1]`` channels.
    """

    def __init__(self, cfg: NetworkConfig, in_channels: int) -> None:
        super().__init__()
        ch = cfg.uv_channels
        N = cfg.num_scales
        self.stem = nn.Sequential(ConvNormAct(in_channels + 4, ch[-1]), ResBlock(ch[-1]))
        self.down = nn.ModuleList(
            nn.Sequential(Downsample(ch[i], ch[i - 1]), ResBlock(ch[i - 1])) for i in range(N - 1, 0, -1)
        )

    def forward(self, F_g: torch.Tensor, p_normalized: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(torch.cat([F_g, p_normalized, valid], dim=1))
        feats = [x]
        for block in self.down:
            x = block(x)
            feats.append(x)
        return feats[::-1]
