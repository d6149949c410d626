"""Sweeps at scale: the launchers compose and run, and failed jobs are reported whichever
process ran them (the Optuna search, ``kdcl tune``: tests/test_tune.py)."""

from __future__ import annotations

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_cli import assert_clean_error

from kdcl.commands import failures
from kdcl.config.options import CONF_DIR

TINY = ["trainer.epochs=1", "dataset.max_train_samples=300"]


def hydra_node(*overrides: str):
    """The ``hydra`` node of the config ``kdcl train -m OVERRIDES`` would launch with."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm_gpu", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launchers_compose(launcher, target):
    node = hydra_node(f"hydra/launcher={launcher}")
    assert node.launcher._target_ == target
    if launcher == "slurm_gpu":
        assert node.launcher.gpus_per_node == 1 and node.launcher.timeout_min > 0 and node.launcher.nodes == 1


def test_cfg_hydra_shows_the_launcher(cli):
    result = cli("train", "hydra/launcher=joblib", "--cfg", "hydra")
    assert result.returncode == 0 and "JoblibLauncher" in result.stdout


@pytest.mark.slow  # its own processes
def test_joblib_jobs_share_one_teacher(cli, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        "train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "distill.alpha=0.5,0.9",
        *TINY,
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr
    alphas = [pd.read_csv(sweep / job / "distill" / "metrics.csv")["alpha"].iloc[0] for job in ("0", "1")]
    assert alphas == [0.5, 0.9]
    for job in ("0", "1"):  # the two jobs' lines interleave on the console: each names its job
        assert f"] [job {job}] distill: " in result.stderr
    logs = "".join((sweep / job / "train.log").read_text() for job in ("0", "1"))
    assert logs.count("stored teacher in") == 1 and logs.count("reused teacher from cache") == 1
    teachers = [
        pd.read_csv(sweep / job / "summary.csv").set_index("model").loc["teacher", "test_acc"] for job in ("0", "1")
    ]
    assert teachers[0] == teachers[1]


def test_failed_job_in_a_joblib_worker_fails_the_sweep(cli, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("train", "-m", "hydra/launcher=joblib", "distill.alpha=1.5,0.5", *TINY, f"hydra.sweep.dir={sweep}")
    assert_clean_error(result, "distill.alpha=1.5 is out of range", "1 job(s) failed", "job 0 (distill.alpha=1.5")
    assert result.returncode == 1
    assert (sweep / "1" / "summary.csv").is_file() and (sweep / "0" / "failed.txt").is_file()


def test_failure_records_belong_to_one_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(failures, "failed", [])
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "failed.txt").write_text("job 0 (seed=1): from an earlier sweep into this folder\n")
    callback = failures.FailedJobs()
    callback.on_multirun_start(config)
    assert not (tmp_path / "0" / "failed.txt").exists()
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "failed.txt").write_text("job 1 (seed=2): broke\n")
    callback.on_multirun_end(config)
    assert failures.failed == ["job 1 (seed=2): broke"]
