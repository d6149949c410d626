"""``distill=kd``: knowledge distillation, Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network" (:class:`HintonKD`)."""

from __future__ import annotations

from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, kl_teacher_student, register_loss


@register_loss("kd")
class HintonKD(DistillLoss):
    """Knowledge distillation, Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``

    ``alpha`` (α) weighs the soft KD term; ``temperature`` is T.
    """

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        kd = kl_teacher_student(student_logits, teacher_logits, temperature)
        return kd, {"kd": kd}
