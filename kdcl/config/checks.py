"""Checks on a config before anything runs: the schema's ranges, types and key sets
(:mod:`kdcl.config.schema`), registered names and the cross-checks between keys."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, cast

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from kdcl.config.options import (
    RECIPE_GROUPS,
    RECIPE_TRAINER_KEYS,
    STUDENT,
    TEACHER,
    arm_config,
    group_option,
    option_folder,
    recipe_base,
    stage_overrides,
    stage_recipe,
    teacher_specs,
)
from kdcl.config.schema import (
    DatasetConfig,
    Entry,
    EvalConfig,
    TrainConfig,
    describe,
    entries,
    is_instance,
    is_open,
    is_section,
    lookup,
    option_keys,
    section_type,
)
from kdcl.errors import KdclError
from kdcl.registry import Registry


def _registered_names() -> dict[str, Any]:
    """Config keys that name a registry entry, and the registry (imported lazily: heavy).
    ``distill.teacher_cache`` names a feed, ``NAME:K`` for a counted one (``views:8``)."""
    from kdcl.curricula import ORDERS, PACINGS, PLANS, SCORERS, SELF_PACED_WEIGHTS
    from kdcl.data import DATASETS, PADDINGS
    from kdcl.data.images import DECODERS
    from kdcl.data.views import AUTO_AUGMENTS, TRAIN_VIEWS
    from kdcl.distill.control import SAMPLE_WEIGHTS
    from kdcl.distill.feeds import STORES, TEACHER_CACHES
    from kdcl.distill.losses import LOSSES
    from kdcl.distill.mixing import MIXES
    from kdcl.distill.teachers import COMBINATIONS
    from kdcl.optim import OPTIMIZERS, SCHEDULES

    return {
        "dataset.name": DATASETS,
        "dataset.crop_padding_mode": PADDINGS,
        "dataset.train_view": TRAIN_VIEWS,
        "dataset.auto_augment": AUTO_AUGMENTS,
        "dataset.decoder": DECODERS,
        "trainer.mix": MIXES,
        "distill.name": LOSSES,
        "distill.sample_weight": SAMPLE_WEIGHTS,
        "distill.alpha_schedule": SCHEDULES,
        "distill.temperature_schedule": SCHEDULES,
        "curriculum.type": PLANS,
        "curriculum.scorer": SCORERS,
        "curriculum.order": ORDERS,
        "curriculum.pacing.name": PACINGS,
        "curriculum.weights": SELF_PACED_WEIGHTS,
        "optimizer.name": OPTIMIZERS,
        "scheduler.name": SCHEDULES,
        "distill.teacher_combine": COMBINATIONS,
        "distill.teacher_cache": TEACHER_CACHES,
        "distill.teacher_cache_store": STORES,
    }


def validate(cfg: Any, schema: type = TrainConfig, registries: dict[str, Registry[Any]] | None = None) -> None:
    """Raise one :class:`KdclError` for the first key that is out of range, of the wrong
    type, unknown to a closed section, or names no registered entry — before any training.

    Ranges, types and the key sets are the schema's (:mod:`kdcl.config.schema`), walked here for
    the composed config (already typed by Hydra) and for a resumed run's saved one alike;
    every arm's distill and curriculum are checked as the arm will run them. ``registries``
    adds keys that name an entry of a registry above this layer (``scenario.name``)."""
    plain = _container(cfg)
    _check_arm_recipes(plain)  # before the schema's rule for arms: the reason, not the rule
    check(plain, schema)
    if plain.get("distill", {}).get("teacher_route") and not plain.get("teacher", {}).get("route_points"):
        raise KdclError(
            "distill.teacher_route=true needs checkpoints saved during teacher training",
            fix="set teacher.route_points=N (N ≥ 1) and train the teacher in this run",
        )
    _check_names(plain, {**_registered_names(), **(registries or {})})
    _check_models(plain)
    _check_stage_recipes(plain)
    if isinstance(plain.get("arms"), dict):
        for name, arm in plain["arms"].items():
            distill, curriculum = arm_config(plain, arm)
            arm_cfg = {"distill": distill, "curriculum": curriculum}
            check(arm_cfg, TrainConfig, prefix=f"arms.{name}.")
            _check_names(arm_cfg, _registered_names(), prefix=f"arms.{name}.")


# What an arm may not set: a training recipe (an arm overrides distill and curriculum only).
ARM_RECIPE_KEYS = {"optimizer", "scheduler", "trainer", "stages", *RECIPE_TRAINER_KEYS}


def _check_arm_recipes(cfg: dict[str, Any]) -> None:
    """Every student stage trains with ``stages.student``: an arm with a recipe of its own
    would train on another step budget (or schedule) than the baseline it is compared with."""
    arms = cfg.get("arms")
    for name, arm in arms.items() if isinstance(arms, dict) else ():
        own = sorted(ARM_RECIPE_KEYS & set(arm)) if isinstance(arm, dict) else []
        if own:
            raise KdclError(
                f"arms.{name}.{own[0]}: an arm cannot have a training recipe of its own, since the baseline "
                "and every distilled student train with stages.student, on one optimizer-step budget, "
                "so that they compare fairly",
                fix=f"drop arms.{name}.{own[0]}; set stages.student.* to change the recipe of every student, "
                "or compare recipes in runs of their own (kdcl train -m ...)",
            )


def _check_stage_recipes(cfg: dict[str, Any]) -> None:
    """``stages.teacher`` and ``stages.student`` as their stages will train with them
    (:func:`kdcl.config.options.stage_recipe`): an optimizer or schedule they name is
    registered, each key they set is one of the section they override (the shared one, or
    the option file of the name they give), every value of the result is in range; and a
    teacher recipe is refused when no teacher trains (a checkpoint is evaluated), as it
    would change nothing."""
    for role in (TEACHER, STUDENT):
        own, where = stage_overrides(cfg, role), f"stages.{role}."
        sections = {group: own[group] for group in RECIPE_GROUPS if group in own}
        _check_names(sections, _registered_names(), prefix=where)
        for group, keys in sections.items():
            base = recipe_base(cfg, group, keys)
            unknown = sorted(keys.keys() - base.keys())
            if unknown:
                path = f"{where}{group}."
                raise unknown_key(path + unknown[0], _shown(keys[unknown[0]]), None, path, list(base))
        recipe = stage_recipe(cfg, role)
        check({group: recipe[group] for group in RECIPE_GROUPS}, TrainConfig, prefix=where)
    own = stage_overrides(cfg, TEACHER)
    if own and all(spec.get("checkpoint") for spec in teacher_specs(cfg)):
        first, value = next(_dotted(own, "stages.teacher."))
        loaded, unset = (
            ("every entry of teachers has a checkpoint", "drop a checkpoint from teachers")
            if cfg.get("teachers")
            else ("teacher.checkpoint is set", "set teacher.checkpoint=null")
        )
        raise KdclError(
            f"{first}={_shown(value)} would change nothing: {loaded}, and a teacher given as weights "
            "is evaluated, not trained",
            fix=f"drop the stages.teacher keys, or {unset} to train the teacher with them",
        )


def _dotted(section: dict[str, Any], prefix: str):
    """``(dotted path, value)`` of every leaf of ``section``."""
    for name, value in section.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{name}.")
        else:
            yield prefix + name, value


def _check_models(cfg: dict[str, Any]) -> None:
    """Every model spec names a known source and, without a prefix, a kdcl model
    (:func:`kdcl.models.model_ref`; nothing is imported or built)."""
    from kdcl.models import model_ref  # heavy: torch and torchvision

    specs = [cfg[role] for role in ("teacher", "student") if isinstance(cfg.get(role), dict) and "name" in cfg[role]]
    if cfg.get("teachers") and isinstance(cfg.get("teacher"), dict):
        specs += teacher_specs(cfg)
    for spec in specs:
        model_ref(spec)


def validate_eval(cfg: Any) -> None:
    """``kdcl eval``'s keys, and its ``dataset`` when one is chosen, against the schema."""
    plain = _container(cfg)
    check({k: v for k, v in plain.items() if k != "dataset"}, EvalConfig)
    if plain.get("dataset") is not None:
        check(plain["dataset"], DatasetConfig, prefix="dataset.")


def _container(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return cfg
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


def _check_names(cfg: dict[str, Any], registries: dict[str, Registry[Any]], prefix: str = "") -> None:
    """Every name a key of ``registries`` gives is in its registry (a key that may also hold
    a list, ``scenario.class_order``, is checked when it holds a name); a mapping names
    entries by its keys (``trainer.mix``: each batch mix's α)."""
    for key, registry in registries.items():  # before any training, not when first used
        value = OmegaConf.select(OmegaConf.create(cfg), key, default=None)
        names = {f"{key}={_shown(value)}": value} if isinstance(value, str) else {}
        if isinstance(value, DictConfig):
            names = {f"{key}.{name}": name for name in map(str, value)}
        for where, name in names.items():
            if name not in registry:
                raise KdclError(
                    f"{prefix}{where} is not a known {registry.kind}", fix=f"choose one of: {', '.join(registry)}"
                )


def check(cfg: dict[str, Any], schema: type, prefix: str = "") -> None:
    """Check plain ``cfg`` against schema class ``schema``: every value's type and range,
    and no key a closed section does not list. Keys absent from ``cfg`` are skipped."""
    for error in _problems(cfg, schema, prefix):
        raise error


def _problems(cfg: dict[str, Any], cls: type, prefix: str):
    keys = entries(cls)
    if not is_open(cls):
        for name in cfg:
            if name not in keys:
                yield unknown_key(prefix + name, _shown(cfg[name]), cls, prefix)
    options = option_keys(cls)
    extra = entries(options) if options else {}
    for name, entry in {**extra, **keys}.items():
        if name not in cfg or cfg[name] == MISSING:
            continue
        value, path = cfg[name], prefix + name
        if is_section(entry.type):
            if not isinstance(value, dict):
                yield KdclError(
                    f"{path}={_shown(value)} is not a mapping", fix=f"{path} must be a mapping of {path}.* keys"
                )
            else:
                yield from _problems(value, entry.type, path + ".")
            continue
        if not is_instance(value, entry.type):
            yield wrong_type(path, value, entry)
        elif entry.check is not None and not _passes(entry.check, value):
            yield out_of_range(path, value, entry)


def _passes(rule: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(rule(value))
    except (TypeError, ValueError, AttributeError, KeyError):
        return False


def wrong_type(path: str, value: Any, entry: Entry) -> KdclError:
    return KdclError(f"{path}={_shown(value)} is not {describe(entry.type)}", fix=f"{path} must be {entry.allowed}")


def out_of_range(path: str, value: Any, entry: Entry) -> KdclError:
    verdict = "is out of range" if is_instance(value, float) else "is not allowed"
    return KdclError(f"{path}={_shown(value)} {verdict}", fix=f"{path} must be {entry.allowed}")


def unknown_key(
    path: str, value: str | None, cls: type | None, prefix: str, known: list[str] | None = None
) -> KdclError:
    """``trainer.epochz=3``: the closest known key, and the section's keys (``known``, else
    the schema's)."""
    section, _, name = path.rpartition(".")
    where = section or "the config"
    known = known if known is not None else list(entries(cls)) if cls is not None else []
    what = f"{path}{'' if value is None else '=' + value}: {where} has no key {name!r}"
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    listing = f"{where} has: {', '.join(known)}" if known else ""
    if cls is not None and is_open(cls):
        listing += f" (a key of another {section} option comes with it: {section}=NAME)"
    why = getattr(cls, "WHY_CLOSED", None)  # a section closed on purpose says why
    return KdclError(what + (f" ({why})" if why else ""), fix=(hint + listing).strip() or None)


def _shown(value: Any) -> str:
    """A value as the user wrote it: null, true, 1.5, 'abc'."""
    if value is None or isinstance(value, bool):
        return OmegaConf.to_yaml({"v": value}).strip()[3:]
    return repr(value)


def composition_error(err: Exception, schema: type) -> KdclError | None:
    """One message for a config Hydra could not compose against ``schema`` (an override
    or a config file setting an unknown key or a value of the wrong type); None for other
    errors, which Hydra reports itself (an unknown option lists the group's options, but
    not an unknown option in a list of options, ``logger=[csv,tensorbord]``: that one is ours)."""
    listed = re.search(r"Could not (?:load|find) '(\w+)/([^']+)'", str(err))
    if listed and option_folder(listed[1]).is_dir():
        try:
            group_option(listed[1], listed[2])
        except KdclError as unknown:
            return unknown
    cause = err.__cause__ or err.__context__
    if not isinstance(cause, (ValidationError, ConfigAttributeError, ConfigKeyError)) or not cause.full_key:
        return None
    text = str(err).splitlines()[0]
    origin = re.match(r"In '([^']+)'", text)
    where = f"{origin.group(1)}.yaml: " if origin else ""
    path = cause.full_key
    if isinstance(cause, ValidationError):
        entry = lookup(schema, path)
        if entry is None:
            return KdclError(where + f"{path}={_shown(cause.value)}: {str(cause.msg).splitlines()[0]}")
        error = wrong_type(path, cause.value, entry)
        return KdclError(where + error.what, fix=error.fix)
    line = re.search(r"use \+(\S.*)$", str(err), re.MULTILINE)
    value = line.group(1).partition("=")[2] if line else None
    section = path.rpartition(".")[0]
    parent = cause.parent_node
    known = [str(k) for k in parent] if isinstance(parent, DictConfig) and not parent._is_missing() else None
    error = unknown_key(path, value, section_type(schema, section), section + "." if section else "", known)
    return KdclError(where + error.what, fix=error.fix)
