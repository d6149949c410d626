"""The ``${kdcl_now:FORMAT}`` resolver: when the run started, the same in every process.

Run and sweep directories are named after the start time. Hydra's own ``${now:...}``
reads each process's clock, so the processes of one distributed run (torchrun starts
them all, and each runs Hydra) would name different directories; ``kdcl_now`` reads the
time that rank 0 announced (:func:`kdcl.distributed.init_from_env` calls :func:`agree`),
and is ``datetime.now()`` in a single process. Registered when ``kdcl`` is imported.
"""

from __future__ import annotations

from datetime import datetime

from omegaconf import OmegaConf

_agreed: datetime | None = None


def agree(start: datetime) -> None:
    """Use ``start`` (rank 0's clock) as the run's start time in this process."""
    global _agreed
    _agreed = start


def now(pattern: str) -> str:
    return (_agreed or datetime.now()).strftime(pattern)


OmegaConf.register_new_resolver("kdcl_now", now, use_cache=True, replace=True)
