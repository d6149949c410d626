"""Dynamic distillation: α and T per optimizer step, CTKD's learnable temperature,
per-example KD weights from the teacher, and noise ("denoising" distillation).

:class:`DistillControl` owns α and T: built from the control's keys of the ``distill``
section (``alpha``, ``temperature``, their schedules, …; :class:`kdcl.config.schema.ControlConfig`),
it gives the engine, at every step, the ``alpha`` (a scalar, or one value per example)
and ``temperature`` (a float, or a learnable tensor) that the loss is called with, the
student's input and the teacher's logits with any configured noise, and the values to
log per epoch. The loss never holds them: they go one way, control → loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdcl.distill.losses import LossContext, Weight
from kdcl.optim import SCHEDULES
from kdcl.registry import Registry

SAMPLE_WEIGHTS: Registry[Callable[[Tensor, Tensor, Tensor | None], Weight]] = Registry("KD sample weight")
register_sample_weight = SAMPLE_WEIGHTS.register


# --------------------------------------------------------------------------- per-example KD weights
# Each returns w ∈ [0, 1] per example; the loss then uses α_i = α·w_i, so w_i = 0 means
# plain cross-entropy for that example and w_i = 1 the configured distillation.


@register_sample_weight("none")
def uniform(teacher_logits: Tensor, target: Tensor, rank: Tensor | None) -> Weight:
    """``w_i = 1``: every example is distilled alike."""
    return 1.0


@register_sample_weight("teacher_confidence")
def teacher_confidence(teacher_logits: Tensor, target: Tensor, rank: Tensor | None) -> Weight:
    """``w_i = softmax(z_t)_{y_i}``: trust the teacher as much as it believes the true class."""
    return torch.softmax(teacher_logits.float(), 1).gather(1, target[:, None]).squeeze(1)


@register_sample_weight("teacher_correct")
def teacher_correct(teacher_logits: Tensor, target: Tensor, rank: Tensor | None) -> Weight:
    """``w_i = 1[argmax z_t = y_i]``: fall back to cross-entropy where the teacher is wrong."""
    return (teacher_logits.argmax(1) == target).float()


@register_sample_weight("difficulty")
def difficulty(teacher_logits: Tensor, target: Tensor, rank: Tensor | None) -> Weight:
    """``w_i = 1 − r_i`` with ``r_i ∈ [0, 1]`` the example's difficulty rank from the
    curriculum stage (0 easiest): the harder the example, the less KD."""
    assert rank is not None  # a run whose KD weight is the difficulty scores its data
    return 1.0 - rank


# --------------------------------------------------------------------------- learnable temperature
class _GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``−λ`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


class LearnableTemperature(nn.Module):
    """CTKD, Li et al. (AAAI 2023), "Curriculum Temperature for Knowledge Distillation".

    ``τ = 1 + 20·sigmoid(θ)``, a global temperature trained *adversarially*: θ receives the
    distillation gradient through a gradient-reversal layer, so the optimizer's descent
    step on θ is an ascent on the KD loss (harder targets), while the student descends.
    The reversal weight follows a cosine ramp ``λ(t) = (1 − cos(π·min(t, R)/R))/2`` from
    0 to 1 over the first R steps — an easy-to-hard curriculum of temperatures.
    θ starts where τ equals the configured temperature.
    """

    def __init__(self, initial: float, ramp_steps: int):
        super().__init__()
        p = min(max((initial - 1) / 20, 1e-4), 1 - 1e-4)
        self.theta = nn.Parameter(torch.tensor(math.log(p / (1 - p))))
        self.ramp_steps = ramp_steps

    def value(self) -> Tensor:
        return 1 + 20 * torch.sigmoid(self.theta)

    def reversal_weight(self, step: int) -> float:
        if not self.ramp_steps:
            return 1.0
        return 0.5 * (1 - math.cos(math.pi * min(step, self.ramp_steps) / self.ramp_steps))

    def forward(self, step: int) -> Tensor:
        return _GradientReversal.apply(self.value(), self.reversal_weight(step))


# --------------------------------------------------------------------------- control
def value_schedule(end: float, start: float | None, shape: str, total_steps: int) -> Callable[[int], float]:
    """``v(t) = end + (start − end)·f(t)``, f an LR-schedule shape (``conf/scheduler``)
    falling from 1 to 0 over the run; constant ``end`` when ``start`` is None."""
    if start is None:
        return lambda step: end
    factor = SCHEDULES.create(shape, total_steps)
    return lambda step: end + (start - end) * factor(step)


class DistillControl(nn.Module):
    """α and T for every step of a training stage, from the control's keys of ``distill``
    (``cfg``: a :class:`kdcl.config.schema.ControlConfig`). ``rank``: each training
    example's difficulty rank (``sample_weight=difficulty``); ``seed``: the noise's;
    ``label_smoothing``: ε of the stage's hard-label cross-entropy (its recipe's)."""

    def __init__(
        self,
        cfg: Any,
        total_steps: int,
        steps_per_epoch: int,
        rank: Tensor | None,
        seed: int = 0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.alpha = value_schedule(cfg.alpha, cfg.alpha_start, cfg.alpha_schedule, total_steps)
        self.temperature = value_schedule(cfg.temperature, cfg.temperature_start, cfg.temperature_schedule, total_steps)
        ctkd = cfg.learnable_temperature
        self.ctkd = LearnableTemperature(cfg.temperature, int(ctkd["ramp_epochs"] * steps_per_epoch)) if ctkd else None
        self.sample_weight = SAMPLE_WEIGHTS.get(cfg.sample_weight)
        self.rank = rank
        self.step = 0
        self.teacher_noise, self.input_noise = float(cfg.teacher_noise), float(cfg.input_noise)
        self.seed = seed
        self.logit_standardization = bool(cfg.logit_standardization)
        self.label_smoothing = label_smoothing
        self._generator: torch.Generator | None = None

    def noise_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of the noise, seeded with the stage's seed on first use (None
        without noise); its state is part of a stage's resume state."""
        if not (self.teacher_noise or self.input_noise):
            return None
        if self._generator is None:
            self._generator = torch.Generator(device).manual_seed(self.seed)
        return self._generator

    def _noise(self, like: Tensor, sigma: float) -> Tensor:
        """σ·ε, ε ~ N(0, 1) from the seeded noise generator."""
        return sigma * torch.empty_like(like).normal_(generator=self.noise_generator(like.device))

    def student_input(self, x: Tensor) -> Tensor:
        """``x + σ_in·ε`` (``input_noise``, in units of the normalised input): the student
        learns from noisy inputs while the teacher sees the clean ones."""
        return x + self._noise(x, self.input_noise) if self.input_noise else x

    def teacher_output(self, teacher_logits: Tensor | None) -> Tensor | None:
        """``z_t + σ_t·ε`` (``teacher_noise``): Gaussian noise on the teacher's logits."""
        if teacher_logits is None or not self.teacher_noise:
            return teacher_logits
        return teacher_logits + self._noise(teacher_logits, self.teacher_noise)

    def knobs(self, step: int, idx: Tensor, target: Tensor, teacher_logits: Tensor | None) -> tuple[Weight, Weight]:
        """(alpha, temperature) for this batch, which the engine passes to the loss."""
        self.step = step
        alpha: Weight = self.alpha(step)
        if teacher_logits is not None:
            rank = self.rank[idx] if self.rank is not None else None
            alpha = alpha * self.sample_weight(teacher_logits, target, rank)
        temperature = self.ctkd(step) if self.ctkd is not None else self.temperature(step)
        return alpha, temperature

    def context(self, epoch: int, features: tuple[dict[str, Tensor], dict[str, Tensor]]) -> LossContext:
        """What the loss reads besides the logits in ``epoch``: the hooks' ``features``
        (student's, teacher's), whether to standardize the logits it distills, and the
        stage's label smoothing."""
        return LossContext(
            epoch, *features, logit_standardization=self.logit_standardization, label_smoothing=self.label_smoothing
        )

    def columns(self) -> dict[str, float]:
        """The scheduled α and the temperature now, for the epoch's metrics row."""
        t = self.ctkd.value().item() if self.ctkd is not None else self.temperature(self.step)
        return {"alpha": self.alpha(self.step), "temperature": t}
