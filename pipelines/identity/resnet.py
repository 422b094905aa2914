"""dlib's face-descriptor ResNet (``dlib_face_recognition_resnet_model_v1``) in PyTorch, layer for layer.

The architecture is ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp`` (a ResNet-34 with fewer
filters and blocks, 29 conv layers)::

    input_rgb_image_sized<150>                    (x - mean_rgb) / 256 per channel, mean read from the file
    con<32,7,7,2,2> affine relu max_pool<3,3,2,2>  150 -> 72 -> 35
    level4: 3 x ares<32>                           35
    level3: ares_down<64>,  3 x ares<64>           17
    level2: ares_down<128>, 2 x ares<128>          8
    level1: ares_down<256>, 2 x ares<256>          4 (see below)
    level0: ares_down<256>                         2
    avg_pool_everything, fc_no_bias<128>           -> the 128-d descriptor (not normalised)

    block<N, stride>  = affine(con3x3(N, 1)(relu(affine(con3x3(N, stride)(x)))))
    ares<N>(x)        = relu(block<N,1>(x) + x)
    ares_down<N>(x)   = relu(avg_pool<2,2,2,2>(x) (+) block<N,2>(x))

dlib details that matter for exact numbers:

* ``con_`` pads by nr/2 only when its stride is 1; strided convolutions (the 7x7 stem, the first 3x3 of each
  ``ares_down``) and the pools have no padding, with floor division in the output size.
* ``affine_`` is inference-mode batch normalisation: a per-channel scale and shift.
* ``add_prev`` (the ``(+)`` above) adds tensors of different shapes by zero-extending both to the larger channel
  count and spatial size (dlib's ``tt::add``, values at the start of each axis). In ``ares_down`` the block has more
  channels than the pooled input (32 -> 64, 64 -> 128, 128 -> 256), and at levels 1 and 0 it is also smaller:
  8 -> 3 (conv) against 8 -> 4 (pool), 4 -> 1 against 4 -> 2.
* ``fc_`` multiplies the (N, 256) input by a (256, 128) matrix.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dlib_format import DlibNetwork, read_network

INPUT_SIZE = 150
# (channels, number of ares blocks after the optional ares_down) per level, from the stem outwards.
LEVELS: tuple[tuple[int, bool, int], ...] = (
    (32, False, 3),  # level4
    (64, True, 3),  # level3
    (128, True, 2),  # level2
    (256, True, 2),  # level1
    (256, True, 0),  # level0
)
DESCRIPTOR_DIM = 128


def dlib_layout() -> list[str]:
    """The layer kinds of ``anet_type`` from the input out, as dlib serializes them (wrappers included)."""
    block = ["con", "affine", "relu", "con", "affine"]
    out = ["con", "affine", "relu", "max_pool"]
    for _, down, n in LEVELS:
        if down:
            out += ["tag"] + block + ["tag", "skip", "avg_pool", "add_prev", "relu"]
        out += (["tag"] + block + ["add_prev", "relu"]) * n
    return out + ["avg_pool", "fc"]


class Affine(nn.Module):
    """dlib's ``affine_`` in conv mode: y = gamma[c] x + beta[c]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta.view(1, -1, 1, 1), x, self.gamma.view(1, -1, 1, 1))


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``tt::add`` of (B, C1, H1, W1) and (B, C2, H2, W2): both zero-extended to the larger size at the end of
    each axis, then added."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2], 0, c - x.shape[1]))

    return grow(a) + grow(b)


class Block(nn.Module):
    """``ares<N>`` or ``ares_down<N>`` (see the module docstring)."""

    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        self.down = down
        stride = 2 if down else 1
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=0 if down else 1)
        self.bn1 = Affine(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1)
        self.bn2 = Affine(c_out)

    def layers(self) -> list[nn.Module]:
        """The layers with parameters, in dlib's order."""
        return [self.conv1, self.bn1, self.conv2, self.bn2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.down:
            return F.relu(add_padded(F.avg_pool2d(x, 2, 2), y))
        return F.relu(x + y)


class DlibFaceResNet(nn.Module):
    """The descriptor network. ``forward`` takes dlib's input tensor ((x - mean) / 256, (B, 3, 150, 150) RGB);
    :meth:`normalize` makes it from chips in [0, 1]. Load weights with :meth:`from_dlib`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 7, 2, padding=0)
        self.bn = Affine(32)
        blocks = []
        c = 32
        for channels, down, n in LEVELS:
            if down:
                blocks.append(Block(c, channels, True))
            blocks += [Block(channels, channels, False) for _ in range(n)]
            c = channels
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c, DESCRIPTOR_DIM, bias=False)
        self.register_buffer("mean_rgb", torch.tensor([122.782, 117.001, 104.298]))

    def normalize(self, chips: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> dlib's input values (255 x - mean) / 256."""
        return (chips * 255.0 - self.mean_rgb.view(1, 3, 1, 1).to(chips)) / 256.0

    def features(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Activations of the stem (after the max pool) and of the first ``depth - 1`` blocks, for feature losses
        (any input size; the stem divides it by about 4)."""
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, 2)
        out = [h]
        for block in self.blocks[: max(depth - 1, 0)]:
            h = block(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 150, 150) dlib input -> (B, 128) descriptor."""
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, 2)
        for block in self.blocks:
            h = block(h)
        return self.fc(h.mean((2, 3)))

    # ------------------------------------------------------------------------------------------------ weights
    def layers(self) -> list[nn.Module]:
        """Every layer with parameters, in the order dlib serializes them."""
        out: list[nn.Module] = [self.conv, self.bn]
        for b in self.blocks:
            out += b.layers()
        return out + [self.fc]

    @torch.no_grad()
    def load_dlib(self, net: DlibNetwork) -> "DlibFaceResNet":
        """Copy the numbers of a network read by :func:`dlib_format.read_network` (with :func:`dlib_layout`),
        checking every shape, stride and padding against this architecture."""
        records = [r for r in net.layers if r.kind in ("con", "affine", "fc")]
        mods = self.layers()
        if len(records) != len(mods):
            raise ValueError(f"the file has {len(records)} parameter layers, the architecture {len(mods)}")
        for i, (rec, mod) in enumerate(zip(records, mods)):
            where = f"parameter layer {i} ({rec.kind} at byte {rec.offset})"
            if isinstance(mod, nn.Conv2d):
                w = torch.from_numpy(rec.values["weight"])
                if rec.kind != "con" or tuple(w.shape) != tuple(mod.weight.shape):
                    raise ValueError(f"{where}: {tuple(w.shape)} filters, expected {tuple(mod.weight.shape)}")
                if rec.values["stride"] != mod.stride or rec.values["padding"] != mod.padding:
                    raise ValueError(f"{where}: stride {rec.values['stride']} padding {rec.values['padding']}, "
                                     f"expected {mod.stride} {mod.padding}")
                mod.weight.copy_(w)
                mod.bias.copy_(torch.from_numpy(rec.values["bias"]))
            elif isinstance(mod, Affine):
                g = torch.from_numpy(rec.values["gamma"])
                if rec.kind != "affine" or g.shape != mod.gamma.shape:
                    raise ValueError(f"{where}: {tuple(g.shape)} scales, expected {tuple(mod.gamma.shape)}")
                mod.gamma.copy_(g)
                mod.beta.copy_(torch.from_numpy(rec.values["beta"]))
            else:
                w = torch.from_numpy(rec.values["weight"])
                if rec.kind != "fc" or tuple(w.shape) != (mod.in_features, mod.out_features):
                    raise ValueError(f"{where}: {tuple(w.shape)} weights, expected "
                                     f"({mod.in_features}, {mod.out_features})")
                if rec.values["bias"] is not None:
                    raise ValueError(f"{where}: the descriptor layer has a bias (fc_no_bias expected)")
                mod.weight.copy_(w.T)
        pools = [r.values for r in net.layers if r.kind in ("max_pool", "avg_pool")]
        expected = [((3, 3), (2, 2))] + [((2, 2), (2, 2))] * sum(d for _, d, _ in LEVELS) + [((0, 0), (1, 1))]
        got = [(p["size"], p["stride"]) for p in pools]
        if got != expected or any(p["padding"] != (0, 0) for p in pools):
            raise ValueError(f"pooling layers {got} (paddings {[p['padding'] for p in pools]}), expected {expected}")
        if tuple(net.input["size"]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"input size {net.input['size']}, expected {INPUT_SIZE}x{INPUT_SIZE}")
        self.mean_rgb.copy_(torch.tensor(net.input["mean_rgb"], dtype=torch.float32))
        return self

    @classmethod
    def from_dlib(cls, path: str | Path) -> "DlibFaceResNet":
        """The network with the weights of a dlib ``.dat`` file (frozen, eval mode)."""
        return cls().load_dlib(read_network(path, dlib_layout())).frozen()

    @classmethod
    def from_safetensors(cls, path: str | Path) -> tuple["DlibFaceResNet", dict[str, str]]:
        """The network from a copy written by ``tools/export_face_descriptor.py`` (any float dtype; computed in
        float32), and the file's metadata (``source_sha256``: the ``.dat`` it was made from)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        model = cls()
        model.load_state_dict(state)
        return model.frozen(), meta

    def frozen(self) -> "DlibFaceResNet":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()
