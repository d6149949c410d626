"""The one-screen summary of ``benchmarks/gpu_check.sh``: each phase's outcome, the tests,
images/s of every bench pair against the speed targets, and the time-to-accuracy stages.

Reads the check's working folder (``phases.tsv``, ``bench_<label>/bench.csv``, ``tta/``) and
writes ``bench.csv``, ``tta_stages.csv`` and ``summary.txt`` into the output folder.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import pandas as pd

PAIRS = {  # bench label → what it ran
    "cnn": "cnn → cnn_small",
    "resnet32x4": "resnet32x4 → resnet8x4",
    "resnet50": "resnet50 → mobilenet_v2",
    "cnn_compiled": "cnn → cnn_small, compiled",
    "folder": "resnet50 → mobilenet_v2, JPEGs",  # 224 px, stored soft labels (top-10, on disk)
}
# The targets of the GPU path, each a bench.csv value: (arm, column, at least / at most, bound).
TARGETS = [
    ("kdcl", "vs_naive", ">=", 3.0, "online kdcl ≥ 3× naive"),
    ("kdcl_cached", "vs_naive", ">=", 5.0, "cached ≥ 5× naive"),
    ("kdcl_cached", "vs_student_time", "<=", 1.1, "cached step ≤ 1.1× student step"),
]


def phases(work: Path) -> list[str]:
    path = work / "phases.tsv"
    if not path.is_file():
        return ["no phase ran"]
    lines = []
    for name, rc, seconds in (line.split("\t") for line in path.read_text().splitlines()):
        state = {"0": "ok", "124": "TIMED OUT", "137": "TIMED OUT"}.get(rc, f"FAILED (exit {rc})")
        lines.append(f"  {name:<36} {state:<18} {seconds:>4} s")
    return lines


def tests(out: Path) -> str:
    path = out / "tests.xml"
    if not path.is_file():
        return "tests: no report"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [
        case.get("name")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    text = f"tests marked gpu: {passed} passed, {len(failed)} failed, {counts['skipped']} skipped"
    return text + "".join(f"\n  FAILED {name}" for name in failed)


def bench(work: Path, out: Path) -> list[str]:
    frames = []
    for label in PAIRS:
        path = work / f"bench_{label}" / "bench.csv"
        if path.is_file():
            frames.append(pd.read_csv(path).assign(pair=label))
    if not frames:
        return ["bench: no table"]
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(out / "bench.csv", index=False)
    first = table.iloc[0]
    lines = [
        f"bench, images/s (batch {first['batch_size']}, {first['steps']} steps × {first['repeats']} repeats, "
        f"{first['dataset']} on {first['device']}) and the ratios the targets bound:",
        f"  {'pair':<28} {'naive':>8} {'kdcl':>8} {'cached':>8} {'student':>8}"
        f"  {'kdcl/naive':>10} {'cached/naive':>12} {'cached/student':>14}  {'peak MiB':>8}",
    ]
    for label, arms in table.groupby("pair", sort=False):
        arm = arms.set_index("arm")
        rate = arm["images_per_s"]
        marks = []
        for name, column, sense, bound, _ in TARGETS:
            value = arm.loc[name, column]
            met = value >= bound if sense == ">=" else value <= bound
            marks.append(f"{value:.3f}{'' if met else ' MISS'}")
        peak = arm["max_memory_mb"].max()
        lines.append(
            f"  {PAIRS[label]:<28} {rate['naive']:>8.0f} {rate['kdcl']:>8.0f} {rate['kdcl_cached']:>8.0f} "
            f"{rate['student']:>8.0f}  {marks[0]:>10} {marks[1]:>12} {marks[2]:>14}  "
            f"{'' if math.isnan(peak) else f'{peak:.0f}':>8}"
        )
    lines.append("  targets: " + "; ".join(text for *_, text in TARGETS) + " (MISS: not met)")
    return lines


# A stage's first line in train.log: "[2026-11-30 14:51:13,685][kdcl.scenarios.standard][INFO] teacher: resnet32x4, ..."
STAGE_START = re.compile(r"^\[([\d-]+ [\d:]+,\d+)\]\[kdcl\.scenarios\.standard\]\[INFO\] (\S+): \S+, [\d,]+ params,")
LOG_TIME = re.compile(r"^\[([\d-]+ [\d:]+,\d+)\]")


def stage_walls(log: Path) -> dict[str, float]:
    """Seconds from each stage's first line in ``train.log`` to the next stage's (the last
    stage: to the log's last line): its training, evaluation, checkpoints and any teacher
    cache fill, which the summary's ``seconds`` (the training loop's) leave out."""
    if not log.is_file():
        return {}
    starts, last = [], None
    for line in log.read_text().splitlines():
        if stamp := LOG_TIME.match(line):
            last = datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f")
        if start := STAGE_START.match(line):
            starts.append((start[2], last))
    ends = [t for _, t in starts[1:]] + [last]
    return {name: (end - begun).total_seconds() for (name, begun), end in zip(starts, ends)}


def time_to_accuracy(work: Path, out: Path) -> list[str]:
    run = work / "tta"
    if not (run / "summary.csv").is_file():
        return ["time to accuracy: no summary"]
    summary = pd.read_csv(run / "summary.csv")
    walls = stage_walls(run / "train.log")
    rows = []
    for _, model in summary.iterrows():
        metrics_path = run / str(model["model"]) / "metrics.csv"
        metrics = pd.read_csv(metrics_path) if metrics_path.is_file() else pd.DataFrame()
        rows.append(
            {
                "stage": model["model"],
                "arch": model["arch"],
                "params": model["params"],
                "epochs": len(metrics),
                "test_acc": model["test_acc"],
                "train_seconds": model["seconds"],
                "wall_seconds": walls.get(str(model["model"]), math.nan),
                "train_images_per_s": metrics["samples_per_s"].mean() if len(metrics) else math.nan,
                "max_memory_mb": metrics["max_memory_mb"].max() if len(metrics) else math.nan,
            }
        )
    stages = pd.DataFrame(rows)
    stages.to_csv(out / "tta_stages.csv", index=False)
    lines = [
        f"time to accuracy (epochs per stage: {stages['epochs'].max()}; train: the training loop with its "
        "validation; wall: the whole stage, teacher cache fill and test included):",
        f"  {'stage':<12} {'arch':<12} {'params':>9} {'test_acc':>8} {'train s':>8} {'wall s':>8} {'img/s':>8}"
        f" {'peak MiB':>8}",
    ]
    for _, r in stages.iterrows():
        peak = "" if math.isnan(r["max_memory_mb"]) else f"{r['max_memory_mb']:.0f}"
        lines.append(
            f"  {r['stage']:<12} {r['arch']:<12} {r['params']:>9,} {r['test_acc']:>8.4f} {r['train_seconds']:>8.1f} "
            f"{r['wall_seconds']:>8.1f} {r['train_images_per_s']:>8.0f} {peak:>8}"
        )
    lines.append(f"  all stages: {stages['wall_seconds'].sum():.1f} s wall")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the check's working folder")
    parser.add_argument("--out", type=Path, required=True, help="where the tables and summary.txt go")
    parser.add_argument("--device", required=True, help="what the check ran on (cuda or cpu)")
    args = parser.parse_args()
    sections = [
        [f"kdcl GPU check on {args.device}: phases"] + phases(args.work),
        [tests(args.out)],
        bench(args.work, args.out),
        time_to_accuracy(args.work, args.out),
    ]
    text = "\n\n".join("\n".join(lines) for lines in sections)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    ran = args.work / "phases.tsv"
    failed = not ran.is_file() or any(line.split("\t")[1] != "0" for line in ran.read_text().splitlines())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
