"""The top-K teacher cache against the full one: memory and lookup speed, one process.

    python benchmarks/topk_cache.py [--classes 100] [--topk 10] [--examples 50000] [--views 4]

CIFAR-100's shape by default (50,000 training images, 100 classes), random pixels and a
random teacher: what is measured (bytes per view, the cost of a batch's feed call — its
views' pixels and its teacher logits, looked up and decoded — next to a student's
training step) does not depend on what the images show. The student step is
``vgg_small``'s forward and backward on a batch, the floor a cached step cannot go under.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcl.data import Preprocess, TensorSource
from kdcl.distill.feeds import FeedInputs, build_feed
from kdcl.distill.teachers import Teachers
from kdcl.models import create_model, freeze


def median_ms(run, repeats: int = 7, calls: int = 20) -> float:
    """The median over ``repeats`` of the mean time of ``calls`` calls, in ms."""
    run()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - tic) / calls * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    cpu, c, n = torch.device("cpu"), args.classes, args.examples
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    source = TensorSource.from_arrays(x, rng.integers(0, c, n), np.arange(n), cpu)
    pre = Preprocess([0.5] * 3, [0.25] * 3, crop_padding=4, flip=True, device=cpu, channels_last=True, seed=0)
    torch.manual_seed(0)
    teacher = Teachers([freeze(create_model("vgg", c, (3, 32, 32), width=8))])
    student = create_model("vgg", c, (3, 32, 32), width=8).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)

    def caches(topk: int | None):
        inputs = FeedInputs(
            preprocess=pre,
            train=source,
            teacher_at=lambda step: teacher,
            autocast=nullcontext,
            num_classes=c,
            batch_size=512,
            seed=0,
            views=args.views,
            store="memory",
            directory=Path("."),
            shard_mb=512.0,
            topk=topk,
        )
        tic = time.perf_counter()
        feed = build_feed(f"views:{args.views}", inputs)
        return feed, time.perf_counter() - tic

    idx = torch.randperm(n)[: args.batch]
    ((_, xb, yb),) = source.batches([idx])
    rows = []
    for topk in (None, args.topk):
        feed, fill_s = caches(topk)
        size = sum(t.numel() * t.element_size() for t in feed.logits.tables.values())
        lookup = median_ms(lambda feed=feed: feed(0, 1, idx, xb, yb))

        def student_step():
            loss = F.cross_entropy(student(pre(xb, train=True)), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        rows.append((topk or c, size, lookup, median_ms(student_step, calls=5), fill_s))
    full = rows[0]
    print(f"{n} examples × {args.views} views, {c} classes, batch {args.batch}, {torch.get_num_threads()} threads")
    print("kept      | cache MB | ×full | bytes/view | lookup ms/batch | student step ms | lookup/step")
    for k, size, lookup, step, _ in rows:
        per_view = size / (n * args.views)
        print(
            f"top-{k:<5} | {size / 2**20:8.2f} | {size / full[1]:5.3f} | {per_view:10.0f} | "
            f"{lookup:15.3f} | {step:15.2f} | {lookup / step:11.3f}"
        )


if __name__ == "__main__":
    main()
