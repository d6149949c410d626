"""Distillation methods in whole runs on digits: composed and feature losses, several
teachers, born-again generations, noise, hooks that come off."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import QUICK, compose_config, control_config
from torch import nn

from kdcl.curricula import DataSchedule
from kdcl.data import load_data
from kdcl.distill.control import DistillControl
from kdcl.distill.features import FeatureTap
from kdcl.distill.feeds import OnlineTeacher
from kdcl.distill.losses import LossContext, create_loss
from kdcl.distill.teachers import Teachers
from kdcl.errors import KdclError
from kdcl.scenarios import standard as stages
from kdcl.scenarios.standard import run_pipeline
from kdcl.train import assemble
from kdcl.train.checkpoint import load_model, model_from_checkpoint
from kdcl.train.engine import Meter, Stage, TrainSettings, evaluate, train_step
from kdcl.trust import CodePolicy

COMPOSED = "[{name: kd, weight: 0.9}, {name: fitnet, weight: 100}, {name: at}, {name: dkd, warmup_epochs: 0}]"


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run_patched(cfg: dict, out, module=stages, **patches) -> pd.DataFrame:
    """``run_pipeline`` with names of ``module`` (kdcl.scenarios.standard) replaced (spies), the summary by model."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in patches.items():
            mp.setattr(module, name, value)
        return run_pipeline(cfg, out).set_index("model")


def recomputed_ensemble_acc(cfg: dict, checkpoints: list) -> float:
    """Test accuracy of the mean softmax of the checkpoints' models, from scratch."""
    data = load_data(cfg["dataset"], torch.device("cpu"), True, cfg["seed"])
    trainer = TrainSettings(torch.device("cpu"), 1, 64, 512, amp=False)
    probs = [evaluate(load_model(c, CodePolicy()), data.test, data, trainer) for c in checkpoints]
    mean = torch.stack([torch.softmax(ev.logits, 1) for ev in probs]).mean(0)
    return (mean.argmax(1) == probs[0].labels).float().mean().item()


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory):
    """Two teachers (cnn_small, mlp) combined by confidence; a conv student distilled with KD +
    hints + attention + DKD; an arm with FitNets' hint-only first epoch. Every FeatureTap
    the stages open is recorded."""
    cfg = compose_config(
        [
            *QUICK,
            "student=cnn_small",
            "teachers=[cnn_small,mlp_small]",
            "distill=composed",
            f"distill.losses={COMPOSED}",
            "distill.teacher_combine=confidence",
            "baseline=false",
            "arms={hint: {distill: {name: fitnet, hint_epochs: 1}}}",
        ]
    )
    out = tmp_path_factory.mktemp("methods")
    taps = []

    class Recorded(FeatureTap):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            taps.append(self)

    return cfg, out, run_patched(cfg, out, module=assemble, FeatureTap=Recorded), taps


def test_several_teachers_train_into_their_folders(methods_run):
    cfg, out, summary, _ = methods_run
    assert list(summary.index) == ["teacher", "teacher_1", "teacher_ensemble", "distill", "hint"]
    assert (
        summary.loc["teacher", "arch"] == "cnn_small" and summary.loc["teacher_1", "arch"] == "mlp_small"
    )  # the options chosen
    for folder in ("teacher", "teacher_1"):
        assert (out / folder / "best.pt").is_file() and (out / folder / "metrics.csv").is_file()
    expected = recomputed_ensemble_acc(cfg, [out / "teacher" / "best.pt", out / "teacher_1" / "best.pt"])
    assert summary.loc["teacher_ensemble", "test_acc"] == pytest.approx(expected)
    # an ensemble's MACs: the sum over its members
    assert summary.loc["teacher_ensemble", "macs"] == summary.loc[["teacher", "teacher_1"], "macs"].sum()


def test_composed_loss_logs_every_term(methods_run):
    _, out, summary, _ = methods_run
    metrics = pd.read_csv(out / "distill" / "metrics.csv")
    assert {"train_ce", "train_kd", "train_hint", "train_at", "train_tckd", "train_nckd"} <= set(metrics.columns)
    assert metrics[["train_hint", "train_at", "train_tckd", "train_nckd"]].gt(0).all().all()
    assert summary.loc["distill", "distill"] == "composed"


def test_hint_epochs_are_part_of_the_budget(methods_run):
    cfg, out, summary, _ = methods_run
    hint = pd.read_csv(out / "hint" / "metrics.csv")
    assert summary.loc["hint", "steps"] == summary.loc["distill", "steps"]  # the same step budget
    # epoch 1 trains on β·hint alone, epoch 2 on CE + β·hint (fitnet's own defaults: the
    # arm switched losses, so the composed loss's keys did not leak into it)
    assert hint["train_loss"].iloc[0] == pytest.approx(100 * hint["train_hint"].iloc[0], rel=1e-4)
    assert hint["train_loss"].iloc[1] == pytest.approx(
        hint["train_ce"].iloc[1] + 100 * hint["train_hint"].iloc[1], rel=1e-4
    )


def test_adapters_are_saved_apart_from_the_deployable_student(methods_run):
    cfg, out, summary, _ = methods_run
    ckpt = torch.load(out / "distill" / "best.pt", weights_only=True)
    assert {"parts.1.adapters.0.weight", "parts.1.adapters.0.bias"} == set(ckpt["loss_state"])
    assert not any("adapter" in key for key in ckpt["state_dict"])
    model = model_from_checkpoint(ckpt, CodePolicy(), "best.pt")  # what kdcl eval rebuilds: the weights alone
    data = load_data(cfg["dataset"], torch.device("cpu"), True, cfg["seed"])
    acc = evaluate(model, data.test, data, TrainSettings(torch.device("cpu"), 1, 64, 512, amp=False)).acc
    assert acc == pytest.approx(summary.loc["distill", "test_acc"])
    assert "loss_state" not in torch.load(out / "teacher" / "best.pt", weights_only=True)


def test_hooks_are_removed_after_every_stage(methods_run):
    _, _, _, taps = methods_run
    hooked = [tap for tap in taps if tap.refs]
    assert len(hooked) == 4  # student and teacher of distill and of the hint arm
    for tap in hooked:
        assert hooks(tap.model) == 0 and tap.features == {}


def test_hooks_are_removed_when_a_stage_fails(methods_run, compose_cfg, tmp_path, monkeypatch):
    _, out, _, _ = methods_run
    seen = []

    def failing_fit(parts, *args, **kwargs):
        seen.append((hooks(parts.model), parts.model, parts.feed.teacher_at(0).lead))
        raise RuntimeError("stage failed")

    monkeypatch.setattr(stages, "fit", failing_fit)
    cfg = compose_cfg(
        [
            *QUICK,
            "student=cnn_small",
            "distill=at",
            f"teacher.checkpoint={out / 'teacher' / 'best.pt'}",
            "baseline=false",
        ]
    )
    with pytest.raises(RuntimeError, match="stage failed"):
        run_pipeline(cfg, tmp_path)
    ((count, student, teacher),) = seen
    assert count == 3  # hooked while it ran: the student's three stages
    assert hooks(student) == 0 and hooks(teacher) == 0


def test_bad_layer_stops_the_run_before_training(compose_cfg, tmp_path):
    cfg = compose_cfg([*QUICK, "student=cnn_small", "distill=fitnet", "distill.teacher_layer=layer4.2"])
    with pytest.raises(KdclError, match="teacher model .* has no layer 'layer4.2'") as err:
        run_pipeline(cfg, tmp_path)
    assert "0, 1, 2" in err.value.fix
    assert not (tmp_path / "teacher").exists()  # nothing trained


@pytest.fixture(scope="module")
def born_again_run(tmp_path_factory):
    cfg = compose_config([*QUICK, "teacher=cnn_small", "born_again.generations=2", "baseline=false"])
    out = tmp_path_factory.mktemp("born_again")
    teachers = {}
    real_fit = stages.fit

    def spy(parts, *args, **kwargs):
        if parts.feed.teaches:
            teachers[parts.name] = copy.deepcopy(parts.feed.teacher_at(0).lead)
        return real_fit(parts, *args, **kwargs)

    return cfg, out, run_patched(cfg, out, fit=spy), teachers


def test_born_again_runs_generations_and_their_ensemble(born_again_run):
    cfg, out, summary, _ = born_again_run
    assert list(summary.index) == ["teacher", "gen_1", "gen_2", "ensemble"]
    assert (summary.loc[["teacher", "gen_1", "gen_2"], "arch"] == "cnn_small").all()  # the teacher's option
    assert summary.loc["gen_1", "params"] == summary.loc["teacher", "params"]
    assert summary.loc["ensemble", "macs"] == 2 * summary.loc["teacher", "macs"]
    assert summary.loc["gen_2", "steps"] == summary.loc["teacher", "steps"]
    expected = recomputed_ensemble_acc(cfg, [out / "gen_1" / "best.pt", out / "gen_2" / "best.pt"])
    assert summary.loc["ensemble", "test_acc"] == pytest.approx(expected)
    assert summary.loc["ensemble", "kd_gain"] != summary.loc["ensemble", "kd_gain"]  # NaN: no baseline here


def test_born_again_generation_k_learns_from_generation_k_minus_1(born_again_run):
    _, out, _, teachers = born_again_run
    x = torch.randn(16, 1, 8, 8)
    for stage, previous in (("gen_1", "teacher"), ("gen_2", "gen_1")):
        saved = load_model(out / previous / "best.pt", CodePolicy()).eval()
        # the teacher is the previous generation's best model (its BatchNorm folded: equal up to rounding)
        assert torch.allclose(teachers[stage](x), saved(x), atol=1e-4)


# --------------------------------------------------------------------------- noise
class Recorder(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.inner(x)


def one_step(control: DistillControl, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    student, teacher = Recorder(nn.Linear(6, 3)), Recorder(nn.Linear(6, 3))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    feed = OnlineTeacher(
        SimpleNamespace(
            preprocess=SimpleNamespace(training=lambda x, idx, epoch, part: x),
            teacher_at=lambda step: Teachers([teacher]),
            autocast=nullcontext,
            strong=None,
        )
    )
    stage = Stage(
        name="step",
        model=student,
        loss_fn=create_loss({"name": "kd"}),
        control=control,
        plan=DataSchedule(torch.arange(len(x)), len(x), 0),
        optimizer=optimizer,
        lr_schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        out_dir=Path("."),
        meta={},
        feed=feed,
    )
    train_step(
        stage,
        TrainSettings(torch.device("cpu"), 1, len(x), len(x), amp=False),
        0,
        (torch.arange(len(x)), x, y),
        Meter(),
        LossContext(),
    )
    return student.inputs[0], teacher.inputs[0]


def test_input_noise_reaches_the_student_only_and_is_seeded():
    x, y = torch.randn(512, 6), torch.randint(0, 3, (512,))
    noisy_input = control_config(alpha=0.0, temperature=1.0, input_noise=0.5)
    noisy, clean = one_step(DistillControl(noisy_input, 10, 1, None, seed=7), x, y)
    assert torch.equal(clean, x)
    assert (noisy - x).std().item() == pytest.approx(0.5, rel=0.05)
    again, _ = one_step(DistillControl(noisy_input, 10, 1, None, seed=7), x, y)
    other, _ = one_step(DistillControl(noisy_input, 10, 1, None, seed=8), x, y)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_teacher_noise_is_gaussian_on_the_logits_and_seeded():
    z = torch.randn(4096, 10)
    noisy = DistillControl(control_config(teacher_noise=2.0), 10, 1, None, seed=1).teacher_output(z)
    assert (noisy - z).mean().item() == pytest.approx(0.0, abs=0.05)
    assert (noisy - z).std().item() == pytest.approx(2.0, rel=0.03)
    assert torch.equal(noisy, DistillControl(control_config(teacher_noise=2.0), 10, 1, None, seed=1).teacher_output(z))
    assert torch.equal(DistillControl(control_config(), 10, 1, None).teacher_output(z), z)  # off by default


@pytest.mark.slow
def test_method_sweep_shares_the_teacher(cli, tmp_path):
    """``kdcl train -m distill=kd,dkd,fitnet,at``: one job per method, the same teacher in each."""
    sweep = tmp_path / "sweep"
    result = cli(
        "train",
        "-m",
        "distill=kd,dkd,fitnet,at",
        "student=cnn_small",
        "trainer.epochs=1",
        "dataset.max_train_samples=300",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = pd.concat([pd.read_csv(sweep / str(k) / "summary.csv") for k in range(4)], ignore_index=True)
    students = table[table["model"] == "distill"]
    assert students["distill"].tolist() == ["kd", "dkd", "fitnet", "at"]
    assert table[table["model"] == "teacher"]["test_acc"].nunique() == 1
    assert students["steps"].nunique() == 1
