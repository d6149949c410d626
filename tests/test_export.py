"""``kdcl export``: a tiny trained run's checkpoints as ONNX and TorchScript, checked and timed."""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import compose_config, run_cli
from omegaconf import OmegaConf
from test_cli import assert_clean_error

from kdcl.commands import export
from kdcl.errors import KdclError
from kdcl.train.checkpoint import load_checkpoint, load_model
from kdcl.trust import CodePolicy

FAST = ["warmup=1", "repeats=3", "check_examples=64"]
LATENCY = [f"latency_ms_b{b}_{t}" for t in ("1thread", "all_threads") for b in (1, 64)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished kdcl train run on digits: teacher (cnn), baseline and distill (mlp_small, an mlp)."""
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    result = run_cli(
        ["train", "trainer.epochs=1", "dataset.max_train_samples=200", "cache=false", f"hydra.run.dir={run}"], root
    )
    assert result.returncode == 0, result.stderr
    return run


def pytorch_outputs(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    model = load_model(checkpoint, CodePolicy()).eval()
    with torch.no_grad():
        return model(x)


def exported_outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The exported file run by its own runtime, as a user would load it."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch's deprecation notice for torch.jit
        return torch.jit.load(str(path))(x)


def export_settings(overrides: list[str]) -> dict:
    """The config ``kdcl export OVERRIDES`` runs with (few timed passes: the tests check the columns, not the speed)."""
    return compose_config([*FAST, *overrides], config_name="export")


def export_in_process(overrides: list[str], out: Path) -> pd.DataFrame:
    """What ``kdcl export OVERRIDES out=OUT`` does, without starting a process."""
    out.mkdir()
    settings = export_settings(overrides)
    return export.write_exports(export.chosen_models(settings), settings, out)


def check_export(run_dir: Path, out: Path, fmt: str, exported: Path) -> None:
    """``export.csv`` of the run's distilled student, and the exported file on its own runtime."""
    checkpoint = run_dir / "distill" / "best.pt"
    row = pd.read_csv(out / "export.csv").iloc[0]
    summary = pd.read_csv(run_dir / "summary.csv").set_index("model")
    assert (row["model"], row["arch"], row["format"], row["dataset"]) == ("distill", "mlp_small", fmt, "digits")
    assert Path(row["file"]) == exported.resolve() and row["file_mb"] == exported.stat().st_size / 1e6 > 0
    assert row["params"] == summary.loc["distill", "params"] and row["macs"] == summary.loc["distill", "macs"] > 0
    assert (row["inputs"], row["examples"]) == ("test", 64)
    assert 0 <= row["max_abs_diff"] <= 1e-4
    assert row["threads"] >= 1 and all(row[c] > 0 for c in LATENCY)
    # The file on its own runtime, at a batch size it was not traced with, gives PyTorch's outputs.
    x = torch.randn(5, *load_checkpoint(checkpoint)["input_shape"], generator=torch.Generator().manual_seed(1))
    assert (exported_outputs(exported, x) - pytorch_outputs(checkpoint, x)).abs().max().item() <= 1e-4


def test_export_checkpoint_from_the_command_line_writes_beside_it_or_to_out(run_dir, tmp_path):
    checkpoint = run_dir / "distill" / "best.pt"
    logs = f"hydra.run.dir={tmp_path / 'logs'}"
    result = run_cli(["export", f"checkpoint={checkpoint}", "format=torchscript", *FAST, logs], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kdcl export — torchscript" in result.stdout  # the table is printed
    beside = run_dir / "distill" / "export"  # export/ beside the checkpoint
    check_export(run_dir, beside, "torchscript", beside / "distill.torchscript.pt")
    out = tmp_path / "chosen"
    result = run_cli(["export", f"checkpoint={checkpoint}", "format=torchscript", *FAST, f"out={out}", logs], tmp_path)
    assert result.returncode == 0, result.stderr
    check_export(run_dir, out, "torchscript", out / "distill.torchscript.pt")
    (tmp_path / "file").write_text("")
    result = run_cli(["export", f"checkpoint={checkpoint}", f"out={tmp_path / 'file' / 'x'}", logs], tmp_path)
    assert_clean_error(result, f"cannot write the exports into {tmp_path / 'file' / 'x'}", "pass out=DIR")


def test_export_checkpoint_to_onnx(run_dir, tmp_path):
    out = tmp_path / "out"
    export_in_process([f"checkpoint={run_dir / 'distill' / 'best.pt'}", "format=onnx"], out)
    check_export(run_dir, out, "onnx", out / "distill.onnx")
    assert not (out / "compression.csv").exists()


def test_export_run_gives_the_compression_table(run_dir, tmp_path):
    out = tmp_path / "out"
    export_in_process([f"run={run_dir}", "format=onnx"], out)
    summary = pd.read_csv(run_dir / "summary.csv").set_index("model")
    exports = pd.read_csv(out / "export.csv").set_index("model")
    table = pd.read_csv(out / "compression.csv").set_index("model")
    assert list(table.index) == list(exports.index) == ["teacher", "baseline", "distill"]
    for model in table.index:
        assert (out / f"{model}.onnx").is_file() and exports.loc[model, "max_abs_diff"] <= 1e-4
        assert table.loc[model, "test_acc"] == summary.loc[model, "test_acc"]
        assert table.loc[model, "params"] == summary.loc[model, "params"]
        assert table.loc[model, "latency_ms_b64"] == exports.loc[model, "latency_ms_b64_1thread"]
    teacher, student = table.loc["teacher"], table.loc["distill"]
    assert teacher["params"] > student["params"]
    assert student["params_smaller_x"] == pytest.approx(teacher["params"] / student["params"])
    assert student["speedup_b1_x"] == pytest.approx(teacher["latency_ms_b1"] / student["latency_ms_b1"])
    assert student["acc_vs_teacher"] == pytest.approx(student["test_acc"] - teacher["test_acc"])
    ratios = ["params_smaller_x", "macs_smaller_x", "file_smaller_x", "speedup_b1_x", "speedup_b64_x"]
    assert np.allclose(teacher[ratios].to_numpy(float), 1.0)


def test_export_refuses_a_mismatch_and_removes_the_file(run_dir, tmp_path, monkeypatch):
    """An exported model whose outputs are off by 1e-3 is refused at tolerance 1e-4."""
    torchscript = export.FORMATS["torchscript"]

    def off_by_a_little(path, threads):
        run = torchscript.load(path, threads)
        return lambda x: run(x) + 1e-3

    monkeypatch.setitem(export.FORMATS, "torchscript", replace(torchscript, load=off_by_a_little))
    out_file = tmp_path / "distill.torchscript.pt"
    checkpoint = run_dir / "distill" / "best.pt"
    model = export.Exportable("distill", checkpoint, load_checkpoint(checkpoint))
    settings = {"tolerance": 1e-4, "check_examples": 16, "warmup": 0, "repeats": 1}
    with pytest.raises(
        KdclError, match=r"does not reproduce PyTorch: its outputs differ by up to 0\.001 on 16 test"
    ) as err:
        export.export_model(model, "torchscript", out_file, settings)
    assert err.value.fix.startswith("try format=onnx")
    assert not out_file.exists()


def test_an_exporter_failure_is_one_message(run_dir, tmp_path, monkeypatch):
    def unsupported(model, example, path):
        raise torch.onnx.errors.OnnxExporterError("an operator the exporter does not support")

    monkeypatch.setitem(export.FORMATS, "onnx", replace(export.FORMATS["onnx"], save=unsupported))
    checkpoint = run_dir / "distill" / "best.pt"
    model = export.Exportable("distill", checkpoint, load_checkpoint(checkpoint))
    settings = {"tolerance": 1e-4, "check_examples": 16, "warmup": 0, "repeats": 1}
    with pytest.raises(KdclError, match="PyTorch cannot export .* to onnx: an operator the exporter") as err:
        export.export_model(model, "onnx", tmp_path / "distill.onnx", settings)
    assert err.value.fix == "try format=torchscript"


def test_a_dataset_that_does_not_load_gives_random_inputs(run_dir, tmp_path):
    """A checkpoint whose dataset's files are not here is still exported, checked on random inputs."""
    checkpoint = run_dir / "distill" / "best.pt"
    ckpt = load_checkpoint(checkpoint)
    elsewhere = {**ckpt["config"]["dataset"], "name": "npz", "root": str(tmp_path / "elsewhere")}
    ckpt = {**ckpt, "config": {**ckpt["config"], "dataset": elsewhere}}
    settings = {"tolerance": 1e-4, "check_examples": 16, "warmup": 0, "repeats": 1}
    out_file = tmp_path / "distill.torchscript.pt"
    row = export.export_model(export.Exportable("distill", checkpoint, ckpt), "torchscript", out_file, settings)
    assert (row["inputs"], row["examples"]) == ("random", 16) and row["max_abs_diff"] <= 1e-4
    assert out_file.is_file()


def export_error(overrides: list[str]) -> KdclError:
    """The error ``kdcl export OVERRIDES`` stops with before it writes anything."""
    cfg = OmegaConf.create(compose_config(overrides, config_name="export"))
    with pytest.raises(KdclError) as raised:
        export.export_command(cfg)
    return raised.value


@pytest.mark.parametrize(
    ("overrides", "what", "fix"),
    [
        ([], "takes one of checkpoint= and run=, and got neither", "kdcl export checkpoint=PATH/best.pt"),
        (["checkpoint=a.pt", "run=b"], "takes one of checkpoint= and run=, not both", "kdcl export run=RUN_DIR"),
        (["checkpoint=a.pt", "format=tflite"], "format='tflite' is not allowed", "format must be onnx or torchscript"),
        (["checkpoint=a.pt", "tolerance=-1"], "tolerance=-1.0 is out of range", "tolerance must be a number ≥ 0"),
    ],
    ids=["neither", "both", "format", "tolerance"],
)
def test_bad_keys_are_refused_before_any_work(overrides, what, fix):
    err = export_error(overrides)
    assert what in err.what and fix in err.fix


def test_onnx_without_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    err = export_error(["checkpoint=a.pt", "format=onnx"])
    assert "format=onnx needs the packages onnx and onnxruntime" in err.what
    assert "pip install kdcl[export]" in err.fix


def test_run_without_summary_is_refused(tmp_path):
    (tmp_path / "teacher").mkdir()
    err = export_error([f"run={tmp_path}"])
    assert f"{tmp_path} holds no summary.csv" in err.what


def test_missing_checkpoint_is_refused(tmp_path):
    err = export_error([f"checkpoint={tmp_path / 'best.pt'}"])
    assert f"checkpoint {str(tmp_path / 'best.pt')!r} does not exist" in err.what


def test_truncated_checkpoint_is_one_message_and_exit_2(run_dir, tmp_path):
    path = tmp_path / "best.pt"
    whole = (run_dir / "distill" / "best.pt").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    result = run_cli(["export", f"checkpoint={path}", f"out={tmp_path / 'out'}"], tmp_path)
    assert_clean_error(result, f"checkpoint {path} is truncated or corrupt", "fix: use another copy of the file")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
