"""The offline models behind the evaluation metrics, loaded once and reused.

Rule: nothing here downloads. Every model either ships inside an installed package or is read from a file already
in the user's torch hub cache (``$TORCH_HOME/hub/checkpoints``); otherwise its loader raises
``ModelUnavailable(reason)`` and the metric is reported as unavailable with that reason. Loading runs inside
``forbid_downloads()`` so that a library trying to fetch weights fails loudly instead of reaching the network.

- LPIPS: LPIPS v0.1 AlexNet (the usual choice; the paper cites LPIPS [54] without naming a backbone). Linear
  layers from the ``lpips`` wheel; the AlexNet backbone from torchvision's file in the torch hub cache, never
  fetched.
- CSIM: dlib's ResNet face descriptor (paper: ArcFace), our PyTorch port (``pipelines.identity``) of the
  ``face_recognition_models`` (CC0) network file, aligned with ``dlib``'s 5-point predictor.
- AKD: FAN 2DFAN-4 (as the paper) when ``face_alignment`` and its weights are already cached, else MediaPipe's face
  mesh mapped to the 68 iBUG points. ``mediapipe`` wheel.
- AED: MediaPipe face mesh, lip / eye / brow points after removing head pose (paper: SMIRK).
- APD: MediaPipe face mesh, rotation of a rigid landmark fit (paper: MediaPipe).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..offline import ModelCard, ModelUnavailable, forbid_downloads, hub_checkpoints_dir  # noqa: F401 (re-exported)
from ..offline import dist_version as _version
from ..offline import installed_dist as _installed
from ..offline import sha256_file as _sha256
from ..preprocess.landmarks68 import (  # noqa: F401 (re-exported)
    MEDIAPIPE_TO_IBUG68,
    Fan68,
    face_box_from_mesh,
    load_landmarker,
)

# MediaPipe's glog / absl chatter on graph start-up; keep user-set levels.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> contiguous uint8 (what MediaPipe and dlib take)."""
    return np.ascontiguousarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------- face landmarks

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


def fan_model() -> Fan68:
    return load_landmarker("fan")  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- identity (CSIM)

# sha256 of dlib's 5-point predictor as shipped by face_recognition_models 0.3.0 (and the identical -ng 0.1.0 wheel).
DLIB5_FILE = "shape_predictor_5_face_landmarks.dat"
DLIB5_SHA256 = "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888"


def metrics_device(device: str = "auto") -> str:
    """"auto": the GPU when one is present, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class FaceIdentityModel:
    """CSIM's model: dlib's ResNet face descriptor (128-d; 99.38% on LFW), run by our PyTorch port of dlib's network
    (``pipelines.identity``, weights read from the wheel's ``.dat``), batched on the GPU when present, on dlib's
    150 x 150 face chips: 5 points from dlib's shape predictor (seeded with a face box from the MediaPipe mesh), the
    chip cut with dlib's geometry, image pyramid and 8-bit rounding. The descriptors equal dlib's
    ``compute_face_descriptor`` (``tests/test_identity.py``). Without dlib installed the 5 points come from the
    MediaPipe mesh (vertices 263, 362, 33, 133, 2) and the card says so.

    The paper's CSIM uses ArcFace [7]; no ArcFace weights ship inside a package we can install, so we use this
    instead. Its cosine similarities are compressed towards 1: unrelated people typically score 0.80-0.90, the same
    person 0.93-1.0 (dlib's own same-person rule is Euclidean distance < 0.6). Not comparable to the paper's CSIM.
    """

    def __init__(self, device: str = "auto", batch: int = 64) -> None:
        from ..identity import MODEL_NAME, FaceIdentity

        self.device = metrics_device(device)
        self.batch = batch
        self.net = FaceIdentity(device=self.device)  # raises ModelUnavailable
        self._dlib, self._sp5, why = None, None, ""
        try:
            import dlib

            path = self.net.path.parent / DLIB5_FILE
            if not path.is_file() or _sha256(path) != DLIB5_SHA256:
                raise ModelUnavailable(f"{path} is missing or not dlib's release")
            self._dlib, self._sp5 = dlib, dlib.shape_predictor(str(path))
            aligner = "dlib's 5-point shape predictor"
            dlib_src = f" + {_installed('dlib-bin', 'dlib')} {DLIB5_FILE}"
        except Exception as exc:  # noqa: BLE001 (no dlib: align on the mesh instead)
            why = f" ({exc})" if isinstance(exc, ModelUnavailable) else " (dlib is not installed)"
            aligner = "MediaPipe mesh points 263, 362, 33, 133, 2" + why
            dlib_src = ""
        self.card = ModelCard(
            f"{MODEL_NAME} on {self.device}, dlib's 150 px chips aligned on {aligner} (paper: ArcFace)",
            self.net.card.source + dlib_src,
            "models CC0-1.0 (Davis King); dlib Boost Software License 1.0; our port Apache-2.0",
        )

    def points(self, rgb: np.ndarray, lmk: np.ndarray) -> np.ndarray:
        """(5, 2) dlib 5-point shape (pixel centres on integers) of the face whose mesh points are ``lmk``."""
        if self._sp5 is None:
            from ..identity import dlib_points_from_mediapipe

            return dlib_points_from_mediapipe(lmk)
        x0, y0, x1, y1 = face_box_from_mesh(lmk)
        rect = self._dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
        shape = self._sp5(rgb, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def __call__(self, images: list[np.ndarray], meshes: list[np.ndarray | None]) -> np.ndarray:
        """(N, 128) descriptors of the faces in ``images`` (H, W, 3) uint8 whose (478, 3) mesh points are
        ``meshes``; NaN rows where the mesh is None. Images of one size go through the network together."""
        from ..identity import full_float32

        out = np.full((len(images), 128), np.nan)
        todo = [i for i, m in enumerate(meshes) if m is not None]
        groups: dict[tuple, list[int]] = {}
        for i in todo:
            groups.setdefault(images[i].shape, []).append(i)
        for idx in groups.values():
            pts = np.stack([self.points(images[i], meshes[i]) for i in idx])
            for s in range(0, len(idx), self.batch):
                part = idx[s : s + self.batch]
                x = torch.from_numpy(np.stack([images[i] for i in part])).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 255.0
                with torch.no_grad(), full_float32():
                    out[part] = self.net.describe(x, pts[s : s + self.batch], quantize=True).double().cpu().numpy()
        return out


@functools.lru_cache(maxsize=2)
def identity_model(device: str = "auto") -> FaceIdentityModel:
    return FaceIdentityModel(device)


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
