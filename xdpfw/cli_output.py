"""How the CLI shows things to people: rich tables, progress, and SI rates.

Tables have no borders, so a row still splits on whitespace for a quick `awk`; `--json` is the
form for scripts. A pipe gets a wide console: a row is never wrapped into two lines.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

PIPE_WIDTH = 1000


def console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:
        c = Console(stderr=stderr, highlight=False, width=PIPE_WIDTH)
    return c


def print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def table(rows: Iterable[Iterable], header: Iterable[str], right: Iterable[str] = ()) -> None:
    """Print rows under header; columns named in `right` (numbers) are right-aligned."""
    right = set(right)
    t = Table(box=None, pad_edge=False, header_style="bold")
    for h in header:
        t.add_column(h, no_wrap=True, justify="right" if h in right else "left")
    for r in rows:
        t.add_row(*("" if c is None else str(c) for c in r))
    console().print(t)


def si(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


class ImportProgress:
    """A rich progress bar on a terminal; one line per step otherwise (logs and CI keep a
    record, and a bar redrawn into a file is noise)."""

    def __init__(self, total: int, what: str, enabled: bool = True) -> None:
        self.total, self.what, self.enabled = total, what, enabled
        self.start = time.monotonic()
        self.bar: Progress | None = None
        err = console(stderr=True)
        if enabled and err.is_terminal:
            self.bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}/s"), TimeElapsedColumn(),
                                console=err, transient=False)
            self.task = self.bar.add_task(what, total=total, rate="0")
            self.bar.start()

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        rate = si(n / max(time.monotonic() - self.start, 1e-6))
        if self.bar is not None:
            self.bar.update(self.task, completed=n, rate=rate)
            return
        print(f"{n}/{self.total} {self.what} ({100 * n // self.total}%), {rate}/s",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
