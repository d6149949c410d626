"""The trainer's knobs against their formulas: gradient clipping and fp16's gradient scaler."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

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
