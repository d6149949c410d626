"""Checks on a composed config that Hydra's own composition cannot express."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from kdcl.cli import CONF_DIR
from kdcl.errors import KdclError

# key -> (is the value allowed?, what is allowed); keys absent from a config are skipped.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
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
    "optimizer.lr": (lambda v: v > 0, "a number > 0"),
    "curriculum.pacing.start": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "curriculum.pacing.full_at": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
}


def validate(cfg: Any) -> None:
    """Raise one :class:`KdclError` naming the first key whose value is out of range."""
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
