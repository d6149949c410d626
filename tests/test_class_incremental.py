"""Class-incremental learning (scenario=class_incremental): the metrics against their
formulas, the growing head, the LwF loss, the warm-up, and runs of ``kdcl train`` on digits
checked by the tables they write."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import compose_config, run_cli

from kdcl.cli import main as kdcl_main
from kdcl.commands.eval import run_eval
from kdcl.curricula import ORDERS
from kdcl.data import TensorSource, class_map, load_data, with_classes
from kdcl.distill.losses import create_loss
from kdcl.errors import KdclError
from kdcl.models import classifier, create_model, grow_head
from kdcl.models.registered import models_of
from kdcl.scenarios.class_incremental import (
    CLASS_ORDERS,
    accuracy_row,
    average_accuracy,
    backward_transfer,
    exemplars,
    forgetting,
    new_outputs_only,
    run_class_incremental,
    uses_difficulty,
)
from kdcl.train.checkpoint import load_checkpoint

# 5 tasks of 2 digits; long enough per task (10 epochs) that fine-tuning drifts.
RUN = ["scenario=class_incremental", "curriculum=none", "student=mlp", "trainer.epochs=10"]
A = np.array([[0.9, np.nan, np.nan], [0.5, 0.8, np.nan], [0.3, 0.6, 0.7]])


# --------------------------------------------------------------------------- metrics
def test_average_accuracy_forgetting_and_backward_transfer_follow_their_formulas():
    assert average_accuracy(A) == pytest.approx([0.9, (0.5 + 0.8) / 2, (0.3 + 0.6 + 0.7) / 3])
    # f_j = max_{j≤l<T} A[l][j] − A[T][j]: task 1 peaked at 0.9, task 2 at 0.8
    assert forgetting(A) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)
    # BWT = mean_{j<T} A[T][j] − A[j][j]
    assert backward_transfer(A) == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    peak_later = np.array([[0.5, np.nan], [0.7, 0.9]])  # task 1 improved: no forgetting, positive transfer
    assert forgetting(peak_later) == pytest.approx(-0.2) and backward_transfer(peak_later) == pytest.approx(0.2)
    assert math.isnan(forgetting(A[:1, :1])) and math.isnan(backward_transfer(A[:1, :1]))


def test_accuracy_row_per_protocol():
    # Two tasks: labels 0-1 and 2-3. Example 0 (label 0) is predicted 2 overall but 0 within task 1.
    logits = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 3])
    row = accuracy_row(logits, labels, [0, 2, 4])
    assert row["class_incremental"] == [0.5, 0.5]  # task 1: example 1 right; task 2: example 2 right
    assert row["task_aware"] == [1.0, 0.5]


def test_exemplars_keep_per_class_a_seeded_random_sample():
    labels = np.repeat(np.arange(4), 10)
    positions = np.flatnonzero(labels >= 2)
    kept = exemplars(labels, positions, 3, seed=1)
    assert np.bincount(labels[kept], minlength=4).tolist() == [0, 0, 3, 3]
    assert set(kept) <= set(positions)
    assert np.array_equal(kept, exemplars(labels, positions, 3, seed=1))
    assert not np.array_equal(kept, exemplars(labels, positions, 3, seed=2))
    assert len(exemplars(labels, positions, 0, seed=1)) == 0


# --------------------------------------------------------------------------- head and loss
@pytest.mark.parametrize("name", models_of("images"))
def test_every_model_ends_in_the_linear_head_that_grows(name):
    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = create_model(name, 4, shape).eval()
    assert classifier(model)[1].out_features == 4
    x = torch.randn(2, *shape)
    with torch.no_grad():
        before = model(x)
        after = grow_head(model, 7)(x)
    assert after.shape == (2, 7)
    assert torch.allclose(after[:, :4], before, atol=1e-5)  # the old classes' outputs are unchanged
    with pytest.raises(KdclError, match="cannot shrink"):
        grow_head(model, 3)


def test_lwf_loss_is_ce_plus_lambda_kl_on_the_old_classes():
    torch.manual_seed(0)
    student, teacher, y = torch.randn(5, 6), torch.randn(5, 4), torch.randint(0, 6, (5,))
    lam, t = 0.7, 2.0
    loss = create_loss({"name": "lwf", "lam": lam})
    terms = loss(student, teacher, y, alpha=0.0, temperature=t)
    p = F.softmax(teacher / t, 1)  # the previous model's soft targets over its 4 classes
    q = F.softmax(student[:, :4] / t, 1)
    kl = (p * (p.log() - q.log())).sum(1)  # no T² factor, as in LwF
    ce = F.cross_entropy(student, y, reduction="none")  # over every output, the new classes' included
    assert torch.allclose(terms["lwf"], kl, atol=1e-6)
    assert torch.allclose(terms["loss"], ce + lam * kl, atol=1e-6)
    same = torch.cat([teacher, torch.randn(5, 2)], 1)  # the old outputs as the teacher's: nothing to distil
    assert torch.allclose(loss(same, teacher, y, 0.0, t)["lwf"], torch.zeros(5), atol=1e-6)


def test_the_warm_up_trains_the_new_outputs_only():
    torch.manual_seed(0)
    model = grow_head(create_model("mlp", 2, (1, 8, 8), hidden=[16]), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, head = classifier(model)
    with new_outputs_only(model, 2):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.randint(2, 4, (8,))).backward()
        optimizer.step()
    after = model.state_dict()
    head_name = classifier(model)[0]
    for key in before:
        if not key.startswith(head_name):
            assert torch.equal(before[key], after[key]), key  # the body is frozen
    assert torch.equal(before[f"{head_name}.weight"][:2], head.weight[:2])  # so are the old classes' rows
    assert not torch.equal(before[f"{head_name}.weight"][2:], head.weight[2:])
    assert all(p.requires_grad for p in model.parameters())  # and everything trains again afterwards


def test_class_orders_are_natural_and_the_curriculum_orders():
    """scenario.class_order: natural (by index) or any curriculum order applied to the
    classes' mean difficulty; only those that read the difficulty need a teacher."""
    assert CLASS_ORDERS.names() == sorted(["natural", *ORDERS])
    difficulty = torch.tensor([0.3, 0.1, 0.2])
    assert CLASS_ORDERS.create("natural", difficulty, torch.Generator()).tolist() == [0, 1, 2]
    assert CLASS_ORDERS.create("easy_first", difficulty, torch.Generator()).tolist() == [1, 2, 0]
    assert all(CLASS_ORDERS.get(name) is ORDERS.get(name) for name in ORDERS)
    assert [name for name in CLASS_ORDERS if uses_difficulty(name)] == ["easy_first", "hard_first"]
    assert not uses_difficulty([2, 0, 1])


def test_with_classes_relabels_in_task_order():
    data = load_data(compose_config([])["dataset"], torch.device("cpu"), False, 0)
    view = with_classes(data, [7, 3])
    assert view.num_classes == 2 and view.class_ids == [7, 3] and view.class_names == ["7", "3"]
    for full, part in ((data.test, view.test), (data.val, view.val), (data.train, view.train)):
        keep = np.isin(full.labels.numpy(), [7, 3])
        assert torch.equal(part.labels, class_map([7, 3], 10)[full.labels[torch.from_numpy(keep)]])
        assert isinstance(part, TensorSource) and torch.equal(part.x, full.x[torch.from_numpy(keep)])
    pool = np.flatnonzero(data.train.labels.numpy() == 7)[:5]  # a pool of one class: validation keeps that class
    narrow = with_classes(data, [7, 3], train=pool)
    assert len(narrow.train) == 5 and set(narrow.val.labels.tolist()) == {0} and len(narrow.test) == len(view.test)


# --------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    cfg = compose_config(RUN)
    out = tmp_path_factory.mktemp("class_incremental")
    return cfg, out, run_class_incremental(cfg, out)


def test_the_run_writes_its_tables_and_every_task_stage(class_run):
    cfg, out, summary = class_run
    for name in (
        "summary.csv",
        "accuracy_matrix.csv",
        "lifelong.csv",
        "accuracy_matrix.png",
        "accuracy_matrix_task_aware.png",
    ):
        assert (out / name).is_file(), name
    assert summary["model"].tolist() == ["finetune", "lwf", "joint"]  # no teacher without scores to compute
    tasks = pd.read_csv(out / "lifelong.csv")
    for stage in tasks["stage"]:
        for name in ("metrics.csv", "best.pt", "last.pt"):
            assert (out / stage / name).is_file(), (stage, name)
        metrics = pd.read_csv(out / stage / "metrics.csv")
        assert metrics["epoch"].tolist() == list(range(1, cfg["trainer"]["epochs"] + 1))
    # Task 1 is trained once: no arm has anything to distil from or remember yet.
    assert set(tasks[tasks.task == 1]["stage"]) == {"finetune/task_1"}
    assert not (out / "lwf" / "task_1").exists()
    assert (out / "lwf" / "task_2").is_dir() and (out / "joint" / "task_5_warmup").is_dir()
    # The task's model is its last epoch's; its checkpoint knows which classes its outputs are.
    last = load_checkpoint(out / "lwf" / "task_3" / "last.pt")
    assert last["num_classes"] == 6 and last["classes"] == [0, 1, 2, 3, 4, 5]
    assert summary.set_index("model").loc["lwf", "checkpoint"].endswith("lwf/task_5/last.pt")


def test_the_accuracy_matrix_and_the_summary_agree(class_run):
    _, out, summary = class_run
    matrix = pd.read_csv(out / "accuracy_matrix.csv")
    tasks = pd.read_csv(out / "lifelong.csv").set_index(["arm", "task"])
    summary = summary.set_index("model")
    names = [f"task_{j}" for j in range(1, 6)]
    for (arm, protocol), frame in matrix.groupby(["arm", "protocol"]):
        acc = frame.sort_values("after_task")[names].to_numpy()
        assert acc.shape == (5, 5)
        assert np.isnan(acc[np.triu_indices(5, 1)]).all() and not np.isnan(acc[np.tril_indices(5)]).any()
        assert ((acc[np.tril_indices(5)] >= 0) & (acc[np.tril_indices(5)] <= 1)).all()
        suffix = "" if protocol == "class_incremental" else "_task_aware"
        assert tasks.loc[arm][f"avg_acc{suffix}"].to_numpy() == pytest.approx(average_accuracy(acc))
        assert summary.loc[arm, f"avg_acc{suffix}"] == pytest.approx(np.mean(acc[-1]))
        assert summary.loc[arm, f"avg_forgetting{suffix}"] == pytest.approx(forgetting(acc))
        assert summary.loc[arm, f"bwt{suffix}"] == pytest.approx(backward_transfer(acc))
    # Equal optimizer steps per task for every arm, whatever its pool.
    steps = tasks["steps"].unstack("arm")
    assert (steps["finetune"] == steps["lwf"]).all() and (steps["lwf"] == steps["joint"]).all()
    pools = tasks["pool"].unstack("arm")
    assert (pools["joint"] > pools["finetune"]).iloc[1:].all()  # joint trains on every seen class


def test_finetuning_forgets_everything_old_when_the_task_is_not_given(class_run):
    """Joint training is far above fine-tuning and LwF, which keep next to nothing of the old
    classes without the task given (the new classes' outputs win): true on every seed."""
    _, _, summary = class_run
    s = summary.set_index("model")
    assert s.loc["joint", "avg_acc"] > 0.8 > 0.3 > max(s.loc["finetune", "avg_acc"], s.loc["lwf", "avg_acc"])
    assert s.loc["finetune", "avg_forgetting"] > 0.9


@pytest.mark.slow
def test_lwf_forgets_less_than_finetuning_when_the_task_is_given(tmp_path):
    """LwF keeps how the old classes' outputs tell them apart. On digits (72 test images a
    task) single seeds disagree, so this compares the mean task-aware forgetting over three
    seeds (measured: LwF 0.19, fine-tuning 0.40; seeds 3 and 4 give 0.28 / 0.34, 0.30 / 0.44)."""
    forgetting_by_arm: dict[str, list[float]] = {"finetune": [], "lwf": []}
    for seed in (0, 1, 2):
        cfg = compose_config([*RUN, "trainer.epochs=20", "scenario.arms=[finetune,lwf]", f"seed={seed}"])
        summary = run_class_incremental(cfg, tmp_path / str(seed)).set_index("model")
        for arm, values in forgetting_by_arm.items():
            values.append(summary.loc[arm, "avg_forgetting_task_aware"])
    assert np.mean(forgetting_by_arm["lwf"]) < np.mean(forgetting_by_arm["finetune"]) - 0.1


def test_kdcl_eval_tests_a_task_model_on_the_classes_it_has_learnt(class_run, tmp_path):
    _, out, _ = class_run
    tasks = pd.read_csv(out / "lifelong.csv").set_index(["arm", "task"])
    stage = tasks.loc[("lwf", 2), "stage"]
    result = run_eval(str(out / stage / "last.pt"), None, "cpu", 256, tmp_path)
    assert result.loc[0, "acc"] == pytest.approx(tasks.loc[("lwf", 2), "test_acc"])
    per_class = pd.read_csv(tmp_path / "eval_per_class.csv")
    assert per_class["class"].tolist() == [0, 1, 2, 3]


def test_a_second_run_in_the_same_directory_trains_nothing_again(class_run, caplog):
    cfg, out, summary = class_run
    with caplog.at_level("INFO"):
        again = run_class_incremental(cfg, out)
    assert "epoch 1/" not in caplog.text and "not trained again" in caplog.text
    pd.testing.assert_frame_equal(summary.drop(columns="seconds"), again.drop(columns="seconds"))


def test_lwf_with_lambda_zero_is_finetuning_exactly(tmp_path):
    """λ = 0 leaves LwF's cross-entropy alone: every task, warm-ups included, must train as
    fine-tuning does — also when the two arms share a stage (task 1, task 2's warm-up)."""
    cfg = compose_config(
        [*RUN, "trainer.epochs=2", "scenario.tasks=3", "scenario.arms=[finetune,lwf]", "scenario.lwf.lam=0"]
    )
    summary = run_class_incremental(cfg, tmp_path).set_index("model")
    same = ["avg_acc", "avg_forgetting", "avg_acc_task_aware", "test_acc", "best_val_acc"]
    assert summary.loc["lwf", same].tolist() == summary.loc["finetune", same].tolist()
    for k in (2, 3):
        a, b = (pd.read_csv(tmp_path / arm / f"task_{k}" / "metrics.csv") for arm in ("finetune", "lwf"))
        assert a["train_loss"].tolist() == pytest.approx(b["train_loss"].tolist(), abs=1e-6)
        assert a["val_acc"].tolist() == b["val_acc"].tolist()


def test_memory_curriculum_and_class_order_compose(tmp_path):
    """Exemplars enter the pool; class_order=easy_first orders the tasks by the teacher's
    scores; the curriculum paces each task's pool."""
    cfg = compose_config(
        [
            "scenario=class_incremental",
            "scenario.tasks=2",
            "scenario.arms=[finetune,lwf]",
            "scenario.memory_per_class=4",
            "scenario.class_order=easy_first",
            "scenario.warmup_epochs=0",
            "curriculum=teacher_loss",  # the scenario has none unless chosen
            "trainer.epochs=2",
            "dataset.max_train_samples=400",
            "teacher=mlp",
        ]
    )
    summary = run_class_incremental(cfg, tmp_path).set_index("model")
    assert "teacher" in summary.index
    scores = pd.read_csv(tmp_path / "curriculum" / "scores.csv")
    difficulty = scores.groupby("label")["difficulty"].mean()
    tasks = pd.read_csv(tmp_path / "lifelong.csv").set_index(["arm", "task"])
    first = [int(c) for c in tasks.loc[("finetune", 1), "classes"].split()]
    assert sorted(difficulty.sort_values(kind="stable").index[:5].tolist()) == sorted(first)  # the 5 easiest classes
    new = tasks.loc[("finetune", 2), "pool"]
    second = [int(c) for c in tasks.loc[("finetune", 2), "classes"].split()]
    labels = scores["label"].to_numpy()
    assert new == np.isin(labels, second).sum() + 4 * 5  # the new classes plus 4 exemplars of each old one
    metrics = pd.read_csv(tmp_path / "lwf" / "task_2" / "metrics.csv")
    assert metrics["data_fraction"].iloc[0] < 1.0  # paced by the curriculum within the task


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("scenario.arms=[finetune,ewc]", "unknown class-incremental strategy 'ewc'"),
        ("scenario.objective_arm=joint2", "scenario.objective_arm='joint2' is not one of scenario.arms"),
        ("scenario.tasks=11", "scenario.tasks=11 is more than the 10 classes"),
        ("scenario.class_order=[0,1,12]", "names class 12, but the dataset has 10 classes"),
        ("scenario.class_order=alphabetical", "scenario.class_order='alphabetical' is not a known class order"),
        ("scenario.lwf.lam=-1", "scenario.lwf.lam=-1 is out of range"),
    ],
)
def test_bad_scenario_settings_are_one_clear_error(capsys, tmp_path, override, needle):
    with pytest.raises(SystemExit) as stop:
        kdcl_main(["train", "scenario=class_incremental", override, f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and needle in err and err.count("error:") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*/metrics.csv"))  # refused before anything trained


def test_the_cli_runs_the_scenario(cli):
    result = cli("train", *RUN, "trainer.epochs=1", "scenario.tasks=2", "hydra.run.dir=run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kdcl class-incremental summary" in result.stdout


@pytest.mark.slow
def test_two_processes_learn_the_tasks_as_one(tmp_path):
    """trainer.devices=2 (gloo, CPU): one set of files, and with the MLP (no BatchNorm) the
    same numbers as one process up to float rounding."""
    args = [*RUN, "trainer.epochs=2", "scenario.tasks=2", "cache=false"]
    for name, extra in (("one", []), ("two", ["trainer.devices=2"])):
        result = run_cli(["train", *args, *extra, f"hydra.run.dir={tmp_path / name}"], tmp_path, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file()) == sorted(
        p.relative_to(one) for p in one.rglob("*") if p.is_file()
    )
    for name in ("accuracy_matrix.csv", "lifelong.csv", "summary.csv"):
        a, b = (pd.read_csv(d / name).drop(columns=["seconds", "checkpoint"], errors="ignore") for d in (one, two))
        pd.testing.assert_frame_equal(a, b, atol=0.02)  # within one test example of a task


def test_the_scenario_trains_without_a_curriculum_unless_one_is_chosen():
    assert compose_config(["scenario=class_incremental"])["curriculum"]["type"] == "none"
    assert compose_config(["scenario=class_incremental", "curriculum=length"])["curriculum"]["scorer"] == "length"
    assert compose_config([])["curriculum"]["type"] != "none"  # the standard scenario keeps its default
