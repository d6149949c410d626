"""What every command reads from the Hydra job it runs in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from kdcl.errors import KdclError


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers; a required value left as ``???`` is an error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise KdclError(f"{err.full_key} is required but has no value", fix=f"pass {err.full_key}=VALUE") from None
