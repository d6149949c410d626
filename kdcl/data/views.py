"""The views of images read per sample: what a training step and an evaluation see of each file.

Images of any size (folders of JPEGs, manifests, Hugging Face datasets) become fixed-size
uint8 tensors in the ``DataLoader`` workers, where they are decoded:

- **Evaluation** (validation, test, curriculum scoring, the in-memory decode): the shorter
  side resized to ``image_size / eval_crop_ratio``, then the centre ``image_size`` square
  (torchvision's reference recipe: 256 then 224, a ratio of 0.875; a ratio of 1 resizes to
  ``image_size`` and crops the centre square).
- **Training**, ``dataset.train_view`` (:data:`TRAIN_VIEWS`):

  - ``random_resized_crop``: the torchvision reference recipe (Szegedy et al. 2015's
    "Inception" crop): a box of a random share of the area in ``crop_scale`` and a random
    aspect ratio, log-uniform in ``crop_ratio``, resized to ``image_size``, mirrored with
    probability 1/2; then ``auto_augment`` (:data:`AUTO_AUGMENTS`) and random erasing
    (Zhong et al. 2020) with probability ``random_erasing``;
  - ``resize_crop``: the evaluation view; the batch is then cropped and flipped on the
    device (``dataset.crop_padding``, ``dataset.flip``), as for data held in memory.

Every random draw of a training view comes from a generator seeded by the run's seed and
the view's key (:func:`view_generator`), a number the training loop gives each example of
each step. The same key gives the same pixels in any worker, after a resume mid-epoch, and
in every job of a sweep, so recorded teacher logits replay exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdcl.errors import KdclError
from kdcl.registry import Registry

# Views a training step sees of a decoded image (``dataset.train_view``); ``augments``: the view
# is drawn at random per step, so the data is augmented even without crop or flip on the device.
TRAIN_VIEWS: Registry[Callable[[SampleViews, Tensor, torch.Generator], Tensor]] = Registry(
    "training view", traits={"augments": False}
)
# Policies applied after the crop (``dataset.auto_augment``): factories of torchvision transforms.
AUTO_AUGMENTS: Registry[Callable[[], Callable[[Tensor], Tensor]]] = Registry("automatic augmentation")

# The odd multipliers that mix the run's seed and a view's key into one generator seed.
SEED_MIX = 1_000_003


@dataclass(frozen=True)
class Box:
    """A crop box in pixels of the decoded image: its top-left corner and its size."""

    top: int
    left: int
    height: int
    width: int


def step_keys(step: int, size: int) -> Tensor:
    """The view keys of a training step's ``size`` examples: one number per draw of the run,
    ``step · 2²⁴ + slot`` (a batch holds fewer than 2²⁴ examples)."""
    return torch.arange(size) + step * 2**24


# Keys of fixed views (a teacher cache's view v of example i) start here, past every step's.
FIXED_VIEW_KEYS = 2**62


def fixed_view_keys(idx: Tensor, view: Tensor) -> Tensor:
    """The keys of view ``view[j]`` of training example ``idx[j]``: the same crops every
    epoch, for the teacher cache's views (``distill.teacher_cache=views:K``)."""
    return FIXED_VIEW_KEYS + view.long().cpu() * 2**32 + idx.long().cpu()


def view_generator(seed: int, key: int) -> torch.Generator:
    """The CPU generator of view ``key`` of a run seeded ``seed``."""
    return torch.Generator().manual_seed(seed * SEED_MIX + key)


def resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator
) -> Box:
    """A random box of an ``height`` × ``width`` image, as torchvision's ``RandomResizedCrop``
    draws it (Szegedy et al. 2015): up to 10 tries of an area share uniform in ``scale`` and
    an aspect ratio w/h log-uniform in ``ratio``, kept when the box fits; else the centre box
    of the whole image clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return Box(top, left, h, w)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return Box((height - h) // 2, (width - w) // 2, h, w)


@AUTO_AUGMENTS.register("trivial_augment_wide")
def trivial_augment_wide() -> Callable[[Tensor], Tensor]:
    """TrivialAugment (Müller & Hutter, ICCV 2021), the wide operation space."""
    from torchvision.transforms import v2

    return v2.TrivialAugmentWide()


@AUTO_AUGMENTS.register("rand_augment")
def rand_augment() -> Callable[[Tensor], Tensor]:
    """RandAugment (Cubuk et al. 2020), 2 operations of magnitude 9 (torchvision's defaults)."""
    from torchvision.transforms import v2

    return v2.RandAugment()


@dataclass(frozen=True)
class ViewSettings:
    """The ``dataset`` keys that say how images read per sample are decoded and viewed."""

    image_size: int
    train_view: str = "resize_crop"
    eval_crop_ratio: float = 1.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    auto_augment: str | None = None
    random_erasing: float = 0.0
    decoder: str = "torchvision"

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> ViewSettings:
        """The settings of a dataset section; keys it lacks (a section saved before they
        existed) keep their defaults, the views of that time (``resize_crop``)."""
        names = ("train_view", "eval_crop_ratio", "auto_augment", "random_erasing", "decoder")
        given: dict[str, Any] = {k: cfg[k] for k in names if k in cfg}
        ranges: dict[str, Any] = {k: tuple(cfg[k]) for k in ("crop_scale", "crop_ratio") if k in cfg}
        return cls(image_size=cfg["image_size"], **given, **ranges)

    @property
    def augments(self) -> bool:
        """The training view is drawn at random per step (the worker augments)."""
        return bool(TRAIN_VIEWS.trait(self.train_view, "augments"))


class SampleViews:
    """Decoded image (uint8 RGB tensor (3, H, W)) → uint8 tensor (3, size, size):
    :meth:`evaluation`, or the training view of a key (:meth:`training`). Picklable: it
    travels to the ``DataLoader`` workers."""

    def __init__(self, settings: ViewSettings, seed: int = 0, fill: Sequence[int] = (0, 0, 0)):
        self.settings, self.seed, self.fill = settings, seed, list(fill)
        self.train_view = TRAIN_VIEWS.get(settings.train_view)
        name = settings.auto_augment
        self.auto_augment = AUTO_AUGMENTS.get(name)() if name else None

    def evaluation(self, image: Tensor) -> Tensor:
        """The shorter side resized to ``size / eval_crop_ratio`` (bilinear, antialiased),
        then the centre square."""
        from torchvision.transforms import v2

        size = self.settings.image_size
        resized = v2.functional.resize(image, round(size / self.settings.eval_crop_ratio), antialias=True)
        return v2.functional.center_crop(resized, [size, size])

    def training(self, image: Tensor, key: int) -> Tensor:
        """The training view ``key`` of ``image``."""
        return self.train_view(self, image, view_generator(self.seed, key))

    def with_seed(self, seed: int, fill: Sequence[int]) -> SampleViews:
        """These views for a run seeded ``seed``, random erasing filling with ``fill`` (uint8 RGB)."""
        return SampleViews(self.settings, seed, fill)


@TRAIN_VIEWS.register("resize_crop")
def resize_crop(views: SampleViews, image: Tensor, generator: torch.Generator) -> Tensor:
    """The evaluation view: training crops and flips, if any, happen on the device."""
    return views.evaluation(image)


@TRAIN_VIEWS.register("random_resized_crop", augments=True)
def random_resized_crop(views: SampleViews, image: Tensor, generator: torch.Generator) -> Tensor:
    """The reference recipe's training view: a random box (:func:`resized_crop_box`) resized
    to ``size`` (bilinear, antialiased), mirrored with probability 1/2, then the automatic
    augmentation and random erasing if set."""
    from torchvision.transforms import v2

    s = views.settings
    height, width = image.shape[-2:]
    box = resized_crop_box(height, width, s.crop_scale, s.crop_ratio, generator)
    pixels = v2.functional.resized_crop(
        image, box.top, box.left, box.height, box.width, [s.image_size, s.image_size], antialias=True
    )
    if torch.rand(1, generator=generator).item() < 0.5:
        pixels = pixels.flip(-1)
    if views.auto_augment is not None:
        with torch.random.fork_rng(devices=[]):  # torchvision's policies draw from the global generator
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            pixels = views.auto_augment(pixels)
    if s.random_erasing and torch.rand(1, generator=generator).item() < s.random_erasing:
        pixels = erase(pixels, views.fill, generator)
    return pixels


def erase(pixels: Tensor, fill: Sequence[int], generator: torch.Generator) -> Tensor:
    """Random erasing (Zhong et al., AAAI 2020), torchvision's ranges: a box of 2–33 % of the
    area with aspect ratio log-uniform in [0.3, 3.3], filled with ``fill`` (the mean colour:
    the 0 that torchvision writes after normalisation); the image unchanged when 10 tries
    find no box that fits."""
    _, h, w = pixels.shape
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = h * w * (0.02 + (0.33 - 0.02) * u[0])
        aspect = math.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[1])
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if eh < h and ew < w:
            top = int(torch.randint(0, h - eh + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - ew + 1, (1,), generator=generator))
            erased = pixels.clone()
            erased[:, top : top + eh, left : left + ew] = torch.tensor(fill, dtype=pixels.dtype).view(-1, 1, 1)
            return erased
    return pixels


def check_views(settings: ViewSettings, in_memory: bool, device_augments: bool, name: str) -> None:
    """A training view drawn per sample needs the images read per sample, and does the crop
    and flip itself: refuse the in-memory path and the device's crop and flip with it."""
    if not settings.augments:
        return
    if in_memory:
        raise KdclError(
            f"dataset {name!r}: train_view={settings.train_view} crops each decoded image, but "
            "dataset.in_memory=true holds them already resized",
            fix="set dataset.in_memory=false (the views are drawn in the DataLoader workers), or "
            "dataset.train_view=resize_crop with dataset.crop_padding and dataset.flip",
        )
    if device_augments:
        raise KdclError(
            f"dataset {name!r}: train_view={settings.train_view} already crops and flips each image, "
            "and dataset.crop_padding or dataset.flip would crop or flip it again",
            fix="set dataset.crop_padding=0 dataset.flip=false, or dataset.train_view=resize_crop",
        )
