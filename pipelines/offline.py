"""The rule for third-party models: nothing downloads at run time.

Every model we run either ships inside an installed package or is read from a file already in the user's torch hub
cache (``$TORCH_HOME/hub/checkpoints``). A loader that cannot find its files raises ``ModelUnavailable(reason)``;
callers report the reason (a metric becomes "unavailable", a ``--landmarks`` choice a one-line error). Loading runs
inside ``forbid_downloads()`` so that a library that tries to fetch weights fails loudly instead of reaching the
network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# Hugging Face based libraries must never reach the hub from here (none is used today; a guard for later ones).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelUnavailable(Exception):
    """A model cannot be loaded offline. ``str(exc)`` is the reason shown to the user."""


@dataclass(frozen=True)
class ModelCard:
    """What produced a number: model name, where its weights came from, and their licence."""

    name: str
    source: str
    licence: str

    def describe(self) -> str:
        return f"{self.name} [{self.source}; licence: {self.licence}]"


def dist_version(dist: str) -> str:
    """Installed version of a distribution, or "?"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def installed_dist(*dists: str) -> str:
    """'name==version' of the first installed distribution among ``dists`` (several ship the same module)."""
    for d in dists:
        if (v := dist_version(d)) != "?":
            return f"{d}=={v}"
    return "/".join(dists)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
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
