"""The stage cache: which config changes hit or miss, the same numbers on a hit, and
entries that survive parallel jobs and crashes."""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import compose_config

from kdcl.errors import KdclError
from kdcl.scenarios import stage_cache, standard
from kdcl.scenarios.stage_cache import ENTRY_FILE, StageCache, digest, stage_key
from kdcl.scenarios.standard import run_pipeline
from kdcl.train.engine import TrainSettings

CPU = TrainSettings(torch.device("cpu"), epochs=1, batch_size=64, eval_batch_size=512, amp=False)
TINY = ["trainer.epochs=1", "dataset.max_train_samples=300"]


@functools.cache
def composed(*overrides: str) -> dict:
    return compose_config(list(overrides))


def key(stage: str, *overrides: str, trainer: TrainSettings = CPU) -> str:
    return digest(stage_key(composed(*overrides), stage, trainer))


@pytest.mark.parametrize(
    "override",
    [
        "distill.alpha=0.5",
        "distill.temperature=2",
        "distill=mse",
        "curriculum=none",
        "curriculum.pacing.start=0.5",
        "baseline=false",
        "trainer.eval_batch_size=64",
        "trainer.device=cpu",
        "trainer.amp=false",
        "dataset.num_workers=2",
        "cache_dir=elsewhere",
        "trainer.progress_every_s=5",
    ],
)
def test_distill_curriculum_and_speed_knobs_hit(override):
    for stage in ("teacher", "baseline"):
        assert key(stage, override) == key(stage)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.epochs=3",
        "trainer.batch_size=32",
        "optimizer.lr=0.1",
        "optimizer=adamw",
        "scheduler=step",
        "seed=1",
        "dataset.max_train_samples=100",
        "dataset.max_test_samples=100",
        "dataset.split_seed=1",
        "dataset.val_fraction=0.2",
        "dataset.flip=true",
        "trainer.channels_last=false",
        "dataset.crop_padding_mode=zeros",
        "trainer.grad_clip_norm=1.0",
    ],
)
def test_recipe_data_and_seed_changes_miss(override):
    for stage in ("teacher", "baseline"):
        assert key(stage, override) != key(stage)


def test_precision_keys_and_a_knob_left_off_keys_as_before_it_existed():
    bf16, fp16 = replace(CPU, amp=True), replace(CPU, amp=True, amp_dtype=torch.float16)
    assert len({key("teacher"), key("teacher", trainer=bf16), key("teacher", trainer=fp16)}) == 3
    assert "grad_clip_norm" not in stage_key(composed(), "teacher", CPU)["trainer"]


def test_the_curriculum_experiment_reuses_the_cifar10_cpu_teacher_and_baseline():
    """``+experiment=cifar10_curriculum_cpu`` after ``+experiment=cifar10_cpu`` (same seeds) trains no teacher
    or baseline: only its distilled students differ."""
    for stage in ("teacher", "baseline"):
        assert key(stage, "+experiment=cifar10_curriculum_cpu", "seed=1") == key(
            stage, "+experiment=cifar10_cpu", "seed=1"
        )


def test_each_stage_keys_on_its_own_model():
    assert key("teacher", "teacher=cnn_small") != key("teacher")
    assert key("baseline", "teacher=cnn_small") == key("baseline")
    assert key("baseline", "student=cnn_small") != key("baseline")
    assert key("teacher", "student=cnn_small") == key("teacher")
    assert key("teacher", "teacher.kwargs.width=16") != key("teacher")
    assert key("teacher") != key("baseline")


def test_a_network_changed_under_its_name_misses_the_older_entries(monkeypatch):
    """A kdcl model's registry revision is part of its stage key (shufflenet_v2 has 1: its
    stem became RepDistiller's 1x1); at revision 0 the key is the one it always was."""
    v2 = composed("student=shufflenet_v2")
    now = stage_key(v2, "baseline", CPU)
    assert now["model"]["revision"] == 1
    assert "revision" not in stage_key(composed(), "baseline", CPU)["model"]
    monkeypatch.setattr(stage_cache, "model_revision", lambda spec: 0)  # the network before
    before = stage_key(v2, "baseline", CPU)
    assert "revision" not in before["model"] and digest(before) != digest(now)


def test_a_student_started_from_the_teacher_keys_on_the_teacher():
    """init_from_teacher: the baseline depends on the teacher; off, the key is the one it
    was before the option existed (the spec without it), so older entries still hit."""
    on = "student.init_from_teacher=true"
    assert key("baseline", on) != key("baseline")
    assert key("baseline", on, "teacher=cnn_small") != key("baseline", on)
    assert "init_from_teacher" not in stage_key(composed(), "baseline", CPU)["model"]


def test_device_type_and_data_location_are_in_the_key(tmp_path, monkeypatch):
    gpu = TrainSettings(torch.device("cuda"), epochs=1, batch_size=64, eval_batch_size=512, amp=True)
    assert key("teacher", trainer=gpu) != key("teacher")
    relative = composed("dataset=npz", "dataset.root=data")
    absolute = composed("dataset=npz", f"dataset.root={tmp_path / 'data'}")
    monkeypatch.chdir(tmp_path)  # a relative root is resolved against the working directory
    here = digest(stage_key(relative, "teacher", CPU))
    assert here == digest(stage_key(absolute, "teacher", CPU))
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert digest(stage_key(relative, "teacher", CPU)) != here


def test_hf_path_resolves_when_it_is_a_local_folder(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    monkeypatch.chdir(tmp_path)
    local = stage_key(composed("dataset=hf", "dataset.path=saved", "dataset.data_dir=files"), "teacher", CPU)
    assert local["dataset"]["path"] == str(tmp_path / "saved")
    assert local["dataset"]["data_dir"] == str(tmp_path / "files")
    assert stage_key(composed("dataset=hf", "dataset.path=user/images"), "teacher", CPU)["dataset"]["path"] == (
        "user/images"
    )  # a Hub id stays as it is


# --------------------------------------------------------------------------- in a run
def cached_run(compose_cfg, cache: Path, out: Path, *overrides: str) -> pd.DataFrame:
    cfg = compose_cfg([*TINY, "cache=true", f"cache_dir={cache}", *overrides])
    return run_pipeline(cfg, out).set_index("model")


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def cache_lines(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "kdcl.scenarios.stage_cache"]
    caplog.clear()
    return [" ".join(line.split()[:2]) for line in lines]


def test_hits_misses_and_the_same_numbers(compose_cfg, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="kdcl.scenarios.stage_cache")
    cache = tmp_path / "cache"
    first = cached_run(compose_cfg, cache, tmp_path / "first")
    assert cache_lines(caplog) == ["stored teacher", "stored baseline", "stored teacher_logits"]
    assert [e.split("-")[0] for e in entries(cache)] == ["baseline", "teacher", "teacher_logits"]

    # Another alpha: teacher and baseline come from the cache, with the numbers of the run that
    # trained them, and their kept test predictions: they are not evaluated again.
    evaluated = []
    real = standard.test_columns
    monkeypatch.setattr(
        standard, "test_columns", lambda run, stage, model: evaluated.append(stage) or real(run, stage, model)
    )
    alpha = cached_run(compose_cfg, cache, tmp_path / "alpha", "distill.alpha=0.5")
    assert cache_lines(caplog) == ["reused teacher", "reused baseline", "replayed teacher_logits"]
    assert evaluated == ["distill"]
    assert (tmp_path / "alpha" / "teacher" / "test_predictions.pt").is_file()
    for stage in ("teacher", "baseline"):
        assert alpha.loc[stage].drop("checkpoint").equals(first.loc[stage].drop("checkpoint"))
        assert alpha.loc[stage, "checkpoint"] == str((tmp_path / "alpha" / stage / "best.pt").resolve())
        for name in ("metrics.csv", "best.pt", "last.pt"):
            assert (tmp_path / "alpha" / stage / name).read_bytes() == (tmp_path / "first" / stage / name).read_bytes()
    assert alpha.loc["baseline", "teacher_agreement"] == first.loc["baseline", "teacher_agreement"]

    # The same config again: every number, the distilled student's included (trained from the
    # replayed teacher logits), is the trained run's.
    again = cached_run(compose_cfg, cache, tmp_path / "again")
    assert cache_lines(caplog) == ["reused teacher", "reused baseline", "replayed teacher_logits"]
    pd.testing.assert_frame_equal(
        again.drop(columns=["checkpoint", "seconds"]), first.drop(columns=["checkpoint", "seconds"])
    )

    # An entry stored when arch named the registered builder alone: a hit shows this run's
    # name for the model (the key leaves it out), and the distilled student's gain over it.
    [baseline_entry] = [cache / e for e in entries(cache) if e.startswith("baseline")]
    meta = json.loads((baseline_entry / ENTRY_FILE).read_text())
    (baseline_entry / ENTRY_FILE).write_text(json.dumps({**meta, "row": {**meta["row"], "arch": "builder"}}))
    relabelled = cached_run(compose_cfg, cache, tmp_path / "relabelled")
    assert relabelled.loc["baseline", "arch"] == first.loc["baseline", "arch"] != "builder"
    assert relabelled.loc["distill", "kd_gain"] == first.loc["distill", "kd_gain"]
    caplog.clear()

    # Longer training misses both; cache=false neither reads nor writes.
    cached_run(compose_cfg, cache, tmp_path / "longer", "trainer.epochs=2")
    assert cache_lines(caplog) == ["stored teacher", "stored baseline", "stored teacher_logits"]
    assert len(entries(cache)) == 6
    cached_run(compose_cfg, tmp_path / "unused", tmp_path / "off", "cache=false")
    assert cache_lines(caplog) == [] and not (tmp_path / "unused").exists()
    assert (tmp_path / "off" / "teacher" / "metrics.csv").is_file()


def test_teacher_checkpoint_bypasses_the_cache(compose_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdcl.scenarios.stage_cache")
    cache = tmp_path / "cache"
    cached_run(compose_cfg, cache, tmp_path / "first", "baseline=false")
    caplog.clear()
    loaded = f"teacher.checkpoint={tmp_path / 'first' / 'teacher' / 'best.pt'}"
    cached_run(compose_cfg, cache, tmp_path / "loaded", loaded, "baseline=false")
    # the teacher is neither stored nor reused; its logits are recorded under the checkpoint's own key
    assert cache_lines(caplog) == ["stored teacher_logits"]
    assert [e.split("-")[0] for e in entries(cache)] == ["teacher", "teacher_logits", "teacher_logits"]


def test_a_failed_stage_stores_nothing(compose_cfg, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(KdclError, match="the loss is (nan|inf)"):
        cached_run(compose_cfg, cache, tmp_path / "nan", "optimizer.lr=1e30")
    assert entries(cache) == []


# --------------------------------------------------------------------------- parallel jobs, crashes
FILL = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import kdcl.scenarios.stage_cache as cache_module
    from kdcl.scenarios.stage_cache import StageCache

    root, work = Path(sys.argv[1]), Path(sys.argv[2])
    cache = StageCache(root)
    (work / f"ready-{os.getpid()}").touch()
    while not (work / "go").exists():
        time.sleep(0.01)
    if "--hang-mid-fill" in sys.argv:  # copy the files, then hang before the rename
        copytree = cache_module.shutil.copytree
        def copy_then_hang(src, dst, **kw):
            copytree(src, dst, **kw)
            (work / "mid-fill").touch()
            time.sleep(600)
        cache_module.shutil.copytree = copy_then_hang
    with cache.claim("teacher-k") as entry:
        if entry is None:
            with (work / "log").open("a") as f:
                f.write("trained\\n")
            source = work / f"stage-{os.getpid()}"
            source.mkdir()
            (source / "best.pt").write_bytes(os.urandom(100_000))
            (source / "metrics.csv").write_text("epoch,val_acc\\n1,0.5\\n")
            time.sleep(1.0)  # training: the other job has to wait for it
            fill = lambda files: cache_module.shutil.copytree(source, files)
            cache.store("teacher-k", fill, {"run": str(source), "row": {}})
        else:
            with (work / "log").open("a") as f:
                f.write("reused\\n")
""")


def start_fills(tmp_path: Path, count: int, *flags: str) -> list[subprocess.Popen]:
    """Start ``count`` processes that fill entry ``teacher-k`` at the same moment."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", FILL, str(tmp_path / "cache"), str(work), *flags]) for _ in range(count)
    ]
    deadline = time.time() + 120
    while len(list(work.glob("ready-*"))) < count:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "fill processes did not start"
        time.sleep(0.05)
    (work / "go").touch()
    return procs


@pytest.mark.slow  # its own processes
def test_parallel_fills_of_one_key_train_once(tmp_path):
    procs = start_fills(tmp_path, 2)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted((tmp_path / "work" / "log").read_text().split()) == ["reused", "trained"]
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["teacher-k", "teacher-k.lock"]  # no temporary folders left
    with StageCache(cache).claim("teacher-k") as entry:
        assert entry is not None
        trained_by = Path(entry.meta["run"])
        assert (entry.path / "files" / "best.pt").read_bytes() == (trained_by / "best.pt").read_bytes()


@pytest.mark.slow  # its own processes
def test_a_job_killed_mid_fill_leaves_no_entry(tmp_path):
    (proc,) = start_fills(tmp_path, 1, "--hang-mid-fill")
    deadline = time.time() + 60
    while not (tmp_path / "work" / "mid-fill").exists():
        assert time.time() < deadline and proc.poll() is None, "the fill did not reach the copy"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    cache = tmp_path / "cache"
    assert not (cache / "teacher-k").exists()
    assert [p for p in cache.glob(".tmp-teacher-k-*") if (p / "files" / "best.pt").is_file()]  # the half-built copy
    with (cache / "teacher-k.lock").open("a") as lock:  # the dead job's lock is free
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(lock, fcntl.LOCK_UN)
    store = StageCache(cache)
    with store.claim("teacher-k") as entry:
        assert entry is None  # a miss: the next job trains it again
        assert not list(cache.glob(".tmp-*"))  # and the half-built copy is gone
        source = tmp_path / "stage"
        source.mkdir()
        (source / "best.pt").write_bytes(b"weights")
        store.store("teacher-k", functools.partial(shutil.copytree, source), {"run": "again", "row": {}})
    with store.claim("teacher-k") as entry:
        assert entry.meta["run"] == "again"


def test_an_error_mid_fill_leaves_no_entry(tmp_path, monkeypatch):
    store = StageCache(tmp_path / "cache")
    source = tmp_path / "stage"
    source.mkdir()
    (source / "best.pt").write_bytes(b"weights")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    with store.claim("teacher-k") as entry:
        assert entry is None
        monkeypatch.setattr("kdcl.scenarios.stage_cache.os.rename", disk_full)
        with pytest.raises(OSError, match="No space"):
            store.store("teacher-k", functools.partial(shutil.copytree, source), {"run": "x", "row": {}})
        monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["teacher-k.lock"]
    with store.claim("teacher-k") as entry:
        assert entry is None


def test_rows_stored_before_the_macs_column_still_serve(compose_cfg, tmp_path):
    import json

    cache = tmp_path / "cache"
    first = cached_run(compose_cfg, cache, tmp_path / "first")
    stages = (cache / name for name in entries(cache) if not name.startswith("teacher_logits"))
    for entry in stages:  # entries from before macs was a column
        meta = json.loads((entry / "entry.json").read_text())
        del meta["row"]["macs"]
        (entry / "entry.json").write_text(json.dumps(meta))
    old = cached_run(compose_cfg, cache, tmp_path / "old")
    pd.testing.assert_frame_equal(
        old.drop(columns=["checkpoint", "seconds"]), first.drop(columns=["checkpoint", "seconds"])
    )

    for done in (tmp_path / "old").glob("*/done.json"):  # and finished stages of such a run
        meta = json.loads(done.read_text())
        meta["row"].pop("macs", None)
        done.write_text(json.dumps(meta))
    resumed = cached_run(compose_cfg, cache, tmp_path / "old")
    pd.testing.assert_frame_equal(
        resumed.drop(columns=["checkpoint", "seconds"]), old.drop(columns=["checkpoint", "seconds"])
    )
    assert (resumed["macs"] > 0).all()


def test_a_cached_stage_that_cannot_be_loaded_names_its_entry(compose_cfg, tmp_path):
    cache = tmp_path / "cache"
    cached_run(compose_cfg, cache, tmp_path / "first")
    [teacher] = (cache / name for name in entries(cache) if name.startswith("teacher-"))
    (teacher / "files" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        KdclError, match=f"the teacher taken from the stage cache entry {teacher} cannot be used"
    ) as err:
        cached_run(compose_cfg, cache, tmp_path / "second")
    assert f"delete {teacher} and {tmp_path / 'second' / 'teacher'}" in err.value.fix
    assert not (tmp_path / "second" / "baseline").exists()  # stopped at the teacher
