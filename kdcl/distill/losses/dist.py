"""``distill=dist``: DIST, Huang et al. (NeurIPS 2022), "Knowledge Distillation from A
Stronger Teacher" (:class:`DIST`, its correlations from :func:`pearson_distance`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, register_loss


def pearson_distance(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per row, ``1 − ρ(a, b)``, ρ the Pearson correlation over the columns:
    the cosine of the rows centred on their means."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss("dist")
class DIST(DistillLoss):
    """DIST, Huang et al. (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

    ``L = CE(y, softmax(z_s)) + β·T²·(1 − ρ(p_s,i, p_t,i)) + γ·T²·(1 − (1/C)·Σ_c ρ(p_s[:, c], p_t[:, c]))``

    ``p = softmax(z/T)``, ρ the Pearson correlation (:func:`pearson_distance`). The
    inter-class term matches each example's ranking of the classes, the intra-class term
    each class's ranking of the batch's examples; only relations are matched, not values,
    which the paper finds to help most when the teacher is much stronger than the student.
    ``beta`` (β) and ``gamma`` (γ): 2 and 2 at T = 4 for CIFAR-100 in the paper (1, 1, T = 1
    on ImageNet). The intra-class term is a property of the batch: every example carries
    its value (under DDP, that of its rank's part of the batch). The CE weight is 1, as in
    the paper: ``distill.alpha`` is not used.
    """

    ignores = frozenset({"alpha"})

    def __init__(self, beta: float, gamma: float):
        super().__init__()
        self.beta, self.gamma = float(beta), float(gamma)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        t = temperature
        p_s = F.softmax(student_logits.float() / t, dim=1)
        p_t = F.softmax(teacher_logits.float() / t, dim=1)
        inter = pearson_distance(p_s, p_t) * (t * t)
        intra = (pearson_distance(p_s.T, p_t.T).mean() * (t * t)).expand_as(inter)
        return self.beta * inter + self.gamma * intra, {"inter": inter, "intra": intra}

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return ce + d
