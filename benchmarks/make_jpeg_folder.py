"""An ImageNet-style folder of JPEGs made from the CIFAR-10 npz copy, for the folder-data benchmarks.

Each image is upscaled (bicubic) to ``--size`` px and saved as a JPEG of quality ``--quality``,
so that decoding costs what it costs on ImageNet-sized files (CIFAR's 32-px images decode
in microseconds). The layout is the one ``dataset=imagefolder`` reads:

    OUT/train/<class>/<index>.jpg   (--train-per-class per class, the first ones of the npz)
    OUT/test/<class>/<index>.jpg    (--test-per-class per class)

    python benchmarks/make_jpeg_folder.py --out benchmarks/data/cifar10_jpeg256

The folder is never committed (benchmarks/data/ is ignored). Imports numpy and Pillow only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_split(npz: Path, out: Path, per_class: int, size: int, quality: int) -> int:
    """The first ``per_class`` images of each class of ``npz`` as JPEGs under ``out/<class>/``."""
    with np.load(npz) as arrays:
        x, y = arrays["x"], arrays["y"]
    written = 0
    for label, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(y == label)[:per_class]:
            image = Image.fromarray(x[index]).resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{index:05d}.jpg", quality=quality)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10"), help="train.npz and test.npz")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args()
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        n = write_split(args.data / f"{split}.npz", args.out / split, per_class, args.size, args.quality)
        print(f"{split}: {n} JPEGs of {args.size}×{args.size} px, quality {args.quality}, in {args.out / split}")


if __name__ == "__main__":
    main()
