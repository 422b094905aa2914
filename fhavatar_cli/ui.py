"""Console output: rich progress bars for people, line-delimited JSON for cluster logs, or quiet."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclass
class UI:
    quiet: bool = False
    log_json: bool = False

    def __post_init__(self) -> None:
        self.out = Console(stderr=True, highlight=False)

    def event(self, kind: str, **fields) -> None:
        """A machine-readable event (JSON line on stdout) when --log-json is on."""
        if self.log_json:
            sys.stdout.write(json.dumps({"t": round(time.time(), 3), "event": kind, **fields}, default=str) + "\n")
            sys.stdout.flush()

    def info(self, msg: str, **fields) -> None:
        if self.log_json:
            self.event("info", message=msg, **fields)
        elif not self.quiet:
            self.out.print(escape(msg))

    def error(self, msg: str, **fields) -> None:
        """Errors are always shown (one line), also with --quiet."""
        if self.log_json:
            self.event("error", message=msg, **fields)
        else:
            # escape: messages quote paths and library errors, whose "[...]" rich would take for markup
            self.out.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)

    def item(self, result) -> None:
        """Report one batch item's outcome on one line."""
        if self.log_json:
            self.event("item", name=result.name, id=result.item_id, status=result.status, error=result.error,
                       seconds=round(result.seconds, 3))
        elif result.status == "failed":
            self.error(f"{result.name}: {result.error}")
        elif result.status == "locked":  # not an error, but it explains the exit code (75): shown even with --quiet
            self.out.print(f"[yellow] locked[/] {result.name}: {result.error}", soft_wrap=True)
        elif not self.quiet:
            colour = {"done": "green", "skipped": "cyan"}.get(result.status, "yellow")
            self.out.print(f"[{colour}]{result.status:>7}[/] {escape(result.name)} ({result.seconds:.1f}s)")

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator:
        """Yields ``advance(n, total=None, status=None)``; a rich bar for people, periodic JSON events with
        --log-json, nothing with --quiet. A new ``total`` restarts the count for a new phase of the task (e.g. the
        refinement steps after preprocessing); ``status`` is a short text beside the bar (e.g. a loss)."""
        if self.quiet or self.log_json:
            state = {"done": 0, "last": 0.0, "total": total, "status": None}

            def advance(n: int = 1, total: int | None = None, status: str | None = None) -> None:
                if total is not None and total != state["total"]:
                    state["done"], state["total"] = 0, total
                state["done"] += n
                state["status"] = status if status is not None else state["status"]
                if self.log_json and time.time() - state["last"] > 5.0:
                    state["last"] = time.time()
                    extra = {"status": state["status"]} if state["status"] else {}
                    self.event("progress", task=description, done=state["done"], total=state["total"], **extra)

            yield advance
            return
        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        with Progress(*cols, console=self.out, transient=False) as p:
            task = p.add_task(escape(description), total=total, status="")
            length = {"total": total}

            def advance(n: int = 1, total: int | None = None, status: str | None = None) -> None:
                if total is not None and total != length["total"]:
                    length["total"] = total
                    p.reset(task, total=total)
                p.update(task, advance=n, **({"status": status} if status is not None else {}))

            yield advance
