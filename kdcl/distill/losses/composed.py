"""``distill=composed``: several methods at once, their distillation terms summed with
weights, as RepDistiller combines KD with a feature method (:class:`Composed`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from torch import Tensor, nn

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, add_up, create_loss, register_loss
from kdcl.errors import KdclError


@register_loss("composed")
class Composed(DistillLoss):
    """Several methods at once, e.g. KD plus hints (RepDistiller's ``γ·CE + α·KD + β·F``).

    ``L = (1 − α)·CE + (α / α₀)·Σ_k w_k·D_k``

    ``losses`` lists the methods: ``{name: kd, weight: 0.9}`` adds ``0.9·D_kd``, D_k being
    method k's distillation term (its formula without the CE part and its own weight:
    ``T²·KL`` for kd, ``H`` for fitnet, ``Σ_j mean((Q_s − Q_t)²)`` for at,
    ``w(e)·(a·TCKD + b·NCKD)`` for dkd). Other keys of an entry configure that method
    (layers, γ, ...); every method uses this loss's temperature. At the configured α₀ =
    ``alpha`` the loss is ``(1 − α₀)·CE + Σ_k w_k·D_k``; when the dynamic control moves α
    (schedules, per-example ``sample_weight``) every term moves with it by ``α/α₀``
    (by 1 when α₀ = 0). α₀ is ``distill.alpha``, the one control key a loss takes as its
    own (the control schedules α from it and passes α every step). Every method's terms
    are logged, a repeated name with the entry's position appended (``kd_1``).
    """

    def __init__(self, alpha: float, losses: Sequence[dict]):
        super().__init__()
        self.alpha0 = float(alpha)
        if not losses:
            raise KdclError(
                "distill=composed has no losses",
                fix="list them: distill.losses='[{name: kd, weight: 0.9}, {name: fitnet, weight: 100}]'",
            )
        self.parts = nn.ModuleList(create_loss({k: v for k, v in spec.items() if k != "weight"}) for spec in losses)
        for spec, part in zip(losses, self.losses):
            if part.views > 1:
                raise KdclError(
                    f"distill=composed cannot hold {spec['name']}: it compares {part.views} views of each batch",
                    fix=f"use distill={spec['name']} on its own",
                )
        self.weights = [float(spec.get("weight", 1.0)) for spec in losses]
        self.needs_teacher = any(part.needs_teacher for part in self.losses)
        self.reads_label = any(part.reads_label for part in self.losses)

    @property
    def losses(self) -> list[DistillLoss]:
        """The composed losses, held in ``parts`` (a ModuleList: they train and move with this one)."""
        return [cast(DistillLoss, part) for part in self.parts]

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        weighted: list[Tensor] = []
        terms: dict[str, Tensor] = {}
        for k, (part, weight) in enumerate(zip(self.losses, self.weights)):
            d, part_terms = part.distill(student_logits, teacher_logits, target, temperature, ctx)
            weighted.append(weight * d)
            terms.update({name if name not in terms else f"{name}_{k}": v for name, v in part_terms.items()})
        return add_up(weighted), terms

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return (1 - alpha) * ce + (alpha / self.alpha0 if self.alpha0 else 1.0) * d

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        for part in self.losses:
            part.bind(student, teacher, example, num_examples)

    def release(self) -> None:
        for part in self.losses:
            part.release()

    def layers(self) -> tuple[list[str], list[str]]:
        student, teacher = [], []
        for part in self.losses:
            s, t = part.layers()
            student += s
            teacher += t
        return student, teacher
