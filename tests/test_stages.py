"""Per-stage recipes (``stages.teacher``, ``stages.student``): each reaches its stages, the
students keep one step budget, and configs without them run and key as before."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import QUICK, comparable, compose_config, control_config, stop_after
from hydra.errors import ConfigCompositionException

from kdcl.config.checks import composition_error, validate
from kdcl.config.options import STUDENT, TEACHER, stage_recipe
from kdcl.config.schema import TrainConfig
from kdcl.distill.control import DistillControl
from kdcl.errors import KdclError
from kdcl.scenarios.stage_cache import digest, stage_key, teacher_logits_key
from kdcl.scenarios.standard import run_pipeline
from kdcl.train import assemble, engine
from kdcl.train.assemble import StageRecipe
from kdcl.train.engine import TrainSettings
from kdcl.train.resume import Interrupted

CPU = TrainSettings(torch.device("cpu"), epochs=1, batch_size=64, eval_batch_size=512, amp=False)

# The teacher trains 3 epochs of batch 32 with AdamW at lr 0.002; every student 2 epochs of
# batch 64 with the shared SGD at lr 0.05; a constant schedule makes metrics.csv's lr the recipe's.
RECIPES = [
    *QUICK,
    "scheduler=constant",
    "stages.teacher.optimizer.name=adamw",
    "stages.teacher.optimizer.lr=0.002",
    "stages.teacher.epochs=3",
    "stages.teacher.label_smoothing=0.2",
    "stages.student.batch_size=64",
    "arms={kd_t2: {distill: {temperature: 2}}}",
]
STUDENTS = ["baseline", "distill", "kd_t2"]


@pytest.fixture(scope="module")
def recipes_run(tmp_path_factory, request):
    """One run of RECIPES, with the optimizer each stage built: stage → (class name, lr, the
    label smoothing of its loss)."""
    out = tmp_path_factory.mktemp("stages")
    built: dict[str, tuple[str, float]] = {}
    smoothing: list[float] = []
    real, real_control = assemble.build_optimizer, assemble.DistillControl
    monkeypatch = pytest.MonkeyPatch()
    request.addfinalizer(monkeypatch.undo)

    def spy(groups, cfg):
        optimizer = real(groups, cfg)
        built[len(built)] = (type(optimizer).__name__, optimizer.param_groups[0]["lr"])
        return optimizer

    def control(*args):
        made = real_control(*args)
        smoothing.append(made.context(1, ({}, {})).label_smoothing)
        return made

    monkeypatch.setattr(assemble, "build_optimizer", spy)
    monkeypatch.setattr(assemble, "DistillControl", control)
    cfg = compose_config(RECIPES)
    validate(cfg)
    summary = run_pipeline(cfg, out)
    return out, summary.set_index("model"), [(*b, ls) for b, ls in zip(built.values(), smoothing, strict=True)]


def test_each_role_trains_with_its_recipe(recipes_run):
    out, _, built = recipes_run
    teacher = pd.read_csv(out / "teacher" / "metrics.csv")
    assert len(teacher) == 3 and (teacher["lr"] == 0.002).all()
    for stage in STUDENTS:
        metrics = pd.read_csv(out / stage / "metrics.csv")
        assert len(metrics) == 2 and (metrics["lr"] == 0.05).all(), stage
    # the teacher first (AdamW, smoothed labels), then baseline, distill and the arm (the shared SGD)
    assert built == [("AdamW", 0.002, 0.2), *[("SGD", 0.05, 0.0)] * len(STUDENTS)]


def test_the_summary_counts_each_stage_s_own_steps(recipes_run):
    out, summary, _ = recipes_run
    examples = json.loads((out / "curriculum" / "curriculum.json").read_text())["train_examples"]
    assert summary.loc["teacher", "steps"] == 3 * math.ceil(examples / 32)
    student_steps = 2 * math.ceil(examples / 64)
    assert summary.loc[STUDENTS, "steps"].tolist() == [student_steps] * len(STUDENTS)


def test_the_pacing_plan_is_the_students_budget(recipes_run):
    out, summary, _ = recipes_run
    info = json.loads((out / "curriculum" / "curriculum.json").read_text())
    assert info["total_steps"] == summary.loc["distill", "steps"]
    assert info["steps_per_epoch"] == math.ceil(info["train_examples"] / 64)
    assert len(pd.read_csv(out / "curriculum" / "pacing.csv")) == 2


def test_unset_keys_keep_the_shared_settings():
    cfg = compose_config([])
    shared = {k: cfg[k] for k in ("optimizer", "scheduler")}
    shared.update(epochs=cfg["trainer"]["epochs"], batch_size=cfg["trainer"]["batch_size"], label_smoothing=0.0)
    assert stage_recipe(cfg, TEACHER) == stage_recipe(cfg, STUDENT) == shared
    cfg = compose_config(["stages.student.optimizer.lr=0.01", "stages.teacher.scheduler.name=step"])
    assert stage_recipe(cfg, STUDENT)["optimizer"] == {**shared["optimizer"], "lr": 0.01}
    assert stage_recipe(cfg, STUDENT)["scheduler"] == shared["scheduler"]
    assert stage_recipe(cfg, TEACHER)["scheduler"] == {
        "name": "step",
        "warmup_epochs": 0.0,
        "milestones": [0.5, 0.75],
        "gamma": 0.1,
    }


def test_a_stage_that_names_another_optimizer_takes_its_defaults():
    cfg = compose_config(["stages.teacher.optimizer.name=adamw"])
    validate(cfg)
    recipe = StageRecipe.of(cfg, TEACHER, CPU)
    assert vars(recipe.optimizer) == {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]}
    assert StageRecipe.of(cfg, STUDENT, CPU).optimizer.name == "sgd"
    with pytest.raises(KdclError) as err:  # sgd's momentum is no key of adamw
        validate(compose_config(["stages.teacher.optimizer.name=adamw", "stages.teacher.optimizer.momentum=0.5"]))
    assert err.value.what == "stages.teacher.optimizer.momentum=0.5: stages.teacher.optimizer has no key 'momentum'"
    assert "betas" in err.value.fix


# The keys of the default config's teacher and baseline, computed before stages existed.
KEYS_BEFORE_STAGES = {"teacher": "fca98714f7031c1c", "baseline": "95a05eeac30d9fb7"}
KEY_ENTRIES = {"stage", "stage_version", "model", "dataset", "trainer", "optimizer", "scheduler", "seed"}


@pytest.mark.parametrize("stage", sorted(KEYS_BEFORE_STAGES))
def test_a_config_without_stage_keys_keys_as_before(stage):
    cfg = compose_config([])
    key = stage_key(cfg, stage, CPU)
    assert set(key) == KEY_ENTRIES and digest(key) == KEYS_BEFORE_STAGES[stage]
    same_values = compose_config(
        [f"stages.{role}.optimizer.lr={cfg['optimizer']['lr']}" for role in ("teacher", "student")]
    )
    assert digest(stage_key(same_values, stage, CPU)) == KEYS_BEFORE_STAGES[stage]


def test_a_stage_keys_on_its_own_recipe():
    def key(stage: str, *overrides: str) -> str:
        return digest(stage_key(compose_config(list(overrides)), stage, CPU))

    assert key("teacher", "stages.teacher.optimizer.lr=0.1") == key("teacher", "optimizer.lr=0.1") != key("teacher")
    assert key("baseline", "stages.teacher.optimizer.lr=0.1") == key("baseline")
    assert key("baseline", "stages.student.epochs=3") == key("baseline", "trainer.epochs=3") != key("baseline")
    assert key("teacher", "stages.student.epochs=3") == key("teacher")
    # a student started from the teacher's layers keys on how that teacher trained
    init = ["student=cnn", "student.init_from_teacher=true"]
    assert key("baseline", *init, "stages.teacher.epochs=3") != key("baseline", *init)
    # one started from the teacher's pretrained weights does not, but on the teacher it is
    pretrained = ["student=cnn", "student.init_from_teacher=pretrained"]
    assert key("baseline", *pretrained, "stages.teacher.epochs=3") == key("baseline", *pretrained)
    assert key("baseline", *pretrained, "teacher=resnet8") != key("baseline", *pretrained)
    assert len({key("baseline", "student=cnn"), key("baseline", *init), key("baseline", *pretrained)}) == 3


def test_replayed_teacher_logits_key_on_the_students_batch_size():
    def key(*overrides: str) -> dict:
        return teacher_logits_key(compose_config(list(overrides)), CPU, {"steps": 10}, Path("/dev/null"))

    assert "batch_size" not in key()["plan"]
    assert key("stages.student.batch_size=32")["plan"]["batch_size"] == 32
    assert key("stages.teacher.batch_size=32")["plan"]["batch_size"] == 64


def test_an_arm_cannot_have_a_recipe_of_its_own():
    cfg = compose_config(["arms={short: {distill: {alpha: 0.5}, trainer: {epochs: 1}}}"])
    with pytest.raises(KdclError) as err:
        validate(cfg)
    assert err.value.what.startswith("arms.short.trainer: an arm cannot have a training recipe of its own")
    assert "one optimizer-step budget" in err.value.what and "stages.student" in err.value.fix


def test_there_is_no_recipe_per_student_stage():
    with pytest.raises(ConfigCompositionException) as raised:
        compose_config(["stages.baseline.epochs=5"])
    err = composition_error(raised.value, TrainConfig)
    assert "stages has no key 'baseline'" in err.what and "share stages.student" in err.what
    assert err.fix.endswith("stages has: teacher, student")


@pytest.mark.parametrize(
    "teachers",
    [["teacher.checkpoint=teacher.pt"], ["teachers=[{name: cnn, checkpoint: a.pt}, {name: mlp, checkpoint: b.pt}]"]],
)
def test_a_teacher_recipe_is_refused_when_no_teacher_trains(teachers):
    with pytest.raises(KdclError) as err:
        validate(compose_config([*teachers, "stages.teacher.optimizer.lr=0.1"]))
    assert err.value.what.startswith("stages.teacher.optimizer.lr=0.1 would change nothing")
    assert "evaluated, not trained" in err.value.what
    validate(compose_config([*teachers, "stages.student.optimizer.lr=0.1"]))  # the students still train


def test_a_pretrained_teacher_is_fine_tuned_with_its_recipe():
    validate(compose_config(["teacher.pretrained=true", "stages.teacher.epochs=2"]))
    mixed = "teachers=[{name: cnn, checkpoint: a.pt}, cnn]"  # the second teacher trains
    validate(compose_config([mixed, "stages.teacher.epochs=2"]))


def test_a_stage_recipe_resumes_exactly_and_a_changed_one_is_refused(tmp_path, monkeypatch):
    """A teacher of its own budget cut off mid-way continues to the same numbers; the run
    directory then refuses another recipe (``done.json`` keeps the config, ``stages`` included)."""
    overrides = [*QUICK, "dataset.max_train_samples=300", "trainer.epochs=1", "baseline=false", "curriculum=none"]
    cfg = compose_config([*overrides, "stages.teacher.epochs=2"])
    run_pipeline(cfg, tmp_path / "reference")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", stop_after("teacher", 12))  # 9 steps an epoch: in the teacher's epoch 2
        with pytest.raises(Interrupted):
            run_pipeline(cfg, run_dir)
    run_pipeline(cfg, run_dir)
    for table in ("summary.csv", "teacher/metrics.csv", "distill/metrics.csv"):
        pd.testing.assert_frame_equal(comparable(tmp_path / "reference", table), comparable(run_dir, table))
    with pytest.raises(KdclError, match=r"was made with a different config \(differs in: stages\)"):
        run_pipeline(compose_config([*overrides, "stages.teacher.epochs=3"]), run_dir)


def test_a_config_saved_before_stages_existed_trains_with_the_shared_settings():
    """``resume=RUN_DIR`` of an older run: its saved config has no ``stages``."""
    cfg = compose_config([])
    del cfg["stages"]
    validate(cfg)
    for role in (TEACHER, STUDENT):
        assert stage_recipe(cfg, role)["optimizer"] == cfg["optimizer"]
        assert stage_recipe(cfg, role)["epochs"] == cfg["trainer"]["epochs"]


def test_label_smoothing_smooths_the_hard_label_term_and_keys_only_when_set():
    """``CE_ε = (1 − ε)·(−log q_y) + ε·mean_c(−log q_c)`` (Szegedy et al. 2016); ε = 0 keys
    a stage as before the key existed."""
    torch.manual_seed(0)
    logits, y, eps = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0]), 0.1
    log_q = torch.log_softmax(logits, 1)
    expected = (1 - eps) * -log_q[torch.arange(5), y] + eps * -log_q.mean(1)
    ctx = DistillControl(control_config(), 10, 5, None, 0, eps).context(1, ({}, {}))
    assert torch.allclose(ctx.cross_entropy(logits, y), expected)
    cfg = compose_config(["trainer.label_smoothing=0.1", "stages.student.label_smoothing=0.0"])
    assert stage_recipe(cfg, TEACHER)["label_smoothing"] == 0.1 and stage_recipe(cfg, STUDENT)["label_smoothing"] == 0.0
    assert stage_key(cfg, "teacher", CPU)["trainer"]["label_smoothing"] == 0.1
    assert "label_smoothing" not in stage_key(cfg, "baseline", CPU)["trainer"]
