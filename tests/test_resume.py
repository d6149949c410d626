"""Crash, kill and signal resistance: resume, atomic artifacts, safe checkpoint loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import QUICK, comparable, compose_config, stop_after

from kdcl.scenarios.standard import run_pipeline
from kdcl.train import engine
from kdcl.train.resume import Interrupted

# Enough steps per epoch that a kill lands inside a stage, few enough to stay quick.
ARGS = [
    "trainer.epochs=3",
    "dataset.max_train_samples=900",
    "trainer.batch_size=16",
    "trainer.checkpoint_every_steps=7",
    "distill=ctkd",
    "curriculum=self_paced",
    "cache=false",
]  # resume alone, not the stage cache


def start(run_dir: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdcl", "train", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"finished before {path} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    proc = start(root / "run", root)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_when",
    ["teacher/resume.pt", "curriculum/pacing.csv", "distill/metrics.csv"],
    ids=["mid-teacher", "stage-boundary", "mid-distill"],
)
def test_sigkill_then_rerun_gives_the_same_results(reference, tmp_path, kill_when):
    run_dir = tmp_path / "run"
    proc = start(run_dir, tmp_path)
    wait_for(run_dir / kill_when, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.csv").exists()
    for csv in run_dir.rglob("*.csv"):  # whatever was written is whole
        pd.read_csv(csv)
    again = start(run_dir, tmp_path)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "not trained again" in out or "resuming" in out
    pd.testing.assert_frame_equal(comparable(reference, "summary.csv"), comparable(run_dir, "summary.csv"))
    for stage in ("teacher", "baseline", "distill"):  # one row per epoch, no duplicates, same values
        pd.testing.assert_frame_equal(
            comparable(reference, f"{stage}/metrics.csv"), comparable(run_dir, f"{stage}/metrics.csv")
        )
    assert not list(run_dir.rglob("resume.pt"))


@pytest.mark.slow
def test_sigterm_saves_and_exits_and_resume_finishes(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, tmp_path)
    wait_for(run_dir / "baseline" / "metrics.csv", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM" in out and f"resume={run_dir}" in out and "Traceback" not in out
    assert (run_dir / "baseline" / "resume.pt").is_file()
    resumed = subprocess.run(
        [sys.executable, "-m", "kdcl", "train", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume-log'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(comparable(reference, "summary.csv"), comparable(run_dir, "summary.csv"))


@pytest.mark.parametrize(
    "distill",
    [
        ["distill.input_noise=0.1", "distill.teacher_noise=0.5"],
        ["distill=crd", "distill.negatives=64", "student=cnn_small"],
        ["distill=mlkd"],
        ["trainer.mix.mixup=0.2", "trainer.mix.cutmix=1.0"],
        ["trainer.amp=fp16", "trainer.grad_clip_norm=0.5", "trainer.ema_decay=0.9"],
    ],
    ids=["noise", "crd", "mlkd", "mix", "fp16_clipped_ema"],
)
def test_stateful_distillation_resumes_exactly(tmp_path, monkeypatch, distill):
    """What a distillation carries from step to step is part of the resume state: the noise
    generator of distill.input_noise / teacher_noise, CRD's memory banks and normalisers,
    MLKD's strong views, the batch mixes (drawn from the seed and the step) and fp16's loss
    scale (with clipping, which unscales the gradients first) and the weights' moving average."""
    cfg = compose_config(
        [
            *QUICK,
            "dataset.max_train_samples=300",
            *distill,
            "baseline=false",
            "curriculum=none",
            "cache=true",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    reference = tmp_path / "reference"
    run_pipeline(cfg, reference)  # the teacher trains once: the second run takes it from the cache
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", stop_after("distill", 12))  # 9 steps an epoch: mid-way through epoch 2
        with pytest.raises(Interrupted):
            run_pipeline(cfg, run_dir)
    assert (run_dir / "distill" / "resume.pt").is_file()
    run_pipeline(cfg, run_dir)
    for table in ("summary.csv", "distill/metrics.csv"):
        pd.testing.assert_frame_equal(comparable(reference, table), comparable(run_dir, table))


def test_interrupt_in_a_nested_stage_names_the_run_dir(tmp_path, monkeypatch):
    """SIGINT while curriculum/self_taught trains: the hint names the run directory."""
    cfg = compose_config([*QUICK, "trainer.epochs=1", "baseline=false", "curriculum.scorer=self_taught"])
    monkeypatch.setattr(engine, "train_step", stop_after("curriculum/self_taught", 3))
    with pytest.raises(Interrupted) as stopped:
        run_pipeline(cfg, tmp_path)
    assert (
        stopped.value.fix
        == f"run the same command again with hydra.run.dir={tmp_path}, or: kdcl train resume={tmp_path}"
    )
    assert str(tmp_path / "curriculum" / "self_taught" / "resume.pt") in stopped.value.what
    assert (tmp_path / "curriculum" / "self_taught" / "resume.pt").is_file()


def test_rerun_with_other_config_is_refused(cli, tmp_path):
    run_dir = tmp_path / "run"
    first = cli("train", *QUICK, "trainer.epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    result = cli("train", *QUICK, "trainer.epochs=1", "distill.alpha=0.5", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "different config" in result.stderr and "Traceback" not in result.stderr
    assert "distill" in result.stderr  # names the key that differs


def test_resume_of_a_non_run_is_a_clear_error(cli, tmp_path):
    result = cli("train", f"resume={tmp_path}", f"hydra.run.dir={tmp_path / 'log'}")
    assert result.returncode == 2 and "no kdcl run there" in result.stderr


class _Payload:
    """Unpickling this runs code: it would create the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


@pytest.mark.parametrize("command", ["eval", "teacher"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(cli, tmp_path, command):
    sentinel, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": "kdcl-checkpoint/1", "state_dict": _Payload(sentinel)}, evil)
    assert not sentinel.exists()
    args = (
        ["eval", f"checkpoint={evil}"]
        if command == "eval"
        else ["train", f"teacher.checkpoint={evil}", "trainer.epochs=1"]
    )
    result = cli(*args, f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    assert "safe loading refuses" in result.stderr and "Traceback" not in result.stderr
    assert not sentinel.exists()


def test_plain_state_dict_loads_with_model_named(cli, tmp_path):
    from kdcl.models import create_model

    model = create_model("cnn", num_classes=10, input_shape=(1, 8, 8), width=8)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    ok = cli(
        "eval",
        f"checkpoint={tmp_path / 'plain.pth'}",
        "model=cnn",
        "model_kwargs={width: 8}",
        "dataset=digits",
        f"hydra.run.dir={tmp_path / 'ok'}",
    )
    assert ok.returncode == 0, ok.stderr
    assert pd.read_csv(tmp_path / "ok" / "eval.csv")["stage"].iloc[0] == "state_dict"
    unnamed = cli("eval", f"checkpoint={tmp_path / 'plain.pth'}", f"hydra.run.dir={tmp_path / 'x'}")
    assert unnamed.returncode == 2 and "model=NAME" in unnamed.stderr
    wrong = cli(
        "eval", f"checkpoint={tmp_path / 'plain.pth'}", "model=cnn", "dataset=digits", f"hydra.run.dir={tmp_path / 'y'}"
    )
    assert wrong.returncode == 2 and "do not fit" in wrong.stderr and "of another shape" in wrong.stderr


def test_unwritable_output_dir(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli("train", "trainer.epochs=1", f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot create the output directory" in result.stderr and "hydra.run.dir" in result.stderr
