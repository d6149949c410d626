"""Pacing against its formulas, the data plans, scorers and orders."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from kdcl.config.options import section_option
from kdcl.config.schema import CurriculumConfig, typed
from kdcl.curricula import (
    ORDERS,
    PACINGS,
    PLANS,
    SCORERS,
    SELF_PACED_WEIGHTS,
    DataSchedule,
    LearnedEpochs,
    PlanInputs,
    ScoreContext,
    ScoreUnavailable,
    difficulty_rank,
    make_order,
    score,
)
from kdcl.errors import KdclError

T = 1000
E10 = math.exp(10)
# Direct transcriptions of the formulas in Wu et al. (2021) and Hacohen & Weinshall (2019)
# as fractions of N, with a = 0.6, b = 0.1 (and their own parameters for the last two).
FORMULAS = {
    "linear": lambda t: 0.1 + 0.9 * t / (0.6 * T),
    "quad": lambda t: 0.1 + 0.9 * (t / (0.6 * T)) ** 2,
    "root": lambda t: 0.1 + 0.9 * (t / (0.6 * T)) ** 0.5,
    "step": lambda t: 0.1 + math.floor(t / (0.6 * T)),
    "exp": lambda t: 0.1 + 0.9 * (math.exp(10 * t / (0.6 * T)) - 1) / (E10 - 1),
    "log": lambda t: 0.1 + 0.9 * (1 + math.log(t / (0.6 * T) + math.exp(-10)) / 10),
    "fixed_exp": lambda t: 0.04 * 1.9 ** math.floor(t / 50),
    "baby_steps": lambda t: (math.floor(t * 4 / (0.6 * T)) + 1) / 4,
}
PARAMS = {"fixed_exp": {"start": 0.04, "inc": 1.9, "phase": 0.05}, "baby_steps": {"buckets": 4, "full_at": 0.6}}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_pacing_matches_formula(name):
    g = PACINGS.create(name, T, **PARAMS.get(name, {"start": 0.1, "full_at": 0.6}))
    for t in (0, 1, 49, 50, 123, 299, 300, 450, 599, 600, 601, 999):
        assert g(t) == pytest.approx(min(1.0, FORMULAS[name](t)), abs=1e-12), (name, t)
    assert g(T - 1) == 1.0  # every pacing ends with all data


def test_every_pacing_is_tested():
    assert set(PACINGS.names()) == set(FORMULAS)


@pytest.mark.parametrize("name", PACINGS.names())
def test_every_pacing_documents_its_formula(name):
    assert "g(t) =" in PACINGS.get(name).__doc__


def plan_inputs(n=200, classes=4, spec=None, seed=0, total=100, bs=16):
    labels = torch.arange(n) % classes
    difficulty = torch.rand(n, generator=torch.Generator().manual_seed(7))
    order = make_order(difficulty, labels, "easy_first", False, seed)
    spec = {
        **section_option("curriculum", "teacher_loss"),
        "pacing": {"name": "linear", "start": 0.2, "full_at": 0.5},
        "adaptive_delta": None,
        "weight_start": None,
        **(spec or {}),
    }
    class_difficulty = torch.tensor([float(c) for c in range(classes)]).flip(0)  # class 3 easiest
    return PlanInputs(
        spec=typed(CurriculumConfig, spec, "curriculum"),
        order=order,
        rank=difficulty_rank(order),
        labels=labels,
        class_difficulty=class_difficulty,
        total_steps=total,
        steps_per_epoch=math.ceil(n / bs),
        batch_size=bs,
        seed=seed,
    ), difficulty


def test_full_data_schedule_is_one_permutation_per_epoch():
    n, bs = 103, 10
    spe = math.ceil(n / bs)
    schedule = DataSchedule(torch.arange(n), bs, seed=0)
    epochs = []
    for e in range(3):
        batches = list(schedule.batches(range(e * spe, (e + 1) * spe)))
        assert len(batches) == spe
        seen = torch.cat(batches)
        assert sorted(seen.tolist()) == list(range(n))  # every example exactly once
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled between epochs


def test_paced_plan_draws_only_from_the_easiest_pool():
    p, difficulty = plan_inputs()
    plan = PLANS.create("paced", p)
    rank = torch.empty(200, dtype=torch.long)
    rank[p.order] = torch.arange(200)
    sizes = []
    for t, batch in zip(range(p.total_steps), plan.batches(range(p.total_steps))):
        size = math.ceil(200 * min(1.0, 0.2 + 0.8 * t / 50) - 1e-9)
        sizes.append(size)
        assert 1 <= len(batch) <= 16  # partial only where a fixed pool runs out
        assert len(set(batch.tolist())) == len(batch)  # no repeats within a batch
        assert rank[batch].max().item() < size  # only examples from the pool
    assert sizes[0] == 40 and sizes[-1] == 200 and sizes == sorted(sizes)
    assert difficulty[p.order[:40]].max() <= difficulty[p.order[40:]].min()  # the pool is the easiest


def test_adaptive_pacing_holds_without_improvement():
    p, _ = plan_inputs(spec={"adaptive_delta": 0.05})
    plan = PLANS.create("paced", p)
    spe = p.steps_per_epoch
    labels = torch.zeros(10, dtype=torch.long)
    good = torch.zeros(10, 2)
    good[:, 0] = 1  # 100% accuracy
    bad = good.flip(1)  # 0%

    def run_epoch(e):
        list(plan.batches(range(e * spe, (e + 1) * spe)))
        return plan.fraction(e * spe), plan.fraction((e + 1) * spe - 1)

    first = run_epoch(0)
    assert first[1] > first[0]  # the clock runs in the first epoch
    assert plan.epoch_end(1, bad, labels)["pacing_advancing"] == 1  # 0% ≥ −inf + δ: advance
    second = run_epoch(1)
    assert second[0] > first[0]
    assert plan.epoch_end(2, bad, labels)["pacing_advancing"] == 0  # no improvement: hold
    third = run_epoch(2)
    assert third[0] == third[1]  # held: the pool does not grow during the epoch
    assert plan.epoch_end(3, good, labels)["pacing_advancing"] == 1  # +100 points: advance again
    fourth = run_epoch(3)
    assert fourth[1] > fourth[0]


def test_difficulty_scaled_loss_weights():
    p, _ = plan_inputs(spec={"weight_start": 0.1})
    plan = PLANS.create("paced", p)
    idx = torch.arange(200)
    w0 = plan.sample_weights(idx, torch.ones(200), step=0)
    assert w0.min() >= 0.1 - 1e-6 and w0.max() <= 1
    assert torch.allclose(w0, 1 - 0.9 * p.rank)  # s(0) = 0.1: hardest weighs 0.1, easiest 1
    mid = plan.sample_weights(idx, torch.ones(200), step=50)
    assert torch.allclose(mid, 1 - (1 - 0.55) * p.rank)
    assert torch.allclose(plan.sample_weights(idx, torch.ones(200), step=100), torch.ones(200))


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_self_paced_weights_and_threshold(kind):
    p, _ = plan_inputs(spec={"lambda_start": 2.0, "mu": 1.5, "weights": kind})
    plan = PLANS.create("self_paced", p)
    losses = torch.tensor([0.0, 0.5, 1.0, 1.9, 2.0, 3.0, 5.0])
    v = plan.sample_weights(torch.arange(7), losses, 0)
    expected = (losses < 2.0).float() if kind == "hard" else torch.clamp(1 - losses / 2.0, min=0)
    assert torch.allclose(v, expected) and v.min() >= 0 and v.max() <= 1
    list(plan.batches(range(p.steps_per_epoch)))
    row = plan.epoch_end(1, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    assert row["spl_lambda"] == 2.0 and row["spl_active"] == pytest.approx(4 / 7)  # losses below λ = 2
    assert plan.lam == pytest.approx(3.0)  # λ ← μ·λ
    v = plan.sample_weights(torch.arange(7), losses, 1)
    assert v[5].item() == 0.0 and v[4].item() > 0  # loss 2.0 < λ = 3.0 counts now; 3.0 does not


def test_class_curriculum_on_schedule_and_on_threshold():
    spec = {"start_classes": 2, "add_classes": 1, "every_epochs": 2, "threshold": None}
    p, _ = plan_inputs(spec=spec)
    plan = PLANS.create("classes", p)
    val_labels = torch.tensor([0, 1, 2, 3])
    wrong = torch.zeros(4, 4)
    seen_per_epoch = []
    for e in range(6):
        batches = torch.cat(list(plan.batches(range(e * p.steps_per_epoch, (e + 1) * p.steps_per_epoch))))
        classes = set(p.labels[batches].tolist())
        seen_per_epoch.append(plan.epoch_end(e + 1, wrong, val_labels)["seen_classes"])
        assert classes == set(range(4)[::-1][: seen_per_epoch[-1]])  # easiest classes first: 3, 2, ...
    assert seen_per_epoch == [2, 2, 3, 3, 4, 4]

    p, _ = plan_inputs(spec={**spec, "every_epochs": None, "threshold": 0.9})
    plan = PLANS.create("classes", p)
    right = torch.eye(4)  # predicts every validation example correctly
    assert plan.epoch_end(1, wrong, val_labels)["seen_classes"] == 2 and plan.seen == 2  # below threshold: hold
    row = plan.epoch_end(2, right, val_labels)
    assert row["val_acc_seen"] == 1.0 and plan.seen == 3  # passed: one more class


# --------------------------------------------------------------------------- scorers
@pytest.fixture
def noisy_toy():
    """A confident, correct teacher on clean labels; 10% of labels flipped."""
    g = torch.Generator().manual_seed(0)
    n, c = 300, 5
    truth = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 6 * torch.nn.functional.one_hot(truth, c)
    noisy = torch.randperm(n, generator=g)[:30]
    labels = truth.clone()
    labels[noisy] = (truth[noisy] + 1 + torch.randint(0, c - 1, (30,), generator=g)) % c
    dynamics = LearnedEpochs(n, torch.device("cpu"))
    all_wrong = torch.nn.functional.one_hot((labels + 1) % c, c).float()
    for epoch in (1, 2, 3):  # the model learns the clean examples in epoch 2, never the flipped ones
        dynamics.update(torch.arange(n), logits if epoch > 1 else all_wrong, labels, epoch)
    ctx = ScoreContext(
        labels, logits, seed=0, learned_epoch=dynamics.learned_epoch(), self_taught_logits=lambda: logits * 0.5
    )
    return ctx, set(noisy.tolist())


@pytest.mark.parametrize(
    "scorer", ["teacher_loss", "teacher_confidence", "teacher_margin", "learned_epoch", "self_taught"]
)
def test_scorer_ranks_mislabelled_examples_hardest(noisy_toy, scorer):
    ctx, noisy = noisy_toy
    difficulty = SCORERS.create(scorer, ctx)
    hardest = set(make_order(difficulty, ctx.labels, "hard_first", False, 0)[:30].tolist())
    assert hardest == noisy


def test_learned_epoch_values(noisy_toy):
    ctx, noisy = noisy_toy
    learned = ctx.learned_epoch
    assert all(learned[i] == 4 for i in noisy)  # wrong in the last epoch: never learned (E + 1)
    assert all(learned[i] == 2 for i in range(300) if i not in noisy)  # wrong in epoch 1 only


TEXT_SCORERS = {"length", "rarity"}  # they read token ids: unavailable on images


def test_scoring_and_unavailable_scorers(noisy_toy):
    ctx, _ = noisy_toy
    assert set(score(ctx, SCORERS.names(), ["teacher_loss"])) == set(SCORERS.names()) - TEXT_SCORERS
    with pytest.raises(KdclError, match="length is unavailable"):
        score(ctx, SCORERS.names(), ["length"])
    assert set(score(ctx, [], ["teacher_margin"])) == {"teacher_margin"}  # only what a stage reads
    no_dynamics = ScoreContext(ctx.labels, ctx.teacher_logits, seed=0)
    assert "learned_epoch" not in score(no_dynamics, SCORERS.names(), ["teacher_loss"])
    with pytest.raises(KdclError, match="learned_epoch"):
        score(no_dynamics, [], ["learned_epoch"])
    with pytest.raises(KdclError, match="not_a_scorer"):
        score(ctx, [], ["not_a_scorer"])


@pytest.mark.parametrize("name", SCORERS.names())
def test_a_scorer_without_the_teacher_trait_runs_without_the_teachers_pass(noisy_toy, name):
    """The run skips the teacher's pass over the training split exactly when no scorer it
    computes has the trait needs_teacher_logits: the trait must say what the scorer reads."""
    ctx, _ = noisy_toy
    tokens = torch.randint(1, 9, (len(ctx.labels), 6))
    no_teacher = replace(ctx, teacher_logits=None, tokens=tokens)
    if SCORERS.trait(name, "needs_teacher_logits"):
        with pytest.raises(ScoreUnavailable, match="reads the teacher's logits"):
            SCORERS.get(name)(no_teacher)
    else:
        assert SCORERS.get(name)(no_teacher).shape == ctx.labels.shape


def test_entries_declare_what_sets_them_apart(noisy_toy):
    """What the run treats differently is a trait of the entry, not its name."""
    assert [n for n in SCORERS if SCORERS.trait(n, "needs_student_model")] == ["self_taught"]
    assert [n for n in ORDERS if not ORDERS.trait(n, "uses_difficulty")] == ["random"]
    assert [n for n in PLANS if not PLANS.trait(n, "scheduled")] == ["none"]
    assert SELF_PACED_WEIGHTS.names() == ["hard", "soft"]
    ctx, _ = noisy_toy
    without = ScoreContext(ctx.labels, ctx.teacher_logits, seed=0, learned_epoch=ctx.learned_epoch)
    assert set(score(without, SCORERS.names(), ["teacher_loss"])) == set(SCORERS.names()) - {
        "self_taught",
        *TEXT_SCORERS,
    }
    with pytest.raises(KdclError, match="self_taught is unavailable"):
        score(without, [], ["self_taught"])


def test_orders_and_class_balance():
    labels = torch.arange(100) % 2
    difficulty = labels.float() * 10 + torch.linspace(0, 1, 100)  # class 1 is all harder
    easy = make_order(difficulty, labels, "easy_first", False, 0)
    assert torch.equal(difficulty[easy], difficulty.sort().values)
    hard = make_order(difficulty, labels, "hard_first", False, 0)
    assert torch.equal(difficulty[hard], difficulty.sort(descending=True).values)
    rnd = make_order(difficulty, labels, "random", False, 0)
    assert sorted(rnd.tolist()) == list(range(100)) and not torch.equal(rnd, easy)
    balanced = make_order(difficulty, labels, "easy_first", True, 0)
    assert labels[balanced[:10]].sum().item() == 5  # each prefix keeps the class proportions
    for c in (0, 1):  # within a class, still easy → hard
        d = difficulty[balanced][labels[balanced] == c]
        assert torch.equal(d, d.sort().values)
