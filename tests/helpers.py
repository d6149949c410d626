"""What the tests share: compose configs like the CLI does, run the CLI and capture what it
prints, compare resumed runs, stop a stage mid-way. (Fixtures and pytest's hooks are in
conftest.py.)"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdcl.config.options import CONF_DIR, distill_parts, section_option
from kdcl.config.schema import ControlConfig
from kdcl.train import engine
from kdcl.train.resume import STOP

# Small enough for seconds, big enough that the digits teacher learns something.
QUICK = ["trainer.epochs=2", "dataset.max_train_samples=600", "trainer.batch_size=32"]

# Settings whose training steps must not read the device (tests/test_sync_free.py on the
# CPU, tests/test_gpu_path.py under CUDA's sync check): each one's own step code.
STEP_SETTINGS = {
    "plain": ["curriculum=none"],
    "paced_weights": ["curriculum.type=paced", "curriculum.weight_start=0.2"],
    "self_paced": ["curriculum=self_paced"],
    "cached_teacher": ["distill.sample_weight=teacher_confidence", "distill.teacher_cache=views:2", "curriculum=none"],
    "dkd_ls": ["distill=dkd", "distill.logit_standardization=true", "curriculum=none"],
    "crd": ["distill=crd", "student=cnn_small", "curriculum=none"],
    "reviewkd": ["distill=reviewkd", "distill.warmup_epochs=1", "student=cnn_small", "curriculum=none"],
    "weighted_teachers": [
        "teachers=[cnn,mlp]",
        "distill.teacher_combine=weights",
        "distill.teacher_weights=[1,2]",
        "curriculum=none",
    ],
}


def compose_config(overrides: list[str], config_name: str = "config") -> dict[str, Any]:
    """The resolved config ``kdcl train OVERRIDES`` would run with, as plain containers.

    The stage cache is off unless the overrides turn it on: in-process tests train every stage.
    """
    if config_name == "config":
        overrides = ["cache=false", *overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``kdcl ARGS`` from ``cwd`` and capture its output, as ``python -m kdcl ARGS`` would
    give it: in this process (:func:`cli_in_process`; a new interpreter costs seconds a call),
    or with ``KDCL_TEST_SUBPROCESS=1`` in a subprocess."""
    if os.environ.get("KDCL_TEST_SUBPROCESS") == "1":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("HYDRA_FULL_ERROR", None)
        return subprocess.run(
            [sys.executable, "-m", "kdcl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    return cli_in_process(args, cwd)


def cli_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``kdcl.cli.main(args)`` from ``cwd``, its exit status and output as a subprocess's: the
    file descriptors 1 and 2 point at files meanwhile (so that what child processes print is
    caught too), an exception becomes exit status 1 with its traceback on stderr, and the
    process's state the command changes (working directory, logging handlers, torch threads,
    the sweep's failure list, Hydra's global state) is put back."""
    from hydra.core.global_hydra import GlobalHydra

    from kdcl.cli import main
    from kdcl.commands import failures

    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    saved_logging = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    saved = {"cwd": os.getcwd(), "argv": sys.argv[:], "threads": torch.get_num_threads(), "env": dict(os.environ)}
    streams = sys.stdout, sys.stderr
    os.environ.pop("HYDRA_FULL_ERROR", None)
    failures.failed.clear()
    GlobalHydra.instance().clear()
    code = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        for stream in streams:
            stream.flush()
        fds = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        try:
            os.chdir(cwd)
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            for fd in fds:
                os.close(fd)
            os.chdir(saved["cwd"])
            sys.argv = saved["argv"]
            torch.set_num_threads(saved["threads"])
            os.environ.clear()
            os.environ.update(saved["env"])
            for lg, handlers, level, propagate, disabled in saved_logging:
                lg.handlers[:], lg.level, lg.propagate, lg.disabled = handlers, level, propagate, disabled
            GlobalHydra.instance().clear()
            failures.failed.clear()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return subprocess.CompletedProcess(["kdcl", *args], code, stdout, stderr)


def control_config(name: str = "kd", **keys: Any) -> ControlConfig:
    """The control's keys of ``distill=NAME`` (its option over conf/base/distill.yaml), ``keys`` overriding them."""
    return distill_parts({**section_option("distill", name), **keys})[1]


TIMING = ["seconds", "samples_per_s", "max_memory_mb"]  # measurements of the machine


def comparable(run_dir: Path, table: str) -> pd.DataFrame:
    """A run's table without what measures the machine: what a resumed run must reproduce."""
    frame = pd.read_csv(run_dir / table)
    return frame.drop(columns=[c for c in [*TIMING, "checkpoint"] if c in frame.columns])


def stop_after(stage: str, step: int):
    """``engine.train_step`` that asks the run to stop (as SIGINT does) after ``stage``'s step ``step``."""
    real = engine.train_step

    def train_step(s, trainer, at, *args):
        real(s, trainer, at, *args)
        if s.name == stage and at == step:
            STOP.signum = signal.SIGINT

    return train_step
