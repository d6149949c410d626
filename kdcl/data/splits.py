"""Splits as loaded, and the class-stratified orders and subsets drawn from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from kdcl.data.tokens import TextEncoding


@dataclass
class RawSplit:
    """One split as loaded: labels, plus images in memory (``x``) or a ``dataset``; or
    token ids in memory (``x``) and how they were made (``text``)."""

    y: np.ndarray
    x: np.ndarray | None = None  # uint8 (N, C, H, W); text: int64 ids (N, L)
    dataset: Dataset | None = None  # item i -> (uint8 tensor (C, H, W), label)
    text: TextEncoding | None = None

    def __len__(self) -> int:
        return len(self.y)


def interleave_classes(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Reorder ``order`` so that every prefix holds the classes in their overall proportions,
    keeping each class's own examples in the order they had.

    Each example is keyed by its relative position within its class, ``(k + 0.5) / n_c``
    for the k-th of n_c, and the examples are stably sorted by that key.
    """
    ordered = labels[order]
    position = np.empty(len(order))
    for c in np.unique(labels):
        members = np.flatnonzero(ordered == c)
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    return order[np.argsort(position, kind="stable")]


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A random permutation whose every prefix is a class-stratified subset."""
    return interleave_classes(np.random.default_rng(seed).permutation(len(labels)), labels)


def stratified_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified subset of size ``n`` (all when ``n`` is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    return np.sort(stratified_order(labels, seed)[:n])
