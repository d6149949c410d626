"""The on-device augmentation, the teacher-output cache, BatchNorm folding and ``kdcl bench``."""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import QUICK, compose_config
from torch import nn

from kdcl.data import Preprocess, StrongViews, TensorSource
from kdcl.distill.feeds import (
    FEEDS,
    TEACHER_CACHES,
    AllLogits,
    DiskLogits,
    FeedInputs,
    TopKLogits,
    build_feed,
    bytes_per_view,
    caches,
    parse,
)
from kdcl.errors import KdclError
from kdcl.models import create_model, fold_batchnorm
from kdcl.scenarios.standard import run_pipeline
from kdcl.train.checkpoint import load_checkpoint, model_from_checkpoint
from kdcl.trust import CodePolicy

CPU = torch.device("cpu")
N, K = 40, 3


class Labelled(nn.Module):
    """A model called as teachers are: ``teacher(x, y)``; counts the examples it sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x, y=None):
        self.seen += len(x)
        return self.model(x)


@pytest.fixture
def setting():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N, 3, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 4, N)
    source = TensorSource.from_arrays(x, y, np.arange(N), CPU)
    pre = Preprocess([0.5] * 3, [0.25] * 3, crop_padding=2, flip=True, device=CPU, channels_last=False, seed=0)
    torch.manual_seed(0)
    teacher = Labelled(create_model("cnn", 4, (3, 8, 8), width=4).eval())
    return source, pre, teacher


def feed_inputs(source, pre, teacher, store="memory", directory=Path("."), shard_mb=512.0, views=K, seed=0, topk=None):
    return FeedInputs(
        preprocess=pre,
        train=source,
        teacher_at=lambda step: teacher,
        autocast=nullcontext,
        num_classes=4,
        batch_size=16,
        seed=seed,
        views=views,
        store=store,
        directory=directory,
        shard_mb=shard_mb,
        topk=topk,
    )


def test_augmentation_is_deterministic_for_a_seed():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)

    def augmented(seed):
        pre = Preprocess([0.5] * 3, [0.25] * 3, crop_padding=2, flip=True, device=CPU, channels_last=False, seed=seed)
        return torch.cat([pre(x, train=True), pre(x, train=True)])

    assert torch.equal(augmented(3), augmented(3))
    assert not torch.equal(augmented(3), augmented(4))


def test_spec_parsing():
    assert parse("views:8") == ("views", 8) and parse("none") == ("none", 1) and parse("no_aug") == ("no_aug", 1)
    for bad in ("views", "views:0", "views:x", "no_aug:2", "online"):
        with pytest.raises(KdclError, match="not a teacher cache") as err:
            parse(bad)
        assert err.value.fix == "choose one of: no_aug, none, views:K (K ≥ 1)"
        assert bad not in TEACHER_CACHES
    assert all(spec in TEACHER_CACHES for spec in ("views:8", "none", "no_aug"))


def test_a_feed_declares_whether_it_caches_and_takes_a_count(monkeypatch):
    """``none`` runs the teacher every step and ``views`` takes K by their traits: a feed
    registered with the same traits is parsed, listed and cached the same way."""
    assert (caches("none"), caches("no_aug"), caches("views:2")) == (False, True, True)
    assert [n for n in FEEDS if FEEDS.trait(n, "counted")] == ["views"]
    monkeypatch.setitem(FEEDS._entries, "crops", FEEDS.get("views"))
    monkeypatch.setitem(FEEDS._traits, "crops", {"counted": True})
    assert parse("crops:3") == ("crops", 3) and caches("crops:3") and "crops:3" in TEACHER_CACHES
    assert "crops" not in TEACHER_CACHES and "crops:K (K ≥ 1)" in list(TEACHER_CACHES)


def test_cached_logits_equal_online_logits_for_the_same_view(setting):
    source, pre, teacher = setting
    feed = build_feed(f"views:{K}", feed_inputs(source, pre, teacher))
    assert teacher.seen == K * N  # one teacher pass per view and example
    idx = torch.arange(N)
    ((_, x, y),) = source.batches([idx])
    for k in range(K):
        v = torch.full((N,), k)
        with torch.inference_mode():
            online = teacher(feed.example_view(x, idx, v))
        assert torch.allclose(feed.logits.get(idx, v), online, rtol=1e-3, atol=2e-3)  # fp16 storage
    views = torch.stack([feed.example_view(x, idx, torch.full((N,), k)) for k in range(K)])
    assert not torch.equal(views[0], views[1])  # the views differ


def test_the_student_always_sees_a_cached_view(setting):
    source, pre, teacher = setting
    feed = build_feed(f"views:{K}", feed_inputs(source, pre, teacher))
    idx = torch.tensor([3, 17, 0, 29, 11])
    ((_, x, y),) = source.batches([idx])
    views = torch.stack([feed.example_view(x, idx, torch.full_like(idx, k)) for k in range(K)])  # (K, B, C, H, W)
    seen = []
    for epoch in range(1, K + 1):
        shown, logits = feed(0, epoch, idx, x, y)
        match = (views == shown).flatten(2).all(2)  # (K, B): which cached view each example got
        assert match.any(0).all()
        k = match.float().argmax(0)
        assert torch.equal(logits, feed.logits.get(idx, k))  # and the logits of that same view
        seen.append(k)
    assert (torch.stack(seen).sort(0).values == torch.arange(K)[:, None]).all()  # every view once per K epochs
    assert torch.equal(feed(0, 1, idx, x, y)[0], feed(5, 1, idx, x, y)[0])  # no randomness left


def test_no_aug_caches_the_plain_images_once(setting):
    source, _, teacher = setting
    plain = Preprocess([0.5] * 3, [0.25] * 3, crop_padding=0, flip=False, device=CPU, channels_last=False, seed=0)
    feed = build_feed("no_aug", feed_inputs(source, plain, teacher))
    assert teacher.seen == N
    idx = torch.arange(N)
    ((_, x, y),) = source.batches([idx])
    shown, logits = feed(7, 4, idx, x, y)
    assert torch.equal(shown, plain(x, train=False))
    with torch.inference_mode():
        assert torch.allclose(logits, teacher(shown), rtol=1e-3, atol=2e-3)


def test_no_aug_refuses_augmented_data(setting):
    with pytest.raises(KdclError, match="no_aug is for runs without augmentation"):
        build_feed("no_aug", feed_inputs(*setting))


def test_disk_store_is_sharded_and_equals_memory(setting, tmp_path):
    source, pre, teacher = setting
    memory = build_feed(f"views:{K}", feed_inputs(source, pre, teacher))
    row_mb = K * 4 * 2 / 2**20
    disk = build_feed(f"views:{K}", feed_inputs(source, pre, teacher, "disk", tmp_path, shard_mb=7 * row_mb))
    assert isinstance(disk.logits, DiskLogits)
    assert len(list(tmp_path.glob("shard_*_logits.npy"))) == -(-N // 7)  # 7 examples a shard
    idx = torch.tensor([39, 0, 8, 21, 7, 6])
    v = torch.tensor([0, 2, 1, 1, 0, 2])
    assert torch.equal(disk.logits.get(idx, v), memory.logits.get(idx, v))


def test_disk_store_replaces_links_planted_at_its_shards(setting, tmp_path):
    """A symbolic link at a shard's name is replaced by the shard; its target keeps its contents."""
    source, pre, teacher = setting
    victims = []
    for field in ("logits", "values", "classes", "rest"):
        victim = tmp_path / f"victim_{field}"
        victim.write_bytes(b"precious")
        (tmp_path / "cache").mkdir(exist_ok=True)
        (tmp_path / "cache" / f"shard_0000_{field}.npy").symlink_to(victim)
        victims.append(victim)
    disk = build_feed(f"views:{K}", feed_inputs(source, pre, teacher, "disk", tmp_path / "cache"))
    memory = build_feed(f"views:{K}", feed_inputs(source, pre, teacher))
    assert all(v.read_bytes() == b"precious" for v in victims)
    shard = tmp_path / "cache" / "shard_0000_logits.npy"
    assert shard.is_file() and not shard.is_symlink()
    idx, v = torch.arange(N), torch.zeros(N, dtype=torch.long)
    assert torch.equal(disk.logits.get(idx, v), memory.logits.get(idx, v))


def test_online_feed_runs_the_teacher_every_step_in_eval_mode(setting):
    source, pre, teacher = setting
    teacher.train()
    feed = build_feed("none", feed_inputs(source, pre, teacher))
    idx = torch.arange(8)
    ((_, x, y),) = source.batches([idx])
    a, la = feed(0, 1, idx, x, y)
    b, lb = feed(1, 1, idx, x, y)
    assert not teacher.training and teacher.seen == 16
    assert not torch.equal(a, b)  # fresh augmentation
    assert not la.is_inference() and not la.requires_grad


# --------------------------------------------------------------------------- top-K logits
def test_topk_keeps_the_top_probabilities_and_the_rest_mass():
    """At T = 1 the decoded logits give the top-K classes their probabilities and the
    other classes equal shares of exactly the rest of the mass (FKD / ReLabel)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 100, generator=g) * 3
    codec = TopKLogits(10, 100)
    decoded = codec.decode(codec.encode(logits))
    p, q = logits.softmax(1), decoded.softmax(1)
    top = logits.topk(10, dim=1).indices
    assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=2e-3)  # fp16 logits
    rest = torch.ones_like(p, dtype=torch.bool).scatter(1, top, False)
    q_rest = q[rest].view(32, 90)
    assert torch.allclose(q_rest.sum(1), p[rest].view(32, 90).sum(1), atol=2e-3)
    assert torch.allclose(q_rest, q_rest[:, :1].expand(-1, 90))  # shared out evenly
    assert {k: v.dtype for k, v in codec.encode(logits).items()} == {
        "values": torch.float16,
        "classes": torch.int16,
        "rest": torch.float16,
    }


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_topk_with_every_class_equals_the_full_cache(setting, tmp_path, store):
    """K = C keeps everything: the loss sees the full cache's logits, in either store;
    the values take K/C of the full cache's bytes (the classes and the rest come on top)."""
    source, pre, teacher = setting
    full = build_feed(f"views:{K}", feed_inputs(source, pre, teacher, store, tmp_path / "full"))
    topk = build_feed(f"views:{K}", feed_inputs(source, pre, teacher, store, tmp_path / "top", topk=4))
    idx, v = torch.tensor([39, 0, 8, 21, 7, 6]), torch.tensor([0, 2, 1, 1, 0, 2])
    assert torch.equal(topk.logits.get(idx, v), full.logits.get(idx, v))
    short = TopKLogits(10, 1000)
    assert bytes_per_view(short) == 10 * 2 + 10 * 2 + 2  # values, classes, rest
    assert short.fields["values"][0][0] * 2 == bytes_per_view(AllLogits(1000)) * 10 // 1000


def test_topk_is_checked_before_training(tmp_path):
    for override, message in [
        ("distill.teacher_cache=none", "keeps part of a teacher cache"),
        ("distill.teacher_cache=views:2", "must be between 1 and the number of classes"),
    ]:
        cfg = compose_config([*QUICK, override, "distill.teacher_cache_topk=11"])
        with pytest.raises(KdclError, match=message):
            run_pipeline(cfg, tmp_path)
        assert not (tmp_path / "teacher").exists()


# --------------------------------------------------------------------------- in a run
@pytest.mark.parametrize(("topk", "kept"), [("null", "all logits"), ("3", "top-3 logits")])
def test_a_run_fills_one_cache_for_every_stage_the_teacher_teaches(tmp_path, caplog, topk, kept):
    cfg = compose_config(
        [
            *QUICK,
            "distill.teacher_cache=views:2",
            f"distill.teacher_cache_topk={topk}",
            "baseline=false",
            "+arms={plain: {curriculum: {type: none}}}",
        ]
    )
    with caplog.at_level(logging.INFO, logger="kdcl.distill.feeds"):
        summary = run_pipeline(cfg, tmp_path).set_index("model")
    fills = [r for r in caplog.records if r.getMessage().startswith("teacher cache:")]
    assert len(fills) == 1 and f"2 view(s) × 540 examples, {kept}" in fills[0].getMessage()
    assert summary.loc["distill", "steps"] == summary.loc["plain", "steps"] == summary.loc["teacher", "steps"]
    metrics = pd.read_csv(tmp_path / "distill" / "metrics.csv")
    assert metrics["train_kd"].notna().all() and len(metrics) == 2


@pytest.mark.parametrize(
    "override, needs",
    [
        ("distill=fitnet", "intermediate features"),
        ("distill.teacher_route=true", "a different teacher per phase"),
        ("distill=mlkd", "a new strongly augmented view of every batch"),
    ],
)
def test_a_cache_refuses_what_it_cannot_hold(override, needs, tmp_path):
    extra = ["teacher.route_points=1"] if "route" in override else ["student=cnn_small"]
    cfg = compose_config([*QUICK, "distill.teacher_cache=views:2", override, *extra])
    with pytest.raises(KdclError, match=needs):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "teacher").exists()  # refused before anything trained


# --------------------------------------------------------------------------- strong views
def test_strong_views_are_a_function_of_the_seed_and_the_step():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    views = StrongViews(seed=3)
    first = views(x, step=7)
    assert first.dtype == torch.uint8 and first.shape == x.shape
    assert torch.equal(first, StrongViews(seed=3)(x, step=7))  # a resumed run draws the same pixels
    assert not torch.equal(first, views(x, step=8))
    assert not torch.equal(first, StrongViews(seed=4)(x, step=7))
    assert (first != x).flatten(1).any(1).float().mean() > 0.5  # most images changed


def test_online_feed_gives_plain_then_strong_views_and_the_teachers_logits_on_both(setting):
    source, pre, teacher = setting
    idx, x, y = next(iter(source.batches([torch.arange(8)])))
    plain_x, plain_logits = build_feed("none", feed_inputs(source, pre, teacher))(5, 1, idx, x, y)
    pre.generator.manual_seed(0)
    inputs = feed_inputs(source, pre, teacher)
    inputs.strong = StrongViews(seed=0)
    both_x, both_logits = build_feed("none", inputs)(5, 1, idx, x, y)
    assert both_x.shape == (16, 3, 8, 8) and both_logits.shape == (16, 4)
    assert torch.equal(both_x[:8], plain_x) and torch.equal(both_logits[:8], plain_logits)
    assert not torch.equal(both_x[8:], plain_x)
    with torch.no_grad():
        assert torch.allclose(both_logits, teacher(both_x))  # the teacher saw exactly these pixels


# --------------------------------------------------------------------------- folding
@pytest.mark.parametrize("name", ["cnn", "resnet8", "mobilenet_v3_small"])
def test_fold_batchnorm_keeps_outputs_and_names(name):
    torch.manual_seed(0)
    model = create_model(name, 10, (3, 32, 32))
    with torch.no_grad():  # move the running statistics away from 0 / 1
        model.train()(torch.randn(32, 3, 32, 32) * 3 + 1)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in model.named_modules()]


def test_fold_batchnorm_leaves_untraceable_models_alone():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    model = Branchy().eval()
    assert isinstance(fold_batchnorm(model).bn, nn.BatchNorm2d)


# --------------------------------------------------------------------------- kdcl bench
def test_bench_writes_its_table(cli, tmp_path):
    out = tmp_path / "bench"
    result = cli(
        "bench",
        "dataset.max_train_samples=300",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.repeats=1",
        "bench.views=2",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = pd.read_csv(out / "bench.csv").set_index("arm")
    assert list(table.index) == [
        "naive",
        "kdcl",
        "kdcl_cached",
        "student",
        "teacher",
        "kdcl_cached_amortised",
        "online_floor",
    ]
    assert (table["images_per_s"] > 0).all()
    peaks = table["max_memory_mb"]  # each measured arm's peak GPU memory: none on a CPU
    assert (peaks.iloc[:5] > 0).all() if torch.cuda.is_available() else peaks.isna().all()
    assert table.loc["naive", "vs_naive"] == pytest.approx(1) and table.loc[
        "student", "vs_student_time"
    ] == pytest.approx(1)
    ratio = table.loc["naive", "seconds_per_step"] / table.loc["kdcl", "seconds_per_step"]
    assert table.loc["kdcl", "vs_naive"] == pytest.approx(ratio)
    assert table.loc["kdcl_cached_amortised", "seconds_per_step"] > table.loc["kdcl_cached", "seconds_per_step"]
    assert table.loc["online_floor", "seconds_per_step"] == pytest.approx(
        table.loc["student", "seconds_per_step"] + table.loc["teacher", "seconds_per_step"]
    )
    assert "kdcl / naive" in result.stdout + result.stderr


def test_bench_parity_needs_a_trained_teacher(cli, tmp_path):
    result = cli(
        "bench",
        "dataset.max_train_samples=300",
        "bench.steps=1",
        "bench.repeats=1",
        "bench.parity_epochs=1",
        f"hydra.run.dir={tmp_path / 'b'}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "needs a trained teacher" in output and "Traceback" not in output
    assert not (tmp_path / "b" / "bench.csv").exists()  # refused before timing anything


@pytest.mark.slow
def test_compiled_models_train_and_save_plain_checkpoints(tmp_path):
    cfg = compose_config([*QUICK, "trainer.compile=true", "trainer.epochs=1", "curriculum=none", "teacher=mlp"])
    summary = run_pipeline(cfg, tmp_path).set_index("model")
    assert (summary["steps"] == summary.loc["teacher", "steps"]).all()
    ckpt = load_checkpoint(tmp_path / "distill" / "best.pt")
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # the plain model's keys
    model_from_checkpoint(ckpt, CodePolicy(), "best.pt")  # and they load into the plain architecture (strict)


def test_bench_parity_tests_the_students_it_trained(cli, tmp_path):
    teacher_run = tmp_path / "teacher_run"
    run_pipeline(
        compose_config([*QUICK, "trainer.epochs=4", "baseline=false", "curriculum=none", "distill=none"]), teacher_run
    )
    result = cli(
        "bench",
        *QUICK,
        "trainer.epochs=4",
        "bench.steps=1",
        "bench.repeats=1",
        "bench.views=2",
        "bench.parity_epochs=4",
        f"teacher.checkpoint={teacher_run / 'teacher' / 'best.pt'}",
        f"hydra.run.dir={tmp_path / 'b'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    parity = pd.read_csv(tmp_path / "b" / "parity.csv").set_index("arm")
    assert list(parity.index) == ["naive", "kdcl", "kdcl_cached"]
    assert (parity["steps"] == 4 * 17).all()  # 540 training examples, batch 32
    assert (parity["test_acc"] > 0.5).all()  # trained students (an untrained one is at chance, 0.1)
