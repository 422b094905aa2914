"""UV shape refinement F_refine (section 3.3, eq. 2): a 2D UNet over [F_T^p, p] predicting Delta p_uv."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvNormAct, Downsample, ResBlock, Upsample, group_norm
from .config import NetworkConfig


class RefineUNet(nn.Module):
    """[F_T^p (C_g), p normalized (3), valid (1)] at K x K -> Delta p_uv (B, 3, K, K) in metres.

    Levels follow ``cfg.refine_channels`` (coarse -> fine, resolutions K / 2^(N-i)). The last conv is zero-initialised
    so an untrained network predicts Delta p = 0 exactly (p_r = p); its output is scaled by ``delta_p_scale``.
    """

    def __init__(self, cfg: NetworkConfig, in_channels: int) -> None:
        super().__init__()
        ch = cfg.refine_channels[::-1]  # fine -> coarse for the encoder path
        self.scale = cfg.delta_p_scale
        self.stem = nn.Sequential(ConvNormAct(in_channels + 4, ch[0]), ResBlock(ch[0]))
        self.down = nn.ModuleList(nn.Sequential(Downsample(ch[j], ch[j + 1]), ResBlock(ch[j + 1]))
                                  for j in range(len(ch) - 1))
        self.mid = ResBlock(ch[-1])
        self.up = nn.ModuleList(Upsample(ch[j + 1], ch[j]) for j in reversed(range(len(ch) - 1)))
        self.merge = nn.ModuleList(ResBlock(2 * ch[j], ch[j]) for j in reversed(range(len(ch) - 1)))
        self.head = nn.Sequential(group_norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, F_T_p: torch.Tensor, p_normalized: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.cat([F_T_p, p_normalized, valid], dim=1))
        skips = [x]
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.mid(skips.pop())
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x) * self.scale * valid
