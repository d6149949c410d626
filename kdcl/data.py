"""Datasets, splits and the batch path.

Every dataset loader returns a train and a test :class:`RawSplit`. Data that fits in
memory is held as one uint8 tensor (N, C, H, W) on the training device; a batch is a
tensor of example indices gathered in one indexing op, then augmented and normalised
as a batch on the device (:class:`Preprocess`). Data that does not fit stays a torch
``Dataset`` read through a ``DataLoader`` fed with the same index batches, so
curricula (subsets and orders of indices) work the same on both paths.

The validation split is carved from train (class-stratified, ``dataset.split_seed``);
it drives model selection. The test split is used for the final numbers only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdcl.distributed import Part
from kdcl.errors import KdclError
from kdcl.registry import Registry

log = logging.getLogger(__name__)

DATASETS = Registry("dataset")
register_dataset = DATASETS.register

Batch = tuple[Tensor, Tensor, Tensor]  # (example indices, uint8 images, labels)


# --------------------------------------------------------------------------- splits
@dataclass
class RawSplit:
    """One split as loaded: labels, plus images in memory (``x``) or a ``dataset``."""

    y: np.ndarray
    x: np.ndarray | None = None  # uint8 (N, C, H, W)
    dataset: Dataset | None = None  # item i -> (uint8 tensor (C, H, W), label)

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


# --------------------------------------------------------------------------- sources
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
                yield idx.to(self.device), x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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


# --------------------------------------------------------------------------- preprocessing
@dataclass
class Augment:
    """Per-example augmentation parameters: crop offsets into the padded image and a flip."""

    dy: Tensor  # int64 (B,), 0 .. 2·padding
    dx: Tensor
    mirror: Tensor  # bool (B,)

    def take(self, part: Part) -> Augment:
        """The parameters of this rank's share of the batch (:class:`kdcl.distributed.Part`)."""
        return Augment(part.take(self.dy), part.take(self.dx), part.take(self.mirror))


PADDINGS = Registry("crop padding mode")


@dataclass(frozen=True)
class Padding:
    """A crop padding mode: ``pad(x, p, black)`` pads a normalised batch by ``p`` pixels
    (``black``: the normalised value of a 0 pixel, per channel), and ``torchvision(mean)``
    gives ``torchvision.transforms.RandomCrop``'s keywords for the same border on uint8
    images (``mean`` on the [0, 1] scale), for reference loops built on torchvision.
    ``mirrors``: the border is the image mirrored, so it is narrower than the image."""

    pad: Callable[[Tensor, int, Tensor], Tensor]
    torchvision: Callable[[Sequence[float]], dict[str, Any]]
    mirrors: bool = False


PADDINGS.register("reflect")(
    Padding(
        # Mirror about the border without repeating the edge pixel (airbench's augmentation): no artificial edge.
        pad=lambda x, p, black: torch.nn.functional.pad(x, (p, p, p, p), mode="reflect"),
        torchvision=lambda mean: {"padding_mode": "reflect"},
        mirrors=True,
    )
)
PADDINGS.register("mean")(
    Padding(
        # The dataset's mean colour: 0 after normalisation (torchvision: the nearest uint8 colour).
        pad=lambda x, p, black: constant_padding(x, p, torch.zeros_like(black)),
        torchvision=lambda mean: {"fill": tuple(round(255 * m) for m in mean)},
    )
)
PADDINGS.register("zeros")(
    Padding(
        # Black pixels, torchvision RandomCrop(padding=p)'s default.
        pad=lambda x, p, black: constant_padding(x, p, black),
        torchvision=lambda mean: {"fill": 0},
    )
)


def constant_padding(x: Tensor, p: int, fill: Tensor) -> Tensor:
    """``x`` (N, C, H, W) inside a border of ``p`` pixels of the colour ``fill`` (1, C, 1, 1)."""
    n, c, h, w = x.shape
    padded = fill.to(x.dtype).expand(n, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p : p + h, p : p + w] = x
    return padded


def check_padding(mode: str, crop_padding: int, input_shape: Sequence[int]) -> None:
    """A mirroring mode (``reflect``) mirrors at most H − 1 (W − 1) pixels: refuse a larger
    padding before training."""
    h, w = input_shape[-2:]
    if PADDINGS.get(mode).mirrors and crop_padding >= min(h, w):
        other = next(name for name in PADDINGS if not PADDINGS.get(name).mirrors)
        raise KdclError(
            f"dataset.crop_padding={crop_padding} cannot be reflected in {h}×{w} images "
            f"({mode} padding needs crop_padding < {min(h, w)})",
            fix=f"lower dataset.crop_padding below {min(h, w)} or set dataset.crop_padding_mode={other}",
        )


class Preprocess:
    """uint8 batch → normalised float batch, with batched random crop and flip in training.

    Crop: pad the normalised image by ``crop_padding`` pixels (``padding_mode``, one of
    :data:`PADDINGS`: ``reflect``, ``mean`` or ``zeros``) and cut an H×W window per example
    at offset (dy, dx). Flip: mirror an example horizontally. Training draws the parameters
    per example (:meth:`sample`: offsets uniform, flip with probability 1/2) from a seeded
    generator on the data's device; :meth:`apply` takes given parameters, so fixed views
    (``distill.teacher_cache=views:K``) are the same pixels every time. Under DDP (``part``:
    this rank's share of a global batch) the parameters are drawn for the whole global
    batch and this rank keeps its share, so every example is augmented as in one process
    and every rank's generator stays in the same state.
    """

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        crop_padding: int,
        flip: bool,
        device: torch.device,
        channels_last: bool,
        seed: int,
        padding_mode: str = "reflect",
    ):
        shape = (1, len(mean), 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(shape) * 255)
        self.black = -self.mean * self.inv_std  # a 0 pixel, normalised: the zeros padding's colour
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.pad = PADDINGS.get(padding_mode).pad
        self.flip = flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def augments(self) -> bool:
        return bool(self.crop_padding or self.flip)

    def __call__(self, x: Tensor, train: bool, part: Part | None = None) -> Tensor:
        if train and self.augments:
            part = part or Part(len(x))
            return self.apply(x, self.sample(part.size, self.generator).take(part))
        return self.normalize(x)

    def sample(self, n: int, generator: torch.Generator) -> Augment:
        """Random parameters for ``n`` examples (the flips are drawn before the offsets)."""
        device = generator.device
        mirror = (
            torch.rand(n, device=device, generator=generator) < 0.5
            if self.flip
            else torch.zeros(n, dtype=torch.bool, device=device)
        )
        span = 2 * self.crop_padding + 1
        dy, dx = (
            torch.randint(0, span, (2, n), device=device, generator=generator)
            if self.crop_padding
            else torch.zeros(2, n, dtype=torch.long, device=device)
        )
        return Augment(dy, dx, mirror)

    def apply(self, x: Tensor, aug: Augment) -> Tensor:
        """Normalise ``x``, then crop and flip it as ``aug`` says."""
        x = self.scale(x)
        if self.crop_padding:
            x = self._crop(x, aug.dy, aug.dx)
        if self.flip:
            x = torch.where(aug.mirror.view(-1, 1, 1, 1), x.flip(3), x)
        return x.contiguous(memory_format=self.memory_format)

    def normalize(self, x: Tensor) -> Tensor:
        """``(x/255 − mean) / std`` per channel, in the configured memory format."""
        return self.scale(x).contiguous(memory_format=self.memory_format)

    def scale(self, x: Tensor) -> Tensor:
        """``(x/255 − mean) / std`` per channel."""
        return (x.float() - self.mean) * self.inv_std

    def _crop(self, x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
        n, _, h, w = x.shape
        padded = self.pad(x, self.crop_padding, self.black)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        return padded[batch, chans, rows, cols]


# --------------------------------------------------------------------------- bundle
@dataclass
class DataBundle:
    """Everything a stage needs to know about the data."""

    name: str
    train: Source
    val: Source
    test: Source
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    preprocess: Preprocess
    class_ids: list[int] | None = None  # the dataset's class of each label (None: label = class)


def class_map(classes: Sequence[int], num_classes: int) -> Tensor:
    """label → its position in ``classes``, −1 for a label not in it."""
    mapping = torch.full((num_classes,), -1, dtype=torch.long)
    mapping[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    return mapping


def with_classes(data: DataBundle, classes: Sequence[int], train: np.ndarray | None = None) -> DataBundle:
    """``data`` restricted to the labels ``classes``, relabelled by position in ``classes``
    (``classes[k]`` becomes label k), so that a model with ``len(classes)`` outputs trains
    and tests on them (class-incremental tasks, and ``kdcl eval`` of such a model).

    Test keeps every example of ``classes``. ``train`` (positions in ``data.train``) keeps
    those training examples instead of all of ``classes``', and validation then keeps the
    classes they are of.
    """
    mapping = class_map(classes, data.num_classes)
    if train is None:
        train = np.flatnonzero((mapping[data.train.labels] >= 0).numpy())

    def keep(source: Source, labels: Sequence[int]) -> Source:
        return source.subset(np.flatnonzero(np.isin(source.labels.numpy(), labels)), mapping)

    ids = data.class_ids or list(range(data.num_classes))
    trained = np.unique(data.train.labels.numpy()[train])
    return replace(
        data,
        train=data.train.subset(train, mapping),
        val=keep(data.val, trained),
        test=keep(data.test, classes),
        num_classes=len(classes),
        class_names=[data.class_names[c] for c in classes],
        class_ids=[ids[c] for c in classes],
    )


def load_data(cfg: dict[str, Any], device: torch.device, channels_last: bool, seed: int) -> DataBundle:
    """Load ``cfg["name"]``, carve the validation split and build the sources."""
    loader = DATASETS.get(cfg["name"])
    train, test, class_names = loader(cfg)
    check_labels(cfg["name"], train.y, test.y, class_names)
    input_shape = image_shape(train)
    check_shapes(cfg["name"], input_shape, image_shape(test))
    split_seed = cfg["split_seed"]
    pool = stratified_subset(train.y, cfg["max_train_samples"], split_seed)
    order = stratified_order(train.y[pool], split_seed)
    n_val = int(round(len(pool) * cfg["val_fraction"]))
    val_idx, train_idx = np.sort(pool[order[:n_val]]), np.sort(pool[order[n_val:]])
    test_idx = stratified_subset(test.y, cfg["max_test_samples"], split_seed)
    for split_name, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx)):
        if len(idx) == 0:
            raise KdclError(
                f"the {split_name} split of dataset {cfg['name']!r} is empty",
                fix="raise dataset.max_train_samples / dataset.max_test_samples or lower dataset.val_fraction",
            )
    check_carve(cfg, train.y, pool, train_idx, class_names)
    num_workers = cfg["num_workers"]
    mean, std = cfg["mean"], cfg["std"]
    if mean is None or std is None:
        mean, std = channel_stats(train, train_idx)
    num_classes = len(class_names)
    padding_mode = cfg["crop_padding_mode"]
    check_padding(padding_mode, cfg["crop_padding"], input_shape)
    return DataBundle(
        name=cfg["name"],
        train=make_source(train, train_idx, device, num_workers),
        val=make_source(train, val_idx, device, num_workers),
        test=make_source(test, test_idx, device, num_workers),
        num_classes=num_classes,
        class_names=list(class_names),
        input_shape=input_shape,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        preprocess=Preprocess(mean, std, cfg["crop_padding"], cfg["flip"], device, channels_last, seed, padding_mode),
    )


# --------------------------------------------------------------------------- checks
# Each loaded dataset is checked before anything trains: a problem is one KdclError.


def _some(values: Iterable[Any], limit: int = 6) -> str:
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
            f"{name}: labels must be integer class indices, found {y.dtype} labels such as {_some(np.unique(bad), 3)}",
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
                f"dataset {name!r}: the {split} split has labels {_some(bad)} outside 0..{c - 1} "
                f"(the dataset has {c} classes: {_some(class_names)})",
                fix="store labels as class indices 0..C-1, with one class name per class (dataset.class_names)",
            )
    unseen = np.setdiff1d(np.unique(test_y), np.unique(train_y))
    if len(unseen):
        raise KdclError(
            f"dataset {name!r}: the test split has classes the training split never has: "
            f"{_some(class_names[k] for k in unseen)} ({len(unseen)} of {c})",
            fix="add training examples of those classes, or remove them from the test split",
        )


def image_shape(split: RawSplit) -> tuple[int, ...]:
    """(C, H, W) of a split's images (its first image, when read per sample)."""
    if split.x is not None:
        return tuple(int(s) for s in split.x.shape[1:])
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


def channel_stats(split: RawSplit, indices: np.ndarray, limit: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale, from up to ``limit`` training images."""
    idx = indices[:limit]
    x = split.x[idx] if split.x is not None else np.stack([split.dataset[int(i)][0].numpy() for i in idx])
    x = x.astype(np.float64) / 255
    std = x.std(axis=(0, 2, 3))
    return x.mean(axis=(0, 2, 3)).tolist(), np.where(std > 0, std, 1.0).tolist()


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


# --------------------------------------------------------------------------- loaders
@register_dataset("digits")
def digits(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes).

    There is no official test split: ``dataset.test_fraction`` of the data is carved
    off, stratified, with ``dataset.split_seed``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.clip(np.rint(bunch.images * 255 / 16), 0, 255).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    order = stratified_order(y, cfg["split_seed"])
    n_test = int(round(len(y) * cfg["test_fraction"]))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return RawSplit(y[train], x[train]), RawSplit(y[test], x[test]), [str(c) for c in range(10)]


@register_dataset("npz")
def npz(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """A directory with ``train.npz`` and ``test.npz``, each holding ``x`` (uint8) and ``y``."""
    root = Path(cfg["root"]).expanduser()
    splits = []
    for part in ("train", "test"):
        path = root / f"{part}.npz"
        if not path.is_file():
            raise KdclError(
                f"{path} not found",
                fix="point dataset.root at a directory holding train.npz and test.npz (arrays x and y)",
            )
        splits.append(read_npz(path))
    num_classes = int(max(s.y.max() for s in splits)) + 1
    names = cfg.get("class_names") or [str(c) for c in range(num_classes)]
    return splits[0], splits[1], list(names)


def read_npz(path: Path) -> RawSplit:
    """One split from an ``.npz`` file holding images ``x`` and labels ``y``."""
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as err:
        raise KdclError(
            f"{path} is not a readable .npz file ({err})", fix="save it with np.savez(path, x=images, y=labels)"
        ) from None
    with arrays:
        missing = [key for key in ("x", "y") if key not in arrays.files]
        if missing:
            raise KdclError(
                f"{path} has no array {' or '.join(repr(k) for k in missing)} "
                f"(it holds: {_some(arrays.files) or 'nothing'})",
                fix="save images as x and labels as y: np.savez(path, x=images, y=labels)",
            )
        x = to_nchw(arrays["x"])
        return RawSplit(check_arrays(str(path), x, arrays["y"]), x)


def _torchvision(cfg: dict, cls: type) -> tuple[RawSplit, RawSplit, list[str]]:
    root = Path(cfg["root"]).expanduser()
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=cfg["download"])
        except Exception as err:  # torchvision raises RuntimeError offline, URLError on failed downloads
            raise KdclError(
                f"dataset {cfg['name']!r} not found under dataset.root={root} ({err})",
                fix="set dataset.download=true (needs internet) or point dataset.root at a copy of it",
            ) from None
        targets = np.asarray(ds.targets, dtype=np.int64)
        splits.append(RawSplit(targets, to_nchw(np.asarray(ds.data))))
    return splits[0], splits[1], list(ds.classes)


def _register_torchvision(name: str, class_name: str) -> None:
    def load(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
        import torchvision.datasets

        return _torchvision(cfg, getattr(torchvision.datasets, class_name))

    load.__doc__ = f"torchvision.datasets.{class_name}, held in memory (``dataset.root``, ``dataset.download``)."
    register_dataset(name)(load)


for _name, _cls in (
    ("cifar10", "CIFAR10"),
    ("cifar100", "CIFAR100"),
    ("mnist", "MNIST"),
    ("fashion_mnist", "FashionMNIST"),
):
    _register_torchvision(_name, _cls)


class _FakeImages(Dataset):
    """torchvision FakeData as uint8 tensors."""

    def __init__(self, size: int, image_shape: tuple[int, int, int], num_classes: int, offset: int):
        from torchvision.datasets import FakeData
        from torchvision.transforms.functional import pil_to_tensor

        self.fake = FakeData(size, tuple(image_shape), num_classes, transform=pil_to_tensor, random_offset=offset)

    def __len__(self) -> int:
        return len(self.fake)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.fake[i]


@register_dataset("fake")
def fake(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """torchvision FakeData: random images and labels, for tests (``in_memory: false`` reads it per sample)."""
    shape, k = tuple(cfg["image_shape"]), cfg["num_classes"]
    splits = []
    for size, offset in ((cfg["train_samples"], 0), (cfg["test_samples"], cfg["train_samples"])):
        ds = _FakeImages(size, shape, k, offset)
        y = np.array([int(ds.fake[i][1]) for i in range(size)], dtype=np.int64)
        if cfg["in_memory"]:
            splits.append(RawSplit(y, np.stack([ds[i][0].numpy() for i in range(size)])))
        else:
            splits.append(RawSplit(y, dataset=ds))
    return splits[0], splits[1], [f"class_{c}" for c in range(k)]


def read_image(path: str) -> Any:
    """An image file as an RGB PIL image (torchvision's default loader); a file that cannot be
    decoded is a :class:`KdclError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError and truncated files: OSError
        reason = "not an image file PIL can identify" if isinstance(err, UnidentifiedImageError) else err
        raise KdclError(
            f"cannot decode image file {path} ({reason})",
            fix="replace the file with a readable image, or remove it from the dataset folder",
        ) from None


@register_dataset("imagefolder")
def imagefolder(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """Image files in ``root/train/<class>/*`` and ``root/test/<class>/*``, read per sample
    through a DataLoader and resized to ``dataset.image_size``."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    size = cfg["image_size"]
    to_tensor = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    splits = []
    for part in ("train", "test"):
        folder = Path(cfg["root"]).expanduser() / part
        try:
            ds = ImageFolder(str(folder), transform=to_tensor, loader=read_image)
        except (FileNotFoundError, OSError) as err:
            raise KdclError(
                f"no images under {folder} ({err})",
                fix="point dataset.root at a folder holding train/<class>/* and test/<class>/* images",
            ) from None
        splits.append(RawSplit(np.asarray(ds.targets, dtype=np.int64), dataset=ds))
    return splits[0], splits[1], list(ds.classes)
