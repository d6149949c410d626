"""``distill=reviewkd``: ReviewKD, Chen, Liu, Zhao & Jia (CVPR 2021), "Distilling Knowledge
via Knowledge Review" (:class:`ReviewKD`, with its fusion modules :class:`AttentionFusion`
and its loss :func:`hierarchical_context_loss`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcl.distill.features import preactivation_layers, require_maps, resolve_layers
from kdcl.distill.losses.base import LossContext, Weight, add_up, register_loss, weight_dtype
from kdcl.distill.losses.feature_base import FeatureLoss
from kdcl.errors import KdclError

# ``teacher_maps``: the teacher's maps as hooked, or before their last activation (mdistiller's).
TEACHER_MAPS = ("post_activation", "pre_activation")


def _as_map_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A feature vector's shape (C,) as a 1×1 map's (C, 1, 1); other shapes unchanged."""
    return (*shape, 1, 1) if len(shape) == 1 else shape


def _as_map(feature: Tensor) -> Tensor:
    """A batch of feature vectors (N, C) as 1×1 maps (N, C, 1, 1); maps unchanged."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def hierarchical_context_loss(student: Tensor, teacher: Tensor, levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """ReviewKD's HCL for one pair of maps of equal shape, per example (Chen et al. 2021, §3.3):

    ``(mse(F_s, F_t) + Σ_l 2^-k(l)·mse(pool_l(F_s), pool_l(F_t))) / (1 + Σ_l 2^-k(l))``

    ``pool_l`` the adaptive average pooling to l×l for the levels l < H (4, 2, 1), weighted
    1/2, 1/4, 1/8 in turn as in the authors' code; mse the mean over channels and positions."""
    mse = (student - teacher).pow(2).flatten(1).mean(1)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= student.shape[2]:
            continue
        weight /= 2
        pooled = F.adaptive_avg_pool2d(student, level) - F.adaptive_avg_pool2d(teacher, level)
        mse = mse + weight * pooled.pow(2).flatten(1).mean(1)
        total += weight
    return mse / total


class AttentionFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF): a student map, narrowed by a 1×1 conv, is
    mixed with the fused map of the next deeper level by two per-position attention weights
    (a 1×1 conv and a sigmoid over both), resized to the teacher's map and widened to its
    channels by a 3×3 conv. Returns (the map to compare with the teacher's, the fused map
    passed to the next shallower level). The two convolutions start as the authors' do:
    ``kaiming_uniform_(a=1)``, weights uniform in ±√(3 / fan_in) (PyTorch's default,
    a = √5, gives ±√(1 / fan_in))."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        narrow = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.narrow = nn.Sequential(narrow, nn.BatchNorm2d(mid_channels))
        widen = nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False)
        self.widen = nn.Sequential(widen, nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (narrow, widen):
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.narrow(x)
        if self.attention is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], 1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        fused = x
        if x.shape[2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.widen(x), fused


@register_loss("reviewkd")
class ReviewKD(FeatureLoss):
    """ReviewKD, Chen, Liu, Zhao & Jia (CVPR 2021), "Distilling Knowledge via Knowledge Review".

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·w(e)·Σ_j HCL(R_j, F_t^j)``, ``w(e) = min(e / W, 1)``

    The student's maps at ``student_layer`` (``auto:stages``: one per resolution) are
    reviewed from the deepest up: level j's map is fused with the fused map of level j + 1
    (:class:`AttentionFusion`), so R_j, compared with the teacher's map at level j, carries
    the deeper levels too; HCL is :func:`hierarchical_context_loss`. The fusion modules train
    with the student; ``mid_channels`` is their inner width (the authors': min(512, the
    deepest student width)). β = ``beta`` (1, as in mdistiller's CIFAR-100 setting), W =
    ``warmup_epochs`` (20 of 240 there), α = 0.

    Two choices of the authors' code (mdistiller) are options, off by default so that a
    spec without them (an older run's config) reviews as before; ``distill=reviewkd_mdistiller``
    turns both on:

    - ``teacher_maps``: ``post_activation`` compares the hooked outputs of the teacher's
      layers; ``pre_activation`` their values before the last activation, the input of the
      ReLU that gives each output (a residual block's sum before its ReLU;
      :func:`kdcl.distill.features.preactivation_layers`), as mdistiller's ``preact_feats``.
      The student's maps stay after their activation.
    - ``pooled_level``: adds the globally pooled features (the classifier's input,
      ``auto:penultimate``, as (N, C, 1, 1)) of both models as the deepest level, fused
      and compared like the others; HCL at 1×1 is the plain MSE.
    """

    def __init__(
        self,
        beta: float,
        student_layer: Any,
        teacher_layer: Any,
        mid_channels: int | None,
        warmup_epochs: float,
        teacher_maps: str = "post_activation",
        pooled_level: bool = False,
    ):
        super().__init__(beta, student_layer, teacher_layer)
        if teacher_maps not in TEACHER_MAPS:
            raise KdclError(
                f"distill=reviewkd: teacher_maps={teacher_maps!r} is not a choice",
                fix=f"set distill.teacher_maps to one of: {', '.join(TEACHER_MAPS)}",
            )
        if not isinstance(pooled_level, bool):
            raise KdclError(
                f"distill=reviewkd: pooled_level={pooled_level!r} is not true or false",
                fix="set distill.pooled_level=true (add the pooled features as a 1×1 level) or false",
            )
        self.mid_channels, self.warmup_epochs = mid_channels, warmup_epochs
        self.teacher_maps, self.pooled_level = teacher_maps, pooled_level
        self.fusions = nn.ModuleList()
        self.teacher_sizes: list[tuple[int, int]] = []

    def choose_pairs(self, student: nn.Module, teacher: nn.Module, example: Tensor) -> list[tuple[str, str]]:
        pairs = super().choose_pairs(student, teacher, example)
        if self.teacher_maps == "pre_activation":
            teacher_refs = preactivation_layers(teacher, [t for _, t in pairs], "teacher", example)
            pairs = [(s, t) for (s, _), t in zip(pairs, teacher_refs)]
        if self.pooled_level:
            pooled = (
                resolve_layers(student, "auto:penultimate", "student", example)[0],
                resolve_layers(teacher, "auto:penultimate", "teacher", example)[0],
            )
            pairs.append(pooled)
        return pairs

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        if self.pooled_level:
            shapes = [*shapes[:-1], (_as_map_shape(shapes[-1][0]), _as_map_shape(shapes[-1][1]))]
        require_maps([s for s, _ in shapes], [s for s, _ in pairs], "student", "reviewkd")
        require_maps([t for _, t in shapes], [t for _, t in pairs], "teacher", "reviewkd")
        super().connect(pairs, shapes)
        mid = self.mid_channels or min(512, shapes[-1][0][0])
        deepest = len(shapes) - 1
        self.fusions = nn.ModuleList(
            AttentionFusion(s[0], mid, t[0], fuse=j < deepest) for j, (s, t) in enumerate(shapes)
        )
        self.teacher_sizes = [(t[1], t[2]) for _, t in shapes]

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.features(ctx)
        losses: list[Tensor] = []
        deeper = None
        for j in reversed(range(len(features))):
            fs, ft = _as_map(features[j][0]), _as_map(features[j][1])
            fusion = self.fusions[j]
            reviewed, deeper = fusion(fs.to(weight_dtype(fusion)), deeper, self.teacher_sizes[j])
            losses.append(hierarchical_context_loss(reviewed.float(), ft.float()))
        hcl = add_up(losses)
        warm = min(ctx.epoch / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0
        return warm * hcl, {"hcl": hcl}
