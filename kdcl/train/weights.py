"""A trained teacher from a file: ``teacher.checkpoint=PATH``.

PATH is one of the formats of :data:`WEIGHT_FILES`, told apart by what the path is:

- ``torch.save``: a kdcl checkpoint (``best.pt``, which describes its model), or a plain
  ``state_dict`` (``.pt`` / ``.pth``, read with ``weights_only=True``);
- ``safetensors``: a ``.safetensors`` file of tensors;
- ``torchscript``: a ``torch.jit.save`` archive, the network and its weights in one file;
- ``hf_directory``: a Hugging Face model directory (``save_pretrained``: ``config.json``
  and the weights).

A ``state_dict`` or ``.safetensors`` file holds weights alone: the architecture is the
teacher spec's (``teacher.name`` or ``teacher._target_``, and ``teacher.kwargs``), built for
the data's classes and input shape; a key or shape that does not fit is one message,
expected vs found. Each format is an entry registered with the ``matches`` trait, a test
of the path; exactly one format matches any path. Each is called as ``fn(file, spec, data,
key, policy)``: ``policy`` (:class:`kdcl.trust.CodePolicy`) is the code a kdcl
checkpoint may name.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcl.data import DataBundle
from kdcl.errors import KdclError
from kdcl.models import build_model, check_forward, load_hf_directory, model_ref, optional_import
from kdcl.registry import Registry
from kdcl.train.checkpoint import check_compatible, is_kdcl, load_weights, model_from_checkpoint, read_checkpoint
from kdcl.trust import CodePolicy

WEIGHT_FILES: Registry[Callable[[Path, Mapping[str, Any], DataBundle, str, CodePolicy], LoadedTeacher]] = Registry(
    "teacher weights format", traits={"matches": None}
)
register_format = WEIGHT_FILES.register

FORMATS_TEXT = (
    "a kdcl checkpoint (best.pt), a state_dict (.pt/.pth, torch.save(model.state_dict())), "
    "a .safetensors file, a TorchScript file (torch.jit.save) or a Hugging Face model directory (save_pretrained)"
)


@dataclass
class LoadedTeacher:
    """A teacher read from a file, and what its summary row says of it."""

    model: nn.Module
    arch: str
    format: str
    stage: str | None = None
    epoch: int | None = None
    step: int | None = None


def load_teacher(
    path: str | Path, spec: Mapping[str, Any], data: DataBundle, key: str, policy: CodePolicy
) -> LoadedTeacher:
    """The teacher in file ``path`` (``key``: its config key, for messages) for ``data``:
    its format found, its weights loaded, its classes and input shape checked by one
    forward pass; a kdcl checkpoint's ``_target_`` is called only as ``policy`` allows.
    Every problem is one :class:`KdclError`."""
    file = Path(path).expanduser()
    if not file.exists():
        raise KdclError(f"{key}={path}: no such file or directory", fix=f"pass {FORMATS_TEXT}")
    formats = [name for name in WEIGHT_FILES if WEIGHT_FILES.trait(name, "matches")(file)]
    if not formats:
        raise KdclError(f"{key}={path} is a directory without config.json", fix=f"pass {FORMATS_TEXT}")
    loaded = WEIGHT_FILES.get(formats[0])(file, spec, data, key, policy)
    check_forward(loaded.model, data.input_shape, data.num_classes, f"{loaded.arch} ({key}={path})")
    return loaded


def _is_torchscript(file: Path) -> bool:
    """A ``torch.jit.save`` archive: a zip with the program's ``constants.pkl``."""
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _is_torch_save(file: Path) -> bool:
    return file.is_file() and file.suffix != ".safetensors" and not _is_torchscript(file)


def weights_into_spec(state_dict: dict[str, Any], spec: Mapping[str, Any], data: DataBundle, what: str) -> nn.Module:
    """The teacher spec's architecture, built for ``data``, with ``state_dict`` loaded."""
    model = build_model(spec, data.num_classes, data.input_shape, data_kwargs=data.model_kwargs)
    label = model_ref(spec).label
    load_weights(
        model,
        state_dict,
        f"{what} as model {label} for {data.num_classes} classes",
        fix=f"set teacher.name (or teacher._target_) and teacher.kwargs to the architecture the weights were "
        f"saved from, with a head of {data.num_classes} outputs for dataset {data.name!r}",
    )
    return model


@register_format("torch.save", matches=_is_torch_save)
def torch_save_file(
    file: Path, spec: Mapping[str, Any], data: DataBundle, key: str, policy: CodePolicy
) -> LoadedTeacher:
    """A kdcl checkpoint, or a plain ``state_dict`` into the spec's architecture."""
    ckpt = read_checkpoint(file)
    if not is_kdcl(ckpt):
        return LoadedTeacher(weights_into_spec(ckpt, spec, data, str(file)), model_ref(spec).label, "state_dict")
    check_compatible(ckpt, data, key)
    return LoadedTeacher(
        model_from_checkpoint(ckpt, policy, file),
        ckpt["model"]["name"],
        "kdcl checkpoint",
        stage=ckpt.get("stage"),
        epoch=ckpt.get("epoch"),
        step=ckpt.get("step"),
    )


@register_format("safetensors", matches=lambda file: file.is_file() and file.suffix == ".safetensors")
def safetensors_file(
    file: Path, spec: Mapping[str, Any], data: DataBundle, key: str, policy: CodePolicy
) -> LoadedTeacher:
    """A ``.safetensors`` file of tensors into the spec's architecture."""
    safetensors_torch = optional_import("safetensors.torch", f"the weights file {file}")
    try:
        state_dict = safetensors_torch.load_file(str(file), device="cpu")
    except Exception as e:  # safetensors' own error type for a bad header or a truncated file
        raise KdclError(
            f"{key}={file} is not a readable .safetensors file ({e})", fix="use another copy of the file"
        ) from None
    return LoadedTeacher(weights_into_spec(state_dict, spec, data, str(file)), model_ref(spec).label, "safetensors")


@register_format("torchscript", matches=lambda file: file.is_file() and _is_torchscript(file))
def torchscript_file(
    file: Path, spec: Mapping[str, Any], data: DataBundle, key: str, policy: CodePolicy
) -> LoadedTeacher:
    """A TorchScript archive: the network and its weights (its code runs: trust the file)."""
    try:
        model = torch.jit.load(str(file), map_location="cpu")
    except RuntimeError as e:
        raise KdclError(
            f"{key}={file} is a TorchScript archive that cannot be loaded ({str(e).splitlines()[0]})",
            fix="save it again with torch.jit.save(torch.jit.script(model) or torch.jit.trace(model, x), PATH)",
        ) from None
    return LoadedTeacher(model, f"torchscript:{file.name}", "torchscript")


@register_format("hf_directory", matches=lambda file: file.is_dir() and (file / "config.json").is_file())
def hf_directory(file: Path, spec: Mapping[str, Any], data: DataBundle, key: str, policy: CodePolicy) -> LoadedTeacher:
    """A Hugging Face image classifier saved with ``save_pretrained``, its head already for the data."""
    model = load_hf_directory(file, data.num_classes, data.input_shape, spec.get("trust_remote_code") is True)
    return LoadedTeacher(model, f"hf:{file}", "hf_directory")
