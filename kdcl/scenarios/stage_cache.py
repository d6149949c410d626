"""The stage cache: train a teacher or a baseline once, reuse it across runs and sweep jobs.

An entry is one stage's whole output folder (checkpoints, metrics, any other file the
stage writes) plus its summary row, stored under a key that hashes exactly the config
that determines the stage (:func:`stage_key`). Changing ``distill.*`` or
``curriculum.*`` hits the teacher and baseline entries; changing the recipe misses.

Safe with parallel jobs: a job holds an exclusive file lock on the key while it looks
the entry up and, on a miss, while it trains and stores the stage, so other jobs wait
for it and then reuse its result. An entry is built in a temporary folder inside the
cache and renamed into place: a job that dies mid-way leaves a temporary folder (removed
by the next job that takes the lock), never an entry that looks complete.

Under DDP rank 0 alone takes the lock, looks the entry up, stores and restores it, and
tells the other ranks whether to train (they train with it) or to load the restored files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from kdcl import distributed
from kdcl.config.options import (
    ADDED_TRAINER_KEYS,
    RECIPE_GROUPS,
    RECIPE_TRAINER_KEYS,
    STUDENT,
    TEACHER,
    stage_recipe,
)
from kdcl.config.schema import PRETRAINED_TEACHER
from kdcl.distill.replay import ReplaySlot, TeacherLogits, table_mb
from kdcl.errors import KdclError
from kdcl.files import open_lock, write_replacing
from kdcl.models import model_revision
from kdcl.train.engine import TrainSettings
from kdcl.train.resume import write_done

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when a code change alters what the teacher or baseline stage produces for the
# same config: every older entry then misses.
STAGE_VERSION = 2  # 2: crop padding after normalisation, dataset.crop_padding_mode

# The cached stages and the role of each: the model spec it trains (``teacher``, ``student``)
# and the recipe it trains with (``stages.teacher``, ``stages.student``).
CACHED_STAGES = {"teacher": TEACHER, "baseline": STUDENT}

# Keys that change speed, not results; left out of the key. trainer.device and
# trainer.amp are replaced by the resolved device type and precision, trainer.devices
# by the number of processes when there are several (DDP's results differ slightly).
NOT_IN_KEY = {
    "trainer": (
        "device",
        "amp",
        "eval_batch_size",
        "checkpoint_every_steps",
        "devices",
        "progress_every_s",
        "log_every_steps",
    ),
    "dataset": ("num_workers", "download", "max_memory_gb"),
}

# Trainer keys that enter the key only when set (not null): knobs added after entries were stored.
KEYED_WHEN_SET = ("grad_clip_norm", "ema_decay")

# Dataset keys that hold a local path: a relative one resolves against the working directory.
# dataset.path (hf) may instead name a builder or a Hub id: it resolves only when it exists here.
LOCAL_PATHS = ("root", "data_dir")

ENTRY_FILE = "entry.json"


def network_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A model spec without its ``option``: the name the summary shows, not part of what trains."""
    return {k: v for k, v in spec.items() if k != "option"}


def stage_key(cfg: dict[str, Any], stage: str, trainer: TrainSettings) -> dict[str, Any]:
    """The config that determines ``stage``'s result: what the cache key hashes.

    The stage's recipe enters as the sections it trains with (:func:`recipe_sections`), so a
    config without ``stages`` keys (or with keys equal to the shared values) keys as it did
    before ``stages`` existed, and a teacher trained at ``stages.teacher.optimizer.lr=0.1``
    keys as one trained at ``optimizer.lr=0.1``: the same training."""
    role = CACHED_STAGES[stage]
    recipe = stage_recipe(cfg, role)
    sections = {
        name: {k: v for k, v in section.items() if k not in NOT_IN_KEY.get(name, ())}
        for name, section in recipe_sections(cfg, recipe).items()
    }
    data = sections["dataset"]
    for name, value in data.items():
        local = name in LOCAL_PATHS or (name == "path" and Path(str(value)).expanduser().exists())
        if isinstance(value, str) and local:
            data[name] = str(Path(value).expanduser().resolve())
    sections["trainer"].update(device_type=trainer.device.type, amp="fp16" if trainer.fp16 else trainer.amp)
    for name in KEYED_WHEN_SET:  # a knob left off keys as before the knob existed
        if sections["trainer"].get(name) is None:
            sections["trainer"].pop(name, None)
    if distributed.world() > 1:
        sections["trainer"]["processes"] = distributed.world()
    spec = cfg[role]
    # without a callable of its own (_target_ null), the teacher's layers (init_from_teacher
    # false) or remote code (trust_remote_code false), the key a spec had before those keys
    # existed; with init_from_teacher, the teacher is part of it, and so is the teacher's
    # recipe when stages make it differ from the student's
    defaults = {"_target_": None, "init_from_teacher": False, "trust_remote_code": False}
    revision = model_revision(spec)  # a kdcl model whose network changed under its name
    key = {
        "stage": stage,
        "stage_version": STAGE_VERSION,
        "model": {
            **{k: v for k, v in network_spec(spec).items() if k not in defaults or v != defaults[k]},
            **({"revision": revision} if revision else {}),
        },
        **sections,
        "seed": cfg["seed"],
    }
    if not spec.get("init_from_teacher"):
        return key
    teacher_recipe = stage_recipe(cfg, TEACHER)
    trained = spec["init_from_teacher"] != PRETRAINED_TEACHER  # a pretrained teacher's layers: no recipe
    return {
        **key,
        "teacher": network_spec(cfg["teacher"]),
        **({"teacher_recipe": teacher_recipe} if trained and teacher_recipe != recipe else {}),
    }


def recipe_sections(cfg: dict[str, Any], recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The sections a stage trains with, its ``recipe`` (:func:`stage_recipe`) in place of the
    shared ones: ``dataset``, ``trainer`` with the recipe's epochs and batch size, and the
    recipe's ``optimizer`` and ``scheduler``."""
    trainer = {**cfg["trainer"], **{k: recipe[k] for k in RECIPE_TRAINER_KEYS}}
    for name, before in ADDED_TRAINER_KEYS.items():  # at the value of before it existed: the key of then
        if trainer.get(name, before) == before:
            trainer.pop(name, None)
    return {"dataset": cfg["dataset"], "trainer": trainer, **{group: recipe[group] for group in RECIPE_GROUPS}}


def digest(key: dict[str, Any]) -> str:
    """A short, stable hash of a key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class Entry:
    """A complete cache entry: ``files/`` (the stage folder) and ``entry.json``."""

    def __init__(self, path: Path):
        self.path = path
        self.meta: dict[str, Any] = json.loads((path / ENTRY_FILE).read_text())

    def restore(self, dest: Path) -> None:
        """Copy the stage folder into ``dest`` (copies, not links: the run may rewrite its
        files); each file replaces what stands at its name, a link there is not followed."""

        def copy(source: str, target: str) -> None:
            write_replacing(Path(target), lambda tmp: shutil.copy2(source, tmp))

        shutil.copytree(self.path / "files", dest, dirs_exist_ok=True, copy_function=copy)


class StageCache:
    """A folder of entries, one per stage key, each guarded by its own lock file."""

    def __init__(self, root: Path):
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise KdclError(
                f"cannot create cache_dir {root} ({err.strerror})",
                fix="set cache_dir=DIR to a writable folder, or cache=false",
            ) from None

    @contextmanager
    def claim(self, name: str) -> Iterator[Entry | None]:
        """Hold the lock of entry ``name``; yield the entry, or None when it has to be built."""
        with open_lock(self.root / f"{name}.lock") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another job to finish %s", name)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                for stale in self.root.glob(f".tmp-{name}-*"):  # left by a job that died mid-fill
                    shutil.rmtree(stale, ignore_errors=True)
                done = (self.root / name / ENTRY_FILE).is_file()
                yield Entry(self.root / name) if done else None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def store(self, name: str, fill: Callable[[Path], object], meta: dict[str, Any]) -> Entry:
        """Entry ``name``: its files as ``fill(folder)`` writes them (into a folder that does not
        exist yet) and ``meta``, stored atomically; call inside :meth:`claim`."""
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            fill(tmp / "files")
            (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            final = self.root / name
            if final.exists():  # a folder without entry.json (damaged by hand) would block the rename
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(final)


def cache_root(cfg: dict[str, Any]) -> Path:
    """The run's stage-cache folder (``cache_dir``)."""
    return Path(cfg["cache_dir"]).expanduser().resolve()


def open_cache(cfg: dict[str, Any]) -> StageCache:
    """The run's stage cache (``cache_dir``), its folder made if needed."""
    return StageCache(cache_root(cfg))


def reuse_or_produce(
    cfg: dict[str, Any],
    stage: str,
    trainer: TrainSettings,
    stage_dir: Path,
    produce: Callable[[], T],
    produced_row: Callable[[], dict[str, Any]],
) -> tuple[T | None, dict | None]:
    """Restore ``stage``'s cached folder into ``stage_dir``, or ``produce`` it (train it into
    that folder) and store it with ``produced_row()``, its summary row.

    Returns ``(produce's result, None)`` after training, ``(None, the cached row)`` on a hit;
    the row's checkpoint path then points at the run's copy, its ``entry`` names the cache
    entry it came from, and ``done.json`` marks the stage finished under this run's config.
    """
    if not cfg["cache"] or stage not in CACHED_STAGES:
        return produce(), None
    key = stage_key(cfg, stage, trainer)
    name = f"{stage}-{digest(key)}"
    cache = open_cache(cfg) if distributed.is_main() else None
    with cache.claim(name) if cache is not None else nullcontext() as entry:
        meta = distributed.from_main(entry.meta if entry is not None else None)
        if meta is None:
            result = produce()
            if cache is not None:
                meta = {"key": key, "row": produced_row(), "run": str(stage_dir.parent)}
                cache.store(name, lambda files: shutil.copytree(stage_dir, files), meta)
                log.info("stored %s in the cache (key %s)", stage, name)
            return result, None
    log.info("reused %s from cache (key %s, trained by %s)", stage, name, meta["run"])
    row = {**meta["row"], "checkpoint": str((stage_dir / "best.pt").resolve())}
    if "ema" in row:  # the weight average's row, its checkpoint beside the model's
        row["ema"] = {**row["ema"], "checkpoint": str((stage_dir / "ema_best.pt").resolve())}
    if entry is not None:  # on the main process, which claimed it
        entry.restore(stage_dir)
        write_done(stage_dir / "done.json", row, cfg)
    distributed.barrier()  # the restored files are there for every rank
    return None, {**row, "entry": str(cache_root(cfg) / name)}


def teacher_logits_key(
    cfg: dict[str, Any], trainer: TrainSettings, plan: dict[str, Any], teacher_weights: Path
) -> dict[str, Any]:
    """What fixes a student stage's batches and its teacher's outputs on them: the teacher
    stage's key (the model, the data, the recipe, the seed), the size and modification time
    of the teacher's weights (``teacher_weights``: its ``best.pt``, which a cache hit copies
    with its time, or ``teacher.checkpoint``), the student (a curriculum may score with it)
    and ``plan`` (the stage's curriculum section, seed and step budget). Not the ``distill``
    section: the loss reads the logits, it does not change them. The batches are the
    student's: their size is the teacher key's ``trainer.batch_size``, unless
    ``stages.student.batch_size`` makes it another, which the plan then holds."""
    teacher = stage_key(cfg, "teacher", trainer)
    batch_size = stage_recipe(cfg, STUDENT)["batch_size"]
    if batch_size != teacher["trainer"]["batch_size"]:
        plan = {**plan, "batch_size": batch_size}
    return teacher_outputs_key("teacher_logits", teacher, teacher_weights, student=cfg["student"], plan=plan)


def teacher_outputs_key(what: str, teacher: dict[str, Any], teacher_weights: Path, **rest: Any) -> dict[str, Any]:
    """The key of outputs of the run's teacher kept in the cache (``what``): the teacher
    stage's key, the size and modification time of its weights, and ``rest``."""
    return {
        "stage": what,
        "stage_version": STAGE_VERSION,
        "teacher": teacher,
        "teacher_weights": file_stamp(teacher_weights),
        **rest,
    }


def soft_labels_dir(
    cfg: dict[str, Any], trainer: TrainSettings, distill: dict[str, Any], teacher_weights: Path
) -> Path:
    """The stage-cache folder of the run's teacher's cached views (``distill.teacher_cache``
    on disk: FKD's stored soft labels), keyed by what fixes them: the teacher stage's key
    (its model, the data and its views, the recipe, the seed the views are drawn from), the
    teacher's weights (size and modification time) and the cache's settings."""
    cache = {k: distill[k] for k in ("teacher_cache", "teacher_cache_topk", "teacher_cache_shard_mb")}
    key = teacher_outputs_key("soft_labels", stage_key(cfg, "teacher", trainer), teacher_weights, cache=cache)
    return open_cache(cfg).root / f"soft_labels-{digest(key)}"


def teacher_logits_slot(
    cfg: dict[str, Any],
    trainer: TrainSettings,
    run_dir: Path,
    plan: dict[str, Any],
    teacher_weights: Path,
    rows: int,
    num_classes: int,
) -> ReplaySlot | None:
    """Where a student stage taught by the run's teacher keeps and finds that teacher's
    online logits (:mod:`kdcl.distill.replay`) under :func:`teacher_logits_key`, or None
    when ``cache_teacher_logits_mb`` (or ``cache``) is off or ``rows`` rows of
    ``num_classes`` logits would take more MB than it allows."""
    limit = cfg["cache_teacher_logits_mb"]
    if not cfg["cache"] or not limit:
        return None
    megabytes = table_mb(rows, num_classes)
    if megabytes > limit:
        log.info("teacher logits not kept for replay: %.0f MB > cache_teacher_logits_mb=%s", megabytes, limit)
        return None
    key = teacher_logits_key(cfg, trainer, plan, teacher_weights)
    cache, name = open_cache(cfg), f"teacher_logits-{digest(key)}"
    folder = cache.root / name

    def load() -> TeacherLogits | None:
        if not (folder / ENTRY_FILE).is_file():
            return None
        log.info("replayed teacher_logits from the cache (key %s, recorded by %s)", name, Entry(folder).meta["run"])
        return TeacherLogits.load(folder / "files", trainer.device)

    def store(table: TeacherLogits) -> None:
        with cache.claim(name) as entry:
            if entry is None:  # a parallel job may have stored the same logits first
                cache.store(name, lambda files: table.save(files), {"key": key, "run": str(run_dir)})
                log.info("stored teacher_logits in the cache (key %s, %.3g MB)", name, table.megabytes)

    return ReplaySlot(load=load, rows=rows, source=str(folder), store=store)


def file_stamp(path: Path) -> list[int]:
    """Size and modification time (ns) of a file, or of the files under a folder (their
    sum, their latest): what tells retrained or rewritten weights from those recorded."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [f.stat() for f in files]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
