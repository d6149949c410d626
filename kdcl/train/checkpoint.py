"""Self-describing checkpoints.

A checkpoint holds the weights plus everything needed to rebuild and use the model
without the run that made it: model name and kwargs, number of classes, input shape,
normalisation, class names and the full resolved run config, all plain Python
containers, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcl.config.options import with_base_keys
from kdcl.data import DataBundle, load_data, with_classes
from kdcl.errors import KdclError
from kdcl.files import write_replacing
from kdcl.models import TARGET, build_model
from kdcl.trust import CodePolicy, check_plain_kwargs

FORMAT = "kdcl-checkpoint/1"
NOT_A_CHECKPOINT_FIX = (
    "pass a best.pt or last.pt written by kdcl train, or a state_dict saved with torch.save(model.state_dict(), PATH)"
)


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` to ``path`` atomically (temp file, then rename)."""
    payload = {"format": FORMAT, **meta, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    write_replacing(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load any checkpoint file safely (``weights_only=True``: nothing in it can run code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdclError(f"checkpoint {str(path)!r} does not exist", fix="pass the path of a best.pt or last.pt file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a pickle protocol the safe loader names before refusing it
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0].strip()
        raise KdclError(
            f"{path} is not a kdcl checkpoint nor a state_dict: safe loading refuses what it holds "
            f"({reason or str(err).splitlines()[0]})",
            fix=NOT_A_CHECKPOINT_FIX + "; nothing in this file was run",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise KdclError(
            f"checkpoint {path} is truncated or corrupt ({err})", fix="use another copy of the file"
        ) from None
    except (KeyError, ValueError, UnicodeDecodeError):  # not written by torch.save (a text file, say)
        raise KdclError(
            f"{path} is not a kdcl checkpoint nor a state_dict: it was not written by torch.save",
            fix=NOT_A_CHECKPOINT_FIX,
        ) from None
    if not isinstance(ckpt, dict):
        raise KdclError(
            f"{path} is not a kdcl checkpoint nor a state_dict: it holds a {type(ckpt).__name__}",
            fix=NOT_A_CHECKPOINT_FIX,
        )
    if not is_kdcl(ckpt) and not is_state_dict(ckpt):
        others = [f"{k} ({type(v).__name__})" for k, v in ckpt.items() if not isinstance(v, torch.Tensor)]
        raise KdclError(
            f"{path} is not a kdcl checkpoint nor a state_dict: it holds a dict of {len(ckpt)} entries, "
            f"not all tensors ({', '.join(others[:4])}{' …' if len(others) > 4 else ''})",
            fix=NOT_A_CHECKPOINT_FIX,
        )
    return ckpt


def is_kdcl(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("format") == FORMAT


def is_state_dict(ckpt: dict[str, Any]) -> bool:
    """A plain ``model.state_dict()``: parameter names to tensors."""
    return bool(ckpt) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a kdcl checkpoint safely; every failure is one clear :class:`KdclError`."""
    ckpt = read_checkpoint(path)
    if not is_kdcl(ckpt):
        raise KdclError(f"{path} is not a kdcl checkpoint", fix="pass a best.pt or last.pt written by kdcl train")
    return ckpt


def load_weights(
    model: nn.Module,
    state_dict: dict[str, Any],
    what: str,
    fix: str = "name the model the weights were saved from (and its kwargs / num_classes)",
) -> None:
    """Load ``state_dict`` into ``model``; a mismatch is summarised as expected vs found keys."""
    expected, found = model.state_dict(), state_dict
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" … (+{len(keys) - 4})" if len(keys) > 4 else "")

        parts = [
            f"{len(missing)} missing ({some(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
            f"{len(shapes)} of another shape (file vs model: {some(shapes)})" if shapes else "",
        ]
        raise KdclError(
            f"{what}: the weights do not fit the model — it expects {len(expected)} tensors, the file has "
            f"{len(found)}; " + "; ".join(p for p in parts if p),
            fix=fix,
        )
    model.load_state_dict(state_dict)


def checked_spec(ckpt: dict[str, Any], policy: CodePolicy, where: str | Path) -> dict[str, Any]:
    """The model spec a kdcl checkpoint (the file ``where``) describes, as far as kdcl may
    build it: a ``_target_`` it names only as ``policy`` allows, plain kwargs, and never
    remote code on its word (:mod:`kdcl.trust`)."""
    arch = ckpt.get("model")
    if not (
        isinstance(arch, dict)
        and all(isinstance(arch.get(k), (str, type(None))) for k in ("name", TARGET))
        and (arch.get("name") or arch.get(TARGET))
    ):
        raise KdclError(f"checkpoint {where} does not describe its model", fix=NOT_A_CHECKPOINT_FIX)
    if arch.get(TARGET):
        policy.check_target(arch[TARGET], f"checkpoint {where}")
    kwargs = check_plain_kwargs(arch.get("kwargs") or {}, f"checkpoint {where}")
    return {"name": arch.get("name"), TARGET: arch.get(TARGET), "kwargs": kwargs}


def model_from_checkpoint(ckpt: dict[str, Any], policy: CodePolicy, where: str | Path) -> nn.Module:
    """Rebuild the model a kdcl checkpoint describes (its ``model`` spec: source, name or
    ``_target_``, kwargs; :func:`checked_spec`) and load its weights."""
    spec = checked_spec(ckpt, policy, where)
    model = build_model(spec, ckpt["num_classes"], tuple(ckpt["input_shape"]))
    load_weights(model, ckpt["state_dict"], f"checkpoint of model {spec['name']!r}")
    return model


def load_model(path: str | Path, policy: CodePolicy) -> nn.Module:
    """The model of the kdcl checkpoint ``path`` (:func:`model_from_checkpoint`)."""
    return model_from_checkpoint(load_checkpoint(path), policy, path)


def checkpoint_data(ckpt: dict[str, Any], dataset: dict[str, Any] | None, device: torch.device) -> DataBundle:
    """The data to test a kdcl checkpoint's model on: ``dataset`` (a dataset section), or the
    one it was trained on, always with the checkpoint's normalisation and, for text, its
    tokenizer (the model was trained with them). A class-incremental task's model (its ``classes``) gets the examples of the
    classes it has learnt. The data must fit the model (:func:`check_compatible`)."""
    saved = with_base_keys("dataset", dataset or ckpt["config"]["dataset"])
    tokenizer = {"trained_tokenizer": ckpt["tokenizer"]} if "tokenizer" in ckpt else {}
    data = load_data({**saved, **ckpt["normalization"], **tokenizer}, device, False, 0)
    if "classes" in ckpt:
        data = with_classes(data, ckpt["classes"])
    check_compatible(ckpt, data, "checkpoint")
    return data


def check_compatible(ckpt: dict[str, Any], data: DataBundle, key: str) -> None:
    """A loaded model must match the data's classes and input shape."""
    found = (ckpt["num_classes"], tuple(ckpt["input_shape"]))
    wanted = (data.num_classes, data.input_shape)
    if found != wanted:
        raise KdclError(
            f"{key} was trained for {found[0]} classes on inputs {found[1]} (dataset {ckpt.get('dataset')!r}), "
            f"but dataset {data.name!r} has {wanted[0]} classes and inputs {wanted[1]}",
            fix=f"pass a checkpoint trained on {data.name!r}, or choose the matching dataset",
        )
