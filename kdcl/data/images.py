"""Users' own images: decoding (:func:`read_image`), their views (:mod:`.views`), class
labels given as names or indices (:func:`class_indices`), holding a split in memory or reading
it per sample (:func:`image_splits`), and the ``imagefolder`` dataset.

An image dataset decodes every image to RGB. Evaluation sees the centre square of the image
resized (``dataset.image_size``, ``dataset.eval_crop_ratio``); a training step sees the view
``dataset.train_view`` draws (:mod:`kdcl.data.views`). With ``dataset.in_memory`` the images
are decoded once, when the data loads, into the uint8 tensor the in-memory path holds on
the training device, as long as that takes at most ``dataset.max_memory_gb``; otherwise
they are decoded per sample through a ``DataLoader``, whose workers draw the training views.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdcl.data.checks import abbreviated
from kdcl.data.loaders import register_dataset
from kdcl.data.sources import from_worker, worker_count
from kdcl.data.splits import RawSplit
from kdcl.data.views import SampleViews, ViewSettings, check_views
from kdcl.errors import KdclError
from kdcl.registry import Registry

FOLDER_FIX = "replace the file with a readable image, or remove it from the dataset folder"
CHANNELS = 3  # every image is decoded to RGB


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, what they are (``described``: "image file PATH", …) and how to
    mend the data if they cannot be decoded (``fix``)."""

    data: bytes
    described: str
    fix: str


# Decoders of image files to uint8 RGB tensors (3, H, W) (``dataset.decoder``).
DECODERS: Registry[Callable[[EncodedImage], Tensor]] = Registry("image decoder")


@DECODERS.register("torchvision")
def torchvision_decoder(image: EncodedImage) -> Tensor:
    """JPEG, PNG, GIF and WebP through ``torchvision.io.decode_image`` (libjpeg-turbo,
    libpng, ...): on a 256-px JPEG about 60 % of PIL's time, and a tensor without a copy
    (docs/speed.md). Other formats (BMP, TIFF, ...) through PIL."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates them for TorchCodec (docs/speed.md)
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(image.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision does not decode, or a damaged file: PIL decides
        return pil_decoder(image)


@DECODERS.register("pil")
def pil_decoder(image: EncodedImage) -> Tensor:
    """PIL (torchvision's ``ImageFolder`` default loader), converted to RGB."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            return pil_to_tensor(opened.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError and truncated files: OSError
        reason = "not an image file PIL can identify" if isinstance(err, UnidentifiedImageError) else err
        raise KdclError(f"cannot decode {image.described} ({reason})", fix=image.fix) from None


def read_file(path: str, fix: str = FOLDER_FIX) -> EncodedImage:
    """The bytes of the image file ``path``; one that cannot be read is a :class:`KdclError`."""
    try:
        return EncodedImage(Path(path).read_bytes(), f"image file {path}", fix)
    except OSError as err:
        raise KdclError(f"cannot read image file {path} ({err.strerror})", fix=fix) from None


class DecodedImages(Dataset):
    """Images decoded per sample: item i → (uint8 tensor (3, size, size), label i), the
    evaluation view; :meth:`training` gives the training view of a key. ``read(i)``: the
    i-th image's bytes (:class:`EncodedImage`; picklable, for DataLoader workers), decoded by
    ``decoder`` (:data:`DECODERS`). ``views`` is set for the run (its seed and mean colour)
    when the data loads."""

    def __init__(self, read: Callable[[int], EncodedImage], labels: np.ndarray, views: SampleViews, decoder: str):
        self.read, self.labels, self.views = read, labels, views
        self.decode = DECODERS.get(decoder)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.views.evaluation(self.decode(self.read(i))), int(self.labels[i])

    def training(self, i: int, key: int) -> tuple[Tensor, int]:
        """Image i as training view ``key`` sees it (:meth:`SampleViews.training`)."""
        return self.views.training(self.decode(self.read(i)), key), int(self.labels[i])


class ImageFiles:
    """``read(i)`` of a list of image files; an undecodable one is an error with ``fix``."""

    def __init__(self, paths: Sequence[str], fix: str):
        self.paths, self.fix = list(paths), fix

    def __call__(self, i: int) -> EncodedImage:
        return read_file(self.paths[i], self.fix)


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
    cfg: dict, read: Mapping[str, Callable[[int], Any]], labels: dict[str, np.ndarray]
) -> tuple[RawSplit, RawSplit]:
    """The train and test :class:`RawSplit` of the images ``read[split](i)`` labelled
    ``labels[split]``: decoded now and held in memory (``dataset.in_memory``), or read per
    sample, each split a :class:`DecodedImages` with the dataset's views.

    Held in memory, the images take N·3·size² bytes on the training device: more than
    ``dataset.max_memory_gb`` is refused before anything is decoded."""
    settings = ViewSettings.of(cfg)
    check_views(settings, cfg["in_memory"], bool(cfg["crop_padding"] or cfg["flip"]), cfg["name"])
    train, test = (
        DecodedImages(read[split], labels[split], SampleViews(settings), settings.decoder)
        for split in ("train", "test")
    )
    if not cfg["in_memory"]:
        return RawSplit(train.labels, dataset=train), RawSplit(test.labels, dataset=test)
    size, limit = cfg["image_size"], cfg["max_memory_gb"]
    gigabytes = (len(train) + len(test)) * CHANNELS * size * size / 1e9
    if gigabytes > limit:
        raise KdclError(
            f"dataset {cfg['name']!r}: holding its {len(train)} training and {len(test)} test images in memory "
            f"at {size}×{size} takes {gigabytes:.1f} GB, over dataset.max_memory_gb={limit}",
            fix="set dataset.in_memory=false to read the images per sample, lower dataset.image_size, "
            "or raise dataset.max_memory_gb if the training device has room",
        )
    workers = worker_count(cfg["num_workers"])
    return RawSplit(train.labels, decoded(train, workers)), RawSplit(test.labels, decoded(test, workers))


def decoded(images: DecodedImages, num_workers: int, batch_size: int = 256) -> np.ndarray:
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
    """Image files in ``root/train/<class>/*`` and ``root/test/<class>/*`` (torchvision's
    ``ImageFolder`` layout and class order); read per sample through a DataLoader unless
    ``dataset.in_memory``."""
    from torchvision.datasets import ImageFolder

    folders = {}
    for part in ("train", "test"):
        folder = Path(cfg["root"]).expanduser() / part
        try:
            folders[part] = ImageFolder(str(folder))  # for its listing: the files are read per sample
        except (FileNotFoundError, OSError) as err:
            raise KdclError(
                f"no images under {folder} ({err})",
                fix="point dataset.root at a folder holding train/<class>/* and test/<class>/* images",
            ) from None
    read = {part: ImageFiles([path for path, _ in ds.samples], FOLDER_FIX) for part, ds in folders.items()}
    labels = {part: np.asarray(ds.targets, dtype=np.int64) for part, ds in folders.items()}
    return *image_splits(cfg, read, labels), list(folders["train"].classes)
