"""The search space of ``kdcl tune``: which config keys a trial draws, and how (``conf/search/``).

    distill.alpha: {type: float, low: 0.1, high: 0.95}
    distill.temperature: {type: categorical, choices: [1, 2, 4, 8]}
    optimizer.lr: {type: float, low: 0.01, high: 0.2, log: true}
    trainer.batch_size: {type: int, low: 32, high: 128, step: 32}
    distill: {type: categorical, choices: [kd, dkd]}     # a config group: one of its options

Each ``type`` is an entry of :data:`KINDS`: a function of the key and the entry's other
keys (its signature says which it takes) that checks them and returns the
:class:`Dimension`. Whether the key exists and the config accepts every value the
dimension can draw is checked against the composed config (:func:`check_against`),
before any trial trains.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna

from kdcl.config.checks import validate
from kdcl.config.schema import TrainConfig
from kdcl.distill.losses import LOSSES
from kdcl.errors import KdclError
from kdcl.registry import Registry

KINDS: Registry[Callable[..., Dimension]] = Registry("search-space type")


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``draw`` gives a trial's value; the config must accept each of ``extremes``
    (the bounds of a range, every choice)."""

    key: str
    draw: Callable[[optuna.Trial], Any]
    extremes: tuple[Any, ...]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_range(key: str, low: Any, high: Any, log: Any, step: Any, number: Callable[[Any], bool], what: str) -> None:
    """``low`` ≤ ``high``, both passing ``number`` (``what`` says it in words); ``log`` a flag
    needing ``low`` > 0; ``step`` > 0 and not with ``log``."""
    for name, value in (("low", low), ("high", high)):
        if not number(value):
            raise KdclError(f"{key}: {name}={value!r} is not {what}", fix=f"give {key} a {name} that is {what}")
    if low > high:
        raise KdclError(f"{key}: low={low} is above high={high}", fix=f"give {key} low ≤ high")
    if not isinstance(log, bool):
        raise KdclError(f"{key}: log={log!r} is not true or false", fix="set log: true or leave it out")
    if log and low <= 0:
        raise KdclError(f"{key}: log=true needs low > 0, not {low}", fix=f"raise {key}'s low above 0, or drop log")
    if step is not None and (not number(step) or step <= 0):
        raise KdclError(f"{key}: step={step!r} is not {what} > 0", fix=f"give {key} a step > 0, or leave it out")
    if step is not None and log:
        raise KdclError(f"{key}: step and log=true cannot go together", fix=f"keep one of them for {key}")


@KINDS.register("float")
def float_range(key: str, low: float, high: float, log: bool = False, step: float | None = None) -> Dimension:
    """A number in [low, high]: uniform, log-uniform (``log: true``) or on a grid of ``step``."""
    _check_range(key, low, high, log, step, _is_number, "a number")
    low, high = float(low), float(high)
    return Dimension(key, lambda trial: trial.suggest_float(key, low, high, log=log, step=step), (low, high))


@KINDS.register("int")
def int_range(key: str, low: int, high: int, log: bool = False, step: int = 1) -> Dimension:
    """An integer in [low, high]: uniform, log-uniform (``log: true``) or every ``step``-th."""
    _check_range(key, low, high, log, None if step == 1 else step, _is_int, "an integer")
    return Dimension(key, lambda trial: trial.suggest_int(key, low, high, log=log, step=step), (low, high))


@KINDS.register("categorical")
def categorical(key: str, choices: list) -> Dimension:
    """One of ``choices``: numbers, strings, true/false or null (a group's option names)."""
    if not isinstance(choices, list) or not choices:
        raise KdclError(f"{key}: choices={choices!r} is not a non-empty list", fix=f"list {key}'s values: [a, b, ...]")
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise KdclError(
                f"{key}: choice {choice!r} is not a number, string, true/false or null",
                fix="list plain values (a mapping or a list cannot be a choice)",
            )
    if len(set(map(repr, choices))) < len(choices):
        raise KdclError(f"{key}: choices {choices} repeat a value", fix="list each value once")
    values = tuple(choices)
    return Dimension(key, lambda trial: trial.suggest_categorical(key, values), values)


def parse_space(space: Any, where: str) -> list[Dimension]:
    """The dimensions of a search space (a mapping key → {type, ...}); ``where`` names it in errors."""
    if not isinstance(space, dict) or not space:
        raise KdclError(f"{where}: the search space is empty", fix="list at least one key: {type: float, low, high}")
    dimensions = []
    for key, spec in space.items():
        try:
            dimensions.append(dimension(key, spec))
        except KdclError as err:
            raise KdclError(f"{where}: {err.what}", fix=err.fix) from None
    return dimensions


def dimension(key: str, spec: Any) -> Dimension:
    """One entry of a search space: its kind (``type``) built from its other keys."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise KdclError(
            f"{key}: {spec!r} is not a mapping with a type",
            fix=f"write {key}: {{type: float, low: L, high: H}} (types: {', '.join(KINDS)})",
        )
    args = {k: v for k, v in spec.items() if k != "type"}
    try:
        kind = KINDS.get(spec["type"])
    except KdclError as err:
        raise KdclError(f"{key}: {err.what}", fix=err.fix) from None
    parameters = [p for p in inspect.signature(kind).parameters if p != "key"]
    unknown = sorted(set(args) - set(parameters))
    missing = [
        p.name
        for p in inspect.signature(kind).parameters.values()
        if p.name != "key" and p.default is inspect.Parameter.empty and p.name not in args
    ]
    if unknown or missing:
        problem = f"unknown {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise KdclError(
            f"{key}: type {spec['type']} has {problem}", fix=f"type {spec['type']} takes: {', '.join(parameters)}"
        )
    return kind(key, **args)


def _keys(cfg: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every dotted key of a nested mapping, sections included."""
    for name, value in cfg.items():
        yield prefix + name
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{name}.")


def _with_value(cfg: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``cfg`` with the dotted ``key`` set to ``value``."""
    changed = copy.deepcopy(cfg)
    *path, last = key.split(".")
    node = changed
    for part in path:
        node = node[part]
    node[last] = value
    return changed


def check_against(
    dimensions: list[Dimension], cfg: dict[str, Any], groups: dict[str, list[str]], registries: dict, where: str
) -> None:
    """Every searched key is a key of the run config ``cfg`` (plain, without ``tune`` and
    ``search``) or a config group (``groups``: group → its options), one the run's loss
    reads (``distill.alpha`` does nothing to ``dkd``), and every value it can draw passes
    the config's checks (``registries``: the names checked beyond the schema)."""
    known = list(_keys(cfg))
    for dim in dimensions:
        if dim.key in groups:
            wrong = [c for c in dim.extremes if c not in groups[dim.key]]
            if wrong:
                raise KdclError(
                    f"{where}: {dim.key} has no option {wrong[0]!r}",
                    fix=f"choose among: {', '.join(groups[dim.key])}",
                )
            continue
        if dim.key not in known:
            close = difflib.get_close_matches(dim.key, known, n=1)
            raise KdclError(
                f"{where}: {dim.key} is not a config key nor a config group",
                fix=f"did you mean {close[0]}?" if close else "see kdcl train --cfg job for the keys",
            )
        section, _, knob = dim.key.partition(".")
        if section == "distill" and knob in LOSSES.get(cfg["distill"]["name"]).ignores:
            loss = cfg["distill"]["name"]
            raise KdclError(
                f"{where}: {dim.key} is searched, but distill={loss} does not use it: every trial would be the same",
                fix=f"search distill={loss}'s own keys (kdcl train distill={loss} --cfg job lists them), "
                "or add distill=kd to the command to search Hinton KD's alpha and temperature",
            )
        for value in dim.extremes:
            try:
                validate(_with_value(cfg, dim.key, value), TrainConfig, registries)
            except KdclError as err:
                raise KdclError(f"{where}: {dim.key} can draw {value!r}, but {err.what}", fix=err.fix) from None
