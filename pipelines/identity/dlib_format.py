"""A reader of dlib's binary serialization, enough to read a trained DNN such as
``dlib_face_recognition_resnet_model_v1.dat`` as plain numbers (no dlib import).

What dlib writes (read from its sources: serialize.h, float_details.h, dnn/tensor.h, dnn/core.h, dnn/layers.h,
dnn/input.h, dnn/loss.h):

* integers: one control byte (low 4 bits: the number n of magnitude bytes, 1..8; bit 7: negative) followed by the
  n bytes of the magnitude, little-endian. ``int``, ``long``, ``unsigned long`` ... all use this form.
* ``bool``: one ASCII byte, '1' or '0'.
* ``float`` / ``double``: dlib's ``float_details``, a 64-bit mantissa then a 16-bit exponent, both as integers
  above; the value is mantissa * 2**exponent (exponent 32000 / 32001 / 32002: +inf / -inf / NaN).
* ``std::string`` (and C strings): the length as an integer, then the bytes. Layers start with such a version
  string ("con_4", "affine_", "relu_", ...).
* ``resizable_tensor``: a version integer, num_samples, k, nr, nc, then the values: version 1 writes each value as a
  float above, version 2 as raw little-endian float32. ``alias_tensor``: version 1 and the 4 dimensions, no data.

A network ``add_loss_layer<LOSS, add_layer<L_n, ... add_layer<L_1, INPUT>>>`` is written as: the loss layer's
version (1) and its details, then each wrapper's version integer from the output inwards (``add_layer``: 1 or 2;
``add_tag_layer`` / ``add_skip_layer``: 1 and nothing else, their tag ids live only in the C++ type), then the
input layer, then, from the input outwards, every ``add_layer``'s details followed by its bookkeeping: three bools
and the tensors ``x_grad``, ``cached_output`` (+ ``params_grad`` in version 2; the layer directly on the input
writes ``grad_final`` instead, + ``sample_expansion_factor`` in version 3). Saved nets are ``clean()``ed, so those
tensors are empty.

Because wrappers carry no type, the reader is told the layer sequence (:func:`read_network`'s ``layout``) and checks
the file against it; any mismatch raises :class:`DlibFormatError` naming the byte offset, the layer and what was
found, so a file that is not the expected network fails at the first place it differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# float_details' special exponents (float_details.h).
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002

# Layer kinds with details in the stream (the rest, "tag" and "skip", are wrappers with a version only).
WRAPPERS = ("tag", "skip")


class DlibFormatError(ValueError):
    """The bytes are not what dlib writes for the expected network; the message names the offset and the layer."""


class Stream:
    """Sequential reads of dlib primitives from a byte buffer; ``pos`` is the next byte's offset."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"byte {self.pos}: {what}")

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("unexpected end of file")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def integer(self) -> int:
        control = self.byte()
        n = control & 0x0F
        if n == 0 or n > 8 or control & 0x70:
            self.pos -= 1
            raise self.fail(f"not a dlib integer (control byte 0x{control:02x})")
        if self.pos + n > len(self.data):
            raise self.fail("integer runs past the end of the file")
        v = int.from_bytes(self.data[self.pos:self.pos + n], "little")
        self.pos += n
        return -v if control & 0x80 else v

    def real(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        if exponent == _EXP_INF:
            return math.inf
        if exponent == _EXP_NINF:
            return -math.inf
        if exponent == _EXP_NAN:
            return math.nan
        return math.ldexp(float(mantissa), exponent)

    def boolean(self) -> bool:
        b = self.byte()
        if b not in (0x30, 0x31):
            self.pos -= 1
            raise self.fail(f"not a dlib bool (byte 0x{b:02x}, expected '0' or '1')")
        return b == 0x31

    def string(self) -> str:
        n = self.integer()
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"string of length {n} runs past the end of the file")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return s.decode("ascii")
        except UnicodeDecodeError as exc:
            raise self.fail(f"string {s[:20]!r} is not ASCII") from exc

    def tensor(self) -> np.ndarray:
        """A resizable_tensor as float32 (num_samples, k, nr, nc)."""
        version = self.integer()
        dims = tuple(self.integer() for _ in range(4))
        if min(dims) < 0:
            raise self.fail(f"tensor with negative dimensions {dims}")
        n = int(np.prod(dims))
        if version == 2:
            if self.pos + 4 * n > len(self.data):
                raise self.fail(f"tensor {dims} runs past the end of the file")
            a = np.frombuffer(self.data, dtype="<f4", count=n, offset=self.pos).astype(np.float32)
            self.pos += 4 * n
        elif version == 1:
            a = np.array([self.real() for _ in range(n)], dtype=np.float32)
        else:
            raise self.fail(f"tensor version {version} (dlib writes 1 or 2)")
        return a.reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.integer()
        if version != 1:
            raise self.fail(f"alias_tensor version {version} (dlib writes 1)")
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]


@dataclass
class LayerRecord:
    """One layer as read: its kind, the numbers it holds, and the byte offset where its details start."""

    kind: str
    values: dict[str, Any] = field(default_factory=dict)
    offset: int = 0


@dataclass
class DlibNetwork:
    """A network read from a dlib file: the loss's and input layer's settings, and the layers from the input out
    (wrappers "tag" / "skip" included where ``layout`` put them, with no values)."""

    loss: dict[str, Any]
    input: dict[str, Any]
    layers: list[LayerRecord]


# ---------------------------------------------------------------------------------------------- layer details
def _expect(s: Stream, kind: str, versions: Sequence[str]) -> str:
    at = s.pos
    try:
        v = s.string()
    except DlibFormatError as exc:
        raise DlibFormatError(f"byte {at}: expected a {kind} layer ({' or '.join(versions)}): {exc}") from exc
    if v not in versions:
        raise DlibFormatError(f"byte {at}: expected a {kind} layer ({' or '.join(versions)}), found {v!r}")
    return v


def _con(s: Stream) -> dict[str, Any]:
    _expect(s, "con", ("con_4", "con_5"))
    params = s.tensor().reshape(-1)
    nf, nr, nc = s.integer(), s.integer(), s.integer()
    stride = (s.integer(), s.integer())
    padding = (s.integer(), s.integer())
    filters, biases = s.alias(), s.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        s.real()
    n_w = int(np.prod(filters))
    if filters[0] != nf or filters[2:] != (nr, nc) or params.size not in (n_w, n_w + nf):
        raise s.fail(f"con_ of {nf} {nr}x{nc} filters holds {params.size} parameters for filters {filters}")
    weight = params[:n_w].reshape(filters)
    # con_4 always has a bias (biases alias (1, nf, 1, 1)); an empty alias means a bias-free con_5.
    bias = params[n_w:].copy() if int(np.prod(biases)) else np.zeros(nf, np.float32)
    return {"weight": weight, "bias": bias, "stride": stride, "padding": padding}


def _affine(s: Stream) -> dict[str, Any]:
    _expect(s, "affine", ("affine_",))
    params = s.tensor().reshape(-1)
    gamma, beta = s.alias(), s.alias()
    mode = None
    if s.pos < len(s.data) and s.data[s.pos] not in (0x30, 0x31):  # newer dlib appends the mode
        mode = s.integer()
    n = int(np.prod(gamma))
    if int(np.prod(beta)) != n or params.size != 2 * n:
        raise s.fail(f"affine_ with gamma {gamma}, beta {beta} holds {params.size} parameters")
    if mode not in (None, 0):  # 0 = CONV_MODE (per channel); FC_MODE (1) scales every input value separately
        raise s.fail(f"affine_ in mode {mode}: only the per-channel (conv) mode is supported")
    return {"gamma": params[:n].copy(), "beta": params[n:].copy()}


def _pool(kind: str):
    def read(s: Stream) -> dict[str, Any]:
        _expect(s, kind, (f"{kind}_2",))
        nr, nc, sy, sx, py, px = (s.integer() for _ in range(6))
        return {"size": (nr, nc), "stride": (sy, sx), "padding": (py, px)}

    return read


def _plain(kind: str, version: str):
    def read(s: Stream) -> dict[str, Any]:
        _expect(s, kind, (version,))
        return {}

    return read


def _fc(s: Stream) -> dict[str, Any]:
    _expect(s, "fc", ("fc_2",))
    n_out, n_in = s.integer(), s.integer()
    params = s.tensor().reshape(-1)
    weights, biases = s.alias(), s.alias()
    bias_mode = s.integer()  # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
    for _ in range(4):
        s.real()
    if weights[:2] != (n_in, n_out) or params.size != n_in * n_out + (n_out if bias_mode == 0 else 0):
        raise s.fail(f"fc_ {n_in} -> {n_out} holds {params.size} parameters (weights alias {weights})")
    # dlib multiplies the (N, n_in) input by the (n_in, n_out) weight matrix.
    weight = params[:n_in * n_out].reshape(n_in, n_out)
    bias = params[n_in * n_out:].copy() if bias_mode == 0 else None
    return {"weight": weight, "bias": bias}


READERS = {
    "con": _con,
    "affine": _affine,
    "relu": _plain("relu", "relu_"),
    "add_prev": _plain("add_prev", "add_prev_"),
    "max_pool": _pool("max_pool"),
    "avg_pool": _pool("avg_pool"),
    "fc": _fc,
}


def _bookkeeping(s: Stream, version: int, on_input: bool) -> None:
    """The state dlib saves after each layer's details (three bools and cleared tensors)."""
    for _ in range(3):
        s.boolean()
    s.tensor()  # x_grad
    s.tensor()  # cached_output
    if on_input:
        s.tensor()  # grad_final
        if version >= 3:
            s.integer()  # sample_expansion_factor
    elif version >= 2:
        s.tensor()  # params_grad


# ------------------------------------------------------------------------------------------------- the network
def read_network(path: str | Path, layout: Sequence[str]) -> DlibNetwork:
    """Read a ``loss_metric`` network on an ``input_rgb_image_sized`` input whose layers, from the input out, are
    ``layout`` (kinds: con, affine, relu, max_pool, avg_pool, add_prev, fc, tag, skip).

    Raises ``DlibFormatError`` at the first byte that does not match; reads the whole file (trailing bytes are an
    error too).
    """
    s = Stream(Path(path).read_bytes())
    unknown = [k for k in layout if k not in READERS and k not in WRAPPERS]
    if unknown:
        raise ValueError(f"unknown layer kinds {unknown}")
    if s.integer() != 1:
        raise DlibFormatError("byte 0: not a dlib add_loss_layer (version 1)")
    loss_version = _expect(s, "loss_metric", ("loss_metric_", "loss_metric_2"))
    loss: dict[str, Any] = {"version": loss_version, "margin": 0.1, "distance_threshold": 0.75}
    if loss_version == "loss_metric_2":
        loss["margin"], loss["distance_threshold"] = s.real(), s.real()

    # Wrapper versions, from the output inwards.
    versions: list[int] = []
    for i, kind in enumerate(reversed(layout)):
        at = s.pos
        v = s.integer()
        innermost = i == len(layout) - 1
        ok = (1,) if kind in WRAPPERS else ((2, 3) if innermost else (1, 2))
        if v not in ok:
            raise DlibFormatError(f"byte {at}: layer {len(layout) - 1 - i} ({kind}) has wrapper version {v}, "
                                  f"expected {' or '.join(map(str, ok))}")
        versions.append(v)
    versions.reverse()
    if layout[0] in WRAPPERS:
        raise ValueError("a tag or skip directly on the input layer is not supported")

    _expect(s, "input", ("input_rgb_image_sized",))
    mean = tuple(s.real() for _ in range(3))
    size = (s.integer(), s.integer())
    inp = {"mean_rgb": mean, "size": size}

    layers: list[LayerRecord] = []
    for i, kind in enumerate(layout):
        if kind in WRAPPERS:
            layers.append(LayerRecord(kind, {}, s.pos))
            continue
        at = s.pos
        try:
            values = READERS[kind](s)
            _bookkeeping(s, versions[i], on_input=i == 0)
        except DlibFormatError as exc:
            raise DlibFormatError(f"layer {i} ({kind}): {exc}") from exc
        layers.append(LayerRecord(kind, values, at))
    if s.pos != len(s.data):
        raise DlibFormatError(f"byte {s.pos}: {len(s.data) - s.pos} bytes left after the last layer")
    return DlibNetwork(loss, inp, layers)
