"""Top-5 accuracy against a hand count."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config

from kdcl.data import load_data
from kdcl.models import create_model
from kdcl.train.engine import TrainSettings, evaluate, top5_accuracy

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- top-5 accuracy
def test_top5_accuracy_by_hand():
    """Every row ranks class k at place k + 1; the labels 0, 1, 4, 5 sit at places 1, 2, 5, 6:
    one top-1 hit in four, three top-5 hits."""
    logits = -torch.arange(12.0).repeat(4, 1)
    labels = torch.tensor([0, 1, 4, 5])
    assert (logits.argmax(1) == labels).float().mean().item() == 0.25
    assert top5_accuracy(logits, labels) == 0.75


@pytest.mark.parametrize(("classes", "measured"), [(10, False), (11, True)])
def test_top5_accuracy_only_above_ten_classes(classes: int, measured: bool):
    value = top5_accuracy(torch.randn(6, classes), torch.zeros(6, dtype=torch.long))
    assert math.isnan(value) != measured


def test_evaluate_takes_top5_from_the_top1_logits():
    """One forward pass per batch gives both accuracies; counted by hand from the logits: the
    label's place is the number of logits above its own."""
    cfg = compose_config(["dataset=fake", "dataset.num_classes=20", "dataset.test_samples=40"])
    data = load_data(cfg["dataset"], CPU, False, 0)
    model = create_model("mlp", num_classes=20, input_shape=data.input_shape, hidden=(8,))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    trainer = TrainSettings(CPU, epochs=0, batch_size=16, eval_batch_size=16, amp=False)
    ev = evaluate(model, data.test, data, trainer)
    assert len(calls) == math.ceil(40 / 16)
    place = (ev.logits > ev.logits.gather(1, ev.labels[:, None])).sum(1)
    assert ev.acc == pytest.approx((place == 0).float().mean().item())
    assert ev.acc_top5 == pytest.approx((place < 5).float().mean().item())
    assert 0 < ev.acc_top5 < 1  # a case where the two differ is tested, not only 0 or 1
