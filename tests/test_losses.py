"""Each distillation loss against a direct implementation of its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcl.config.options import loss_option, loss_spec, section_option
from kdcl.distill.losses import LOSSES, LossContext, create_loss, kl_teacher_student, nce_loss
from kdcl.errors import KdclError


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
    out = create_loss(loss_option("kd"))(s, t, y, alpha, temperature)
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
    out = create_loss(loss_option("kd"))(s, t, y, alpha, 2.0)
    expected = (1 - alpha.numpy()) * cross_entropy(s.numpy(), y.numpy()) + alpha.numpy() * 4 * kl(
        softmax(t.numpy() / 2), softmax(s.numpy() / 2)
    )
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
    out = create_loss({**loss_option("mse"), "kl_weight": kl_weight})(s, t, y, alpha, T)
    zs, zt = s.numpy(), t.numpy()
    soft = ((zs - zt) ** 2).mean(axis=1) + kl_weight * T * T * kl(softmax(zt / T), softmax(zs / T))
    expected = (1 - alpha) * cross_entropy(zs, y.numpy()) + alpha * soft
    assert out["loss"].numpy() == pytest.approx(expected, rel=1e-5)
    assert ("kd" in out) == bool(kl_weight)


def test_none_is_cross_entropy_and_needs_no_teacher(logits):
    s, _, y = logits
    loss = create_loss(loss_option("none"))
    assert not loss.needs_teacher
    assert loss(s, None, y)["loss"].numpy() == pytest.approx(cross_entropy(s.numpy(), y.numpy()), rel=1e-6)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_has_a_formula_docstring(name):
    doc = LOSSES.get(name).__doc__
    assert doc and "L = " in doc


def test_unknown_loss_lists_choices():
    with pytest.raises(KdclError, match="kd") as err:
        create_loss({"name": "kdd"})
    assert "unknown distillation loss 'kdd'" in str(err.value)


# --------------------------------------------------------------------------- soft CE, focal, DKD
def soft_targets(zt: np.ndarray, zs: np.ndarray, T: float) -> tuple[np.ndarray, np.ndarray]:
    return softmax(zt / T), softmax(zs / T)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_ce_equals_formula(logits, temperature):
    s, t, y = logits
    alpha = 0.7
    out = create_loss(loss_option("soft_ce"))(s, t, y, alpha, temperature)
    p, q = soft_targets(t.numpy(), s.numpy(), temperature)
    soft = temperature**2 * -(p * np.log(q)).sum(axis=1)  # H(p_t, q_s), teacher → student
    assert out["soft_ce"].numpy() == pytest.approx(soft, rel=1e-5)
    assert out["loss"].numpy() == pytest.approx(
        (1 - alpha) * cross_entropy(s.numpy(), y.numpy()) + alpha * soft, rel=1e-5
    )
    # H(p, q) = KL(p‖q) + H(p): the same gradients as kd, larger by the teacher's entropy.
    entropy = temperature**2 * -(p * np.log(p)).sum(axis=1)
    assert soft == pytest.approx(temperature**2 * kl(p, q) + entropy, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_equals_formula(logits, gamma):
    s, t, y = logits
    alpha, T = 0.8, 3.0
    out = create_loss({**loss_option("focal"), "gamma": gamma})(s, t, y, alpha, T)
    p, q = soft_targets(t.numpy(), s.numpy(), T)
    focal = T * T * -(p * (1 - q) ** gamma * np.log(q)).sum(axis=1)
    assert out["focal"].numpy() == pytest.approx(focal, rel=1e-5)
    assert out["loss"].numpy() == pytest.approx(
        (1 - alpha) * cross_entropy(s.numpy(), y.numpy()) + alpha * focal, rel=1e-5
    )
    if gamma == 0:  # γ = 0 is the soft cross-entropy
        soft = create_loss(loss_option("soft_ce"))(s, t, y, alpha, T)["soft_ce"]
        assert out["focal"].numpy() == pytest.approx(soft.numpy(), rel=1e-6)


def test_focal_with_one_hot_targets_is_lin_et_al():
    """A one-hot teacher at T = 1 gives Lin et al.'s −(1 − q_y)^γ·log q_y."""
    s = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 5
    one_hot = torch.nn.functional.one_hot(y, 5).double() * 200  # softmax ≈ one-hot
    q = softmax(s.numpy())[np.arange(8), y.numpy()]
    out = create_loss({**loss_option("focal"), "gamma": 2.0})(s, one_hot, y, 1.0, 1.0)
    assert out["focal"].numpy() == pytest.approx(-((1 - q) ** 2) * np.log(q), rel=1e-5)


def dkd_terms(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, T: float) -> tuple[np.ndarray, np.ndarray]:
    """DKD's parts from the paper's definitions: b = (p_y, 1 − p_y); p̂_i = p_i / (1 − p_y), i ≠ y."""
    ps, pt = softmax(zs / T), softmax(zt / T)
    rows = np.arange(len(y))
    bs = np.stack([ps[rows, y], 1 - ps[rows, y]], 1)
    bt = np.stack([pt[rows, y], 1 - pt[rows, y]], 1)
    other = np.ones_like(ps, dtype=bool)
    other[rows, y] = False
    hat_s = ps[other].reshape(len(y), -1) / bs[:, 1:]
    hat_t = pt[other].reshape(len(y), -1) / bt[:, 1:]
    return T * T * kl(bt, bs), T * T * kl(hat_t, hat_s)


@pytest.mark.parametrize(("epoch", "warm"), [(1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)])
def test_dkd_equals_formula_with_warmup(logits, epoch, warm):
    s, t, y = logits
    T, a, b = 4.0, 1.0, 8.0
    loss = create_loss({**loss_option("dkd"), "tckd_weight": a, "nckd_weight": b, "warmup_epochs": 4})
    out = loss(s, t, y, 0.9, T, LossContext(epoch=epoch))
    tckd, nckd = dkd_terms(s.numpy(), t.numpy(), y.numpy(), T)
    # float32 KL of nearly equal binary distributions: an absolute tolerance
    assert out["tckd"].numpy() == pytest.approx(tckd, rel=1e-5, abs=1e-5)
    assert out["nckd"].numpy() == pytest.approx(nckd, rel=1e-5, abs=1e-5)
    # CE weight 1 (distill.alpha unused), the DKD term ramped in linearly
    expected = cross_entropy(s.numpy(), y.numpy()) + warm * (a * tckd + b * nckd)
    assert out["loss"].numpy() == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_dkd_decomposes_kd(logits):
    """Zhao et al. (2022), Eq. 4: KD = TCKD + (1 − p_t,y)·NCKD (at the same T, with T²)."""
    s, t, y = logits
    T = 2.0
    out = create_loss({**loss_option("dkd"), "warmup_epochs": 0})(s, t, y, 0.0, T)
    pt_y = softmax(t.numpy() / T)[np.arange(16), y.numpy()]
    kd = kl_teacher_student(s, t, T).numpy()
    assert kd == pytest.approx(out["tckd"].numpy() + (1 - pt_y) * out["nckd"].numpy(), rel=1e-5, abs=1e-5)


# --------------------------------------------------------------------------- feature methods
@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(3)
    return {
        "s_map": torch.randn(16, 4, 8, 8, generator=g, dtype=torch.float64),
        "t_map": torch.randn(16, 6, 4, 4, generator=g, dtype=torch.float64),
        "s_map2": torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64),
        "t_map2": torch.randn(16, 5, 4, 4, generator=g, dtype=torch.float64),
    }


def test_fitnet_equals_formula(logits, feats):
    s, t, y = logits
    alpha, T, beta = 0.3, 4.0, 100.0
    loss = create_loss({**loss_option("fitnet"), "beta": beta})
    loss.connect([("a", "b")], [((4, 8, 8), (6, 4, 4))])
    loss.double()
    ctx = LossContext(2, {"a": feats["s_map"]}, {"b": feats["t_map"]})
    out = loss(s, t, y, alpha, T, ctx)
    conv = loss.adapters[0]  # a 1×1 convolution 4 → 6, then the 8×8 map pooled to 4×4
    w, bias = conv.weight.detach().numpy()[:, :, 0, 0], conv.bias.detach().numpy()
    regressed = np.einsum("oc,bchw->bohw", w, feats["s_map"].numpy()) + bias[None, :, None, None]
    pooled = regressed.reshape(16, 6, 4, 2, 4, 2).mean(axis=(3, 5))
    hint = ((pooled - feats["t_map"].numpy()) ** 2).reshape(16, -1).mean(axis=1)
    assert out["hint"].detach().numpy() == pytest.approx(hint, rel=1e-6)
    kd = T * T * kl(softmax(t.numpy() / T), softmax(s.numpy() / T))
    expected = (1 - alpha) * cross_entropy(s.numpy(), y.numpy()) + alpha * kd + beta * hint
    assert out["loss"].detach().numpy() == pytest.approx(expected, rel=1e-6)


def test_fitnet_hint_epochs_train_on_the_hint_alone(logits, feats):
    s, t, y = logits
    loss = create_loss({**loss_option("fitnet"), "beta": 10.0, "hint_epochs": 2})
    loss.connect([("a", "b")], [((4, 8, 8), (6, 4, 4))])
    loss.double()
    for epoch in (1, 2, 3):
        out = loss(s, t, y, 0.0, 4.0, LossContext(epoch, {"a": feats["s_map"]}, {"b": feats["t_map"]}))
        hint_only = 10.0 * out["hint"]
        assert torch.allclose(out["loss"], hint_only) == (epoch <= 2)


def attention(a: np.ndarray, p: float = 2.0) -> np.ndarray:
    q = (np.abs(a) ** p).sum(axis=1).reshape(len(a), -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_attention_transfer_equals_formula(logits, feats):
    s, t, y = logits
    alpha, T, beta = 0.0, 4.0, 1000.0
    loss = create_loss({**loss_option("at"), "beta": beta})
    loss.connect([("a", "b"), ("c", "d")], [((4, 8, 8), (6, 4, 4)), ((3, 4, 4), (5, 4, 4))])
    ctx = LossContext(1, {"a": feats["s_map"], "c": feats["s_map2"]}, {"b": feats["t_map"], "d": feats["t_map2"]})
    out = loss(s, t, y, alpha, T, ctx)
    pooled = feats["s_map"].numpy().reshape(16, 4, 4, 2, 4, 2).mean(axis=(3, 5))  # the larger map pooled
    at = ((attention(pooled) - attention(feats["t_map"].numpy())) ** 2).mean(axis=1) + (
        (attention(feats["s_map2"].numpy()) - attention(feats["t_map2"].numpy())) ** 2
    ).mean(axis=1)
    assert out["at"].numpy() == pytest.approx(at, rel=1e-5)
    assert out["loss"].numpy() == pytest.approx(cross_entropy(s.numpy(), y.numpy()) + beta * at, rel=1e-5)


def test_attention_transfer_refuses_vectors():
    loss = create_loss(loss_option("at"))
    with pytest.raises(KdclError, match="needs spatial feature maps") as err:
        loss.connect([("5:input", "10")], [((100,), (32, 8, 8))])
    assert "5:input" in str(err.value) and "cnn_small" in err.value.fix


# --------------------------------------------------------------------------- composition
def test_composed_sums_weighted_terms(logits, feats):
    s, t, y = logits
    alpha, T = 0.9, 4.0
    spec = {
        "name": "composed",
        "alpha": alpha,
        "losses": [
            {"name": "kd", "weight": 0.9},
            {"name": "fitnet", "weight": 100.0},
            {"name": "dkd", "weight": 2.0, "warmup_epochs": 0},
            {"name": "soft_ce", "weight": 0.5},
        ],
    }
    loss = create_loss(loss_spec(spec))
    loss.parts[1].connect([("a", "b")], [((4, 8, 8), (6, 4, 4))])
    loss.double()
    ctx = LossContext(1, {"a": feats["s_map"]}, {"b": feats["t_map"]})
    out = {k: v.detach().numpy() for k, v in loss(s, t, y, alpha, T, ctx).items()}
    assert set(out) == {"loss", "ce", "kd", "hint", "tckd", "nckd", "soft_ce"}  # every term, once
    kd = T * T * kl(softmax(t.numpy() / T), softmax(s.numpy() / T))
    tckd, nckd = dkd_terms(s.numpy(), t.numpy(), y.numpy(), T)
    distill = 0.9 * kd + 100 * out["hint"] + 2 * (tckd + 8 * nckd) + 0.5 * out["soft_ce"]
    ce = cross_entropy(s.numpy(), y.numpy())
    assert out["loss"] == pytest.approx((1 - alpha) * ce + distill, rel=1e-5)
    # A per-example α (e.g. teacher_correct weights) moves every term with it: 0 → plain CE.
    per_example = torch.tensor([0.0, alpha] * 8, dtype=torch.float64)
    moved = loss(s, t, y, per_example, T, ctx)["loss"].detach().numpy()
    assert moved[0::2] == pytest.approx(ce[0::2], rel=1e-6)
    assert moved[1::2] == pytest.approx(out["loss"][1::2], rel=1e-6)


def test_composed_repeated_terms_get_their_position(logits):
    s, t, y = logits
    loss = create_loss(
        loss_spec({"name": "composed", "alpha": 0.9, "losses": [{"name": "kd"}, {"name": "kd", "weight": 2.0}]})
    )
    out = loss(s, t, y, 0.9, 2.0)
    assert set(out) == {"loss", "ce", "kd", "kd_1"}
    assert torch.allclose(out["kd"], out["kd_1"])


def test_composed_needs_losses_and_bad_keys_are_named():
    with pytest.raises(KdclError, match="no losses"):
        create_loss(loss_spec({"name": "composed", "alpha": 0.9, "losses": []}))
    with pytest.raises(KdclError, match="distill=dkd") as err:
        create_loss({**loss_option("dkd"), "kl_weight": 1.0})
    assert "nckd_weight" in err.value.fix


def test_alpha_and_temperature_are_not_the_loss_keys():
    """The control owns α and T and passes them every step: a loss takes neither (composed
    alone takes alpha, the α₀ its weights are given at)."""
    with pytest.raises(KdclError, match=r"distill=kd: .*alpha") as err:
        create_loss({**loss_option("kd"), "alpha": 0.9})
    assert err.value.fix == "kd takes no keys of its own"
    with pytest.raises(KdclError, match=r"distill=lwf: .*temperature"):
        create_loss({**loss_option("lwf"), "lam": 1.0, "temperature": 2.0})


@pytest.mark.parametrize("name", LOSSES.names())
def test_no_loss_keeps_alpha_or_temperature(name):
    loss = create_loss(loss_option(name))
    assert not hasattr(loss, "alpha") and not hasattr(loss, "temperature")


def z_score(z: np.ndarray) -> np.ndarray:
    """Sun et al. (2024): (z − mean) / (std + 1e-7) per row, std with Bessel's correction."""
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_with_logit_standardization_equals_formula(logits, temperature):
    """KD + LS: T²·KL(softmax(Z(z_t)/T) ‖ softmax(Z(z_s)/T)); the CE keeps the raw logits."""
    s, t, y = logits
    out = create_loss(loss_option("kd"))(s, t, y, 0.9, temperature, LossContext(logit_standardization=True))
    zs, zt, yy = s.numpy(), t.numpy(), y.numpy()
    soft = temperature**2 * kl(softmax(z_score(zt) / temperature), softmax(z_score(zs) / temperature))
    assert out["kd"].numpy() == pytest.approx(soft, rel=1e-5)
    assert out["ce"].numpy() == pytest.approx(cross_entropy(zs, yy), rel=1e-5)
    assert out["loss"].numpy() == pytest.approx(0.1 * cross_entropy(zs, yy) + 0.9 * soft, rel=1e-5)
    plain = create_loss(loss_option("kd"))(s, t, y, 0.9, temperature)["kd"]
    assert np.abs(plain.numpy() - soft).max() > 1e-2  # standardization changes the term on these logits


def test_logit_standardization_ignores_each_models_logit_scale(logits):
    """Z-scored, the distillation term depends only on the logits' relations: scaling and
    shifting either model's logits per example leaves it unchanged (plain KD changes)."""
    s, t, y = logits
    scale = torch.linspace(0.5, 4, 16, dtype=torch.float64)[:, None]
    moved_t, moved_s = t * scale + 3.0, s * scale.flip(0) - 1.0
    loss = create_loss(loss_option("dkd"))
    ls = LossContext(epoch=100, logit_standardization=True)
    before, after = loss(s, t, y, 0.0, 2.0, ls), loss(moved_s, moved_t, y, 0.0, 2.0, ls)
    for term in ("tckd", "nckd"):
        assert after[term].numpy() == pytest.approx(before[term].numpy(), rel=1e-4, abs=1e-6)
    assert (
        np.abs(loss(moved_s, moved_t, y, 0.0, 2.0)["nckd"].numpy() - loss(s, t, y, 0.0, 2.0)["nckd"].numpy()).max()
        > 1e-2
    )


def test_logit_standardization_reaches_the_kd_term_of_feature_methods(logits, feats):
    s, t, y = logits
    loss = create_loss({**loss_option("fitnet"), "student_layer": "a", "teacher_layer": "b"})
    loss.connect([("a", "b")], [((4, 8, 8), (6, 4, 4))])
    loss.double()
    ctx = LossContext(2, {"a": feats["s_map"]}, {"b": feats["t_map"]}, logit_standardization=True)
    out = loss(s, t, y, 0.5, 4.0, ctx)
    expected = 16 * kl(softmax(z_score(t.numpy()) / 4), softmax(z_score(s.numpy()) / 4))
    assert out["kd"].detach().numpy() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_equals_formula(logits, temperature):
    """DIST (Huang et al. 2022): CE + β·T²·(1 − ρ per example) + γ·T²·(1 − mean over classes
    of ρ across the batch), ρ Pearson's correlation, here from numpy's corrcoef."""
    s, t, y = logits
    beta, gamma = 2.0, 3.0
    out = create_loss({"name": "dist", "beta": beta, "gamma": gamma})(s, t, y, 0.7, temperature)
    ps, pt = softmax(s.numpy() / temperature), softmax(t.numpy() / temperature)
    inter = temperature**2 * np.array([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(ps, pt)])
    intra = temperature**2 * (1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(7)]))
    assert out["inter"].numpy() == pytest.approx(inter, rel=1e-4, abs=1e-6)
    assert out["intra"].numpy() == pytest.approx(np.full(16, intra), rel=1e-4)
    expected = cross_entropy(s.numpy(), y.numpy()) + beta * inter + gamma * intra  # α unused: CE weight 1
    assert out["loss"].numpy() == pytest.approx(expected, rel=1e-4)


def test_dist_matches_relations_not_values(logits):
    """Both relation terms vanish when the student's probabilities are an affine image of
    the teacher's (here a mix with the uniform distribution), where KD does not."""
    _, t, y = logits
    pt = torch.softmax(t / 4, 1)
    s = torch.log(0.5 * pt + 0.5 / 7) * 4  # softmax(s/4) = 0.5·p_t + 0.5·uniform
    out = create_loss({"name": "dist", "beta": 1.0, "gamma": 1.0})(s, t, y, 0.0, 4.0)
    assert out["inter"].abs().max() < 2e-4 and out["intra"].abs().max() < 2e-4  # float32 rounding, times T²
    assert kl_teacher_student(s, t, 4.0).min() > 1e-2


# --------------------------------------------------------------------------- MLKD
def mlkd_reference(
    s: np.ndarray, t: np.ndarray, y: np.ndarray, temperatures, standardize=False, ce_weight=0.1, kd_weight=0.9
) -> float:
    """The batch loss of the MLKD authors' code (its loss dict summed), re-derived in numpy:
    the CE of both views times its CE weight; batch-mean KL, class and batch correlation
    losses, each multiplied by a 0/1 confidence mask and averaged, at every temperature,
    each times its KD weight (the code's defaults, 0.1 and 0.9); strong-view KL at every T
    on the strong logits."""
    b = len(y)
    zs = z_score(s) if standardize else s
    zt = z_score(t) if standardize else t
    sw, ss, tw, ts = zs[:b], zs[b:], zt[:b], zt[b:]
    p_teacher = softmax(t[:b])  # the masks: raw logits, T = 1
    conf = p_teacher.max(1)
    mask = (conf <= np.percentile(conf, 50)).astype(float)
    class_conf = p_teacher.sum(0)
    class_mask = (class_conf <= np.percentile(class_conf, 50)).astype(float)
    total = ce_weight * (cross_entropy(s[:b], y).mean() + cross_entropy(s[b:], y).mean())
    for temp in temperatures:
        kd_w = temp**2 * kl(softmax(tw / temp), softmax(sw / temp)).mean()
        kd_s = temp**2 * kl(softmax(ts / temp), softmax(ss / temp)).mean()
        pw_s, pw_t = softmax(s[:b] / temp), softmax(t[:b] / temp)  # CC and BC: raw logits, even with LS
        cc = ((pw_t.T @ pw_t - pw_s.T @ pw_s) ** 2).sum() / s.shape[1]
        bc = ((pw_t @ pw_t.T - pw_s @ pw_s.T) ** 2).sum() / b
        total += kd_weight * ((kd_w * mask).mean() + kd_s + (cc * class_mask).mean() + (bc * mask).mean())
    return total


@pytest.mark.parametrize("standardize", [False, True])
def test_mlkd_equals_the_authors_loss(standardize):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(32, 7, generator=g, dtype=torch.float64) * 3  # 16 plain views, then 16 strong ones
    t = torch.randn(32, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (16,), generator=g)
    loss = create_loss(loss_option("mlkd"))  # the option's weights: the authors' 0.1 and 0.9
    assert loss.views == 2
    out = loss(s, t, y, 0.7, 9.0, LossContext(logit_standardization=standardize))  # α and T unused
    assert out["loss"].shape == (16,)  # one value per example: the engine averages them
    expected = mlkd_reference(s.numpy(), t.numpy(), y.numpy(), [2, 3, 4, 5, 6], standardize)
    assert out["loss"].mean().item() == pytest.approx(expected, rel=1e-6)  # the loss computes in float32
    weighted = create_loss({"name": "mlkd", "temperatures": [2, 3, 4, 5, 6], "ce_weight": 1.0, "kd_weight": 2.0})
    expected = mlkd_reference(s.numpy(), t.numpy(), y.numpy(), [2, 3, 4, 5, 6], standardize, 1.0, 2.0)
    out = weighted(s, t, y, 0.7, 9.0, LossContext(logit_standardization=standardize))
    assert out["loss"].mean().item() == pytest.approx(expected, rel=1e-6)
    assert out["ce"].numpy() == pytest.approx(cross_entropy(s[:16].numpy(), y.numpy()), rel=1e-6)


def test_mlkd_ls_is_the_logit_standardization_authors_setting():
    """distill=mlkd_ls: z-scored KL terms, raw correlation terms, temperatures 2, 3, 5, 2, 6,
    CE weight 0.1, KD weight 9."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(32, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randn(32, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (16,), generator=g)
    option = section_option("distill", "mlkd_ls")
    assert option["logit_standardization"] is True
    out = create_loss(loss_spec(option))(s, t, y, 0.0, 1.0, LossContext(logit_standardization=True))
    expected = mlkd_reference(s.numpy(), t.numpy(), y.numpy(), [2, 3, 5, 2, 6], True, 0.1, 9.0)
    assert out["loss"].mean().item() == pytest.approx(expected, rel=1e-6)


def test_mlkd_weighs_the_plain_views_by_the_share_of_unsure_examples():
    """Teacher confidences rise from example to example, so half the batch is at or below
    the median (m = 1/2), and so are 2 of the 4 classes' summed probabilities (m_c = 1/2)."""
    g = torch.Generator().manual_seed(2)
    t = torch.zeros(32, 4, dtype=torch.float64)
    t[:16, 0] = torch.arange(16) * 0.5  # confidence increasing in the example
    t[:16, 1:] = torch.tensor([0.3, 0.2, 0.1])  # distinct class sums
    s, y = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.zeros(16, dtype=torch.long)
    out = create_loss({"name": "mlkd", "temperatures": [1, 4], "ce_weight": 1.0, "kd_weight": 1.0})(s, t, y, 0.0, 1.0)
    class_sums = softmax(t[:16].numpy()).sum(0)
    m_c = (class_sums <= np.percentile(class_sums, 50)).mean()
    rest = out["loss"] - out["ce"] - out["ce_strong"] - out["kd_strong"] - m_c * out["cc"]
    assert m_c == 0.5
    assert (rest / (out["kd"] + out["bc"])).numpy() == pytest.approx(np.full(16, 0.5))
    kd_w = sum(tt**2 * kl(softmax(t[:16].numpy() / tt), softmax(s[:16].numpy() / tt)) for tt in (1, 4))
    assert out["kd"].numpy() == pytest.approx(kd_w, rel=1e-5)  # float32


def test_mlkd_refuses_bad_temperatures_and_composition():
    with pytest.raises(KdclError, match="temperatures"):
        create_loss({"name": "mlkd", "temperatures": [], "ce_weight": 0.1, "kd_weight": 0.9})
    with pytest.raises(KdclError, match="cannot hold mlkd: it compares 2 views"):
        create_loss(
            {
                "name": "composed",
                "alpha": 0.5,
                "losses": [{"name": "kd"}, {"name": "mlkd", "temperatures": [4], "ce_weight": 0.1, "kd_weight": 0.9}],
            }
        )


# --------------------------------------------------------------------------- CRD
def test_nce_loss_equals_formula():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 9, generator=g, dtype=torch.float64) * 2
    n, k = 1000, 8
    s = scores.numpy()
    expected = -(np.log(s[:, 0] / (s[:, 0] + k / n + 1e-7)) + np.log((k / n) / (s[:, 1:] + k / n + 1e-7)).sum(1))
    assert nce_loss(scores, n).numpy() == pytest.approx(expected, rel=1e-10)


def crd_setup(negatives=5, n=20):
    torch.manual_seed(0)
    loss = create_loss(
        {**loss_option("crd"), "negatives": negatives, "feat_dim": 6, "student_layer": "a", "teacher_layer": "b"}
    )
    loss.connect([("a", "b")], [((4,), (3,))])
    loss.register_buffer("student_bank", F.normalize(torch.randn(n, 6), dim=1))
    loss.register_buffer("teacher_bank", F.normalize(torch.randn(n, 6), dim=1))
    loss.register_buffer("normaliser", torch.full((2,), -1.0))
    loss.register_buffer("negatives_seed", torch.tensor(0))
    loss.load_state_dict({**loss.state_dict(), "negatives_seed": torch.tensor(7)})  # also the host's copy
    return loss


def test_crd_draws_its_negatives_from_the_seed_it_loaded():
    """Each step reads the seed's host copy (no sync), which loading a state sets again."""
    loss, other = crd_setup(), crd_setup()
    other.load_state_dict({**other.state_dict(), "negatives_seed": torch.tensor(8)})
    idx = torch.arange(4)
    assert not torch.equal(other.contrast_indices(idx, 1), loss.contrast_indices(idx, 1))
    loss.load_state_dict(other.state_dict())
    assert torch.equal(loss.contrast_indices(idx, 1), other.contrast_indices(idx, 1))


def test_crd_equals_formula_and_moves_the_banks():
    """Tian et al. (2020): each side's embedding scored against the other side's bank,
    exp(e·m/τ)/Z with Z fixed on the first batch, the NCE loss of the positive; then
    m_i ← normalise(μ·m_i + (1 − μ)·e_i)."""
    loss = crd_setup()
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(3, 4, generator=g), torch.randn(3, 3, generator=g)
    idx = torch.tensor([4, 0, 19])
    banks = {name: getattr(loss, name).clone() for name in ("student_bank", "teacher_bank")}
    ctx = LossContext(1, {"a": fs}, {"b": ft}, step=3, indices=idx)
    out = loss(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 0.0, 4.0, ctx)
    contrast = loss.contrast_indices(idx, 3)
    assert torch.equal(contrast[:, 0], idx) and not (contrast[:, 1:] == idx[:, None]).any()
    e_s = F.normalize(fs @ loss.heads[0].weight.T + loss.heads[0].bias, dim=1).detach()
    e_t = F.normalize(ft @ loss.heads[1].weight.T + loss.heads[1].bias, dim=1).detach()

    def side(e, bank):
        raw = torch.exp((bank[contrast] * e[:, None]).sum(2) / 0.07)
        return nce_loss(raw / (raw.mean() * 20), 20)

    expected = side(e_s, banks["teacher_bank"]) + side(e_t, banks["student_bank"])
    assert out["crd"].detach().numpy() == pytest.approx(expected.numpy(), rel=1e-4)
    assert torch.allclose(loss.student_bank[idx], F.normalize(banks["student_bank"][idx] * 0.5 + e_s * 0.5, dim=1))
    assert torch.equal(loss.teacher_bank[1:4], banks["teacher_bank"][1:4])  # entries outside the batch stay
    assert (loss.normaliser > 0).all()


def test_crd_state_makes_the_next_step_exact():
    """The banks, Z and the negatives' seed are the loss's state: a copy loaded from it
    computes the next step exactly as the original does (what resume.pt relies on)."""
    loss = crd_setup()
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g), torch.randperm(20)[:4]) for _ in range(3)
    ]
    zeros, y = torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)

    def step(module, t):
        fs, ft, idx = batches[t]
        return module(zeros, zeros, y, 0.0, 4.0, LossContext(1, {"a": fs}, {"b": ft}, step=t, indices=idx))["crd"]

    step(loss, 0)
    copy = crd_setup()
    copy.load_state_dict(loss.state_dict())
    for t in (1, 2):
        assert torch.equal(step(copy, t), step(loss, t))
    assert not torch.equal(loss.contrast_indices(batches[1][2], 1), loss.contrast_indices(batches[1][2], 2))
