"""What ``kdcl train`` trains: the ``scenario`` config group.

A scenario is a function ``run(cfg, out) -> summary`` that trains into the run directory
``out`` and returns the table it wrote as ``summary.csv``, plus the summary row whose
``best_val_acc`` a sweep's objective reads (an Optuna search maximises it):

- ``standard`` (:mod:`kdcl.stages`): teacher → baseline → curriculum → distill;
- ``class_incremental`` (:mod:`kdcl.lifelong`): the classes arrive in tasks, learnt by
  fine-tuning, Learning without Forgetting and joint training.

Adding one: a function registered with ``@register_scenario(NAME, objective=...)`` in its
module, the module listed in :func:`scenarios`, and ``conf/scenario/NAME.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from kdcl.registry import Registry

RunFn = Callable[[dict[str, Any], Path], pd.DataFrame]

SCENARIOS = Registry("scenario")


@dataclass(frozen=True)
class Scenario:
    run: RunFn
    objective: Callable[[dict[str, Any]], str]  # cfg → the summary row a sweep optimises


def register_scenario(name: str, objective: Callable[[dict[str, Any]], str]) -> Callable[[RunFn], RunFn]:
    def decorator(fn: RunFn) -> RunFn:
        SCENARIOS.register(name)(Scenario(fn, objective))
        return fn

    return decorator


def scenarios() -> Registry:
    """The registry with every scenario in it (their modules register them on import)."""
    import kdcl.lifelong  # noqa: F401
    import kdcl.stages  # noqa: F401

    return SCENARIOS
