"""Network checkpoints: safetensors files with the config in their metadata, found in ``weights/``.

Search order for ``resolve_weights(None)``: ``$FHAVATAR_WEIGHTS``, then ``weights/fhavatar_default.safetensors``
(the embedded default, listed with its sha256 in ``weights/MANIFEST.json``). ``"random"`` builds a seeded,
untrained network (for checks of the pipeline; its avatars are not meaningful).

``load_network`` checks a checkpoint before anything uses it: readable, the tensors and shapes the network expects,
the sha256 of a ``MANIFEST.json`` entry when one describes the file (by name in the file's folder, or by the step
and config digest its metadata records, so a copy of the default weights is checked too) and the digest of its
tensors that ``save_checkpoint`` records in the metadata. Flipped bytes are a ``WeightsError``, not another avatar.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
        return DEFAULT_WEIGHTS
    raise WeightsError(f"no network weights: '{DEFAULT_WEIGHTS.relative_to(WEIGHTS_DIR.parent)}' is missing", _FIX)


def _manifest_entries(manifest: Path) -> list[dict]:
    try:
        return list(json.loads(manifest.read_text()).get("files", [])) if manifest.is_file() else []
    except (OSError, ValueError, AttributeError):
        return []


def _check_manifest(path: Path, extra: dict) -> None:
    """The sha256 of the MANIFEST.json entry that describes ``path``: its own folder's entry of that name, or an
    entry of weights/MANIFEST.json with the step and config digest that ``extra`` (the file's metadata) records."""
    own = [e for e in _manifest_entries(path.parent / "MANIFEST.json") if e.get("file") == path.name]
    same = [e for e in _manifest_entries(WEIGHTS_DIR / "MANIFEST.json")
            if extra.get("config_digest") and e.get("config_digest") == extra.get("config_digest")
            and e.get("steps") == extra.get("step")]
    for entry in own + same:
        if entry.get("sha256") and hash_file(path) != entry["sha256"]:
            raise WeightsError(f"network weights '{path}' do not match the sha256 of '{entry['file']}' in "
                               "MANIFEST.json (corrupt or modified file)",
                               "restore the file (git checkout weights/) or pass other --weights")


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, net: FHAvatarNet, extra: dict | None = None, half: bool = True) -> None:
    """Write the network's weights (fp16 by default, to stay small) with its config as metadata, atomically."""
    from safetensors.torch import save_file

    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu()
             for k, v in net.state_dict().items()}
    meta = {"config": json.dumps(dataclasses.asdict(net.config)), "extra": json.dumps(extra or {}),
            "tensors_sha256": tensors_digest(state)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (config, extra, tensors_sha256); an unreadable file is a WeightsError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise WeightsError(f"network weights '{path}' are unreadable ({type(e).__name__})", _FIX) from e


def read_config(path: str | Path, meta: dict[str, str] | None = None) -> NetworkConfig:
    from ..config import from_dict

    meta = read_metadata(path) if meta is None else meta
    if "config" not in meta:
        raise WeightsError(f"network weights '{path}' have no config metadata", "use a checkpoint written by fhavatar")
    try:
        return from_dict(NetworkConfig, json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"network weights '{path}' have a corrupt config ({type(e).__name__})", _FIX) from e


LEGACY_HEAD = "embedded"  # weights saved before files recorded their head model were all trained on it


def weights_head(spec: str | Path | None = None) -> dict[str, str] | None:
    """What the checkpoint records about the head model it was trained on (``avatar.head.weights_head_record``):
    ``{"head": kind, "head_digest": ...}``; ``None`` for ``"random"`` (an untrained network fits any head). Files
    that record none were trained on ``LEGACY_HEAD`` (no digest)."""
    path = resolve_weights(str(spec) if spec is not None else None)
    if path == RANDOM:
        return None
    try:
        extra = json.loads(read_metadata(Path(path)).get("extra") or "{}")
    except ValueError:
        extra = {}
    extra = extra if isinstance(extra, dict) else {}
    return {k: str(extra[k]) for k in ("head", "head_digest") if extra.get(k)} or {"head": LEGACY_HEAD}


def weights_head_kind(spec: str | Path | None = None) -> str | None:
    """The head model kind (``"ict"``, ``"embedded"``, ...) the checkpoint was trained on; None for ``"random"``."""
    rec = weights_head(spec)
    return rec["head"] if rec else None


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

    path = Path(path)
    meta = read_metadata(path)
    cfg = read_config(path, meta)
    try:
        extra = json.loads(meta.get("extra") or "{}")
    except ValueError:
        extra = {}
    _check_manifest(path, extra if isinstance(extra, dict) else {})
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise WeightsError(f"network weights '{path}' are unreadable ({type(e).__name__})", _FIX) from e
    if meta.get("tensors_sha256") and tensors_digest(state) != meta["tensors_sha256"]:
        raise WeightsError(f"network weights '{path}' are corrupt: their tensors do not match the digest recorded "
                           "when they were saved", "restore the file or retrain; " + _FIX)
    if prior:
        cfg = dataclasses.replace(cfg, prior=prior)
    net = FHAvatarNet(cfg)
    expected = net.state_dict()
    skip = (lambda k: k.startswith("prior.")) if prior == "panohead" else (lambda k: False)
    missing = [k for k in expected if k not in state and not skip(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}" for k in state
             if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        example = (wrong or missing or unexpected)[0]
        raise WeightsError(f"network weights '{path}' do not fit this network (missing {len(missing)}, unexpected "
                           f"{len(unexpected)}, misshapen {len(wrong)} tensors, e.g. {example})", _FIX)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"network weights '{path}' are corrupt: tensor {bad[0]} holds NaN/inf", _FIX)
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return net.to(device).eval()
