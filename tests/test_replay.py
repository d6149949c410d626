"""Replayed teacher logits (kdcl.distill.replay): a run that changes only the loss trains from
the logits an earlier run recorded, to the numbers an online teacher gives, without running
the teacher; what fixes the batches is in the key; a replay of other batches stops."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import compose_config

from kdcl.distill import feeds
from kdcl.distill.replay import LogitRecorder, TeacherLogits
from kdcl.errors import KdclError
from kdcl.scenarios.stage_cache import digest, teacher_logits_key
from kdcl.scenarios.standard import run_pipeline
from kdcl.train.engine import TrainSettings

TINY = ["trainer.epochs=2", "dataset.max_train_samples=300", "cache=true"]
CPU = TrainSettings(torch.device("cpu"), epochs=2, batch_size=64, eval_batch_size=512, amp=False)
PLAN = {"curriculum": {}, "seed": 1, "steps": 10, "examples": None}


def run(cache: Path, out: Path, *overrides: str) -> pd.DataFrame:
    return run_pipeline(compose_config([*TINY, f"cache_dir={cache}", *overrides]), out).set_index("model")


def logit_entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("teacher_logits-*") if p.is_dir())


@pytest.fixture
def teacher_passes(monkeypatch) -> list[int]:
    """Counts the online teacher's passes (a feed without a teacher does not count)."""
    passes = []
    online = feeds.OnlineTeacher.__call__

    def counted(self, *args, **kwargs):
        passes.append(self.teacher_at is not None)
        return online(self, *args, **kwargs)

    monkeypatch.setattr(feeds.OnlineTeacher, "__call__", counted)
    return passes


def test_a_replayed_stage_trains_to_the_online_numbers_without_the_teacher(tmp_path, teacher_passes, caplog):
    caplog.set_level(logging.INFO, logger="kdcl.scenarios.stage_cache")
    cache = tmp_path / "cache"
    run(cache, tmp_path / "recorded", "distill.alpha=0.9")  # the default curriculum: paced, teacher-scored
    assert sum(teacher_passes) == 10  # 2 epochs × 5 steps
    [entry] = logit_entries(cache)
    table = TeacherLogits.load(entry / "files", torch.device("cpu"))
    assert len(table.offsets) == 11 and table.logits.shape == (table.offsets[-1], 10)

    teacher_passes.clear()
    replayed = run(cache, tmp_path / "replayed", "distill.alpha=0.5")
    assert sum(teacher_passes) == 0
    assert any("replayed" in r.getMessage() for r in caplog.records)
    online = run(cache, tmp_path / "online", "distill.alpha=0.5", "cache_teacher_logits_mb=0")
    assert sum(teacher_passes) == 10

    timing = ["seconds", "samples_per_s"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "replayed" / "distill" / "metrics.csv").drop(columns=timing),
        pd.read_csv(tmp_path / "online" / "distill" / "metrics.csv").drop(columns=timing),
    )
    for name in ("test_acc", "test_loss", "best_val_acc", "teacher_agreement"):
        assert replayed.loc["distill", name] == online.loc["distill", name]
    best = [
        torch.load(tmp_path / r / "distill" / "best.pt", weights_only=False)["state_dict"]
        for r in ("replayed", "online")
    ]
    assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])


def test_a_replay_of_other_batches_stops(tmp_path):
    cache = tmp_path / "cache"
    run(cache, tmp_path / "recorded")
    [entry] = logit_entries(cache)
    index = np.load(entry / "files" / "index.npy")
    np.save(entry / "files" / "index.npy", index[::-1].copy())
    with pytest.raises(KdclError, match="belong to other batches") as err:
        run(cache, tmp_path / "replayed", "distill.alpha=0.5")
    assert "cache_teacher_logits_mb=0" in err.value.fix


def cut_file(files: Path) -> None:
    logits = files / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:100])


def cut_offsets(files: Path) -> None:
    np.save(files / "offsets.npy", np.load(files / "offsets.npy")[:-3])


def fewer_steps(files: Path) -> None:
    """A table that fits together, of 3 steps fewer than the stage takes."""
    offsets = np.load(files / "offsets.npy")[:-3]
    for name in ("logits.npy", "index.npy"):
        np.save(files / name, np.load(files / name)[: offsets[-1]])
    np.save(files / "offsets.npy", offsets)


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (cut_file, "cannot be read"),
        (cut_offsets, "do not fit together"),
        (fewer_steps, r"hold (\d+) steps, not the (\d+)"),
    ],
)
def test_a_damaged_recording_is_one_clear_error_before_training(tmp_path, damage, what):
    cache = tmp_path / "cache"
    run(cache, tmp_path / "recorded")
    [entry] = logit_entries(cache)
    damage(entry / "files")
    with pytest.raises(KdclError, match=f"recorded teacher logits in .* {what}") as err:
        run(cache, tmp_path / "replayed", "distill.alpha=0.5")
    assert f"delete {entry}" in err.value.fix
    assert not (tmp_path / "replayed" / "distill" / "metrics.csv").exists()  # stopped before its first epoch
    if damage is fewer_steps:
        held, steps = map(int, re.search(what, err.value.what).groups())
        assert steps - held == 3


@pytest.mark.parametrize(
    ("overrides", "kept"),
    [
        (["distill=fitnet", "student=cnn_small"], False),  # reads the teacher's layers: it has to run
        (["curriculum.adaptive_delta=0.01"], False),  # the batches follow validation accuracy
        (["cache_teacher_logits_mb=0.001"], False),  # bigger than allowed
        (["distill.teacher_cache=views:2"], False),  # a teacher cache of its own
        (["curriculum=none"], True),
    ],
)
def test_what_is_recorded(tmp_path, overrides, kept):
    run(tmp_path / "cache", tmp_path / "run", "baseline=false", *overrides)
    assert bool(logit_entries(tmp_path / "cache")) == kept


@pytest.fixture
def key(tmp_path):
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"1")

    def key_of(*overrides: str, plan: dict = PLAN, teacher_weights: Path = weights) -> str:
        return digest(teacher_logits_key(compose_config(list(overrides)), CPU, plan, teacher_weights))

    return key_of


@pytest.mark.parametrize("override", ["distill.alpha=0.5", "distill.temperature=8", "distill=dkd", "baseline=false"])
def test_the_loss_is_not_in_the_key(key, override):
    assert key(override) == key()


@pytest.mark.parametrize(
    "override", ["seed=1", "teacher=cnn_small", "student=cnn_small", "trainer.epochs=3", "dataset.flip=true"]
)
def test_what_fixes_the_batches_or_the_teacher_is(key, override):
    assert key(override) != key()


def test_the_plan_and_other_teacher_weights_change_the_key(key, tmp_path):
    assert key(plan={**PLAN, "seed": 2}) != key()
    assert key(plan={**PLAN, "curriculum": {"type": "paced"}}) != key()
    retrained = tmp_path / "retrained.pt"
    retrained.write_bytes(b"1")  # the same bytes, written at another time (a teacher trained again)
    stat = (tmp_path / "teacher.pt").stat()
    os.utime(retrained, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert key(teacher_weights=retrained) != key()


def test_a_recording_keeps_only_a_whole_stage_from_step_0():
    def online(step, epoch, idx, x, y, part=None):
        return x, torch.full((len(idx), 3), float(step))

    online.teaches = True
    batches = [torch.tensor([4, 1]), torch.tensor([0, 2]), torch.tensor([3])]
    recorder = LogitRecorder(online, rows=6, num_classes=3, device=torch.device("cpu"))
    for step, idx in enumerate(batches):
        recorder(step, 1, idx, idx, idx)
    table = recorder.finish("distill", steps=3)
    assert table.offsets == [0, 2, 4, 5]
    assert table.index.tolist() == [4, 1, 0, 2, 3]
    assert table.logits[:, 0].tolist() == [0, 0, 1, 1, 2]
    assert recorder.finish("distill", steps=4) is None  # stopped early (pruned, early stopping)

    resumed = LogitRecorder(online, rows=6, num_classes=3, device=torch.device("cpu"))
    for step, idx in enumerate(batches[1:], start=1):
        resumed(step, 1, idx, idx, idx)
    assert resumed.finish("distill", steps=3) is None
