"""What an output folder holds: per item and stage done / failed / running / interrupted, and items not started.

A stage's manifest says ``done`` or ``failed`` once its job has finished with it. Before that (manifest ``running``
or ``interrupted``, or none yet: preprocessing writes its manifest last) the item lock decides: a live job holding
it for that stage means ``running`` (the lock file names its pid, host and job); a free lock means the job that
wrote the stage is gone (SIGKILL, node failure, SIGTERM) and the stage is ``interrupted``: re-running the command
continues it. Items that have no folder yet are ``not started``; status knows them when it is given the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .store import Manifest, lock_holder

STAGES = ("preprocess", "avatar", "turntable")  # one folder per item
MULTI_STAGES = ("reenact", "eval")  # one folder per driving input (reenact/<driving-id>/) or protocol (eval/<p>/)
STATES = ("done", "failed", "running", "interrupted", "not started")
NOT_STARTED = "not started"


@dataclass
class StageState:
    """One stage of one item: ``state`` is one of ``STATES``; ``holder`` describes the live job on it."""

    state: str
    error: str | None = None
    holder: str | None = None


@dataclass
class ItemStatus:
    """One item of an output folder (or one given input without a folder yet: ``started`` False)."""

    item: str  # the item id (folder name)
    input: str | None = None  # the input it was given for, when status was given the inputs
    stages: dict[str, StageState] = field(default_factory=dict)  # STAGES present in the folder
    multi: dict[str, dict[str, StageState]] = field(default_factory=dict)  # "reenact"/"eval" -> name -> state
    started: bool = True


def stage_state(stage: Path) -> StageState | None:
    """The state of one stage folder, None when it does not exist (and no job is about to make it)."""
    m = Manifest.load(stage)
    if m is not None and m.status in ("done", "failed"):
        return StageState(m.status, m.error)
    # Running, or its job died: the lock tells. Stages lock their item folder (the stage's parent) or themselves.
    # A holder that named no stage (or not yet) counts for the stages present.
    for lock_dir in (stage, stage.parent):
        holder = lock_holder(lock_dir)
        if holder is not None and (holder.stage == stage.name or (holder.stage is None and stage.is_dir())):
            return StageState("running", holder=holder.describe())
    return StageState("interrupted", m.error if m is not None else None) if stage.is_dir() else None


def item_status(item_dir: Path, input_name: str | None = None) -> ItemStatus:
    st = ItemStatus(item_dir.name, input_name)
    for s in STAGES:
        state = stage_state(item_dir / s)
        if state is not None:
            st.stages[s] = state
    for s in MULTI_STAGES:
        parent = item_dir / s
        subs = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        states = {p.name: stage_state(p) for p in subs}
        st.multi[s] = {k: v for k, v in states.items() if v is not None}
    return st


def collect_status(out: Path, inputs: Iterable[tuple[str, str]] = ()) -> list[ItemStatus]:
    """Every item folder of ``out`` (sorted), then the given ``(input, item id)`` pairs that have none yet."""
    given = dict((iid, name) for name, iid in inputs)
    rows = [item_status(p, given.get(p.name)) for p in sorted(out.iterdir())
            if p.is_dir() and not p.name.startswith(".")]
    seen = {r.item for r in rows}
    rows += [ItemStatus(iid, name, started=False) for iid, name in given.items() if iid not in seen]
    return rows


def counts(states: Iterable[StageState]) -> dict[str, int]:
    """state -> how many, in ``STATES`` order, zero counts left out."""
    c: dict[str, int] = {}
    for s in states:
        c[s.state] = c.get(s.state, 0) + 1
    return {k: c[k] for k in STATES if k in c}


def totals(rows: list[ItemStatus]) -> dict[str, dict[str, int]]:
    """Per stage column: state -> count over all items (items not started count under preprocess)."""
    out: dict[str, dict[str, int]] = {}
    for s in STAGES:
        states = [r.stages[s] for r in rows if s in r.stages]
        if s == STAGES[0]:
            states += [StageState(NOT_STARTED) for r in rows if not r.started]
        out[s] = counts(states)
    for s in MULTI_STAGES:
        out[s] = counts(v for r in rows for v in r.multi.get(s, {}).values())
    return {k: v for k, v in out.items() if v}
