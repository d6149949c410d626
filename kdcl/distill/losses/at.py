"""``distill=at``: attention transfer, Zagoruyko & Komodakis (ICLR 2017), "Paying More
Attention to Attention" (:class:`AttentionTransfer`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdcl.distill.features import attention_map, match_spatial, require_maps
from kdcl.distill.losses.base import LossContext, Weight, add_up, register_loss
from kdcl.distill.losses.feature_base import FeatureLoss


@register_loss("at")
class AttentionTransfer(FeatureLoss):
    """Attention transfer, Zagoruyko & Komodakis (ICLR 2017), "Paying More Attention to Attention".

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·Σ_j mean_hw((Q_s^j − Q_t^j)²)``,
    ``Q = vec(Σ_c |A_c|^p) / ‖vec(Σ_c |A_c|^p)‖₂`` per example and layer pair j (p = 2).

    The paper writes the term ``(β/2)·Σ_j ‖Q_s^j − Q_t^j‖_2`` with β = 1000 "divided by the
    number of elements in the attention map and batch size"; its released code
    (attention-transfer ``at_loss``) and RepDistiller / mdistiller compute
    ``β·Σ_j mean((Q_s^j − Q_t^j)²)`` over batch and positions with β = 1000, the form β was
    tuned for and the one used here (per example: the mean over the H·W positions). A map
    larger than its partner is average-pooled to its size first.
    """

    def __init__(
        self,
        beta: float,
        p: float,
        student_layer: Any,
        teacher_layer: Any,
    ):
        super().__init__(beta, student_layer, teacher_layer)
        self.p = float(p)

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        require_maps([s for s, _ in shapes], [s for s, _ in pairs], "student", "at")
        require_maps([t for _, t in shapes], [t for _, t in pairs], "teacher", "at")
        super().connect(pairs, shapes)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        maps = []
        for fs, ft in self.features(ctx):
            fs, ft = match_spatial(fs, ft)
            maps.append((attention_map(fs, self.p) - attention_map(ft, self.p)).pow(2).mean(1))
        at = add_up(maps)
        return at, {"at": at}
