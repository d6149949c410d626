"""Several teachers: how their soft targets combine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcl.config.options import teacher_specs
from kdcl.distill.teachers import Teachers
from kdcl.errors import KdclError


class Fixed(nn.Module):
    """A 'model' that returns given logits whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.fixture
def members():
    g = torch.Generator().manual_seed(0)
    return [Fixed(torch.randn(8, 5, generator=g) * 3) for _ in range(3)]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mean_is_the_mean_of_the_soft_targets(members, temperature):
    z = Teachers(members, "mean", temperature=temperature)(torch.zeros(8))
    expected = torch.stack([torch.softmax(m.logits / temperature, 1) for m in members]).mean(0)
    assert torch.allclose(torch.softmax(z / temperature, 1), expected, atol=1e-6)


def test_fixed_weights_are_normalised(members):
    z = Teachers(members, "weights", [2, 1, 1], temperature=2.0)(torch.zeros(8))
    p = [torch.softmax(m.logits / 2, 1) for m in members]
    assert torch.allclose(torch.softmax(z / 2, 1), 0.5 * p[0] + 0.25 * p[1] + 0.25 * p[2], atol=1e-6)
    with pytest.raises(KdclError, match="one weight"):
        Teachers(members, "weights", [1, 1], temperature=2.0)(torch.zeros(8))


def test_confidence_weights_follow_the_true_class(members):
    y = torch.arange(8) % 5
    T = 3.0
    z = Teachers(members, "confidence", temperature=T)(torch.zeros(8), y)
    p_true = torch.stack([torch.softmax(m.logits, 1)[torch.arange(8), y] for m in members])  # (K, B), T = 1
    w = p_true / p_true.sum(0)
    expected = sum(w[k, :, None] * torch.softmax(m.logits / T, 1) for k, m in enumerate(members))
    assert torch.allclose(torch.softmax(z / T, 1), expected, atol=1e-6)
    # A teacher sure of the true class dominates one that is sure of a wrong class.
    sure = torch.full((8, 5), -10.0)
    sure[torch.arange(8), y] = 10.0
    wrong = torch.full((8, 5), -10.0)
    wrong[torch.arange(8), (y + 1) % 5] = 10.0
    combined = torch.softmax(Teachers([Fixed(sure), Fixed(wrong)], "confidence")(torch.zeros(8), y), 1)
    assert (combined.argmax(1) == y).all() and (combined[torch.arange(8), y] > 0.99).all()


def test_one_teacher_passes_its_logits_through(members):
    z = Teachers(members[:1], "confidence", temperature=4.0)(torch.zeros(8), torch.zeros(8, dtype=torch.long))
    assert torch.equal(z, members[0].logits)


def test_teacher_specs_from_options_and_dicts():
    cfg = {"teacher": {"name": "cnn"}, "teachers": ["resnet8", {"name": "mlp", "kwargs": {"hidden": [4]}}]}
    specs = teacher_specs(cfg)
    assert specs[0] == {
        "option": "resnet8",
        "name": "resnet8",
        "kwargs": {},
        "pretrained": False,
        "_target_": None,
        "trust_remote_code": False,
        "checkpoint": None,
    }
    assert specs[1]["name"] == "mlp" and specs[1]["kwargs"] == {"hidden": [4]} and specs[1]["checkpoint"] is None
    assert teacher_specs({**cfg, "teachers": None}) == [{"name": "cnn"}]
    with pytest.raises(KdclError, match="no option 'resnet5'") as err:
        teacher_specs({**cfg, "teachers": ["resnet5"]})
    assert "resnet56" in err.value.fix
