"""The artifact store shared by every stage.

Layout (one folder per input item)::

    <out>/<item-id>/
        .lock                      per-item lock (flock) so two jobs never write the same item; names its holder
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
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import ConfigError, InputError

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
# ``atomic_path``'s temporary files: ".<final name>.<8 random characters>.tmp[<suffix>]" (earlier versions used
# tempfile.mkstemp with the same prefix and suffix, whose random part is 8 characters of [a-z0-9_]).
TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^./]+)?$")


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


def _new_temp_file(path: Path, sfx: str) -> Path:
    """Create an empty, unique temporary file next to ``path``; its mode is 0666 minus the umask, like any new file
    (mkstemp's fixed 0600 made every artifact private, which breaks group-shared cluster folders)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{sfx}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name next to '{path}'")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` (atomic on POSIX).

    On error the temporary file is removed, so a killed or failed writer never leaves a half-written artifact under
    the final name (a SIGKILL can leave the temporary file itself: ``remove_stale_temps`` clears it when the stage is
    next taken). ``suffix`` keeps the extension for writers that look at it (e.g. ``.mp4`` for ffmpeg).
    """
    path = Path(path)
    ensure_dir(path.parent)
    sfx = suffix if suffix is not None else path.suffix
    try:
        tmp_path = _new_temp_file(path, sfx)
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise InputError(f"cannot write into '{path.parent}': {e.strerror.lower()}",
                             "choose a writable --out folder") from e
        raise
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(stage_dir: str | Path, lock_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``stage_dir`` and its direct sub-folders.

    Only call it holding the lock of ``lock_dir`` that guards ``stage_dir``: then nobody else can be writing them.
    A folder holding a ``.lock`` other than ``lock_dir``'s belongs to another lock's scope and is left alone.
    Returns the removed files.
    """
    stage_dir, lock_dir = Path(stage_dir), Path(lock_dir)
    if not stage_dir.is_dir():
        return []

    def foreign_lock(folder: Path) -> bool:
        return (folder / LOCK_FILE).exists() and folder.resolve() != lock_dir.resolve()

    if foreign_lock(stage_dir):
        return []
    folders = [stage_dir] + sorted(p for p in stage_dir.iterdir() if p.is_dir() and not foreign_lock(p))
    removed = []
    for folder in folders:
        for p in folder.iterdir():
            if TEMP_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


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
LOCK_FILE = ".lock"
LOCK_TRIES, LOCK_RETRY_S = 3, 0.01  # ride out a `fhavatar status` probe holding the lock for a few microseconds
_JOB_ENV = ("SLURM_JOB_ID", "LSB_JOBID", "JOB_ID", "PBS_JOBID")  # SLURM, LSF, SGE, PBS


@dataclass
class LockHolder:
    """Who holds an item lock, as its holder recorded it in the lock file (fields None when unknown)."""

    pid: int | None = None
    host: str | None = None
    stage: str | None = None  # the stage folder's name it is working on
    since: float | None = None
    job: str | None = None  # the scheduler's job id

    def describe(self) -> str:
        if self.pid is None:
            return "another job"
        return f"pid {self.pid} on {self.host}" + (f" (job {self.job})" if self.job else "")


class ItemLocked(Exception):
    """Another process (or thread) holds this item's lock."""

    def __init__(self, item_dir: str | Path, holder: LockHolder | None = None) -> None:
        self.item_dir = Path(item_dir)
        self.holder = holder or LockHolder()
        super().__init__(f"'{item_dir}' is locked by {self.holder.describe()}")


_held = threading.local()  # per thread: lock file -> [fd, stack of LockHolder] (a thread may re-enter its own lock)


def _this_holder(stage: str | None) -> LockHolder:
    job = next((os.environ[k] for k in _JOB_ENV if os.environ.get(k)), None)
    return LockHolder(os.getpid(), socket.gethostname(), stage, round(time.time(), 3), job)


def _write_holder(fd: int, holder: LockHolder | None) -> None:
    try:
        os.ftruncate(fd, 0)
        if holder is not None:
            os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
    except OSError:  # a lock file we may only read (another user's): the lock itself still works
        pass


def _read_holder(fd: int) -> LockHolder:
    try:
        d = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return LockHolder(**{k: d.get(k) for k in LockHolder.__dataclass_fields__})
    except (OSError, ValueError, TypeError):  # empty, half-written or foreign content
        return LockHolder()


def _open_lock_file(path: Path) -> int:
    try:  # 0666 minus the umask: other members of a group-shared folder must be able to take the lock too
        return os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor


@contextlib.contextmanager
def item_lock(item_dir: str | Path, stage: str | None = None) -> Iterator[None]:
    """Exclusive, non-blocking lock of an item folder (``<item_dir>/.lock``), released automatically if the process
    dies. Raises ``ItemLocked`` (naming the holder) when another process or thread holds it.

    The holder writes its pid, host, job id and ``stage`` into the lock file, so that ``fhavatar status`` can say
    who is working on what; a killed holder's lock is free again, which is how status tells a dead job from a
    live one. The same thread may take a lock it already holds (nested stages of one item).
    """
    ensure_dir(item_dir)
    path = Path(item_dir) / LOCK_FILE
    key = str(path.resolve())
    held = getattr(_held, "locks", None)
    if held is None:
        held = _held.locks = {}
    if key in held:  # re-entered by the thread holding it
        fd, stack = held[key]
        stack.append(_this_holder(stage or stack[-1].stage))
        _write_holder(fd, stack[-1])
        try:
            yield
        finally:
            stack.pop()
            _write_holder(fd, stack[-1])
        return
    fd = _open_lock_file(path)
    try:
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if attempt == LOCK_TRIES - 1:
                    raise ItemLocked(item_dir, _read_holder(fd)) from e
                time.sleep(LOCK_RETRY_S)
        held[key] = (fd, [_this_holder(stage)])
        _write_holder(fd, held[key][1][0])
        try:
            yield
        finally:
            del held[key]
            _write_holder(fd, None)  # free again: a stale name must not look like a holder
    finally:
        os.close(fd)


def lock_holder(item_dir: str | Path) -> LockHolder | None:
    """The live holder of ``<item_dir>/.lock``, or None when nobody holds it (a SIGKILLed holder's lock is free).

    Probes the lock with a shared, non-blocking flock released at once. Where the file system has no flock the
    recorded pid decides on this host; another host's holder is then assumed alive.
    """
    try:
        fd = os.open(Path(item_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return holder
            if holder.pid is None:
                return None
            if holder.host == socket.gethostname():
                return holder if _pid_alive(holder.pid) else None
            return holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextlib.contextmanager
def take_stage(stage_dir: str | Path, lock_dir: str | Path | None = None) -> Iterator[None]:
    """Take one stage of an item for this job: lock ``lock_dir`` (default: the stage folder's parent, the item
    folder) naming the stage, then remove the temporary files a killed earlier holder left in the stage folder."""
    stage_dir = Path(stage_dir)
    lock_dir = Path(lock_dir) if lock_dir is not None else stage_dir.parent
    with item_lock(lock_dir, stage=stage_dir.name):
        remove_stale_temps(stage_dir, lock_dir)
        yield


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


SHARD_FIX = "pass --shard i/n explicitly"


def shard_from_env(env: dict | None = None) -> tuple[int, int]:
    """This task's shard (i, n) in a job array, from the scheduler's variables; (0, 1) outside a job array.

    The array's task ids, whatever their first id, step and last id (SLURM ``--array=0-4:2``, LSF ``[2-4]``,
    ``[1-9:2,20]``), map one-to-one and in order onto shards 0..n-1, so the tasks together take every input exactly
    once. A task id that is not one of the array's, or an array whose ids the variables do not pin down, is a
    ``ConfigError`` (exit 2, nothing run): a wrong split would silently drop inputs.

    SLURM: ``SLURM_ARRAY_TASK_ID`` with ``_COUNT``/``_MIN``/``_MAX``/``_STEP`` (an irregular ``--array`` list is
    refused). SGE: ``SGE_TASK_ID``/``_FIRST``/``_LAST``/``_STEPSIZE``. LSF: ``LSB_JOBINDEX`` with the index list of
    ``LSB_JOBNAME`` (``name[2-4]``), checked against ``LSB_JOBINDEX_END``. PBS Pro: ``PBS_ARRAY_INDEX``
    with ``FHAVATAR_SHARD_COUNT`` (and ``FHAVATAR_SHARD_FIRST``, default 0, ``FHAVATAR_SHARD_STEP``, default 1).
    """
    e = os.environ if env is None else env
    if _env_set(e, "SLURM_ARRAY_TASK_ID"):
        return _task_shard("SLURM", "SLURM_ARRAY_TASK_ID", _int_env(e, "SLURM_ARRAY_TASK_ID"), _slurm_ids(e))
    if _env_set(e, "SGE_TASK_ID"):
        if not _env_set(e, "SGE_TASK_LAST"):
            raise ConfigError("SGE_TASK_ID is set but SGE_TASK_LAST is not: the job array's size is unknown", SHARD_FIX)
        ids = _stepped("SGE", _int_env(e, "SGE_TASK_FIRST", 1), _int_env(e, "SGE_TASK_LAST"),
                       _int_env(e, "SGE_TASK_STEPSIZE", 1))
        return _task_shard("SGE", "SGE_TASK_ID", _int_env(e, "SGE_TASK_ID"), ids)
    if _env_set(e, "LSB_JOBINDEX") and _int_env(e, "LSB_JOBINDEX") > 0:  # LSF sets 0 outside job arrays
        return _task_shard("LSF", "LSB_JOBINDEX", _int_env(e, "LSB_JOBINDEX"), _lsf_ids(e))
    if _env_set(e, "PBS_ARRAY_INDEX"):
        if not _env_set(e, "FHAVATAR_SHARD_COUNT"):
            raise ConfigError("PBS_ARRAY_INDEX is set but the job array's size is unknown to fhavatar",
                              "export FHAVATAR_SHARD_COUNT (and FHAVATAR_SHARD_FIRST / _STEP) in the job script, or "
                              + SHARD_FIX)
        first, step = _int_env(e, "FHAVATAR_SHARD_FIRST", 0), _int_env(e, "FHAVATAR_SHARD_STEP", 1)
        count = _int_env(e, "FHAVATAR_SHARD_COUNT")
        ids = _stepped("PBS", first, first + (count - 1) * step, step)
        return _task_shard("PBS", "PBS_ARRAY_INDEX", _int_env(e, "PBS_ARRAY_INDEX"), ids)
    return 0, 1


def _env_set(e, name: str) -> bool:
    return e.get(name, "").strip() not in ("", "undefined")  # SGE writes "undefined" outside job arrays


def _int_env(e, name: str, default: int | None = None) -> int:
    if not _env_set(e, name):
        if default is None:
            raise ConfigError(f"job array variable {name} is not set", SHARD_FIX)
        return default
    try:
        return int(e[name])
    except ValueError:
        raise ConfigError(f"job array variable {name}='{e[name]}' is not an integer", SHARD_FIX) from None


def _stepped(scheduler: str, first: int, last: int, step: int) -> range:
    if step < 1 or last < first:
        raise ConfigError(f"{scheduler} job array ids {first}-{last}:{step} are not a valid range", SHARD_FIX)
    return range(first, last + 1, step)


def _slurm_ids(e) -> range:
    step = _int_env(e, "SLURM_ARRAY_TASK_STEP", 1)
    count = _int_env(e, "SLURM_ARRAY_TASK_COUNT", 0) or None
    lo = _int_env(e, "SLURM_ARRAY_TASK_MIN", -1)
    hi = _int_env(e, "SLURM_ARRAY_TASK_MAX", -1)
    if count is None and (lo < 0 or hi < 0):
        raise ConfigError("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or _MIN/_MAX: the job array's "
                          "ids are unknown", SHARD_FIX)
    if lo < 0:
        lo = hi - (count - 1) * step if hi >= 0 else 0
    if hi < 0:
        hi = lo + (count - 1) * step
    ids = _stepped("SLURM", lo, hi, step)
    if count is not None and len(ids) != count:
        raise ConfigError(f"SLURM job array ids {_describe_ids(ids)} make {len(ids)} tasks but "
                          f"SLURM_ARRAY_TASK_COUNT is {count} (an irregular --array list?)",
                          "give --array an evenly stepped range (e.g. 0-15 or 1-31:2), or " + SHARD_FIX)
    return ids


def _lsf_ids(e) -> list[int]:
    """The job array's indices from ``LSB_JOBNAME`` (``name[1-10:2,15]%4``), checked against LSB_JOBINDEX_END."""
    name = e.get("LSB_JOBNAME", "")
    m = re.search(r"\[([0-9,:\-\s]+)\](%\d+)?\s*$", name)
    if not m:
        raise ConfigError(f"LSF job array: LSB_JOBNAME '{name}' holds no index list such as [1-16], so the array's "
                          "first index is unknown", SHARD_FIX)
    ids: set[int] = set()
    for part in m.group(1).replace(" ", "").split(","):
        r = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not r:
            raise ConfigError(f"LSF job array index list '[{m.group(1)}]' of LSB_JOBNAME is not understood", SHARD_FIX)
        first = int(r.group(1))
        ids.update(_stepped("LSF", first, int(r.group(2) or first), int(r.group(3) or 1)))
    ordered = sorted(ids)
    end = _int_env(e, "LSB_JOBINDEX_END", ordered[-1])
    if end != ordered[-1]:
        raise ConfigError(f"LSF job array: LSB_JOBINDEX_END={end} but LSB_JOBNAME's index list ends at {ordered[-1]}",
                          SHARD_FIX)
    return ordered


def _describe_ids(ids) -> str:
    if isinstance(ids, range):
        return f"{ids.start}-{ids[-1]}" + (f":{ids.step}" if ids.step != 1 else "")
    return ",".join(map(str, ids)) if len(ids) <= 8 else f"{ids[0]},{ids[1]},...,{ids[-1]} ({len(ids)} ids)"


def _task_shard(scheduler: str, var: str, task_id: int, ids) -> tuple[int, int]:
    if task_id not in ids:
        raise ConfigError(f"{scheduler} job array task id {var}={task_id} is not one of the array's ids "
                          f"({_describe_ids(ids)})", "check the array's variables, or " + SHARD_FIX)
    return ids.index(task_id), len(ids)


def select_shard(items: list, index: int, count: int) -> list:
    """Round-robin split: every item lands in exactly one of the ``count`` shards."""
    return items[index::count]


def now() -> float:
    return time.time()
