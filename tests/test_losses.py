"""Each distillation loss against a direct implementation of its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcl.errors import KdclError
from kdcl.losses import LOSSES, create_loss, kl_teacher_student


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per example: −log softmax(z)_y."""
    return -np.log(softmax(z)[np.arange(len(y)), y])


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per example: KL(p‖q) = Σ p log(p/q)."""
    return (p * np.log(p / q)).sum(axis=1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randn(16, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (16,), generator=g)
    return s, t, y


@pytest.mark.parametrize("temperature", [1.0, 4.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.9, 1.0])
def test_kd_equals_hinton_formula(logits, alpha, temperature):
    s, t, y = logits
    out = create_loss({"name": "kd", "alpha": alpha, "temperature": temperature})(s, t, y, alpha, temperature)
    zs, zt, yy = s.numpy(), t.numpy(), y.numpy()
    soft = temperature**2 * kl(softmax(zt / temperature), softmax(zs / temperature))
    expected = (1 - alpha) * cross_entropy(zs, yy) + alpha * soft
    assert out["loss"].shape == (16,)  # one value per example
    assert out["loss"].numpy() == pytest.approx(expected, rel=1e-5)
    assert out["kd"].numpy() == pytest.approx(soft, rel=1e-5)
    assert out["ce"].numpy() == pytest.approx(cross_entropy(zs, yy), rel=1e-5)


def test_kd_per_example_alpha(logits):
    """A per-example α (from teacher trust) mixes CE and KD example by example."""
    s, t, y = logits
    alpha = torch.linspace(0, 1, 16, dtype=torch.float64)
    out = create_loss({"name": "kd", "alpha": 0.9, "temperature": 2.0})(s, t, y, alpha, 2.0)
    expected = (1 - alpha.numpy()) * cross_entropy(s.numpy(), y.numpy()) + alpha.numpy() * 4 * kl(
        softmax(t.numpy() / 2), softmax(s.numpy() / 2))
    assert out["loss"].numpy() == pytest.approx(expected, rel=1e-5)


def test_kd_direction_is_teacher_to_student(logits):
    s, t, _ = logits
    T = 4.0
    forward = T * T * kl(softmax(t.numpy() / T), softmax(s.numpy() / T))
    reverse = T * T * kl(softmax(s.numpy() / T), softmax(t.numpy() / T))
    assert np.abs(forward - reverse).mean() > 1e-3  # the two directions differ on these logits
    assert kl_teacher_student(s, t, T).numpy() == pytest.approx(forward, rel=1e-5)


def test_kd_t_squared_keeps_gradient_scale(logits):
    """With T² the soft-term gradient stays O(1) as T grows (Hinton et al. 2015, §2.1);
    without it, it would shrink like 1/T²."""
    s, t, _ = logits
    norms = []
    for T in (2.0, 8.0):
        z = s.clone().requires_grad_(True)
        kl_teacher_student(z, t, T).mean().backward()
        norms.append(z.grad.norm().item())
    assert 0.25 < norms[1] / norms[0] < 4  # 1/T² scaling would give 1/16


def test_kd_is_zero_when_student_equals_teacher(logits):
    _, t, _ = logits
    assert kl_teacher_student(t, t, 4.0).abs().max().item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_mse_equals_formula(logits, kl_weight):
    s, t, y = logits
    alpha, T = 0.7, 3.0
    out = create_loss({"name": "mse", "alpha": alpha, "temperature": T, "kl_weight": kl_weight})(s, t, y, alpha, T)
    zs, zt = s.numpy(), t.numpy()
    soft = ((zs - zt) ** 2).mean(axis=1) + kl_weight * T * T * kl(softmax(zt / T), softmax(zs / T))
    expected = (1 - alpha) * cross_entropy(zs, y.numpy()) + alpha * soft
    assert out["loss"].numpy() == pytest.approx(expected, rel=1e-5)
    assert ("kd" in out) == bool(kl_weight)


def test_none_is_cross_entropy_and_needs_no_teacher(logits):
    s, _, y = logits
    loss = create_loss({"name": "none", "alpha": 0.5, "temperature": 2.0})
    assert not loss.needs_teacher
    assert loss(s, None, y)["loss"].numpy() == pytest.approx(cross_entropy(s.numpy(), y.numpy()), rel=1e-6)


def test_every_loss_has_a_formula_docstring():
    for name in LOSSES.names():
        doc = LOSSES.get(name).__doc__
        assert doc and "L = " in doc, name


def test_unknown_loss_lists_choices():
    with pytest.raises(KdclError, match="kd") as err:
        create_loss({"name": "kdd"})
    assert "unknown distillation loss 'kdd'" in str(err.value)
