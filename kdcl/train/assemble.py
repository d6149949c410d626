"""One training stage, assembled from typed settings: what every model kdcl trains (a run's
teachers and students, a class-incremental task, ``kdcl bench``'s kdcl arms) is trained
with, built in one place before the engine (:mod:`kdcl.train.engine`) trains it."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcl import distributed
from kdcl.config.options import distill_parts, stage_recipe
from kdcl.config.schema import ControlConfig, OptimizerConfig, SchedulerConfig, typed
from kdcl.curricula import DataSchedule, LearnedEpochs
from kdcl.data import DataBundle, StrongViews
from kdcl.distill.control import DistillControl
from kdcl.distill.features import FeatureTap
from kdcl.distill.feeds import Feed, FeedInputs, build_feed, caches, parse
from kdcl.distill.losses import DistillLoss, create_loss
from kdcl.distill.mixing import BatchMixer
from kdcl.distill.replay import ReplaySlot
from kdcl.distill.teachers import Teachers
from kdcl.optim import build_optimizer, build_schedule
from kdcl.output.trackers import CSV_ONLY, Loggers
from kdcl.train.ema import ModelEMA
from kdcl.train.engine import Stage, TrainSettings

TeacherAt = Callable[[int], nn.Module]  # optimizer step → the teacher of that step


@dataclass(frozen=True)
class StageRecipe:
    """How the stages of one role (``teacher`` or ``student``) train: the run's trainer
    settings with the role's ``epochs`` and ``batch_size``, and its optimizer and LR schedule
    (``stages.<role>`` over the shared settings: :func:`kdcl.config.options.stage_recipe`)."""

    trainer: TrainSettings
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig

    @classmethod
    def of(cls, cfg: dict[str, Any], role: str, trainer: TrainSettings) -> StageRecipe:
        """The recipe of ``role`` in run config ``cfg``, on the run's ``trainer`` settings."""
        plain = stage_recipe(cfg, role)
        return cls(
            trainer=replace(
                trainer,
                epochs=plain["epochs"],
                batch_size=plain["batch_size"],
                label_smoothing=plain["label_smoothing"],
            ),
            optimizer=typed(OptimizerConfig, plain["optimizer"], "optimizer"),
            scheduler=typed(SchedulerConfig, plain["scheduler"], "scheduler"),
        )


@dataclass(frozen=True)
class StageEnvironment:
    """What every stage of a run shares, as the scenario holds it: the data, the loggers that
    receive each epoch's metrics, the run's seed (a teacher cache's views are drawn from it)
    and the feeds already built (a teacher cache serves every stage that reads it)."""

    data: DataBundle
    cache_seed: int
    loggers: Loggers = CSV_ONLY
    feeds: dict[tuple, Feed] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """What sets one stage apart: its name and folder, the model it trains (already on the
    recipe's device), the ``distill`` section (loss and control), its frozen teachers (none:
    no teacher), its data plan, its role's recipe and step budget (``total_steps`` of
    ``steps_per_epoch`` per epoch), the seed of its augmentation, noise and mixing, and the
    folder of its teacher cache; optionally the examples' difficulty ranks, the teacher's
    route, what its checkpoints hold beside the weights, the learning events to record, the
    epochs whose checkpoints are kept, and a slot to record or replay the teacher's logits."""

    name: str
    out_dir: Path
    model: nn.Module
    distill: Mapping[str, Any]
    teachers: Sequence[nn.Module]
    plan: DataSchedule
    recipe: StageRecipe
    total_steps: int
    steps_per_epoch: int
    seed: int
    cache_dir: Path
    rank: Tensor | None = None
    route: Callable[[], Sequence[nn.Module]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    dynamics: LearnedEpochs | None = None
    keep_epochs: Collection[int] = ()
    replay: ReplaySlot | None = None


@contextmanager
def build_stage(spec: StageSpec, env: StageEnvironment) -> Iterator[Stage]:
    """The stage ``spec.name`` (files in ``out_dir``) that trains ``model``, already on
    ``trainer.device``, on ``plan`` with the loss and control of the ``distill`` section,
    taught by ``teachers`` (frozen; none: no teacher). The layers the loss reads are hooked
    while inside the ``with`` block, and unhooked when it ends, however it ends; what the loss's
    ``bind`` changed in the models is then undone (``release``).

    In order: the augmentation restarts from ``seed``; the loss (its own keys of ``distill``)
    binds its layers to the model and the first teacher, so its adapters train with the
    model; the control (α and T per step, and noise seeded with ``seed`` + the rank) takes
    ``rank``, the examples' difficulty ranks (``sample_weight=difficulty``); the optimizer
    and the LR schedule count ``total_steps`` steps of ``steps_per_epoch`` per epoch; each
    step's teacher is the teachers combined, or with ``distill.teacher_route`` the earlier
    teachers ``route()`` loads, then the final one (:func:`teacher_route`); the feed gives
    each step's input and the teacher's logits (:func:`teacher_feed`), with a strongly
    augmented view of the batch seeded with ``seed`` for a loss of two views, and the images of
    each step mixed as ``trainer.mix`` says, also drawn from ``seed``. ``meta`` goes into
    every checkpoint, ``dynamics`` records when each example is learnt, the epochs of
    ``keep_epochs`` keep their checkpoints, and ``loggers`` receive each epoch's metrics.
    With ``replay``, an online teacher whose logits depend on the batch alone
    (:func:`replayable`) is recorded, or replayed from an earlier recording
    (:mod:`kdcl.distill.replay`). The names are ``spec``'s fields, and ``trainer``,
    ``optimizer`` and ``scheduler`` its recipe's; ``data``, ``loggers``, ``feeds`` and the
    cache's seed are the run's (``env``).
    """
    trainer, data, model, seed = spec.recipe.trainer, env.data, spec.model, spec.seed
    total_steps, steps_per_epoch, teachers = spec.total_steps, spec.steps_per_epoch, spec.teachers
    loss_spec, control_cfg = distill_parts(spec.distill)
    data.preprocess.reseed(seed)
    loss_fn = create_loss(loss_spec)
    teacher = combined_teacher(teachers, control_cfg)
    if teacher is not None and loss_fn.needs_teacher:
        example = torch.zeros(2, *data.input_shape, device=trainer.device)
        loss_fn.bind(model, teacher.lead, example, len(data.train))
    loss_fn.to(trainer.device)
    # Under DDP each rank draws its own noise (seed + rank) for its part of the batch.
    control = DistillControl(
        control_cfg, total_steps, steps_per_epoch, spec.rank, seed + distributed.rank(), trainer.label_smoothing
    ).to(trainer.device)
    groups = [
        {"params": [*model.parameters(), *loss_fn.parameters()]},
        {"params": control.parameters(), "weight_decay": 0.0},
    ]
    stage_optimizer = build_optimizer(groups, spec.recipe.optimizer)
    lr_schedule = build_schedule(stage_optimizer, spec.recipe.scheduler, total_steps, steps_per_epoch)
    if teacher is None or not loss_fn.needs_teacher:
        teacher_at = None
    elif control_cfg.teacher_route and spec.route is not None:
        teacher_at = teacher_route([*(Teachers([anchor]) for anchor in spec.route()), teacher], total_steps)
    else:
        teacher_at = lambda step: teacher  # noqa: E731
    mixer = BatchMixer(trainer.mix, data.input_shape[-2:], seed)
    student_layers, teacher_layers = loss_fn.layers()
    try:
        with (
            FeatureTap(model, student_layers) as student_features,
            FeatureTap(teacher.lead if teacher is not None else None, teacher_layers) as teacher_features,
        ):
            feed = teacher_feed(
                control_cfg,
                teacher_at,
                teachers,
                data=data,
                trainer=trainer,
                seed=env.cache_seed,
                directory=spec.cache_dir,
                feeds=env.feeds,
                strong=StrongViews(seed) if loss_fn.views > 1 else None,
            )
            if spec.replay is not None and teacher_at is not None and replayable(control_cfg, teachers, loss_fn, mixer):
                feed = spec.replay.wrap(feed, data.preprocess, data.num_classes, trainer.device, total_steps)
            yield Stage(
                name=spec.name,
                model=model,
                loss_fn=loss_fn,
                control=control,
                plan=spec.plan,
                optimizer=stage_optimizer,
                lr_schedule=lr_schedule,
                out_dir=spec.out_dir,
                meta=spec.meta,
                feed=feed,
                dynamics=spec.dynamics,
                keep_epochs=spec.keep_epochs,
                features=(student_features, teacher_features),
                steps_per_epoch=steps_per_epoch,
                loggers=env.loggers,
                mixer=mixer,
                scaler=torch.amp.GradScaler(trainer.device.type, enabled=trainer.fp16),
                ema=ModelEMA(model, trainer.ema_decay) if trainer.ema_decay is not None else None,
            )
    finally:
        loss_fn.release()


def combined_teacher(teachers: Sequence[nn.Module], control: ControlConfig) -> Teachers | None:
    """What teaches a stage: ``teachers`` combined as the control says (one: itself); None without any."""
    if not teachers:
        return None
    return Teachers(teachers, control.teacher_combine, control.teacher_weights, control.temperature)


def replayable(control: ControlConfig, teachers: Sequence[nn.Module], loss_fn: DistillLoss, mixer: BatchMixer) -> bool:
    """Whether the online teacher's logits of a step are a function of the step's batch alone:
    one teacher, no route through its checkpoints, no strong views, no mixing, none of its
    layers read by the loss (a replay does not run it), one process (each rank would need its own)."""
    return (
        parse(control.teacher_cache)[0] == "none"
        and not mixer
        and len(teachers) == 1
        and not control.teacher_route
        and loss_fn.views == 1
        and not loss_fn.layers()[1]
        and distributed.world() == 1
    )


def teacher_route(anchors: Sequence[nn.Module], total_steps: int) -> TeacherAt:
    """Step → teacher: each anchor in turn for an equal share of the steps (RCO, Jin et al.
    2019: the teacher's checkpoints from its own training, early ones first, then the final teacher)."""
    phase = math.ceil(total_steps / len(anchors))
    return lambda step: anchors[min(step // phase, len(anchors) - 1)]


def teacher_feed(
    control: ControlConfig,
    teacher_at: TeacherAt | None,
    teachers: Sequence[nn.Module],
    *,
    data: DataBundle,
    trainer: TrainSettings,
    seed: int,
    directory: Path,
    feeds: dict[tuple, Feed],
    strong: StrongViews | None = None,
) -> Feed:
    """A stage's feed (``distill.teacher_cache``; online without a teacher). A cache is filled
    once per teacher set (and how several teachers' targets combine), kept in ``feeds`` and
    shared by every stage those teachers teach; its views are drawn from ``seed`` and a disk
    store (one for every process under DDP) is the folder ``directory``. ``strong``: the online feed also gives a strongly
    augmented view of each batch (for a loss of two views)."""
    spec = control.teacher_cache if teacher_at is not None else "none"
    combined = [control.teacher_combine, control.teacher_weights, control.temperature] if len(teachers) > 1 else []
    key = (spec, control.teacher_cache_topk, tuple(id(m) for m in teachers), repr(combined))
    if key in feeds:
        return feeds[key]
    inputs = FeedInputs(
        preprocess=data.preprocess,
        train=data.train,
        teacher_at=teacher_at,
        autocast=trainer.autocast,
        num_classes=data.num_classes,
        batch_size=trainer.batch_size,
        seed=seed,
        views=parse(spec)[1],
        store=control.teacher_cache_store,
        directory=directory,
        shard_mb=control.teacher_cache_shard_mb,
        topk=control.teacher_cache_topk,
        strong=strong,
    )
    feed = build_feed(spec, inputs)
    if caches(spec):  # online feeds are per stage (the teacher may follow a route)
        feeds[key] = feed
    return feed
