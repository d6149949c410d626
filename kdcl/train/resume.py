"""Resuming a stage after a crash, a kill or a signal.

While a stage trains, ``<stage>/resume.pt`` holds everything needed to continue it
exactly: the model, loss (with any adapters), dynamic control, optimizer and LR
schedule states, the data plan, every RNG state, the running epoch sums and where the
stage stood. It is written atomically at the end of every epoch, every
``trainer.checkpoint_every_steps`` steps, and when SIGINT or SIGTERM asks the run to
stop (after the current step). A finished stage leaves ``<stage>/done.json`` instead,
and a re-run skips it.
"""

from __future__ import annotations

import fcntl
import json
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcl import distributed
from kdcl.errors import KdclError
from kdcl.files import open_lock, write_replacing, write_text


@dataclass
class Cursor:
    """Where a stage stands: the epoch in progress and the optimizer steps taken."""

    epoch: int = 1
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    last_epoch: int = 0
    stale: int = 0
    seconds: float = 0.0  # training time spent before this process
    finished: bool = False  # early-stopped or past the last epoch
    ema_best_acc: float = -1.0  # the weight average's (trainer.ema_decay) best validation accuracy
    ema_best_epoch: int = 0


class Interrupted(KdclError):
    """SIGINT/SIGTERM stopped the run after saving; the exit code is 128 + the signal."""

    def __init__(self, signum: int, stage: str, step: int, run_dir: Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped stage {stage} after step {step}; its state is saved in {run_dir / stage / 'resume.pt'}",
            fix=f"run the same command again with hydra.run.dir={run_dir}, or: kdcl train resume={run_dir}",
        )
        self.exit_code = 128 + signum


class _StopRequest:
    signum: int | None = None


STOP = _StopRequest()


@contextmanager
def graceful_stop() -> Iterator[_StopRequest]:
    """Turn SIGINT/SIGTERM into a request the training loop honours after its current
    step; a second SIGINT (Ctrl-C) stops at once. A repeated SIGTERM stays a request: a
    rank of a distributed run may get the scheduler's SIGTERM and torchrun's forwarded one."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(signum: int, frame: Any) -> None:
        STOP.signum = signum
        if signum == signal.SIGINT:
            for s, handler in previous.items():
                signal.signal(s, handler)

    STOP.signum = None
    for s in previous:
        signal.signal(s, request)
    try:
        yield STOP
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- RNG states
def rng_states(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state as plain tensors and lists (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form, of the global MT19937 generator
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_states(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    for k, g in generators.items():
        if k in state["generators"]:  # a state saved before k was part of it leaves k seeded
            g.set_state(state["generators"][k])


# --------------------------------------------------------------------------- files
def save_state(path: Path, state: dict[str, Any]) -> None:
    write_replacing(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any] | None:
    """The saved state of an interrupted stage, or None when there is none."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a state file is always written atomically; anything else is damage
        raise KdclError(
            f"{path} is unreadable ({err})", fix=f"delete {path} to restart that stage from scratch"
        ) from None


def cursor_state(cursor: Cursor) -> dict[str, Any]:
    return asdict(cursor)


def write_done(path: Path, row: dict[str, Any], config: dict[str, Any]) -> None:
    """Mark a stage finished, with its summary row and the config it ran with."""
    write_text(path, json.dumps({"row": row, "config": config}, indent=1, default=float) + "\n")


def read_done(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def check_same_config(found: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    """A stage is only resumed or skipped under the config it was started with."""
    if found == wanted:
        return
    keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    raise KdclError(
        f"{where} was made with a different config (differs in: {', '.join(keys)})",
        fix="use a new hydra.run.dir, or repeat the original overrides to resume it",
    )


RUN_LOCK = ".kdcl-run.lock"  # in a run folder: held by the kdcl train writing into it


@contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s :data:`RUN_LOCK` while a run writes into ``out`` (rank 0 under DDP):
    a second run into the same folder stops at once rather than write over the first's files."""
    if not distributed.is_main():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open_lock(out / RUN_LOCK, "or choose another hydra.run.dir") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KdclError(
                f"another kdcl run is writing into {out}",
                fix="wait for it to end (a run stopped half-way resumes when you run it again), "
                "or choose another hydra.run.dir",
            ) from None
        yield
