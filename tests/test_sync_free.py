"""The training step reads nothing back from the device: on a GPU every such read (``item``,
``bool``, ``tolist``, ``cpu``, ...) waits for the queued kernels and stalls the launch queue.
On the CPU the reads are counted instead."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import QUICK, STEP_SETTINGS, compose_config

from kdcl.errors import KdclError
from kdcl.scenarios.standard import run_pipeline
from kdcl.train import engine

READS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"]


class Reads(list):
    """Per call of ``engine.train_step``, how many tensor → host reads it made; ``inside``:
    whether reads count now."""

    inside = False


@pytest.fixture
def count_reads(monkeypatch):
    """Per call of ``engine.train_step``, how many tensor → host reads it made."""
    per_step = Reads()
    inside = per_step

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside.inside:
                per_step[-1] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    step = engine.train_step

    def counted_step(*args, **kwargs):
        per_step.append(0)
        inside.inside = True
        try:
            return step(*args, **kwargs)
        finally:
            inside.inside = False

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


def not_counted_in(monkeypatch, reads: Reads, cls: type) -> None:
    """The reads of ``cls``'s forward, the model's own, are not counted."""
    forward = cls.forward

    def uncounted(self, *args, **kwargs):
        was, reads.inside = reads.inside, False
        try:
            return forward(self, *args, **kwargs)
        finally:
            reads.inside = was

    monkeypatch.setattr(cls, "forward", uncounted)


@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset.token_mask=0.2", "distill.teacher_cache=none", "student=bilstm", "student.kwargs.hidden=16"],
        [
            "distill.teacher_cache=no_aug",
            "student=text_cnn",
            "student.kwargs={embed: 16, filters: 8, widths: [3], dropout: 0.0}",
        ],
    ],
    ids=["masked_online", "no_aug_cnn"],
)
def test_no_text_step_reads_the_device(tmp_path, count_reads, monkeypatch, overrides):
    """Text batches come cut to their longest text from lengths on the CPU, and the step around
    the models reads nothing back: a BERT teacher and its students (BiLSTM online on masked
    tokens, CNN from the no_aug cache). The models' own forwards are not counted: the BiLSTM
    packs its sequences by lengths the LSTM kernels take on the CPU, and Hugging Face's BERT
    checks its attention mask. SGD, not the recipe's AdamW: AdamW reads its step counters,
    tensors that torch keeps on the CPU on a GPU too (no device sync), but reads all the same."""
    from test_text import TINY_RUN, sentences, write_table

    from kdcl.models.text_nets import BertClassifier, BiLSTMClassifier

    for model in (BertClassifier, BiLSTMClassifier):
        not_counted_in(monkeypatch, count_reads, model)
    write_table(tmp_path / "train.csv", sentences(120, seed=0))
    write_table(tmp_path / "test.csv", sentences(30, seed=1))
    text = [
        "dataset=text_csv",
        f"dataset.root={tmp_path}",
        "dataset.text_columns=[title,body]",
        "dataset.vocab_size=120",
    ]
    recipe = [o for o in TINY_RUN if not o.startswith(("optimizer", "student"))]
    run_pipeline(compose_config([*text, *recipe, "optimizer=sgd", "trainer.epochs=2", *overrides]), tmp_path / "run")
    assert len(count_reads) > 20
    assert sum(count_reads) == 0, f"reads per step: {count_reads}"
