"""``scenario=record``: the teacher's soft labels stored on their own, before the students
train (FKD's record pass, Shen & Xing 2022), for instance before a sweep:

    kdcl train scenario=record dataset=imagefolder dataset.root=DIR \\
        distill.teacher_cache=views:8 distill.teacher_cache_store=disk distill.teacher_cache_topk=10

The teacher trains (or comes from the stage cache, or from ``teacher.checkpoint``), then the
teacher cache of every distillation of the config that keeps one (``distill`` and each arm)
is filled, on disk, in the stage cache's folder keyed by that teacher and the cache's
settings (:func:`kdcl.scenarios.stage_cache.soft_labels_dir`): the folder every later job
with the same teacher, data, views and cache settings reads instead of running the teacher.
A fill that was cut off resumes at its first unfilled shard; with ``trainer.devices=N``
each process fills its share of the shards. No student trains.

Writes ``summary.csv`` (the teacher's row) and ``soft_labels.csv``: for each distillation
recorded, its cache, the folder, the examples and views stored and the seconds it took.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from kdcl import distributed
from kdcl.config.options import STUDENT, arm_config, distill_parts
from kdcl.distill.feeds import caches, parse
from kdcl.distill.losses import create_loss
from kdcl.errors import KdclError
from kdcl.output.tables import write_csv
from kdcl.output.trackers import CSV_ONLY, Loggers
from kdcl.scenarios.standard import Run, check_losses, start_run, summarize, teacher_cache_dir, teacher_stage
from kdcl.train.assemble import combined_teacher, teacher_feed
from kdcl.train.engine import EpochHook
from kdcl.train.resume import graceful_stop


def recorded_distills(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The distillations of ``cfg`` whose teacher cache the record pass fills (``distill``
    and the arms, by name), each checked to keep it where later jobs find it."""
    named = {"distill": cfg["distill"], **{n: arm_config(cfg, a)[0] for n, a in (cfg.get("arms") or {}).items()}}
    cached = {}
    for name, distill in named.items():
        loss_spec, control = distill_parts(distill)
        if caches(control.teacher_cache) and create_loss(loss_spec).needs_teacher:
            cached[name] = distill
    where = "distill.teacher_cache=views:K distill.teacher_cache_store=disk cache=true"
    if not cached:
        raise KdclError(
            "scenario=record stores the teacher's logits of a teacher cache, but no distillation of this "
            f"config keeps one (distill.teacher_cache={cfg['distill']['teacher_cache']})",
            fix=f"add {where}, as the jobs that will read it set them",
        )
    if cfg.get("teachers"):
        raise KdclError(
            "scenario=record stores the logits of the run's own teacher, but this config distils from a teachers list",
            fix="record with teacher=... alone, or let the first job of the sweep fill its cache",
        )
    for name, distill in cached.items():
        if distill["teacher_cache_store"] != "disk" or not cfg["cache"]:
            raise KdclError(
                f"scenario=record keeps the teacher's logits for later jobs in the stage cache, on disk, but "
                f"{name} has teacher_cache_store={distill['teacher_cache_store']} and cache={cfg['cache']}",
                fix=f"set {where}",
            )
    return cached


def run_record(
    cfg: dict[str, Any],
    out: Path,
    loggers: Loggers = CSV_ONLY,
    on_epoch: EpochHook | None = None,
    job_columns: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The teacher, then the stores of :func:`recorded_distills`; ``soft_labels.csv`` and the summary."""
    recorded = recorded_distills(cfg)
    run = start_run(cfg, out, loggers, on_epoch, job_columns)
    check_losses(run)
    with graceful_stop():
        teacher_stage(run)
        rows = [record(run, name, distill) for name, distill in recorded.items()]
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)  # a teacher from its checkpoint wrote nothing yet
        write_csv(pd.DataFrame(rows), out / "soft_labels.csv")
    return summarize(run)


def record(run: Run, name: str, distill: dict[str, Any]) -> dict[str, Any]:
    """Fill the teacher cache of the distillation ``name`` as its stage would (the student
    recipe's batch for the teacher passes, the run's seed for the views); its row of
    ``soft_labels.csv``."""
    _, control = distill_parts(distill)
    tic = time.perf_counter()
    teacher = combined_teacher(run.teachers, control)
    assert teacher is not None  # the scenario records its teachers
    folder = teacher_cache_dir(run, None, distill)
    teacher_feed(
        control,
        lambda step: teacher,
        run.teachers,
        data=run.data,
        trainer=run.recipes[STUDENT].trainer,
        seed=run.cfg["seed"],
        directory=folder,
        feeds=run.feeds,
    )
    return {
        "distill": name,
        "teacher_cache": control.teacher_cache,
        "teacher_cache_topk": control.teacher_cache_topk,
        "folder": str(folder),
        "examples": len(run.data.train),
        "views": parse(control.teacher_cache)[1],
        "seconds": round(time.perf_counter() - tic, 2),
    }
