"""Readers of the option files in ``conf/``: a group's option by name (alone, or as a whole
section with its group's shared keys), the run's teacher specs, an arm's distill and
curriculum sections, and a distill section split between the loss and the control.

A model option is one file, ``conf/models/NAME.yaml``, and an option of both the ``teacher``
and the ``student`` group (:mod:`kdcl.config.models` offers it to Hydra under both names)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from kdcl.config.schema import ControlConfig, typed
from kdcl.distill.losses import LOSSES
from kdcl.errors import KdclError
from kdcl.models.sources import model_ref


def _conf_dir() -> str:
    """The configs beside this package: the checkout's ``conf/`` when kdcl runs from a
    source tree (editable installs included), the installed ``kdcl.conf`` otherwise."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return str(checkout / "conf")
    return str(resources.files("kdcl.conf"))


CONF_DIR = _conf_dir()

MODEL_GROUPS = ("teacher", "student")  # their options are the files of conf/models/
MODEL_FOLDER = "models"  # not "model": a folder of conf/ is a group, and kdcl eval has a key model
ADDED_GROUPS = ("experiment",)  # groups outside the defaults list, chosen with +GROUP=NAME


def option_folder(group: str) -> Path:
    """The folder of ``group``'s option files: ``conf/models`` for teacher and student,
    ``conf/<group>`` for the others."""
    return Path(CONF_DIR) / (MODEL_FOLDER if group in MODEL_GROUPS else group)


def model_option(name: str) -> dict[str, Any]:
    """The model spec of a model option, ``conf/models/NAME.yaml`` (``cnn_small`` → name cnn, width 8)."""
    return {"pretrained": False, "_target_": None, "trust_remote_code": False, **group_option("teacher", name)}


def arch_label(spec: Mapping[str, Any]) -> str:
    """The model as the summary's ``arch`` column shows it: the name of its option
    (``student=vgg_small``: vgg_small) while the spec builds that option's network (its
    ``name`` and ``kwargs``, no ``_target_``); else, and for an option of the user's own config
    folder, its source and reference (vgg, timm:resnet50: :attr:`kdcl.models.sources.ModelRef.label`)."""
    option = spec.get("option")
    if option and not spec.get("_target_") and (option_folder("teacher") / f"{option}.yaml").is_file():
        chosen = model_option(option)
        if (chosen["name"], chosen.get("kwargs", {})) == (spec.get("name"), spec.get("kwargs", {})):
            return option
    return model_ref(spec).label


def group_option(group: str, name: str) -> dict[str, Any]:
    """The keys of option ``name`` of config group ``group`` (``conf/<group>/<name>.yaml``,
    ``conf/models/<name>.yaml`` for teacher and student), with the keys of the other
    ``conf/base/`` files its defaults list (``/base/image_views@_here_``); an unknown option
    lists the group's options."""
    folder = option_folder(group)
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise unknown_option(group, name)
    option = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    shared = [entry for entry in option.pop("defaults", []) if isinstance(entry, str) and entry.startswith("/base/")]
    for entry in reversed(shared):  # keys shared with options of its kind (/base/image_views@_here_), under its own
        name = entry.removeprefix("/base/").partition("@")[0]
        if name != group:  # the group's own base keys are with_base_keys's
            option = {**cast(dict[str, Any], OmegaConf.to_container(_base(name), resolve=True)), **option}
    return option


def unknown_option(group: str, name: str) -> KdclError:
    """``group`` has no option ``name``: the closest option, and every option, those in
    subfolders too (``+experiment=cifar100/resnet56_resnet20``)."""
    folder = option_folder(group)
    options = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    close = difflib.get_close_matches(name, options, n=1)
    added = "+" if group in ADDED_GROUPS else ""
    guess = f"did you mean {added}{group}={close[0]}? " if close else ""
    return KdclError(
        f"{added}{group}={name}: {group} has no option {name!r}", fix=f"{guess}choose from: {', '.join(options)}"
    )


def section_option(group: str, name: str) -> dict[str, Any]:
    """Option ``name`` of ``group`` as a whole section, as composing ``group=name`` gives
    it: the group's shared keys (``conf/base/<group>.yaml``) overridden by the option's.
    ``section_option("distill", "none")`` is cross-entropy alone, with every control key."""
    return with_base_keys(group, group_option(group, name))


def with_base_keys(group: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` over the shared keys of ``group`` (``conf/base/<group>.yaml``): a section
    saved before a shared key existed (an older checkpoint's dataset) reads as a section
    composed today."""
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.merge(_base(group), section), resolve=True))


def base_keys(group: str) -> list[str]:
    """The keys every option of ``group`` shares (``conf/base/<group>.yaml``)."""
    return list(_base(group))


def _base(group: str) -> DictConfig:
    return cast(DictConfig, OmegaConf.load(Path(CONF_DIR) / "base" / f"{group}.yaml"))


def teacher_specs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's teacher specs: ``teachers`` (model options, conf/models, or specs with
    ``name`` or ``_target_``, ``kwargs``, ``pretrained``, ``checkpoint``) when given, else ``teacher``."""
    entries = cfg.get("teachers")
    if not entries:
        return [cfg["teacher"]]
    common = {"kwargs": {}, "pretrained": False, "_target_": None, "trust_remote_code": False, "checkpoint": None}
    return [{**common, **(group_option("teacher", entry) if isinstance(entry, str) else entry)} for entry in entries]


# The roles of ``stages``: the teachers, and every student stage (baseline, distill, arms,
# born-again generations, assistants), which share one recipe and so one step budget.
TEACHER, STUDENT = "teacher", "student"
RECIPE_GROUPS = ("optimizer", "scheduler")  # sections a stage's recipe may set keys of
RECIPE_TRAINER_KEYS = ("epochs", "batch_size", "label_smoothing")  # trainer keys a stage's recipe may set
# Recipe keys added to ``trainer`` later, with the value a config saved before them trained with.
ADDED_TRAINER_KEYS = {"label_smoothing": 0.0, "mix": {"mixup": 0.0, "cutmix": 0.0}}


def stage_overrides(cfg: dict[str, Any], role: str) -> dict[str, Any]:
    """The keys ``stages.<role>`` sets (its ``optimizer`` and ``scheduler`` keys, its non-null
    ``epochs`` and ``batch_size``); empty in configs saved before ``stages`` existed."""
    own = (cfg.get("stages") or {}).get(role) or {}
    return {k: v for k, v in own.items() if v not in (None, {})}


def stage_recipe(cfg: dict[str, Any], role: str) -> dict[str, Any]:
    """How the stages of ``role`` train: ``optimizer``, ``scheduler``, ``epochs`` and
    ``batch_size``, each the shared setting (``optimizer``, ``scheduler``, ``trainer.*``) with
    the keys of ``stages.<role>`` over it. A ``name`` other than the shared one starts from
    that option's file (``stages.teacher.optimizer.name=adamw``: adamw's lr, betas and weight
    decay), so no key of the shared option leaks into it, as an arm's loss does
    (:func:`arm_config`). Without ``stages`` keys this is the shared settings, value for value."""
    own = stage_overrides(cfg, role)
    recipe = {group: {**recipe_base(cfg, group, own.get(group, {})), **own.get(group, {})} for group in RECIPE_GROUPS}
    shared = {**ADDED_TRAINER_KEYS, **cfg["trainer"]}
    return {**recipe, **{name: own.get(name, shared[name]) for name in RECIPE_TRAINER_KEYS}}


def recipe_base(cfg: dict[str, Any], group: str, keys: Mapping[str, Any]) -> dict[str, Any]:
    """The section a stage's ``keys`` of ``group`` (optimizer or scheduler) go over: the shared
    one, or the option file of the other ``name`` they give; its keys are those they may set."""
    shared = cfg[group]
    name = keys.get("name", shared["name"])
    return shared if name == shared["name"] else group_option(group, name)


def arm_config(cfg: dict[str, Any], arm: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An arm's distill and curriculum: the run's, overridden by the arm. An arm that names
    another loss starts from that loss's option (conf/distill/NAME.yaml, with its alpha and
    temperature) and keeps the run's keys of conf/base/distill.yaml (the schedules, noise,
    teachers and cache), so no key of the run's loss leaks into it."""
    base = {"distill": cfg["distill"], "curriculum": cfg["curriculum"]}
    name = (arm.get("distill") or {}).get("name", cfg["distill"]["name"])
    if name != cfg["distill"]["name"]:
        keys = base_keys("distill")
        shared = {k: v for k, v in cfg["distill"].items() if k in keys}
        base["distill"] = {**shared, **group_option("distill", name)}
    merged = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.merge(base, arm)))
    return merged["distill"], merged["curriculum"]


def control_keys() -> tuple[str, ...]:
    """The keys of ``distill`` that are the control's, not the loss's: :class:`ControlConfig`'s fields."""
    return tuple(f.name for f in dataclasses.fields(ControlConfig))


def distill_parts(distill: Mapping[str, Any], where: str = "distill") -> tuple[dict[str, Any], ControlConfig]:
    """A ``distill`` section split in two: the loss's spec (:func:`loss_spec`) and the
    control's keys, typed."""
    keys = control_keys()
    return loss_spec(distill), typed(ControlConfig, {k: v for k, v in distill.items() if k in keys}, where)


def loss_spec(distill: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`kdcl.distill.losses.create_loss` takes from a ``distill`` section: its
    ``name`` and the loss's own keys. A loss whose constructor names a control key gets that
    key too: ``composed`` takes ``alpha``, the α its weights are given at; each entry of
    composed's ``losses`` starts from its own loss's option file."""
    keys = control_keys()
    declared = inspect.signature(LOSSES.get(distill["name"])).parameters
    loss = {k: v for k, v in distill.items() if k not in keys or k in declared}
    if "losses" in loss:
        loss["losses"] = [{**loss_option(entry["name"]), **entry} for entry in loss["losses"]]
    return loss


def loss_option(name: str) -> dict[str, Any]:
    """The loss spec of ``conf/distill/<name>.yaml``: its ``name`` and its own keys, at the
    option's values (where every loss's defaults live)."""
    return loss_spec(section_option("distill", name))
