"""A run's progress while it trains: a live line on a terminal, and elsewhere (a log file,
Slurm, ``tee``) a plain log line every ``trainer.progress_every_s`` seconds, so that a long
epoch is never silent.

Both say the same: the stage (i of n), its epoch and optimizer step, the running mean of the
epoch's training loss, the throughput in examples per second over the epoch so far, and the
time left for the stage and for the run. The time left is an estimate: the stage's remaining
steps at its rate so far (validation included), and the later stages' steps at that same
rate (a stage of another model trains at another rate, and one the stage cache holds takes
none). Reading the loss is a host sync on a GPU: it is read only when a line is drawn (at
most once a second), never at every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TextColumn

from kdcl import distributed
from kdcl.output.console import console, interactive

log = logging.getLogger(__name__)

LIVE_EVERY_S = 1.0  # how often the live line is redrawn


def clock(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS`` (``M:SS`` under an hour)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgress:
    """The stages of a run as they train. ``plan`` names them in order, with their optimizer
    steps (the stage i of n and the run's time left count them); a stage outside the plan
    (or without one) is counted when it starts. ``every_s``: seconds between plain lines."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.planned: list[tuple[str, int]] = []

    def plan(self, stages: Sequence[tuple[str, int]]) -> None:
        self.planned = list(stages)

    def place(self, name: str) -> tuple[int, int, int]:
        """Stage ``name``'s number, the number of stages and the steps of the stages after it."""
        names = [n for n, _ in self.planned]
        if name not in names:
            self.planned.append((name, 0))
            names.append(name)
        i = names.index(name)
        return i + 1, len(names), sum(steps for _, steps in self.planned[i + 1 :])

    @contextmanager
    def stage(self, name: str, steps: int, epochs: int) -> Iterator[StageProgress]:
        """Show stage ``name`` of ``steps`` optimizer steps in ``epochs`` epochs while inside."""
        number, count, later = self.place(name)
        shown = StageProgress(f"{name} ({number}/{count})", steps, epochs, later, self.every_s)
        if not distributed.is_main():
            shown.draw = lambda line, step: None
            yield shown
        elif interactive():
            columns = (BarColumn(bar_width=20), TextColumn("{task.description}"))
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task(shown.title, total=steps)
                shown.every_s = LIVE_EVERY_S
                shown.draw = lambda line, step: bar.update(task, completed=step, description=line)
                yield shown
        else:
            yield shown


class StageProgress:
    """One stage's progress: :meth:`update` after every optimizer step; a line is drawn when
    ``every_s`` seconds have passed since the last (the first on a terminal at once)."""

    def __init__(self, title: str, steps: int, epochs: int, later_steps: int, every_s: float):
        self.title, self.steps, self.epochs, self.later_steps, self.every_s = title, steps, epochs, later_steps, every_s
        self.draw: Callable[[str, int], None] = lambda line, step: log.info("%s", line)
        self.opened = time.perf_counter()
        self.started: tuple[float, int] | None = None  # (time, step) the rate counts from
        self.epoch_started: tuple[int, float, int] = (0, 0.0, 0)  # (epoch, time, examples) as it began
        self.next_at = 0.0

    def update(self, step: int, epoch: int, examples: int, loss: Callable[[], float]) -> None:
        """After optimizer step ``step`` (counted from the stage's start) of ``epoch``, with
        ``examples`` trained on so far in the epoch; ``loss()`` reads its running loss."""
        now = time.perf_counter()
        if self.started is None:  # the first step since the stage (or its resumed run) began
            self.started = (self.opened, step - 1)
            self.next_at = self.opened + (self.every_s if self.every_s > LIVE_EVERY_S else 0.0)
        if epoch != self.epoch_started[0]:
            self.epoch_started = (epoch, now, examples)
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        self.draw(self.line(step, epoch, examples, loss(), now), step)

    def line(self, step: int, epoch: int, examples: int, loss: float, now: float) -> str:
        """What is shown after ``step``: stage, epoch, step, loss, examples/s, time left."""
        assert self.started is not None
        t0, step0 = self.started
        per_step = (now - t0) / (step - step0)
        _, epoch_t0, epoch_examples = self.epoch_started
        speed = f"{(examples - epoch_examples) / (now - epoch_t0):.0f}" if now > epoch_t0 else "-"
        left = (self.steps - step) * per_step
        return (
            f"{self.title}  epoch {epoch}/{self.epochs}  step {step}/{self.steps}  loss {loss:.4f}  "
            f"{speed} ex/s  left: stage {clock(left)}, run {clock(left + self.later_steps * per_step)}"
        )
