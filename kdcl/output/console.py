"""Console output: rich on a terminal, short plain lines elsewhere (CI, files, sweeps)."""

from __future__ import annotations

import logging
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from rich.console import Console
from rich.logging import RichHandler

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
        job = sweep_job()
        if job is not None:  # jobs of a sweep may run side by side (hydra/launcher=joblib): say whose line
            record = logging.makeLogRecord(
                {**record.__dict__, "msg": f"[job {job}] {record.getMessage()}", "args": None}
            )
        self._inner.emit(record)


def sweep_job() -> int | None:
    """The number of the sweep job (``-m``) this process runs, or None outside a sweep."""
    if not HydraConfig.initialized():
        return None
    config = HydraConfig.get()
    return config.job.num if config.mode == RunMode.MULTIRUN else None
