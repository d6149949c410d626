"""What every command reads from the Hydra job it runs in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from kdcl.errors import KdclError


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers; a required value left as ``???`` is an error."""
    try:
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except MissingMandatoryValue as err:
        raise KdclError(f"{err.full_key} is required but has no value", fix=f"pass {err.full_key}=VALUE") from None


def swept_values() -> dict[str, Any]:
    """In a job of a sweep (``-m``), the value this job gives each key the sweep varies
    (its sweep overrides in the sweep folder's ``multirun.yaml``), the seed aside (the
    summary has a seed column); ``{}`` in a single run."""
    hc = HydraConfig.get()
    saved = Path(hc.sweep.dir) / "multirun.yaml"
    if hc.mode != RunMode.MULTIRUN or not saved.is_file():
        return {}
    parser = OverridesParser.create()
    sweep = parser.parse_overrides(list(OmegaConf.load(saved).hydra.overrides.task))
    swept = {o.key_or_group for o in sweep if o.is_sweep_override()} - {"seed"}
    job = parser.parse_overrides(list(hc.overrides.task))
    return {o.key_or_group: o.value() for o in job if o.key_or_group in swept}
