"""The avatar artifact: a versioned ``.npz`` (UV maps, shape offset, head-model identity, source camera, settings).

Everything needed to re-pose and render the avatar later is inside; the Gaussians themselves are derived on load
(they are cheap to sample and that keeps the file small: about 4 MB at K = 256 in float16).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..store import atomic_path
from .maps import NUM_ATTRIBUTES

FORMAT = "fhavatar-avatar"
FORMAT_VERSION = 1


@dataclass
class Avatar:
    """maps (14, K, K) activated attribute maps; delta_p (3, K, K) UV shape offset (metres);
    shape (S,) head-model shape; source_params: HeadParams fields of the source frame (numpy, leading dim 1);
    source_K (3, 3) normalized intrinsics; source_c2w (4, 4); head_model: {"kind", "name", "digest"}; meta: settings,
    weights hash, method, input hash, pruning, ...; keep (G,) bool: the Gaussian samples of the UV space that are
    rendered (``pipelines.avatar.prune``), None = all."""

    maps: np.ndarray
    delta_p: np.ndarray
    shape: np.ndarray
    source_params: dict
    source_K: np.ndarray
    source_c2w: np.ndarray
    head_model: dict
    meta: dict = field(default_factory=dict)
    keep: np.ndarray | None = None

    @property
    def uv_size(self) -> int:
        return int(self.maps.shape[-1])

    def maps_tensor(self, device="cpu") -> torch.Tensor:
        return torch.as_tensor(self.maps, dtype=torch.float32, device=device)[None]

    def delta_p_tensor(self, device="cpu") -> torch.Tensor:
        return torch.as_tensor(self.delta_p, dtype=torch.float32, device=device)[None]

    def source_head_params(self, device="cpu"):
        """The source frame's tracked parameters (batch 1) with the avatar's shape."""
        from ..head.base import HeadParams

        return HeadParams.from_dict({**self.source_params, "shape": np.asarray(self.shape)[None]}, device=device)


def save_avatar(path: str | Path, avatar: Avatar, half: bool = True) -> None:
    """Write atomically. Maps are stored in float16 by default (ample for colours/attributes, halves the size)."""
    dt = np.float16 if half else np.float32
    header = {"format": FORMAT, "version": FORMAT_VERSION, "head_model": avatar.head_model, "meta": avatar.meta}
    arrays = {
        "maps": avatar.maps.astype(dt),
        "delta_p": avatar.delta_p.astype(np.float32),
        "shape": avatar.shape.astype(np.float32),
        "source_K": avatar.source_K.astype(np.float32),
        "source_c2w": avatar.source_c2w.astype(np.float32),
        **{f"source_{k}": np.asarray(v, dtype=np.float32) for k, v in avatar.source_params.items()},
        **({"keep": np.asarray(avatar.keep, dtype=bool)} if avatar.keep is not None else {}),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)


def load_avatar(path: str | Path) -> Avatar:
    """Read and validate an avatar file; any problem is an ``InputError`` naming the file."""
    path = Path(path)
    fix = "re-create it with `fhavatar reconstruct`"
    if not path.is_file():
        raise InputError(f"avatar '{path}' not found", "pass the avatar.npz written by `fhavatar reconstruct`")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise InputError(f"avatar '{path}' is corrupt or not an avatar file ({type(e).__name__})", fix) from e
    if "header" not in data:
        raise InputError(f"avatar '{path}' is not an fhavatar avatar (no header)", fix)
    try:
        header = json.loads(bytes(data["header"]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"avatar '{path}' has a corrupt header", fix) from e
    if header.get("format") != FORMAT:
        raise InputError(f"avatar '{path}' has format {header.get('format')!r}, expected {FORMAT!r}", fix)
    if header.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"avatar '{path}' has version {header['version']}, newer than this fhavatar supports "
                         f"({FORMAT_VERSION})", "upgrade fhavatar")
    for key in ("maps", "delta_p", "shape", "source_K", "source_c2w"):
        if key not in data:
            raise InputError(f"avatar '{path}' is corrupt: missing '{key}'", fix)
    maps = data["maps"].astype(np.float32)
    if maps.ndim != 3 or maps.shape[0] != NUM_ATTRIBUTES or maps.shape[1] != maps.shape[2]:
        raise InputError(f"avatar '{path}' is corrupt: maps have shape {maps.shape}, expected (14, K, K)", fix)
    if not np.isfinite(maps).all():
        raise InputError(f"avatar '{path}' is corrupt: maps contain NaN/inf", fix)
    params = {k[len("source_"):]: v for k, v in data.items()
              if k.startswith("source_") and k not in ("source_K", "source_c2w")}
    keep = data.get("keep")
    if keep is not None and (keep.ndim != 1 or keep.dtype != bool):
        raise InputError(f"avatar '{path}' is corrupt: its pruning mask has shape {keep.shape} ({keep.dtype})", fix)
    return Avatar(maps, data["delta_p"].astype(np.float32), data["shape"], params, data["source_K"],
                  data["source_c2w"], header.get("head_model", {}), header.get("meta", {}), keep)
