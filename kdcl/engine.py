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
from typing import Any, Collection

import torch
from torch import Tensor, nn

from kdcl.checkpoint import save_checkpoint
from kdcl.console import progress_bar
from kdcl.curricula import DataSchedule, LearnedEpochs
from kdcl.data import DataBundle, Source
from kdcl.dynamic import DistillControl
from kdcl.errors import KdclError
from kdcl.losses import DistillLoss
from kdcl.report import MetricsTable

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
    teacher: nn.Module | None = None,
    dynamics: LearnedEpochs | None = None,
    keep_epochs: Collection[int] = (),
) -> FitResult:
    """Train ``model`` for ``trainer.epochs`` epochs of ``ceil(N / batch_size)`` steps.

    Per step: the plan picks the batch, the control sets α and T, the loss gives
    per-example terms, the plan may weight them, and their mean is back-propagated.
    After each epoch in ``keep_epochs`` the weights are also kept as ``epoch_NNN.pt``.
    """
    steps_per_epoch = math.ceil(len(data.train) / trainer.batch_size)
    table = MetricsTable(out_dir / "metrics.csv")
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    best_acc, best_epoch, step, stale, started = -1.0, 0, 0, 0, time.perf_counter()
    use_teacher = teacher is not None and loss_fn.needs_teacher
    for epoch in range(1, trainer.epochs + 1):
        model.train()
        meter, tic = _Meter(), time.perf_counter()
        with progress_bar(f"{name} {epoch}/{trainer.epochs}", steps_per_epoch) as advance:
            for idx, x, y in data.train.batches(plan.batches(range(step, step + steps_per_epoch))):
                x = data.preprocess(x, train=True)
                with trainer.autocast():
                    logits = model(x)
                    with torch.no_grad():
                        teacher_logits = teacher(x) if use_teacher else None
                alpha, temperature = control.knobs(step, idx, y, teacher_logits)
                terms = loss_fn(logits, teacher_logits, y, alpha, temperature)
                weights = plan.sample_weights(idx, terms["loss"].detach(), step)
                loss = terms["loss"].mean() if weights is None else (terms["loss"] * weights).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_schedule.step()
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
        state = {**meta, "epoch": epoch, "step": step, "val_acc": val.acc}
        save_checkpoint(last_path, model, state)
        if epoch in keep_epochs:
            save_checkpoint(out_dir / f"epoch_{epoch:03d}.pt", model, state)
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
