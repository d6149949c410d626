"""The base of the feature methods (:class:`FeatureLoss`): it pairs student and teacher
layers (kdcl/distill/features.py) and adds Hinton et al.'s (2015) KD term to the method's
feature term. The methods are fitnet, crd, at, attention_maps and reviewkd."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdcl.distill.features import feature_shapes, pair_layers, resolve_layers
from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, kl_teacher_student


class FeatureLoss(DistillLoss):
    """Base of the feature methods: ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·F``.

    F (the distillation term D) compares student and teacher features at layer pairs
    (``student_layer`` / ``teacher_layer``: module paths, aliases or lists, see
    kdcl/distill/features.py). With the default α = 0 this is ``CE + β·F``, RepDistiller's and
    mdistiller's form; α > 0 adds Hinton's KD term.
    """

    def __init__(self, beta: float, student_layer: Any, teacher_layer: Any):
        super().__init__()
        self.beta = float(beta)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.pairs: list[tuple[str, str]] = []

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        pairs = self.choose_pairs(student, teacher, example)
        shapes = zip(
            feature_shapes(student, [s for s, _ in pairs], example),
            feature_shapes(teacher, [t for _, t in pairs], example),
        )
        self.connect(pairs, list(shapes))

    def choose_pairs(self, student: nn.Module, teacher: nn.Module, example: Tensor) -> list[tuple[str, str]]:
        """The (student, teacher) layer references to compare: ``student_layer`` and
        ``teacher_layer`` resolved and paired."""
        student_refs = resolve_layers(student, self.student_layer, "student", example)
        teacher_refs = resolve_layers(teacher, self.teacher_layer, "teacher", example)
        return pair_layers(student_refs, teacher_refs, self.student_layer, self.teacher_layer)

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        """Use these (student, teacher) layer pairs, whose features have these shapes (without the batch)."""
        self.pairs = pairs

    def layers(self) -> tuple[list[str], list[str]]:
        return [s for s, _ in self.pairs], [t for _, t in self.pairs]

    def features(self, ctx: LossContext) -> list[tuple[Tensor, Tensor]]:
        """This step's (student, teacher) feature of every pair."""
        return [(ctx.student_features[s], ctx.teacher_features[t]) for s, t in self.pairs]

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
        ce = ctx.cross_entropy(student_logits, target)
        kd = kl_teacher_student(*ctx.soft_logits(student_logits, teacher_logits), temperature)
        f, terms = self.distill(student_logits, teacher_logits, target, temperature, ctx)
        return {"loss": (1 - alpha) * ce + alpha * kd + self.beta * f, "ce": ce, "kd": kd, **terms}
