"""Training checkpoints that resume exactly, and the fp16 network weights that inference loads.

``<out>/checkpoints/last.pt`` holds everything a resumed run needs to continue bit-for-bit like an uninterrupted one
(on the same device and software): the fp32 model, the Adam state, the step (which is also the data position, since
batches are a pure function of the step, see ``data.sample_plan``), the RNG states of torch (CPU and CUDA), numpy
and python, and the config digest (a resumed run refuses a different optimisation config). It is written
atomically (temp file + rename), so a run killed mid-write keeps the previous checkpoint. Under ``torchrun`` rank 0
writes it and every rank resumes from it (the ranks hold the same weights and optimiser state; see ``loop``).

``save_sharded`` / ``load_sharded`` split a state into safetensors files of at most ``max_bytes`` (to move a
checkpoint through channels with a per-file size limit).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..store import atomic_path

CHECKPOINT_VERSION = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # Generator states must be CPU ByteTensors, also when the checkpoint was loaded with map_location="cuda".
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def save_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        config_digest: str, extra: dict | None = None) -> None:
    """Write the full training state after ``step`` completed steps, atomically."""
    state = {
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "config_digest": config_digest,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path, suffix=".pt") as tmp:
        tmp.write_bytes(buf.getvalue())


def load_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        config_digest: str | None, device="cpu", restore_rng: bool = True) -> dict:
    """Restore model (+ optimizer, RNG) from ``path``; returns the checkpoint dict (``step``, ``extra``)."""
    state = torch.load(path, map_location=device, weights_only=False)
    if config_digest is not None and state.get("config_digest") != config_digest:
        raise ConfigError(f"checkpoint '{path}' was made with a different training config",
                          "resume with the same config, or start a new output folder (or pass resume=False)")
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state


# ------------------------------------------------------------------------------------------------- sharded states
def _flatten(state: dict, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors by dotted key, and the non-tensor skeleton (JSON) to rebuild the nesting."""
    tensors, skeleton = {}, {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            skeleton[str(k)] = {"__tensor__": key}
        elif isinstance(v, dict):
            sub_t, sub_s = _flatten(v, key + ".")
            tensors.update(sub_t)
            skeleton[str(k)] = {"__dict__": sub_s, "__intkeys__": all(isinstance(x, int) for x in v)}
        else:
            skeleton[str(k)] = {"__value__": v}
    return tensors, skeleton


def _unflatten(skeleton: dict, tensors: dict[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in skeleton.items():
        if "__tensor__" in v:
            val = tensors[v["__tensor__"]]
        elif "__dict__" in v:
            val = _unflatten(v["__dict__"], tensors)
            if v.get("__intkeys__"):
                val = {int(a): b for a, b in val.items()}
        else:
            val = v["__value__"]
        out[k] = val
    return out


def save_sharded(folder: str | Path, state: dict, max_bytes: int = 15 * 2**20, name: str = "state") -> list[Path]:
    """Write a (nested) dict of tensors/JSON values as ``<name>-NNN.safetensors`` files of at most ``max_bytes``
    of tensor data each (for transports that cap file sizes). A tensor larger than one shard is split into flat
    pieces ``<key>#<j>`` that :func:`load_sharded` joins and reshapes (shapes kept in the skeleton)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors, skeleton = _flatten(state)
    pieces: list[tuple[str, torch.Tensor]] = []
    split: dict[str, list[int]] = {}
    for k, t in tensors.items():
        if t.numel() * t.element_size() <= max_bytes:
            pieces.append((k, t))
            continue
        per = max(max_bytes // t.element_size(), 1)
        flat = t.reshape(-1)
        chunks = [flat[j:j + per].clone() for j in range(0, flat.numel(), per)]
        pieces += [(f"{k}#{j}", c) for j, c in enumerate(chunks)]
        split[k] = list(t.shape)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in pieces:
        nbytes = t.numel() * t.element_size()
        if size + nbytes > max_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    paths = []
    for i, shard in enumerate(shards):
        p = folder / f"{name}-{i:03d}.safetensors"
        meta = ({"skeleton": json.dumps(skeleton), "num_shards": str(len(shards)), "split": json.dumps(split)}
                if i == 0 else {})
        with atomic_path(p, suffix=".safetensors") as tmp:
            save_file(shard, str(tmp), metadata=meta)
        paths.append(p)
    return paths


def load_sharded(folder: str | Path, name: str = "state", device="cpu") -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    first = folder / f"{name}-000.safetensors"
    with safe_open(str(first), framework="pt") as f:
        meta = f.metadata()
    n = int(meta["num_shards"])
    tensors: dict[str, torch.Tensor] = {}
    for i in range(n):
        tensors.update(load_file(str(folder / f"{name}-{i:03d}.safetensors"), device=str(device)))
    for k, shape in json.loads(meta.get("split", "{}")).items():
        parts = [tensors.pop(f"{k}#{j}") for j in range(sum(1 for x in tensors if x.startswith(k + "#")))]
        tensors[k] = torch.cat(parts).reshape(shape)
    return _unflatten(json.loads(meta["skeleton"]), tensors)
