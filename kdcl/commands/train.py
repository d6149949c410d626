"""``kdcl train``: check the config, then run its scenario in this process or as
``trainer.devices`` DDP processes, with the loggers of ``logger=[...]``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdcl import distributed
from kdcl.commands.job import output_dir, plain_config, swept_values
from kdcl.commands.report import run_figures
from kdcl.config.checks import validate
from kdcl.config.options import STUDENT, TEACHER, stage_overrides, stage_recipe
from kdcl.errors import KdclError
from kdcl.output.trackers import Loggers, TrackedRun, check_loggers, open_loggers
from kdcl.scenarios import REGISTERED_NAMES, SCENARIOS, Scenario
from kdcl.train.engine import EpochHook, resolve_device
from kdcl.train.resume import run_folder_lock
from kdcl.trust import check_saved_config

log = logging.getLogger("kdcl")


def train_command(cfg: DictConfig) -> float:
    """``kdcl train``: validate, then run the scenario (or launch its DDP processes); the objective."""
    out = output_dir()
    if cfg.resume:
        out = Path(cfg.resume)
        saved = out / ".hydra" / "config.yaml"
        if not saved.is_file():
            raise KdclError(
                f"resume={cfg.resume}: no kdcl run there ({saved} is missing)",
                fix="pass the run directory of an earlier kdcl train (the one holding summary.csv or teacher/)",
            )
        saved_cfg = cast(DictConfig, OmegaConf.load(saved))
        check_saved_config(
            cast(dict[str, Any], OmegaConf.to_container(saved_cfg)),
            cast(dict[str, Any], OmegaConf.to_container(cfg)),
            str(saved),
        )
        log.info("resuming the run in %s with its own config", out)
        cfg = saved_cfg
    validate(cfg, registries=REGISTERED_NAMES)
    plain = plain_config(cfg)
    check_loggers(loggers_of(plain))
    devices = cfg.trainer.get("devices", 1)  # absent from configs saved before it existed
    for role in (TEACHER, STUDENT):
        key = f"stages.{role}.batch_size" if "batch_size" in stage_overrides(plain, role) else "trainer.batch_size"
        distributed.check_processes(devices, stage_recipe(plain, role)["batch_size"], key)
    if devices > 1 and not distributed.active():
        launch(cfg, devices)
        return objective(plain, pd.read_csv(out / "summary.csv"))
    return train_here(plain, out, job_columns=swept_values())


def scenario_of(cfg: dict[str, Any]) -> Scenario:
    """The config's scenario (``scenario.name``; ``standard`` in configs saved before it existed)."""
    return SCENARIOS.get(cfg.get("scenario", {}).get("name", "standard"))


def loggers_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config's loggers (``logger``; csv alone in configs saved before it existed)."""
    return cfg.get("logger", {"csv": {}})


def objective(cfg: dict[str, Any], summary: pd.DataFrame) -> float:
    """What a search maximises: the validation accuracy of the scenario's objective row."""
    return float(summary.set_index("model").loc[scenario_of(cfg).objective(cfg), "best_val_acc"])


def train_here(
    cfg: dict[str, Any], out: Path, on_epoch: EpochHook | None = None, job_columns: dict[str, Any] | None = None
) -> float:
    """Run the scenario of the checked, plain config ``cfg`` in this process into ``out``,
    each epoch's metrics to its loggers (``on_epoch`` also sees each epoch of each stage;
    ``job_columns`` go into the summary, a sweep job's swept keys); the objective."""
    distributed.agree_on_run_dir(out)
    with run_folder_lock(out), open_loggers(loggers_of(cfg), TrackedRun(out, cfg)) as run_loggers:
        summary = scenario_of(cfg).run(cfg, out, run_loggers, on_epoch, job_columns)
        log_results(run_loggers, summary, out)
    log.info("wrote %s", out / "summary.csv")
    return objective(cfg, summary)


def log_results(loggers: Loggers, summary: pd.DataFrame, out: Path) -> None:
    """The end of a run for its loggers: the summary table, and the run's figures (drawn
    only when a logger stores them): the learning curves of its stages and any PNG the
    scenario wrote."""
    loggers.log_summary(summary)
    if loggers.take_figures:
        loggers.log_figures(run_figures(out))


def launch(cfg: DictConfig, devices: int) -> None:
    """``trainer.devices=N``: run this job as N DDP processes on this machine (torchrun's
    standalone mode), with the same overrides, into this job's directory (whose ``.hydra/``
    this process has written), and wait for them."""
    if resolve_device(cfg.trainer.device).type == "cuda" and devices > torch.cuda.device_count():
        raise KdclError(
            f"trainer.devices={devices}, but this machine has {torch.cuda.device_count()} GPU(s)",
            fix="set trainer.devices to at most the number of GPUs, or trainer.device=cpu",
        )
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    flags = [f"--config-dir={source.path}" for source in hc.runtime.config_sources if source.provider == "command-line"]
    if hc.job.config_name != "config":
        flags.append(f"--config-name={hc.job.config_name}")
    quoted = f"'{run_dir}'" if "'" not in run_dir else f'"{run_dir}"'
    log.info("training with %d processes (torchrun, standalone) into %s", devices, run_dir)
    code = distributed.launch(
        devices, ["train", *flags, *hc.overrides.task, f"hydra.run.dir={quoted}", "hydra.output_subdir=null"]
    )
    if code and code < 128 and hc.mode == RunMode.MULTIRUN:  # a failed job: the sweep goes on
        raise KdclError(f"the job's {devices} processes stopped with exit code {code} (the error is printed above)")
    if code:
        raise SystemExit(code)
