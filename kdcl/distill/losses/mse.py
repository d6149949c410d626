"""``distill=mse``: logit matching with MSE, Ba & Caruana (NeurIPS 2014), "Do Deep Nets
Really Need to be Deep?", with an optional KL term (:class:`LogitMSE`)."""

from __future__ import annotations

from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, kl_teacher_student, register_loss


@register_loss("mse")
class LogitMSE(DistillLoss):
    """Logit matching with MSE (Ba & Caruana 2014; compared with KL by Kim et al. 2021).

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·[MSE(z_s, z_t) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))]``

    MSE is the mean over classes. ``kl_weight`` (λ, default 0) adds the KL term;
    with α = 1 this is the users' ``MSE(z_s, z_t) + λ·KL`` form.
    """

    def __init__(self, kl_weight: float):
        super().__init__()
        self.kl_weight = float(kl_weight)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mse = (student_logits.float() - teacher_logits.float()).pow(2).mean(1)
        terms = {"mse": mse}
        if not self.kl_weight:
            return mse, terms
        terms["kd"] = kl_teacher_student(student_logits, teacher_logits, temperature)
        return mse + self.kl_weight * terms["kd"], terms
