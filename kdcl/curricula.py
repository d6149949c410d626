"""Curricula: difficulty scorers, pacing functions and the step-wise data schedule.

A curriculum orders the training examples by difficulty (a *scorer*) and grows the
pool the student draws batches from (a *pacing* function of the optimizer step).
Everything is measured in optimizer steps: a run with a curriculum takes exactly as
many steps, under the same LR schedule, as one without (Wu, Dyer & Neyshabur 2021).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcl.registry import Registry

SCORERS = Registry("curriculum scorer")
register_scorer = SCORERS.register
PACINGS = Registry("pacing function")
register_pacing = PACINGS.register

Pacing = Callable[[int], float]  # optimizer step -> fraction of the data in use


# --------------------------------------------------------------------------- scorers
# A scorer maps the trained teacher's logits on the training split (no augmentation)
# and the labels to one difficulty per example: higher is harder.


def teacher_loss_and_confidence(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example cross-entropy and probability of the true class."""
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    return loss, torch.exp(-loss)


@register_scorer("teacher_loss")
def teacher_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Difficulty = the trained teacher's cross-entropy on the example ("transfer" scoring,
    Hacohen & Weinshall 2019): ``d_i = −log softmax(z_t(x_i))_{y_i}``."""
    return teacher_loss_and_confidence(logits, labels)[0]


# --------------------------------------------------------------------------- pacing
@register_pacing("linear")
def linear(total_steps: int, start: float, full_at: float) -> Pacing:
    """Linear pacing, Wu, Dyer & Neyshabur (ICLR 2021), "When Do Curricula Work?".

    ``g(t) = min(1, b + (1 − b)·t / (a·T))`` as a fraction of the N examples, where
    ``b = start`` is the starting fraction, ``a = full_at`` the fraction of the T
    total steps at which all data is in use.
    """

    def fraction(step: int) -> float:
        return min(1.0, start + (1 - start) * step / (full_at * total_steps))

    return fraction


def full_data(step: int) -> float:
    """No curriculum: every example is in the pool at every step."""
    return 1.0


# --------------------------------------------------------------------------- schedule
class DataSchedule:
    """Which examples each optimizer step draws its batch from.

    ``order`` lists the training examples easiest first. At step t the pool is the
    first ``n(t) = ceil(N·pacing(t))`` of them. Batches are drawn without replacement
    from a shuffled pool; the pool is reshuffled when it grows or is used up. With the
    full-data pacing and ``steps_per_epoch = ceil(N / batch_size)`` this is exactly
    one random permutation per epoch.
    """

    def __init__(self, order: Tensor, pacing: Pacing, batch_size: int, seed: int):
        self.order = order
        self.pacing = pacing
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._pool: Tensor = order[:0]
        self._pos = 0

    def pool_size(self, step: int) -> int:
        n = len(self.order)
        return max(1, min(n, math.ceil(n * self.pacing(step) - 1e-9)))

    def fraction(self, step: int) -> float:
        return self.pool_size(step) / len(self.order)

    def batches(self, steps: range) -> Iterator[Tensor]:
        for step in steps:
            n = self.pool_size(step)
            if n != len(self._pool) or self._pos >= n:
                self._pool = self.order[:n][torch.randperm(n, generator=self.generator)]
                self._pos = 0
            yield self._pool[self._pos : self._pos + self.batch_size]
            self._pos += self.batch_size
