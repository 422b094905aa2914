"""Network checkpoints: safetensors files with the config in their metadata, found in ``weights/``.

Search order for ``resolve_weights(None)``: ``$FHAVATAR_WEIGHTS``, then ``weights/fhavatar_default.safetensors``
(the embedded default, listed with its sha256 in ``weights/MANIFEST.json``). ``"random"`` builds a seeded,
untrained network (for checks of the pipeline; its avatars are not meaningful).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..errors import WeightsError
from ..store import atomic_path, hash_file
from .config import NetworkConfig
from .model import FHAvatarNet

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "fhavatar_default.safetensors"
ENV_VAR = "FHAVATAR_WEIGHTS"
RANDOM = "random"

_FIX = ("train weights with `fhavatar train` (see weights/TRAINING.md), pass --weights PATH, "
        "or use --method unproject (no network)")


def resolve_weights(spec: str | None) -> Path | str:
    """The checkpoint file to use (or ``"random"``); a missing file is a ``WeightsError`` that says what to do."""
    if spec == RANDOM:
        return RANDOM
    if spec:
        p = Path(spec)
        if not p.is_file():
            raise WeightsError(f"network weights '{p}' not found", _FIX)
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise WeightsError(f"{ENV_VAR}='{env}' is not a file", f"fix the variable or unset it; {_FIX}")
        return Path(env)
    if DEFAULT_WEIGHTS.is_file():
        _check_manifest(DEFAULT_WEIGHTS)
        return DEFAULT_WEIGHTS
    raise WeightsError(f"no network weights: '{DEFAULT_WEIGHTS.relative_to(WEIGHTS_DIR.parent)}' is missing", _FIX)


def _check_manifest(path: Path) -> None:
    manifest = WEIGHTS_DIR / "MANIFEST.json"
    if not manifest.is_file():
        return
    entries = {e["file"]: e for e in json.loads(manifest.read_text()).get("files", [])}
    entry = entries.get(path.name)
    if entry and entry.get("sha256") and hash_file(path) != entry["sha256"]:
        raise WeightsError(f"network weights '{path}' do not match the sha256 in weights/MANIFEST.json "
                           "(corrupt or replaced file)", "restore the file from the repository (git checkout weights/)")


def save_checkpoint(path: str | Path, net: FHAvatarNet, extra: dict | None = None, half: bool = True) -> None:
    """Write the network's weights (fp16 by default, to stay small) with its config as metadata, atomically."""
    from safetensors.torch import save_file

    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu()
             for k, v in net.state_dict().items()}
    meta = {"config": json.dumps(dataclasses.asdict(net.config)), "extra": json.dumps(extra or {})}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_config(path: str | Path) -> NetworkConfig:
    from safetensors import safe_open

    from ..config import from_dict

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise WeightsError(f"network weights '{path}' have no config metadata", "use a checkpoint written by fhavatar")
    return from_dict(NetworkConfig, json.loads(meta["config"]))


def load_network(spec: str | Path | None = None, device: str = "cpu", prior: str | None = None,
                 config: NetworkConfig | None = None) -> FHAvatarNet:
    """Build the network from a checkpoint (or ``"random"`` with ``config``), in eval mode on ``device``."""
    path = resolve_weights(str(spec) if spec is not None else None)
    if path == RANDOM:
        cfg = config or NetworkConfig()
        if prior:
            cfg = dataclasses.replace(cfg, prior=prior)
        torch.manual_seed(0)
        return FHAvatarNet(cfg).to(device).eval()
    from safetensors.torch import load_file

    try:
        cfg = read_config(path)
        state = load_file(str(path))
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise WeightsError(f"network weights '{path}' are unreadable ({type(e).__name__})", _FIX) from e
    if prior:
        cfg = dataclasses.replace(cfg, prior=prior)
    net = FHAvatarNet(cfg)
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("prior.")] if prior == "panohead" else missing
    if missing or unexpected:
        raise WeightsError(f"network weights '{path}' do not fit this network (missing {len(missing)}, unexpected "
                           f"{len(unexpected)} tensors, e.g. {(missing or unexpected)[0]})", _FIX)
    return net.to(device).eval()
