"""The ``kdcl`` command: ``kdcl train|eval [Hydra overrides]``.

Hydra parses ``sys.argv[1:]``, so the dispatcher takes the subcommand off first and
calls that subcommand's Hydra entry point with the rest (``--help``, ``--cfg job`` and
``-m`` keep working after the subcommand).
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from rich.markup import escape

from kdcl.console import console
from kdcl.errors import KdclError

log = logging.getLogger("kdcl")


def _conf_dir() -> str:
    """The shipped configs: ``kdcl.conf`` when installed, the source ``conf/`` otherwise."""
    try:
        return str(resources.files("kdcl.conf"))
    except ModuleNotFoundError:  # the source tree shadows the installed package
        return str(Path(__file__).resolve().parents[1] / "conf")


CONF_DIR = _conf_dir()
_failed_jobs: list[str] = []


def _report(err: KdclError) -> None:
    console.print(f"[bold red]error:[/] {escape(err.what)}", highlight=False, soft_wrap=True)
    if err.fix:
        console.print(f"[bold]fix:[/] {escape(err.fix)}", highlight=False, soft_wrap=True)


def _guarded(job: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn a :class:`KdclError` into one message: exit 2 for a single run; in a sweep,
    record the failed job, let the others run, and exit 1 at the end."""

    def task(cfg: DictConfig) -> Any:
        try:
            return job(cfg)
        except KdclError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _report(err)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                _failed_jobs.append(f"job {HydraConfig.get().job.num} ({' '.join(HydraConfig.get().overrides.task)})")
                return None
            raise SystemExit(2) from None

    return task


def _output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers; a required value left as ``???`` is an error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise KdclError(f"{err.full_key} is required but has no value", fix=f"pass {err.full_key}=VALUE") from None


def _train(cfg: DictConfig) -> float:
    from kdcl.config import validate
    from kdcl.stages import run_pipeline

    validate(cfg)
    summary = run_pipeline(_plain(cfg), _output_dir())
    log.info("wrote %s", _output_dir() / "summary.csv")
    student = f"gen_{cfg.born_again.generations}" if cfg.born_again.generations else "distill"
    return float(summary.set_index("model").loc[student, "best_val_acc"])


def _eval(cfg: DictConfig) -> None:
    from kdcl.evaluate import run_eval

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise KdclError("no checkpoint given", fix="kdcl eval checkpoint=PATH/TO/best.pt")
    dataset = _plain(cfg)["dataset"] if cfg.get("dataset") else None
    run_eval(cfg.checkpoint, dataset, cfg.device, cfg.batch_size, _output_dir())
    log.info("wrote %s", _output_dir() / "eval.csv")


train = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_guarded(_train))
evaluate = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")(_guarded(_eval))

COMMANDS: dict[str, tuple[Callable[[], Any], str]] = {
    "train": (train, "teacher → curriculum → baseline → distill; writes metrics tables and summary.csv"),
    "eval": (evaluate, "test a checkpoint: kdcl eval checkpoint=PATH [dataset=...]; writes eval.csv"),
}

USAGE = """usage: kdcl COMMAND [HYDRA OVERRIDES ...]

commands:
{commands}

examples:
  kdcl train                                   # offline default: digits, every stage
  kdcl train +experiment=cifar10_cpu           # CIFAR-10 from ../shared/data/cifar10
  kdcl train -m distill.alpha=0.1,0.9 distill.temperature=1,4
  kdcl eval checkpoint=outputs/train/.../distill/best.pt
  kdcl train --help                            # config groups and options
  kdcl train --cfg job                         # print the composed config
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = "\n".join(f"  {name:<7}{text}" for name, (_, text) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(commands=commands))
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _report(KdclError(f"unknown command {name!r}", fix=f"use one of: {', '.join(COMMANDS)} (see kdcl --help)"))
        raise SystemExit(2)
    sys.argv = [f"kdcl {name}", *rest]
    COMMANDS[name][0]()
    if _failed_jobs:
        console.print(f"[bold red]{len(_failed_jobs)} job(s) failed:[/] " + "; ".join(_failed_jobs))
        raise SystemExit(1)
