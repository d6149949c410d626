"""Batch-level mixup and CutMix (``trainer.mix``): the formulas, the draw, what the teacher
sees, the mixed loss, and the settings refused before training."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import QUICK, compose_config
from torch import nn

from kdcl.config.checks import validate
from kdcl.data import Preprocess
from kdcl.distill.feeds import FeedInputs, build_feed
from kdcl.distill.losses import LossContext, create_loss
from kdcl.distill.mixing import BatchMixer, cutmix, mixup
from kdcl.errors import KdclError
from kdcl.scenarios.standard import run_pipeline

CPU = torch.device("cpu")


def test_mixup_blends_each_image_with_its_partner():
    blend, share = mixup(0.3, (4, 4), np.random.default_rng(0))
    x, partner = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    assert share == 0.3
    torch.testing.assert_close(blend(x, partner), 0.3 * x + 0.7 * partner)


class Centre:
    """A generator whose draws are the middle of their range: a box that is never clipped."""

    def integers(self, n):
        return n // 2


@pytest.mark.parametrize("drawn", [0.0, 0.3, 0.75, 0.99, 1.0])
def test_cutmix_pastes_one_box_and_its_share_is_the_pixels_left(drawn):
    h, w = 12, 10
    blend, share = cutmix(drawn, (h, w), np.random.default_rng(7))
    out = blend(torch.zeros(2, 3, h, w), torch.ones(2, 3, h, w))
    pasted = out[0, 0]
    assert (out == pasted).all()  # every image and channel alike
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    if len(rows):  # one solid rectangle
        assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert share == pytest.approx(1 - pasted.sum().item() / (h * w))
    # unclipped, the box has sides √(1 − λ) of the image's (to the pixel): the share is λ
    assert cutmix(drawn, (1000, 1000), Centre())[1] == pytest.approx(drawn, abs=0.005)


def test_the_draw_is_a_function_of_seed_and_step():
    mixer = BatchMixer({"mixup": 0.2, "cutmix": 1.0}, (8, 8), seed=3)
    a, b = mixer.draw(5, 16, CPU), mixer.draw(5, 16, CPU)
    assert torch.equal(a.partner, b.partner) and a.share == b.share
    assert sorted(a.partner.tolist()) == list(range(16))
    other_step = BatchMixer({"mixup": 0.2}, (8, 8), seed=3).draw(6, 16, CPU)
    other_seed = BatchMixer({"mixup": 0.2}, (8, 8), seed=4).draw(5, 16, CPU)
    same = BatchMixer({"mixup": 0.2}, (8, 8), seed=3).draw(5, 16, CPU)
    assert other_step.share != same.share and other_seed.share != same.share
    assert BatchMixer({"mixup": 0.0, "cutmix": 0.0}, (8, 8), seed=3).draw(5, 16, CPU) is None
    # each method on about half the steps (a CutMix share on 8×8 images is k/64; mixup's is not)
    shares = np.array([mixer.draw(step, 4, CPU).share for step in range(400)])
    assert 160 < (shares * 64 % 1 == 0).sum() < 240
    # mixup's λ ~ Beta(α, α), of mean 1/2 and variance 1 / (4·(2α + 1))
    lams = np.array([BatchMixer({"mixup": 0.2}, (8, 8), seed=3).draw(step, 4, CPU).share for step in range(2000)])
    assert lams.mean() == pytest.approx(0.5, abs=0.03) and lams.var() == pytest.approx(1 / (4 * 1.4), rel=0.1)


def test_the_hard_label_loss_of_a_mixed_batch_is_the_mix_of_both_labels():
    mix = BatchMixer({"mixup": 0.4}, (8, 8), seed=0).draw(0, 6, CPU)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    ctx = LossContext(label_smoothing=0.1, mix=mix)
    lam = mix.share
    expected = lam * F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
        logits, y[mix.partner], reduction="none", label_smoothing=0.1
    )
    torch.testing.assert_close(ctx.cross_entropy(logits, y), expected)
    # KD's loss takes it as its CE term: (1 − α)·CE_mixed + α·T²·KL
    kd = create_loss({"name": "kd"})(logits, torch.randn(6, 5), y, 0.25, 2.0, ctx)
    torch.testing.assert_close(kd["ce"], expected)
    assert torch.equal(mix.labels(y), y if lam >= 0.5 else y[mix.partner])


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, y=None):
        self.seen.append(x.clone())
        return x.flatten(1)[:, :4]


def test_the_online_teacher_sees_the_mixed_images():
    """Function matching: the teacher's logits are of the very images the student sees."""
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    pre = Preprocess([0.5] * 3, [0.25] * 3, crop_padding=2, flip=True, device=CPU, channels_last=False, seed=0)
    teacher = Recording()
    inputs = FeedInputs(pre, None, lambda step: teacher, nullcontext, 4, 8, 0, 1, "memory", Path("."), 1.0)
    feed = build_feed("none", inputs)
    mix = BatchMixer({"cutmix": 1.0}, (8, 8), seed=1).draw(0, 8, CPU)
    student_input, logits = feed(0, 1, torch.arange(8), x, torch.zeros(8, dtype=torch.long), None, mix)
    assert torch.equal(teacher.seen[0], student_input)
    pre.generator.manual_seed(0)
    torch.testing.assert_close(student_input, mix.images(pre(x, train=True)))
    assert mix.share < 1  # a box was pasted


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.mix.mixup=-0.1"], "trainer.mix"),
        (["+trainer.mix.mixupp=0.2"], "trainer.mix.mixupp is not a known batch mix"),
    ],
)
def test_bad_mix_keys_are_refused(overrides, message):
    with pytest.raises(KdclError, match=message):
        validate(compose_config(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.teacher_cache=views:2"], "stores the teacher's logits on unmixed views"),
        (["distill=dkd"], "decomposes the logits around one target class"),
    ],
)
def test_mixing_is_refused_where_it_cannot_hold(tmp_path, overrides, message):
    cfg = compose_config([*QUICK, "trainer.mix.cutmix=1.0", *overrides])
    with pytest.raises(KdclError, match=message):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "teacher" / "metrics.csv").exists()  # refused before anything trained
