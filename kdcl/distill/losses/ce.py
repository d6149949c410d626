"""``distill=none``: the hard-label cross-entropy alone, no distillation (:class:`CrossEntropyOnly`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, register_loss


@register_loss("none")
class CrossEntropyOnly(DistillLoss):
    """No distillation: ``L = CE(y, softmax(z_s))``. ``alpha`` and ``temperature`` are unused."""

    needs_teacher = False
    ignores = frozenset({"alpha", "temperature"})

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Any,
        target: Tensor,
        alpha: Weight = 0.0,
        temperature: Weight = 1.0,
        ctx: LossContext | None = None,
    ) -> dict[str, Tensor]:
        ce = (ctx or LossContext()).cross_entropy(student_logits, target)
        return {"loss": ce, "ce": ce}
