"""Sources: the splits the engine iterates, in memory (:class:`TensorSource`) or read per
sample through a ``DataLoader`` (:class:`LoaderSource`), both by batches of example indices."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdcl.data.splits import RawSplit
from kdcl.errors import KdclError

Batch = tuple[Tensor, Tensor, Tensor]  # (example indices, uint8 images, labels)


class Source(Protocol):
    """A split the engine can iterate: ``len``, ``labels`` and index-batch iteration.

    ``batches(index_batches, keys)``: with ``keys`` (one int64 tensor per batch, a number for
    each example of it) the batches are training batches, each example seen through its
    training view of that key where the source draws views per sample (images read per
    sample, :mod:`kdcl.data.views`); without, every example is seen as evaluation sees it."""

    labels: Tensor  # int64 (N,), on CPU
    origin: np.ndarray  # index of every example in the loader's own split
    num_workers: int  # the processes that read it (0: this one)

    def __len__(self) -> int: ...

    def batches(self, index_batches: Iterable[Tensor], keys: Iterable[Tensor] | None = None) -> Iterator[Batch]: ...

    def least_padding(self, idx: Tensor) -> Tensor:
        """``idx`` in the order whose consecutive batches hold the least padding (texts by
        length; anything else as given): for passes whose order does not matter."""
        ...

    def subset(self, positions: np.ndarray, label_map: Tensor) -> Source: ...


class TensorSource:
    """An in-memory split: uint8 images, or token ids, and labels held on the training device.

    Token ids (``lengths``: each text's count of ids before its padding, on the CPU) come
    in batches cut to their longest text: the cut is read from the CPU index batch before it
    goes to the device, so the training step reads nothing back from the device for it."""

    num_workers = 0  # in memory: no worker reads it

    def __init__(self, x: Tensor, y: Tensor, origin: np.ndarray, lengths: Tensor | None = None):
        self.device = x.device
        self.x, self.y = x, y
        self.labels = y.cpu()
        self.origin = origin
        self.lengths = lengths

    @classmethod
    def from_arrays(
        cls, x: np.ndarray, y: np.ndarray, origin: np.ndarray, device: torch.device, pad_id: int | None = None
    ) -> TensorSource:
        """The arrays on ``device``; token ids right-padded with ``pad_id`` keep their lengths."""
        lengths = None if pad_id is None else torch.from_numpy((x != pad_id).sum(1))
        return cls(
            torch.from_numpy(np.ascontiguousarray(x)).to(device),
            torch.from_numpy(y.astype(np.int64)).to(device),
            origin,
            lengths,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Iterable[Tensor], keys: Iterable[Tensor] | None = None) -> Iterator[Batch]:
        """The batches as held: training views are drawn on the device (:class:`kdcl.data.Preprocess`)."""
        for idx in index_batches:
            x = self.x
            if self.lengths is not None and len(idx):
                x = x[:, : max(int(self.lengths[idx.cpu()].max()), 1)]
            idx = idx.to(self.device, non_blocking=True)
            yield idx, x[idx], self.y[idx]

    def least_padding(self, idx: Tensor) -> Tensor:
        """Texts shortest first (stably): each batch is cut to its longest text, so sorted
        batches carry the least padding. Images as given."""
        if self.lengths is None:
            return idx
        return idx[torch.argsort(self.lengths[idx], stable=True)]

    def subset(self, positions: np.ndarray, label_map: Tensor) -> TensorSource:
        """The examples at ``positions``, each label ``y`` replaced by ``label_map[y]``."""
        idx = torch.from_numpy(positions).to(self.device)
        lengths = None if self.lengths is None else self.lengths[torch.from_numpy(positions)]
        return TensorSource(self.x[idx], label_map.to(self.device)[self.y[idx]], self.origin[positions], lengths)


EVALUATION = -1  # the key of an item seen as evaluation sees it


class _Indexed(Dataset):
    """The items of ``dataset`` at ``positions``, addressed as (i, key): item i of the
    split, through its training view ``key`` (a dataset with ``training(i, key)``), or as
    evaluation sees it (key :data:`EVALUATION`, or a dataset without training views)."""

    def __init__(self, dataset: Dataset, positions: np.ndarray):
        self.dataset, self.positions = dataset, positions
        self.training = getattr(dataset, "training", None)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int]:
        i, key = item
        position = int(self.positions[i])
        seen = self.dataset[position] if key == EVALUATION or self.training is None else self.training(position, key)
        image, label = seen
        return image, int(label), i


class _GivenBatches:
    """The batch sampler of a persistent ``DataLoader``: iterating it gives the batches of
    (i, key) items :meth:`give` set last, one iterator shared by every ``iter`` call (a
    loader's first pass calls it twice), exhausted until the next :meth:`give`."""

    def __init__(self) -> None:
        self.pending: Iterator[list[tuple[int, int]]] = iter(())

    def give(self, batches: Iterator[list[tuple[int, int]]]) -> None:
        self.pending = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.pending


class LoaderSource:
    """A split read per sample through a ``DataLoader`` (data too large for memory), decoded
    and viewed in its ``num_workers`` worker processes. The workers persist across epochs and
    stages (one ``DataLoader`` per split, fed each pass's index batches), prefetch
    ``PREFETCH`` batches each and hand over pinned memory when training on a GPU; a pass
    that starts while another is under way on the same split gets a loader of its own.
    ``label_map`` (optional) replaces each label ``y`` the dataset gives by ``label_map[y]``."""

    PREFETCH = 4

    def __init__(
        self,
        dataset: Dataset,
        y: np.ndarray,
        origin: np.ndarray,
        device: torch.device,
        num_workers: int,
        label_map: Tensor | None = None,
    ):
        self.dataset, self.raw_labels, self.label_map = dataset, y, label_map
        self.items = _Indexed(dataset, origin)
        labels = torch.from_numpy(y.astype(np.int64))
        self.labels = labels if label_map is None else label_map[labels]
        self.origin = origin
        self.device = device
        self.num_workers = num_workers
        self.sampler = _GivenBatches()
        self.loader = self._loader(self.sampler, persistent=True)
        self.busy = False

    def _loader(self, sampler: Iterable[list[tuple[int, int]]], persistent: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.items,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=persistent and workers > 0,
            prefetch_factor=self.PREFETCH if workers else None,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Iterable[Tensor], keys: Iterable[Tensor] | None = None) -> Iterator[Batch]:
        keyed = keys if keys is not None else itertools.repeat(None)
        items = (
            list(zip(idx.tolist(), key.tolist() if key is not None else [EVALUATION] * len(idx)))
            for idx, key in zip(index_batches, keyed)
        )
        if self.busy:  # a pass inside a pass of this split: a loader of its own
            loader = self._loader(list(items), persistent=False)
        else:
            self.sampler.give(items)
            loader = self.loader
        self.busy, mine = True, loader is self.loader
        try:
            for x, y, idx in loader:
                y = y if self.label_map is None else self.label_map[y]
                yield (
                    idx.to(self.device, non_blocking=True),
                    x.to(self.device, non_blocking=True),
                    y.to(self.device, non_blocking=True),
                )
        except KdclError as err:
            raise from_worker(err) from None
        finally:
            if mine:
                self.busy = False

    def least_padding(self, idx: Tensor) -> Tensor:
        """Decoded images are all one size: as given."""
        return idx

    def subset(self, positions: np.ndarray, label_map: Tensor) -> LoaderSource:
        """The examples at ``positions``, each label ``y`` replaced by ``label_map[y]``."""
        label_map = label_map.cpu()
        composed = label_map if self.label_map is None else label_map[self.label_map]
        return LoaderSource(
            self.dataset, self.raw_labels[positions], self.origin[positions], self.device, self.num_workers, composed
        )


def from_worker(err: KdclError) -> KdclError:
    """The error a DataLoader worker raised, as raised there: a worker's exception comes back
    rebuilt from its formatted traceback, which would otherwise be the message."""
    if err.fix is not None or "Original Traceback" not in err.what:
        return err
    what, _, fix = err.what.rsplit("KdclError: ", 1)[-1].partition("\n  fix: ")
    return KdclError(what.strip(), fix=fix.strip() or None)


def worker_count(setting: int | str) -> int:
    """``dataset.num_workers``: a count, or ``auto``, the CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if setting == "auto" else int(setting)


def make_source(split: RawSplit, indices: np.ndarray, device: torch.device, num_workers: int) -> Source:
    if split.x is not None:
        pad_id = split.text.pad_id if split.text is not None else None
        return TensorSource.from_arrays(split.x[indices], split.y[indices], indices, device, pad_id)
    assert split.dataset is not None  # a split without x is read per sample
    return LoaderSource(split.dataset, split.y[indices], indices, device, num_workers)
