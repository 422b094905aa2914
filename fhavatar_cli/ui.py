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
        elif result.status == "failed" or result.status == "locked":
            self.error(f"{result.name}: {result.error}")
        elif not self.quiet:
            colour = {"done": "green", "skipped": "cyan"}.get(result.status, "yellow")
            self.out.print(f"[{colour}]{result.status:>7}[/] {escape(result.name)} ({result.seconds:.1f}s)")

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator:
        """Yields ``advance(n)``; a rich bar for people, periodic JSON events with --log-json, nothing with --quiet."""
        if self.quiet or self.log_json:
            state = {"done": 0, "last": 0.0}

            def advance(n: int = 1) -> None:
                state["done"] += n
                if self.log_json and time.time() - state["last"] > 5.0:
                    state["last"] = time.time()
                    self.event("progress", task=description, done=state["done"], total=total)

            yield advance
            return
        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn()]
        with Progress(*cols, console=self.out, transient=False) as p:
            task = p.add_task(escape(description), total=total)
            yield lambda n=1: p.advance(task, n)
