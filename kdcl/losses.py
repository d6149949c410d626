"""Distillation losses, one registry entry each.

A loss is built from the ``distill`` config group (``LOSSES.create(name, **params)``)
and called as ``loss(student_logits, teacher_logits, target)``. It returns a dict of
scalar tensors: ``"loss"`` (what is back-propagated) and one entry per term, which the
engine logs as columns of ``distill/metrics.csv``.

Convention, the same for every loss here: ``alpha`` weighs the *distillation* (soft)
terms and ``1 - alpha`` the hard-label cross-entropy, as in Hinton et al. (2015),
RepDistiller and mdistiller. (torchdistill's ``KDLoss`` uses the opposite convention:
its alpha weighs the hard term.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcl.registry import Registry

LOSSES = Registry("distillation loss")
register_loss = LOSSES.register


def kl_teacher_student(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, averaged over the batch.

    KL(p‖q) = Σ_i p_i log(p_i / q_i) with p from the teacher. ``kl_div`` takes the
    student's *log*-probabilities first and the teacher's probabilities second.
    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * (t * t)


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

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(student_logits.float(), target)
        return {"loss": ce, "ce": ce}


@register_loss("kd")
class HintonKD(DistillLoss):
    """Knowledge distillation, Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``

    ``alpha`` (α) weighs the soft KD term; ``temperature`` is T.
    """

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(student_logits.float(), target)
        kd = kl_teacher_student(student_logits, teacher_logits, self.temperature)
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd, "ce": ce, "kd": kd}


@register_loss("mse")
class LogitMSE(DistillLoss):
    """Logit matching with MSE (Ba & Caruana 2014; compared with KL by Kim et al. 2021).

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·[MSE(z_s, z_t) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))]``

    MSE is the mean over batch and classes. ``kl_weight`` (λ, default 0) adds the KL term;
    with α = 1 this is the users' ``MSE(z_s, z_t) + λ·KL`` form.
    """

    def __init__(self, alpha: float = 0.0, temperature: float = 1.0, kl_weight: float = 0.0):
        super().__init__(alpha, temperature)
        self.kl_weight = float(kl_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(student_logits.float(), target)
        mse = F.mse_loss(student_logits.float(), teacher_logits.float())
        terms = {"ce": ce, "mse": mse}
        soft = mse
        if self.kl_weight:
            terms["kd"] = kl_teacher_student(student_logits, teacher_logits, self.temperature)
            soft = soft + self.kl_weight * terms["kd"]
        return {"loss": (1 - self.alpha) * ce + self.alpha * soft, **terms}


def create_loss(cfg: dict) -> DistillLoss:
    """Build the loss named ``cfg["name"]`` with the remaining keys as parameters."""
    params = {k: v for k, v in cfg.items() if k != "name"}
    return LOSSES.create(cfg["name"], **params)
