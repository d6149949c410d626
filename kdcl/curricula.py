"""Curricula: difficulty scorers, orders, pacing functions and the step-wise data plans.

A curriculum scores the training examples (*scorer*), orders them (*order*) and decides,
at every optimizer step, which examples the student draws its batch from and how much
each one counts (a *plan*). Everything is measured in optimizer steps: a run with a
curriculum takes exactly as many steps, under the same LR schedule, as one without
(Wu, Dyer & Neyshabur 2021). Orders, scorers, pacing functions and plans are registries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcl import distributed
from kdcl.data import interleave_classes
from kdcl.errors import KdclError
from kdcl.registry import Registry

# needs_student_model: the scorer reads a student-architecture model's logits
# (ScoreContext.self_taught_logits), which the run trains for it when nothing else does.
# needs_teacher_logits: the scorer reads the teacher's logits on the training split
# (ScoreContext.teacher_logits), a pass of the teacher over it.
SCORERS: Registry[Callable[[ScoreContext], Tensor]] = Registry(
    "curriculum scorer", traits={"needs_student_model": False, "needs_teacher_logits": True}
)
register_scorer = SCORERS.register
# uses_difficulty: the order depends on the difficulties it is given (random does not).
ORDERS: Registry[Callable[[Tensor, torch.Generator], Tensor]] = Registry(
    "curriculum order", traits={"uses_difficulty": True}
)
register_order = ORDERS.register
PACINGS: Registry[Callable[..., Pacing]] = Registry("pacing function")
register_pacing = PACINGS.register
# scheduled: the plan changes what a step draws or how much an example counts (none does not);
# ranked: it feeds examples in the order a scorer ranks them (a summary row names it scorer/order).
PLANS: Registry[Callable[[PlanInputs], DataSchedule]] = Registry(
    "curriculum type", traits={"scheduled": True, "ranked": False}
)
register_plan = PLANS.register
# curriculum.weights of type self_paced: the weight v_i of an example of loss ℓ_i under threshold λ.
SELF_PACED_WEIGHTS: Registry[Callable[[Tensor, float], Tensor]] = Registry("self-paced weighting")

Pacing = Callable[[int], float]  # optimizer step -> fraction of the data in use


# --------------------------------------------------------------------------- scorers
class ScoreUnavailable(Exception):
    """The inputs this scorer needs do not exist in this run."""


@dataclass
class ScoreContext:
    """What scorers may use. Each scorer returns one difficulty per training example
    (higher is harder), from the trained teacher's logits on the training split
    (no augmentation) unless it says otherwise."""

    labels: Tensor  # (N,) int64
    teacher_logits: Tensor | None  # (N, C) float32; None: no scorer asked for the teacher's pass
    seed: int
    learned_epoch: Tensor | None = None  # logged while the teacher trained in this run
    self_taught_logits: Callable[[], Tensor] | None = None  # a student-architecture model's logits
    tokens: Tensor | None = None  # text data: the training split's (N, L) token ids, right-padded
    pad_id: int = 0

    def token_mask(self, scorer: str) -> tuple[Tensor, Tensor]:
        """The training ids (on the CPU) and their mask (True: not padding); images have none."""
        if self.tokens is None:
            raise ScoreUnavailable(f"{scorer} scores texts, and this run's data is images")
        tokens = self.tokens.cpu()
        return tokens, tokens != self.pad_id

    def teacher_output(self, scorer: str) -> Tensor:
        """The teacher's logits on the training split, as float32."""
        if self.teacher_logits is None:
            raise ScoreUnavailable(f"{scorer} reads the teacher's logits, and the teacher did not score the data")
        return self.teacher_logits.float()

    def teacher_probs(self, scorer: str) -> Tensor:
        return torch.softmax(self.teacher_output(scorer), 1)


@register_scorer("teacher_loss")
def teacher_loss(ctx: ScoreContext) -> Tensor:
    """``d_i = −log softmax(z_t(x_i))_{y_i}``: the teacher's cross-entropy ("transfer"
    scoring, Hacohen & Weinshall 2019)."""
    return F.cross_entropy(ctx.teacher_output("teacher_loss"), ctx.labels, reduction="none")


@register_scorer("teacher_confidence")
def teacher_confidence(ctx: ScoreContext) -> Tensor:
    """``d_i = 1 − p_t(y_i | x_i)``: one minus the teacher's probability of the true class."""
    return 1 - ctx.teacher_probs("teacher_confidence").gather(1, ctx.labels[:, None]).squeeze(1)


@register_scorer("teacher_margin")
def teacher_margin(ctx: ScoreContext) -> Tensor:
    """``d_i = −(p_t(y_i) − max_{j≠y_i} p_t(j))``: a negative margin means the teacher
    prefers a wrong class."""
    p = ctx.teacher_probs("teacher_margin")
    true = p.gather(1, ctx.labels[:, None]).squeeze(1)
    other = p.scatter(1, ctx.labels[:, None], -1.0).max(1).values
    return other - true


@register_scorer("learned_epoch", needs_teacher_logits=False)
def learned_epoch(ctx: ScoreContext) -> Tensor:
    """``d_i`` = the first epoch after which the teacher's training-time prediction for
    the example stays correct (E + 1 if it never does), logged during teacher training
    from the training forward passes (Toneva et al. 2019's learning events)."""
    if ctx.learned_epoch is None:
        raise ScoreUnavailable("learned_epoch needs the teacher trained in this run (not teacher.checkpoint)")
    return ctx.learned_epoch.float()


@register_scorer("self_taught", needs_student_model=True, needs_teacher_logits=False)
def self_taught(ctx: ScoreContext) -> Tensor:
    """``d_i`` = cross-entropy of a model of the *student's* architecture trained normally
    (the baseline stage's model when there is one) — "self-taught" scoring (Hacohen & Weinshall 2019)."""
    if ctx.self_taught_logits is None:
        raise ScoreUnavailable("self_taught needs the baseline stage or curriculum.scorer=self_taught")
    return F.cross_entropy(ctx.self_taught_logits().float(), ctx.labels, reduction="none")


@register_scorer("length", needs_teacher_logits=False)
def token_length(ctx: ScoreContext) -> Tensor:
    """``d_i = |x_i|``: the number of tokens of text i (after truncation, ``[CLS]`` and
    ``[SEP]`` included): longer texts are harder (the sentence-length curriculum of
    Spitkovsky et al. 2010 and Platanios et al. 2019)."""
    _, mask = ctx.token_mask("length")
    return mask.sum(1).float()


@register_scorer("rarity", needs_teacher_logits=False)
def token_rarity(ctx: ScoreContext) -> Tensor:
    """``d_i = (1/|x_i|) Σ_{w ∈ x_i} 1 / c(w)``: the mean inverse frequency of text i's
    tokens, ``c(w)`` counting token ``w`` over the whole training split: texts of rare
    words are harder (word rarity, Platanios et al. 2019, with inverse counts)."""
    tokens, mask = ctx.token_mask("rarity")
    counts = torch.bincount(tokens[mask], minlength=int(tokens.max()) + 1).float()
    inverse = torch.where(mask, 1 / counts.clamp(min=1)[tokens], torch.zeros(()))
    return inverse.sum(1) / mask.sum(1).clamp(min=1)


@register_scorer("random", needs_teacher_logits=False)
def random_scores(ctx: ScoreContext) -> Tensor:
    """``d_i ~ U(0, 1)``, seeded: a difficulty that carries no information."""
    return torch.rand(len(ctx.labels), generator=torch.Generator().manual_seed(ctx.seed))


def score(ctx: ScoreContext, names: Iterable[str], needed: Collection[str]) -> dict[str, Tensor]:
    """The difficulties of the scorers of ``names`` (and of ``needed``) that this run can
    compute; a scorer of ``needed`` that it cannot is an error."""
    for name in needed:
        SCORERS.get(name)  # an unknown name is a clear error
    scores = {}
    for name in dict.fromkeys([*names, *needed]):
        try:
            scores[name] = SCORERS.get(name)(ctx)
        except ScoreUnavailable as why:
            if name in needed:
                raise KdclError(f"curriculum.scorer={name} is unavailable: {why}") from None
    return scores


# --------------------------------------------------------------------------- orders
def _tie_broken(keys: Tensor, generator: torch.Generator) -> Tensor:
    """Indices sorting ``keys`` ascending, ties in random order (data files are often sorted by class)."""
    perm = torch.randperm(len(keys), generator=generator)
    return perm[torch.argsort(keys[perm], stable=True)]


@register_order("easy_first")
def easy_first(difficulty: Tensor, generator: torch.Generator) -> Tensor:
    """Ascending difficulty: the curriculum."""
    return _tie_broken(difficulty, generator)


@register_order("hard_first")
def hard_first(difficulty: Tensor, generator: torch.Generator) -> Tensor:
    """Descending difficulty: the anti-curriculum."""
    return _tie_broken(-difficulty, generator)


@register_order("random", uses_difficulty=False)
def random_order(difficulty: Tensor, generator: torch.Generator) -> Tensor:
    """A random order under the same pacing: the control every curriculum must beat."""
    return torch.randperm(len(difficulty), generator=generator)


def make_order(difficulty: Tensor, labels: Tensor, order: str, class_balanced: bool, seed: int) -> Tensor:
    """Examples in curriculum order; ``class_balanced`` interleaves the classes at every
    difficulty level (each prefix keeps the class proportions)."""
    ordered = ORDERS.get(order)(difficulty, torch.Generator().manual_seed(seed))
    if class_balanced:
        ordered = torch.from_numpy(interleave_classes(ordered.numpy(), labels.numpy()))
    return ordered


# --------------------------------------------------------------------------- pacing
# Wu, Dyer & Neyshabur (ICLR 2021), "When Do Curricula Work?": N examples, T steps,
# a = full_at (fraction of T at which all data is used), b = start (starting fraction).
# Each returns g(t), the fraction of the data in use at step t; the pool is ceil(N·g(t)).


def _wu(shape: Callable[[float], float], total_steps: int, start: float, full_at: float) -> Pacing:
    """``g(t) = min(1, b + (1 − b)·shape(t / (a·T)))``."""
    return lambda t: min(1.0, start + (1 - start) * shape(t / (full_at * total_steps)))


@register_pacing("linear")
def linear(total_steps: int, start: float = 0.2, full_at: float = 0.8) -> Pacing:
    """Linear pacing (Wu et al. 2021): ``g(t) = min(1, b + (1 − b)·t/(aT))``."""
    return _wu(lambda x: x, total_steps, start, full_at)


@register_pacing("quad")
def quad(total_steps: int, start: float = 0.2, full_at: float = 0.8) -> Pacing:
    """Quadratic pacing (Wu et al. 2021): ``g(t) = min(1, b + (1 − b)·(t/(aT))²)``."""
    return _wu(lambda x: x**2, total_steps, start, full_at)


@register_pacing("root")
def root(total_steps: int, start: float = 0.2, full_at: float = 0.8) -> Pacing:
    """Square-root pacing (Wu et al. 2021): ``g(t) = min(1, b + (1 − b)·(t/(aT))^½)``."""
    return _wu(math.sqrt, total_steps, start, full_at)


@register_pacing("step")
def step(total_steps: int, start: float = 0.2, full_at: float = 0.8) -> Pacing:
    """Step pacing (Wu et al. 2021): ``g(t) = min(1, b + ⌊t/(aT)⌋)`` — fraction b until aT, then all."""
    return lambda t: min(1.0, start + math.floor(t / (full_at * total_steps)))


@register_pacing("exp")
def exp(total_steps: int, start: float = 0.2, full_at: float = 0.8, c: float = 10.0) -> Pacing:
    """Exponential pacing (Wu et al. 2021): ``g(t) = min(1, b + (1 − b)·(e^{c·t/(aT)} − 1)/(e^c − 1))``, c = 10."""
    return _wu(lambda x: (math.exp(c * x) - 1) / (math.exp(c) - 1), total_steps, start, full_at)


@register_pacing("log")
def log(total_steps: int, start: float = 0.2, full_at: float = 0.8, c: float = 10.0) -> Pacing:
    """Logarithmic pacing (Wu et al. 2021): ``g(t) = min(1, b + (1 − b)·(1 + ln(t/(aT) + e^{−c})/c))``, c = 10."""
    return _wu(lambda x: 1 + math.log(x + math.exp(-c)) / c, total_steps, start, full_at)


@register_pacing("fixed_exp")
def fixed_exp(total_steps: int, start: float = 0.04, inc: float = 1.9, phase: float = 0.05) -> Pacing:
    """Fixed exponential pacing, Hacohen & Weinshall (ICML 2019): ``g(t) = min(1, s·inc^⌊t/L⌋)``,
    s = start, L = phase·T steps per phase."""
    length = max(1, round(phase * total_steps))
    return lambda t: min(1.0, start * inc ** math.floor(t / length))


@register_pacing("baby_steps")
def baby_steps(total_steps: int, buckets: int = 5, full_at: float = 0.8) -> Pacing:
    """Baby steps (Spitkovsky et al. 2010; Cirik et al. 2016): k difficulty buckets added one at a
    time, all in use at aT: ``g(t) = min(1, (⌊t·k/(aT)⌋ + 1)/k)``."""
    return lambda t: min(1.0, (math.floor(t * buckets / (full_at * total_steps)) + 1) / buckets)


def full_data(step: int) -> float:
    """No curriculum: every example is in the pool at every step."""
    return 1.0


# --------------------------------------------------------------------------- plans
class DataSchedule:
    """Which examples each optimizer step draws its batch from, and how much each counts.

    ``order`` lists the training examples easiest first. At step t the pool is the first
    ``pool_size(t)`` of them. Batches are drawn without replacement from a shuffled pool;
    the pool is reshuffled when it changes size or is used up. With the full pool and
    ``steps_per_epoch = ceil(N / batch_size)`` this is exactly one random permutation
    per epoch. Subclasses change the pool size, weight examples, or react to validation.
    """

    def __init__(self, order: Tensor, batch_size: int, seed: int):
        self.order = order
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._pool: Tensor = order[:0]
        self._pos = 0
        self.last_fraction = math.nan  # the pool's share of the data at the last step drawn

    def pool_fraction(self, step: int) -> float:
        return 1.0

    @property
    def order_fixed(self) -> bool:
        """Whether every step's batch is known from the seed alone (no epoch's validation
        result changes what later steps draw)."""
        return True

    def pool_size(self, step: int) -> int:
        n = len(self.order)
        return max(1, min(n, math.ceil(n * self.pool_fraction(step) - 1e-9)))

    def fraction(self, step: int) -> float:
        return self.pool_size(step) / len(self.order)

    def batches(self, steps: range) -> Iterator[Tensor]:
        for t in steps:
            n = self.pool_size(t)
            if n != len(self._pool) or self._pos >= n:
                self._pool = self.order[:n][torch.randperm(n, generator=self.generator)]
                self._pos = 0
            yield self._pool[self._pos : self._pos + self.batch_size]
            self._pos += self.batch_size
        self.last_fraction = len(self._pool) / len(self.order)

    def epoch_batches(self, steps: range, start_state: dict[str, Any] | None = None) -> list[Tensor]:
        """The index batches of one epoch, drawn up front. ``start_state`` (the plan as it
        was when the epoch began) redraws an epoch that was interrupted half-way."""
        if start_state is None:
            return list(self.batches(steps))
        now = self.state_dict()
        self.load_state_dict(start_state)
        batches = list(self.batches(steps))
        self.load_state_dict(now)
        return batches

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes while training (tensors and numbers only)."""
        state = {k: v for k, v in vars(self).items() if not callable(v) and not isinstance(v, torch.Generator)}
        return {**state, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.generator.set_state(state.pop("generator"))
        vars(self).update(state)

    def sample_weights(self, idx: Tensor, losses: Tensor, step: int) -> Tensor | None:
        """Per-example weights of this batch's losses (None: all 1)."""
        return None

    def collect(self) -> None:
        """Add up what the ranks counted apart since the last call (under DDP each rank
        sees its part of every batch; a collective there), before a save or a read."""

    def epoch_end(self, epoch: int, val_logits: Tensor, val_labels: Tensor) -> dict[str, Any]:
        """Adapt to the epoch's validation result; return columns for the metrics row."""
        return {"data_fraction": self.last_fraction}


@dataclass
class PlanInputs:
    """What the curriculum stage knows when it builds a plan for a training stage."""

    spec: Any  # the curriculum section (a kdcl.config.schema.CurriculumConfig, read by attribute)
    order: Tensor  # examples easiest first
    rank: Tensor  # (N,) difficulty rank in [0, 1], 0 easiest
    labels: Tensor
    class_difficulty: Tensor  # (C,) mean difficulty of each class
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    seed: int


@register_plan("none", scheduled=False)
def no_curriculum(p: PlanInputs) -> DataSchedule:
    """All data at every step."""
    return DataSchedule(torch.arange(len(p.labels)), p.batch_size, p.seed)


class PacedSchedule(DataSchedule):
    """Pool = the easiest ``ceil(N·g(τ))`` examples, g a pacing function of the curriculum clock τ.

    τ is the optimizer step, except with ``adaptive_delta`` (performance-adaptive pacing):
    after each epoch the clock runs on through the next epoch only if validation accuracy
    improved by at least δ since the last advance, and stands still otherwise. The step
    budget never changes. With ``weight_start`` s0 each example's loss is weighted
    ``w_i(t) = 1 − (1 − s(t))·r_i``, r_i its difficulty rank in [0, 1] and s(t) rising
    linearly from s0 to 1 over the run (a difficulty-scaled loss).
    """

    def __init__(self, p: PlanInputs):
        super().__init__(p.order, p.batch_size, p.seed)
        pacing = dict(vars(p.spec.pacing))  # with a pacing function's own keys
        self.pacing = PACINGS.create(pacing.pop("name"), p.total_steps, **pacing)
        self.delta = p.spec.adaptive_delta
        self.weight_start = p.spec.weight_start
        self.rank, self.total_steps, self.steps_per_epoch = p.rank, p.total_steps, p.steps_per_epoch
        self._clock, self._running, self._epoch_start, self._best = 0, True, 0, -math.inf

    def pool_fraction(self, step: int) -> float:
        return self.pacing(self._clock + (step - self._epoch_start if self._running else 0))

    @property
    def order_fixed(self) -> bool:
        return self.delta is None  # performance-adaptive pacing follows validation accuracy

    def sample_weights(self, idx: Tensor, losses: Tensor, step: int) -> Tensor | None:
        if self.weight_start is None:
            return None
        s = self.weight_start + (1 - self.weight_start) * step / self.total_steps
        if self.rank.device != idx.device:
            self.rank = self.rank.to(idx.device, non_blocking=True)  # once per stage; a blocking copy waits for the GPU
        return 1 - (1 - s) * self.rank[idx]

    def epoch_end(self, epoch: int, val_logits: Tensor, val_labels: Tensor) -> dict[str, Any]:
        columns = super().epoch_end(epoch, val_logits, val_labels)
        self._clock += self.steps_per_epoch if self._running else 0
        self._epoch_start = epoch * self.steps_per_epoch
        if self.delta is not None:
            acc = (val_logits.argmax(1) == val_labels).float().mean().item()
            self._running = acc >= self._best + self.delta
            self._best = acc if self._running else self._best
            columns["pacing_advancing"] = int(self._running)
        return columns


register_plan("paced", ranked=True)(PacedSchedule)


class SelfPacedSchedule(DataSchedule):
    """Self-paced learning: all data is drawn, but only examples whose current loss ℓ_i
    (the student's cross-entropy with the label) is below λ count. Hard weights (Kumar, Packer & Koller 2010): ``v_i = 1[ℓ_i < λ]``; soft
    linear weights (Jiang et al. 2014): ``v_i = max(0, 1 − ℓ_i/λ)`` (``weights``, one of
    :data:`SELF_PACED_WEIGHTS`). λ starts at ``lambda_start`` and is multiplied by ``mu``
    after every epoch.
    """

    def __init__(self, p: PlanInputs):
        super().__init__(torch.arange(len(p.labels)), p.batch_size, p.seed)
        self.lam, self.mu = float(p.spec.lambda_start), float(p.spec.mu)
        self.weigh = SELF_PACED_WEIGHTS.get(p.spec.weights)
        self._active, self._seen = 0.0, 0  # this epoch's examples with weight > 0, and all, over the ranks
        self._new_active: Tensor | float = 0.0  # this rank's since the last collect
        self._new_seen = 0

    def sample_weights(self, idx: Tensor, losses: Tensor, step: int) -> Tensor:
        v = self.weigh(losses, self.lam)
        self._new_active = self._new_active + (v > 0).sum()  # on the device, read at collect
        self._new_seen += len(v)
        return v

    def collect(self) -> None:
        active, seen = distributed.sum_values(float(self._new_active), self._new_seen)
        self._active, self._seen = self._active + active, self._seen + int(seen)
        self._new_active, self._new_seen = 0.0, 0

    def epoch_end(self, epoch: int, val_logits: Tensor, val_labels: Tensor) -> dict[str, Any]:
        self.collect()
        columns = {
            **super().epoch_end(epoch, val_logits, val_labels),
            "spl_lambda": self.lam,
            "spl_active": self._active / max(self._seen, 1),
        }
        self.lam *= self.mu
        self._active, self._seen = 0.0, 0
        return columns


register_plan("self_paced")(SelfPacedSchedule)


@SELF_PACED_WEIGHTS.register("hard")
def hard_weights(losses: Tensor, lam: float) -> Tensor:
    """Kumar, Packer & Koller (2010): ``v_i = 1[ℓ_i < λ]``."""
    return (losses < lam).float()


@SELF_PACED_WEIGHTS.register("soft")
def soft_weights(losses: Tensor, lam: float) -> Tensor:
    """Linear soft weights (Jiang et al. 2014): ``v_i = max(0, 1 − ℓ_i/λ)``."""
    return torch.clamp(1 - losses / lam, min=0)


class ClassSchedule(DataSchedule):
    """Class curriculum — a task that grows from ``start_classes`` classes to all of them.

    Classes enter easiest first (lowest mean difficulty). One more class (``add_classes``)
    enters every ``every_epochs`` epochs, or — performance-driven task selection,
    T(t+1) = f(T(t), P(t)) — as soon as validation accuracy on the classes seen so far
    reaches ``threshold``. Either rule may be null; with both, whichever comes first.
    """

    def __init__(self, p: PlanInputs):
        self.class_order = torch.argsort(p.class_difficulty, stable=True)
        position = torch.empty_like(self.class_order)
        position[self.class_order] = torch.arange(len(self.class_order))
        # Whole classes enter the pool at once, so only the class order matters here.
        super().__init__(torch.argsort(position[p.labels], stable=True), p.batch_size, p.seed)
        self.counts = torch.bincount(p.labels, minlength=len(self.class_order))[self.class_order].cumsum(0)
        s = p.spec
        self.seen = min(s.start_classes, len(self.class_order))
        self.add, self.every, self.threshold = s.add_classes, s.every_epochs, s.threshold
        self._since = 0

    def pool_fraction(self, step: int) -> float:
        return self.counts[self.seen - 1].item() / len(self.order)

    @property
    def order_fixed(self) -> bool:
        return self.threshold is None  # classes may enter when validation accuracy reaches it

    def epoch_end(self, epoch: int, val_logits: Tensor, val_labels: Tensor) -> dict[str, Any]:
        seen = self.class_order[: self.seen]
        mask = torch.isin(val_labels, seen)
        acc_seen = (val_logits[mask].argmax(1) == val_labels[mask]).float().mean().item()
        columns = {
            **super().epoch_end(epoch, val_logits, val_labels),
            "seen_classes": self.seen,
            "val_acc_seen": acc_seen,
        }
        self._since += 1
        due = self.every is not None and self._since >= self.every
        passed = self.threshold is not None and acc_seen >= self.threshold
        if (due or passed) and self.seen < len(self.class_order):
            self.seen, self._since = min(self.seen + self.add, len(self.class_order)), 0
        return columns


register_plan("classes")(ClassSchedule)


class LearnedEpochs:
    """Per training example, the last epoch in which the model's training-time prediction
    was wrong, recorded from the training forward passes at no extra cost."""

    def __init__(self, n: int, device: torch.device):
        self.last_wrong = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, idx: Tensor, logits: Tensor, target: Tensor, epoch: int) -> None:
        wrong = logits.argmax(1) != target
        self.last_wrong[idx[wrong]] = epoch

    def learned_epoch(self) -> Tensor:
        """The first epoch after which the prediction stayed correct (E + 1: never)."""
        return self.last_wrong.cpu() + 1


def class_difficulty(scores: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C,) the mean difficulty of each class's examples (0 for a class without any)."""
    total = torch.zeros(num_classes).index_add_(0, labels, scores.float())
    return total / torch.bincount(labels, minlength=num_classes).clamp(min=1)


def difficulty_rank(order: Tensor) -> Tensor:
    """Each example's position in ``order`` scaled to [0, 1] (0 = first)."""
    rank = torch.empty(len(order), dtype=torch.float32)
    rank[order] = torch.arange(len(order), dtype=torch.float32) / max(len(order) - 1, 1)
    return rank
