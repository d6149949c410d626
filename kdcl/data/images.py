"""Users' own images: decoding (:func:`read_image`), the resize every image dataset shares,
class labels given as names or indices (:func:`class_indices`), holding a split in memory
or reading it per sample (:func:`image_splits`), and the ``imagefolder`` dataset.

An image dataset decodes every image to RGB, resizes its shorter side to
``dataset.image_size`` and center-crops it square (:func:`image_transform`). With
``dataset.in_memory`` the images are decoded once, when the data loads, into the uint8
tensor the in-memory path holds on the training device, as long as that takes at most
``dataset.max_memory_gb``; otherwise they are decoded per sample through a ``DataLoader``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdcl.data.checks import abbreviated
from kdcl.data.loaders import register_dataset
from kdcl.data.sources import from_worker
from kdcl.data.splits import RawSplit
from kdcl.errors import KdclError

FOLDER_FIX = "replace the file with a readable image, or remove it from the dataset folder"
CHANNELS = 3  # every image is decoded to RGB


def decode_image(file: Any, described: str, fix: str) -> Any:
    """``file`` (a path or a binary file object) as an RGB PIL image; one that cannot be
    decoded is a :class:`KdclError` naming it (``described``: "image file PATH", …)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError and truncated files: OSError
        reason = "not an image file PIL can identify" if isinstance(err, UnidentifiedImageError) else err
        raise KdclError(f"cannot decode {described} ({reason})", fix=fix) from None


def read_image(path: str, fix: str = FOLDER_FIX) -> Any:
    """An image file as an RGB PIL image (torchvision's default loader); a file that cannot be
    decoded is a :class:`KdclError` naming it."""
    return decode_image(path, f"image file {path}", fix)


def image_transform(size: int) -> Callable[[Any], Tensor]:
    """PIL image → uint8 tensor (C, size, size): the shorter side resized to ``size``, then
    center-cropped square."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])


class DecodedImages(Dataset):
    """Images decoded per sample: item i → (uint8 tensor (3, size, size), label i).
    ``read(i)``: the i-th image as a PIL image (picklable, for DataLoader workers)."""

    def __init__(self, read: Callable[[int], Any], labels: np.ndarray, size: int):
        self.read, self.labels, self.transform = read, labels, image_transform(size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.read(i)), int(self.labels[i])


class ImageFiles:
    """``read(i)`` of a list of image files; an undecodable one is an error with ``fix``."""

    def __init__(self, paths: Sequence[str], fix: str):
        self.paths, self.fix = list(paths), fix

    def __call__(self, i: int) -> Any:
        return read_image(self.paths[i], self.fix)


# --------------------------------------------------------------------------- labels
WHOLE_NUMBER = re.compile(r"\s*-?\d+\s*")


def _whole(label: Any) -> bool:
    if isinstance(label, str):
        return WHOLE_NUMBER.fullmatch(label) is not None
    return isinstance(label, (int, np.integer)) and not isinstance(label, bool)


def class_indices(
    source: str, labels: dict[str, Sequence[Any]], class_names: Sequence[str] | None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Labels of each split (``labels``: split → its labels) as class indices, and the class names.

    Labels that are all whole numbers are the class indices 0..C−1 themselves; the class
    names are ``class_names``, or "0".."C−1". Otherwise every label is a class name: its
    index is its position in ``class_names``, or, without them, in the sorted names the
    splits hold (as a folder of class folders sorts them). ``source`` names the data in errors.
    """
    every = [label for split in labels.values() for label in split]
    odd = [label for label in every if not isinstance(label, (str, int, np.integer)) or isinstance(label, bool)]
    if odd:
        raise KdclError(
            f"{source}: labels must be class names or whole numbers, found {type(odd[0]).__name__} labels "
            f"such as {abbreviated(sorted({repr(v) for v in odd}), 3)}",
            fix="store each label as a class name or as a class index 0..C-1",
        )
    if all(_whole(label) for label in every):
        indices = {split: np.array([int(v) for v in values], dtype=np.int64) for split, values in labels.items()}
        count = max((int(y.max()) + 1 for y in indices.values() if len(y)), default=0)
        return indices, list(class_names or [str(c) for c in range(count)])
    names = list(class_names or sorted({str(v) for v in every}))
    position = {name: k for k, name in enumerate(names)}
    unknown = sorted({str(v) for v in every} - set(position))
    if unknown:
        raise KdclError(
            f"{source}: labels {abbreviated(unknown)} are not among dataset.class_names ({abbreviated(names)})",
            fix="add them to dataset.class_names, or set dataset.class_names=null to take the names from the labels",
        )
    return {
        split: np.array([position[str(v)] for v in values], dtype=np.int64) for split, values in labels.items()
    }, names


# --------------------------------------------------------------------------- memory or per sample
def image_splits(
    cfg: dict, train: Dataset, test: Dataset, train_y: np.ndarray, test_y: np.ndarray
) -> tuple[RawSplit, RawSplit]:
    """The train and test :class:`RawSplit` of two datasets of (uint8 image, label) items:
    decoded now and held in memory (``dataset.in_memory``), or read per sample.

    Held in memory, the images take N·3·size² bytes on the training device: more than
    ``dataset.max_memory_gb`` is refused before anything is decoded."""
    if not cfg["in_memory"]:
        return RawSplit(train_y, dataset=train), RawSplit(test_y, dataset=test)
    size, limit = cfg["image_size"], cfg["max_memory_gb"]
    gigabytes = (len(train) + len(test)) * CHANNELS * size * size / 1e9
    if gigabytes > limit:
        raise KdclError(
            f"dataset {cfg['name']!r}: holding its {len(train)} training and {len(test)} test images in memory "
            f"at {size}×{size} takes {gigabytes:.1f} GB, over dataset.max_memory_gb={limit}",
            fix="set dataset.in_memory=false to read the images per sample, lower dataset.image_size, "
            "or raise dataset.max_memory_gb if the training device has room",
        )
    return (
        RawSplit(train_y, decoded(train, cfg["num_workers"])),
        RawSplit(test_y, decoded(test, cfg["num_workers"])),
    )


def decoded(images: Dataset, num_workers: int, batch_size: int = 256) -> np.ndarray:
    """Every image of ``images`` as one uint8 array (N, C, H, W), decoded by ``num_workers``
    DataLoader workers (0: in this process)."""
    if len(images) == 0:
        return np.zeros((0, CHANNELS, 1, 1), dtype=np.uint8)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    try:
        return torch.cat([x for x, _ in loader]).numpy()
    except KdclError as err:
        raise from_worker(err) from None


# --------------------------------------------------------------------------- imagefolder
@register_dataset("imagefolder")
def imagefolder(cfg: dict) -> tuple[RawSplit, RawSplit, list[str]]:
    """Image files in ``root/train/<class>/*`` and ``root/test/<class>/*``, resized to
    ``dataset.image_size``; read per sample through a DataLoader unless ``dataset.in_memory``."""
    from torchvision.datasets import ImageFolder

    folders = []
    for part in ("train", "test"):
        folder = Path(cfg["root"]).expanduser() / part
        try:
            folders.append(ImageFolder(str(folder), transform=image_transform(cfg["image_size"]), loader=read_image))
        except (FileNotFoundError, OSError) as err:
            raise KdclError(
                f"no images under {folder} ({err})",
                fix="point dataset.root at a folder holding train/<class>/* and test/<class>/* images",
            ) from None
    train, test = folders
    labels = [np.asarray(ds.targets, dtype=np.int64) for ds in folders]
    return *image_splits(cfg, train, test, *labels), list(train.classes)
