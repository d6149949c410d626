"""Distributed data-parallel training (DDP): several processes, one model, one run directory.

Start it with ``torchrun --nproc_per_node=N -m kdcl train ...`` (every process runs the
whole command), or let ``kdcl train trainer.devices=N`` start the N processes itself
(:func:`launch`: torchrun's standalone mode on this machine). Every process (rank) holds
the whole data set, its own copy of the frozen teacher (in eval mode) and a replica of the
model being trained, and takes every decision the same way:

- **Batches.** The curriculum's plan draws the *global* batches on every rank alike —
  ``trainer.batch_size`` examples from the plan's current pool, in the plan's order — and
  rank r trains on positions r, r + N, r + 2N, … of each (:class:`Part`). This is the run's
  distributed sampler: it keeps the curriculum's subset and order exactly, and N processes
  train on the same global batches as one. Augmentation draws its random numbers for the
  whole global batch and keeps this rank's share, so each example is augmented as in one
  process.
- **Gradients.** The model is wrapped in ``DistributedDataParallel``. Each rank's loss is
  its part's sum × N / (global batch size), which DDP's averaging over the N ranks turns
  into the global batch's mean, whatever the parts' sizes (:meth:`Part.mean`). Trainable
  parameters outside the model (adapters of feature losses, CTKD's temperature) have their
  gradients averaged after backward (:func:`average_gradients`).
- **Same decisions everywhere.** BatchNorm running statistics are averaged over the ranks
  before every evaluation (:func:`average_buffers`); evaluation is split across the ranks
  and gathered (:func:`shard`, :func:`gather`), so every rank sees the same validation
  logits and takes the same curriculum, early-stopping and checkpoint decisions. Running
  metrics are summed over the ranks. A stop signal or a non-finite loss on any rank stops
  every rank at the same step.
- **Files.** Only rank 0 writes (checkpoints, tables, resume state, ``done.json``, the
  log and ``.hydra/``); the other ranks read what it wrote after a barrier, so with several
  nodes the run directory (and ``cache_dir``) must be on a filesystem every node sees.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdcl import clock
from kdcl.errors import KdclError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- process group
def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is one rank of a distributed run (the process group is up)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without DDP)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of processes training together (1 without DDP)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints. Known from
    torchrun's environment before the process group is up."""
    return (dist.get_rank() if active() else int(os.environ.get("RANK", "0"))) == 0


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo carries CPU tensors, NCCL
    CUDA ones when there is a GPU. Then take rank 0's clock as the run's start time, so
    every rank names the same run directory (:mod:`kdcl.clock`)."""
    if not dist.is_available() or not dist.is_gloo_available():
        raise KdclError(
            "this PyTorch build has no torch.distributed gloo backend, which distributed runs need",
            fix="install a PyTorch build with distributed support, or run in one process",
        )
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as err:  # rendezvous and network errors
        raise KdclError(
            f"could not join the distributed run ({str(err).splitlines()[0]})",
            fix="check torchrun's --rdzv-endpoint (or MASTER_ADDR / MASTER_PORT) and that every node reaches it",
        ) from None
    start = torch.tensor([datetime.now().timestamp()], dtype=torch.float64)
    dist.broadcast(start, 0)
    clock.agree(datetime.fromtimestamp(start.item()))


def shutdown() -> None:
    """Leave the process group (at the end of the command)."""
    if active():
        dist.destroy_process_group()


def device(chosen: torch.device) -> torch.device:
    """This rank's device: with CUDA, GPU ``LOCAL_RANK`` of its node."""
    if not active() or chosen.type != "cuda":
        return chosen
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if any_rank(int(local >= count)):
        raise KdclError(
            f"more processes per node ({os.environ.get('LOCAL_WORLD_SIZE')}) than GPUs on a node ({count})",
            fix="start one process per GPU (trainer.devices, or torchrun --nproc_per_node), or trainer.device=cpu",
        )
    return torch.device("cuda", local)


# --------------------------------------------------------------------------- checks
def check_processes(devices: int, batch_size: int, batch_key: str = "trainer.batch_size") -> None:
    """Refuse a launch that cannot work: ``trainer.devices`` at odds with torchrun's
    processes, or a global batch (``batch_size``, set by ``batch_key``) smaller than the
    number of processes."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if active() and devices not in (1, per_node):
        raise KdclError(
            f"trainer.devices={devices}, but torchrun started {per_node} process(es) per node",
            fix="leave trainer.devices at 1 under torchrun (--nproc_per_node sets the processes), "
            "or run kdcl without torchrun",
        )
    processes = world() if active() else devices
    if batch_size < processes:
        raise KdclError(
            f"{batch_key}={batch_size} is the global batch, split across {processes} processes: "
            f"it must be at least {processes}",
            fix=f"raise {batch_key} or start fewer processes",
        )


def check_splits(sizes: dict[str, int]) -> None:
    """Every split needs at least one example per rank (evaluation is split across them)."""
    for name, n in sizes.items():
        if n < world():
            raise KdclError(
                f"the {name} split has {n} example(s), fewer than the {world()} processes",
                fix="start fewer processes (trainer.devices, or torchrun --nproc_per_node) or use more data "
                "(dataset.max_train_samples, dataset.max_test_samples)",
            )


def agree_on_run_dir(out: Path) -> None:
    """Check, before anything trains, that every rank sees the files rank 0 writes into
    its run directory ``out``: the same directory, on a filesystem every node mounts."""
    if world() == 1:
        return
    name = from_main(f".kdcl-probe-{uuid.uuid4().hex}")
    if is_main():
        (out / name).touch()
    barrier()
    try:
        with (out / name).open("rb"):
            seen = True
    except OSError:
        seen = False
    unseen = any_rank(int(not seen))
    if is_main():
        (out / name).unlink()
    if unseen:
        raise KdclError(
            f"not every process sees rank 0's run directory {out}",
            fix="pass hydra.run.dir=DIR, the same on every node (not built with ${now:...}), "
            "on a filesystem every node mounts",
        )


# --------------------------------------------------------------------------- a rank's share of a batch
@dataclass(frozen=True)
class Part:
    """This rank's share of one global batch of ``size`` examples: positions
    ``rank, rank + world, …`` (everything in one process)."""

    size: int
    rank: int = 0
    world: int = 1

    def take(self, values: Tensor) -> Tensor:
        """This rank's rows of ``values`` (one row per example of the global batch)."""
        return values if self.world == 1 else values[self.rank :: self.world]

    def mean(self, values: Tensor) -> Tensor:
        """This rank's term of the global batch's mean of per-example ``values``:
        ``Σ_part v · world / size``, which DDP's gradient averaging over the ranks turns into
        ``Σ_all v / size``. In one process, ``values.mean()``."""
        return values.mean() if self.world == 1 else values.sum() * (self.world / self.size)


def parts(batches: list[Tensor]) -> list[Part]:
    """This rank's part of each global batch."""
    return [Part(len(b), rank(), world()) for b in batches]


# --------------------------------------------------------------------------- collectives
def any_rank(value: int) -> int:
    """The largest of every rank's ``value`` (a flag, or a signal number): one small CPU all-reduce."""
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks (in place; ``t`` itself in one process)."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def all_max(t: Tensor) -> Tensor:
    """``t``'s elementwise maximum over the ranks (in place)."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_values(*values: float) -> list[float]:
    """Plain numbers summed over the ranks."""
    if world() == 1:
        return list(values)
    return all_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (after rank 0 wrote files the others will read)."""
    if world() > 1:
        dist.barrier()


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average over the ranks the gradients of trainable parameters that live outside the
    DDP-wrapped model (every rank has the same set with gradients)."""
    if world() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = all_sum(torch.cat([g.reshape(-1) for g in grads])) / world()
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))


def average_buffers(model: nn.Module) -> None:
    """Average BatchNorm running statistics over the ranks (each rank's come from its
    parts of the batches), so every replica evaluates the same model."""
    if world() == 1:
        return
    stats = [
        buf
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var)
        if buf is not None
    ]
    if stats:
        flat = all_sum(torch.cat([b.reshape(-1) for b in stats])) / world()
        for b, v in zip(stats, flat.split([b.numel() for b in stats])):
            b.copy_(v.view_as(b))


def wrap(model: nn.Module) -> nn.Module:
    """``model`` inside ``DistributedDataParallel`` (``model`` itself in one process). DDP
    starts every replica from rank 0's weights; buffers are not broadcast at every step
    (:func:`average_buffers` syncs them before evaluation)."""
    if world() == 1:
        return model
    ddp = nn.parallel.DistributedDataParallel
    dev = next(model.parameters()).device
    no_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else {"broadcast_buffers": False}
    )  # its name in older PyTorch
    return ddp(model, device_ids=[dev.index] if dev.type == "cuda" else None, **no_sync)


def shard(n: int) -> Tensor:
    """The positions ``0 … n − 1`` this rank evaluates: one contiguous chunk per rank."""
    return torch.arange(n).tensor_split(world())[rank()]


def gather(local: Tensor, n: int) -> Tensor:
    """Every rank's rows for its :func:`shard` of ``n`` positions, concatenated in position order."""
    if world() == 1:
        return local
    sizes = [len(chunk) for chunk in torch.arange(n).tensor_split(world())]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:k] for piece, k in zip(pieces, sizes)])


# --------------------------------------------------------------------------- trainer.devices
@contextmanager
def _quiet_torchrun() -> Iterator[None]:
    """Silence torchrun's own log lines (rendezvous details, ``OMP_NUM_THREADS``, the
    failure summary): the ranks print what went wrong. Restore its signal handlers after."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.distributed")
    ] + [logging.getLogger("torch.distributed")]
    levels = [lg.level for lg in loggers]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for s, handler in handlers.items():
            signal.signal(s, handler)


def launch(processes: int, args: list[str]) -> int:
    """Run ``python -m kdcl ARGS`` as ``processes`` ranks on this machine (torchrun's
    standalone mode: a free local port, one rank per process) and wait for them.

    Returns 0, or the exit code of the run: rank 0's when it failed, else the first
    failed rank's (128 + N for a signal N). SIGINT or SIGTERM sent to this process is
    passed on to the ranks once, and they stop after their current step (saving their
    state) as a single process does.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    with _quiet_torchrun():
        try:
            run(parse_args(["--standalone", f"--nproc_per_node={processes}", "-m", "kdcl", *args]))
        except ChildFailedError as err:
            failure = err.failures.get(0) or min(err.failures.values(), key=lambda f: f.timestamp)
            return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        except SignalException as err:
            return 128 + int(err.sigval)
    return 0
