"""The training step reads nothing back from the device: on a GPU every such read (``item``,
``bool``, ``tolist``, ``cpu``, ...) waits for the queued kernels and stalls the launch queue.
On the CPU the reads are counted instead."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import QUICK, STEP_SETTINGS, compose_config

from kdcl.errors import KdclError
from kdcl.scenarios.standard import run_pipeline
from kdcl.train import engine

READS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"]


@pytest.fixture
def count_reads(monkeypatch):
    """Per call of ``engine.train_step``, how many tensor → host reads it made."""
    per_step: list[int] = []
    inside = [False]

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside[0]:
                per_step[-1] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    step = engine.train_step

    def counted_step(*args, **kwargs):
        per_step.append(0)
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(engine, "train_step", counted_step)
    return per_step


@pytest.mark.parametrize("overrides", list(STEP_SETTINGS.values()), ids=list(STEP_SETTINGS))
def test_no_step_reads_the_device(tmp_path, count_reads, overrides):
    run_pipeline(compose_config([*QUICK, *overrides]), tmp_path)
    assert len(count_reads) > 20  # teacher, baseline and distill steps
    assert sum(count_reads) == 0, f"reads per step: {count_reads}"


def test_recording_and_replaying_the_teachers_logits_read_nothing(tmp_path, count_reads, caplog):
    caplog.set_level(logging.INFO, logger="kdcl.scenarios.stage_cache")
    cached = [*QUICK, "cache=true", f"cache_dir={tmp_path / 'cache'}"]
    run_pipeline(compose_config([*cached, "distill.alpha=0.9"]), tmp_path / "recorded")
    run_pipeline(compose_config([*cached, "distill.alpha=0.5"]), tmp_path / "replayed")
    assert "replayed teacher_logits" in caplog.text
    assert len(count_reads) > 30 and sum(count_reads) == 0, f"reads per step: {count_reads}"


def test_a_non_finite_loss_is_found_at_the_next_check_and_named(tmp_path, monkeypatch):
    """The loss turns NaN at step 7; the steps go on without looking until the check,
    whose message names step 7 and its learning rate."""
    monkeypatch.setattr(engine, "FINITE_CHECK_EVERY", 5)
    losses = engine.Meter.watch

    def poisoned(self, step, lr, total, terms):
        return losses(self, step, lr, total + (float("nan") if step >= 7 else 0.0), terms)

    monkeypatch.setattr(engine.Meter, "watch", poisoned)
    cfg = compose_config([*QUICK, "trainer.epochs=2"])
    with pytest.raises(KdclError, match=r"^stage teacher: the loss is nan at step 7 \(lr [0-9.e-]+; ce=") as err:
        run_pipeline(cfg, tmp_path)
    assert "optimizer.lr" in err.value.fix
