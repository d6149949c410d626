"""Write a class-balanced CIFAR-10 subset small enough to travel with the working tree.

The full copy (``train.npz`` and ``test.npz``, about 170 MB) is too big to hand to a
machine that gets the repository and a few carried folders only; CIFAR's pixels barely
compress, so the subset's size is what sets the limit: about 2.7 MiB per 1,000 images
(10,000 train + 2,000 test: 32.5 MiB). It is written with ``np.savez_compressed`` as
the ``npz`` dataset reads it (``x`` uint8 N×H×W×C, ``y`` int64), under an ignored folder.

    python benchmarks/make_cifar_subset.py                      # 10,000 train, 2,000 test
    python benchmarks/make_cifar_subset.py --train 1000 --test 500 --out benchmarks/data/cifar10_tiny

Then ``kdcl train dataset=npz dataset.root=benchmarks/data/cifar10_subset ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def balanced_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` positions of ``y``, as equal a share of every class as ``n`` allows, in their original order."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = [n // len(classes) + (k < n % len(classes)) for k in range(len(classes))]
    picks = [rng.permutation(np.flatnonzero(y == c))[:m] for c, m in zip(classes, per_class)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/cifar10"), help="holds train.npz and test.npz")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/cifar10_subset"))
    parser.add_argument("--train", type=int, default=10_000, help="training images kept")
    parser.add_argument("--test", type=int, default=2_000, help="test images kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        with np.load(args.src / f"{split}.npz") as arrays:
            x, y = arrays["x"], arrays["y"]
        if n > len(y):
            raise SystemExit(f"error: --{split} {n} is more than the {len(y)} images of {args.src / split}.npz")
        keep = balanced_subset(y, n, args.seed)
        path = args.out / f"{split}.npz"
        np.savez_compressed(path, x=x[keep], y=y[keep].astype(np.int64))
        print(f"{path}: {len(keep)} images {x.shape[1:]}, {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
