"""``distill=dkd``: decoupled knowledge distillation, Zhao et al. (CVPR 2022), "Decoupled
Knowledge Distillation" (:class:`DecoupledKD`, its two terms in :func:`decoupled_kl`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, register_loss


def decoupled_kl(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight
) -> tuple[Tensor, Tensor]:
    """Per example, DKD's two parts of ``T²·KL(p_t ‖ p_s)`` at temperature T (Zhao et al. 2022):

    - TCKD ``= T²·KL(b_t ‖ b_s)``, ``b = (p_y, 1 − p_y)``: the target class against all others;
    - NCKD ``= T²·KL(p̂_t ‖ p̂_s)``, ``p̂`` the softmax of ``z/T`` over the non-target classes.

    As in mdistiller, the target class is removed from NCKD by subtracting 1000 from its
    logit (its probability underflows to 0).
    """
    t = temperature
    zs, zt = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(target, zs.shape[1]).bool()

    def target_vs_rest(z: Tensor) -> Tensor:  # log (p_y, 1 − p_y)
        log_p = F.log_softmax(z, dim=1)
        return torch.cat(
            [log_p.gather(1, target[:, None]), log_p.masked_fill(gt, -math.inf).logsumexp(1, keepdim=True)], 1
        )

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(1) * (t * t)

    tckd = kl(target_vs_rest(zt), target_vs_rest(zs))
    nckd = kl(F.log_softmax(zt - 1000.0 * gt, dim=1), F.log_softmax(zs - 1000.0 * gt, dim=1))
    return tckd, nckd


@register_loss("dkd")
class DecoupledKD(DistillLoss):
    """Decoupled knowledge distillation, Zhao et al. (CVPR 2022), "Decoupled Knowledge Distillation".

    ``L = CE(y, softmax(z_s)) + w(e)·(a·TCKD + b·NCKD)``, ``w(e) = min(e / W, 1)``

    TCKD and NCKD as in :func:`decoupled_kl` (both carry T²). ``tckd_weight`` (a) and
    ``nckd_weight`` (b) are the paper's α and β (mdistiller: 1 and 8, T = 4); W =
    ``warmup_epochs`` (20 in mdistiller) ramps the DKD term linearly over the first epochs,
    e being the 1-based epoch, exactly as mdistiller's ``min(epoch / warmup, 1)``.
    The CE weight is 1, as in mdistiller: ``distill.alpha`` is not used.
    """

    ignores = frozenset({"alpha"})
    reads_label = True

    def __init__(self, tckd_weight: float, nckd_weight: float, warmup_epochs: float):
        super().__init__()
        self.tckd_weight, self.nckd_weight, self.warmup_epochs = float(tckd_weight), float(nckd_weight), warmup_epochs

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        tckd, nckd = decoupled_kl(student_logits, teacher_logits, target, temperature)
        warm = min(ctx.epoch / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0
        return warm * (self.tckd_weight * tckd + self.nckd_weight * nckd), {"tckd": tckd, "nckd": nckd}

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return ce + d
