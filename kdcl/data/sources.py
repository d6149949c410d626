"""Sources: the splits the engine iterates, in memory (:class:`TensorSource`) or read per
sample through a ``DataLoader`` (:class:`LoaderSource`), both by batches of example indices."""

from __future__ import annotations

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
    """A split the engine can iterate: ``len``, ``labels`` and index-batch iteration."""

    labels: Tensor  # int64 (N,), on CPU
    origin: np.ndarray  # index of every example in the loader's own split

    def __len__(self) -> int: ...

    def batches(self, index_batches: Iterable[Tensor]) -> Iterator[Batch]: ...

    def subset(self, positions: np.ndarray, label_map: Tensor) -> Source: ...


class TensorSource:
    """An in-memory split: uint8 images and labels held on the training device."""

    def __init__(self, x: Tensor, y: Tensor, origin: np.ndarray):
        self.device = x.device
        self.x, self.y = x, y
        self.labels = y.cpu()
        self.origin = origin

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, origin: np.ndarray, device: torch.device) -> TensorSource:
        return cls(
            torch.from_numpy(np.ascontiguousarray(x)).to(device),
            torch.from_numpy(y.astype(np.int64)).to(device),
            origin,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Iterable[Tensor]) -> Iterator[Batch]:
        for idx in index_batches:
            idx = idx.to(self.device, non_blocking=True)
            yield idx, self.x[idx], self.y[idx]

    def subset(self, positions: np.ndarray, label_map: Tensor) -> TensorSource:
        """The examples at ``positions``, each label ``y`` replaced by ``label_map[y]``."""
        idx = torch.from_numpy(positions).to(self.device)
        return TensorSource(self.x[idx], label_map.to(self.device)[self.y[idx]], self.origin[positions])


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset, positions: np.ndarray):
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        image, label = self.dataset[int(self.positions[i])]
        return image, int(label), i


class LoaderSource:
    """A split read per sample through a ``DataLoader`` (data too large for memory).
    ``label_map`` (optional) replaces each label ``y`` the dataset gives by ``label_map[y]``."""

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

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: Iterable[Tensor]) -> Iterator[Batch]:
        loader = DataLoader(
            self.items,
            batch_sampler=(b.tolist() for b in index_batches),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
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


def make_source(split: RawSplit, indices: np.ndarray, device: torch.device, num_workers: int) -> Source:
    if split.x is not None:
        return TensorSource.from_arrays(split.x[indices], split.y[indices], indices, device)
    return LoaderSource(split.dataset, split.y[indices], indices, device, num_workers)
