"""Console output: rich on a terminal, short plain lines elsewhere (CI, files, sweeps)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from kdcl import distributed

console = Console(stderr=True)


def interactive() -> bool:
    return console.is_terminal and not console.is_dumb_terminal


class ConsoleHandler(logging.Handler):
    """The console log handler named in ``conf/hydra/job_logging/kdcl.yaml``.

    On a terminal it renders through rich; otherwise it writes one plain line per record.
    """

    def __init__(self) -> None:
        super().__init__()
        if interactive():
            self._inner: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        else:
            self._inner = logging.StreamHandler(sys.stderr)
            self._inner.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self._inner.emit(record)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """Yield an ``advance()`` callable; a rich bar on a terminal (rank 0's, under DDP), a no-op elsewhere."""
    if not interactive() or not distributed.is_main():
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
