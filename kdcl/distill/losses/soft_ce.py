"""``distill=soft_ce`` and ``distill=focal``: cross-entropy with the teacher's soft targets
(Hinton et al. 2015, :class:`SoftCrossEntropy`) and its focal form (Lin et al., ICCV 2017,
"Focal Loss for Dense Object Detection", :class:`FocalKD`), both from
:func:`soft_cross_entropy`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, register_loss


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: Weight, gamma: float = 0.0
) -> Tensor:
    """Per example, ``T²·Σ_c −p_c·(1 − q_c)^γ·log q_c`` with ``p = softmax(z_t/T)``,
    ``q = softmax(z_s/T)``; γ = 0 gives the soft cross-entropy ``T²·H(p, q)``."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1)
    focus = (1 - log_q.exp()).pow(gamma) if gamma else 1.0
    return -(p * focus * log_q).sum(1) * (t * t)


@register_loss("soft_ce")
class SoftCrossEntropy(DistillLoss):
    """Cross-entropy with the teacher's soft targets (Hinton et al. 2015, §2).

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·H(p_t, q_s)``, ``H(p, q) = −Σ_c p_c log q_c``,
    ``p_t = softmax(z_t/T)``, ``q_s = softmax(z_s/T)``.

    ``H(p_t, q_s) = KL(p_t ‖ q_s) + H(p_t)`` and the teacher's entropy ``H(p_t)`` does not
    depend on the student, so the gradients equal ``kd``'s; the logged term is larger by
    ``T²·H(p_t)``. The T² is kept for the same reason as in ``kd``: it keeps the soft
    term's gradient scale independent of T, so α means the same at every T.
    """

    term = "soft_ce"
    gamma = 0.0

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        soft = soft_cross_entropy(student_logits, teacher_logits, temperature, self.gamma)
        return soft, {self.term: soft}


@register_loss("focal")
class FocalKD(SoftCrossEntropy):
    """Focal soft cross-entropy: the focal loss of Lin et al. (ICCV 2017), "Focal Loss for
    Dense Object Detection", with the teacher's soft targets in place of the one-hot label.

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·Σ_c −p_t,c·(1 − q_s,c)^γ·log q_s,c``,
    ``p_t = softmax(z_t/T)``, ``q_s = softmax(z_s/T)``.

    Classes the student already gives high probability are down-weighted by
    ``(1 − q_s,c)^γ``, so the distillation focuses on what the student gets wrong.
    With a one-hot ``p_t`` (and T = 1) it is Lin et al.'s ``−(1 − q_y)^γ·log q_y``; with
    γ = 0 it is ``soft_ce``. ``gamma`` (γ) defaults to 2, Lin et al.'s choice.
    """

    term = "focal"

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = float(gamma)
