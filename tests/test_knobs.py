"""The trainer's knobs against their formulas: gradient clipping, fp16 autocast and the weights' moving average."""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
from torch import nn

from kdcl.train.ema import ModelEMA
from kdcl.train.engine import TrainSettings, clip_gradient

CPU = TrainSettings(torch.device("cpu"), epochs=1, batch_size=4, eval_batch_size=4, amp=False)


@pytest.mark.parametrize("max_norm", [1.0, 10.0])
def test_clipping_scales_every_gradient_by_the_global_norm(max_norm):
    """g ← g · min(1, c / (‖g‖ + 1e-6)), ‖g‖ over all the parameters together: here 3, 4 → 5."""
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    clip_gradient(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0), max_norm)
    factor = min(1.0, max_norm / (5.0 + 1e-6))
    assert a.grad.item() == pytest.approx(3.0 * factor) and b.grad.item() == pytest.approx(4.0 * factor)
    assert math.hypot(a.grad.item(), b.grad.item()) == pytest.approx(min(5.0, max_norm), rel=1e-5)


def test_fp16_autocasts_to_float16():
    fp16 = replace(CPU, amp=True, amp_dtype=torch.float16)
    assert fp16.fp16 and fp16.precision == "fp16 autocast" and not CPU.fp16 and CPU.precision == "fp32"
    with fp16.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16


def test_the_weight_average_follows_its_formula():
    """θ̄ ← d·θ̄ + (1 − d)·θ for weights and BatchNorm statistics; integer buffers copied."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.75)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the running statistics, counts a batch
    ema.update(model)
    now, live = ema.module.state_dict(), model.state_dict()
    for key, value in now.items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.75 * start[key] + 0.25 * live[key]), key
        else:
            assert torch.equal(value, live[key]), key
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_a_run_with_a_weight_average_reports_it_as_a_model_of_its_own(tmp_path):
    """``trainer.ema_decay``: every stage keeps ``ema_best.pt``; the summary has a row per
    average, its gain over the baseline's average, and evaluating its checkpoint gives its row."""
    from helpers import QUICK, compose_config

    from kdcl.commands.eval import run_eval
    from kdcl.scenarios.standard import run_pipeline

    cfg = compose_config([*QUICK, "dataset.max_train_samples=300", "trainer.ema_decay=0.9", "curriculum=none"])
    summary = run_pipeline(cfg, tmp_path).set_index("model")
    assert summary.index.tolist() == ["teacher", "teacher_ema", "baseline", "baseline_ema", "distill", "distill_ema"]
    for stage in ("teacher", "baseline", "distill"):
        assert (tmp_path / stage / "ema_best.pt").is_file() and (tmp_path / stage / "ema_last.pt").is_file()
    metrics = pd.read_csv(tmp_path / "distill" / "metrics.csv")
    assert summary.loc["distill_ema", "best_val_acc"] == pytest.approx(metrics["val_acc_ema"].max())
    gain = summary.loc["distill_ema", "test_acc"] - summary.loc["baseline_ema", "test_acc"]
    assert summary.loc["distill_ema", "kd_gain"] == pytest.approx(gain)
    (tmp_path / "eval").mkdir()
    evaluated = run_eval(str(tmp_path / "distill" / "ema_best.pt"), None, "cpu", 64, tmp_path / "eval", None)
    assert evaluated["acc"].iloc[0] == pytest.approx(summary.loc["distill_ema", "test_acc"])


def test_trackers_get_the_mean_loss_of_every_window_of_steps(tmp_path):
    """``trainer.log_every_steps=3`` with 9 full batches an epoch: each stage logs steps 3, 6,
    9, 12, …; the three windows of an epoch average to the epoch's train_loss in metrics.csv."""
    from helpers import compose_config

    from kdcl.output.trackers import CsvLogger, Logger, Loggers
    from kdcl.scenarios.standard import run_pipeline

    class Recorder(Logger):
        def __init__(self):
            self.steps: dict[str, list[tuple[int, dict]]] = {}

        def log_step(self, stage, step, metrics):
            self.steps.setdefault(stage, []).append((step, metrics))

    recorder = Recorder()
    overrides = ["trainer.epochs=2", "trainer.batch_size=32", "dataset.max_train_samples=320", "curriculum=none"]
    cfg = compose_config([*overrides, "trainer.log_every_steps=3"])
    run_pipeline(cfg, tmp_path, loggers=Loggers({"csv": CsvLogger(), "recorder": recorder}))
    assert set(recorder.steps) == {"teacher", "baseline", "distill"}
    for stage, logged in recorder.steps.items():
        metrics = pd.read_csv(tmp_path / stage / "metrics.csv")
        assert metrics["step"].tolist() == [9, 18]  # 288 training examples: 9 batches of 32
        assert [step for step, _ in logged] == [3, 6, 9, 12, 15, 18]
        for epoch, windows in ((1, logged[:3]), (2, logged[3:])):
            mean = sum(m["train_loss"] for _, m in windows) / 3
            assert mean == pytest.approx(metrics.loc[epoch - 1, "train_loss"], rel=1e-5)
        assert logged[0][1]["lr"] > logged[-1][1]["lr"] >= 0  # the cosine schedule, as it decays
