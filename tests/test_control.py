"""Dynamic distillation: α/T schedules, per-example KD weights, CTKD's temperature."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import control_config

from kdcl.distill.control import (
    SAMPLE_WEIGHTS,
    DistillControl,
    LearnableTemperature,
    value_schedule,
)
from kdcl.distill.losses import create_loss, kl_teacher_student


def test_value_schedules():
    assert value_schedule(0.9, None, "linear", 100)(57) == 0.9  # no start: constant
    lin = value_schedule(0.9, 0.1, "linear", 100)
    assert [lin(t) for t in (0, 25, 100)] == pytest.approx([0.1, 0.3, 0.9])
    cos = value_schedule(4.0, 8.0, "cosine", 100)
    for t in (0, 30, 50, 100):
        assert cos(t) == pytest.approx(4.0 + 4.0 * 0.5 * (1 + math.cos(math.pi * t / 100)))
    step = value_schedule(1.0, 0.0, "step", 100)  # milestones 0.5, 0.75, gamma 0.1
    assert [step(t) for t in (0, 49, 50, 80)] == pytest.approx([0.0, 0.0, 0.9, 0.99])


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 5, generator=g) * 3
    target = torch.randint(0, 5, (64,), generator=g)
    return teacher, target


def test_sample_weights_are_in_unit_interval_and_as_documented(batch):
    teacher, target = batch
    rank = torch.rand(64)
    weights = {name: SAMPLE_WEIGHTS.get(name)(teacher, target, rank) for name in SAMPLE_WEIGHTS.names()}
    for name, w in weights.items():
        w = torch.as_tensor(w)
        assert w.min() >= 0 and w.max() <= 1, name
    p_true = torch.softmax(teacher, 1)[torch.arange(64), target]
    assert torch.allclose(weights["teacher_confidence"], p_true)
    correct = teacher.argmax(1) == target
    assert torch.equal(weights["teacher_correct"].bool(), correct) and 0 < correct.sum() < 64
    assert torch.allclose(weights["difficulty"], 1 - rank)
    assert weights["none"] == 1.0


def test_teacher_correct_falls_back_to_cross_entropy(batch):
    teacher, target = batch
    student = torch.randn(64, 5)
    loss = create_loss({"name": "kd"})
    control = DistillControl(control_config(alpha=0.9, temperature=4.0, sample_weight="teacher_correct"), 100, 10, None)
    alpha, temp = control.knobs(0, torch.arange(64), target, teacher)
    per_example = loss(student, teacher, target, alpha, temp)["loss"]
    ce = torch.nn.functional.cross_entropy(student, target, reduction="none")
    wrong = teacher.argmax(1) != target
    assert torch.allclose(per_example[wrong], ce[wrong])
    kd = kl_teacher_student(student, teacher, 4.0)
    assert torch.allclose(per_example[~wrong], 0.1 * ce[~wrong] + 0.9 * kd[~wrong])


def test_ctkd_temperature_reversal_ramp_and_range():
    ctkd = LearnableTemperature(initial=4.0, ramp_steps=100)
    assert ctkd.value().item() == pytest.approx(4.0, rel=1e-4)  # starts at the configured T
    assert [ctkd.reversal_weight(t) for t in (0, 50, 100, 500)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    # The reversal flips the sign of θ's gradient and scales it by λ.
    student, teacher = torch.randn(8, 5), torch.randn(8, 5) * 4
    kl_teacher_student(student, teacher, ctkd(50)).mean().backward()
    reversed_grad = ctkd.theta.grad.clone()
    ctkd.theta.grad = None
    kl_teacher_student(student, teacher, ctkd.value()).mean().backward()
    assert reversed_grad.item() == pytest.approx(-0.5 * ctkd.theta.grad.item(), rel=1e-5)


def test_ctkd_temperature_moves_and_stays_in_range():
    torch.manual_seed(0)
    student = torch.nn.Linear(10, 5)
    teacher = torch.nn.Linear(10, 5)
    loss = create_loss({"name": "kd"})
    control = DistillControl(
        control_config(alpha=0.9, temperature=4.0, learnable_temperature={"ramp_epochs": 1}), 200, 20, None
    )
    opt = torch.optim.SGD([*student.parameters(), *control.parameters()], lr=0.5)
    seen = []
    for step in range(200):
        x = torch.randn(32, 10)
        y = torch.randint(0, 5, (32,))
        with torch.no_grad():
            t = teacher(x) * 5
        alpha, temp = control.knobs(step, torch.arange(32), y, t)
        out = loss(student(x), t, y, alpha, temp)["loss"].mean()
        opt.zero_grad()
        out.backward()
        opt.step()
        seen.append(control.columns()["temperature"])
    assert all(1 < v < 21 for v in seen)
    assert abs(seen[-1] - 4.0) > 0.5  # the adversarial temperature moved


@pytest.mark.parametrize("standardize", [False, True])
def test_control_hands_the_loss_its_logit_standardization(standardize):
    """``distill.logit_standardization`` reaches the loss through the step's context: the KD
    term is the z-scored one exactly when it is set."""
    control = DistillControl(control_config(logit_standardization=standardize), 10, 5, None)
    ctx = control.context(3, ({}, {}))
    assert (ctx.epoch, ctx.logit_standardization) == (3, standardize)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=g) * 4, torch.randn(8, 5, generator=g) * 4
    kd = create_loss({"name": "kd"})(s, t, torch.zeros(8, dtype=torch.long), 0.5, 2.0, ctx)["kd"]
    z = (lambda v: (v - v.mean(1, keepdim=True)) / (v.std(1, keepdim=True) + 1e-7)) if standardize else (lambda v: v)
    assert torch.allclose(kd, kl_teacher_student(z(s), z(t), 2.0), rtol=1e-5)
