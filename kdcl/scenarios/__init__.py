"""What ``kdcl train`` trains: the ``scenario`` config group.

A scenario is a function ``run(cfg, out, loggers, on_epoch=None) -> summary`` that trains
into the run directory ``out``, gives each epoch's metrics to ``loggers``
(:mod:`kdcl.output.trackers`) and to ``on_epoch`` if given (:data:`kdcl.train.engine.EpochHook`),
and returns the table it wrote as ``summary.csv``, plus the summary row whose
``best_val_acc`` a sweep's objective reads (``kdcl tune`` maximises it):

- ``standard`` (:mod:`kdcl.scenarios.standard`): teacher → baseline → curriculum → distill;
- ``class_incremental`` (:mod:`kdcl.scenarios.class_incremental`): the classes arrive in
  tasks, learnt by fine-tuning, Learning without Forgetting and joint training;
- ``record`` (:mod:`kdcl.scenarios.record`): the teacher, then its stored soft labels for
  later jobs, and no student.

Adding one: a module here with its run function, one line in :data:`SCENARIOS`, and
``conf/scenario/NAME.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kdcl.output.trackers import Loggers
from kdcl.registry import Registry
from kdcl.scenarios.class_incremental import (
    CLASS_ORDERS,
    objective_arm,
    run_class_incremental,
)
from kdcl.scenarios.record import run_record
from kdcl.scenarios.standard import distilled_student, run_pipeline
from kdcl.train.engine import EpochHook

# (cfg, out, loggers, on_epoch, job_columns) → the summary table
RunFn = Callable[[dict[str, Any], Path, Loggers, EpochHook | None, Mapping[str, Any] | None], pd.DataFrame]


@dataclass(frozen=True)
class Scenario:
    run: RunFn
    objective: Callable[[dict[str, Any]], str]  # cfg → the summary row a sweep optimises


SCENARIOS: Registry[Scenario] = Registry(
    "scenario",
    {
        "standard": Scenario(run_pipeline, objective=distilled_student),
        "class_incremental": Scenario(run_class_incremental, objective=objective_arm),
        "record": Scenario(run_record, objective=lambda cfg: "teacher"),
    },
)

# Config keys that name an entry of a registry of this layer: checked with the rest of the
# config before anything trains (kdcl.config.checks.validate's ``registries``).
REGISTERED_NAMES: dict[str, Registry[Any]] = {"scenario.name": SCENARIOS, "scenario.class_order": CLASS_ORDERS}
