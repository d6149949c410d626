"""Optimizers and learning-rate schedules, stepped once per optimizer step.

An optimizer factory takes the keys of its ``conf/optimizer`` option (all of them: the
option sets every value), a schedule factory those of its ``conf/scheduler`` option; the
schedule shapes also move α and T (``distill.alpha_schedule``) with their own defaults."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kdcl.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULES: Registry[Callable[..., LrFactor]] = Registry("LR schedule")

LrFactor = Callable[[int], float]  # step -> multiplier of the base learning rate


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019)."""
    beta1, beta2 = betas
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(beta1, beta2))


def _with_warmup(factor: LrFactor, warmup_steps: int) -> LrFactor:
    return lambda step: factor(step) * min(1.0, (step + 1) / warmup_steps) if warmup_steps else factor(step)


@SCHEDULES.register("cosine")
def cosine(total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0) -> LrFactor:
    """Cosine decay (Loshchilov & Hutter 2017): ``m + (1 − m)·(1 + cos(π·t/T))/2``."""
    return _with_warmup(
        lambda t: min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t / total_steps)), warmup_steps
    )


@SCHEDULES.register("linear")
def linear(total_steps: int, warmup_steps: int = 0) -> LrFactor:
    """Linear decay to zero: ``1 − t/T``."""
    return _with_warmup(lambda t: 1 - t / total_steps, warmup_steps)


@SCHEDULES.register("step")
def step(
    total_steps: int, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1, warmup_steps: int = 0
) -> LrFactor:
    """Multiply by ``gamma`` at each milestone, given as fractions of the total steps."""
    marks = [m * total_steps for m in milestones]
    return _with_warmup(lambda t: gamma ** sum(t >= m for m in marks), warmup_steps)


@SCHEDULES.register("constant")
def constant(total_steps: int, warmup_steps: int = 0) -> LrFactor:
    """A constant learning rate (after an optional linear warm-up)."""
    return _with_warmup(lambda t: 1.0, warmup_steps)


def build_optimizer(params: Iterable, cfg: Any) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (tensors or param-group dicts). ``cfg``: the
    ``optimizer`` section (a :class:`kdcl.config.schema.OptimizerConfig`, its option's own
    keys as attributes)."""
    options = {k: v for k, v in vars(cfg).items() if k != "name"}
    return OPTIMIZERS.create(cfg.name, params, **options)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int, steps_per_epoch: int):
    """A ``LambdaLR`` over optimizer steps; ``warmup_epochs`` converts to steps. ``cfg``: the
    ``scheduler`` section (a :class:`kdcl.config.schema.SchedulerConfig`)."""
    params = {k: v for k, v in vars(cfg).items() if k not in ("name", "warmup_epochs")}
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    factor = SCHEDULES.create(cfg.name, total_steps, warmup_steps=warmup, **params)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
