"""``kdcl bench``: what kdcl's data path and teacher cache buy, measured in one process.

On the data and models of a run config (``+experiment=...`` or the default), four arms
train the student for the same optimizer steps and batches of the same size:

- ``naive``: the reference KD loop as users write it: a torchvision ``DataLoader`` over
  PIL images with torchvision transforms (random crop, flip, ``ToTensor``, ``Normalize``),
  the teacher's forward pass on every batch, fp32, default memory format;
- ``kdcl``: kdcl's training steps (``engine.train_steps``) of a stage built as every
  kdcl stage is (``assemble.build_stage``), with the online teacher;
- ``kdcl_cached``: the same with ``distill.teacher_cache=views:K`` (the cache is filled
  first; its fill time is reported apart and amortised over the recipe's epochs);
- ``student``: kdcl's step with cross-entropy alone (no teacher): the floor;
- ``teacher``: the frozen teacher's forward pass alone, as kdcl runs it (BatchNorm folded,
  channels_last, ``inference_mode``), on the same augmented batches.

``student`` + ``teacher`` is the fastest any online distillation step can be with this
teacher on this machine (the ``online_floor`` row): the ratio naive / online_floor bounds
what ``kdcl`` can reach against the naive loop, and kdcl − online_floor is the online
path's own overhead.

The arms run in turn ``bench.repeats`` times, after ``bench.warmup`` untimed steps each,
and the median time of each arm is kept, so that slow spells of a noisy machine hit
every arm alike. It prints images/s and the ratios kdcl/naive, kdcl_cached/student and
kdcl/student, and writes ``bench.csv`` (with each arm's peak GPU memory, ``max_memory_mb``).

``bench.parity_epochs=E`` (with ``teacher.checkpoint``) trains the student for E epochs
with the naive loop, with kdcl online and with kdcl cached, from the same initial
weights and schedule, and adds their test accuracy (``parity.csv``): the fast path must
learn as well as the reference one.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from kdcl.commands.job import output_dir, plain_config
from kdcl.config.checks import validate
from kdcl.config.options import STUDENT, distill_parts, section_option, teacher_specs
from kdcl.config.schema import BenchConfig, OptimizerConfig, SchedulerConfig, TrainerConfig, typed
from kdcl.curricula import DataSchedule
from kdcl.data import PADDINGS, DataBundle, LoaderSource, TensorSource, load_data
from kdcl.data.images import DecodedImages
from kdcl.distill.losses import kl_teacher_student
from kdcl.distill.teachers import Teachers
from kdcl.errors import KdclError
from kdcl.models import build_model, freeze, to_device
from kdcl.optim import build_optimizer, build_schedule
from kdcl.output.tables import print_table, write_csv
from kdcl.train.assemble import StageEnvironment, StageRecipe, StageSpec, build_stage, teacher_feed
from kdcl.train.engine import TrainSettings, evaluate, peak_memory_mb, reset_peak_memory, train_steps
from kdcl.train.weights import load_teacher
from kdcl.trust import CodePolicy

log = logging.getLogger(__name__)

ARMS = {
    "naive": "(a) naive reference loop: DataLoader + PIL transforms, teacher every batch, fp32",
    "kdcl": "(b) kdcl distill, online teacher",
    "kdcl_cached": "(c) kdcl distill, teacher_cache=views:K",
    "student": "(d) kdcl student alone (cross-entropy)",
    "teacher": "(e) the frozen teacher's forward pass alone, as kdcl runs it",
}


@dataclass
class Setup:
    cfg: dict[str, Any]
    data: DataBundle
    trainer: TrainSettings
    teacher: nn.Module
    channels_last: bool
    out: Path
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    fill_seconds: float = 0.0  # the last cache fill
    peak_mb: float = math.nan  # the last timed arm's peak GPU memory (NaN on a CPU)

    def student(self) -> nn.Module:
        """The student with the run's initial weights (seed + 1, as every student stage)."""
        torch.manual_seed(self.cfg["seed"] + 1)
        spec = self.cfg["student"]
        return build_model(spec, self.data.num_classes, self.data.input_shape)

    def sync(self) -> None:
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize()


# --------------------------------------------------------------------------- the reference loop
class _PilImages(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images served one at a time as PIL images through ``transform``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Callable):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        image = self.x[i].transpose(1, 2, 0)
        return self.transform(Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)), int(self.y[i])


class _PilFiles(torch.utils.data.Dataset):
    """The image files of a split read per sample, decoded by PIL (torchvision's ``ImageFolder``
    loader) and served through ``transform``."""

    def __init__(self, source: LoaderSource, transform: Callable):
        images = cast(DecodedImages, source.dataset)  # drawn views: images decoded per sample (setup)
        self.read, self.positions, self.labels = images.read, source.origin, source.labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(io.BytesIO(self.read(int(self.positions[i])).data)) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def naive_loader(s: Setup) -> torch.utils.data.DataLoader:
    """The reference input pipeline: for data held in memory, PIL images cropped from their
    padding and flipped (``dataset.crop_padding``, ``dataset.flip``); for images read per
    sample with a drawn training view, torchvision's reference recipe on the files
    (``RandomResizedCrop`` with the dataset's ranges, a flip)."""
    from torchvision import transforms

    d, spec = s.data, s.cfg["dataset"]
    if isinstance(d.train, LoaderSource) and d.preprocess.augmented_views:
        crop = transforms.RandomResizedCrop(d.input_shape[1:], scale=spec["crop_scale"], ratio=spec["crop_ratio"])
        steps = [crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(d.mean, d.std)]
        images: torch.utils.data.Dataset = _PilFiles(d.train, transforms.Compose(steps))
    else:
        border = PADDINGS.get(spec["crop_padding_mode"]).torchvision(d.mean)
        steps = (
            [transforms.RandomCrop(d.input_shape[1:], padding=spec["crop_padding"], **border)]
            if spec["crop_padding"]
            else []
        )
        steps += [transforms.RandomHorizontalFlip()] if spec["flip"] else []
        steps += [transforms.ToTensor(), transforms.Normalize(d.mean, d.std)]
        in_memory = cast(TensorSource, d.train)  # setup refuses data read per sample without a drawn view
        images = _PilImages(in_memory.x.cpu().numpy(), d.train.labels.numpy(), transforms.Compose(steps))
    return torch.utils.data.DataLoader(
        images,
        batch_size=s.trainer.batch_size,
        shuffle=True,
        drop_last=False,
        num_workers=s.cfg["bench"]["naive_workers"],
        generator=torch.Generator().manual_seed(s.cfg["seed"]),
        persistent_workers=s.cfg["bench"]["naive_workers"] > 0,
    )


def naive_steps(s: Setup, student: nn.Module, total_steps: int) -> Iterator[None]:
    """The reference KD loop, one yield per optimizer step:
    ``L = (1 − α)·CE + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (Hinton et al. 2015)."""
    _, control = distill_parts(s.cfg["distill"])
    alpha, t = control.alpha, control.temperature
    device = s.trainer.device
    student = student.to(device)
    optimizer = build_optimizer(student.parameters(), s.optimizer)
    schedule = build_schedule(optimizer, s.scheduler, total_steps, _steps_per_epoch(s))
    loader, step = naive_loader(s), 0
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                teacher_logits = s.teacher(x)
            logits = student(x)
            loss = (
                (1 - alpha) * F.cross_entropy(logits, y, reduction="none")
                + alpha * kl_teacher_student(logits, teacher_logits, t)
            ).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            yield
            if step == total_steps:
                return


# --------------------------------------------------------------------------- kdcl's step
def kdcl_steps(s: Setup, student: nn.Module, total_steps: int, distill: dict[str, Any]) -> Iterator[None]:
    """kdcl's training steps (``engine.train_steps``) on all data, one yield per step, of a
    stage built as every kdcl stage is (``assemble.build_stage``, with the ``distill``
    section) and taught by kdcl's copy of the teacher. Building it fills any teacher cache:
    ``fill_seconds`` is the time it took."""
    model = s.trainer.prepare(to_device(student, s.trainer.device, s.channels_last))
    seed = s.cfg["seed"] + 1  # the students' seed, as in a run
    tic = time.perf_counter()
    spec = StageSpec(
        name="bench",
        out_dir=s.out,
        model=model,
        distill=distill,
        teachers=[kdcl_teacher(s)],
        plan=DataSchedule(torch.arange(len(s.data.train)), s.trainer.batch_size, seed),
        recipe=StageRecipe(trainer=s.trainer, optimizer=s.optimizer, scheduler=s.scheduler),
        total_steps=total_steps,
        steps_per_epoch=_steps_per_epoch(s),
        seed=seed,
        cache_dir=s.out / "teacher_cache",
    )
    with build_stage(spec, StageEnvironment(data=s.data, cache_seed=s.cfg["seed"])) as stage:
        s.sync()
        s.fill_seconds = time.perf_counter() - tic
        for _ in train_steps(stage, s.data, s.trainer, total_steps):
            yield


def _steps_per_epoch(s: Setup) -> int:
    return math.ceil(len(s.data.train) / s.trainer.batch_size)


def kdcl_teacher(s: Setup) -> nn.Module:
    """kdcl's frozen copy of the teacher (BatchNorm folded; compiled with ``trainer.compile``)."""
    return s.trainer.prepare(freeze(copy.deepcopy(s.teacher)))


def teacher_steps(s: Setup, total_steps: int) -> Iterator[None]:
    """The online feed's work alone: augment a batch and run kdcl's frozen teacher on it
    (the augmentation from the students' seed, as in ``kdcl``'s arm)."""
    d = s.data
    teacher = Teachers([kdcl_teacher(s)])
    d.preprocess.reseed(s.cfg["seed"] + 1)
    _, online = distill_parts({**s.cfg["distill"], "teacher_cache": "none"})
    feed = teacher_feed(
        online,
        lambda step: teacher,
        [teacher],
        data=d,
        trainer=s.trainer,
        seed=s.cfg["seed"],
        directory=s.out / "teacher_cache",
        feeds={},
    )
    plan = DataSchedule(torch.arange(len(d.train)), s.trainer.batch_size, s.cfg["seed"] + 1)
    batches = list(plan.batches(range(total_steps)))
    keys = [feed.view_keys(step, 1, b) for step, b in enumerate(batches)]
    for step, (idx, x, y) in enumerate(d.train.batches(batches, keys)):
        feed(step, 1, idx, x, y)
        yield


def arm_steps(s: Setup, arm: str, student: nn.Module, total_steps: int) -> Iterator[None]:
    """``student`` trained by ``arm`` (the teacher alone for ``teacher``), one yield per optimizer step."""
    distill = s.cfg["distill"]
    if arm == "naive":
        return naive_steps(s, student, total_steps)
    if arm == "teacher":
        return teacher_steps(s, total_steps)
    if arm == "student":
        return kdcl_steps(s, student, total_steps, section_option("distill", "none"))  # cross-entropy alone
    cache = {"kdcl": "none", "kdcl_cached": f"views:{s.cfg['bench']['views']}"}[arm]
    return kdcl_steps(s, student, total_steps, {**distill, "teacher_cache": cache})


# --------------------------------------------------------------------------- measuring
def time_arm(s: Setup, arm: str, warmup: int, steps: int) -> float:
    """Seconds per step of ``arm`` over ``steps`` steps after ``warmup`` untimed ones (which
    also take ``torch.compile``'s compilation, with ``trainer.compile``). ``s.peak_mb``: the
    arm's peak GPU memory, its teacher cache included."""
    s.fill_seconds = 0.0
    reset_peak_memory(s.trainer.device)
    it = arm_steps(s, arm, s.student(), warmup + steps)
    for _ in range(warmup):
        next(it)
    s.sync()
    tic = time.perf_counter()
    for _ in it:
        pass
    s.sync()
    s.peak_mb = peak_memory_mb(s.trainer.device)
    return (time.perf_counter() - tic) / steps


def setup(cfg: dict[str, Any], out: Path) -> Setup:
    """The data, the teacher and the students' recipe (``stages.student`` over the shared
    settings): every arm times a student's steps."""
    settings = typed(TrainerConfig, cfg["trainer"], "trainer")
    recipe = StageRecipe.of(cfg, STUDENT, TrainSettings.from_config(settings))
    device = recipe.trainer.device
    data = load_data(cfg["dataset"], device, settings.channels_last, cfg["seed"])
    if isinstance(data.train, LoaderSource) and not data.preprocess.augmented_views:
        raise KdclError(
            f"kdcl bench reads {data.name!r} per sample, whose reference pipeline it builds for a drawn "
            "training view only",
            fix="set dataset.train_view=random_resized_crop, or dataset.in_memory=true",
        )
    spec = teacher_specs(cfg)[0]
    if spec["checkpoint"]:
        teacher = load_teacher(spec["checkpoint"], spec, data, "teacher.checkpoint", CodePolicy.of(cfg)).model
    else:
        torch.manual_seed(cfg["seed"])
        teacher = build_model(spec, data.num_classes, data.input_shape)
    teacher = to_device(teacher, device, settings.channels_last).eval().requires_grad_(False)  # as a run's
    return Setup(
        cfg=cfg,
        data=data,
        trainer=recipe.trainer,
        teacher=teacher,
        channels_last=settings.channels_last,
        out=out,
        optimizer=recipe.optimizer,
        scheduler=recipe.scheduler,
    )


def run_bench(cfg: dict[str, Any], out: Path) -> pd.DataFrame:
    """Time the arms, print and write ``bench.csv`` (and ``parity.csv``)."""
    b = cfg["bench"]
    if b["parity_epochs"] and not teacher_specs(cfg)[0]["checkpoint"]:
        raise KdclError(
            "bench.parity_epochs needs a trained teacher",
            fix="train one (kdcl train ...) and pass teacher.checkpoint=RUN/teacher/best.pt",
        )
    s = setup(cfg, out)
    log.info(
        "bench on %s: %d train images, batch %d, teacher %s, student %s, device %s",
        s.data.name,
        len(s.data.train),
        s.trainer.batch_size,
        cfg["teacher"]["name"],
        cfg["student"]["name"],
        s.trainer.device,
    )
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    memory: dict[str, list[float]] = {arm: [] for arm in ARMS}
    fill: list[float] = []
    for repeat in range(b["repeats"]):
        for arm in ARMS:
            seconds[arm].append(time_arm(s, arm, b["warmup"], b["steps"]))
            memory[arm].append(s.peak_mb)
            if arm == "kdcl_cached":
                fill.append(s.fill_seconds)
            log.info(
                "repeat %d/%d  %-12s %.1f img/s", repeat + 1, b["repeats"], arm, s.trainer.batch_size / seconds[arm][-1]
            )
    per_step = {arm: statistics.median(v) for arm, v in seconds.items()}
    epoch_steps = _steps_per_epoch(s)
    amortised = per_step["kdcl_cached"] + statistics.median(fill) / (epoch_steps * s.trainer.epochs)
    rows = [
        {
            "arm": arm,
            "what": text,
            "images_per_s": s.trainer.batch_size / per_step[arm],
            "seconds_per_step": per_step[arm],
            "vs_naive": per_step["naive"] / per_step[arm],
            "vs_student_time": per_step[arm] / per_step["student"],
            "max_memory_mb": max(memory[arm]),
        }
        for arm, text in ARMS.items()
    ]
    floor = per_step["student"] + per_step["teacher"]
    derived = {
        "kdcl_cached_amortised": (
            f"(c) plus the cache fill spread over the recipe's {s.trainer.epochs} epochs",
            amortised,
        ),
        "online_floor": ("(d) + (e): the fastest an online distillation step can be", floor),
    }
    rows += [
        {
            "arm": arm,
            "what": text,
            "images_per_s": s.trainer.batch_size / t,
            "seconds_per_step": t,
            "vs_naive": per_step["naive"] / t,
            "vs_student_time": t / per_step["student"],
        }
        for arm, (text, t) in derived.items()
    ]
    frame = pd.DataFrame(rows)
    for key in ("steps", "warmup", "repeats", "views"):
        frame[key] = b[key]
    frame["cache_fill_seconds"] = statistics.median(fill)
    frame["batch_size"], frame["device"] = s.trainer.batch_size, str(s.trainer.device)
    frame["dataset"], frame["teacher"], frame["student"] = s.data.name, cfg["teacher"]["name"], cfg["student"]["name"]
    write_csv(frame, out / "bench.csv")
    print_table(
        frame.round(3),
        f"kdcl bench — {out}",
        ["arm", "images_per_s", "seconds_per_step", "vs_naive", "vs_student_time", "max_memory_mb"],
    )
    log.info(
        "kdcl / naive = %.2f× (at most %.2f× with this teacher: naive / (student + teacher))   "
        "kdcl_cached / student time = %.2f (amortised %.2f)   kdcl / student time = %.2f",
        per_step["naive"] / per_step["kdcl"],
        per_step["naive"] / floor,
        per_step["kdcl_cached"] / per_step["student"],
        amortised / per_step["student"],
        per_step["kdcl"] / per_step["student"],
    )
    if b["parity_epochs"]:
        parity(s, b["parity_epochs"])
    return frame


def parity(s: Setup, epochs: int) -> pd.DataFrame:
    """Train the student ``epochs`` epochs with the naive loop and with kdcl (online and
    cached), same teacher, initial weights and schedule; compare their test accuracy."""
    total = epochs * _steps_per_epoch(s)
    rows = []
    for arm in ("naive", "kdcl", "kdcl_cached"):
        tic = time.perf_counter()
        student = s.student()
        for _ in arm_steps(s, arm, student, total):
            pass
        s.sync()
        test = evaluate(to_device(student, s.trainer.device, s.channels_last), s.data.test, s.data, s.trainer)
        rows.append(
            {
                "arm": arm,
                "epochs": epochs,
                "steps": total,
                "test_acc": test.acc,
                "test_loss": test.loss,
                "seconds": time.perf_counter() - tic,
                "seed": s.cfg["seed"],
            }
        )
        log.info("parity %-12s test_acc %.4f (%d steps, %.0f s)", arm, test.acc, total, rows[-1]["seconds"])
    frame = pd.DataFrame(rows)
    write_csv(frame, s.out / "parity.csv")
    print_table(frame.round(4), f"kdcl bench parity — {s.out}", list(frame.columns))
    return frame


def bench_command(cfg: DictConfig) -> None:
    """``kdcl bench``: the timing arms, into ``bench.csv``."""
    validate(cfg, BenchConfig)
    run_bench(plain_config(cfg), output_dir())
    log.info("wrote %s", output_dir() / "bench.csv")
