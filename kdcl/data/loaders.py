"""The dataset registry (:data:`DATASETS`) and the datasets kdcl knows by name: digits,
the torchvision ones, arrays in ``.npz`` files and random images for tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from kdcl.data.checks import abbreviated, check_arrays, to_nchw
from kdcl.data.splits import RawSplit, stratified_order
from kdcl.errors import DATA_DIR_HINT, KdclError
from kdcl.registry import Registry

DATASETS: Registry[Callable[[dict], tuple[RawSplit, RawSplit, list[str]]]] = Registry("dataset")
register_dataset = DATASETS.register


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
                f"{path.absolute()} not found",
                fix=f"point dataset.root at a directory holding train.npz and test.npz (arrays x and y); {DATA_DIR_HINT}",
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
                f"(it holds: {abbreviated(arrays.files) or 'nothing'})",
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
