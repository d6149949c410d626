"""Class-incremental learning with distillation: ``scenario=class_incremental``.

The classes arrive in tasks (CIFAR-10 as 5 tasks of 2 classes, say). After task i the
model must tell apart every class seen so far with one output head, which grows by the
new classes' outputs at every task (:func:`kdcl.models.grow_head`), and it is not told
which task an image comes from. Each *strategy* (an arm: a folder and a table row) learns
the same task sequence its own way:

- ``finetune``: cross-entropy on the new classes' examples. The lower bound: it shows
  forgetting.
- ``lwf``: Learning without Forgetting (Li & Hoiem 2016): the same, plus distillation
  from the previous task's model on the old classes' outputs
  (:class:`kdcl.distill.losses.lwf.LearningWithoutForgetting`, ``scenario.lwf``).
- ``joint``: cross-entropy on every seen class's examples. The upper bound.

With ``memory_per_class`` = M > 0, finetune and lwf also keep M training examples of
every class they have learnt (drawn at random, seeded; the same for every arm) and train
on them beside the new ones (a small exemplar memory, as in iCaRL).

**Protocol.** Every arm takes the same optimizer steps per task, ``epochs ×
ceil(N_new / batch_size)`` with N_new the new classes' training examples, whatever its
pool (joint's is every seen class, memory adds a few). From task 2 on, each task starts
with ``warmup_epochs`` epochs that train the new classes' outputs alone (the body and the
old outputs frozen; LwF's warm-up), with cross-entropy for every arm. A task's model is
its best epoch on the validation examples of the classes it trained on (carved from
train); the test split only fills the accuracy matrix. A task that two arms would train
identically (task 1 always: nothing to distil from yet) is trained once and shared.

**Metrics.** A[i][j] is the accuracy on task j's test examples after task i, predicting
among all classes seen so far (class-incremental). ``task_aware`` repeats it predicting
among task j's classes only (the task given). From A: the average accuracy after each
task, the average forgetting (Chaudhry et al. 2018) and the backward transfer
(Lopez-Paz & Ranzato 2017). The run writes ``accuracy_matrix.csv`` (and a PNG heatmap per
protocol), ``lifelong.csv`` (one row per arm and task) and ``summary.csv`` (one row per
arm; ``best_val_acc`` is the final model's accuracy on the validation examples of every
class, what a sweep optimises).

**Curricula compose**: the task sequence is itself a class curriculum.
``class_order=easy_first`` (or ``hard_first``) orders the classes by the mean difficulty
the curriculum's scorer gives their examples, and within every task the curriculum
(``curriculum=...``) paces that task's pool as it paces any stage. The scores come from a
teacher trained on the whole training split ("transfer" scoring, Hacohen & Weinshall
2019); the arms never see examples outside their pools.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from kdcl import distributed
from kdcl.config.options import STUDENT, arch_label, section_option
from kdcl.curricula import ORDERS, PLANS, class_difficulty
from kdcl.data import Source, class_map, with_classes
from kdcl.errors import KdclError
from kdcl.models import classifier, count_params, freeze, grow_head
from kdcl.output.plots import heatmaps
from kdcl.output.tables import labelled, print_table, write_csv
from kdcl.output.trackers import CSV_ONLY, Loggers
from kdcl.provenance import provenance
from kdcl.registry import Registry
from kdcl.scenarios.standard import (
    Run,
    ce_only,
    curriculum_stage,
    start_run,
    teacher_stage,
    train_stage,
)
from kdcl.train.engine import EpochHook, evaluate
from kdcl.train.resume import graceful_stop

log = logging.getLogger(__name__)

STRATEGIES: Registry[Callable[[Task], Recipe]] = Registry("class-incremental strategy")
register_strategy = STRATEGIES.register

PROTOCOLS = ("class_incremental", "task_aware")
SUMMARY_COLUMNS = [
    "model",
    "arch",
    "avg_acc",
    "avg_forgetting",
    "bwt",
    "avg_acc_task_aware",
    "avg_forgetting_task_aware",
    "bwt_task_aware",
    "test_acc",
    "best_val_acc",
    "steps",
    "params",
    "seconds",
    "memory_per_class",
    "seed",
    "checkpoint",
    "kdcl_version",
    "git_commit",
]


# --------------------------------------------------------------------------- strategies
@dataclass
class Task:
    """What a strategy knows as task ``number`` begins. Positions index the run's training split."""

    number: int  # 1-based
    new: np.ndarray  # the new classes' training examples
    seen: np.ndarray  # the training examples of every class seen so far, the new ones included
    memory: np.ndarray  # exemplars kept from earlier tasks (empty without scenario.memory_per_class)
    previous: nn.Module | None  # the model after the previous task, read only (None at task 1)
    settings: dict[str, Any]  # the scenario config


@dataclass
class Recipe:
    """How a strategy trains one task: on which examples, with which loss, taught by whom."""

    pool: np.ndarray
    loss: dict[str, Any]  # a distill section (its loss and control keys)
    teachers: list[nn.Module] = field(default_factory=list)


@register_strategy("finetune")
def finetune(task: Task) -> Recipe:
    """Cross-entropy on the new classes' examples (and the memory's)."""
    return Recipe(pool=np.union1d(task.new, task.memory), loss=ce_only())


@register_strategy("lwf")
def lwf(task: Task) -> Recipe:
    """Fine-tuning plus distillation from the previous task's model on the old classes'
    outputs: ``CE + λ·KL(softmax(z_old/T) ‖ softmax(z[:, :C_old]/T))`` (Li & Hoiem 2016):
    ``distill=lwf``'s section with λ and T from ``scenario.lwf`` (the run's ``distill`` is not used)."""
    if task.previous is None:
        return finetune(task)
    teacher = freeze(copy.deepcopy(task.previous))  # freezing folds BatchNorm in place: a copy
    loss = {**section_option("distill", "lwf"), **task.settings["lwf"]}
    return Recipe(pool=np.union1d(task.new, task.memory), loss=loss, teachers=[teacher])


@register_strategy("joint")
def joint(task: Task) -> Recipe:
    """Cross-entropy on the examples of every class seen so far: nothing to forget."""
    return Recipe(pool=task.seen, loss=ce_only())


# --------------------------------------------------------------------------- class orders
# scenario.class_order: a function (difficulty of each class, generator) → the classes'
# positions in task order, like a curriculum order (kdcl.curricula.ORDERS) of examples.
# uses_difficulty: the order needs the curriculum's scores, so the teacher trains first.
CLASS_ORDERS: Registry[Callable[[Tensor, torch.Generator], Tensor]] = Registry(
    "class order", traits={"uses_difficulty": True}
)


@CLASS_ORDERS.register("natural", uses_difficulty=False)
def natural_order(difficulty: Tensor, generator: torch.Generator) -> Tensor:
    """The classes by their index."""
    return torch.arange(len(difficulty))


for _name in ORDERS:  # every curriculum order also orders classes, by their mean difficulty
    CLASS_ORDERS.register(_name, uses_difficulty=ORDERS.trait(_name, "uses_difficulty"))(ORDERS.get(_name))


# --------------------------------------------------------------------------- metrics
def average_accuracy(acc: np.ndarray) -> np.ndarray:
    """``ā_i = (1/i)·Σ_{j≤i} A[i][j]``: the mean accuracy over the tasks seen after each task i."""
    return np.array([acc[i, : i + 1].mean() for i in range(len(acc))])


def forgetting(acc: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al. 2018, "Riemannian Walk"): for every task j before
    the last one T, ``f_j = max_{j≤l<T} A[l][j] − A[T][j]``, the drop from its best accuracy
    so far; their mean (NaN for one task)."""
    last = len(acc) - 1
    if last < 1:
        return float("nan")
    return float(np.mean([acc[j:last, j].max() - acc[last, j] for j in range(last)]))


def backward_transfer(acc: np.ndarray) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017, GEM): ``(1/(T−1))·Σ_{j<T} (A[T][j] − A[j][j])``,
    how learning later tasks changed the earlier ones (negative: forgetting; NaN for one task)."""
    last = len(acc) - 1
    if last < 1:
        return float("nan")
    return float(np.mean([acc[last, j] - acc[j, j] for j in range(last)]))


def accuracy_row(logits: Tensor, labels: Tensor, bounds: list[int]) -> dict[str, list[float]]:
    """A[i][·] for one model per protocol: accuracy on each task's examples, task j holding the
    labels ``bounds[j] ≤ y < bounds[j + 1]``; class-incremental predicts among every output,
    task-aware among task j's."""
    row: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    for lo, hi in zip(bounds, bounds[1:]):
        mask = (labels >= lo) & (labels < hi)
        z, y = logits[mask], labels[mask]
        row["class_incremental"].append((z.argmax(1) == y).float().mean().item())
        row["task_aware"].append((z[:, lo:hi].argmax(1) + lo == y).float().mean().item())
    return row


# --------------------------------------------------------------------------- the scenario
@dataclass
class ArmResult:
    """One arm's accuracy matrices (per protocol, T × T, NaN above the diagonal), its
    per-task rows and its final model."""

    matrices: dict[str, np.ndarray]
    tasks: list[dict[str, Any]]
    model: nn.Module


def objective_arm(cfg: dict[str, Any]) -> str:
    """The summary row a sweep optimises: ``scenario.objective_arm``."""
    return cfg["scenario"]["objective_arm"]


def run_class_incremental(
    cfg: dict[str, Any],
    out: Path,
    loggers: Loggers = CSV_ONLY,
    on_epoch: EpochHook | None = None,
    job_columns: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Learn the task sequence with every arm of ``scenario.arms`` (each epoch's metrics to
    ``loggers``, and to ``on_epoch`` if given, as ``ARM/task_K``); write the tables."""
    settings = cfg["scenario"]
    strategies = {name: STRATEGIES.get(name) for name in settings["arms"]}
    if settings["objective_arm"] not in strategies:
        raise KdclError(
            f"scenario.objective_arm={settings['objective_arm']!r} is not one of scenario.arms {settings['arms']}",
            fix="name one of the arms",
        )
    run = start_run(cfg, out, loggers, on_epoch, job_columns)
    data = run.data
    classes = check_order(settings["class_order"], data.num_classes)
    if settings["tasks"] > len(classes):
        raise KdclError(
            f"scenario.tasks={settings['tasks']} is more than the {len(classes)} classes to learn",
            fix=f"set scenario.tasks to at most {len(classes)}",
        )
    with graceful_stop():
        by_difficulty = uses_difficulty(settings["class_order"])
        if PLANS.trait(cfg["curriculum"]["type"], "scheduled") or by_difficulty:
            teacher_stage(run)
            curriculum_stage(run, needed=[cfg["curriculum"]["scorer"]] if by_difficulty else [])
        order = class_order(run, classes)
        tasks = [chunk.tolist() for chunk in np.array_split(np.array(order), settings["tasks"])]
        log.info(
            "class-incremental: %d tasks, classes %s; arms %s",
            len(tasks),
            " | ".join(",".join(data.class_names[c] for c in task) for task in tasks),
            ", ".join(strategies),
        )
        shared: dict[str, tuple[str, nn.Module]] = {}
        results = {name: learn(run, name, strategy, tasks, shared) for name, strategy in strategies.items()}
    final_val = with_classes(data, order).val
    return write_tables(run, tasks, results, final_val)


def check_order(spec: Any, num_classes: int) -> list[int]:
    """The classes to learn, in the listed order for a list, else all of them (ordered later)."""
    if not isinstance(spec, list):
        return list(range(num_classes))
    if max(spec) >= num_classes:
        raise KdclError(
            f"scenario.class_order={spec} names class {max(spec)}, but the dataset has {num_classes} classes",
            fix=f"list distinct class indices in 0..{num_classes - 1}",
        )
    return list(spec)


def uses_difficulty(spec: Any) -> bool:
    """Whether ``scenario.class_order`` needs the curriculum's difficulty scores."""
    return not isinstance(spec, list) and CLASS_ORDERS.trait(spec, "uses_difficulty")


def class_order(run: Run, classes: list[int]) -> list[int]:
    """``classes`` in ``scenario.class_order``: as listed (a list), or by a :data:`CLASS_ORDERS`
    entry: by index (natural), at random (seeded), or by the mean difficulty of their
    examples under the curriculum's scorer."""
    spec = run.cfg["scenario"]["class_order"]
    if isinstance(spec, list):
        return classes
    scores = run.scores.get(run.cfg["curriculum"]["scorer"], torch.zeros(len(run.data.train)))
    difficulty = class_difficulty(scores, run.data.train.labels, run.data.num_classes)[classes]
    ranked = CLASS_ORDERS.get(spec)(difficulty, torch.Generator().manual_seed(run.cfg["seed"]))
    return [classes[i] for i in ranked.tolist()]


def learn(
    run: Run,
    arm: str,
    strategy: Callable[[Task], Recipe],
    tasks: list[list[int]],
    shared: dict[str, tuple[str, nn.Module]],
) -> ArmResult:
    """Train ``arm`` through the task sequence; ``shared`` holds the task stages trained so
    far by any arm, by what determines them, so an identical one is trained once."""
    settings, labels = run.cfg["scenario"], run.data.train.labels.numpy()
    bounds = np.cumsum([0, *map(len, tasks)]).tolist()
    matrices = {p: np.full((len(tasks), len(tasks)), np.nan) for p in PROTOCOLS}
    rows: list[dict[str, Any]] = []
    model: nn.Module | None = None
    memory, lineage = np.empty(0, dtype=np.int64), ""
    for k, classes in enumerate(tasks, start=1):
        seen = [c for task in tasks[:k] for c in task]
        new = np.flatnonzero(np.isin(labels, classes))
        task = Task(
            number=k,
            new=new,
            seen=np.flatnonzero(np.isin(labels, seen)),
            memory=memory,
            previous=model,
            settings=settings,
        )
        recipe = strategy(task)
        seed = run.cfg["seed"] + k
        # A stage trains its init in place and ``shared`` keeps every stage's model for other
        # arms: what a stage continues is always this arm's own copy.
        if model is not None:
            torch.manual_seed(seed)
            model = grow_head(copy.deepcopy(model), len(seen))
            if settings["warmup_epochs"]:
                warm = Recipe(pool=recipe.pool, loss=ce_only())
                with new_outputs_only(model, bounds[k - 1]):
                    lineage, model, _ = task_stage(
                        run,
                        f"{arm}/task_{k}_warmup",
                        warm,
                        seen,
                        len(new),
                        seed,
                        settings["warmup_epochs"],
                        model,
                        lineage,
                        shared,
                    )
                model = copy.deepcopy(model)
        lineage, model, stage = task_stage(
            run,
            f"{arm}/task_{k}",
            recipe,
            seen,
            len(new),
            seed,
            run.recipes[STUDENT].trainer.epochs,
            model,
            lineage,
            shared,
        )
        test_labels = class_map(seen, run.data.num_classes)[run.data.test.labels]  # as the stage's test split
        row = accuracy_row(run.test_logits[stage], test_labels[test_labels >= 0], bounds[: k + 1])
        for p in PROTOCOLS:
            matrices[p][k - 1, :k] = row[p]
        rows.append(
            {
                "arm": arm,
                "task": k,
                "classes": " ".join(run.data.class_names[c] for c in classes),
                "stage": stage,
                "pool": len(recipe.pool),
                "loss": recipe.loss["name"],
                **{f"avg_acc{suffix(p)}": float(np.mean(row[p])) for p in PROTOCOLS},
                **{c: run.rows[stage][c] for c in ("test_acc", "best_val_acc", "best_epoch", "steps", "seconds")},
            }
        )
        memory = np.union1d(memory, exemplars(labels, new, settings["memory_per_class"], run.cfg["seed"] + k))
    assert model is not None  # the scenario has at least one task
    return ArmResult(matrices=matrices, tasks=rows, model=model)


def suffix(protocol: str) -> str:
    return "" if protocol == "class_incremental" else f"_{protocol}"


def task_stage(
    run: Run,
    stage: str,
    recipe: Recipe,
    seen: list[int],
    budget: int,
    seed: int,
    epochs: int,
    init: nn.Module | None,
    lineage: str,
    shared: dict[str, tuple[str, nn.Module]],
) -> tuple[str, nn.Module, str]:
    """Train (or take from ``shared``) one stage of a task on ``recipe``, continuing ``init``
    (None: a new student), on the students' recipe (``stages.student``) for ``epochs``
    epochs of ``ceil(budget / batch_size)`` steps. Returns the stage's lineage key (what
    determines it), its model and its folder name."""
    what = {
        "after": lineage,
        "pool": hashlib.sha256(recipe.pool.tobytes()).hexdigest(),
        "loss": recipe.loss,
        "teachers": len(recipe.teachers),
        "epochs": epochs,
        "seed": seed,
        "warmup": stage.endswith("_warmup"),
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    if key in shared:
        name, model = shared[key]
        log.info("%s: the same training as %s, which it shares", stage, name)
        return key, model, name
    students = run.recipes[STUDENT]
    view = replace(
        run,
        data=with_classes(run.data, seen, train=recipe.pool),
        budget_examples=budget,
        recipes={**run.recipes, STUDENT: replace(students, trainer=replace(students.trainer, epochs=epochs))},
        scores={k: v[recipe.pool] for k, v in run.scores.items()},
    )
    model = train_stage(
        view,
        stage,
        run.cfg["student"],
        recipe.loss,
        run.cfg["curriculum"],
        role=STUDENT,
        seed=seed,
        teachers=recipe.teachers,
        init=init,
        select="last",
    )
    shared[key] = (stage, model)
    return key, model, stage


@contextmanager
def new_outputs_only(model: nn.Module, old: int) -> Iterator[None]:
    """While inside, only the output layer's rows ``old..`` (the new classes) train: every
    other parameter is frozen (no gradient: the optimizer skips it) and the gradient of the
    old rows is zeroed. BatchNorm statistics still follow the new data."""
    _, head = classifier(model)
    frozen = [p for p in model.parameters() if p.requires_grad and p is not head.weight and p is not head.bias]
    for p in frozen:
        p.requires_grad_(False)
    mask = torch.ones(head.out_features, 1, device=head.weight.device)
    mask[:old] = 0
    hooks = [head.weight.register_hook(lambda g: g * mask)]
    if head.bias is not None:
        hooks.append(head.bias.register_hook(lambda g: g * mask[:, 0]))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)


def exemplars(labels: np.ndarray, positions: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` examples of each class among ``positions``, drawn at random (seeded)."""
    if not per_class:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(positions[labels[positions] == c])[:per_class] for c in np.unique(labels[positions])]
    return np.sort(np.concatenate(kept))


# --------------------------------------------------------------------------- tables
def write_tables(run: Run, tasks: list[list[int]], results: dict[str, ArmResult], final_val: Source) -> pd.DataFrame:
    """``accuracy_matrix.csv`` (+ a PNG per protocol), ``lifelong.csv`` and ``summary.csv``."""
    names = [f"task_{j}" for j in range(1, len(tasks) + 1)]
    matrix_rows, summary_rows = [], []
    for arm, result in results.items():
        for p in PROTOCOLS:
            for i, values in enumerate(result.matrices[p], start=1):
                matrix_rows.append({"arm": arm, "protocol": p, "after_task": i, **dict(zip(names, values))})
        last = result.tasks[-1]
        summary_rows.append(
            {
                "model": arm,
                "arch": arch_label(run.cfg["student"]),
                **{f"avg_acc{suffix(p)}": average_accuracy(result.matrices[p])[-1] for p in PROTOCOLS},
                **{f"avg_forgetting{suffix(p)}": forgetting(result.matrices[p]) for p in PROTOCOLS},
                **{f"bwt{suffix(p)}": backward_transfer(result.matrices[p]) for p in PROTOCOLS},
                "test_acc": last["test_acc"],
                "best_val_acc": evaluate(result.model, final_val, run.data, run.trainer).acc,
                "steps": sum(r["steps"] for r in result.tasks),
                "params": count_params(result.model),
                "seconds": sum(r["seconds"] for r in result.tasks),
                "memory_per_class": run.cfg["scenario"]["memory_per_class"],
                "seed": run.cfg["seed"],
                "checkpoint": run.rows[last["stage"]]["checkpoint"],
            }
        )
    teacher = [{"model": "teacher", **run.rows["teacher"], "seed": run.cfg["seed"]}] if "teacher" in run.rows else []
    summary = pd.DataFrame(summary_rows + teacher).assign(**provenance()).reindex(columns=SUMMARY_COLUMNS)
    summary = labelled(summary, run.job_columns)
    matrix = pd.DataFrame(matrix_rows)
    per_task = pd.DataFrame([row for result in results.values() for row in result.tasks])
    if distributed.is_main():
        write_csv(matrix, run.out / "accuracy_matrix.csv")
        write_csv(per_task, run.out / "lifelong.csv")
        write_csv(summary, run.out / "summary.csv")
        for p in PROTOCOLS:
            grids = {
                arm: matrix[(matrix.arm == arm) & (matrix.protocol == p)]
                .set_index("after_task")[names]
                .rename_axis(index="after task", columns="accuracy on")
                for arm in results
            }
            heatmaps(
                grids, run.out / f"accuracy_matrix{suffix(p)}.png", f"A[i][j], {p.replace('_', '-')} ({run.out.name})"
            )
        for arm in results:
            shown = matrix[(matrix.arm == arm) & (matrix.protocol == "class_incremental")]
            print_table(
                shown.round(4), f"{arm}: accuracy on task j after task i (class-incremental)", ["after_task", *names]
            )
        print_table(
            summary,
            f"kdcl class-incremental summary — {run.out}",
            [
                "model",
                *run.job_columns,
                "avg_acc",
                "avg_forgetting",
                "bwt",
                "avg_acc_task_aware",
                "avg_forgetting_task_aware",
                "test_acc",
                "best_val_acc",
                "steps",
                "seconds",
            ],
        )
    return summary
