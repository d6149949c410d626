"""The staged run in-process on digits: the files it writes and the values in them."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from helpers import QUICK

from kdcl.errors import KdclError
from kdcl.models import count_macs
from kdcl.scenarios.standard import run_pipeline, scorers_read
from kdcl.train.checkpoint import load_checkpoint, load_model
from kdcl.trust import CodePolicy

STAGE_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_acc_top5",
    "seconds",
    "samples_per_s",
    "max_memory_mb",
]
TIMING = ["seconds", "checkpoint"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from helpers import compose_config

    cfg = compose_config(QUICK)
    out = tmp_path_factory.mktemp("run")
    return cfg, out, run_pipeline(cfg, out)


def test_stage_tables_and_checkpoints(quick_run):
    cfg, out, _ = quick_run
    epochs = cfg["trainer"]["epochs"]
    for stage in ("teacher", "baseline", "distill"):
        metrics = pd.read_csv(out / stage / "metrics.csv")
        assert list(metrics.columns[: len(STAGE_COLUMNS)]) == STAGE_COLUMNS
        assert metrics["val_acc_top5"].isna().all()  # 10 classes: top-5 is not measured
        assert metrics["epoch"].tolist() == list(range(1, epochs + 1))
        assert (out / stage / "best.pt").is_file() and (out / stage / "last.pt").is_file()
        best = load_checkpoint(out / stage / "best.pt")
        assert best["val_acc"] == pytest.approx(metrics["val_acc"].max())
        assert best["epoch"] == int(metrics.loc[metrics["val_acc"].idxmax(), "epoch"])
        assert load_checkpoint(out / stage / "last.pt")["epoch"] == epochs
    distill = pd.read_csv(out / "distill" / "metrics.csv")
    assert (distill["alpha"] == cfg["distill"]["alpha"]).all()
    assert (distill["temperature"] == cfg["distill"]["temperature"]).all()
    assert {"train_ce", "train_kd"} <= set(distill.columns)
    assert distill["data_fraction"].is_monotonic_increasing


def test_equal_step_budget_and_lr_schedule(quick_run):
    _, out, summary = quick_run
    steps = summary.set_index("model")["steps"]
    assert steps["baseline"] == steps["distill"] == steps["teacher"]
    base = pd.read_csv(out / "baseline" / "metrics.csv")
    dist = pd.read_csv(out / "distill" / "metrics.csv")
    assert base["step"].tolist() == dist["step"].tolist()
    assert base["lr"].tolist() == pytest.approx(dist["lr"].tolist())


def test_curriculum_scores_and_pacing(quick_run):
    cfg, out, summary = quick_run
    scores = pd.read_csv(out / "curriculum" / "scores.csv")
    n_train = len(scores)
    assert list(scores.columns[:6]) == ["index", "label", "difficulty", "rank", "teacher_loss", "teacher_confidence"]
    scorers = {"teacher_loss", "teacher_confidence", "teacher_margin", "learned_epoch", "self_taught", "random"}
    assert {c[2:] for c in scores.columns[6:]} == scorers  # the baseline enables self_taught
    assert scores["difficulty"].tolist() == pytest.approx(scores["teacher_loss"].tolist())
    assert scores["d_teacher_confidence"].tolist() == pytest.approx(
        (1 - scores["teacher_confidence"]).tolist(), abs=1e-6
    )
    dynamics = pd.read_csv(out / "teacher" / "dynamics.csv")
    assert dynamics["index"].tolist() == scores["index"].tolist()
    assert dynamics["learned_epoch"].between(1, cfg["trainer"]["epochs"] + 1).all()
    assert scores["d_learned_epoch"].tolist() == dynamics["learned_epoch"].tolist()
    assert (scores["teacher_confidence"] - (-scores["teacher_loss"]).map(math.exp)).abs().max() < 1e-5
    by_rank = scores.sort_values("rank")
    assert by_rank["difficulty"].is_monotonic_increasing  # easy → hard
    assert sorted(scores["rank"]) == list(range(n_train))

    plan = pd.read_csv(out / "curriculum" / "pacing.csv")
    p = cfg["curriculum"]["pacing"]
    total = int(summary.set_index("model").loc["distill", "steps"])
    for _, row in plan.iterrows():
        for col, step in (("data_fraction_start", row["first_step"]), ("data_fraction_end", row["last_step"])):
            g = min(1.0, p["start"] + (1 - p["start"]) * step / (p["full_at"] * total))
            assert row[col] == pytest.approx(math.ceil(n_train * g - 1e-9) / n_train)
    distill = pd.read_csv(out / "distill" / "metrics.csv")
    assert distill["data_fraction"].tolist() == pytest.approx(plan["data_fraction_end"].tolist())


def test_summary_rows_and_derived_columns(quick_run):
    cfg, out, summary = quick_run
    on_disk = pd.read_csv(out / "summary.csv")
    assert on_disk["model"].tolist() == ["teacher", "baseline", "distill"]
    rows = on_disk.set_index("model")
    assert rows.loc["distill", "kd_gain"] == pytest.approx(
        rows.loc["distill", "test_acc"] - rows.loc["baseline", "test_acc"]
    )
    assert (rows["seed"] == cfg["seed"]).all()
    assert rows.loc["teacher", "params"] > rows.loc["distill", "params"] == rows.loc["baseline", "params"]
    assert on_disk.columns.get_loc("macs") == on_disk.columns.get_loc("params") + 1
    assert on_disk["test_acc_top5"].isna().all()  # the column is there, empty for 10 classes
    shape = tuple(load_checkpoint(out / "distill" / "best.pt")["input_shape"])
    for stage in ("teacher", "baseline", "distill"):
        model = load_model(out / stage / "best.pt", CodePolicy())
        assert rows.loc[stage, "macs"] == count_macs(model, shape)
    assert rows.loc["teacher", "macs"] > rows.loc["distill", "macs"] > 0
    assert rows.loc["teacher", "test_acc"] > 0.6  # the digits teacher learns in two short epochs


def test_teacher_agreement_recomputed_from_checkpoints(quick_run):
    cfg, out, summary = quick_run
    from kdcl.data import load_data
    from kdcl.train.engine import TrainSettings, evaluate

    data = load_data(cfg["dataset"], torch.device("cpu"), True, cfg["seed"])
    trainer = TrainSettings(torch.device("cpu"), 1, 64, 512, amp=False)
    preds = {
        m: evaluate(load_model(out / m / "best.pt", CodePolicy()), data.test, data, trainer)
        for m in ("teacher", "distill")
    }
    rows = summary.set_index("model")
    agree = (preds["teacher"].logits.argmax(1) == preds["distill"].logits.argmax(1)).float().mean().item()
    assert rows.loc["distill", "teacher_agreement"] == pytest.approx(agree)
    assert rows.loc["distill", "test_acc"] == pytest.approx(preds["distill"].acc)


def test_checkpoint_is_self_describing_and_safe(quick_run):
    cfg, out, _ = quick_run
    ckpt = torch.load(out / "distill" / "best.pt", weights_only=True)
    assert ckpt["model"] == {"source": "kdcl", "name": cfg["student"]["name"], "kwargs": cfg["student"]["kwargs"]}
    assert ckpt["num_classes"] == 10 and ckpt["input_shape"] == [1, 8, 8]
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    assert set(ckpt["normalization"]) == {"mean", "std"}
    assert ckpt["config"]["distill"] == cfg["distill"]
    assert type(ckpt["config"]) is dict  # plain containers, not DictConfig


def test_same_seed_same_summary(quick_run, tmp_path):
    cfg, _, first = quick_run
    second = run_pipeline(cfg, tmp_path)
    pd.testing.assert_frame_equal(first.drop(columns=TIMING), second.drop(columns=TIMING))


def test_no_curriculum_schedules_nothing(compose_cfg, tmp_path):
    cfg = compose_cfg([*QUICK, "curriculum=none", "baseline=false"])
    summary = run_pipeline(cfg, tmp_path)
    assert summary["model"].tolist() == ["teacher", "distill"]
    info = (tmp_path / "curriculum" / "curriculum.json").read_text()
    assert '"scheduled": false' in info
    assert '"scorers": []' in info and not (tmp_path / "curriculum" / "scores.csv").exists()  # nothing reads them
    assert (pd.read_csv(tmp_path / "curriculum" / "pacing.csv")["data_fraction_start"] == 1.0).all()
    assert (pd.read_csv(tmp_path / "distill" / "metrics.csv")["data_fraction"] == 1.0).all()


def test_the_training_split_is_scored_when_a_stage_reads_the_scores(compose_cfg):
    plain = compose_cfg(["curriculum=none"])
    assert scorers_read(plain) == set()
    arm = {"paced": {"curriculum": {"type": "paced", "scorer": "length"}}}
    assert scorers_read({**plain, "arms": arm}) == {"length"}
    assert scorers_read({**plain, "distill": {**plain["distill"], "sample_weight": "difficulty"}}) == {"teacher_loss"}
    assert scorers_read(compose_cfg(["curriculum=self_paced"])) == {"teacher_loss"}


def test_teacher_checkpoint_skips_teacher_training(quick_run, compose_cfg, tmp_path):
    _, out, first = quick_run
    cfg = compose_cfg([*QUICK, f"teacher.checkpoint={out / 'teacher' / 'best.pt'}", "baseline=false"])
    summary = run_pipeline(cfg, tmp_path).set_index("model")
    assert not (tmp_path / "teacher" / "metrics.csv").exists()
    assert summary.loc["teacher", "test_acc"] == pytest.approx(first.set_index("model").loc["teacher", "test_acc"])
    assert summary.loc["teacher", "seconds"] == 0


def test_teacher_checkpoint_of_other_dataset_is_refused(quick_run, compose_cfg, tmp_path):
    _, out, _ = quick_run
    cfg = compose_cfg(["trainer.epochs=1", "dataset=fake", f"teacher.checkpoint={out / 'teacher' / 'best.pt'}"])
    with pytest.raises(KdclError, match="trained for 10 classes"):
        run_pipeline(cfg, tmp_path)


def test_loader_path_runs_the_pipeline(compose_cfg, tmp_path):
    """Data read per sample through a DataLoader goes through every stage too."""
    cfg = compose_cfg(
        [
            "trainer.epochs=1",
            "dataset=fake",
            "dataset.in_memory=false",
            "dataset.train_samples=64",
            "dataset.test_samples=16",
            "teacher=cnn_small",
            "student=mlp_small",
        ]
    )
    summary = run_pipeline(cfg, tmp_path)
    assert summary["model"].tolist() == ["teacher", "baseline", "distill"]
    scores = pd.read_csv(tmp_path / "curriculum" / "scores.csv")
    assert sorted(scores["index"]) == sorted(set(scores["index"])) and len(scores) == 64 - round(64 * 0.1)


def test_nan_loss_stops_with_a_clear_message(compose_cfg, tmp_path):
    cfg = compose_cfg(["trainer.epochs=1", "dataset.max_train_samples=200", "optimizer.lr=1e30"])
    with pytest.raises(KdclError, match=r"stage teacher: the loss is (nan|inf) at step \d+ \(lr .*ce=") as err:
        run_pipeline(cfg, tmp_path)
    assert "optimizer.lr" in err.value.fix
    assert (tmp_path / "teacher" / "resume.pt").is_file() or not (tmp_path / "teacher" / "last.pt").exists()


def test_arms_share_teacher_and_budget(compose_cfg, tmp_path):
    """One table of arms at the same step count: the order comparison of the curriculum issue."""
    arms = "{kd_plain: {curriculum: {type: none}}, kd_hard_first: {curriculum: {order: hard_first}}, kd_random: {curriculum: {order: random}}}"
    cfg = compose_cfg([*QUICK, f"arms={arms}"])
    summary = run_pipeline(cfg, tmp_path).set_index("model")
    assert list(summary.index) == ["teacher", "baseline", "distill", "kd_plain", "kd_hard_first", "kd_random"]
    assert summary["steps"].nunique() == 1
    assert summary.loc["kd_random", "curriculum"] == "teacher_loss/random"
    assert summary.loc["kd_plain", "curriculum"] == "none"
    for arm in ("kd_plain", "kd_hard_first", "kd_random"):
        assert summary.loc[arm, "kd_gain"] == pytest.approx(
            summary.loc[arm, "test_acc"] - summary.loc["baseline", "test_acc"]
        )
    hard = pd.read_csv(tmp_path / "kd_hard_first" / "metrics.csv")
    easy = pd.read_csv(tmp_path / "distill" / "metrics.csv")
    assert hard["data_fraction"].tolist() == easy["data_fraction"].tolist()  # same pacing, other order
    assert (pd.read_csv(tmp_path / "kd_plain" / "metrics.csv")["data_fraction"] == 1).all()


def test_class_curriculum_run_logs_seen_classes(compose_cfg, tmp_path):
    cfg = compose_cfg(
        [
            *QUICK,
            "trainer.epochs=3",
            "curriculum=classes",
            "curriculum.every_epochs=1",
            "curriculum.threshold=null",
            "curriculum.start_classes=4",
            "curriculum.add_classes=3",
            "baseline=false",
        ]
    )
    run_pipeline(cfg, tmp_path)
    metrics = pd.read_csv(tmp_path / "distill" / "metrics.csv")
    assert metrics["seen_classes"].tolist() == [4, 7, 10]
    assert metrics["data_fraction"].iloc[0] < metrics["data_fraction"].iloc[1] < metrics["data_fraction"].iloc[2] == 1.0
    assert metrics["val_acc_seen"].between(0, 1).all()


def test_self_paced_and_ctkd_columns(compose_cfg, tmp_path):
    cfg = compose_cfg(
        [
            *QUICK,
            "curriculum=self_paced",
            "distill=ctkd",
            "distill.learnable_temperature.ramp_epochs=1",
            "baseline=false",
        ]
    )
    run_pipeline(cfg, tmp_path)
    metrics = pd.read_csv(tmp_path / "distill" / "metrics.csv")
    assert metrics["spl_lambda"].tolist() == pytest.approx([2.5, 2.5 * 1.15])
    assert metrics["spl_active"].between(0, 1).all()
    assert metrics["temperature"].between(1, 21).all() and metrics["temperature"].iloc[-1] != 4.0


def test_self_taught_scorer_trains_its_own_model_without_baseline(compose_cfg, tmp_path):
    cfg = compose_cfg([*QUICK, "curriculum.scorer=self_taught", "baseline=false"])
    run_pipeline(cfg, tmp_path)
    assert (tmp_path / "curriculum" / "self_taught" / "best.pt").is_file()
    scores = pd.read_csv(tmp_path / "curriculum" / "scores.csv")
    assert scores["difficulty"].tolist() == pytest.approx(scores["d_self_taught"].tolist())


def test_learned_epoch_needs_a_trained_teacher(quick_run, compose_cfg, tmp_path):
    _, out, _ = quick_run
    cfg = compose_cfg([*QUICK, f"teacher.checkpoint={out / 'teacher' / 'best.pt'}", "curriculum.scorer=learned_epoch"])
    with pytest.raises(KdclError, match="learned_epoch"):
        run_pipeline(cfg, tmp_path)


def test_teacher_route_and_assistants(compose_cfg, tmp_path):
    cfg = compose_cfg(
        [
            *QUICK,
            "trainer.epochs=4",
            "teacher.route_points=3",
            "distill.teacher_route=true",
            "assistants=[cnn_small]",
            "baseline=false",
        ]
    )
    summary = run_pipeline(cfg, tmp_path).set_index("model")
    assert sorted(p.name for p in (tmp_path / "teacher").glob("epoch_*.pt")) == [
        "epoch_001.pt",
        "epoch_002.pt",
        "epoch_003.pt",
    ]
    assert list(summary.index) == ["teacher", "assistant_1", "distill"]
    assert (
        summary.loc["assistant_1", "arch"] == "cnn_small"
        and summary.loc["assistant_1", "params"] < summary.loc["teacher", "params"]
    )
    assert summary["steps"].nunique() == 1


def test_teacher_route_switches_anchor_every_phase():
    from kdcl.train.assemble import teacher_route

    anchors = ["early", "middle", "final"]
    route = teacher_route(anchors, total_steps=12)
    assert [route(t) for t in range(12)] == ["early"] * 4 + ["middle"] * 4 + ["final"] * 4


def test_route_without_checkpoints_is_a_clear_error(compose_cfg, quick_run, tmp_path):
    from omegaconf import OmegaConf

    from kdcl.config.checks import validate

    with pytest.raises(KdclError, match="teacher.route_points"):
        validate(OmegaConf.create(compose_cfg([*QUICK, "distill.teacher_route=true"])))
    _, out, _ = quick_run  # a teacher from a checkpoint has no route either
    cfg = compose_cfg(
        [
            *QUICK,
            "distill.teacher_route=true",
            "teacher.route_points=2",
            "baseline=false",
            f"teacher.checkpoint={out / 'teacher' / 'best.pt'}",
        ]
    )
    with pytest.raises(KdclError, match="teacher.route_points"):
        run_pipeline(cfg, tmp_path)
