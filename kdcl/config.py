"""Checks on a composed config that Hydra's own composition cannot express."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from kdcl.errors import KdclError


def _conf_dir() -> str:
    """The configs beside this package: the checkout's ``conf/`` when kdcl runs from a
    source tree (editable installs included), the installed ``kdcl.conf`` otherwise."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return str(checkout / "conf")
    return str(resources.files("kdcl.conf"))


CONF_DIR = _conf_dir()


def model_option(name: str) -> dict[str, Any]:
    """The model spec of a ``conf/teacher`` option (``cnn_small`` → name cnn, width 8)."""
    return {"pretrained": False, **group_option("teacher", name)}


# key -> (is the value allowed?, what is allowed); keys absent from a config are skipped.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "cache": (lambda v: isinstance(v, bool), "true or false"),
    "distill.alpha": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "distill.temperature": (lambda v: v > 0, "a number > 0"),
    "distill.teacher_noise": (lambda v: v >= 0, "a number ≥ 0"),
    "distill.input_noise": (lambda v: v >= 0, "a number ≥ 0"),
    "born_again.generations": (lambda v: isinstance(v, int) and v >= 0, "an integer ≥ 0"),
    "dataset.val_fraction": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "dataset.test_fraction": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "dataset.max_train_samples": (lambda v: v is None or v >= 1, "null or an integer ≥ 1"),
    "dataset.max_test_samples": (lambda v: v is None or v >= 1, "null or an integer ≥ 1"),
    "trainer.epochs": (lambda v: isinstance(v, int) and v >= 1, "an integer ≥ 1"),
    "trainer.batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer ≥ 1"),
    "trainer.devices": (lambda v: isinstance(v, int) and v >= 1, "an integer ≥ 1 (processes on this machine)"),
    "optimizer.lr": (lambda v: v > 0, "a number > 0"),
    "curriculum.pacing.start": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "curriculum.pacing.full_at": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "curriculum.adaptive_delta": (lambda v: v is None or v >= 0, "null or a number ≥ 0"),
    "curriculum.weight_start": (lambda v: v is None or 0 <= v <= 1, "null or a number in [0, 1]"),
    "curriculum.lambda_start": (lambda v: v > 0, "a number > 0"),
    "curriculum.mu": (lambda v: v > 0, "a number > 0"),
    "curriculum.weights": (lambda v: v in ("hard", "soft"), "hard or soft"),
    "curriculum.start_classes": (lambda v: isinstance(v, int) and v >= 1, "an integer ≥ 1"),
    "curriculum.add_classes": (lambda v: isinstance(v, int) and v >= 1, "an integer ≥ 1"),
    "curriculum.every_epochs": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or an integer ≥ 1"),
    "curriculum.threshold": (lambda v: v is None or 0 <= v <= 1, "null or a number in [0, 1]"),
    "teacher.route_points": (lambda v: isinstance(v, int) and v >= 0, "an integer ≥ 0"),
}


def _registered_names() -> dict[str, Any]:
    """Config keys that name a registry entry, and the registry (imported lazily: heavy)."""
    from kdcl.curricula import ORDERS, PACINGS, PLANS, SCORERS
    from kdcl.data import DATASETS
    from kdcl.dynamic import SAMPLE_WEIGHTS
    from kdcl.losses import LOSSES
    from kdcl.models import MODELS
    from kdcl.optim import OPTIMIZERS, SCHEDULES

    return {
        "teacher.name": MODELS, "student.name": MODELS, "dataset.name": DATASETS, "distill.name": LOSSES,
        "distill.sample_weight": SAMPLE_WEIGHTS, "distill.alpha_schedule": SCHEDULES,
        "distill.temperature_schedule": SCHEDULES, "curriculum.type": PLANS, "curriculum.scorer": SCORERS,
        "curriculum.order": ORDERS, "curriculum.pacing.name": PACINGS, "optimizer.name": OPTIMIZERS,
        "scheduler.name": SCHEDULES,
    }


def validate(cfg: Any) -> None:
    """Raise one :class:`KdclError` naming the first key whose value is out of range or unknown."""
    for key, (allowed, text) in _RULES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__":
            continue
        try:
            ok = allowed(value)
        except TypeError:
            ok = False
        if not ok:
            raise KdclError(f"{key}={value!r} is out of range", fix=f"{key} must be {text}")
    if OmegaConf.select(cfg, "distill.teacher_route") and not OmegaConf.select(cfg, "teacher.route_points"):
        raise KdclError("distill.teacher_route=true needs checkpoints saved during teacher training",
                        fix="set teacher.route_points=N (N ≥ 1) and train the teacher in this run")
    for key, registry in _registered_names().items():  # before any training, not when first used
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in registry:
            raise KdclError(f"{key}={value!r} is not a known {registry.kind}", fix=f"choose one of: {', '.join(registry)}")


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdclError("trainer.device=cuda but no CUDA GPU is available", fix="use trainer.device=auto or cpu")
    return device


def group_option(group: str, name: str) -> dict[str, Any]:
    """The keys of option ``name`` of config group ``group`` (``conf/<group>/<name>.yaml``,
    without its defaults list); an unknown option lists the group's options."""
    folder = Path(CONF_DIR) / group
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise KdclError(f"{group} has no option {name!r}",
                        fix=f"choose from: {', '.join(sorted(p.stem for p in folder.glob('*.yaml')))}")
    option = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    option.pop("defaults", None)
    return option
