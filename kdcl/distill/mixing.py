"""Batch-level mixing of training images, ``trainer.mix``: mixup and CutMix, off by default.

Each step with mixing on draws one method among those given a Beta α > 0 (each equally
likely, as torchvision's reference recipe chooses between its two), a share
λ ~ Beta(α, α) and a permutation π of the batch; example i is mixed with example π(i):

- **mixup** (Zhang et al., ICLR 2018): ``x̃_i = λ·x_i + (1 − λ)·x_π(i)``;
- **cutmix** (Yun et al., ICCV 2019): ``x̃_i`` is ``x_i`` with a box of ``x_π(i)`` pasted in,
  the box of sides ``√(1 − λ)·H`` by ``√(1 − λ)·W`` centred at a uniform point and clipped
  at the border; λ is then the share of ``x_i``'s pixels left, ``1 − box area / (H·W)``.

The hard-label cross-entropy becomes ``λ·CE(z, y) + (1 − λ)·CE(z, y_π)``
(:meth:`BatchMix.mixed`). The teacher sees the mixed image itself: its logits on ``x̃`` are
the student's soft target, which is "function matching" (Beyer et al., CVPR 2022,
"Knowledge distillation: A good teacher is patient and consistent"). Stored teacher
logits belong to unmixed views, so mixing needs the online teacher.

A step's draw is a function of the stage's seed, the optimizer step and the process's rank
alone: a resumed run mixes exactly as the uninterrupted one did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kdcl import distributed
from kdcl.registry import Registry

# A mix method: (λ drawn, the images' (H, W), the step's random generator) → (how to mix a
# batch of images with its partners, the share λ of its own image each mixed example keeps).
Blend = Callable[[Tensor, Tensor], Tensor]
MIXES: Registry[Callable[[float, Sequence[int], np.random.Generator], tuple[Blend, float]]] = Registry("batch mix")
register_mix = MIXES.register


@register_mix("mixup")
def mixup(share: float, size: Sequence[int], rng: np.random.Generator) -> tuple[Blend, float]:
    """``λ·x + (1 − λ)·x_π``."""
    return (lambda x, partner: share * x + (1 - share) * partner), share


@register_mix("cutmix")
def cutmix(share: float, size: Sequence[int], rng: np.random.Generator) -> tuple[Blend, float]:
    """``x`` with a box of ``x_π`` pasted in, sides ``√(1 − λ)`` of the image's, centred at a
    uniform point, clipped at the border; the share is what the clipped box leaves of ``x``."""
    h, w = size
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    half_h, half_w = int(math.sqrt(1 - share) * h / 2), int(math.sqrt(1 - share) * w / 2)
    top, bottom = max(cy - half_h, 0), min(cy + half_h, h)
    left, right = max(cx - half_w, 0), min(cx + half_w, w)

    def paste(x: Tensor, partner: Tensor) -> Tensor:
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        return mixed

    return paste, 1 - (bottom - top) * (right - left) / (h * w)


@dataclass(frozen=True)
class BatchMix:
    """One step's mix: each example's ``partner`` (a permutation of the batch), the ``share``
    λ of its own image it keeps, and the ``blend`` of a batch of images with its partners."""

    partner: Tensor
    share: float
    blend: Blend

    def images(self, x: Tensor) -> Tensor:
        """``x`` mixed: B rows, or several views of the batch (k·B rows), each view alike."""
        return torch.cat([self.blend(view, view[self.partner]) for view in x.chunk(len(x) // len(self.partner))])

    def mixed(self, per_example: Callable[[Tensor], Tensor], target: Tensor) -> Tensor:
        """A per-example hard-label loss of the mixed batch: ``λ·ℓ(y) + (1 − λ)·ℓ(y_π)``."""
        return self.share * per_example(target) + (1 - self.share) * per_example(target[self.partner])

    def labels(self, target: Tensor) -> Tensor:
        """Each mixed example's larger part's label (what its training accuracy counts)."""
        return target if self.share >= 0.5 else target[self.partner]


class BatchMixer:
    """The mixes of a stage: ``alphas`` maps methods of :data:`MIXES` to their Beta α (0:
    unused), ``size`` is the images' (H, W) and ``seed`` seeds every step's draw."""

    def __init__(self, alphas: Mapping[str, float], size: Sequence[int], seed: int):
        self.methods = [(MIXES.get(name), float(alpha)) for name, alpha in alphas.items() if alpha > 0]
        self.size, self.seed = size, seed

    def __bool__(self) -> bool:
        return bool(self.methods)

    def draw(self, step: int, batch: int, device: torch.device) -> BatchMix | None:
        """The mix of optimizer step ``step`` for this rank's ``batch`` examples (None when off)."""
        if not self.methods:
            return None
        rng = np.random.default_rng([self.seed % 2**32, step, distributed.rank()])
        method, alpha = self.methods[int(rng.integers(len(self.methods)))]
        blend, share = method(float(rng.beta(alpha, alpha)), self.size, rng)
        partner = torch.from_numpy(rng.permutation(batch)).to(device)
        return BatchMix(partner, share, blend)
