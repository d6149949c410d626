"""Checks of loaded data, run before anything trains: a problem is one :class:`KdclError`.
Also the conversion of loaded image arrays to (N, C, H, W) (:func:`to_nchw`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kdcl.data.splits import RawSplit
from kdcl.errors import KdclError


def abbreviated(values: Iterable[Any], limit: int = 6) -> str:
    """The first ``limit`` values, comma-separated, and how many more there are (for messages)."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" … (+{len(values) - limit})" if len(values) > limit else "")


def check_arrays(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Images ``x`` and labels ``y`` read from ``name`` must pair up: one integer label per
    image. Returns the labels as int64."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise KdclError(
            f"{name}: y must be one label per image (shape (N,)), found shape {y.shape}",
            fix="store y as a 1-D array of class indices 0..C-1",
        )
    if len(x) != len(y):
        raise KdclError(
            f"{name}: x holds {len(x)} images but y holds {len(y)} labels",
            fix="store exactly one label in y for each image in x",
        )
    whole = y.dtype.kind in "biu" or (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    if not whole:
        bad = y if y.dtype.kind != "f" else y[~(np.isfinite(y) & (y == np.round(y)))]
        raise KdclError(
            f"{name}: labels must be integer class indices, found {y.dtype} labels such as {abbreviated(np.unique(bad), 3)}",
            fix="store y as integers 0..C-1 (one per class)",
        )
    return y.astype(np.int64)


def check_labels(name: str, train_y: np.ndarray, test_y: np.ndarray, class_names: Sequence[str]) -> None:
    """Labels are class indices 0..C−1 (C: the number of class names), and every class the
    test split has is one the training split has."""
    c = len(class_names)
    for split, y in (("train", train_y), ("test", test_y)):
        bad = np.unique(y[(y < 0) | (y >= c)])
        if len(bad):
            raise KdclError(
                f"dataset {name!r}: the {split} split has labels {abbreviated(bad)} outside 0..{c - 1} "
                f"(the dataset has {c} classes: {abbreviated(class_names)})",
                fix="store labels as class indices 0..C-1, with one class name per class (dataset.class_names)",
            )
    unseen = np.setdiff1d(np.unique(test_y), np.unique(train_y))
    if len(unseen):
        raise KdclError(
            f"dataset {name!r}: the test split has classes the training split never has: "
            f"{abbreviated(class_names[k] for k in unseen)} ({len(unseen)} of {c})",
            fix="add training examples of those classes, or remove them from the test split",
        )


def image_shape(split: RawSplit) -> tuple[int, ...]:
    """(C, H, W) of a split's images (its first image, when read per sample)."""
    if split.x is not None:
        return tuple(int(s) for s in split.x.shape[1:])
    assert split.dataset is not None  # a split without x is read per sample
    return tuple(int(s) for s in split.dataset[0][0].shape) if len(split.y) else ()


def check_shapes(name: str, train_shape: Sequence[int], test_shape: Sequence[int]) -> None:
    """Train and test images have the same channels and size."""
    if train_shape and test_shape and tuple(train_shape) != tuple(test_shape):
        raise KdclError(
            f"dataset {name!r}: train images are {_shape(train_shape)} but test images are {_shape(test_shape)}",
            fix="store both splits at the same size and number of channels",
        )


def _shape(shape: Sequence[int]) -> str:
    c, h, w = shape
    return f"{h}×{w} with {c} channel{'s' if c != 1 else ''}"


def check_carve(
    cfg: dict[str, Any], labels: np.ndarray, pool: np.ndarray, train_idx: np.ndarray, class_names: Sequence[str]
) -> None:
    """Every class of the training data keeps at least one example to train on.

    The validation carve takes the first ``val_fraction`` of :func:`stratified_order`, which
    spreads each class evenly along the order: a class of n examples gives about
    ``val_fraction``·n of them to validation, and a class of one example goes wholly to one
    side. A class the carve (or ``max_train_samples`` before it) leaves without a training
    example would be validated and tested but never trained on.
    """
    kept = np.bincount(labels[train_idx], minlength=len(class_names))
    for k in np.unique(labels):
        if kept[k]:
            continue
        n, m = int(np.sum(labels == k)), int(np.sum(labels[pool] == k))
        plural = "s" if n != 1 else ""
        subset = cfg["max_train_samples"]
        what = f"dataset {cfg['name']!r}: class {class_names[k]!r} has {n} training example{plural}"
        if m < n:
            what += f", dataset.max_train_samples={subset} keeps {m or 'none'} of them"
        if m:
            what += f", and the validation carve (dataset.val_fraction={cfg['val_fraction']}) takes all {m}"
        raise KdclError(
            what + ": none is left to train on",
            fix=f"give class {class_names[k]!r} more training examples (at least 2: one to train on, one to "
            "validate with), lower dataset.val_fraction" + (" or raise dataset.max_train_samples" if m < n else ""),
        )


def to_nchw(x: np.ndarray) -> np.ndarray:
    """uint8 images as (N, H, W) or (N, H, W, C) → (N, C, H, W)."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise KdclError(f"images must be uint8, found {x.dtype}", fix="store x as uint8 0..255")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x.transpose(0, 3, 1, 2)
    raise KdclError(f"images must be N×H×W or N×H×W×C, found shape {x.shape}")
