"""The ``kdcl`` command: ``kdcl train|eval|bench|export|tune [Hydra overrides]`` and ``kdcl report PATH ...``.

Hydra parses ``sys.argv[1:]``, so the dispatcher takes the subcommand off first and
calls that subcommand's Hydra entry point with the rest (``--help``, ``--cfg job`` and
``-m`` keep working after the subcommand). Under torchrun every rank runs this command;
see :mod:`kdcl.distributed`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
from hydra._internal import utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.markup import escape

from kdcl import distributed
from kdcl.commands.failures import failed, record_failure
from kdcl.config.checks import composition_error
from kdcl.config.options import CONF_DIR
from kdcl.config.schema import BenchConfig, EvalConfig, ExportConfig, TrainConfig, TuneConfig
from kdcl.errors import KdclError
from kdcl.output.console import console
from kdcl.train.resume import Interrupted

log = logging.getLogger("kdcl")


# How long a rank other than 0 leaves the reporting of an error to rank 0.
RANK_REPORT_GRACE_S = 5.0


def _report(err: KdclError) -> None:
    """Print an error. The ranks of a distributed run usually meet the same error: rank 0
    prints it, and torchrun stops the others once one exits. Another rank prints its error
    (marked with its rank) only if it is still running ``RANK_REPORT_GRACE_S`` later; never
    a stop signal, which every rank honours at the same step."""
    where = ""
    if not distributed.is_main():
        if isinstance(err, Interrupted):
            return
        time.sleep(RANK_REPORT_GRACE_S)
        where = escape(f"[rank {os.environ.get('RANK')}] ")
    console.print(f"{where}[bold red]error:[/] {escape(err.what)}", highlight=False, soft_wrap=True)
    if err.fix:
        console.print(f"[bold]fix:[/] {escape(err.fix)}", highlight=False, soft_wrap=True)


def _guarded(job: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn a :class:`KdclError` into one message: exit 2 for a single run; in a sweep,
    record the failed job (see :mod:`kdcl.commands.failures`), let the others run, and exit 1 at
    the end (a failed job returns None)."""

    def task(cfg: DictConfig) -> Any:
        try:
            return job(cfg)
        except KdclError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            sweep = HydraConfig.get().mode == RunMode.MULTIRUN
            if sweep and isinstance(err, Interrupted):  # the whole sweep stops: resume it, not the job
                err.fix = (
                    f"run the same command again with hydra.sweep.dir={HydraConfig.get().sweep.dir}: "
                    "its finished jobs are not trained again, and this one resumes where it stopped"
                )
            _report(err)
            if sweep and not isinstance(err, Interrupted):
                record_failure(err)
                return None
            raise SystemExit(err.exit_code) from None

    return task


@contextmanager
def _composition_errors(schema: type) -> Iterator[None]:
    """Report a config Hydra cannot compose against the schema — ``trainer.epochs=abc``,
    ``trainer.epochz=3``, an experiment file setting either — as one message and exit 2.

    Hydra prints these itself, over several lines, in OmegaConf's terms ("could not be
    converted to Integer", "reference_type=TrainerConfig") and suggests ``+KEY`` for a typo.
    It catches every exception of a run in ``hydra._internal.utils.run_and_report``, so the
    check wraps the function that one is given (hydra-core is pinned < 1.4; tests cover it).
    Other errors, and every error under HYDRA_FULL_ERROR=1, stay Hydra's."""
    original = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        def reported() -> Any:
            try:
                return func()
            except ConfigCompositionException as exc:
                err = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else composition_error(exc, schema)
                if err is None:
                    raise
                _report(err)
                raise SystemExit(err.exit_code) from None

        return original(reported)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def _train(cfg: DictConfig) -> float:
    from kdcl.commands.train import (
        train_command,  # imported when run: torch is slow to import
    )

    return train_command(cfg)


def _eval(cfg: DictConfig) -> None:
    from kdcl.commands.eval import eval_command

    eval_command(cfg)


def _bench(cfg: DictConfig) -> None:
    from kdcl.commands.bench import bench_command

    bench_command(cfg)


def _export(cfg: DictConfig) -> None:
    from kdcl.commands.export import export_command

    export_command(cfg)


def _tune(cfg: DictConfig) -> None:
    from kdcl.commands.tune import tune_command  # imported when run: optuna is slow to import

    tune_command(cfg)


def report() -> None:
    """``kdcl report``: plain arguments (argparse), not a Hydra app."""
    from kdcl.commands.report import main as report_main

    try:
        report_main(sys.argv[1:])
    except KdclError as err:
        _report(err)
        raise SystemExit(2) from None


hydra_train = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_guarded(_train))
hydra_eval = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")(_guarded(_eval))
hydra_bench = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")(_guarded(_bench))
hydra_export = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")(_guarded(_export))
hydra_tune = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="tune")(_guarded(_tune))

SCHEMAS = {"train": TrainConfig, "eval": EvalConfig, "bench": BenchConfig, "export": ExportConfig, "tune": TuneConfig}
COMMANDS: dict[str, tuple[Callable[[], Any], str]] = {
    "train": (hydra_train, "teacher → baseline → curriculum → distill; writes metrics tables and summary.csv"),
    "eval": (hydra_eval, "test a checkpoint: kdcl eval checkpoint=PATH [dataset=...]; writes eval.csv"),
    "bench": (hydra_bench, "time naive KD loop vs kdcl (online, teacher cache) vs student alone; writes bench.csv"),
    "export": (hydra_export, "a checkpoint (or every model of a run) as ONNX or TorchScript, checked and timed"),
    "tune": (hydra_tune, "Optuna search (TPE, pruning) over conf/search/NAME.yaml; trials are train runs"),
    "report": (report, "one table over runs and sweeps: kdcl report PATH [PATH ...]; writes report.csv/.md, PNGs"),
}

USAGE = """usage: kdcl COMMAND [HYDRA OVERRIDES ...]   (kdcl report: kdcl report PATH [PATH ...]; kdcl --version)

commands:
{commands}

examples:
  kdcl train                                   # offline default: digits, every stage
  kdcl train +experiment=cifar10_cpu           # CIFAR-10 from ../shared/data/cifar10
  kdcl train -m distill.alpha=0.1,0.9 distill.temperature=1,4
  kdcl tune tune.trials=20                     # search alpha and T (conf/search/kd.yaml), with pruning
  kdcl report outputs/multirun/DATE/TIME       # table, alpha × T heatmap, seeds, curves
  kdcl eval checkpoint=outputs/train/.../distill/best.pt
  kdcl bench +experiment=cifar10_cpu           # images/s: naive loop vs kdcl vs teacher cache
  kdcl export checkpoint=outputs/train/.../distill/best.pt format=onnx
  kdcl export run=outputs/train/DATE/TIME      # every model: size, latency, ratios vs the teacher
  kdcl train --help                            # config groups and options
  kdcl train --cfg job                         # print the composed config
"""


def _check_writable(overrides: list[str]) -> None:
    """Refuse an output directory that cannot be created, before Hydra tries (and prints a traceback)."""
    dirs = [a.split("=", 1)[1] for a in overrides if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for target in dirs or ["outputs"]:
        path = Path(target).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise KdclError(
                f"cannot create the output directory {path}: {existing} is not a writable directory",
                fix="choose a writable hydra.run.dir (or hydra.sweep.dir), or run from a writable directory",
            )


def _join_ranks(name: str, rest: list[str]) -> list[str]:
    """Under torchrun: join the other ranks before Hydra starts (so that they agree on the
    run directory's timestamp). Ranks other than 0 write no ``.hydra/`` and no log file,
    and print warnings only. Returns the Hydra arguments."""
    if name != "train":
        raise KdclError(f"kdcl {name} runs in one process, not under torchrun", fix=f"run kdcl {name} without torchrun")
    if "-m" in rest or "--multirun" in rest:
        raise KdclError(
            "a sweep (-m) cannot run under torchrun",
            fix="run kdcl train -m ... trainer.devices=N without torchrun: each job starts its own N processes",
        )
    distributed.init_from_env()
    if distributed.is_main():
        return rest
    return [
        *rest,
        "hydra.output_subdir=null",
        "hydra.job_logging.root.level=WARNING",
        "hydra.job_logging.root.handlers=[console]",
        "~hydra.job_logging.handlers.file",
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = "\n".join(f"  {name:<7}{text}" for name, (_, text) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(commands=commands))
        return
    if argv[0] in ("-V", "--version"):
        print(f"kdcl {metadata.version('kdcl')}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _report(KdclError(f"unknown command {name!r}", fix=f"use one of: {', '.join(COMMANDS)} (see kdcl --help)"))
        raise SystemExit(2)
    try:
        _check_writable(rest)
        if distributed.launched():
            rest = _join_ranks(name, rest)
    except KdclError as err:
        _report(err)
        raise SystemExit(err.exit_code) from None
    sys.argv = [f"kdcl {name}", *rest]
    try:
        if name in SCHEMAS:
            with _composition_errors(SCHEMAS[name]):
                COMMANDS[name][0]()
        else:
            COMMANDS[name][0]()
    finally:
        distributed.shutdown()
    if failed:
        console.print(f"[bold red]{len(failed)} job(s) failed:[/]", highlight=False)
        for line in failed:
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
        raise SystemExit(1)
