"""The training loop and evaluation, shared by every stage.

``fit`` trains one model for a fixed number of optimizer steps, evaluates on the
validation split after every epoch, writes one metrics row per epoch and keeps
``best.pt`` (highest validation accuracy) and ``last.pt``.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcl.checkpoint import save_checkpoint
from kdcl.console import progress_bar
from kdcl.curricula import DataSchedule, LearnedEpochs
from kdcl.data import DataBundle, Source
from kdcl.dynamic import DistillControl
from kdcl.errors import KdclError
from kdcl.losses import DistillLoss, LossContext
from kdcl.report import MetricsTable
from kdcl.teachers import Teachers

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    """How to train: device, precision, batch sizes, budget."""

    device: torch.device
    epochs: int
    batch_size: int
    eval_batch_size: int
    amp: bool
    early_stopping_patience: int | None = None

    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    last_epoch: int
    steps: int
    seconds: float
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Evaluation:
    loss: float
    acc: float
    logits: Tensor  # (N, C) float32 on CPU, in the source's order
    labels: Tensor


@torch.no_grad()
def evaluate(model: nn.Module, source: Source, data: DataBundle, trainer: Trainer) -> Evaluation:
    """Loss, accuracy and logits of ``model`` on every example of ``source`` (no augmentation)."""
    model.eval()
    outputs, labels = [], []
    batches = torch.arange(len(source)).split(trainer.eval_batch_size)
    for _, x, y in source.batches(batches):
        with trainer.autocast():
            outputs.append(model(data.preprocess(x, train=False)).float())
        labels.append(y)
    logits, y = torch.cat(outputs), torch.cat(labels)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return Evaluation(loss, acc, logits.cpu(), y.cpu())


class _Meter:
    """Running sums kept on the device; read once per epoch (one sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, terms: dict[str, Tensor], logits: Tensor, y: Tensor) -> None:
        values = {**{k: v.detach().sum() for k, v in terms.items()}, "correct": (logits.argmax(1) == y).sum()}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += len(y)

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.count for k, v in self.sums.items()}


@dataclass
class _Step:
    """One optimizer step: the plan's batch through the student (and the teachers), the
    control's α and T, the per-example loss, the plan's weights, backward, update."""

    model: nn.Module
    teacher: Teachers | None
    data: DataBundle
    plan: DataSchedule
    loss_fn: DistillLoss
    control: DistillControl
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    trainer: Trainer

    def __call__(self, step: int, idx: Tensor, x: Tensor, y: Tensor, ctx: LossContext) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.data.preprocess(x, train=True)
        with self.trainer.autocast():
            logits = self.model(self.control.student_input(x))
            with torch.no_grad():
                teacher_logits = self.teacher(x, y) if self.teacher is not None else None
        teacher_logits = self.control.teacher_output(teacher_logits)
        alpha, temperature = self.control.knobs(step, idx, y, teacher_logits)
        terms = self.loss_fn(logits, teacher_logits, y, alpha, temperature, ctx)
        weights = self.plan.sample_weights(idx, terms["loss"].detach(), step)
        loss = terms["loss"].mean() if weights is None else (terms["loss"] * weights).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        return logits, terms


def fit(
    name: str,
    model: nn.Module,
    data: DataBundle,
    plan: DataSchedule,
    loss_fn: DistillLoss,
    control: DistillControl,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    trainer: Trainer,
    out_dir: Path,
    meta: dict[str, Any],
    teacher: Teachers | None = None,
    dynamics: LearnedEpochs | None = None,
    features: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
) -> FitResult:
    """Train ``model`` for ``trainer.epochs`` epochs of ``ceil(N / batch_size)`` steps.

    Per step (:class:`_Step`): the plan picks the batch, the control sets α and T, the
    loss gives per-example terms, the plan may weight them, and their mean is
    back-propagated. ``features`` are the student's and the teacher's hooked layers
    (:class:`kdcl.features.FeatureTap`), handed to the loss with the epoch. The loss's
    own trained state (adapters) is saved in the checkpoints under ``loss_state``, apart
    from the model's weights.
    """
    steps_per_epoch = math.ceil(len(data.train) / trainer.batch_size)
    table = MetricsTable(out_dir / "metrics.csv")
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    best_acc, best_epoch, step, stale, started = -1.0, 0, 0, 0, time.perf_counter()
    use_teacher = teacher is not None and loss_fn.needs_teacher
    train_step = _Step(model, teacher if use_teacher else None, data, plan, loss_fn, control, optimizer, lr_schedule, trainer)
    for epoch in range(1, trainer.epochs + 1):
        model.train()
        meter, tic = _Meter(), time.perf_counter()
        ctx = LossContext(epoch, *(features or ({}, {})))
        with progress_bar(f"{name} {epoch}/{trainer.epochs}", steps_per_epoch) as advance:
            for idx, x, y in data.train.batches(plan.batches(range(step, step + steps_per_epoch))):
                logits, terms = train_step(step, idx, x, y, ctx)
                meter.add(terms, logits, y)
                if dynamics is not None:
                    dynamics.update(idx, logits, y, epoch)
                step += 1
                advance()
        train = meter.means()
        if not math.isfinite(train["loss"]):
            raise KdclError(
                f"stage {name}: the training loss became {train['loss']} in epoch {epoch}",
                fix="lower optimizer.lr or check the data; best.pt keeps the last finite epoch's best model",
            )
        val = evaluate(model, data.val, data, trainer)
        seconds = time.perf_counter() - tic
        row = {
            "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train.pop("loss"), "train_acc": train.pop("correct"),
            "val_loss": val.loss, "val_acc": val.acc,
            "seconds": round(seconds, 3), "samples_per_s": round(meter.count / seconds, 1),
            **(control.columns() if use_teacher else {}),
            **plan.epoch_end(epoch, val.logits, val.labels),
            **{f"train_{k}": v for k, v in train.items()},
        }
        table.append(row)
        loss_state = {k: v.detach().cpu() for k, v in loss_fn.state_dict().items()}
        state = {**meta, "epoch": epoch, "step": step, "val_acc": val.acc, **({"loss_state": loss_state} if loss_state else {})}
        save_checkpoint(last_path, model, state)
        if val.acc > best_acc:
            best_acc, best_epoch, stale = val.acc, epoch, 0
            save_checkpoint(best_path, model, state)
        else:
            stale += 1
        log.info("%s epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %.0f img/s",
                 name, epoch, trainer.epochs, row["train_loss"], row["train_acc"], val.loss, val.acc, row["samples_per_s"])
        if trainer.early_stopping_patience and stale >= trainer.early_stopping_patience:
            log.info("%s: early stop after %d epochs without a better val_acc", name, stale)
            break
    return FitResult(best_epoch, best_acc, epoch, step, time.perf_counter() - started, best_path, last_path, table.rows)
