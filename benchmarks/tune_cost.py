"""What a pruned search costs: ``kdcl tune`` against the same trials as independent runs.

It runs a ``--trials``-trial search of Hinton KD's α and T (``distill=kd search=kd``: α in
[0.1, 0.95], T in {1, 2, 4, 8}; TPE, median pruning, the stage cache) on
``+experiment=cifar10_cpu`` (whose own loss, DKD, does not use α), then
``kdcl train`` once per trial with that trial's α and T and ``cache=false`` (every run
trains its own teacher and baseline, as runs launched one by one do), and prints the wall
time of each side, their ratio (the target is ≤ 0.25), the trials pruned, and the best
validation accuracy each side found. ``--independent N`` runs only the first N independent
runs and scales their mean time to all the trials (the ratio is then an estimate).

    python benchmarks/tune_cost.py --out outputs/tune_cost                  # 9 cifar10_cpu runs + the search
    python benchmarks/tune_cost.py --out outputs/tune_cost --independent 2  # 2 runs + the search
    python benchmarks/tune_cost.py --out outputs/tune_cost -- trainer.threads=2

Each side starts from an empty folder under ``--out`` (and the search from an empty stage cache).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd


def kdcl(args: list[str]) -> float:
    """Run ``kdcl ARGS``; its wall time in seconds (a failure stops the benchmark)."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdcl", *args], check=True)
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/tune_cost"))
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--independent", type=int, help="independent runs to time (default: one per trial)")
    parser.add_argument("overrides", nargs="*", help="more overrides for both sides (after --)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    common = ["+experiment=cifar10_cpu", "distill=kd", *args.overrides]
    study_dir = args.out / "search"
    search_s = kdcl(
        [
            "tune",
            *common,
            "search=kd",
            f"tune.trials={args.trials}",
            f"cache_dir={args.out / 'cache'}",
            f"hydra.run.dir={study_dir}",
        ]
    )
    study = optuna.load_study(study_name="kdcl", storage=f"sqlite:///{study_dir / 'study.db'}")
    trials = [t for t in study.trials if t.state.is_finished()]
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)

    independent = trials[: args.independent or len(trials)]
    rows = []
    for trial in independent:
        run_dir = args.out / "independent" / f"trial_{trial.number}"
        values = [f"{key}={value}" for key, value in trial.params.items()]
        seconds = kdcl(["train", *common, *values, "cache=false", f"hydra.run.dir={run_dir}"])
        best = pd.read_csv(run_dir / "summary.csv").set_index("model").loc["distill", "best_val_acc"]
        rows.append({"trial": trial.number, **trial.params, "seconds": seconds, "best_val_acc": best})
    runs = pd.DataFrame(rows)
    runs.to_csv(args.out / "independent.csv", index=False)

    independent_s = runs["seconds"].mean() * len(trials)
    measured = "measured" if len(runs) == len(trials) else f"estimated from {len(runs)} runs"
    completed = [t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary = {
        "trials": len(trials),
        "pruned": pruned,
        "search_seconds": round(search_s, 1),
        "independent_seconds": round(independent_s, 1),
        "cost_ratio": round(search_s / independent_s, 3),
        "search_best_val_acc": max(completed) if completed else float("nan"),
        "independent_best_val_acc": runs["best_val_acc"].max(),
    }
    pd.DataFrame([summary]).to_csv(args.out / "tune_cost.csv", index=False)
    print(f"search: {len(trials)} trials, {pruned} pruned, {search_s:.0f} s")
    print(f"independent runs: {independent_s:.0f} s ({measured})")
    print(f"cost ratio search / independent = {summary['cost_ratio']:.3f} (target ≤ 0.25)")
    print(
        f"best val acc: search {summary['search_best_val_acc']:.4f}, "
        f"independent runs (of those timed) {summary['independent_best_val_acc']:.4f}"
    )
    print(f"wrote {args.out / 'tune_cost.csv'}")


if __name__ == "__main__":
    main()
