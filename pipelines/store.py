"""The artifact store shared by every stage.

Layout (one folder per input item)::

    <out>/<item-id>/
        .lock                      per-item lock (fcntl) so two jobs never write the same item
        preprocess/                frames/, mattes/, tracking.npz, manifest.json
        avatar/                    avatar.npz, manifest.json
        reenact/<driving-id>/      video.mp4, manifest.json
        turntable/                 turntable.mp4, manifest.json
        eval/                      metrics.json, manifest.json

Item ids are stable: ``<sanitized-stem>-<first 10 hex of the content sha256>``, so renaming a file keeps its
artifacts distinct from another file of the same name, and the same content under the same name maps to the same id.

Every stage writes ``manifest.json`` *last*, atomically (temp file + rename), recording the tool version, the
settings, the hashes of its inputs and outputs, status, timings and error. A stage is up to date when its manifest
says ``done`` with the same settings and input hashes and its outputs still hash the same (corruption is detected).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import InputError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


# ----------------------------------------------------------------------------------------------------------- hashing
def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (videos can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """sha256 of a JSON-serializable object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def item_id(path: str | Path, digest: str | None = None) -> str:
    """Stable id of an input file: sanitized stem + first 10 hex digits of its content hash."""
    p = Path(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem).strip("_") or "item"
    return f"{stem[:60]}-{(digest or hash_file(p))[:10]}"


# ------------------------------------------------------------------------------------------------------ atomic writes
_WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC)


def ensure_dir(folder: str | Path) -> Path:
    """Create ``folder`` (and parents); an unwritable location is an ``InputError`` that says so in one line."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise InputError(f"cannot create output folder '{folder}': {e.strerror.lower()}",
                             "choose a writable --out folder") from e
        raise
    return folder


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` (atomic on POSIX).

    On error the temporary file is removed, so a killed or failed writer never leaves a half-written artifact under
    the final name. ``suffix`` keeps the extension for writers that look at it (e.g. ``.mp4`` for ffmpeg).
    """
    path = Path(path)
    ensure_dir(path.parent)
    sfx = suffix if suffix is not None else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{sfx}", dir=path.parent)
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise InputError(f"cannot write into '{path.parent}': {e.strerror.lower()}",
                             "choose a writable --out folder") from e
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_npz(path: str | Path, **arrays) -> None:
    """``np.savez`` to ``path`` atomically (``atomic_path``)."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez must not append its own ".npz" to the temp name
            np.savez(f, **arrays)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------------- manifests
@dataclass
class Manifest:
    """What a stage did for one item. Written last, atomically."""

    stage: str
    status: str = "running"  # running | done | failed
    tool_version: str = __version__
    manifest_version: int = MANIFEST_VERSION
    settings: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # name -> sha256
    outputs: dict = field(default_factory=dict)  # relative path -> sha256
    started: float = 0.0
    finished: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / MANIFEST, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> "Manifest | None":
        p = Path(folder) / MANIFEST
        if not p.exists():
            return None
        try:
            d = read_json(p)
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except (json.JSONDecodeError, TypeError):
            return None


def outputs_intact(folder: Path, manifest: Manifest) -> bool:
    """True when every output listed in the manifest exists and still has its recorded hash."""
    for rel, digest in manifest.outputs.items():
        p = Path(folder) / rel
        if not p.is_file() or hash_file(p) != digest:
            return False
    return True


def is_up_to_date(folder: Path, settings: dict, inputs: dict) -> bool:
    """A stage can be skipped: done, same settings and inputs, and outputs intact."""
    m = Manifest.load(folder)
    return (
        m is not None
        and m.status == "done"
        and m.manifest_version == MANIFEST_VERSION
        and hash_obj(m.settings) == hash_obj(settings)
        and m.inputs == inputs
        and outputs_intact(folder, m)
    )


# ---------------------------------------------------------------------------------------------------------- item lock
class ItemLocked(Exception):
    """Another process holds this item's lock."""


@contextlib.contextmanager
def item_lock(item_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking per-item lock (released automatically if the process dies)."""
    ensure_dir(item_dir)
    fd = os.open(item_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ItemLocked(str(item_dir)) from e
            raise
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------- batch inputs
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".webm", ".mkv")


def expand_inputs(specs: list[str], exts: tuple[str, ...] | None = None) -> list[Path]:
    """Files, folders (their files with a matching extension), globs and ``@list.txt`` files -> sorted unique paths.

    A spec that matches nothing is an error naming the spec (a typo should not silently shrink a batch).
    """
    out: list[Path] = []
    for spec in specs:
        if spec.startswith("@"):
            lst = Path(spec[1:])
            if not lst.is_file():
                raise InputError(f"list file '{lst}' not found", "pass @path/to/list.txt with one input per line")
            base = lst.parent
            lines = [ln.strip() for ln in lst.read_text().splitlines()]
            entries = [ln for ln in lines if ln and not ln.startswith("#")]
            out += expand_inputs([e if Path(e).is_absolute() else str(base / e) for e in entries], exts)
            continue
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and (exts is None or q.suffix.lower() in exts))
            if not found:
                raise InputError(f"folder '{p}' has no inputs" + (f" with extensions {', '.join(exts)}" if exts else ""))
            out += found
        elif p.is_file():
            out.append(p)
        elif any(c in spec for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file())
            if not found:
                raise InputError(f"glob '{spec}' matches no file", "check the pattern (quote it so the shell keeps it)")
            out += found
        else:
            raise InputError(f"input '{spec}' not found", "check the path")
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


# ------------------------------------------------------------------------------------------------------------- shards
def parse_shard(spec: str | None) -> tuple[int, int]:
    """'i/n' (0-based i) -> (i, n); None -> from the scheduler's environment, else (0, 1)."""
    if spec is None:
        return shard_from_env()
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise InputError(f"--shard '{spec}' is not of the form i/n with 0 <= i < n", "e.g. --shard 3/10")
    return int(m.group(1)), int(m.group(2))


def shard_from_env(env: dict | None = None) -> tuple[int, int]:
    """Shard of this task in a job array: SLURM, SGE, LSF, PBS Pro (count via FHAVATAR_SHARD_COUNT), else (0, 1)."""
    e = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in e and "SLURM_ARRAY_TASK_COUNT" in e:
        lo = int(e.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(e["SLURM_ARRAY_TASK_ID"]) - lo, int(e["SLURM_ARRAY_TASK_COUNT"])
    if e.get("SGE_TASK_ID", "undefined") != "undefined" and "SGE_TASK_LAST" in e:
        first = int(e.get("SGE_TASK_FIRST", 1))
        step = int(e.get("SGE_TASK_STEPSIZE", 1))
        n = (int(e["SGE_TASK_LAST"]) - first) // step + 1
        return (int(e["SGE_TASK_ID"]) - first) // step, n
    if "LSB_JOBINDEX" in e and "LSB_JOBINDEX_END" in e and int(e["LSB_JOBINDEX"]) > 0:
        return int(e["LSB_JOBINDEX"]) - 1, int(e["LSB_JOBINDEX_END"])
    if "PBS_ARRAY_INDEX" in e and "FHAVATAR_SHARD_COUNT" in e:
        return int(e["PBS_ARRAY_INDEX"]) - int(e.get("FHAVATAR_SHARD_FIRST", 0)), int(e["FHAVATAR_SHARD_COUNT"])
    return 0, 1


def select_shard(items: list, index: int, count: int) -> list:
    """Round-robin split: every item lands in exactly one of the ``count`` shards."""
    return items[index::count]


def now() -> float:
    return time.time()
