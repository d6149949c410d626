"""Replayed teacher logits: an online teacher's outputs of a whole stage, kept step by step.

With an online teacher (``distill.teacher_cache=none``) a distill stage runs the teacher on
every augmented batch. Runs that differ only in the loss (its name, α, T, its own keys) feed
their students the same batches, in the same order, with the same augmentation draws, to the
same teacher: the teacher's logits of every step are the same numbers. So the first of them
keeps those logits while it trains (:class:`LogitRecorder`: fp32, on the training device,
each step's rows after the last, with the example index of every row); the stage cache stores
them when the stage has run every step (``cache_teacher_logits_mb``,
:mod:`kdcl.scenarios.stage_cache`), and a later stage trains from them (:class:`LogitReplay`):
it draws the augmentation exactly as online (the student's input is the same), and looks the
teacher's logits up instead of computing them. A replayed stage trains to the same numbers
as an online one; what it saves is the teacher's forward pass, every step.

The replayed rows are checked against the batches the stage actually draws: each step
compares its example indices with the recorded ones on the device (no host sync), and
:meth:`LogitReplay.finish` stops the stage with one message if any step differed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdcl.data import Preprocess, TextPreprocess, step_keys
from kdcl.distill.feeds import Feed
from kdcl.distill.mixing import BatchMix
from kdcl.distributed import Part
from kdcl.errors import KdclError

FILES = ("logits.npy", "index.npy", "offsets.npy")


@dataclass
class TeacherLogits:
    """A stage's teacher logits: ``logits[offsets[s]:offsets[s + 1]]`` are step s's rows,
    ``index`` the example each row is of."""

    logits: Tensor  # (rows, C) float32
    index: Tensor  # (rows,) int64
    offsets: list[int]  # len steps + 1

    @property
    def megabytes(self) -> float:
        return table_mb(len(self.index), self.logits.shape[1])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        for name, value in zip(FILES, (self.logits.cpu(), self.index.cpu(), torch.tensor(self.offsets))):
            np.save(folder / name, value.numpy())

    @classmethod
    def load(cls, folder: Path, device: torch.device) -> TeacherLogits:
        try:
            logits, index, offsets = (np.load(folder / name) for name in FILES)
        except (OSError, ValueError) as err:
            raise KdclError(
                f"the recorded teacher logits in {folder} cannot be read ({err})",
                fix=f"delete {folder.parent} (the next run records them again), or set cache_teacher_logits_mb=0",
            ) from None
        fits = (
            logits.ndim == 2
            and index.ndim == offsets.ndim == 1
            and len(logits) == len(index)
            and len(offsets) > 1
            and offsets[0] == 0
            and offsets[-1] == len(index)
            and bool((np.diff(offsets) >= 0).all())
        )
        if not fits:
            raise KdclError(
                f"the recorded teacher logits in {folder} do not fit together (logits {logits.shape}, "
                f"index {index.shape}, offsets {offsets.shape} from {offsets[:1]} to {offsets[-1:]})",
                fix=f"delete {folder.parent} (the next run records them again), or set cache_teacher_logits_mb=0",
            )
        return cls(torch.from_numpy(logits).to(device), torch.from_numpy(index).to(device), offsets.tolist())


def table_mb(rows: int, num_classes: int) -> float:
    """The size of a table of ``rows`` rows of ``num_classes`` logits (float32) and their indices (int64)."""
    return rows * (4 * num_classes + 8) / 2**20


class LogitRecorder:
    """The online feed, keeping every step's teacher logits while the steps run from step 0
    in order (a stage resumed half-way keeps nothing). ``rows``: at most this many rows in
    all (the stage's steps × its batch size)."""

    def __init__(self, feed: Feed, rows: int, num_classes: int, device: torch.device):
        self.feed, self.teaches = feed, feed.teaches
        self.logits = torch.empty(rows, num_classes, device=device)
        self.index = torch.empty(rows, dtype=torch.long, device=device)
        self.offsets = [0]

    def __call__(
        self,
        step: int,
        epoch: int,
        idx: Tensor,
        x: Tensor,
        y: Tensor,
        part: Part | None = None,
        mix: BatchMix | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        views, logits = self.feed(step, epoch, idx, x, y, part)
        assert logits is not None  # the recorded feed runs a teacher
        start, end = self.offsets[-1], self.offsets[-1] + len(idx)
        if step == len(self.offsets) - 1 and end <= len(self.logits):
            self.logits[start:end] = logits
            self.index[start:end] = idx
            self.offsets.append(end)
        return views, logits

    def view_keys(self, step: int, epoch: int, idx: Tensor) -> Tensor:
        return self.feed.view_keys(step, epoch, idx)

    def finish(self, stage: str, steps: int) -> TeacherLogits | None:
        """The logits of steps 0 … ``steps`` − 1, or None when it did not keep them all."""
        if len(self.offsets) != steps + 1:
            return None
        rows = self.offsets[-1]
        return TeacherLogits(self.logits[:rows], self.index[:rows], self.offsets)


class LogitReplay:
    """The online feed's augmentation with the teacher's logits read from ``table``
    (recorded in ``source``)."""

    teaches = True

    def __init__(self, preprocess: Preprocess | TextPreprocess, table: TeacherLogits, source: str):
        self.preprocess, self.table, self.source = preprocess, table, source
        self.mismatch = torch.zeros((), dtype=torch.bool, device=table.index.device)
        self.misfit = False  # a step with another number of rows than recorded

    def view_keys(self, step: int, epoch: int, idx: Tensor) -> Tensor:
        """The online feed's views: the ones the recorded logits are of."""
        return step_keys(step, len(idx))

    def __call__(
        self,
        step: int,
        epoch: int,
        idx: Tensor,
        x: Tensor,
        y: Tensor,
        part: Part | None = None,
        mix: BatchMix | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        views = self.preprocess.training(x, idx, epoch, part)
        start, end = self.table.offsets[step], self.table.offsets[step + 1]
        recorded = self.table.index[start:end]
        if len(recorded) == len(idx):
            self.mismatch |= (recorded != idx).any()  # on the device: read once, by finish
        else:
            self.misfit = True
        return views, self.table.logits[start:end].clone()  # a copy: nothing downstream may change the table

    def finish(self, stage: str, steps: int) -> None:
        """Stop if a step's examples were not the recorded ones (its logits were another batch's)."""
        if self.misfit or bool(self.mismatch):
            raise KdclError(
                f"stage {stage}: the teacher logits replayed from {self.source} belong to other batches than "
                "the stage drew, so its results are not valid",
                fix="run again with cache_teacher_logits_mb=0 (the teacher runs online every step), and report it",
            )


@dataclass
class ReplaySlot:
    """Where a stage's teacher logits come from or go: ``load()`` gives a recorded table to
    replay (read from ``source``), or None, and then the online feed is recorded, up to
    ``rows`` rows, and handed to ``store`` if the stage runs every step."""

    load: Callable[[], TeacherLogits | None]
    rows: int
    source: str
    store: Callable[[TeacherLogits], None]
    feed: LogitRecorder | LogitReplay | None = None

    def wrap(
        self, online: Feed, preprocess: Preprocess | TextPreprocess, num_classes: int, device: torch.device, steps: int
    ) -> Feed:
        """The stage's feed in place of ``online``: the replay (of the stage's ``steps``
        steps), or ``online`` recorded."""
        table = self.load()
        if table is not None and len(table.offsets) != steps + 1:
            raise KdclError(
                f"the recorded teacher logits in {self.source} hold {len(table.offsets) - 1} steps, "
                f"not the {steps} of this stage",
                fix=f"delete {self.source} (the next run records them again), or set cache_teacher_logits_mb=0",
            )
        if table is not None:
            self.feed = LogitReplay(preprocess, table, self.source)
        else:
            self.feed = LogitRecorder(online, self.rows, num_classes, device)
        return self.feed

    def finish(self, stage: str, steps: int) -> None:
        """After the stage's ``steps`` steps: check a replay, or store a complete recording."""
        table = self.feed.finish(stage, steps) if self.feed is not None else None
        if table is not None:
            self.store(table)
