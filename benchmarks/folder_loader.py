"""Images/s of kdcl's folder data path against torchvision's reference recipe, and where the time goes.

Both read the same JPEG folder (``benchmarks/make_jpeg_folder.py``) with the same number of
DataLoader workers and batch size, and hand the training step normalised float batches:

- **reference**: ``torchvision.datasets.ImageFolder`` (PIL decoding) with the reference
  classification recipe, ``RandomResizedCrop(size)``, ``RandomHorizontalFlip()``,
  ``PILToTensor()``, ``ToDtype(float32, scale=True)``, ``Normalize(mean, std)``, and a
  shuffling ``DataLoader``;
- **kdcl**: ``dataset=imagefolder`` as ``kdcl train`` loads it (``kdcl.data.load_data``):
  the training view drawn in the workers (torchvision.io decoding, RandomResizedCrop and flip
  on the uint8 tensor), uint8 batches to the main process, normalised there as a batch
  (``Preprocess``), the workers persistent.

The two alternate, ``--rounds`` times each, in one process (the machine's noise hits both);
the table reports the median images/s of each and their ratio. Then one worker's time per
image is split into decode, augment and collate (single process, ``--profile`` images).

    python benchmarks/folder_loader.py --root benchmarks/data/cifar10_jpeg256 --workers 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from kdcl.config.options import section_option
from kdcl.data import load_data, step_keys
from kdcl.data.images import DECODERS, read_file
from kdcl.data.views import SampleViews, ViewSettings

CPU = torch.device("cpu")


def reference_loader(root: Path, size: int, batch: int, workers: int, mean, std) -> DataLoader:
    """torchvision's reference classification recipe (references/classification), training side."""
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    dataset = ImageFolder(str(root / "train"), transform=transform)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def passes(loader: DataLoader):
    """The loader's batches, pass after pass (each pass starts its workers anew, as each epoch's do)."""
    while True:
        yield from loader


def time_reference(loader: DataLoader, batches: int, warmup: int) -> float:
    """Images/s over ``batches`` batches after ``warmup``."""
    it = passes(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = sum(len(next(it)[0]) for _ in range(batches))
    return n / (time.perf_counter() - start)


def time_kdcl(data, batch: int, batches: int, warmup: int, generator: torch.Generator) -> float:
    """Images/s of ``batches`` training batches after ``warmup``, normalised as the training step gets them."""
    total = warmup + batches
    index = [torch.randint(0, len(data.train), (batch,), generator=generator) for _ in range(total)]
    keys = [step_keys(s, batch) for s in range(total)]
    stream = data.train.batches(index, keys)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    n = 0
    for _, x, _ in stream:
        n += len(data.preprocess(x, train=True))
    return n / (time.perf_counter() - start)


def profile(root: Path, size: int, images: int, batch: int, mean, std) -> dict[str, float]:
    """Microseconds per image in one process: decoding, the training view, and collating a batch."""
    files = sorted((root / "train").rglob("*.jpg"))[:images]
    encoded = [read_file(str(f)) for f in files]
    settings = ViewSettings(image_size=size, train_view="random_resized_crop")
    views = SampleViews(settings, seed=0)
    rows = {}
    for name in ("torchvision", "pil"):
        start = time.perf_counter()
        decoded = [DECODERS.get(name)(e) for e in encoded]
        rows[f"decode ({name})"] = (time.perf_counter() - start) / len(files) * 1e6
    if torch.cuda.is_available():
        rows[f"decode (torchvision, cuda, batches of {batch})"] = cuda_decode_micros(encoded, batch)
    start = time.perf_counter()
    crops = [views.training(image, k) for k, image in enumerate(decoded)]
    rows["augment (kdcl view: RandomResizedCrop + flip on uint8)"] = (time.perf_counter() - start) / len(files) * 1e6
    from PIL import Image

    pil = [Image.open(f).convert("RGB") for f in files]
    reference = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    start = time.perf_counter()
    for image in pil:
        reference(image)
    rows["augment (reference: RandomResizedCrop + flip on PIL)"] = (time.perf_counter() - start) / len(files) * 1e6
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    start = time.perf_counter()
    for i in range(0, len(crops) - batch + 1, batch):
        torch.stack(crops[i : i + batch])
    rows["collate (kdcl: stack uint8)"] = (time.perf_counter() - start) / len(crops) * 1e6
    start = time.perf_counter()
    for i in range(0, len(crops) - batch + 1, batch):
        torch.stack([normalize(c) for c in crops[i : i + batch]])
    rows["normalise + collate (reference: float per image)"] = (time.perf_counter() - start) / len(crops) * 1e6
    return rows


def cuda_decode_micros(encoded: list, batch: int) -> float:
    """Microseconds per image of ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG) on lists of
    ``batch`` JPEGs, the decoded images left on the GPU; after one warm-up batch."""
    from torchvision.io import decode_jpeg

    jpegs = [torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for e in encoded]
    decode_jpeg(jpegs[:batch], device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(jpegs) - batch + 1, batch):
        decode_jpeg(jpegs[i : i + batch], device="cuda")
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(jpegs) // batch * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("benchmarks/data/cifar10_jpeg256"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process's share: the workers do the decoding
    cfg = {
        **section_option("dataset", "imagefolder"),
        "root": str(args.root),
        "image_size": args.size,
        "num_workers": args.workers,
        "val_fraction": 0.05,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    data = load_data(cfg, CPU, False, 0)
    reference = reference_loader(args.root, args.size, args.batch, args.workers, cfg["mean"], cfg["std"])
    generator = torch.Generator().manual_seed(0)
    speeds: dict[str, list[float]] = {"reference": [], "kdcl": []}
    for _ in range(args.rounds):
        speeds["reference"].append(time_reference(reference, args.batches, args.warmup))
        speeds["kdcl"].append(time_kdcl(data, args.batch, args.batches, args.warmup, generator))
    ref, ours = (statistics.median(speeds[k]) for k in ("reference", "kdcl"))
    print(f"{args.workers} workers, batch {args.batch}, {args.size} px, {args.batches} batches × {args.rounds} rounds")
    print("| loader | images/s (median) | rounds |\n| --- | --- | --- |")
    for name, median in (("torchvision reference", ref), ("kdcl", ours)):
        runs = ", ".join(f"{s:.0f}" for s in speeds["reference" if name != "kdcl" else "kdcl"])
        print(f"| {name} | {median:.0f} | {runs} |")
    print(f"\nkdcl / reference: {ours / ref:.2f}×\n")
    print("| per image, one process | µs |\n| --- | --- |")
    for name, micros in profile(args.root, args.size, args.profile, args.batch, cfg["mean"], cfg["std"]).items():
        print(f"| {name} | {micros:.0f} |")


if __name__ == "__main__":
    main()
