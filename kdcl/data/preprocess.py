"""The batch preprocessing on the device: normalisation, random crop and flip in training,
and strongly augmented views (RandAugment) for the losses that compare two views."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from kdcl.distributed import Part
from kdcl.errors import KdclError
from kdcl.registry import Registry

# (x, idx, v) → the student's input of view v[j] of training example idx[j], x[j] its data:
# a teacher cache's fixed views (distill.teacher_cache=views:K), the same every time they are read.
FixedViews = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Augment:
    """Per-example augmentation parameters: crop offsets into the padded image and a flip."""

    dy: Tensor  # int64 (B,), 0 .. 2·padding
    dx: Tensor
    mirror: Tensor  # bool (B,)

    def take(self, part: Part) -> Augment:
        """The parameters of this rank's share of the batch (:class:`kdcl.distributed.Part`)."""
        return Augment(part.take(self.dy), part.take(self.dx), part.take(self.mirror))


PADDINGS: Registry[Padding] = Registry("crop padding mode")


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
        augmented_views: bool = False,
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
        self.augmented_views = augmented_views

    @property
    def augments_on_device(self) -> bool:
        """Training batches are cropped or flipped here."""
        return bool(self.crop_padding or self.flip)

    @property
    def augments(self) -> bool:
        """Training batches are augmented: here, or already in their views drawn per sample
        (``augmented_views``: :mod:`kdcl.data.views`)."""
        return self.augments_on_device or self.augmented_views

    def __call__(self, x: Tensor, train: bool, part: Part | None = None) -> Tensor:
        if train and self.augments_on_device:
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

    def reseed(self, seed: int) -> None:
        """Start a stage of seed ``seed``: its training draws restart from it."""
        self.generator.manual_seed(seed)

    def training(self, x: Tensor, idx: Tensor, epoch: int, part: Part | None = None) -> Tensor:
        """A training batch: augmented with the next parameters the generator draws (the
        examples and the epoch do not enter)."""
        return self(x, train=True, part=part)

    def fixed_views(self, n: int, k: int, generator: torch.Generator) -> tuple[FixedViews, Tensor]:
        """A teacher cache's ``k`` views of each of ``n`` examples: ``(x, idx, v) →`` view
        ``v[j]`` of example ``idx[j]`` (``x[j]`` its uint8 image), normalised, its crop offsets
        and flip drawn once here (on ``generator``'s device, then moved to the data's), and
        each example's phase, drawn next: in epoch e it shows view ``(φ + e − 1) mod k``. Where
        the data source draws the views (``augmented_views``), ``x`` is that view already and
        is only normalised; the table is drawn all the same, so the phases are as in every
        other case."""
        table = self.sample(n * k, generator)
        phase = torch.randint(0, k, (n,), generator=generator)
        device = self.generator.device
        dy, dx, mirror = (t.view(n, k).to(device) for t in (table.dy, table.dx, table.mirror))
        if self.augmented_views:
            return (lambda x, idx, v: self.normalize(x)), phase
        return (lambda x, idx, v: self.apply(x, Augment(dy[idx, v], dx[idx, v], mirror[idx, v]))), phase

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


class StrongViews:
    """Strongly augmented copies of a uint8 batch: RandAugment (Cubuk et al., NeurIPS 2020
    workshop, "RandAugment: Practical automated data augmentation with a reduced search
    space"; torchvision's ``v2.RandAugment``) with ``num_ops`` operations of ``magnitude``
    (of 30) drawn per example, the strong views of FixMatch (Sohn et al. 2020) that MLKD
    (Jin et al. 2023) distils on. The caller then crops, flips and normalises them like any
    training batch.

    The draws come from a generator seeded with ``seed`` and the optimizer step, so a step's
    views are the same pixels on every run of it (resume is exact) and need no state of
    their own. Under DDP each rank augments its share of the batch.
    """

    def __init__(self, seed: int, num_ops: int = 2, magnitude: int = 10):
        self.seed = seed
        self.augment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)

    def __call__(self, x: Tensor, step: int) -> Tensor:
        if not len(x):  # an empty share of the batch (DDP)
            return x
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
            torch.manual_seed(self.seed * 1_000_003 + step)
            return torch.stack([self.augment(image) for image in x])
