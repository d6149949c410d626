"""The staged run: teacher → curriculum → baseline → distill, then the summary.

Each stage writes into its own folder of the run directory; the summary compares the
teacher, the student trained with cross-entropy alone (the baseline, same budget) and
the student trained with distillation and the curriculum.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from kdcl.cache import reuse_or_train
from kdcl.checkpoint import load_checkpoint, model_from_checkpoint
from kdcl.config import resolve_device
from kdcl.curricula import PACINGS, SCORERS, DataSchedule, Pacing, full_data, teacher_loss_and_confidence
from kdcl.data import DataBundle, load_data
from kdcl.engine import Trainer, evaluate, fit
from kdcl.errors import KdclError
from kdcl.losses import create_loss
from kdcl.models import count_params, create_model, size_mb
from kdcl.optim import build_optimizer, build_schedule
from kdcl.report import print_table, write_csv

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "model", "arch", "test_acc", "test_loss", "test_acc_last", "best_val_acc", "best_epoch", "last_epoch",
    "steps", "params", "size_mb", "seconds", "kd_gain", "teacher_agreement", "seed", "checkpoint",
]


@dataclass
class Run:
    """State shared by the stages of one run."""

    cfg: dict[str, Any]
    out: Path
    trainer: Trainer
    data: DataBundle
    channels_last: bool
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher: nn.Module | None = None
    test_logits: dict[str, Tensor] = field(default_factory=dict)  # per model, for teacher agreement
    order: Tensor | None = None  # training examples, easiest first
    pacing: Pacing = full_data

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.trainer.batch_size)

    @property
    def total_steps(self) -> int:
        return self.trainer.epochs * self.steps_per_epoch

    def stage_dir(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def to_device(self, model: nn.Module) -> nn.Module:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(self.trainer.device, memory_format=fmt)


def run_pipeline(cfg: dict[str, Any], out: Path) -> pd.DataFrame:
    """Run every stage of ``cfg`` into ``out`` and return the summary table."""
    t = cfg["trainer"]
    device = resolve_device(t["device"])
    trainer = Trainer(
        device=device, epochs=t["epochs"], batch_size=t["batch_size"], eval_batch_size=t["eval_batch_size"],
        amp=device.type == "cuda" if t["amp"] == "auto" else bool(t["amp"]),
        early_stopping_patience=t["early_stopping_patience"],
    )
    data = load_data(cfg["dataset"], device, t["channels_last"], cfg["seed"])
    log.info("data %s: %d train / %d val / %d test, %d classes, input %s, device %s",
             data.name, len(data.train), len(data.val), len(data.test), data.num_classes, data.input_shape, device)
    run = Run(cfg, out, trainer, data, t["channels_last"])
    teacher_stage(run)
    curriculum_stage(run)
    if cfg["baseline"]:
        student_stage(run, "baseline", {"name": "none"}, full_data, None)
    student_stage(run, "distill", cfg["distill"], run.pacing, run.order)
    return summarize(run)


# --------------------------------------------------------------------------- stages
def teacher_stage(run: Run) -> None:
    """Train the teacher with cross-entropy, or load it from ``teacher.checkpoint``."""
    spec = run.cfg["teacher"]
    if spec["checkpoint"]:
        ckpt = load_checkpoint(spec["checkpoint"])
        check_compatible(ckpt, run.data, "teacher.checkpoint")
        model = run.to_device(model_from_checkpoint(ckpt))
        log.info("teacher: loaded %s (%s) from %s", ckpt["model"]["name"], ckpt.get("stage"), spec["checkpoint"])
        val = evaluate(model, run.data.val, run.data, run.trainer)
        row = {"arch": ckpt["model"]["name"], "best_val_acc": val.acc, "best_epoch": ckpt.get("epoch"),
               "last_epoch": ckpt.get("epoch"), "steps": ckpt.get("step"), "seconds": 0.0,
               "checkpoint": str(Path(spec["checkpoint"]).resolve())}
        run.rows["teacher"] = {**row, **test_columns(run, "teacher", model)}
    else:
        model = reuse_or_train(run, "teacher", lambda: train(run, "teacher", spec, {"name": "none"}, full_data, None,
                                                             seed=run.cfg["seed"]))
    run.teacher = model.eval().requires_grad_(False)


def curriculum_stage(run: Run) -> None:
    """Score the training data with the teacher, order it easy → hard and plan the pacing."""
    spec = run.cfg["curriculum"]
    out = run.stage_dir("curriculum")
    scheduled = spec["scorer"] is not None
    if scheduled:
        train = evaluate(run.teacher, run.data.train, run.data, run.trainer)
        loss, confidence = teacher_loss_and_confidence(train.logits, train.labels)
        difficulty = SCORERS.create(spec["scorer"], train.logits, train.labels)
        run.order = torch.argsort(difficulty, stable=True)
        rank = torch.empty_like(run.order)
        rank[run.order] = torch.arange(len(rank))
        scores = pd.DataFrame({
            "index": run.data.train.origin, "label": train.labels.numpy(), "difficulty": difficulty.numpy(),
            "rank": rank.numpy(), "teacher_loss": loss.numpy(), "teacher_confidence": confidence.numpy(),
        })
        write_csv(scores, out / "scores.csv")
        pacing = dict(spec["pacing"])
        run.pacing = PACINGS.create(pacing.pop("name"), run.total_steps, **pacing)
    schedule = DataSchedule(torch.arange(len(run.data.train)), run.pacing, run.trainer.batch_size, 0)
    spe = run.steps_per_epoch
    plan = pd.DataFrame([
        {"epoch": e + 1, "first_step": e * spe, "last_step": (e + 1) * spe - 1,
         "data_fraction_start": schedule.fraction(e * spe), "data_fraction_end": schedule.fraction((e + 1) * spe - 1)}
        for e in range(run.trainer.epochs)
    ])
    write_csv(plan, out / "pacing.csv")
    info = {"curriculum": spec["name"], "scheduled": scheduled, "scorer": spec["scorer"],
            "pacing": spec.get("pacing"), "train_examples": len(run.data.train),
            "steps_per_epoch": spe, "total_steps": run.total_steps}
    (out / "curriculum.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("curriculum %s: %s", spec["name"], "scheduled" if scheduled else "nothing scheduled (all data, every step)")


def student_stage(run: Run, name: str, loss_cfg: dict, pacing: Pacing, order: Tensor | None) -> None:
    """Train the student (the baseline may come from the cache); every student stage
    starts from the same initial weights."""
    reuse_or_train(run, name, lambda: train(run, name, run.cfg["student"], loss_cfg, pacing, order,
                                            seed=run.cfg["seed"] + 1))
    same = run.test_logits[name].argmax(1) == run.test_logits["teacher"].argmax(1)
    run.rows[name]["teacher_agreement"] = same.float().mean().item()


# --------------------------------------------------------------------------- helpers
def train(run: Run, stage: str, spec: dict, loss_cfg: dict, pacing: Pacing, order: Tensor | None, seed: int) -> nn.Module:
    """Train one model for the run's step budget; return its best (validation) weights."""
    out = run.stage_dir(stage)
    data = run.data
    torch.manual_seed(seed)
    data.preprocess.generator.manual_seed(seed)
    model = run.to_device(create_model(spec["name"], data.num_classes, data.input_shape,
                                       pretrained=spec["pretrained"], **spec["kwargs"]))
    loss_fn = create_loss(loss_cfg)
    optimizer = build_optimizer(model, run.cfg["optimizer"])
    lr_schedule = build_schedule(optimizer, run.cfg["scheduler"], run.total_steps, run.steps_per_epoch)
    order = torch.arange(len(data.train)) if order is None else order
    schedule = DataSchedule(order, pacing, run.trainer.batch_size, seed)

    def columns(step: int) -> dict[str, float]:
        knobs = {"alpha": loss_fn.alpha, "temperature": loss_fn.temperature} if loss_fn.needs_teacher else {}
        return {**knobs, "data_fraction": schedule.fraction(step)}

    log.info("%s: %s, %s params, %d epochs × %d steps, loss %s",
             stage, spec["name"], f"{count_params(model):,}", run.trainer.epochs, run.steps_per_epoch, loss_cfg["name"])
    result = fit(stage, model, data, schedule, loss_fn, optimizer, lr_schedule, run.trainer, out,
                 checkpoint_meta(run, stage, spec), teacher=run.teacher, epoch_columns=columns)
    last = evaluate(model, data.test, data, run.trainer)
    best = run.to_device(model_from_checkpoint(load_checkpoint(result.best_path)))
    run.rows[stage] = {
        "arch": spec["name"], "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
        "last_epoch": result.last_epoch, "steps": result.steps, "seconds": round(result.seconds, 2),
        "checkpoint": str(result.best_path.resolve()), **test_columns(run, stage, best),
        "test_acc_last": last.acc,
    }
    return best


def test_columns(run: Run, stage: str, model: nn.Module) -> dict[str, Any]:
    """Test-split numbers of a stage's selected model; keeps its logits for agreement."""
    ev = evaluate(model, run.data.test, run.data, run.trainer)
    run.test_logits[stage] = ev.logits
    return {"test_acc": ev.acc, "test_loss": ev.loss, "params": count_params(model), "size_mb": round(size_mb(model), 4)}


def checkpoint_meta(run: Run, stage: str, spec: dict) -> dict[str, Any]:
    d = run.data
    return {
        "stage": stage, "model": {"name": spec["name"], "kwargs": dict(spec["kwargs"])},
        "num_classes": d.num_classes, "input_shape": list(d.input_shape), "class_names": d.class_names,
        "normalization": {"mean": d.mean, "std": d.std}, "dataset": d.name, "config": run.cfg,
    }


def check_compatible(ckpt: dict[str, Any], data: DataBundle, key: str) -> None:
    """A loaded model must match the data's classes and input shape."""
    found = (ckpt["num_classes"], tuple(ckpt["input_shape"]))
    wanted = (data.num_classes, data.input_shape)
    if found != wanted:
        raise KdclError(
            f"{key} was trained for {found[0]} classes on inputs {found[1]} (dataset {ckpt.get('dataset')!r}), "
            f"but dataset {data.name!r} has {wanted[0]} classes and inputs {wanted[1]}",
            fix=f"pass a checkpoint trained on {data.name!r}, or choose the matching dataset",
        )


def summarize(run: Run) -> pd.DataFrame:
    """Write ``summary.csv`` (one row per model) and print it."""
    rows = run.rows
    if "baseline" in rows:
        rows["distill"]["kd_gain"] = rows["distill"]["test_acc"] - rows["baseline"]["test_acc"]
    frame = pd.DataFrame([{"model": k, **v, "seed": run.cfg["seed"]} for k, v in rows.items()])
    frame = frame.reindex(columns=SUMMARY_COLUMNS)
    write_csv(frame, run.out / "summary.csv")
    shown = ["model", "arch", "test_acc", "test_acc_last", "best_val_acc", "best_epoch", "params", "size_mb",
             "seconds", "kd_gain", "teacher_agreement"]
    print_table(frame, f"kdcl summary — {run.out}", shown)
    return frame
