"""``kdcl tune``: the search space is checked before anything trains, every trial is a run
whose validation accuracy is the objective, pruned trials are marked, and the same command
continues the study (an interrupted trial resumes in its own folder)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from helpers import QUICK, compose_config
from test_cli import assert_clean_error

from kdcl.commands.search_space import check_against, parse_space
from kdcl.commands.tune import open_study
from kdcl.config.options import CONF_DIR
from kdcl.config.schema import TuneSettings, typed
from kdcl.errors import KdclError
from kdcl.scenarios import REGISTERED_NAMES

SPACE = {
    "distill.alpha": {"type": "float", "low": 0.1, "high": 0.95},
    "distill.temperature": {"type": "categorical", "choices": [1, 2, 4, 8]},
}
GROUPS = {"distill": ["dkd", "kd", "none"]}


def run_config(*overrides: str) -> dict:
    return {k: v for k, v in compose_config(list(overrides)).items() if k not in ("tune", "search")}


def checked(space: dict, *overrides: str) -> None:
    check_against(parse_space(space, "search=test"), run_config(*overrides), GROUPS, REGISTERED_NAMES, "search=test")


def test_every_kind_of_the_space_draws_within_its_bounds():
    space = {
        **SPACE,
        "optimizer.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
        "trainer.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
        "distill": {"type": "categorical", "choices": ["kd", "dkd"]},
    }
    checked(space)
    dims = parse_space(space, "search=test")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = {d.key: d.draw(trial) for d in dims}
        assert 0.1 <= values["distill.alpha"] <= 0.95 and values["distill.temperature"] in (1, 2, 4, 8)
        assert 0.01 <= values["optimizer.lr"] <= 0.2 and values["trainer.batch_size"] in (16, 32, 48, 64)
        assert values["distill"] in ("kd", "dkd")


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "search").glob("*.yaml")))
def test_every_shipped_space_is_valid(name):
    checked(compose_config([f"search={name}"], "tune")["search"])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"distill.alpha": {"type": "uniform", "low": 0, "high": 1}}, "unknown search-space type 'uniform'"),
        ({"distill.alpha": {"type": "float", "low": 0.9, "high": 0.1}}, "low=0.9 is above high=0.1"),
        ({"distill.alpha": {"type": "float", "low": 0.1}}, "type float has missing high"),
        ({"distill.alpha": {"type": "float", "low": 0.1, "high": 0.9, "lo": 1}}, "type float has unknown lo"),
        ({"optimizer.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log=true needs low > 0"),
        ({"trainer.epochs": {"type": "int", "low": 1.5, "high": 3}}, "low=1.5 is not an integer"),
        ({"distill.temperature": {"type": "categorical", "choices": []}}, "is not a non-empty list"),
        ({"distill.alpah": {"type": "float", "low": 0.1, "high": 0.9}}, "distill.alpah is not a config key"),
        ({"distill.alpha": {"type": "float", "low": 0.1, "high": 1.5}}, "distill.alpha can draw 1.5, but"),
        ({"distill": {"type": "categorical", "choices": ["kd", "kdd"]}}, "distill has no option 'kdd'"),
        ({}, "the search space is empty"),
    ],
)
def test_a_bad_space_is_one_clear_error(space, message):
    with pytest.raises(KdclError) as err:
        checked(space)
    assert err.value.what.startswith("search=test: ") and message in err.value.what, err.value.what
    assert err.value.fix


@pytest.mark.parametrize("loss, knob", [("dkd", "alpha"), ("mlkd", "temperature"), ("none", "alpha")])
def test_a_knob_the_loss_does_not_read_is_not_searched(loss, knob):
    """+experiment=cifar10_cpu distils with DKD: searching its distill.alpha would run the same trial N times."""
    with pytest.raises(KdclError) as err:
        checked({f"distill.{knob}": {"type": "float", "low": 0.5, "high": 2.0}}, f"distill={loss}")
    assert f"distill.{knob} is searched, but distill={loss} does not use it" in err.value.what
    assert "distill=kd" in err.value.fix


def test_a_bad_space_file_stops_the_command_before_training(cli, tmp_path):
    (tmp_path / "spaces" / "search").mkdir(parents=True)
    (tmp_path / "spaces" / "search" / "bad.yaml").write_text("distill.alpha: {type: float, low: 0.9, high: 0.1}\n")
    study = tmp_path / "study"
    result = cli("tune", f"--config-dir={tmp_path / 'spaces'}", "search=bad", *QUICK, f"hydra.run.dir={study}")
    assert_clean_error(result, "search=bad: distill.alpha: low=0.9 is above high=0.1", "fix:")
    assert result.returncode == 2
    assert not (study / "study.db").exists() and not list(study.glob("trial_*"))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # a trial asked for outside optimize()
def test_a_study_continues_only_the_search_it_began_with(tmp_path):
    settings = typed(TuneSettings, compose_config([], "tune")["tune"], "tune")
    search = {"space": SPACE, "overrides": ["trainer.epochs=2"]}
    open_study(settings, 0, 2, tmp_path, search).ask()
    assert len(open_study(settings, 0, 2, tmp_path, search).trials) == 1
    with pytest.raises(KdclError) as err:
        open_study(settings, 0, 2, tmp_path, {**search, "overrides": ["trainer.epochs=3"]})
    assert "holds study 'kdcl' of another search" in err.value.what and "trainer.epochs=2" in err.value.fix


def trials(study_dir) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="kdcl", storage=f"sqlite:///{study_dir / 'study.db'}").trials


@pytest.mark.slow
def test_a_search_trains_the_teacher_once_prunes_and_continues(cli, tmp_path):
    study = tmp_path / "study"
    first = cli("tune", *QUICK, "tune.trials=3", "tune.pruner=none", f"hydra.run.dir={study}")
    assert first.returncode == 0, first.stderr
    assert (study / "study.db").is_file()
    done = trials(study)
    assert [t.state.name for t in done] == ["COMPLETE"] * 3
    for trial in done:
        run = study / f"trial_{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run)
        alpha, temperature = trial.params["distill.alpha"], trial.params["distill.temperature"]
        assert 0.1 <= alpha <= 0.95 and temperature in (1, 2, 4, 8)
        summary = pd.read_csv(run / "summary.csv").set_index("model")
        assert trial.value == pytest.approx(summary.loc["distill", "best_val_acc"], rel=1e-7)  # validation, never test
        metrics = pd.read_csv(run / "distill" / "metrics.csv")
        assert metrics["alpha"].iloc[0] == pytest.approx(alpha) and metrics["temperature"].iloc[0] == temperature
    logs = [(study / f"trial_{n}" / "train.log").read_text() for n in range(3)]
    assert "stored teacher" in logs[0] and all("reused teacher from cache" in log for log in logs[1:])
    finished = {n: (study / f"trial_{n}" / "summary.csv").stat().st_mtime for n in range(3)}

    # The same search, one more trial, with a pruner that stops it after its first epoch.
    forced = ["tune.pruner=threshold", "tune.prune_below=1.0", "tune.warmup_epochs=0"]
    more = cli("tune", *QUICK, "tune.trials=4", *forced, f"hydra.run.dir={study}")
    assert more.returncode == 0, more.stderr
    assert [t.state.name for t in trials(study)] == ["COMPLETE"] * 3 + ["PRUNED"]
    pruned = study / "trial_3"
    assert json.loads((pruned / "pruned.json").read_text())["epoch"] == 1
    assert not (pruned / "summary.csv").exists()
    assert "reused teacher from cache" in (pruned / "train.log").read_text()
    assert {n: (study / f"trial_{n}" / "summary.csv").stat().st_mtime for n in range(3)} == finished

    again = cli("tune", *QUICK, "tune.trials=4", *forced, f"hydra.run.dir={study}")
    assert again.returncode == 0 and "has its 4 trials" in again.stdout + again.stderr
    assert len(trials(study)) == 4

    report = cli("report", str(study))
    assert report.returncode == 0, report.stderr
    jobs = pd.read_csv(study / "report.csv").set_index("run")
    assert jobs.loc["study/trial_3", "status"] == "pruned" and pd.isna(jobs.loc["study/trial_3", "test_acc"])
    assert (jobs.drop("study/trial_3")["status"] == "finished").all()
    assert "1 of them pruned" in report.stdout


@pytest.mark.slow
def test_an_interrupted_trial_resumes_in_its_folder(tmp_path):
    study, cwd = tmp_path / "study", tmp_path / "cwd"
    cwd.mkdir()
    args = [sys.executable, "-m", "kdcl", "tune", *QUICK, "trainer.epochs=6", "tune.trials=1"]
    args += [f"hydra.run.dir={study}"]
    teacher = study / "trial_0" / "teacher" / "metrics.csv"
    search = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not teacher.is_file() and search.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    search.send_signal(signal.SIGTERM)
    output = search.communicate(timeout=120)[0]
    assert search.returncode == 128 + signal.SIGTERM, output
    assert "run the same command again" in output
    assert [t.state.name for t in trials(study)] == ["FAIL", "WAITING"]

    resumed = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    failed, retry = trials(study)
    assert retry.state.name == "COMPLETE" and retry.params == failed.params
    assert retry.user_attrs["run_dir"] == str(study / "trial_0") and not (study / "trial_1").exists()
    assert "teacher: resuming at epoch" in (study / "trial_0" / "train.log").read_text()
