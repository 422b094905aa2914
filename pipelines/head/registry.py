"""Which head model to use.

``auto`` is the head model the network weights in use were trained on (recorded in the weights file: ICT-FaceKit
for the shipped weights; ``embedded`` for files from before heads were recorded; ICT for ``random`` or when no
weights can be found). A network only works on the head it was trained on: its UV layout and geometry are that
head's. FLAME is used when asked for (``--head-model flame``), found as below.

FLAME file search order (:func:`find_flame_file`):

1. ``FHAVATAR_FLAME``: a FLAME pickle, or a folder searched like step 2. If it is set but wrong, that is an error
   (silently falling back would hide a typo).
2. ``weights/flame/`` of the repository (next to the ``pipelines`` package), then ``./weights/flame/`` of the
   working directory. In a folder, well-known names win in this order: ``generic_model.pkl`` (FLAME 2020),
   ``flame2023.pkl``, ``flame2023_no_jaw.pkl``, ``flame2023_Open.pkl``; then any other ``*.pkl`` in alphabetical
   order, then the same in one level of sub-folders (the official zips unpack into e.g. ``FLAME2020/``). Asset
   pickles that are not models (``FLAME_masks.pkl``, landmark embeddings) are skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsError
from .base import HeadModel
from .flame import FLAME_FIX, FlameConfig, FlameHeadModel

ENV_VAR = "FHAVATAR_FLAME"
KINDS = ("auto", "flame", "ict", "embedded")
PREFERRED_NAMES = ("generic_model.pkl", "flame2023.pkl", "flame2023_no_jaw.pkl", "flame2023_Open.pkl")
_NOT_MODELS = ("flame_masks", "landmark", "embedding")


def default_search_dirs() -> list[Path]:
    """Folders searched when ``FHAVATAR_FLAME`` is unset: the repo's ``weights/flame`` then ``./weights/flame``."""
    repo = Path(__file__).resolve().parents[2] / "weights" / "flame"
    cwd = Path.cwd() / "weights" / "flame"
    return [repo] if cwd.resolve() == repo.resolve() else [repo, cwd]


def _is_model_name(p: Path) -> bool:
    low = p.name.lower()
    return p.suffix.lower() == ".pkl" and not any(tag in low for tag in _NOT_MODELS)


def _pick_in_folder(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    for level in (sorted([folder]), sorted(d for d in folder.iterdir() if d.is_dir())):
        for d in level:
            for name in PREFERRED_NAMES:
                if (d / name).is_file():
                    return d / name
        for d in level:
            others = sorted(p for p in d.glob("*.pkl") if p.is_file() and _is_model_name(p))
            if others:
                return others[0]
    return None


def _resolve(spec: str, origin: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = _pick_in_folder(p)
        if found is None:
            raise WeightsError(f"{origin} '{p}' is a folder without a FLAME pickle", FLAME_FIX)
        return found
    raise WeightsError(f"{origin} '{p}' does not exist", FLAME_FIX)


def find_flame_file(search_dirs: list[Path] | None = None) -> Path | None:
    """The FLAME pickle to use, or None (see the module docstring for the order).

    Raises WeightsError when ``FHAVATAR_FLAME`` is set to a missing file or a folder without a FLAME pickle.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _resolve(env, ENV_VAR)
    for d in default_search_dirs() if search_dirs is None else search_dirs:
        found = _pick_in_folder(Path(d))
        if found is not None:
            return found
    return None


DEFAULT_KIND = "ict"  # the shipped open head model; what ``auto`` is without a network to follow


def resolve_head_kind(kind: str = "auto", weights: str | None = None) -> str:
    """``kind`` itself, or for ``"auto"`` the head the network weights ``weights`` (None: the default file) were
    trained on, ``DEFAULT_KIND`` when there are none (``"random"``, no file)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown head model kind '{kind}'", f"use one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    from ..network.weights import weights_head_kind  # lazy: the network package is not needed for a named head

    try:
        return weights_head_kind(weights) or DEFAULT_KIND
    except WeightsError:  # no weights: the method needs none, or the network loader says so with its own fix
        return DEFAULT_KIND


def load_head_model(
    kind: str = "auto",
    flame_path: str | None = None,
    device: str | torch.device = "cpu",
    flame_config: FlameConfig | None = None,
    weights: str | None = None,
) -> HeadModel:
    """Build the head model.

    Args:
        kind: 'auto' (the head of the network weights ``weights``, see :func:`resolve_head_kind`), 'flame', 'ict'
            (ICT-FaceKit, shipped) or 'embedded'.
        flame_path: a FLAME pickle or a folder holding one; overrides the search of :func:`find_flame_file`.
        device: where the buffers go.
        flame_config: FLAME options (components, mouth closing, asset paths).
        weights: the network weights ``auto`` follows (None: the default file).
    """
    kind = resolve_head_kind(kind, weights)
    if kind == "ict":
        from .ict import IctHeadModel  # lazy: reads the shipped asset

        return IctHeadModel().to(device)
    if kind == "embedded":
        from .embedded import EmbeddedHeadModel  # lazy: only needed for the hand-made head

        return EmbeddedHeadModel().to(device)
    path = _resolve(flame_path, "FLAME path") if flame_path else find_flame_file()
    if path is None:
        raise WeightsError("head model 'flame' requested but no FLAME file was found", FLAME_FIX)
    return FlameHeadModel(path, flame_config).to(device)


def head_model_id(head: HeadModel) -> str:
    """12-hex-digit hash of the model's class name and buffers (names, shapes, dtypes, values).

    Artifacts record it so that a file made with one head model is not used with another (a different FLAME
    file, component count or mouth closing all change it; the device does not).
    """
    h = hashlib.sha256(type(head).__name__.encode())
    for name, buf in sorted(head.named_buffers(), key=lambda kv: kv[0]):
        t = buf.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]
