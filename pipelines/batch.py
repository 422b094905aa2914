"""Running a stage over many items: skip what is done, lock items, isolate failures, stop cleanly on SIGTERM.

Exit codes used by the CLI (documented in the README):
    0  every item done or skipped as up to date
    1  at least one item failed (the others were completed; see each item's manifest / the one-line errors)
    2  bad usage or inputs (nothing was run)
    3  missing or mismatched weights / model files
    75 no item failed, but at least one was locked by another job working on it: left to that job
    130 interrupted (SIGINT / SIGTERM): the current item was finished, the rest left pending (before the first item:
        nothing was run)
"""

from __future__ import annotations

import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import FhavatarError
from .store import ItemLocked, Manifest, hash_file, is_up_to_date, take_stage

EXIT_OK, EXIT_ITEM_FAILED, EXIT_USAGE, EXIT_WEIGHTS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_LOCKED = 75  # sysexits' EX_TEMPFAIL: nothing failed, another job has the item; re-run later to check


@dataclass
class ItemResult:
    name: str  # the input as given
    item_id: str
    status: str  # done | skipped | failed | locked | pending
    error: str | None = None
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag checked between items (job pre-emption stops after the current item).

    A second signal falls back to the default behaviour (immediate stop); atomic writes keep artifacts whole.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def exit_on_signal(on_signal: Callable[[str], None] | None = None) -> None:
    """Make SIGTERM / SIGINT exit at once with ``EXIT_INTERRUPTED`` (until ``run_batch`` takes them over).

    Loading models before the first item takes seconds; a job pre-empted then must exit 130 like one pre-empted
    between items, not die with 143 (or click's "Aborted!" and 1). Nothing is half-written: ``atomic_path`` removes
    its temporary file as the exit unwinds. ``on_signal(name)`` is told first (to print one line).
    """

    def handle(signum, frame) -> None:
        if on_signal is not None:
            on_signal(signal.Signals(signum).name)
        raise SystemExit(EXIT_INTERRUPTED)  # not an Exception: no `except Exception` on the way swallows it

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handle)
        except ValueError:  # not in the main thread
            pass


def run_stage(
    stage_dir: Path,
    settings: dict,
    inputs: dict[str, Path | str],
    work: Callable[[Path], list[str]],
    force: bool = False,
    lock_dir: Path | None = None,
    extra: Callable[[], dict] | None = None,
) -> tuple[str, dict]:
    """Run one stage for one item, or skip it when up to date.

    Args:
        stage_dir: the stage's folder (e.g. ``<out>/<id>/avatar``); outputs are written inside it.
        settings: everything that changes the result (hashed into the manifest).
        inputs: name -> path (hashed) or precomputed hash string.
        work: does the work, writing files (atomically) into ``stage_dir``; returns their relative paths.
        lock_dir: folder holding the per-item lock (default: the stage folder's parent, i.e. the item folder).
    Returns:
        ("done" | "skipped", outputs {relpath: sha256}). Failures raise after recording them in the manifest;
        ``ItemLocked`` when another job holds the item and the stage is not finished.
    """
    stage_dir = Path(stage_dir)
    input_hashes = {k: (v if isinstance(v, str) else hash_file(v)) for k, v in inputs.items()}
    # A finished stage is skipped without the lock: another job may hold the item for another of its stages.
    if not force and is_up_to_date(stage_dir, settings, input_hashes):
        return "skipped", Manifest.load(stage_dir).outputs
    with take_stage(stage_dir, lock_dir):
        if not force and is_up_to_date(stage_dir, settings, input_hashes):  # finished meanwhile by another job
            return "skipped", Manifest.load(stage_dir).outputs
        stage_dir.mkdir(parents=True, exist_ok=True)
        m = Manifest(stage=stage_dir.name, settings=settings, inputs=input_hashes, started=time.time())
        m.save(stage_dir)
        try:
            rels = work(stage_dir)
        except BaseException as e:
            m.status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
            m.error = e.line() if isinstance(e, FhavatarError) else f"{type(e).__name__}: {e}"
            m.finished = time.time()
            m.seconds = m.finished - m.started
            m.save(stage_dir)
            raise
        m.outputs = {r: hash_file(stage_dir / r) for r in rels}
        m.status = "done"
        m.finished = time.time()
        m.seconds = m.finished - m.started
        if extra is not None:
            m.extra = extra()
        m.save(stage_dir)
        return "done", m.outputs


def run_batch(
    items: list[tuple[str, str, Callable[[], tuple[str, dict]]]],
    on_result: Callable[[ItemResult], None] | None = None,
    fail_fast: bool = False,
    debug: bool = False,
) -> list[ItemResult]:
    """Run ``(name, item_id, job)`` items one after another with failure isolation and clean stops.

    ``job()`` returns (status, outputs) like ``run_stage``. A failing item records its one-line error and the batch
    goes on (unless ``fail_fast``); an item another job holds is reported ``locked`` (left to that job, not a
    failure); after SIGTERM/SIGINT the remaining items are reported ``pending``.
    """
    results: list[ItemResult] = []
    with StopRequested() as stop:
        for name, iid, job in items:
            if stop.requested:
                results.append(ItemResult(name, iid, "pending", "stopped by signal before this item"))
                continue
            t0 = time.time()
            try:
                status, outputs = job()
                r = ItemResult(name, iid, status, None, time.time() - t0, outputs)
            except ItemLocked as e:
                r = ItemResult(name, iid, "locked", f"left to {e.holder.describe()}, which is working on it",
                               time.time() - t0)
            except FhavatarError as e:
                r = ItemResult(name, iid, "failed", e.line(), time.time() - t0)
            except KeyboardInterrupt:
                results.append(ItemResult(name, iid, "pending", "interrupted"))
                stop.requested = True
                continue
            except Exception as e:  # noqa: BLE001 - one bad item must not lose the others' results
                msg = f"{type(e).__name__}: {e}".splitlines()[0]
                if debug:
                    msg += "\n" + traceback.format_exc()
                r = ItemResult(name, iid, "failed", msg, time.time() - t0)
            results.append(r)
            if on_result is not None:
                on_result(r)
            if fail_fast and r.status == "failed":
                stop.requested = True
    return results


def exit_code(results: list[ItemResult]) -> int:
    """The batch's exit code: interrupted > failed > locked (left to another job) > ok."""
    if any(r.status == "pending" for r in results):
        return EXIT_INTERRUPTED
    if any(r.status == "failed" for r in results):
        return EXIT_ITEM_FAILED
    if any(r.status == "locked" for r in results):
        return EXIT_LOCKED
    return EXIT_OK
