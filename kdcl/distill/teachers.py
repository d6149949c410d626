"""Teachers: one frozen model, or several whose soft targets are combined.

Multi-teacher distillation (e.g. You et al. 2017, "Learning from Multiple Teacher
Networks"): the student learns from one target distribution per example,
``p̄ = Σ_k w_k·softmax(z_k/T)`` with ``Σ_k w_k = 1``. :class:`Teachers` returns it as
logits ``z̄ = T·log p̄``, so every logit-based loss works unchanged and sees exactly
``softmax(z̄/T) = p̄`` at the configured temperature T (with a scheduled or learnable T
the combined targets are re-tempered: ``softmax(z̄/T') ∝ p̄^{T/T'}``). One teacher's
logits pass through untouched. Feature methods read the first teacher's features.

The weights come from a registered combination (``distill.teacher_combine``):
``mean``, ``weights`` (``distill.teacher_weights``) or ``confidence``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from kdcl.errors import KdclError
from kdcl.registry import Registry

COMBINATIONS: Registry[Callable[[Tensor, Tensor | None, Sequence[float] | None], Tensor]] = Registry(
    "teacher combination"
)
register_combination = COMBINATIONS.register


# Each takes the teachers' logits (K, B, C), the labels (or None) and the configured
# weights, and returns w (K, B): the weight of each teacher on each example, summing to 1.
@register_combination("mean")
def mean(logits: Tensor, target: Tensor | None, weights: Sequence[float] | None) -> Tensor:
    """``w_k = 1/K``: the mean of the soft targets."""
    return logits.new_full(logits.shape[:2], 1 / len(logits))


@register_combination("weights")
def fixed(logits: Tensor, target: Tensor | None, weights: Sequence[float] | None) -> Tensor:
    """``w_k = c_k / Σ_j c_j`` with ``c = distill.teacher_weights``, the same on every example."""
    if weights is None or len(weights) != len(logits) or min(weights) < 0 or sum(weights) <= 0:
        raise KdclError(
            f"distill.teacher_combine=weights needs one weight ≥ 0 per teacher ({len(logits)}), "
            f"got distill.teacher_weights={weights}",
            fix=f"e.g. distill.teacher_weights=[{', '.join(['1'] * len(logits))}]",
        )
    # built on the CPU and copied without blocking: made on the GPU directly, it would wait for the queue
    w = torch.tensor([float(c) for c in weights], dtype=logits.dtype).to(logits.device, non_blocking=True)
    return (w / w.sum())[:, None].expand(logits.shape[:2])


@register_combination("confidence")
def confidence(logits: Tensor, target: Tensor | None, weights: Sequence[float] | None) -> Tensor:
    """``w_k,i = p_k(y_i | x_i) / Σ_j p_j(y_i | x_i)``, ``p_k = softmax(z_k)`` (T = 1): each
    teacher counts on an example as much as it believes the true class. Without labels
    (evaluation) ``y_i`` is the class the mean prediction picks."""
    probs = torch.softmax(logits, dim=2)
    if target is None:
        target = probs.mean(0).argmax(1)
    p_true = probs.gather(2, target.expand(len(logits), -1)[..., None]).squeeze(2)
    return p_true / p_true.sum(0).clamp_min(torch.finfo(p_true.dtype).tiny)


class Teachers(nn.Module):
    """Frozen teacher models seen as one: ``teacher(x, target)`` → logits (B, C).

    Several models: ``T·log Σ_k w_k·softmax(z_k/T)``, w from the combination ``combine``.
    One model: its logits, untouched.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        combine: str = "mean",
        weights: Sequence[float] | None = None,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.combination = COMBINATIONS.get(combine)
        self.weights = weights
        self.temperature = float(temperature)

    @property
    def lead(self) -> nn.Module:
        """The teacher whose intermediate features feature methods read."""
        return self.models[0]

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        if len(self.models) == 1:
            return self.models[0](x)
        logits = torch.stack([model(x).float() for model in self.models])
        w = self.combination(logits, target, self.weights)
        p = (w[..., None] * torch.softmax(logits / self.temperature, dim=2)).sum(0)
        return self.temperature * p.clamp_min(torch.finfo(p.dtype).tiny).log()
