"""``distill=lwf``: Learning without Forgetting, Li & Hoiem (ECCV 2016; TPAMI 2018),
"Learning without Forgetting" (:class:`LearningWithoutForgetting`), the distillation of
``scenario=class_incremental``'s LwF arm."""

from __future__ import annotations

from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, kl_teacher_student, register_loss


@register_loss("lwf")
class LearningWithoutForgetting(DistillLoss):
    """Learning without Forgetting, Li & Hoiem (ECCV 2016; TPAMI 2018).

    ``L = CE(y, softmax(z_s)) + λ·KL(softmax(z_o/T) ‖ softmax(z_s[:, :C_o]/T))``

    z_o are the previous model's logits on the same input, over its C_o classes, and
    z_s[:, :C_o] the student's outputs for those classes: the first C_o of a head grown
    with every task (:func:`kdcl.models.grow_head`). The KL term has the gradient of LwF's
    "knowledge distillation loss", the cross-entropy with the recorded soft targets, from
    which it differs by their entropy, a constant. As in the paper the CE weight is 1 and
    there is no T² factor (LwF: T = 2, λ = 1); ``lam`` is λ, ``temperature`` T, and
    ``distill.alpha`` is not used. With a teacher of as many classes as the student it is KD
    with the CE weight at 1.
    """

    ignores = frozenset({"alpha"})

    def __init__(self, lam: float):
        super().__init__()
        self.lam = float(lam)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        old = teacher_logits.shape[1]
        kl = kl_teacher_student(student_logits[:, :old], teacher_logits, temperature) / (temperature * temperature)
        return kl, {"lwf": kl}

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return ce + self.lam * d
