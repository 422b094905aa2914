"""LPIPS v0.1 (Zhang et al. 2018) in plain PyTorch: no ``lpips`` import, no torchvision.

The ``lpips`` wheel ships the calibrated linear layers (``lpips/weights/v0.1/{alex,vgg}.pth``) but its import pulls
torchvision and tqdm, and it builds its backbone with torchvision's ``pretrained=True`` (a download). PyPI's
torchvision does not import beside our pinned CPU torch. So we rebuild the two backbones' feature stacks here, with
torchvision's module indices (``features.<i>.weight``) so that torchvision's own ImageNet files load unchanged, and
read the linear layers straight from the wheel's data files (found with ``importlib.util.find_spec``, which does not
execute the package).

The forward pass is LPIPS's: inputs in [-1, 1], the scaling layer, the backbone's ReLU taps, unit-normalised
channels, squared differences, the 1x1 linear layers, spatial mean, sum over taps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

# LPIPS' ScalingLayer constants (inputs in [-1, 1] -> ImageNet-like statistics).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _alexnet_features() -> tuple[nn.Sequential, tuple[int, ...], tuple[int, ...]]:
    """torchvision's ``alexnet().features`` layout, the indices after which LPIPS taps it, and tap channels."""
    layers = [
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    ]
    return nn.Sequential(*layers), (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)


def _vgg16_features() -> tuple[nn.Sequential, tuple[int, ...], tuple[int, ...]]:
    """torchvision's ``vgg16().features`` layout (up to relu5_3), LPIPS' taps and their channels."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU()]
            c_in = int(v)
    return nn.Sequential(*layers), (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)


BACKBONES = {"alex": _alexnet_features, "vgg": _vgg16_features}


def lpips_linear_weights_path(net: str) -> Path | None:
    """The calibrated linear layers shipped in the ``lpips`` wheel, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    return path if path.is_file() else None


class LpipsNet(nn.Module):
    """LPIPS distance network. ``forward(a, b)`` with (N, 3, H, W) images in [0, 1] returns (N,) distances.

    Differentiable (the training loss uses it); parameters are frozen.
    """

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"LPIPS backbone {net!r} is not one of {sorted(BACKBONES)}")
        self.net_name = net
        self.features, self.taps, chns = BACKBONES[net]()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Fill the backbone from a torchvision state dict (keys ``features.<i>.weight|bias``; others ignored)."""
        own = {k: v for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict({k[len("features."):]: v for k, v in own.items()
                                       if k[len("features."):] in self.features.state_dict()})

    def load_linear(self, state: dict[str, torch.Tensor]) -> None:
        """Fill the linear layers from LPIPS' file (keys ``lin<k>.model.1.weight``)."""
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(state[f"lin{k}.model.1.weight"])

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        x = (torch.cat([a, b]).float() * 2 - 1 - self.shift) / self.scale
        total = x.new_zeros(n)
        k = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if k < len(self.taps) and i == self.taps[k]:
                f = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = (f[:n] - f[n:]).pow(2)
                total = total + self.lins[k](d).mean(dim=(1, 2, 3))
                k += 1
        return total
