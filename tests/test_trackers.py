"""Loggers (``logger=[csv,tensorboard,mlflow,wandb]``): what each tracker stored, read back
offline and compared with ``metrics.csv`` and ``summary.csv``."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import QUICK
from test_cli import assert_clean_error

from kdcl.config.options import CONF_DIR
from kdcl.errors import KdclError
from kdcl.output.tables import append_row
from kdcl.output.trackers import LOGGERS, TrackedRun, check_loggers, open_loggers, wandb_logged_in

STAGES = ("teacher", "baseline", "distill")
TRACKERS = "logger=[csv,tensorboard,mlflow,wandb]"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Trackers that stay on this machine: W&B offline, MLflow's default local store, and
    W&B's settings and caches in the test's folder (the CLI's subprocesses inherit these)."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the test's own MlflowClient


def numeric(metrics: pd.DataFrame) -> list[str]:
    """The columns a tracker receives: the numbers of metrics.csv but ``step``."""
    return [c for c in metrics.select_dtypes("number").columns if c != "step" and metrics[c].notna().all()]


# --------------------------------------------------------------------------- reading trackers back
def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.resolve().as_uri())


def mlflow_runs(store: Path) -> list:
    client = mlflow_client(store)
    return client.search_runs([client.get_experiment_by_name("kdcl").experiment_id])


def mlflow_history(store: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client(store).get_metric_history(run_id, key))


def wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run (``wandb/offline-run-*/run-*.wandb``): W&B writes them
    as protobuf ``Record`` messages in LevelDB's log format (a 7-byte file header, then blocks
    of 32 KiB of chunks, each with a 7-byte header: checksum, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(records: list) -> list[dict]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def wandb_summary(records: list) -> dict:
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.summary.update}
    return summary


def wandb_run(records: list):
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


# --------------------------------------------------------------------------- fast checks
def test_every_logger_option_is_a_registered_logger_with_its_settings():
    options = {p.stem: yaml.safe_load(p.read_text()) for p in (Path(CONF_DIR) / "logger").glob("*.yaml")}
    assert sorted(options) == LOGGERS.names() == ["csv", "mlflow", "tensorboard", "wandb"]
    for name, option in options.items():
        assert list(option) == [name]  # each option adds its own key under logger
    pytest.importorskip("mlflow"), pytest.importorskip("wandb"), pytest.importorskip("tensorboard")
    check_loggers({name: option[name] for name, option in options.items()})
    with pytest.raises(KdclError, match="logger.mlflow has no setting experimnt"):
        check_loggers({"mlflow": {"experimnt": "x"}})


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_tracker_not_installed_is_one_message_naming_the_extra(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were absent
    with pytest.raises(KdclError) as err:
        check_loggers({"csv": {}, name: {}})
    assert f"logger={name} needs the {package} package" in err.value.what
    assert "pip install 'kdcl[trackers]'" in err.value.fix


def test_a_misspelt_logger_is_one_message(cli):
    result = cli("train", "logger=[csv,tensorbord]")
    assert_clean_error(result, "logger has no option 'tensorbord'", "csv, mlflow, tensorboard, wandb")


def test_the_metrics_table_of_a_resumed_stage_keeps_earlier_epochs_only(tmp_path):
    path = tmp_path / "metrics.csv"
    for epoch in (1, 2, 3):
        append_row(path, {"epoch": epoch, "step": 10 * epoch, "val_acc": epoch / 10})
    append_row(path, {"epoch": 2, "step": 20, "val_acc": 0.5})  # resumed at epoch 2: epoch 3 is dropped
    table = pd.read_csv(path)
    assert table["epoch"].tolist() == [1, 2] and table["val_acc"].tolist() == [0.1, 0.5]


def test_only_rank_0_logs(monkeypatch, tmp_path):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("RANK", "1")
    with open_loggers({"csv": {}, "tensorboard": {}}, TrackedRun(tmp_path, {})) as loggers:
        loggers.log_epoch("distill", tmp_path, {"epoch": 1, "step": 5, "val_acc": 0.5})
    assert not loggers.loggers and list(tmp_path.iterdir()) == []


def test_wandb_goes_online_only_when_logged_in(offline, monkeypatch, tmp_path):
    assert not wandb_logged_in()  # no key, no netrc: offline
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_logged_in()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a login for another host does not count
    assert not wandb_logged_in()


def test_a_run_that_fails_ends_its_mlflow_run_as_failed(offline, tmp_path):
    pytest.importorskip("mlflow")
    with pytest.raises(KdclError), open_loggers({"mlflow": {}}, TrackedRun(tmp_path, {"seed": 3})) as loggers:
        loggers.log_epoch("teacher", tmp_path, {"epoch": 1, "step": 17, "val_acc": 0.25, "arch": "cnn"})
        raise KdclError("stopped")
    (run,) = mlflow_runs(tmp_path / "mlruns")
    assert run.info.status == "FAILED" and run.data.params == {"seed": "3"}
    assert run.data.metrics == {"teacher/epoch": 1.0, "teacher/val_acc": 0.25}  # numbers only, not the step
    assert mlflow_history(tmp_path / "mlruns", run.info.run_id, "teacher/val_acc") == [(17, 0.25)]


def test_a_tracker_that_cannot_start_is_one_message(offline, tmp_path):
    pytest.importorskip("mlflow")
    settings = {"csv": {}, "mlflow": {"tracking_uri": "nosuch://host"}}
    with pytest.raises(KdclError) as err, open_loggers(settings, TrackedRun(tmp_path, {})):
        pass
    assert err.value.what.startswith("logger=mlflow could not start its run: ") and "logger.mlflow" in err.value.fix


# --------------------------------------------------------------------------- a run, read back
@pytest.mark.slow
def test_every_tracker_holds_the_metrics_config_summary_and_figures_of_a_run(cli, offline, tmp_path):
    pytest.importorskip("mlflow"), pytest.importorskip("wandb"), pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    result = cli("train", *QUICK, TRACKERS, "distill.alpha=0.7", f"hydra.run.dir={run_dir}", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    tables = {stage: pd.read_csv(run_dir / stage / "metrics.csv") for stage in STAGES}
    summary = pd.read_csv(run_dir / "summary.csv").set_index("model")
    expected = {
        f"{stage}/{column}": list(zip(table["step"], table[column]))
        for stage, table in tables.items()
        for column in numeric(table)
    }
    assert "distill/val_acc" in expected and "distill/alpha" in expected

    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for key, points in expected.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32
    assert scalars["summary/distill/test_acc"][0][1] == pytest.approx(summary.loc["distill", "test_acc"], rel=1e-6)

    (run,) = mlflow_runs(run_dir / "mlruns")
    for key, points in expected.items():
        logged = mlflow_history(run_dir / "mlruns", run.info.run_id, key)
        assert [s for s, _ in logged] == [s for s, _ in points], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-7), (
            key
        )  # float32 as the CSV writes it
    assert run.info.status == "FINISHED" and run.data.params["distill.alpha"] == "0.7"
    assert run.data.metrics["summary/distill/test_acc"] == pytest.approx(summary.loc["distill", "test_acc"], rel=1e-7)
    artifacts = {a.path for a in mlflow_client(run_dir / "mlruns").list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/stage_curves.png"}

    records = wandb_records(run_dir)
    history = wandb_history(records)
    for key, points in expected.items():
        stage = key.rsplit("/", 1)[0]
        logged = [(h[f"{stage}/step"], h[key]) for h in history if key in h]
        assert [(s, pytest.approx(v, rel=1e-7)) for s, v in logged] == points, key  # float32 as the CSV writes it
    assert wandb_summary(records)["summary/distill/test_acc"] == pytest.approx(
        summary.loc["distill", "test_acc"], rel=1e-7
    )
    logged = {key: value for h in history for key, value in h.items()}
    assert logged["summary_table/_type"] == "table-file" and logged["summary_table/nrows"] == len(summary)
    assert logged["figures/stage_curves/_type"] == "image-file"
    assert (next(run_dir.glob("wandb/offline-run-*/files")) / logged["figures/stage_curves/path"]).is_file()
    config = {item.key: json.loads(item.value_json) for item in wandb_run(records).config.update}
    assert config["distill"]["alpha"] == 0.7 and config["logger"]["wandb"]["project"] == "kdcl"


@pytest.mark.slow
def test_a_sweep_gives_one_tracker_run_per_job_grouped_by_the_sweep(cli, offline, tmp_path):
    pytest.importorskip("mlflow"), pytest.importorskip("wandb"), pytest.importorskip("tensorboard")
    sweep = tmp_path / "sweep"
    result = cli(
        "train",
        "-m",
        "distill.alpha=0.1,0.9",
        TRACKERS,
        "trainer.epochs=1",
        "dataset.max_train_samples=300",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = {run.data.tags["kdcl.job"]: run for run in mlflow_runs(sweep / "mlruns")}  # one store for the sweep
    assert sorted(runs) == ["0", "1"]
    for job, alpha in (("0", "0.1"), ("1", "0.9")):
        run, job_dir = runs[job], sweep / job
        assert run.data.tags["kdcl.sweep"] == str(sweep.resolve()) and run.info.run_name == f"sweep/{job}"
        assert run.data.params["distill.alpha"] == alpha
        # job 1 takes the teacher from the stage cache: its tracker run still gets the teacher's epochs
        teacher = pd.read_csv(job_dir / "teacher" / "metrics.csv")
        points = list(zip(teacher["step"], teacher["val_acc"]))
        assert [
            (s, pytest.approx(v, rel=1e-7))
            for s, v in mlflow_history(sweep / "mlruns", run.info.run_id, "teacher/val_acc")
        ] == points
        assert [
            (s, pytest.approx(v, rel=1e-6)) for s, v in tensorboard_scalars(job_dir / "tensorboard")["teacher/val_acc"]
        ] == points
        records = wandb_records(job_dir)
        assert wandb_run(records).run_group == str(sweep.resolve())
        assert [
            (h["teacher/step"], pytest.approx(h["teacher/val_acc"], rel=1e-7))
            for h in wandb_history(records)
            if "teacher/val_acc" in h
        ] == points
    assert "stored teacher in the cache" not in (sweep / "1" / "train.log").read_text()
