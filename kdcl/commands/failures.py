"""Failed jobs of a sweep, whichever launcher ran them.

A launcher may run a job in this process (basic), in a worker process (joblib) or on
another machine (Slurm), so a failure is recorded as a file: a job that stops with a
:class:`KdclError` writes ``failed.txt`` into its own output folder. The
:class:`FailedJobs` callback, which Hydra runs in the process that launched the sweep,
clears old records when the sweep starts and collects the new ones when it ends.

A trial that ``kdcl tune`` stopped early (pruned) failed in nothing: its folder holds
``pruned.json`` instead (the stage, epoch and best validation accuracy where it stopped),
which ``kdcl report`` shows as a pruned row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdcl.errors import KdclError

FAILED_FILE = "failed.txt"
PRUNED_FILE = "pruned.json"

failed: list[str] = []  # "job N (overrides): what went wrong", filled when a sweep ends


def record_failure(err: KdclError) -> None:
    """Write the running job's failure, one line, into its output folder."""
    hc = HydraConfig.get()
    line = f"job {hc.job.num} ({' '.join(hc.overrides.task)}): {err.what}"
    (Path(hc.runtime.output_dir) / FAILED_FILE).write_text(line + "\n")


def failure_records(sweep_dir: Path) -> list[Path]:
    """The failure records under a sweep folder, oldest first."""
    return sorted(sweep_dir.rglob(FAILED_FILE), key=lambda p: p.stat().st_mtime)


class FailedJobs(Callback):
    """Collect the sweep's failure records into :data:`failed` (named in ``hydra.callbacks``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for old in failure_records(Path(config.hydra.sweep.dir)):  # from an earlier sweep into this folder
            old.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed.extend(p.read_text().strip() for p in failure_records(Path(config.hydra.sweep.dir)))
