"""kdcl's losses against torchdistill 1.1.5's implementations of the same methods, on the
same inputs, in each library's conventions: torchdistill returns the batch's loss, kdcl one
value per example (whose mean the engine back-propagates); torchdistill's KD ``alpha``
weighs the hard-label term, kdcl's the distillation term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcl.config.options import loss_option
from kdcl.distill.losses import LossContext, create_loss

mid_level = pytest.importorskip("torchdistill.losses.mid_level")

B, C = 32, 10


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


def io(tensor: torch.Tensor) -> dict:
    """torchdistill's I/O dict of a model whose output is ``tensor`` (module path ".")."""
    return {".": {"output": tensor}}


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_kd_equals_torchdistill_kdloss(logits, alpha, temperature):
    s, t, y = logits
    theirs = mid_level.KDLoss(".", "output", ".", "output", temperature=temperature, alpha=1 - alpha)
    ours = create_loss(loss_option("kd"))(s, t, y, alpha, temperature)["loss"].mean()
    assert ours.item() == pytest.approx(theirs(io(s), io(t), y).item(), rel=1e-6)


def test_kd_with_logit_standardization_equals_torchdistill_logitstdkdloss(logits):
    """kd_ls (0.1·CE + 9·T²·KL of z-scored logits at T = 2) is LogitStdKDLoss(T=2, alpha=0.1, beta=9)."""
    s, t, y = logits
    theirs = mid_level.LogitStdKDLoss(".", "output", ".", "output", temperature=2.0, alpha=0.1, beta=9.0)
    loss = create_loss(loss_option("kd_ls"))
    ours = loss(s, t, y, 0.9, 2.0, LossContext(logit_standardization=True))["loss"].mean()
    assert ours.item() == pytest.approx(theirs(io(s), io(t), y).item(), rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_equals_torchdistill_distloss(logits, tau):
    """DISTLoss is the distillation term alone; kdcl adds the CE (weight 1)."""
    s, t, y = logits
    theirs = mid_level.DISTLoss(".", "output", ".", "output", beta=2.0, gamma=3.0, tau=tau)
    out = create_loss({"name": "dist", "beta": 2.0, "gamma": 3.0})(s, t, y, 0.0, tau)
    assert (out["loss"] - out["ce"]).mean().item() == pytest.approx(theirs(io(s), io(t)).item(), rel=1e-6)


def test_crd_equals_torchdistill_crdloss():
    """The same embeddings, banks and contrast indices: the same loss, the same normalisers
    and the same banks after the update (torchdistill's memory_v1 is the student's bank)."""
    g = torch.Generator().manual_seed(1)
    n, dim, k = 50, 8, 6
    theirs = mid_level.CRDLoss("s", "empty", "t", input_size=dim, output_size=n, num_negative_samples=k, num_samples=n)
    ours = create_loss({**loss_option("crd"), "feat_dim": dim, "negatives": k})
    ours.register_buffer("student_bank", theirs.memory_v1.clone())
    ours.register_buffer("teacher_bank", theirs.memory_v2.clone())
    ours.register_buffer("normaliser", torch.full((2,), -1.0))
    idx = torch.randperm(n, generator=g)[: B // 4]
    contrast = torch.cat([idx[:, None], torch.randint(0, n, (len(idx), k), generator=g)], 1)
    e_s = F.normalize(torch.randn(len(idx), dim, generator=g), dim=1)
    e_t = F.normalize(torch.randn(len(idx), dim, generator=g), dim=1)
    ours.embed = lambda ctx: (e_s, e_t)
    ours.contrast_indices = lambda idx, step: contrast
    y = torch.zeros(len(idx), dtype=torch.long)
    logits = torch.zeros(len(idx), 3)
    out = ours(logits, logits, y, 0.0, 4.0, LossContext(indices=idx))
    expected = theirs(
        {"s": {"output": e_s}, "empty": {"input": {"pos_idx": idx, "contrast_idx": contrast}}}, {"t": {"output": e_t}}
    )
    assert out["crd"].mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(ours.normaliser, theirs.params[2:4])
    assert torch.allclose(ours.student_bank, theirs.memory_v1, atol=1e-6)
    assert torch.allclose(ours.teacher_bank, theirs.memory_v2, atol=1e-6)
