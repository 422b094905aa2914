"""Small convolutional building blocks shared by the encoders, the UNet, the fusion module and the decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels`` (batch-size free)."""
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every position of a (B, C, H, W) map.

    Unlike GroupNorm it has no spatial statistics, so one token cannot influence the normalisation of another
    (the attention tests rely on this locality).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups)


class ConvNormAct(nn.Sequential):
    """conv3x3 -> GroupNorm -> SiLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(conv3x3(cin, cout, stride), group_norm(cout), nn.SiLU())


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, conv3x3) x 2 with a 1x1 skip when the width changes."""

    def __init__(self, cin: int, cout: int | None = None) -> None:
        super().__init__()
        cout = cout or cin
        self.body = nn.Sequential(
            group_norm(cin), nn.SiLU(), conv3x3(cin, cout), group_norm(cout), nn.SiLU(), conv3x3(cout, cout)
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Downsample(nn.Module):
    """Stride-2 conv3x3 halving the resolution."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv3x3(cin, cout, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by conv3x3 (no checkerboard artefacts of transposed convs)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv3x3(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
