"""An independent plain-PyTorch reference for kdcl's numbers: teacher, CE student, KD student.

This script imports torch and numpy only (no kdcl code), so that it can tell whether kdcl
trains as well as a plain loop with the same recipe:

* data: an npz folder (``train.npz``/``test.npz`` with uint8 ``x`` in N×H×W×C and ``y``);
  a class-stratified pool of ``--train-samples`` images drawn with ``--split-seed``, of
  which ``--val-fraction`` is held out as a validation split (model selection), and the
  test split (all of it, or a stratified ``--test-samples``);
* augmentation: per-example random crop after padding by 4 (``--padding reflect|mean|zeros``)
  and a random horizontal flip, normalised with the CIFAR-10 channel statistics;
* models: the same architectures as kdcl's ``cnn`` and ``vgg`` options, with He-normal
  (fan-out) convolution weights and unit BatchNorm;
* SGD with Nesterov momentum, cosine decay per optimizer step without warm-up, batch 128,
  reshuffled every epoch;
* KD loss (Hinton et al. 2015): ``(1 − α)·CE(y, z_s) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``
  with the teacher frozen in eval mode on the student's augmented batch.

Each model is evaluated on validation after every epoch; the test accuracy of the last
epoch (``test_acc_last``) and of the best-validation epoch (``test_acc``) are written, one
row per model, to ``--out`` (CSV). Example::

    python benchmarks/reference_kd.py --data ../shared/data/cifar10 --arch vgg --seed 0 --out ref_0.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4913, 0.4821, 0.4465)
CIFAR_STD = (0.2452, 0.2428, 0.2606)


# --------------------------------------------------------------------------- models
def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def three_conv_cnn(width: int) -> nn.Sequential:
    """kdcl's ``cnn``: conv(w) · pool · conv(2w) · pool · conv(4w) · global average pool · fc."""
    return nn.Sequential(
        *conv_bn_relu(3, width),
        nn.MaxPool2d(2),
        *conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),
        *conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


def vgg_cnn(width: int) -> nn.Sequential:
    """kdcl's ``vgg``: conv(w) · conv(w) at full resolution · pool · conv(2w) · pool · conv(4w) ·
    global average pool · fc."""
    return nn.Sequential(
        *conv_bn_relu(3, width),
        *conv_bn_relu(width, width),
        nn.MaxPool2d(2),
        *conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),
        *conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


ARCHS = {"cnn": three_conv_cnn, "vgg": vgg_cnn}


def he_init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------- data
def stratified_take(labels: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, an equal share of every class (all indices when ``n`` is None)."""
    if n is None or n >= len(labels):
        return rng.permutation(len(labels))
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    counts = np.full(len(classes), n // len(classes))
    counts[: n - counts.sum()] += 1
    return rng.permutation(np.concatenate([idx[:k] for idx, k in zip(per_class, counts)]))


def load_splits(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train / val / test as (float normalised N×C×H×W, int64 labels)."""
    rng = np.random.default_rng(args.split_seed)
    arrays = {part: np.load(Path(args.data) / f"{part}.npz") for part in ("train", "test")}
    x_train, y_train = arrays["train"]["x"], arrays["train"]["y"].astype(np.int64)
    pool = stratified_take(y_train, args.train_samples, rng)
    n_val = int(round(len(pool) * args.val_fraction))
    if args.train_indices:  # another tool's training split; validation from the rest of train.npz
        train = np.loadtxt(args.train_indices, delimiter=",", skiprows=1, usecols=0, dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(y_train)), train)
        pool = np.concatenate([train, rest[stratified_take(y_train[rest], n_val, rng)]])
        val_pos = np.arange(len(train), len(pool))
    else:
        val_pos = stratified_take(y_train[pool], n_val, rng)
    is_val = np.zeros(len(pool), bool)
    is_val[val_pos] = True
    x_test, y_test = arrays["test"]["x"], arrays["test"]["y"].astype(np.int64)
    test = np.sort(stratified_take(y_test, args.test_samples, rng))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        return (images - mean) / std, torch.from_numpy(y)

    return {
        "train": tensors(x_train[np.sort(pool[~is_val])], y_train[np.sort(pool[~is_val])]),
        "val": tensors(x_train[np.sort(pool[is_val])], y_train[np.sort(pool[is_val])]),
        "test": tensors(x_test[test], y_test[test]),
    }


def augment(x: torch.Tensor, padding: str, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the image padded by 4 on each side, then a random horizontal flip.

    ``zeros`` pads black pixels (0 before normalisation), ``mean`` the dataset's mean colour
    (0 after normalisation), ``reflect`` mirrors the border without repeating it."""
    n, c, h, w = x.shape
    if padding == "reflect":
        padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    else:  # pad with a per-channel constant: 0 after normalisation, or a black pixel's value
        fill = (
            torch.zeros(1, c, 1, 1)
            if padding == "mean"
            else (-torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)).view(1, c, 1, 1)
        )
        padded = F.pad(x - fill, (4, 4, 4, 4)) + fill
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = crop.flip(2) if flips[i] else crop
    return out


# --------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), 512):
        batch = x[start : start + 512].contiguous(memory_format=torch.channels_last)
        correct += int((model(batch).argmax(1) == y[start : start + 512]).sum())
    return correct / len(x)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float, t: float) -> torch.Tensor:
    soft = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True
    )
    return (1 - alpha) * F.cross_entropy(student, y) + alpha * t * t * soft


def train(
    name: str, model: nn.Module, splits: dict, args: argparse.Namespace, seed: int, teacher: nn.Module | None = None
) -> tuple[nn.Module, dict]:
    """Train ``model`` for ``args.epochs``; return its best-validation copy and its row."""
    x, y = splits["train"]
    generator = torch.Generator().manual_seed(seed)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True
    )
    steps = args.epochs * math.ceil(len(x) / args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    best, best_val, best_epoch, started = None, -1.0, 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), args.batch_size):
            idx = order[start : start + args.batch_size]
            inputs = augment(x[idx], args.padding, generator).contiguous(memory_format=torch.channels_last)
            logits = model(inputs)
            if teacher is None:
                loss = F.cross_entropy(logits, y[idx])
            else:
                loss = kd_loss(logits, teacher_logits(teacher, inputs), y[idx], args.alpha, args.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        val = accuracy(model, *splits["val"])
        if val > best_val:
            best, best_val, best_epoch = copy.deepcopy(model), val, epoch
        print(f"{name} epoch {epoch}/{args.epochs}  val_acc {val:.4f}", flush=True)
    row = {
        "model": name,
        "test_acc": accuracy(best, *splits["test"]),
        "test_acc_last": accuracy(model, *splits["test"]),
        "best_val_acc": best_val,
        "best_epoch": best_epoch,
        "steps": steps,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
        "seed": args.seed,
    }
    print(row, flush=True)
    return best, row


@torch.no_grad()
def teacher_logits(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return teacher(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/cifar10")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vgg")
    parser.add_argument("--teacher-width", type=int, default=32)
    parser.add_argument("--student-width", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=11112, help="pool before the validation carve")
    parser.add_argument("--test-samples", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--padding", choices=["reflect", "mean", "zeros"], default="reflect")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the KD term")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument(
        "--teacher-checkpoint",
        type=Path,
        help="load the teacher's weights (a state_dict, or a "
        "file holding one under 'state_dict') instead of training it",
    )
    parser.add_argument(
        "--train-indices",
        type=Path,
        help="CSV whose first column (after a header) lists the "
        "training examples (rows of train.npz), e.g. a kdcl run's curriculum/scores.csv",
    )
    parser.add_argument("--teacher-only", action="store_true", help="train the teacher alone")
    parser.add_argument("--out", type=Path, required=True, help="CSV, one row per model")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_splits(args)
    build = ARCHS[args.arch]
    torch.manual_seed(args.seed)
    if args.teacher_checkpoint:  # a trained teacher's weights instead of training one
        state = torch.load(args.teacher_checkpoint, map_location="cpu", weights_only=True)
        teacher = build(args.teacher_width)
        teacher.load_state_dict(state.get("state_dict", state))
        teacher = teacher.to(memory_format=torch.channels_last)
        teacher_row = {"model": "teacher", "test_acc": accuracy(teacher, *splits["test"]), "seed": args.seed}
    else:
        teacher, teacher_row = train("teacher", he_init(build(args.teacher_width)), splits, args, args.seed)
    rows = [teacher_row]
    if not args.teacher_only:
        teacher.eval().requires_grad_(False)
        torch.manual_seed(args.seed + 1)
        student_init = he_init(build(args.student_width))
        rows.append(train("baseline", copy.deepcopy(student_init), splits, args, args.seed + 1)[1])
        rows.append(train("distill", student_init, splits, args, args.seed + 1, teacher=teacher)[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
