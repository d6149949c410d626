"""The staged run: teacher(s) → baseline → curriculum → distill (and arms), then the summary.

Each stage writes into its own folder of the run directory; the summary compares the
teacher, the student trained with cross-entropy alone on full data (the baseline, same
budget) and the students trained with distillation and a curriculum (``distill`` plus
any ``arms``). With ``teachers`` several teachers train (``teacher/``, ``teacher_1/``, …);
with ``born_again.generations`` = N the distill stage is N born-again generations.
Under DDP every rank runs every stage (each with its own copy of the teachers); rank 0
writes the files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from torch import Tensor, nn

from kdcl import distributed
from kdcl.config.options import (
    STUDENT,
    TEACHER,
    arch_label,
    arm_config,
    distill_parts,
    model_option,
    section_option,
    teacher_specs,
)
from kdcl.config.schema import PRETRAINED_TEACHER, ControlConfig, CurriculumConfig, TrainerConfig, typed
from kdcl.curricula import (
    PLANS,
    SCORERS,
    DataSchedule,
    LearnedEpochs,
    PlanInputs,
    ScoreContext,
    class_difficulty,
    difficulty_rank,
    make_order,
    score,
)
from kdcl.data import DataBundle, TensorSource, load_data
from kdcl.distill.feeds import Feed, TopKLogits, caches, check_unaugmented
from kdcl.distill.losses import DistillLoss, create_loss
from kdcl.distill.replay import ReplaySlot
from kdcl.distill.teachers import Teachers
from kdcl.errors import KdclError
from kdcl.files import write_replacing, write_text
from kdcl.models import (
    TARGET,
    build_model,
    check_forward,
    copy_teacher_layers,
    count_macs,
    count_params,
    freeze,
    model_ref,
    saved_spec,
    size_mb,
    to_device,
)
from kdcl.output.progress import RunProgress
from kdcl.output.tables import labelled, print_table, write_csv
from kdcl.output.trackers import CSV_ONLY, Loggers
from kdcl.provenance import provenance
from kdcl.scenarios.stage_cache import reuse_or_produce, soft_labels_dir, teacher_logits_slot
from kdcl.train.assemble import StageEnvironment, StageRecipe, StageSpec, build_stage
from kdcl.train.checkpoint import load_model
from kdcl.train.engine import EpochHook, FitResult, TrainSettings, evaluate, fit
from kdcl.train.resume import check_same_config, graceful_stop, read_done, write_done
from kdcl.train.weights import load_teacher
from kdcl.trust import CodePolicy

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "model",
    "arch",
    "test_acc",
    "test_acc_top5",
    "test_loss",
    "test_acc_last",
    "best_val_acc",
    "best_epoch",
    "last_epoch",
    "steps",
    "params",
    "macs",
    "size_mb",
    "seconds",
    "kd_gain",
    "teacher_agreement",
    "distill",
    "curriculum",
    "seed",
    "checkpoint",
    "kdcl_version",
    "git_commit",
]


def ce_only() -> dict[str, Any]:
    """The distill section of a stage that trains with cross-entropy alone (``distill=none``)."""
    return section_option("distill", "none")


def no_curriculum() -> dict[str, Any]:
    """The curriculum section of a stage that trains on all data at every step (``curriculum=none``)."""
    return section_option("curriculum", "none")


@dataclass
class Run:
    """State shared by the stages of one run. ``cfg`` is the run's config as plain containers
    (what ``done.json``, checkpoints and the stage cache keep); the sections every stage
    trains with are typed. ``trainer`` holds what every stage shares (device, precision,
    evaluation); how long, in what batches and with what optimizer and schedule a stage
    trains is its role's recipe, ``recipes[TEACHER]`` or ``recipes[STUDENT]`` (``stages``)."""

    cfg: dict[str, Any]
    out: Path
    trainer: TrainSettings
    data: DataBundle
    channels_last: bool
    recipes: dict[str, StageRecipe]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    test_logits: dict[str, Tensor] = field(default_factory=dict)  # per model trained in this run
    test_predictions: dict[str, Tensor] = field(default_factory=dict)  # per model, for teacher agreement
    teacher: nn.Module | None = None  # the first teacher: it scores the curriculum
    teachers: list[nn.Module] = field(default_factory=list)  # every teacher, frozen
    learned_epoch: Tensor | None = None
    scores: dict[str, Tensor] = field(default_factory=dict)  # per scorer, one difficulty per example
    feeds: dict[tuple, Feed] = field(default_factory=dict)  # filled teacher caches, per spec and teacher set
    budget_examples: int | None = None  # the examples an epoch's steps are counted for (None: the train split's)
    loggers: Loggers = CSV_ONLY  # where the stages' per-epoch metrics go
    on_epoch: EpochHook | None = None  # sees every epoch of every stage (kdcl tune prunes with it)
    progress: RunProgress = field(default_factory=RunProgress)  # shows each stage as it trains
    job_columns: dict[str, Any] = field(default_factory=dict)  # summary columns: a sweep job's swept keys

    def environment(self) -> StageEnvironment:
        """What every stage of this run shares (:func:`kdcl.train.assemble.build_stage`)."""
        return StageEnvironment(data=self.data, cache_seed=self.cfg["seed"], loggers=self.loggers, feeds=self.feeds)

    def steps_per_epoch(self, role: str) -> int:
        """The optimizer steps of an epoch of ``role``'s stages: ``ceil(N / batch_size)``, N the
        examples the budget counts (``budget_examples``, else the train split's)."""
        return math.ceil((self.budget_examples or len(self.data.train)) / self.recipes[role].trainer.batch_size)

    def total_steps(self, role: str) -> int:
        """The step budget of ``role``'s stages: its epochs × :meth:`steps_per_epoch`."""
        return self.recipes[role].trainer.epochs * self.steps_per_epoch(role)

    def stage_dir(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def policy(self) -> CodePolicy:
        """The code a file may name in this run: what its config names (:mod:`kdcl.trust`)."""
        return CodePolicy.of(self.cfg)

    def to_device(self, model: nn.Module) -> nn.Module:
        return to_device(model, self.trainer.device, self.channels_last)

    def load_model(self, path: str | Path) -> nn.Module:
        """The model of a kdcl checkpoint of this run (or its cache), on the run's device."""
        return self.to_device(load_model(path, self.policy))


def distilled_student(cfg: dict[str, Any]) -> str:
    """The summary row of the run's distilled student: ``distill``, or the last born-again generation."""
    generations = cfg["born_again"]["generations"]
    return f"gen_{generations}" if generations else "distill"


def run_pipeline(
    cfg: dict[str, Any],
    out: Path,
    loggers: Loggers = CSV_ONLY,
    on_epoch: EpochHook | None = None,
    job_columns: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Run every stage of ``cfg`` into ``out``, each epoch's metrics to ``loggers`` (and to
    ``on_epoch`` if given), and return the summary table (``job_columns``: columns of it,
    one value each, e.g. a sweep job's swept keys)."""
    if cfg["born_again"]["generations"]:
        cfg = {
            **cfg,
            "student": {k: teacher_specs(cfg)[0].get(k) for k in ("option", "name", "kwargs", "pretrained", TARGET)},
        }
        log.info("born-again: the student takes the teacher's architecture, %s", model_ref(cfg["student"]).label)
    run = start_run(cfg, out, loggers, on_epoch, job_columns)
    check_losses(run)
    run.progress.plan(planned_stages(run))
    with graceful_stop():
        teacher_stage(run)
        if cfg["baseline"]:
            student_stage(run, "baseline", ce_only(), no_curriculum())
        curriculum_stage(run)
        assistant_stages(run)
        if cfg["born_again"]["generations"]:
            born_again_stage(run, cfg["born_again"]["generations"])
        else:
            student_stage(run, "distill", cfg["distill"], cfg["curriculum"])
        for name, arm in (cfg.get("arms") or {}).items():
            student_stage(run, name, *arm_config(cfg, arm))
    return summarize(run)


def start_run(
    cfg: dict[str, Any],
    out: Path,
    loggers: Loggers = CSV_ONLY,
    on_epoch: EpochHook | None = None,
    job_columns: Mapping[str, Any] | None = None,
) -> Run:
    """The run's trainer and data (the validation split carved), before any stage. Text
    data's tokenizer is saved as ``tokenizer.json`` in the run's directory (its
    checkpoints hold it too)."""
    settings = typed(TrainerConfig, cfg["trainer"], "trainer")
    trainer = TrainSettings.from_config(settings)
    data = load_data(cfg["dataset"], trainer.device, settings.channels_last, cfg["seed"])
    if data.text is not None and distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "tokenizer.json", data.text.tokenizer_json)
    distributed.check_splits({"train": len(data.train), "validation": len(data.val), "test": len(data.test)})
    log.info(
        "data %s: %d train / %d val / %d test, %d classes, input %s, %s",
        data.name,
        len(data.train),
        len(data.val),
        len(data.test),
        data.num_classes,
        data.input_shape,
        f"{data.train.num_workers} loader workers" if data.train.num_workers else "in memory",
    )
    log.info(
        "trainer: device %s, %s, compile %s, channels_last %s, %d CPU threads",
        trainer.device,
        trainer.precision,
        "on" if trainer.compile else "off",
        "on" if settings.channels_last else "off",
        torch.get_num_threads(),
    )
    return Run(
        cfg=cfg,
        out=out,
        trainer=trainer,
        data=data,
        channels_last=settings.channels_last,
        recipes={role: StageRecipe.of(cfg, role, trainer) for role in (TEACHER, STUDENT)},
        loggers=loggers,
        on_epoch=on_epoch,
        progress=RunProgress(settings.progress_every_s),
        job_columns=dict(job_columns or {}),
    )


def planned_stages(run: Run) -> list[tuple[str, int]]:
    """The stages :func:`run_pipeline` trains, in order, each with its optimizer steps: what
    the progress display counts (a stage the stage cache holds is counted all the same)."""
    cfg, teacher_steps, student_steps = run.cfg, run.total_steps(TEACHER), run.total_steps(STUDENT)
    teachers = [
        ("teacher" if k == 0 else f"teacher_{k}", teacher_steps)
        for k, spec in enumerate(teacher_specs(cfg))
        if not spec["checkpoint"]
    ]
    students = [
        *(["baseline"] if cfg["baseline"] else []),
        *(f"assistant_{i}" for i in range(1, len(cfg.get("assistants") or []) + 1)),
        *(f"gen_{k}" for k in range(1, cfg["born_again"]["generations"] + 1)),
        *([] if cfg["born_again"]["generations"] else ["distill"]),
        *(cfg.get("arms") or {}),
    ]
    return [*teachers, *((name, student_steps) for name in students)]


# --------------------------------------------------------------------------- stages
def teacher_stage(run: Run) -> None:
    """Train every teacher with cross-entropy, or load it from its checkpoint: ``teacher``,
    or the ``teachers`` list into ``teacher/``, ``teacher_1/``, … (teacher k with seed + 1000·k)."""
    for k, spec in enumerate(teacher_specs(run.cfg)):
        stage = "teacher" if k == 0 else f"teacher_{k}"
        run.teachers.append(run.trainer.prepare(freeze(one_teacher(run, stage, spec, run.cfg["seed"] + 1000 * k))))
    run.teacher = run.teachers[0]
    if len(run.teachers) > 1:
        ensemble_row(run, "teacher_ensemble", run.teachers)


def one_teacher(run: Run, stage: str, spec: dict, seed: int) -> nn.Module:
    if spec["checkpoint"]:
        return evaluate_teacher(run, stage, spec)
    if stage != "teacher":  # the first teacher alone is cached, scores the data and keeps a route
        return train_stage(run, stage, spec, ce_only(), no_curriculum(), role=TEACHER, seed=seed)
    dynamics = LearnedEpochs(len(run.data.train), run.trainer.device)
    points = spec.get("route_points", 0)  # a spec of ``teachers`` has none
    epochs = run.recipes[TEACHER].trainer.epochs  # the route's points are the teacher's own epochs
    keep = {round(epochs * k / (points + 1)) for k in range(1, points + 1)} - {0}
    model = reuse_or_train(
        run,
        stage,
        spec,
        lambda: train_stage(
            run, stage, spec, ce_only(), no_curriculum(), role=TEACHER, seed=seed, dynamics=dynamics, keep_epochs=keep
        ),
    )
    run.learned_epoch = torch.tensor(pd.read_csv(run.out / stage / "dynamics.csv")["learned_epoch"].to_numpy())
    return model


def evaluate_teacher(run: Run, stage: str, spec: dict) -> nn.Module:
    """A teacher given as trained weights (``checkpoint``: a kdcl checkpoint, a state_dict,
    ``.safetensors``, TorchScript or an HF model directory, :mod:`kdcl.train.weights`) is
    evaluated, not trained: its row holds its validation and test numbers."""
    loaded = load_teacher(spec["checkpoint"], spec, run.data, f"{stage}.checkpoint", run.policy)
    model = run.to_device(loaded.model)
    log.info("%s: loaded %s (%s) from %s", stage, loaded.arch, loaded.stage or loaded.format, spec["checkpoint"])
    row = {
        "arch": loaded.arch,
        "best_val_acc": evaluate(model, run.data.val, run.data, run.trainer).acc,
        "best_epoch": loaded.epoch,
        "last_epoch": loaded.epoch,
        "steps": loaded.step,
        "seconds": 0.0,
        "checkpoint": str(Path(spec["checkpoint"]).expanduser().resolve()),
    }
    run.rows[stage] = {**row, **test_columns(run, stage, model)}
    return model


def curriculum_stage(run: Run, needed: Collection[str] = ()) -> None:
    """Score the training data (when a student stage reads the scores, :func:`scorers_read`,
    or the caller ``needed`` a scorer) and record the pacing plan (of the student stages' step
    budget: the stages a curriculum paces)."""
    spec = typed(CurriculumConfig, run.cfg["curriculum"], "curriculum")
    out = run.stage_dir("curriculum")
    needed = scorers_read(run.cfg) | set(needed)
    if needed:
        score_examples(run, spec, out, needed)
    plan, spe = build_plan(run, spec, STUDENT), run.steps_per_epoch(STUDENT)
    rows = []
    for e in range(run.recipes[STUDENT].trainer.epochs):  # as planned (adaptive curricula may hold later)
        first, last = e * spe, (e + 1) * spe - 1
        rows.append(
            {
                "epoch": e + 1,
                "first_step": first,
                "last_step": last,
                "data_fraction_start": plan.fraction(first),
                "data_fraction_end": plan.fraction(last),
            }
        )
    scheduled = PLANS.trait(spec.type, "scheduled")
    info = {
        "curriculum": spec.name,
        "type": spec.type,
        "scheduled": scheduled,
        "scorer": spec.scorer,
        "order": spec.order,
        "pacing": run.cfg["curriculum"]["pacing"],
        "scorers": sorted(run.scores),
        "train_examples": len(run.data.train),
        "steps_per_epoch": spe,
        "total_steps": run.total_steps(STUDENT),
    }
    if distributed.is_main():
        write_csv(pd.DataFrame(rows), out / "pacing.csv")
        write_text(out / "curriculum.json", json.dumps(info, indent=2) + "\n")
    log.info(
        "curriculum %s: %s",
        spec.name,
        f"{spec.type}, scored by {spec.scorer}, {spec.order}"
        if scheduled
        else "nothing scheduled (all data, every step)",
    )


def scorers_read(cfg: dict[str, Any]) -> set[str]:
    """The scorers whose difficulties a student stage reads: that of each curriculum other
    than ``none`` (of ``distill`` or an arm), or with ``distill.sample_weight=difficulty``.
    Without one, the curriculum stage scores nothing."""
    arms = [arm_config(cfg, arm) for arm in (cfg.get("arms") or {}).values()]
    return {
        curriculum["scorer"]
        for distill, curriculum in [(cfg["distill"], cfg["curriculum"]), *arms]
        if PLANS.trait(curriculum["type"], "scheduled") or distill.get("sample_weight") == "difficulty"
    }


def score_examples(run: Run, spec: CurriculumConfig, out: Path, needed: Collection[str]) -> None:
    """The difficulty of each training example under the ``needed`` scorers, or with
    ``curriculum.score_all`` under every scorer the run can compute, into ``run.scores`` and
    ``scores.csv``; the teacher runs over the training split when one of them reads its logits."""
    names = SCORERS.names() if spec.score_all else needed
    labels = run.data.train.labels
    teacher = None
    if any(SCORERS.trait(name, "needs_teacher_logits") for name in {*names, *needed}):
        assert run.teacher is not None  # the data is scored after the teacher trains
        teacher = evaluate(run.teacher, run.data.train, run.data, run.trainer).logits
    tokens, pad_id = None, 0
    if run.data.text is not None:  # text data is held in memory
        tokens, pad_id = cast(TensorSource, run.data.train).x, run.data.text.pad_id
    ctx = ScoreContext(
        labels=labels,
        teacher_logits=teacher,
        seed=run.cfg["seed"],
        learned_epoch=run.learned_epoch,
        self_taught_logits=self_taught_logits(run),
        tokens=tokens,
        pad_id=pad_id,
    )
    run.scores = score(ctx, names, needed)
    columns: dict[str, Any] = {"index": run.data.train.origin, "label": labels.numpy()}
    if spec.scorer in run.scores:  # the run's curriculum's order
        order = make_order(run.scores[spec.scorer], labels, spec.order, spec.class_balanced, run.cfg["seed"])
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        columns.update(difficulty=run.scores[spec.scorer].numpy(), rank=rank.numpy())
    if teacher is not None:
        loss = torch.nn.functional.cross_entropy(teacher, labels, reduction="none")
        columns.update(teacher_loss=loss.numpy(), teacher_confidence=torch.exp(-loss).numpy())
    per_scorer = {f"d_{name}": d.numpy() for name, d in run.scores.items()}  # each scorer's difficulty
    if distributed.is_main():
        write_csv(pd.DataFrame({**columns, **per_scorer}), out / "scores.csv")


def assistant_stages(run: Run) -> None:
    """Teacher assistants (Mirzadeh et al. 2020): each model of ``assistants`` is distilled
    from the current teachers and becomes the teacher of the next, then of the student. An
    assistant is distilled as the students are, on their recipe (``stages.student``)."""
    for i, spec in enumerate(run.cfg.get("assistants") or [], start=1):
        spec = model_option(spec) if isinstance(spec, str) else {"kwargs": {}, "pretrained": False, **spec}
        model = train_stage(
            run,
            f"assistant_{i}",
            spec,
            run.cfg["distill"],
            run.cfg["curriculum"],
            role=STUDENT,
            seed=run.cfg["seed"] + 1 + i,
        )
        run.teachers = [freeze(model)]


def student_stage(
    run: Run, name: str, distill: dict, curriculum: dict, teachers: list[nn.Module] | None = None
) -> nn.Module:
    """Train the student (from ``teachers``, default the run's; the baseline may come from
    the cache); every student stage starts from the same initial weights: those of the
    seed, or with ``student.init_from_teacher`` the first teacher's layers."""
    seed, teachers_of_stage = run.cfg["seed"] + 1, run.teachers if teachers is None else teachers
    model = reuse_or_train(
        run,
        name,
        run.cfg["student"],
        lambda: train_stage(
            run,
            name,
            run.cfg["student"],
            distill,
            curriculum,
            role=STUDENT,
            seed=seed,
            teachers=teachers_of_stage,
            init=student_from_teacher(run, seed, teachers_of_stage[0])
            if run.cfg["student"].get("init_from_teacher")
            else None,
        ),
    )
    for row, predicted in ((run.rows[name], name), (run.rows[name].get("ema"), f"{name}_ema")):
        if row is not None and predicted in run.test_predictions:  # (not an average's from the cache)
            same = run.test_predictions[predicted] == run.test_predictions["teacher"]
            row["teacher_agreement"] = same.float().mean().item()
    return model


def student_from_teacher(run: Run, seed: int, teacher: nn.Module) -> nn.Module:
    """The student built from ``seed``, then given ``teacher``'s layers (DistilBERT's
    initialisation, :func:`kdcl.models.copy_teacher_layers`), or with
    ``student.init_from_teacher=pretrained`` the layers of the first teacher's pretrained
    weights, as they were before the teacher stage trained them."""
    torch.manual_seed(seed)
    spec, data = run.cfg["student"], run.data
    student = build_model(spec, data.num_classes, data.input_shape, spec["pretrained"], data.model_kwargs)
    pretrained = spec["init_from_teacher"] == PRETRAINED_TEACHER
    if pretrained:
        teacher = build_model(teacher_specs(run.cfg)[0], data.num_classes, data.input_shape, True, data.model_kwargs)
    copied = copy_teacher_layers(student, teacher)
    log.info(
        "student: %d of its tensors start from the %s teacher's", len(copied), "pretrained" if pretrained else "trained"
    )
    return student


def born_again_stage(run: Run, generations: int) -> None:
    """Born-again networks, Furlanello et al. (ICML 2018): generation k (``gen_k``) is the
    student distilled from generation k − 1, generation 0 being the teacher (the student
    has the teacher's architecture). The teacher of the next generation is a generation's
    best-validation model. Then the ensemble of generations 1..N (``ensemble``): the
    mean of their softmax outputs."""
    teachers, students = run.teachers, []
    for k in range(1, generations + 1):
        students.append(student_stage(run, f"gen_{k}", run.cfg["distill"], run.cfg["curriculum"], teachers))
        teachers = [freeze(students[-1])]
    ensemble_row(run, "ensemble", students, distill=f"ensemble of gen_1..gen_{generations}")


# --------------------------------------------------------------------------- helpers
PREDICTIONS_FILE = "test_predictions.pt"  # a cached stage's test-split predictions (int32), for agreement


def load_predictions(path: Path, examples: int) -> Tensor:
    """A cached stage's test predictions (``weights_only``: a tensor, nothing that runs); a
    file that is not one tensor of ``examples`` class ids is one message naming it."""
    try:
        predictions = torch.load(path, map_location="cpu", weights_only=True)
        whole = isinstance(predictions, Tensor) and predictions.shape == (examples,)
        found = None if whole and not predictions.is_floating_point() else f"a {type(predictions).__name__}"
    except Exception as err:  # unpickling refused, truncated, not a torch file: all are damage here
        found = str(err).splitlines()[0] if str(err) else type(err).__name__
    if found is not None:
        raise KdclError(
            f"{path} is not the stage's test predictions ({found}); nothing in it was run",
            fix=f"delete the cache entry it came from (the folder holding {path.parent.name}/ in cache_dir), "
            "or run with cache=false",
        )
    return predictions.long()


def reuse_or_train(run: Run, stage: str, spec: Mapping[str, Any], produce: Callable[[], nn.Module]) -> nn.Module:
    """``stage`` (a model of ``spec``) from the stage cache (:mod:`kdcl.scenarios.stage_cache`),
    or trained by ``produce``. On a hit the run gets the cached folder, the cached summary row
    (its ``arch`` this run's name for ``spec``: the key leaves the option's name out) and the
    cached best model with its test predictions (``test_predictions.pt``, kept in the entry
    when it was trained), so it is not evaluated again."""

    def produce_with_predictions() -> nn.Module:
        model = produce()
        if run.cfg["cache"] and distributed.is_main():
            predictions = run.test_predictions[stage].to(torch.int32).cpu()
            write_replacing(run.stage_dir(stage) / PREDICTIONS_FILE, lambda tmp: torch.save(predictions, tmp))
        return model

    model, cached_row = reuse_or_produce(
        run.cfg, stage, run.trainer, run.stage_dir(stage), produce_with_predictions, lambda: run.rows[stage]
    )
    if model is not None:  # trained, not restored from the cache
        return model
    assert cached_row is not None
    entry = cached_row.pop("entry")
    cached_row["arch"] = arch_label(spec)
    run.loggers.log_past_epochs(stage, run.out / stage)
    try:
        model = run.load_model(cached_row["checkpoint"])
        predictions = run.stage_dir(stage) / PREDICTIONS_FILE
        if predictions.is_file() and {"macs", "test_acc_top5"} <= cached_row.keys():
            run.test_predictions[stage] = load_predictions(predictions, len(run.data.test))
            run.rows[stage] = cached_row
        else:  # an entry stored before its predictions (or its macs or top-5 column) were kept
            run.rows[stage] = {**test_columns(run, stage, model), **cached_row}
    except KdclError as err:
        drop = f"delete {entry} and {run.out / stage} (the next run trains the {stage} again), or set cache=false"
        raise KdclError(
            f"the {stage} taken from the stage cache entry {entry} cannot be used: {err.what}",
            fix=f"{err.fix}; or {drop}" if err.fix else drop,
        ) from None
    return model


def build_plan(run: Run, spec: CurriculumConfig, role: str, seed: int | None = None) -> DataSchedule:
    """The step-wise data plan a curriculum section describes, from the run's scores, over
    the step budget and batches of ``role``'s stages."""
    labels = run.data.train.labels
    scores = run.scores.get(spec.scorer)
    if scores is None:  # before scoring (baseline): the plan ignores difficulty
        scores = torch.zeros(len(labels))
    order = make_order(scores, labels, spec.order, spec.class_balanced, run.cfg["seed"])
    rank = difficulty_rank(make_order(scores, labels, "easy_first", False, run.cfg["seed"]))
    inputs = PlanInputs(
        spec=spec,
        order=order,
        rank=rank,
        labels=labels,
        class_difficulty=class_difficulty(scores, labels, run.data.num_classes),
        total_steps=run.total_steps(role),
        steps_per_epoch=run.steps_per_epoch(role),
        batch_size=run.recipes[role].trainer.batch_size,
        seed=run.cfg["seed"] if seed is None else seed,
    )
    return PLANS.create(spec.type, inputs)


def example_ranks(run: Run, spec: CurriculumConfig) -> Tensor | None:
    """Each training example's difficulty rank under the curriculum's scorer (0 easiest),
    for ``distill.sample_weight=difficulty``; None before the data is scored."""
    scores = run.scores.get(spec.scorer)
    if scores is None:
        return None
    return difficulty_rank(make_order(scores, run.data.train.labels, "easy_first", False, run.cfg["seed"]))


def check_losses(run: Run) -> None:
    """Build every teacher (from its weights file when it has one) and the student as the
    stages will (pretrained weights included: a failed download stops the run here), each
    checked to take the data's inputs and give one logit per class; then build every
    distillation loss of the run (distill and arms) and bind it to the student and the
    first teacher, so a bad key or layer name stops the run before anything trains."""
    cfg, shape = run.cfg, run.data.input_shape
    first, *others = teacher_specs(cfg)
    teacher = checked_model(run, first, "teacher")
    for k, spec in enumerate(others, start=1):  # one at a time: each is dropped once checked
        checked_model(run, spec, f"teacher_{k}")
    student = checked_model(run, cfg["student"], "student")
    if cfg["student"].get("init_from_teacher"):  # born-again students are teacher specs
        if cfg["student"]["init_from_teacher"] == PRETRAINED_TEACHER and not first["pretrained"]:
            raise KdclError(
                "student.init_from_teacher=pretrained starts the students from the teacher's pretrained "
                f"weights, but teacher.pretrained is false: {model_ref(first).label} has none to give",
                fix="set teacher.pretrained=true, or student.init_from_teacher=true for the trained teacher's layers",
            )
        copy_teacher_layers(student, teacher)  # the shapes allow it, or one message now
    for distill in [cfg["distill"], *(arm_config(cfg, arm)[0] for arm in (cfg.get("arms") or {}).values())]:
        loss_spec, control = distill_parts(distill)
        loss_fn = create_loss(loss_spec)
        if loss_fn.needs_teacher:
            loss_fn.bind(student, teacher, torch.zeros(2, *shape), len(run.data.train))
        check_teacher_cache(loss_spec["name"], loss_fn, control, run.data)
        check_mixing(cfg["trainer"]["mix"], loss_spec["name"], loss_fn, control, run.data)


def checked_model(run: Run, spec: dict, role: str) -> nn.Module:
    """The model of ``spec`` as its stage starts from it: loaded from its weights file
    (``checkpoint``, checked as it loads), or built with its pretrained weights and checked
    by one forward pass on the data's input shape."""
    if spec.get("checkpoint"):
        return load_teacher(spec["checkpoint"], spec, run.data, f"{role}.checkpoint", run.policy).model
    model = build_model(spec, run.data.num_classes, run.data.input_shape, spec["pretrained"], run.data.model_kwargs)
    check_forward(model, run.data.input_shape, run.data.num_classes, f"{model_ref(spec).label} ({role})")
    return model


def check_teacher_cache(name: str, loss_fn: DistillLoss, control: ControlConfig, data: DataBundle) -> None:
    """A cache holds the (final) teacher's logits: nothing else of the teacher, and no
    strong views; only a cache keeps top-K logits, and K is at most the number of classes;
    ``no_aug`` takes data without augmentation; text has no strong views to distil on."""
    spec, topk, num_classes = control.teacher_cache, control.teacher_cache_topk, data.num_classes
    check_unaugmented(spec, data.preprocess)
    if data.text is not None and loss_fn.views > 1:
        raise KdclError(
            f"distill={name} distils on strongly augmented views of images (RandAugment), but dataset {data.name!r} is text",
            fix="choose a logit loss that takes one view, e.g. distill=kd or distill=dkd",
        )
    if topk is not None:
        if not caches(spec):
            raise KdclError(
                f"distill.teacher_cache_topk={topk} keeps part of a teacher cache, but distill.teacher_cache={spec}",
                fix="set distill.teacher_cache=views:K (or no_aug), or distill.teacher_cache_topk=null",
            )
        TopKLogits(topk, num_classes)  # raises when K is out of range
    if not caches(spec) or not loss_fn.needs_teacher:
        return
    needs = (
        "its intermediate features"
        if loss_fn.layers()[1]
        else "its logits on a new strongly augmented view of every batch"
        if loss_fn.views > 1
        else "a different teacher per phase"
        if control.teacher_route
        else None
    )
    if needs:
        raise KdclError(
            f"distill.teacher_cache={spec} caches the teacher's logits, but distill={name} needs {needs}",
            fix="set distill.teacher_cache=none for this loss",
        )


def check_mixing(
    alphas: dict[str, float], name: str, loss_fn: DistillLoss, control: ControlConfig, data: DataBundle
) -> None:
    """``trainer.mix`` mixes images, before the teacher sees them: refused for text, for a
    teacher cache (its logits belong to unmixed views) and for a loss whose distillation
    term reads the hard label (a mixed image has two)."""
    used = ", ".join(f"trainer.mix.{method}={alpha}" for method, alpha in alphas.items() if alpha > 0)
    if not used:
        return
    if data.text is not None:
        raise KdclError(
            f"{used} mixes images, but dataset {data.name!r} is text", fix="set trainer.mix.<method>=0 for text"
        )
    if caches(control.teacher_cache) and loss_fn.needs_teacher:
        raise KdclError(
            f"{used} mixes each batch's images before the teacher sees them, but distill.teacher_cache="
            f"{control.teacher_cache} stores the teacher's logits on unmixed views",
            fix="set distill.teacher_cache=none (the teacher sees every mixed batch), or turn the mixing off",
        )
    if loss_fn.reads_label:
        raise KdclError(
            f"{used} gives each image two labels, but distill={name} decomposes the logits around one target class",
            fix="choose a loss whose distillation term does not read the label (e.g. distill=kd), or turn the mixing off",
        )


def self_taught_logits(run: Run):
    """Logits of a student-architecture model trained with CE: the baseline's, when it ran."""
    if "baseline" not in run.rows:
        if not SCORERS.trait(run.cfg["curriculum"]["scorer"], "needs_student_model"):
            return None
        return lambda: (
            evaluate(
                train_stage(
                    run,
                    "curriculum/self_taught",
                    run.cfg["student"],
                    ce_only(),
                    no_curriculum(),
                    role=STUDENT,
                    seed=run.cfg["seed"] + 1,
                ),
                run.data.train,
                run.data,
                run.trainer,
            ).logits
        )
    baseline = run.load_model(run.out / "baseline" / "best.pt")
    return lambda: evaluate(baseline, run.data.train, run.data, run.trainer).logits


def route_checkpoints(run: Run) -> list[nn.Module]:
    """RCO (Jin et al. 2019): the teacher's checkpoints from its own training, early ones
    first, frozen; each teaches an equal share of the steps before the trained teacher."""
    paths = sorted((run.out / "teacher").glob("epoch_*.pt"))
    if not paths:
        raise KdclError(
            "distill.teacher_route=true needs checkpoints saved during teacher training",
            fix="set teacher.route_points=N (N ≥ 1) and train the teacher in this run",
        )
    return [freeze(run.load_model(p)) for p in paths]


def train_stage(
    run: Run,
    stage: str,
    spec: dict,
    distill: dict,
    curriculum: dict,
    *,
    role: str,
    seed: int,
    dynamics: LearnedEpochs | None = None,
    keep_epochs: Collection[int] = frozenset(),
    teachers: list[nn.Module] | None = None,
    init: nn.Module | None = None,
    select: str = "best",
) -> nn.Module:
    """Train one model on the recipe of ``role`` (``TEACHER`` or ``STUDENT``: its epochs,
    batch size, optimizer and schedule, and so its step budget); return its best
    (validation) weights, or with ``select="last"`` its last ones, which its summary row
    then reports.

    The model is ``spec``'s architecture, freshly initialised from ``seed``, or ``init``
    trained on (class-incremental tasks continue the previous task's model). It learns
    with the ``distill`` section's loss from ``teachers`` (default: the run's), on the plan
    of the ``curriculum`` section; :func:`kdcl.train.assemble.build_stage` assembles the
    stage and :func:`kdcl.train.engine.fit` trains it.

    A stage that finished in an earlier run of the same run directory is not trained
    again, and one that was cut off continues where it stopped.
    """
    out = run.stage_dir(stage)
    data = run.data
    done = read_done(out / "done.json")
    if done is not None:
        check_same_config(done["config"], run.cfg, out / "done.json")
        log.info("%s: finished in an earlier run (%s), not trained again", stage, out / "done.json")
        run.loggers.log_past_epochs(stage, out)
        chosen = run.load_model(out / f"{select}.pt")
        # the test columns a row written before they existed lacks (macs, test_acc_top5)
        run.rows[stage] = {**test_columns(run, stage, chosen), **done["row"]}
        return chosen
    curriculum_cfg = typed(CurriculumConfig, curriculum, "curriculum")
    recipe = run.recipes[role]
    torch.manual_seed(seed)
    if init is None:
        init = build_model(spec, data.num_classes, data.input_shape, spec["pretrained"], data.model_kwargs)
    model = run.trainer.prepare(run.to_device(init))
    log.info(
        "%s: %s, %s params, %s × %d steps, loss %s, curriculum %s",
        stage,
        model_ref(spec).label,
        f"{count_params(model):,}",
        f"{recipe.trainer.epochs} epoch{'' if recipe.trainer.epochs == 1 else 's'}",
        run.steps_per_epoch(role),
        distill["name"],
        curriculum_cfg.type,
    )
    plan = build_plan(run, curriculum_cfg, role, seed)
    replay = teacher_logits(run, role, teachers, curriculum, seed) if plan.order_fixed else None
    stage_spec = StageSpec(
        name=stage,
        out_dir=out,
        model=model,
        distill=distill,
        teachers=run.teachers if teachers is None else teachers,
        plan=plan,
        recipe=recipe,
        total_steps=run.total_steps(role),
        steps_per_epoch=run.steps_per_epoch(role),
        seed=seed,
        cache_dir=teacher_cache_dir(run, teachers, distill),
        rank=example_ranks(run, curriculum_cfg),
        route=lambda: route_checkpoints(run),
        meta=checkpoint_meta(run, stage, spec, init),
        dynamics=dynamics,
        keep_epochs=keep_epochs,
        replay=replay,
    )
    with build_stage(stage_spec, run.environment()) as parts:
        result = fit(parts, data, recipe.trainer, run.on_epoch, run.progress)
    if replay is not None:
        replay.finish(stage, run.total_steps(role))
    path = result.best_path if select == "best" else result.last_path
    chosen = run.load_model(path)
    columns = test_columns(run, stage, chosen)
    run.rows[stage] = {
        "arch": arch_label(spec),
        "distill": distill["name"],
        "curriculum": f"{curriculum_cfg.scorer}/{curriculum_cfg.order}"
        if PLANS.trait(curriculum_cfg.type, "ranked")
        else curriculum_cfg.type,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "last_epoch": result.last_epoch,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "checkpoint": str(path.resolve()),
        **columns,
        "test_acc_last": columns["test_acc"]
        if select == "last" or result.best_epoch == result.last_epoch  # the same weights
        else evaluate(model, data.test, data, run.trainer).acc,
    }
    if result.ema_best_epoch:  # the weight average (trainer.ema_decay): a row of its own in the summary
        run.rows[stage]["ema"] = ema_row(run, stage, result, select)
    if distributed.is_main():
        if dynamics is not None:
            learned = pd.DataFrame({"index": data.train.origin, "learned_epoch": dynamics.learned_epoch().numpy()})
            write_csv(learned, out / "dynamics.csv")
        write_done(out / "done.json", run.rows[stage], run.cfg)
        (out / "resume.pt").unlink(missing_ok=True)
    distributed.barrier()  # the other ranks read these files next
    return chosen


def ema_row(run: Run, stage: str, result: FitResult, select: str) -> dict[str, Any]:
    """The summary row of ``stage``'s weight average, ``<stage>_ema``: as the stage's own row,
    its weights those of the average's best validation epoch (``ema_best.pt``) or, with
    ``select="last"``, of the last one (``ema_last.pt``)."""
    out, data = run.stage_dir(stage), run.data
    chosen = out / ("ema_best.pt" if select == "best" else "ema_last.pt")
    columns = test_columns(run, f"{stage}_ema", run.load_model(chosen))
    same = select == "last" or result.ema_best_epoch == result.last_epoch
    last = (
        columns["test_acc"] if same else evaluate(run.load_model(out / "ema_last.pt"), data.test, data, run.trainer).acc
    )
    row = run.rows[stage]
    return {
        **{key: row[key] for key in ("distill", "curriculum", "last_epoch", "steps", "seconds")},
        "best_val_acc": result.ema_best_val_acc,
        "best_epoch": result.ema_best_epoch,
        "checkpoint": str(chosen.resolve()),
        **columns,
        "test_acc_last": last,
    }


def own_teacher_weights(run: Run, teachers: list[nn.Module] | None) -> Path | None:
    """The weights file of the run's own teacher when it teaches a stage (not assistants, a
    born-again generation or a ``teachers`` list): what keys the teacher's outputs kept
    in the stage cache."""
    own = teachers is None or teachers is run.teachers
    if not own or run.cfg["teachers"] or not run.teachers or run.teachers[0] is not run.teacher:
        return None
    checkpoint = run.cfg["teacher"]["checkpoint"]
    return Path(checkpoint).expanduser() if checkpoint else run.out / "teacher" / "best.pt"


def teacher_logits(
    run: Run, role: str, teachers: list[nn.Module] | None, curriculum: dict, seed: int
) -> ReplaySlot | None:
    """Where a stage of ``role`` taught by the run's own teacher records or replays its
    online logits (``cache_teacher_logits_mb``, :mod:`kdcl.distill.replay`)."""
    weights = own_teacher_weights(run, teachers)
    if weights is None:
        return None
    steps = run.total_steps(role)
    plan = {"curriculum": curriculum, "seed": seed, "steps": steps, "examples": run.budget_examples}
    rows = steps * run.recipes[role].trainer.batch_size
    return teacher_logits_slot(run.cfg, run.trainer, run.out, plan, weights, rows, run.data.num_classes)


def teacher_cache_dir(run: Run, teachers: list[nn.Module] | None, distill: dict) -> Path:
    """The folder of a stage's teacher cache on disk: for the run's own teacher with the
    stage cache on, a folder of the stage cache keyed by that teacher and the cache's
    settings (:func:`kdcl.scenarios.stage_cache.soft_labels_dir`), which later jobs, other
    students and ``scenario=record`` share and a cut-off fill resumes; else one of the run's
    ``teacher_cache/``, the run's n-th cache ``SPEC-n``."""
    weights = own_teacher_weights(run, teachers)
    if weights is None or not run.cfg["cache"] or distill["teacher_cache_store"] != "disk":
        return run.out / "teacher_cache" / f"{distill['teacher_cache'].replace(':', '_')}-{len(run.feeds)}"
    return soft_labels_dir(run.cfg, run.trainer, distill, weights)


def test_columns(run: Run, stage: str, model: nn.Module) -> dict[str, Any]:
    """Test-split numbers of a stage's selected model (top-5 accuracy NaN for 10 classes or
    fewer, :func:`kdcl.train.engine.top5_accuracy`); keeps its logits for agreement."""
    ev = evaluate(model, run.data.test, run.data, run.trainer)
    run.test_logits[stage] = ev.logits
    run.test_predictions[stage] = ev.logits.argmax(1)
    return {
        "test_acc": ev.acc,
        "test_acc_top5": ev.acc_top5,
        "test_loss": ev.loss,
        "params": count_params(model),
        "macs": count_macs(model, run.data.input_shape),
        "size_mb": round(size_mb(model), 4),
    }


def ensemble_row(run: Run, name: str, models: list[nn.Module], **columns: Any) -> None:
    """A summary row for the mean of several models' softmax outputs on the test split."""
    run.rows[name] = {"arch": f"ensemble of {len(models)}", **test_columns(run, name, Teachers(models)), **columns}


def checkpoint_meta(run: Run, stage: str, spec: dict, model: nn.Module) -> dict[str, Any]:
    """What a stage's checkpoints hold beside the weights: the model's label (the summary's
    arch) and spec (source, name or ``_target_``, kwargs; :func:`kdcl.models.saved_spec`),
    the data's classes, shape and normalisation, and the run's config."""
    d = run.data
    return {
        "stage": stage,
        "arch": arch_label(spec),
        "model": saved_spec(spec, model),
        "num_classes": d.num_classes,
        "input_shape": list(d.input_shape),
        "class_names": d.class_names,
        "normalization": {"mean": d.mean, "std": d.std},
        **({"tokenizer": asdict(d.text)} if d.text is not None else {}),
        "dataset": d.name,
        "config": run.cfg,
        **({"classes": d.class_ids} if d.class_ids is not None else {}),
        "provenance": provenance(),
    }


def summarize(run: Run) -> pd.DataFrame:
    """Write ``summary.csv`` (one row per model) and print it."""
    rows = {}  # each stage's row, then its weight average's (trainer.ema_decay), if any
    for name, row in run.rows.items():
        rows[name] = {k: v for k, v in row.items() if k != "ema"}
        if "ema" in row:
            rows[f"{name}_ema"] = {**row["ema"], "arch": row["arch"]}  # the stage's model, averaged
    for name, row in rows.items():  # a student's gain: over the baseline, an average's over the baseline's
        baseline = rows.get("baseline_ema" if name.endswith("_ema") else "baseline")
        student = not name.startswith(("teacher", "baseline"))
        if student and baseline is not None and row["arch"] == baseline["arch"]:
            row["kd_gain"] = row["test_acc"] - baseline["test_acc"]
    frame = pd.DataFrame([{"model": k, **v, "seed": run.cfg["seed"], **provenance()} for k, v in rows.items()])
    frame = labelled(frame.reindex(columns=SUMMARY_COLUMNS), run.job_columns)
    if distributed.is_main():
        write_csv(frame, run.out / "summary.csv")
        shown = [
            "model",
            *run.job_columns,
            "arch",
            "distill",
            "curriculum",
            "test_acc",
            "test_acc_top5",
            "test_acc_last",
            "best_val_acc",
            "best_epoch",
            "steps",
            "params",
            "macs",
            "seconds",
            "kd_gain",
            "teacher_agreement",
        ]
        print_table(frame, f"kdcl summary — {run.out}", shown)
    return frame
