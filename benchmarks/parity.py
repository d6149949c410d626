"""Parity of kdcl with the plain-PyTorch reference (``reference_kd.py``), paired by seed.

For every seed it runs ``kdcl train`` and ``reference_kd.py`` with one recipe (CIFAR-10 npz,
a class-stratified pool of 11,112 training images of which 10% is validation, the whole test
split, 10 epochs, batch 128, SGD 0.05 Nesterov, cosine, crop + flip, KD α=0.9 T=4), then
prints, for the teacher, the CE student (baseline) and the KD student (distill), the mean
test accuracy of each side and the mean paired difference kdcl − reference with its
standard error. kdcl is at parity when that difference is within one standard error of 0,
or positive. Both the best-validation epoch's accuracy (``test_acc``) and the last epoch's
(``test_acc_last``) are compared. Runs already finished in ``--out`` are not run again.

The reference trains on the examples kdcl trained on (it reads them from the kdcl run) and
draws its own validation split from the rest. Every seed of one side shares one training
split (``dataset.split_seed`` is fixed), so two independently drawn splits add one offset to
every pair that the standard error over seeds cannot see: on the ``cnn`` pair it was −0.9
points for the KD student and vanished on kdcl's split.

    python benchmarks/parity.py --arch vgg --seeds 0 1 2 --out outputs/parity/vgg
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
MODELS = {"cnn": ("cnn", "cnn_small"), "vgg": ("vgg", "vgg_small")}  # reference arch -> kdcl teacher, student options
ROWS = ["teacher", "baseline", "distill"]


def kdcl_command(args: argparse.Namespace, seed: int, run_dir: Path) -> list[str]:
    teacher, student = MODELS[args.arch]
    return [
        sys.executable,
        "-m",
        "kdcl",
        "train",
        "+experiment=cifar10_cpu",
        f"dataset.root={args.data}",
        f"teacher={teacher}",
        f"student={student}",
        "curriculum=none",
        "distill=kd",
        "distill.alpha=0.9",
        "distill.temperature=4",
        "dataset.max_train_samples=11112",
        "dataset.max_test_samples=null",
        "trainer.epochs=10",
        "trainer.batch_size=128",
        f"dataset.crop_padding_mode={args.padding}",
        f"seed={seed}",
        "cache=false",
        f"hydra.run.dir={run_dir}",
        *([f"trainer.threads={args.threads}"] if args.threads else []),
    ]


def reference_command(args: argparse.Namespace, seed: int, out: Path, kdcl_run: Path) -> list[str]:
    """The reference on kdcl's training examples (the run's ``curriculum/scores.csv``): every seed of one
    side shares one split, so two independently drawn splits would bias every pair alike."""
    return [
        sys.executable,
        str(HERE / "reference_kd.py"),
        f"--data={args.data}",
        f"--arch={args.arch}",
        f"--padding={args.padding}",
        f"--seed={seed}",
        f"--out={out}",
        f"--train-indices={kdcl_run / 'curriculum' / 'scores.csv'}",
        *([f"--threads={args.threads}"] if args.threads else []),
    ]


def run(command: list[str], done: Path, log: Path) -> None:
    if done.is_file():
        return
    print("running:", " ".join(command), flush=True)
    with log.open("w") as f:
        subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=True)


def paired(kdcl: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per model and metric: each side's mean and the paired difference's mean and standard
    error ``s_d / √n`` (s_d the sample standard deviation of the per-seed differences)."""
    rows = []
    for model in ROWS:
        for metric in ("test_acc", "test_acc_last"):
            ours = kdcl[kdcl.model == model].set_index("seed")[metric]
            theirs = reference[reference.model == model].set_index("seed")[metric]
            seeds = ours.index.intersection(theirs.index)
            d = ours[seeds] - theirs[seeds]
            se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "seeds": len(d),
                    "kdcl": ours[seeds].mean(),
                    "reference": theirs[seeds].mean(),
                    "diff": d.mean(),
                    "se": se,
                    "parity": bool(d.mean() >= 0 or abs(d.mean()) <= se),
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(MODELS), default="vgg")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--padding", default="reflect")
    parser.add_argument("--data", default=str(Path("../shared/data/cifar10").resolve()))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kdcl, reference = [], []
    for seed in args.seeds:
        run_dir = (args.out / f"kdcl_s{seed}").resolve()
        run(kdcl_command(args, seed, run_dir), run_dir / "summary.csv", args.out / f"kdcl_s{seed}.log")
        kdcl.append(pd.read_csv(run_dir / "summary.csv"))
        ref = args.out / f"reference_s{seed}.csv"
        run(reference_command(args, seed, ref, run_dir), ref, args.out / f"reference_s{seed}.log")
        reference.append(pd.read_csv(ref))
    table = paired(pd.concat(kdcl), pd.concat(reference))
    table.to_csv(args.out / "parity.csv", index=False)
    pd.set_option("display.width", 160)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
