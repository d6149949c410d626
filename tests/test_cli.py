"""The ``kdcl`` command as a user runs it: a subprocess from an empty working directory."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import QUICK, stop_after

from kdcl.output import progress
from kdcl.train import engine

ROOT = Path(__file__).resolve().parents[1]


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out


def test_help_and_cfg(cli):
    top = cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "eval" in top.stdout
    train_help = cli("train", "--help")
    assert train_help.returncode == 0
    for group in ("teacher", "student", "dataset", "curriculum", "distill"):
        assert f"{group}:" in train_help.stdout
    job = cli("train", "--cfg", "job", "distill.alpha=0.3")
    assert job.returncode == 0 and "alpha: 0.3" in job.stdout
    for flag in ("--version", "-V"):
        version = cli(flag)
        assert version.returncode == 0 and version.stdout.strip() == f"kdcl {metadata.version('kdcl')}"


def test_train_then_eval_matches_summary(cli, tmp_path):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    train = cli("train", *QUICK, "trainer.progress_every_s=0.01", f"hydra.run.dir={run_dir}")
    assert train.returncode == 0, train.stderr
    assert "kd_gain" in train.stdout  # the summary table is printed
    assert "2 epochs × " in train.stdout + train.stderr  # each stage's start line
    assert "trainer: device cpu, fp32, compile off, channels_last on" in train.stderr  # the start-up line
    progress = [line for line in train.stderr.splitlines() if "] distill (3/3)  epoch " in line]
    assert progress and all(" ex/s  left: stage " in line and ", run " in line for line in progress)
    summary = pd.read_csv(run_dir / "summary.csv").set_index("model")
    assert max(map(len, train.stdout.splitlines())) <= 100  # the table fits 100 columns (not a terminal)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert (summary["kdcl_version"] == metadata.version("kdcl")).all()  # provenance, in the summary
    assert summary["git_commit"].str.removesuffix("+dirty").eq(head).all()  # and in every checkpoint:
    assert torch.load(run_dir / "distill" / "best.pt", weights_only=True)["provenance"] == {
        "kdcl_version": metadata.version("kdcl"),
        "git_commit": summary["git_commit"].iloc[0],
    }
    assert f"{summary.loc['distill', 'test_acc']:.4g}" in train.stdout  # with its numbers whole
    for stage in ("teacher", "baseline", "distill"):
        assert (run_dir / stage / "metrics.csv").is_file()
    result = cli("eval", f"checkpoint={run_dir / 'distill' / 'best.pt'}", f"hydra.run.dir={eval_dir}")
    assert result.returncode == 0, result.stderr
    ev = pd.read_csv(eval_dir / "eval.csv").iloc[0]
    assert ev["acc"] == pytest.approx(summary.loc["distill", "test_acc"], abs=1e-9)
    assert ev["loss"] == pytest.approx(summary.loc["distill", "test_loss"], rel=1e-5)
    assert ev["macs"] == summary.loc["distill", "macs"] > 0
    per_class = pd.read_csv(eval_dir / "eval_per_class.csv")
    assert len(per_class) == 10 and per_class["support"].sum() == ev["examples"]
    confusion = pd.read_csv(eval_dir / "confusion.csv", index_col=0)
    assert confusion.to_numpy().trace() / confusion.to_numpy().sum() == pytest.approx(ev["acc"])


def test_a_progress_line_says_where_the_stage_and_the_run_stand(monkeypatch):
    """Off a terminal, a line each ``every_s`` seconds: the stage (i of n), epoch, step, the
    running loss, examples/s over the epoch, and the time left at the stage's rate so far."""
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    lines = []
    run = progress.RunProgress(every_s=30)
    run.plan([("teacher", 40), ("baseline", 20), ("distill", 20), ("kd_length", 20)])
    with run.stage("baseline", steps=20, epochs=2) as shown:
        shown.draw = lambda line, step: lines.append(line)
        for step in range(1, 21):
            now[0] += 2.0  # 2 s a step, 32 examples a step
            shown.update(step, 1 + (step > 10), 32 * ((step - 1) % 10 + 1), lambda: 0.5)
    assert lines == [
        # t = 130 after step 15: 15 steps in 30 s; epoch 2 began at step 11 (t = 122, 32 examples)
        "baseline (2/4)  epoch 2/2  step 15/20  loss 0.5000  16 ex/s  left: stage 0:10, run 1:30",
    ]
    assert progress.clock(3725) == "1:02:05" and progress.clock(59.6) == "1:00"
    with run.stage("gen_1", steps=5, epochs=1) as shown:  # a stage outside the plan is counted as it comes
        assert shown.title == "gen_1 (5/5)"


def test_a_recipe_reads_its_data_under_paths_data_dir_from_any_folder(cli, tmp_path, monkeypatch):
    """+experiment=cifar10_cpu reads ${paths.data_dir}/cifar10: $KDCL_DATA_DIR when set (the
    run starts in an empty folder elsewhere); without it, ../shared/data, and a missing
    folder's message names the absolute path and the two ways to point at the data."""
    data = tmp_path / "elsewhere" / "cifar10"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20)):
        np.savez(data / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)
    monkeypatch.setenv("KDCL_DATA_DIR", str(tmp_path / "elsewhere"))
    quick = ["+experiment=cifar10_cpu", "trainer.epochs=1", "dataset.max_train_samples=50"]
    run = tmp_path / "run"
    result = cli("train", *quick, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(run / "summary.csv")["model"].tolist() == ["teacher", "baseline", "distill"]
    monkeypatch.delenv("KDCL_DATA_DIR")
    missing = cli("train", *quick, f"hydra.run.dir={tmp_path / 'missing'}")
    expected = (tmp_path / "cwd" / ".." / "shared" / "data" / "cifar10" / "train.npz").absolute()
    assert_clean_error(missing, f"{expected} not found", "set KDCL_DATA_DIR=DIR or paths.data_dir=DIR")


def test_multirun_writes_one_summary_per_job(cli, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        "train",
        "-m",
        "distill.alpha=0.1,0.9",
        "trainer.epochs=1",
        "dataset.max_train_samples=300",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr
    assert "1 epoch × " in result.stdout + result.stderr and "1 epochs" not in result.stdout + result.stderr
    alphas = []
    for job, alpha in (("0", 0.1), ("1", 0.9)):
        summary = pd.read_csv(sweep / job / "summary.csv")
        assert list(summary.columns[:2]) == ["model", "distill.alpha"]  # the swept key, not the fixed ones
        assert (summary["distill.alpha"] == alpha).all()
        alphas.append(pd.read_csv(sweep / job / "distill" / "metrics.csv")["alpha"].iloc[0])
    assert alphas == [0.1, 0.9]
    assert result.stdout.count("┃ distill.alpha") == 2  # each job's table shows it


def test_failed_sweep_job_lets_others_run_and_exits_nonzero(cli, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        "train",
        "-m",
        "distill.alpha=1.5,0.5",
        "trainer.epochs=1",
        "dataset.max_train_samples=300",
        f"hydra.sweep.dir={sweep}",
    )
    assert_clean_error(result, "distill.alpha=1.5 is out of range", "1 job(s) failed")
    assert (sweep / "1" / "summary.csv").is_file() and not (sweep / "0" / "summary.csv").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["train", "distill.alpah=0.1"], ["alpah"]),
        (["train", "teacher=resnet51"], ["teacher has no option 'resnet51'", "did you mean teacher=", "resnet50"]),
        (["train", "dataset=mnist", "dataset.root=missing_dir"], ["dataset.root", "dataset.download"]),
        (["eval", "checkpoint=nope/best.pt"], ["nope/best.pt", "does not exist"]),
        (["eval"], ["checkpoint=PATH"]),
        (["fit"], ["unknown command", "train"]),
    ],
    ids=["typo-key", "unknown-option", "dataset-offline", "missing-checkpoint", "no-checkpoint", "command"],
)
def test_bad_input_gives_one_clear_message(cli, tmp_path, args, needles):
    result = cli(*args, f"hydra.run.dir={tmp_path / 'out'}") if args[0] != "fit" else cli(*args)
    assert_clean_error(result, *needles)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("distill.alpha=1.5", ["distill.alpha=1.5 is out of range", "distill.alpha must be a number in [0, 1]"]),
        (
            "distill.temperature=-2",
            ["distill.temperature=-2.0 is out of range", "distill.temperature must be a number > 0"],
        ),
        (
            "curriculum.pacing.start=0",
            ["curriculum.pacing.start=0.0 is out of range", "curriculum.pacing.start must be a fraction in (0, 1]"],
        ),
        (
            "curriculum.pacing.full_at=1.5",
            ["curriculum.pacing.full_at=1.5 is out of range", "curriculum.pacing.full_at must be a fraction in (0, 1]"],
        ),
        ("trainer.epochs=0", ["trainer.epochs=0 is out of range", "trainer.epochs must be an integer ≥ 1"]),
        ("optimizer.lr=0", ["optimizer.lr=0.0 is out of range", "optimizer.lr must be a number > 0"]),
        ("trainer.epochs=abc", ["trainer.epochs='abc' is not an integer", "trainer.epochs must be an integer ≥ 1"]),
        ("distill.alpha=high", ["distill.alpha='high' is not a number", "distill.alpha must be a number in [0, 1]"]),
        ("trainer.epochz=3", ["trainer.epochz=3: trainer has no key 'epochz'", "did you mean trainer.epochs?"]),
    ],
    ids=["alpha", "temperature", "fraction-0", "fraction-above-1", "epochs", "lr", "type-int", "type-float", "typo"],
)
def test_bad_value_names_key_value_and_what_is_allowed(cli, tmp_path, override, needles):
    result = cli("train", override, f"hydra.run.dir={tmp_path / 'out'}")
    assert_clean_error(result, *needles)
    assert result.returncode == 2 and not (tmp_path / "out" / "teacher").exists()
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 2, result.stderr  # error: … / fix: …


def test_corrupt_checkpoint_is_refused(cli, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert_clean_error(cli("eval", f"checkpoint={bad}", f"hydra.run.dir={tmp_path / 'out'}"), "corrupt")


def test_bad_data_is_refused_before_training(cli, tmp_path):
    """Data that cannot train is one message, exit 2, and the run directory holds only Hydra's files."""
    import numpy as np

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    x = np.zeros((20, 4, 4), dtype=np.uint8)
    np.savez(data / "train.npz", x=x, y=np.arange(20) % 2)
    np.savez(data / "test.npz", x=x, labels=np.arange(20) % 2)
    result = cli("train", "dataset=npz", f"dataset.root={data}", f"hydra.run.dir={out}")
    assert_clean_error(result, "test.npz has no array 'y' (it holds: x, labels)", "fix: save images as x")
    assert result.returncode == 2
    assert sorted(p.name for p in out.iterdir()) == [".hydra", ".kdcl-run.lock", "train.log"]  # nothing of a run


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("text", "not a kdcl checkpoint"),
        ("pickled-list", "safe loading refuses what it holds"),
        ("dict", "it holds a dict of 1 entries, not all tensors (epoch (int))"),
    ],
)
def test_eval_of_a_file_that_is_no_checkpoint(cli, tmp_path, content, needle):
    import pickle

    import torch

    path = tmp_path / "model.pt"
    if content == "text":
        path.write_text("weights: none\n")
    elif content == "pickled-list":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    else:
        torch.save({"epoch": 3}, path)
    result = cli("eval", f"checkpoint={path}", "model=mlp", "dataset=digits", f"hydra.run.dir={tmp_path / 'out'}")
    assert_clean_error(
        result, f"{path} is not a kdcl checkpoint nor a state_dict", needle, "torch.save(model.state_dict()"
    )
    assert result.returncode == 2 and len([line for line in result.stderr.splitlines() if line.strip()]) == 2


@pytest.mark.slow
def test_installed_wheel_ships_configs_and_runs_anywhere(tmp_path):
    """``pip install .`` (not editable): the configs travel as package data."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheel_dir, ROOT], check=True)
    wheel = next(wheel_dir.glob("kdcl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for yaml in (
        "kdcl/conf/config.yaml",
        "kdcl/conf/eval.yaml",
        "kdcl/conf/models/resnet50.yaml",
        "kdcl/conf/experiment/resnet50_to_mobilenet.yaml",
        "kdcl/conf/hydra/job_logging/kdcl.yaml",
    ):
        assert yaml in names
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "kdcl", "train", "--cfg", "job", "+experiment=cifar10_cpu"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "name: npz" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import kdcl.cli; print(kdcl.cli.CONF_DIR)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip().startswith(str(target))


def test_an_unknown_recipe_gets_a_guess_and_every_recipe_nested_ones_too(cli):
    result = cli("train", "+experiment=cifar10_cpuu")
    assert result.returncode == 2
    assert_clean_error(result, "did you mean +experiment=cifar10_cpu?", "cifar100/resnet56_resnet20", "ag_news_minilm")
    assert "Config search path" not in result.stdout + result.stderr  # Hydra's own message is not shown


def test_a_second_run_into_a_busy_run_folder_stops_at_once(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".kdcl-run.lock", "a") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        result = cli("train", *QUICK, f"hydra.run.dir={run}")
    assert_clean_error(result, f"another kdcl run is writing into {run}", "choose another hydra.run.dir")
    assert not (run / "teacher").exists() and not (run / "summary.csv").exists()


def test_a_stopped_sweep_says_how_to_resume_the_sweep_and_that_resumes_it(cli, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "distill.alpha=0.1,0.9", "trainer.epochs=1", "dataset.max_train_samples=300"]
    monkeypatch.setattr(engine, "train_step", stop_after("distill", 2))  # Ctrl-C in job 0's distill stage
    stopped = cli(*args, f"hydra.sweep.dir={sweep}")
    assert stopped.returncode == 130
    assert f"run the same command again with hydra.sweep.dir={sweep}" in stopped.stderr
    assert not (sweep / "1").exists()  # the sweep stopped with its job
    monkeypatch.undo()
    resumed = cli(*args, f"hydra.sweep.dir={sweep}")
    assert resumed.returncode == 0, resumed.stderr
    assert "teacher epoch" not in resumed.stderr  # neither job trains its teacher again
    assert all((sweep / job / "summary.csv").is_file() for job in ("0", "1"))
