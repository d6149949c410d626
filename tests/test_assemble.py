"""The stage assembler: one builder of every stage kdcl trains, from what sets the stage
apart (StageSpec) and what the run's stages share (StageEnvironment), used by the staged
run, the class-incremental tasks and ``kdcl bench``'s kdcl arms."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from helpers import compose_config

from kdcl.commands import bench
from kdcl.scenarios import standard
from kdcl.scenarios.class_incremental import run_class_incremental
from kdcl.scenarios.standard import run_pipeline
from kdcl.train.assemble import StageEnvironment, StageSpec, build_stage
from kdcl.train.engine import Stage


def spy(monkeypatch, module) -> list[tuple[StageSpec, Stage]]:
    """Record the spec of every ``build_stage`` call made from ``module`` and the stage it built."""
    calls = []

    @contextmanager
    def recording(spec: StageSpec, env: StageEnvironment):
        with build_stage(spec, env) as stage:
            calls.append((spec, stage))
            yield stage

    monkeypatch.setattr(module, "build_stage", recording)
    return calls


def test_bench_builds_its_kdcl_arms_through_the_assembler(monkeypatch, tmp_path):
    cfg = compose_config(["dataset.max_train_samples=300", "bench.views=2"], config_name="bench")
    calls = spy(monkeypatch, bench)
    s = bench.setup(cfg, tmp_path)
    for arm in ("kdcl", "kdcl_cached", "student"):
        student = s.student()
        assert sum(1 for _ in bench.arm_steps(s, arm, student, 3)) == 3
        _, stage = calls[-1]
        assert stage.model is student and stage.lr_schedule.last_epoch == 3  # the steps were the stage's
    sections = [spec.distill for spec, _ in calls]
    assert [(d["name"], d["teacher_cache"]) for d in sections] == [("kd", "none"), ("kd", "views:2"), ("none", "none")]
    assert all(spec.name == "bench" and spec.seed == cfg["seed"] + 1 for spec, _ in calls)
    assert [stage.feed.teaches for _, stage in calls] == [True, True, False]
    # the teacher is laid out as a run's (trainer.channels_last, on by default)
    convs = [w for w in bench.kdcl_teacher(s).parameters() if w.dim() == 4 and w.shape[1] > 1]
    assert cfg["trainer"]["channels_last"] and convs
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)


def test_every_stage_of_a_run_is_assembled_by_it(monkeypatch, tmp_path):
    quick = ["trainer.epochs=1", "dataset.max_train_samples=300", "trainer.batch_size=64"]
    calls = spy(monkeypatch, standard)  # class-incremental tasks train through standard's stage function
    run_pipeline(compose_config([*quick, "arms={plain: {curriculum: {type: none}}}"]), tmp_path / "standard")
    assert [spec.name for spec, _ in calls] == ["teacher", "baseline", "distill", "plain"]
    assert [spec.distill["name"] for spec, _ in calls] == ["none", "none", "kd", "kd"]
    calls.clear()
    cfg = compose_config(
        [
            *quick,
            "scenario=class_incremental",
            "scenario.tasks=2",
            "scenario.arms=[finetune,lwf]",
            "scenario.objective_arm=lwf",
            "scenario.warmup_epochs=0",
            "curriculum=none",
        ]
    )
    run_class_incremental(cfg, tmp_path / "lifelong")
    assert [spec.name for spec, _ in calls] == ["finetune/task_1", "finetune/task_2", "lwf/task_2"]
    lwf = calls[-1][0].distill
    assert (lwf["name"], lwf["lam"], lwf["temperature"]) == ("lwf", *cfg["scenario"]["lwf"].values())
