"""``distill=fitnet``: FitNets, Romero et al. (ICLR 2015), "FitNets: Hints for Thin Deep
Nets" (:class:`FitNet`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdcl.distill.features import adapter, match_spatial
from kdcl.distill.losses.base import LossContext, Weight, add_up, register_loss, weight_dtype
from kdcl.distill.losses.feature_base import FeatureLoss


@register_loss("fitnet")
class FitNet(FeatureLoss):
    """FitNets, Romero et al. (ICLR 2015), "FitNets: Hints for Thin Deep Nets".

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·H``, ``H = Σ_j mean((r_j(F_s^j) − F_t^j)²)``

    r_j is a regressor trained with the student (a 1×1 convolution between maps, a linear
    layer between vectors); the mean runs over the teacher feature's elements, and a map
    larger than the other is average-pooled to its size. β = ``beta`` (100, as in
    RepDistiller / mdistiller). ``hint_epochs`` = N > 0 is FitNets' first stage: the first
    N epochs train on ``β·H`` alone (only the layers up to the hinted one and the
    regressors get gradients), the remaining epochs on L. The N epochs are part of the
    students' epochs (``trainer.epochs``, or ``stages.student.epochs``): the step budget and
    the LR schedule stay those of every other arm.
    """

    def __init__(
        self,
        beta: float,
        student_layer: Any,
        teacher_layer: Any,
        hint_epochs: int,
    ):
        super().__init__(beta, student_layer, teacher_layer)
        self.hint_epochs = int(hint_epochs)
        self.adapters = nn.ModuleList()

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        super().connect(pairs, shapes)
        self.adapters = nn.ModuleList(adapter(s, t, pair) for pair, (s, t) in zip(pairs, shapes))

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        hints = []
        for regressor, (fs, ft) in zip(self.adapters, self.features(ctx)):
            fs, ft = match_spatial(regressor(fs.to(weight_dtype(regressor))), ft)  # under bf16 autocast too
            hints.append((fs - ft.float()).pow(2).flatten(1).mean(1))
        hint = add_up(hints)
        return hint, {"hint": hint}

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        alpha: Weight,
        temperature: Weight,
        ctx: LossContext | None = None,
    ) -> dict[str, Tensor]:
        ctx = ctx or LossContext()
        out = super().forward(student_logits, teacher_logits, target, alpha, temperature, ctx)
        if ctx.epoch <= self.hint_epochs:
            out["loss"] = self.beta * out["hint"]
        return out
