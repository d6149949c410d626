"""Loggers: where a run's numbers go, chosen with ``logger=[csv,tensorboard,mlflow,wandb]``.

Every logger of the ``logger`` config group is an entry of :data:`LOGGERS` (a class
registered with its name) and a file of ``conf/logger/``, whose keys are the class's
keyword arguments. A run's loggers (:func:`open_loggers`) receive, in this order:

- the resolved config, as hyperparameters (:meth:`Logger.log_config`);
- per stage and epoch, the row of ``<stage>/metrics.csv``: each number under the key
  ``<stage>/<column>``, at the optimizer step the epoch ended on (:meth:`Logger.log_epoch`);
- at the end of the run, the summary table (:meth:`Logger.log_summary`) and the run's
  figures (:meth:`Logger.log_figures`), drawn only when a logger takes them (trait ``figures``).

``csv`` writes each stage's ``metrics.csv`` (the default; ``kdcl report`` and the stage
cache read it). The others are experiment trackers, one tracker run per job; the jobs of a
sweep share their sweep directory as a group (:class:`TrackedRun`). A tracker's package is
the ``trackers`` extra: a logger asked for but not installed stops the run before it trains
(:func:`check_loggers`). Under DDP only rank 0 logs.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import netrc
import numbers
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import yaml

from kdcl import distributed
from kdcl.errors import KdclError
from kdcl.output.tables import append_row, markdown_table
from kdcl.registry import Registry

log = logging.getLogger(__name__)

# ``package``: the module a logger needs (None: nothing beyond kdcl's own dependencies).
# ``figures``: whether it stores the run's figures (a run draws them only for such a logger).
LOGGERS: Registry[type[Logger]] = Registry("logger", traits={"package": None, "figures": False})
EXTRA = "pip install 'kdcl[trackers]'"


@dataclass(frozen=True)
class TrackedRun:
    """The job a logger records: its directory, its name, and its sweep (None for a single run).

    A job of a sweep is a folder of the sweep directory, which holds Hydra's ``multirun.yaml``."""

    out: Path
    config: dict[str, Any]

    @property
    def sweep(self) -> Path | None:
        return self.out.parent if (self.out.parent / "multirun.yaml").is_file() else None

    @property
    def name(self) -> str:
        """``<sweep folder>/<job>`` for a job of a sweep, else the run folder's name."""
        return f"{self.sweep.name}/{self.out.name}" if self.sweep else self.out.name

    @property
    def home(self) -> Path:
        """Where local tracker stores go: the sweep directory, shared by its jobs, else the run's."""
        return self.sweep or self.out


class Logger:
    """What a logger records. Each method does nothing unless the logger records that."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The resolved config, once, before any stage trains."""

    def log_epoch(self, stage: str, out_dir: Path, row: dict[str, Any]) -> None:
        """The metrics row of one epoch of ``stage`` (its folder ``out_dir``)."""

    def log_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """Metrics of ``stage`` at optimizer step ``step`` (``trainer.log_every_steps``)."""

    def log_past_epochs(self, stage: str, out_dir: Path, rows: list[dict[str, Any]]) -> None:
        """Rows of ``stage`` from its ``metrics.csv`` that trained before this run (copied from
        the stage cache, or trained before a resume), each as :meth:`log_epoch`."""
        for row in rows:
            self.log_epoch(stage, out_dir, row)

    def log_summary(self, summary: pd.DataFrame) -> None:
        """The run's summary table (``summary.csv``), one row per model."""

    def log_figures(self, paths: list[Path]) -> None:
        """PNG files, as the run's artifacts."""

    def close(self, failed: bool) -> None:
        """End the tracker run (``failed``: the run stopped on an error)."""


class Loggers:
    """The loggers of one run, each called in turn (none on ranks other than 0)."""

    def __init__(self, loggers: dict[str, Logger]):
        self.loggers = loggers

    @property
    def take_figures(self) -> bool:
        return any(LOGGERS.trait(name, "figures") for name in self.loggers)

    def log_config(self, config: dict[str, Any]) -> None:
        for logger in self.loggers.values():
            logger.log_config(config)

    def log_epoch(self, stage: str, out_dir: Path, row: dict[str, Any]) -> None:
        for logger in self.loggers.values():
            logger.log_epoch(stage, out_dir, row)

    def log_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers.values():
            logger.log_step(stage, step, metrics)

    def log_past_epochs(self, stage: str, out_dir: Path, before_epoch: int | None = None) -> None:
        """The rows of ``out_dir/metrics.csv`` (those before ``before_epoch``): a stage that
        trained before this run, for the trackers of this run."""
        path = out_dir / "metrics.csv"
        if not self.loggers or not path.is_file():
            return
        rows = pd.read_csv(path)
        if before_epoch is not None:
            rows = rows[rows["epoch"] < before_epoch]
        for logger in self.loggers.values():
            logger.log_past_epochs(stage, out_dir, rows.to_dict("records"))

    def log_summary(self, summary: pd.DataFrame) -> None:
        for logger in self.loggers.values():
            logger.log_summary(summary)

    def log_figures(self, paths: list[Path]) -> None:
        for logger in self.loggers.values():
            logger.log_figures(paths)

    def close(self, failed: bool) -> None:
        for logger in self.loggers.values():
            logger.close(failed)


def check_loggers(settings: dict[str, dict[str, Any]]) -> None:
    """Refuse, before anything trains, a logger that is not registered, a setting it does
    not take, or a logger whose package is not installed."""
    for name, keys in settings.items():
        factory = LOGGERS.get(name)
        accepted = set(inspect.signature(factory).parameters) - {"run"}
        unknown = sorted(set(keys) - accepted)
        if unknown:
            raise KdclError(
                f"logger.{name} has no setting {', '.join(unknown)}",
                fix=f"the settings of logger {name}: {', '.join(sorted(accepted)) or 'none'}",
            )
        package = LOGGERS.trait(name, "package")
        if package is not None:
            try:
                importlib.import_module(package)
            except ImportError:
                raise KdclError(
                    f"logger={name} needs the {package} package, which is not installed",
                    fix=f"{EXTRA} (or leave {name} out of logger=[...])",
                ) from None


@contextmanager
def open_loggers(settings: dict[str, dict[str, Any]], run: TrackedRun) -> Iterator[Loggers]:
    """The run's loggers (:func:`check_loggers` first), given its config; closed at the end,
    as failed when the run stops on an error. On DDP ranks other than 0: none."""
    if not distributed.is_main():
        yield Loggers({})
        return
    check_loggers(settings)
    loggers = Loggers({})
    failed = True
    try:
        for name, keys in settings.items():
            loggers.loggers[name] = start_logger(name, run, keys)
        loggers.log_config(run.config)
        yield loggers
        failed = False
    finally:
        loggers.close(failed)


def start_logger(name: str, run: TrackedRun, keys: dict[str, Any]) -> Logger:
    """Logger ``name`` with its settings, its tracker run started; a tracker that cannot
    start one (a bad setting, a store it cannot reach) is one message."""
    try:
        return LOGGERS.create(name, run, **keys)
    except KdclError:
        raise
    except Exception as err:  # each tracker library raises its own errors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KdclError(
            f"logger={name} could not start its run: {reason}",
            fix=f"check logger.{name}.* and the tracker's environment variables, or leave {name} out of logger=[...]",
        ) from err


# --------------------------------------------------------------------------- what loggers send
def numbers_of(row: dict[str, Any], prefix: str, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite numbers of ``row`` (not booleans) as ``{prefix}/{column}``, but ``skip``."""
    return {
        f"{prefix}/{k}": float(v)
        for k, v in row.items()
        if k not in skip and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    }


def epoch_metrics(stage: str, row: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """An epoch's row as ``(step, {<stage>/<column>: value})``; the step is the row's ``step``."""
    return int(row["step"]), numbers_of(row, stage, skip=("step",))


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The summary's numbers as ``{summary/<model>/<column>: value}``."""
    metrics: dict[str, float] = {}
    for row in summary.to_dict("records"):
        metrics.update(numbers_of(row, f"summary/{row['model']}"))
    return metrics


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as ``{dotted.key: value}``: numbers, strings and booleans as they are,
    None and lists as text (what hyperparameter tables hold)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def config_text(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


# --------------------------------------------------------------------------- the loggers
@LOGGERS.register("csv")
class CsvLogger(Logger):
    """Each stage's ``<stage>/metrics.csv``, rewritten atomically after every epoch."""

    def __init__(self, run: TrackedRun | None = None):
        """A table needs nothing of the run: each stage's folder comes with its rows."""

    def log_epoch(self, stage: str, out_dir: Path, row: dict[str, Any]) -> None:
        append_row(out_dir / "metrics.csv", row)

    def log_past_epochs(self, stage: str, out_dir: Path, rows: list[dict[str, Any]]) -> None:
        """Nothing: they are rows of its table already."""


CSV_ONLY = Loggers({"csv": CsvLogger()})  # the default of code that trains without a config (tests, scripts)


@LOGGERS.register("tensorboard", package="tensorboard", figures=True)
class TensorBoardLogger(Logger):
    """TensorBoard event files in ``<run>/<dir>``: scalars per stage, the config (text and
    hyperparameters), the summary (text and ``summary/...`` scalars) and the figures (images)."""

    def __init__(self, run: TrackedRun, dir: str = "tensorboard"):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.out / dir))

    def log_config(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", f"```yaml\n{config_text(config)}```")
        for summary in hparams(flat_config(config), {}):
            self.writer._get_file_writer().add_summary(summary)

    def log_epoch(self, stage: str, out_dir: Path, row: dict[str, Any]) -> None:
        step, metrics = epoch_metrics(stage, row)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{stage}/step/{key}", value, step)

    def log_summary(self, summary: pd.DataFrame) -> None:
        self.writer.add_text("summary", markdown_table(summary))
        for key, value in summary_metrics(summary).items():
            self.writer.add_scalar(key, value, 0)

    def log_figures(self, paths: list[Path]) -> None:
        from PIL import Image

        for path in paths:
            with Image.open(path) as image:
                self.writer.add_image(f"figures/{path.stem}", np.asarray(image.convert("RGB")), dataformats="HWC")

    def close(self, failed: bool) -> None:
        self.writer.close()


@LOGGERS.register("mlflow", package="mlflow", figures=True)
class MlflowLogger(Logger):
    """One MLflow run per job, in ``experiment``, tagged with its run directory and sweep.

    The store: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local file store,
    ``mlruns/`` of the run directory (a sweep: of the sweep directory, shared by its jobs).
    Metrics per stage, the config as parameters, the summary as ``summary/...`` metrics and
    ``summary.csv``, the figures as artifacts (``figures/``)."""

    def __init__(self, run: TrackedRun, experiment: str = "kdcl", tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run.home / "mlruns").resolve().as_uri()
        if urlparse(uri).scheme == "file":  # MLflow 3 keeps the file store behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        tags = {"kdcl.run_dir": str(run.out.resolve())}
        if run.sweep:
            tags |= {"kdcl.sweep": str(run.sweep.resolve()), "kdcl.job": run.out.name}
        self.run_id = self.client.create_run(self._experiment_id(experiment), run_name=run.name, tags=tags).info.run_id
        self.summary_dir = run.out
        log.info("mlflow: run %s in experiment %s at %s", self.run_id, experiment, uri)

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, creating it; jobs of a sweep running at once may race to create it."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another job created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flat_config(config).items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[first : first + 100])
        self.client.log_text(self.run_id, config_text(config), "config.yaml")

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_epoch(self, stage: str, out_dir: Path, row: dict[str, Any]) -> None:
        step, metrics = epoch_metrics(stage, row)
        self._log_metrics(metrics, step)

    def log_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        self._log_metrics({f"{stage}/step/{key}": value for key, value in metrics.items()}, step)

    def log_summary(self, summary: pd.DataFrame) -> None:
        self._log_metrics(summary_metrics(summary), 0)
        self.client.log_text(self.run_id, summary.to_csv(index=False), "summary.csv")

    def log_figures(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), "figures")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def wandb_logged_in() -> bool:
    """Whether W&B has credentials here: ``WANDB_API_KEY``, or a netrc entry (``wandb login``)
    for its host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@LOGGERS.register("wandb", package="wandb", figures=True)
class WandbLogger(Logger):
    """One W&B run per job in ``project``, grouped by its sweep directory, its files in
    ``<run>/wandb/``. ``mode``: online, offline or disabled; None: ``WANDB_MODE``, else
    online when logged in and offline otherwise (``wandb sync`` uploads an offline run).

    Each stage counts its own steps (``<stage>/step``, W&B's x-axis for ``<stage>/*``).
    The config is the run's config, the summary the run summary's ``summary/...`` keys and
    a table, the figures images."""

    def __init__(self, run: TrackedRun, project: str = "kdcl", entity: str | None = None, mode: str | None = None):
        import wandb

        mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,  # type: ignore[arg-type]  # any other mode is wandb's error to report
            dir=str(run.out),
            name=run.name,
            group=str(run.sweep.resolve()) if run.sweep else None,
            job_type="train",
            config=run.config,
        )
        self.stages: set[str] = set()
        log.info("wandb: run %s (%s) in %s", self.run.id, mode, run.out / "wandb")

    def log_epoch(self, stage: str, out_dir: Path, row: dict[str, Any]) -> None:
        step, metrics = epoch_metrics(stage, row)
        if stage not in self.stages:
            self.run.define_metric(f"{stage}/step", hidden=True)
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({f"{stage}/step": step, **metrics})

    def log_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        self.log_epoch(stage, Path(), {"step": step, **{f"step/{key}": value for key, value in metrics.items()}})

    def log_summary(self, summary: pd.DataFrame) -> None:
        import wandb

        self.run.summary.update(summary_metrics(summary))
        self.run.log({"summary_table": wandb.Table(dataframe=summary.astype(object).where(summary.notna(), None))})

    def log_figures(self, paths: list[Path]) -> None:
        import wandb

        self.run.log({f"figures/{path.stem}": wandb.Image(str(path)) for path in paths})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
