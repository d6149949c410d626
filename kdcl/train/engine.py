"""The training loop and evaluation, shared by every stage.

``fit`` trains one model for a fixed number of optimizer steps, evaluates on the
validation split after every epoch, gives one metrics row per epoch to the stage's
loggers (``metrics.csv`` and any experiment tracker), keeps
``best.pt`` (highest validation accuracy) and ``last.pt``, and can be cut off and
resumed at any step boundary (``kdcl.train.resume``). Under DDP every rank runs it on its share
of each global batch (``kdcl.distributed``); rank 0 writes the files.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcl import distributed
from kdcl.config.schema import TrainerConfig
from kdcl.curricula import DataSchedule, LearnedEpochs
from kdcl.data import Batch, DataBundle, Source
from kdcl.distill.control import DistillControl
from kdcl.distill.feeds import Feed
from kdcl.distill.losses import DistillLoss, LossContext
from kdcl.distill.mixing import BatchMixer
from kdcl.distributed import Part
from kdcl.errors import KdclError
from kdcl.output.progress import RunProgress
from kdcl.output.trackers import CSV_ONLY, Loggers
from kdcl.train.checkpoint import save_checkpoint
from kdcl.train.ema import ModelEMA
from kdcl.train.resume import (
    STOP,
    Cursor,
    Interrupted,
    check_same_config,
    cursor_state,
    load_state,
    rng_states,
    save_state,
    set_rng_states,
)

log = logging.getLogger(__name__)

# Called after every epoch of a stage, once its checkpoints and resume state are written,
# with the stage's name and the epoch's metrics row (``epoch``, ``val_acc``, ...). It may
# raise to end the training there (``kdcl tune`` stops a trial its pruner gives up on).
EpochHook = Callable[[str, dict[str, Any]], None]

# Steps between the host's reads of the non-finite-loss note (each read waits for the device:
# the only sync of the step loop on a GPU besides the epoch's end and the saves).
FINITE_CHECK_EVERY = 50


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdclError("trainer.device=cuda but no CUDA GPU is available", fix="use trainer.device=auto or cpu")
    return device


def reset_peak_memory(device: torch.device) -> None:
    """Count the device's peak memory afresh from here (each stage's ``max_memory_mb``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """The most memory tensors held on ``device`` since :func:`reset_peak_memory`, in MiB
    (``torch.cuda.max_memory_allocated``: the allocator's count, no sync); NaN on a CPU,
    which keeps no such count."""
    if device.type != "cuda":
        return math.nan
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


@dataclass
class TrainSettings:
    """How to train: device, precision, batch sizes, budget."""

    device: torch.device
    epochs: int
    batch_size: int
    eval_batch_size: int
    amp: bool
    early_stopping_patience: int | None = None
    amp_dtype: torch.dtype = torch.bfloat16  # autocast's precision: bf16, or fp16 with a gradient scaler
    grad_clip_norm: float | None = None  # the gradient's largest global L2 norm (trainer.grad_clip_norm)
    ema_decay: float | None = None  # the decay of the weights' moving average (trainer.ema_decay)
    log_every_steps: int | None = None  # the trackers get step metrics this often (trainer.log_every_steps)
    checkpoint_every_steps: int | None = None
    compile: bool = False
    label_smoothing: float = 0.0  # ε of the hard-label cross-entropy
    mix: dict[str, float] = field(default_factory=dict)  # batch mix → its Beta α (trainer.mix)

    @classmethod
    def from_config(cls, t: TrainerConfig) -> TrainSettings:
        """The ``trainer`` section: resolves the device (``auto``: CUDA when there is
        one), autocast (``auto``: bf16 on CUDA; ``fp16``: float16) and the CPU thread count
        (``threads``)."""
        device = distributed.device(resolve_device(t.device))
        if t.threads:
            torch.set_num_threads(t.threads)
        return cls(
            device=device,
            epochs=t.epochs,
            batch_size=t.batch_size,
            eval_batch_size=t.eval_batch_size,
            amp=device.type == "cuda" if t.amp == "auto" else bool(t.amp),
            amp_dtype=torch.float16 if t.amp == "fp16" else torch.bfloat16,
            grad_clip_norm=t.grad_clip_norm,
            ema_decay=t.ema_decay,
            log_every_steps=t.log_every_steps,
            early_stopping_patience=t.early_stopping_patience,
            checkpoint_every_steps=t.checkpoint_every_steps,
            compile=t.compile,
            label_smoothing=t.label_smoothing,
            mix=dict(t.mix),
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        """With ``trainer.compile``, compile the model's forward (its state_dict keeps its keys),
        in a call frame of the model's own: torch.compile keeps a few compiled variants per
        frame (``torch._dynamo.config.recompile_limit``, 8), and forwards defined in torch
        itself (``nn.Sequential``'s) would otherwise share one frame, so that the stages of a
        run used up its variants and the later ones ran uncompiled."""
        if self.compile:
            model.forward = torch.compile(_own_frame(model.forward))
        return model

    @property
    def fp16(self) -> bool:
        """Float16 autocast, whose small range needs the loss scaled (a gradient scaler)."""
        return self.amp and self.amp_dtype == torch.float16

    @property
    def precision(self) -> str:
        return "fp16 autocast" if self.fp16 else "bf16 autocast" if self.amp else "fp32"

    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def _own_frame(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``forward`` called from a function whose code object is its own (torch.compile keeps
    its compiled variants per code object; every closure of one ``def`` shares one)."""

    def call(*args: Any, **kwargs: Any) -> Tensor:
        return forward(*args, **kwargs)

    call.__code__ = call.__code__.replace()
    return call


@dataclass
class FitResult:
    best_epoch: int
    best_val_acc: float
    last_epoch: int
    steps: int
    seconds: float
    best_path: Path
    last_path: Path
    ema_best_epoch: int = 0  # the weight average's (0: none kept), and its best validation accuracy
    ema_best_val_acc: float = float("nan")


@dataclass
class Stage:
    """What one training stage trains, and with what (:func:`kdcl.train.assemble.build_stage` builds it)."""

    name: str
    model: nn.Module
    loss_fn: DistillLoss
    control: DistillControl
    plan: DataSchedule
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    out_dir: Path
    meta: dict[str, Any]  # checkpoint metadata (model spec, data, config)
    feed: Feed  # a step's student input and teacher logits (kdcl/distill/feeds.py)
    dynamics: LearnedEpochs | None = None
    keep_epochs: Collection[int] = ()
    features: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})  # hooked student / teacher layers
    steps_per_epoch: int | None = None  # the budget's steps per epoch; None: ceil(N_train / batch_size)
    loggers: Loggers = CSV_ONLY  # where each epoch's metrics row goes (kdcl/output/trackers.py)
    mixer: BatchMixer | None = None  # mixes each step's images (trainer.mix; kdcl/data/mixing.py)
    # scales the loss under fp16 autocast (Micikevicius et al. 2018); disabled, a pass-through
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    ema: ModelEMA | None = None  # the model's weight average (trainer.ema_decay), evaluated on its own

    @property
    def run_dir(self) -> Path:
        """The run's directory: ``out_dir`` less the stage's name, which may be nested
        (``curriculum/self_taught``)."""
        return self.out_dir.parents[len(Path(self.name).parts) - 1]

    def modules(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "loss": self.loss_fn,
            "control": self.control,
            "optimizer": self.optimizer,
            "lr_schedule": self.lr_schedule,
            "grad_scaler": self.scaler,
            **({"ema": self.ema} if self.ema is not None else {}),
        }


# Top-5 accuracy is reported for data of more than this many classes (NaN otherwise): with
# 5 classes or fewer it is 1 by construction, and up to 10 it says little that top-1 does not.
TOP5_ABOVE_CLASSES = 10


@dataclass
class Evaluation:
    loss: float
    acc: float
    acc_top5: float  # NaN for TOP5_ABOVE_CLASSES classes or fewer
    logits: Tensor  # (N, C) float32 on CPU, in the source's order
    labels: Tensor


def top5_accuracy(logits: Tensor, labels: Tensor) -> float:
    """The share of examples whose label is among their 5 largest logits,
    (1/N)·Σ_i 1[y_i ∈ top5(z_i)] (the ImageNet challenge's top-5 measure, Russakovsky et al.
    2015); NaN for logits of :data:`TOP5_ABOVE_CLASSES` classes or fewer."""
    if logits.shape[1] <= TOP5_ABOVE_CLASSES:
        return math.nan
    return (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, source: Source, data: DataBundle, trainer: TrainSettings) -> Evaluation:
    """Loss, accuracy (top-1, and top-5 from the same logits) and logits of ``model`` on every
    example of ``source`` (no augmentation), in its order; they are evaluated in the order
    whose batches hold the least padding (texts by length). Under DDP each rank evaluates one
    chunk of that order and every rank gets all the logits."""
    model.eval()
    outputs, labels = [], []
    order = source.least_padding(torch.arange(len(source)))
    batches = order[distributed.shard(len(source))].split(trainer.eval_batch_size)
    for _, x, y in source.batches(batches):
        with trainer.autocast():
            outputs.append(model(data.preprocess(x, train=False)).float())
        labels.append(y)
    place = torch.argsort(order)  # where example i's row is in the evaluation order
    logits, y = (
        distributed.gather(torch.cat(parts), len(source))[place.to(parts[0].device)] for parts in (outputs, labels)
    )
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return Evaluation(loss=loss, acc=acc, acc_top5=top5_accuracy(logits, y), logits=logits.cpu(), labels=y.cpu())


class Meter:
    """Running sums of the loss terms and correct predictions, kept on the device.

    In one process each step adds straight to ``sums``. Under DDP each rank adds its part
    of the batch to ``new``, and :meth:`collect` (once per epoch, and before a save: one
    sync) adds every rank's ``new`` to ``sums``, which is then the same on every rank and is
    what a resume file keeps.
    """

    def __init__(self, sums: dict[str, Tensor] | None = None, count: int = 0) -> None:
        self.sums: dict[str, Tensor] = dict(sums or {})
        self.count = count
        self.new: dict[str, Tensor] = {}
        self.new_count = 0
        # The first step whose loss was not finite (−1: none yet), its loss (total) and mean terms,
        # all on the device; and the learning rate of every step since the last check.
        self.first_bad: Tensor | None = None
        self.bad_values: dict[str, Tensor] = {}
        self.lrs: dict[int, float] = {}

    def watch(self, step: int, lr: float, total: Tensor, terms: dict[str, Tensor]) -> None:
        """Note, without reading it on the host, whether this step's loss ``total`` is finite;
        the first step where it is not keeps its loss and mean terms. :meth:`check_finite`
        reads the note (a sync) every ``FINITE_CHECK_EVERY`` steps and before anything is saved."""
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=total.device)
        first = ~torch.isfinite(total) & (self.first_bad < 0)
        self.first_bad = torch.where(first, step, self.first_bad)
        values = {"total": total.float(), **{k: v.detach().float().mean() for k, v in terms.items() if k != "loss"}}
        self.bad_values = {k: torch.where(first, v, self.bad_values.get(k, v)) for k, v in values.items()}
        self.lrs[step] = lr

    def check_finite(self, stage: str, out_dir: Path) -> None:
        """Stop with one clear message if a step since the last check had a non-finite loss."""
        if self.first_bad is None:
            return
        step = int(self.first_bad)
        lrs, self.lrs = self.lrs, {}
        if step < 0:
            return
        values = {k: float(v) for k, v in self.bad_values.items()}
        terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "total")
        raise KdclError(
            f"stage {stage}: the loss is {values['total']} at step {step} (lr {lrs[step]:.4g}; {terms})",
            fix=f"lower optimizer.lr or check the data; {out_dir}/last.pt and best.pt keep the last finite epoch",
        )

    def add(self, terms: dict[str, Tensor], logits: Tensor, y: Tensor) -> None:
        values = {**{k: v.detach().sum() for k, v in terms.items()}, "correct": (logits.argmax(1) == y).sum()}
        if distributed.world() == 1:
            self.sums, self.count = _added(self.sums, values), self.count + len(y)
        else:
            self.new, self.new_count = _added(self.new, values), self.new_count + len(y)

    def loss_total(self) -> tuple[float, int]:
        """The training loss summed over the epoch's examples so far, and their count (this
        process's since the last collect, under DDP): a host sync, for what is shown while
        the stage trains (the progress line, the trackers' step metrics)."""
        sums, count = (self.new, self.new_count) if self.new_count else (self.sums, self.count)
        return (float(sums["loss"]) if count else 0.0), count

    def running_loss(self) -> float:
        """The mean training loss of the epoch's steps so far (:meth:`loss_total`)."""
        total, count = self.loss_total()
        return total / count if count else float("nan")

    def collect(self) -> None:
        if not self.new:  # one process, or no step since the last collect (on any rank: they step together)
            return
        keys = sorted(self.new)
        device = self.new[keys[0]].device
        count = torch.tensor(float(self.new_count), dtype=torch.float64, device=device)
        total = distributed.all_sum(torch.stack([*(self.new[k].double() for k in keys), count]))
        self.sums, self.count = _added(self.sums, dict(zip(keys, total))), self.count + int(total[-1].item())
        self.new, self.new_count = {}, 0

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.count for k, v in self.sums.items()}


class StepWindow:
    """An epoch's steps since the trackers last got step metrics (``trainer.log_every_steps``),
    read from the epoch's meter."""

    def __init__(self, meter: Meter) -> None:
        # what the meter held at the last read (resumed mid-epoch: the steps already counted)
        self.loss, self.count = meter.loss_total() if meter.count + meter.new_count else (0.0, 0)

    def metrics(self, meter: Meter, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The mean training loss of the examples since the last read and the LR now: one host sync."""
        loss, count = meter.loss_total()
        if count < self.count:  # under DDP a save collected the ranks' counts: a new window
            self.loss, self.count = 0.0, 0
        mean = (loss - self.loss) / (count - self.count) if count > self.count else float("nan")
        self.loss, self.count = loss, count
        return {"train_loss": mean, "lr": optimizer.param_groups[0]["lr"]}


def _added(sums: dict[str, Tensor], values: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sums`` with ``values`` added key by key (a key missing from ``sums`` counts 0)."""
    return {**sums, **{k: sums.get(k, 0) + v for k, v in values.items()}}


def train_step(
    s: Stage, trainer: TrainSettings, step: int, batch: Batch, meter: Meter, ctx: LossContext, part: Part | None = None
) -> None:
    """One optimizer step: the feed gives the (augmented, and with ``trainer.mix`` mixed)
    input and the teacher's logits (for a loss of two views, those of the batch's plain
    views, then of its strong views),
    the control sets α and T (and any noise), the loss gives per-example terms (features
    from ``ctx``), the plan may weight them (judging each example by its cross-entropy),
    and their mean is back-propagated. Under DDP ``batch`` is this rank's ``part`` of the
    global batch, whose mean the ranks back-propagate together."""
    idx, x, y = batch
    part = part or Part(len(y))
    mix = s.mixer.draw(step, len(y), y.device) if s.mixer is not None else None
    x, teacher_logits = s.feed(step, ctx.epoch, idx, x, y, part, mix)
    with trainer.autocast():  # a loss of several views: the student sees each as its own batch
        logits = torch.cat([s.model(s.control.student_input(view)) for view in x.chunk(s.loss_fn.views)])
    teacher_logits = s.control.teacher_output(teacher_logits)
    plain_teacher_logits = teacher_logits[: len(y)] if teacher_logits is not None else None
    alpha, temperature = s.control.knobs(step, idx, y, plain_teacher_logits)
    terms = s.loss_fn(logits, teacher_logits, y, alpha, temperature, replace(ctx, step=step, indices=idx, mix=mix))
    logits = logits[: len(y)]  # the plain views' logits: what the accuracy and the curricula read
    weights = s.plan.sample_weights(idx, terms.get("ce", terms["loss"]).detach(), step)
    loss = part.mean(terms["loss"] if weights is None else terms["loss"] * weights)
    total = distributed.all_sum(loss.detach().clone())  # the global batch's loss: every rank stops together
    meter.watch(step, s.optimizer.param_groups[0]["lr"], total, terms)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    distributed.average_gradients([*s.loss_fn.parameters(), *s.control.parameters()])  # outside the DDP model
    if trainer.grad_clip_norm is not None:
        s.scaler.unscale_(s.optimizer)
        clip_gradient(s.optimizer, trainer.grad_clip_norm)
    s.scaler.step(s.optimizer)  # fp16: skipped when a gradient is not finite, and the scale lowered
    s.scaler.update()
    s.lr_schedule.step()
    if s.ema is not None:
        s.ema.update(s.model)
    meter.add(terms, logits, y if mix is None else mix.labels(y))
    if s.dynamics is not None:
        s.dynamics.update(idx, logits, y, ctx.epoch)


def clip_gradient(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """``g ← g · min(1, c / (‖g‖₂ + 10⁻⁶))`` over every parameter ``optimizer`` steps, ``‖g‖₂``
    their gradients' global L2 norm and c ``max_norm`` (Pascanu et al., ICML 2013, "On the
    difficulty of training recurrent neural networks"; ``torch.nn.utils.clip_grad_norm_``),
    on the device: the norm is not read on the host."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def fit(
    s: Stage,
    data: DataBundle,
    trainer: TrainSettings,
    on_epoch: EpochHook | None = None,
    progress: RunProgress | None = None,
) -> FitResult:
    """Train for ``trainer.epochs`` epochs of ``s.steps_per_epoch`` steps (default
    ``ceil(N / batch_size)``), evaluate on the validation split after each, keep ``best.pt`` /
    ``last.pt`` (and ``epoch_NNN.pt`` for ``keep_epochs``), and continue from ``resume.pt``
    when an earlier run was cut off. ``on_epoch`` (optional) sees each epoch's metrics row,
    whose ``max_memory_mb`` is the GPU's peak memory since the stage began (NaN on a CPU).
    Under DDP the ranks train ``s.model`` inside ``DistributedDataParallel``, each on its part
    of every global batch, and stop together when any of them is asked to stop. ``progress``:
    the run's, which shows the stage as it trains (default: a plain line every 30 s)."""
    spe = _epoch_steps(s, data, trainer)
    reset_peak_memory(trainer.device)
    cursor, meter, start_state = _restore(s, data)
    if cursor.epoch > 1 and distributed.is_main():  # resumed: this run's trackers get the earlier epochs too
        s.loggers.log_past_epochs(s.name, s.out_dir, before_epoch=cursor.epoch)
    started = time.perf_counter() - cursor.seconds
    replica = replace(s, model=distributed.wrap(s.model))  # the stage as the training steps see it
    with (progress or RunProgress()).stage(s.name, trainer.epochs * spe, trainer.epochs) as shown:
        while not cursor.finished and cursor.epoch <= trainer.epochs:
            epoch, first = cursor.epoch, (cursor.epoch - 1) * spe
            replica.model.train()
            snapshot = s.plan.state_dict() if start_state is None else start_state  # the plan as the epoch began
            batches = s.plan.epoch_batches(range(first, first + spe), start_state)[cursor.step - first :]
            start_state = snapshot
            tic, ctx = time.perf_counter(), s.control.context(epoch, s.features)
            window = StepWindow(meter) if trainer.log_every_steps else None  # reads the meter: only when logging
            parts = distributed.parts(batches)
            shares = (p.take(b) for p, b in zip(parts, batches))
            keys = (
                p.take(s.feed.view_keys(at, epoch, b)) for at, p, b in zip(itertools.count(cursor.step), parts, batches)
            )
            for part, batch in zip(parts, data.train.batches(shares, keys)):
                train_step(replica, trainer, cursor.step, batch, meter, ctx, part)
                cursor.step += 1
                shown.update(cursor.step, epoch, meter.count + meter.new_count, meter.running_loss)
                every_log = trainer.log_every_steps
                if window is not None and every_log and cursor.step % every_log == 0 and distributed.is_main():
                    s.loggers.log_step(s.name, cursor.step, window.metrics(meter, s.optimizer))
                every = trainer.checkpoint_every_steps
                stop = distributed.any_rank(STOP.signum or 0)
                save = stop or (every and cursor.step % every == 0 and cursor.step < first + spe)
                if save or cursor.step % FINITE_CHECK_EVERY == 0:
                    meter.check_finite(s.name, s.out_dir)
                if save:
                    cursor.seconds = time.perf_counter() - started
                    _save(s, data, cursor, meter, start_state)
                    if stop:
                        raise Interrupted(stop, s.name, cursor.step, s.run_dir)
            meter.check_finite(s.name, s.out_dir)
            row = _end_epoch(s, data, trainer, cursor, meter, time.perf_counter() - tic)
            if distributed.is_main():
                s.loggers.log_epoch(s.name, s.out_dir, row)
            log.info(
                "%s epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  %.0f ex/s",
                s.name,
                epoch,
                trainer.epochs,
                row["train_loss"],
                row["train_acc"],
                row["val_loss"],
                row["val_acc"],
                row["samples_per_s"],
            )
            if trainer.early_stopping_patience and cursor.stale >= trainer.early_stopping_patience:
                log.info("%s: early stop after %d epochs without a better val_acc", s.name, cursor.stale)
                cursor.finished = True
            cursor.epoch, cursor.seconds, meter, start_state = epoch + 1, time.perf_counter() - started, Meter(), None
            _save(s, data, cursor, meter, None)
            if on_epoch is not None:
                on_epoch(s.name, row)
    distributed.barrier()  # rank 0's checkpoints are on disk for every rank
    return FitResult(
        best_epoch=cursor.best_epoch,
        best_val_acc=cursor.best_acc,
        last_epoch=cursor.last_epoch,
        steps=cursor.step,
        seconds=cursor.seconds,
        best_path=s.out_dir / "best.pt",
        last_path=s.out_dir / "last.pt",
        ema_best_epoch=cursor.ema_best_epoch,
        ema_best_val_acc=cursor.ema_best_acc,
    )


def _epoch_steps(s: Stage, data: DataBundle, trainer: TrainSettings) -> int:
    """The stage's steps per epoch: its budget's, else ``ceil(N_train / batch_size)``."""
    return s.steps_per_epoch or math.ceil(len(data.train) / trainer.batch_size)


def train_steps(s: Stage, data: DataBundle, trainer: TrainSettings, total_steps: int) -> Iterator[int]:
    """``total_steps`` optimizer steps of ``s`` on its plan, epoch after epoch of
    ``s.steps_per_epoch`` steps (default ``ceil(N / batch_size)``), with no validation,
    checkpoint or resume state: the bare training steps (what ``kdcl bench`` times).
    Yields each step's number once it is taken."""
    spe = _epoch_steps(s, data, trainer)
    s.model.train()
    meter = Meter()
    for epoch in range(1, math.ceil(total_steps / spe) + 1):
        first = (epoch - 1) * spe
        steps = range(first, min(first + spe, total_steps))
        ctx = s.control.context(epoch, s.features)
        batches, sizes = itertools.tee(s.plan.batches(steps))
        keys = (s.feed.view_keys(at, epoch, b) for at, b in zip(steps, sizes))
        for step, batch in zip(steps, data.train.batches(batches, keys)):
            train_step(s, trainer, step, batch, meter, ctx)
            if (step + 1) % FINITE_CHECK_EVERY == 0:
                meter.check_finite(s.name, s.out_dir)
            yield step
        meter.check_finite(s.name, s.out_dir)


def _end_epoch(
    s: Stage, data: DataBundle, trainer: TrainSettings, cursor: Cursor, meter: Meter, seconds: float
) -> dict[str, Any]:
    """Validate, keep the checkpoints, and return the epoch's metrics row."""
    epoch = cursor.epoch
    meter.collect()
    train = meter.means()
    distributed.average_buffers(s.model)
    val = evaluate(s.model, data.val, data, trainer)
    row = {
        "epoch": epoch,
        "step": cursor.step,
        "lr": s.optimizer.param_groups[0]["lr"],
        "train_loss": train.pop("loss"),
        "train_acc": train.pop("correct"),
        "val_loss": val.loss,
        "val_acc": val.acc,
        "val_acc_top5": val.acc_top5,
        "seconds": round(seconds, 3),
        "samples_per_s": round(meter.count / seconds, 1),
        "max_memory_mb": peak_memory_mb(trainer.device),  # since the stage (or its resumed run) began
        **(s.control.columns() if s.feed.teaches else {}),
        **s.plan.epoch_end(epoch, val.logits, val.labels),
        **{f"train_{k}": v for k, v in train.items()},
    }
    # The loss's own trained state (adapters) travels beside the model's weights, not in them.
    loss_state = {k: v.detach().cpu() for k, v in s.loss_fn.state_dict().items()}
    state = {
        **s.meta,
        "epoch": epoch,
        "step": cursor.step,
        "val_acc": val.acc,
        **({"loss_state": loss_state} if loss_state else {}),
    }
    paths = ["last.pt", *([f"epoch_{epoch:03d}.pt"] if epoch in s.keep_epochs else [])]
    cursor.last_epoch = epoch
    if val.acc > cursor.best_acc:
        cursor.best_acc, cursor.best_epoch, cursor.stale = val.acc, epoch, 0
        paths.append("best.pt")
    else:
        cursor.stale += 1
    if distributed.is_main():
        for name in paths:
            save_checkpoint(s.out_dir / name, s.model, state)
    if s.ema is not None:
        row.update(_end_epoch_ema(s, s.ema, data, trainer, cursor, state))
    return row


def _end_epoch_ema(
    s: Stage, ema: ModelEMA, data: DataBundle, trainer: TrainSettings, cursor: Cursor, state: dict[str, Any]
) -> dict[str, float]:
    """The weight average's epoch, as the model's: validated, kept as ``ema_last.pt`` and,
    when its validation accuracy is its best, ``ema_best.pt``; its metrics columns."""
    val = evaluate(ema.module, data.val, data, trainer)
    paths = ["ema_last.pt"]
    if val.acc > cursor.ema_best_acc:
        cursor.ema_best_acc, cursor.ema_best_epoch = val.acc, cursor.epoch
        paths.append("ema_best.pt")
    if distributed.is_main():
        for name in paths:
            save_checkpoint(s.out_dir / name, ema.module, {**state, "stage": f"{s.name}_ema", "val_acc": val.acc})
    return {"val_loss_ema": val.loss, "val_acc_ema": val.acc}


def _generators(s: Stage, data: DataBundle) -> dict[str, torch.Generator]:
    noise = s.control.noise_generator(data.preprocess.generator.device)
    return {"preprocess": data.preprocess.generator, **({"noise": noise} if noise is not None else {})}


def _save(s: Stage, data: DataBundle, cursor: Cursor, meter: Meter, start_state: dict | None) -> None:
    """Write the stage's resume state (rank 0), first summing what the ranks counted apart."""
    meter.collect()
    s.plan.collect()
    if s.dynamics is not None:
        distributed.all_max(s.dynamics.last_wrong)
    if not distributed.is_main():
        return
    save_state(
        s.out_dir / "resume.pt",
        {
            "config": s.meta["config"],
            "cursor": cursor_state(cursor),
            "modules": {k: m.state_dict() for k, m in s.modules().items()},
            "plan": s.plan.state_dict(),
            "plan_at_epoch_start": start_state,
            "meter": {"sums": meter.sums, "count": meter.count},
            "dynamics": s.dynamics.last_wrong if s.dynamics is not None else None,
            "rng": rng_states(_generators(s, data)),
        },
    )


def _restore(s: Stage, data: DataBundle) -> tuple[Cursor, Meter, dict | None]:
    """The stage's saved state, loaded into its parts; a fresh start when there is none."""
    path = s.out_dir / "resume.pt"
    state = load_state(path)
    if state is None:
        return Cursor(), Meter(), None
    check_same_config(state["config"], s.meta["config"], path)
    for key, module in s.modules().items():
        if key in state["modules"]:  # a state saved before the gradient scaler was kept has none
            module.load_state_dict(state["modules"][key])
    s.plan.load_state_dict(state["plan"])
    if s.dynamics is not None:
        s.dynamics.last_wrong.copy_(state["dynamics"])
    set_rng_states(state["rng"], _generators(s, data))
    cursor = Cursor(**state["cursor"])
    log.info("%s: resuming at epoch %d, step %d (from %s)", s.name, cursor.epoch, cursor.step, path)
    meter = Meter(
        {k: v.to(data.preprocess.generator.device) for k, v in state["meter"]["sums"].items()}, state["meter"]["count"]
    )
    return cursor, meter, state["plan_at_epoch_start"]
