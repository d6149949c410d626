"""Distillation losses, one registry entry each.

A loss is built from the ``distill`` config group (:func:`create_loss`) and called as
``loss(student_logits, teacher_logits, target, alpha, temperature)``. It returns a dict
of **per-example** tensors of shape (B,): ``"loss"`` (what the engine averages, after
any per-example curriculum weights, and back-propagates) and one entry per term, which
the engine logs as ``train_<term>`` columns of ``metrics.csv``.

``alpha`` and ``temperature`` come from the engine each step (they may follow a
schedule, ``alpha`` may differ per example, and the temperature may be a learnable
tensor, as in CTKD); the loss's own ``alpha`` / ``temperature`` are the configured values.

Convention, the same for every loss here: ``alpha`` weighs the *distillation* (soft)
terms and ``1 - alpha`` the hard-label cross-entropy, as in Hinton et al. (2015),
RepDistiller and mdistiller. (torchdistill's ``KDLoss`` uses the opposite convention:
its alpha weighs the hard term.)
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdcl.registry import Registry

LOSSES = Registry("distillation loss")
register_loss = LOSSES.register

Weight = Tensor | float  # a scalar, or one value per example


def kl_teacher_student(student_logits: Tensor, teacher_logits: Tensor, temperature: Weight) -> Tensor:
    """Per example, ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    KL(p‖q) = Σ_i p_i log(p_i / q_i) with p from the teacher. ``kl_div`` takes the
    student's *log*-probabilities first and the teacher's probabilities second.
    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_q, p, reduction="none").sum(1) * (t * t)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy with the hard labels."""
    return F.cross_entropy(logits.float(), target, reduction="none")


class DistillLoss(nn.Module):
    """Base class: ``needs_teacher`` tells the engine whether to run the teacher."""

    needs_teacher = True

    def __init__(self, alpha: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.alpha = float(alpha)
        self.temperature = float(temperature)


@register_loss("none")
class CrossEntropyOnly(DistillLoss):
    """No distillation: ``L = CE(y, softmax(z_s))``. ``alpha`` and ``temperature`` are unused."""

    needs_teacher = False

    def forward(self, student_logits: Tensor, teacher_logits: Any, target: Tensor, alpha: Weight = 0.0,
                temperature: Weight = 1.0) -> dict[str, Tensor]:
        ce = cross_entropy(student_logits, target)
        return {"loss": ce, "ce": ce}


@register_loss("kd")
class HintonKD(DistillLoss):
    """Knowledge distillation, Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``

    ``alpha`` (α) weighs the soft KD term; ``temperature`` is T.
    """

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: Weight,
                temperature: Weight) -> dict[str, Tensor]:
        ce = cross_entropy(student_logits, target)
        kd = kl_teacher_student(student_logits, teacher_logits, temperature)
        return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


@register_loss("mse")
class LogitMSE(DistillLoss):
    """Logit matching with MSE (Ba & Caruana 2014; compared with KL by Kim et al. 2021).

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·[MSE(z_s, z_t) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))]``

    MSE is the mean over classes. ``kl_weight`` (λ, default 0) adds the KL term;
    with α = 1 this is the users' ``MSE(z_s, z_t) + λ·KL`` form.
    """

    def __init__(self, alpha: float = 0.0, temperature: float = 1.0, kl_weight: float = 0.0):
        super().__init__(alpha, temperature)
        self.kl_weight = float(kl_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: Weight,
                temperature: Weight) -> dict[str, Tensor]:
        ce = cross_entropy(student_logits, target)
        mse = (student_logits.float() - teacher_logits.float()).pow(2).mean(1)
        terms = {"ce": ce, "mse": mse}
        soft = mse
        if self.kl_weight:
            terms["kd"] = kl_teacher_student(student_logits, teacher_logits, temperature)
            soft = soft + self.kl_weight * terms["kd"]
        return {"loss": (1 - alpha) * ce + alpha * soft, **terms}


# Keys of the distill group that configure the engine's dynamic control, not the loss.
CONTROL_KEYS = ("name", "alpha_start", "alpha_schedule", "temperature_start", "temperature_schedule",
                "learnable_temperature", "sample_weight", "teacher_route")


def create_loss(cfg: dict) -> DistillLoss:
    """Build the loss named ``cfg["name"]`` with its own parameters."""
    params = {k: v for k, v in cfg.items() if k not in CONTROL_KEYS}
    return LOSSES.create(cfg["name"], **params)
