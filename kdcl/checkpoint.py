"""Self-describing checkpoints.

A checkpoint holds the weights plus everything needed to rebuild and use the model
without the run that made it: model name and kwargs, number of classes, input shape,
normalisation, class names and the full resolved run config, all plain Python
containers, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcl.errors import KdclError
from kdcl.models import create_model

FORMAT = "kdcl-checkpoint/1"


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` to ``path`` atomically (temp file, then rename)."""
    payload = {"format": FORMAT, **meta, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a kdcl checkpoint safely; every failure is one clear :class:`KdclError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdclError(f"checkpoint {str(path)!r} does not exist", fix="pass the path of a best.pt or last.pt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise KdclError(
            f"checkpoint {path} holds objects that safe loading refuses ({str(err).splitlines()[0]})",
            fix="only load checkpoints written by kdcl, or re-save the file as plain tensors",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise KdclError(f"checkpoint {path} is truncated or corrupt ({err})", fix="use another copy of the file") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise KdclError(f"{path} is not a kdcl checkpoint", fix="pass a best.pt or last.pt written by kdcl train")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights."""
    arch = ckpt["model"]
    model = create_model(arch["name"], ckpt["num_classes"], tuple(ckpt["input_shape"]), **arch["kwargs"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise KdclError(f"checkpoint weights do not fit model {arch['name']!r}: {str(err).splitlines()[0]}") from None
    return model
