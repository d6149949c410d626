"""An exponential moving average of a model's weights, trained alongside it and evaluated as
a model of its own (``trainer.ema_decay``)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``θ̄ ← d·θ̄ + (1 − d)·θ`` after every optimizer step, for every floating-point parameter
    and buffer of the model (BatchNorm's running statistics included), d the decay; other
    buffers (counters) are copied. θ̄ starts at the model's weights as the stage begins.
    Polyak & Juditsky (1992) averaging in its exponential form, as timm's ``ModelEmaV3``
    keeps it. ``module`` is the averaged model: a copy of the trained one, never trained."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # a compiled model's forward is an attribute of the instance, bound to the model it
        # was compiled from: the copy runs its class's forward, on its own weights
        self.module.__dict__.pop("forward", None)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model`` (the trained one, or DDP around it), on the device."""
        pairs = [
            *zip(self.module.parameters(), model.parameters()),
            *zip(self.module.buffers(), model.buffers()),
        ]
        floating = [(avg, live) for avg, live in pairs if avg.is_floating_point()]
        if floating:
            averaged, live = zip(*floating)
            torch._foreach_lerp_(list(averaged), list(live), 1 - self.decay)
        for avg, value in pairs:
            if not avg.is_floating_point():
                avg.copy_(value)
