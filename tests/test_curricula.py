"""Pacing against its formula, the step-wise schedule, and the scorer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcl.curricula import PACINGS, SCORERS, DataSchedule, full_data


@pytest.mark.parametrize(("start", "full_at"), [(0.2, 0.8), (0.1, 0.5), (0.5, 1.0)])
def test_linear_pacing_matches_formula(start, full_at):
    T = 1000
    g = PACINGS.create("linear", T, start=start, full_at=full_at)
    for t in (0, 1, 137, int(full_at * T / 2), int(full_at * T) - 1, int(full_at * T), T - 1):
        expected = min(1.0, start + (1 - start) * t / (full_at * T))
        assert g(t) == pytest.approx(expected, abs=1e-12), t
    assert g(0) == pytest.approx(start)
    assert g(int(full_at * T)) == pytest.approx(1.0)


def test_full_data_schedule_is_one_permutation_per_epoch():
    n, bs = 103, 10
    spe = math.ceil(n / bs)
    schedule = DataSchedule(torch.arange(n), full_data, bs, seed=0)
    epochs = []
    for e in range(3):
        batches = list(schedule.batches(range(e * spe, (e + 1) * spe)))
        assert len(batches) == spe
        seen = torch.cat(batches)
        assert sorted(seen.tolist()) == list(range(n))  # every example exactly once
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled between epochs


def test_paced_schedule_draws_only_from_the_easiest_pool():
    n, bs, total = 500, 16, 200
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))  # easiest first
    pacing = PACINGS.create("linear", total, start=0.2, full_at=0.5)
    schedule = DataSchedule(order, pacing, bs, seed=0)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    sizes = []
    for step, batch in zip(range(total), schedule.batches(range(total))):
        size = math.ceil(n * pacing(step) - 1e-9)
        sizes.append(size)
        assert 1 <= len(batch) <= bs  # partial only where a fixed pool runs out
        assert len(set(batch.tolist())) == len(batch)  # no repeats within a batch
        assert rank[batch].max().item() < size  # only examples from the pool
    assert sizes[0] == 100 and sizes[-1] == n
    assert sizes == sorted(sizes)


def test_schedule_is_seeded():
    a = DataSchedule(torch.arange(50), full_data, 8, seed=3)
    b = DataSchedule(torch.arange(50), full_data, 8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.batches(range(20)), b.batches(range(20))))


def test_teacher_loss_scorer_is_per_example_cross_entropy():
    logits = torch.randn(32, 5)
    labels = torch.randint(0, 5, (32,))
    expected = -F.log_softmax(logits, 1)[torch.arange(32), labels]
    assert torch.allclose(SCORERS.create("teacher_loss", logits, labels), expected, atol=1e-6)


def test_every_pacing_has_a_formula_docstring():
    for name in PACINGS.names():
        assert "g(t) =" in PACINGS.get(name).__doc__
