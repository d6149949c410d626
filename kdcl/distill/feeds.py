"""Where a training step gets its inputs and its teacher's logits: ``distill.teacher_cache``.

A *feed* turns a batch of uint8 training examples into the student's input and the
teacher's logits for exactly those pixels. Three feeds are registered:

- ``none`` (online): augment the batch (images: fresh random parameters; texts: their
  masks of this epoch, :class:`kdcl.data.TextPreprocess`) and run the teacher on it, in eval mode under ``torch.inference_mode()``, every step. One teacher pass per
  example per epoch; a new view every time. For a loss that compares two views
  (``DistillLoss.views == 2``, MLKD) it also draws a strongly augmented copy of the batch
  (:class:`kdcl.data.StrongViews`) and gives both, the plain views first.
- ``no_aug``: for runs without augmentation. The teacher's logits on the training data
  are computed once, before the first step; a step only looks them up.
- ``views:K``: K fixed augmented views per example, drawn once from the run seed: the
  crop/flip parameters of an image, the masked tokens of a text (``dataset.token_mask``,
  :meth:`kdcl.data.TextPreprocess.fixed_views`). The teacher's logits for every view are computed once (K teacher
  passes per example in total, instead of one per epoch). In epoch e the student sees
  view ``(φ_i + e) mod K`` of example i (φ_i a fixed random phase), so teacher and student
  always look at the same input ("consistent teaching") and every view is used once
  per K epochs.

The trade-off (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent"): consistent teaching is what matters, and with few views the student sees
fewer distinct images (K per example instead of one per epoch), which is what "patient"
teaching over long schedules exploits. ``views:K`` buys the teacher's cost down to K passes
per example at the price of that diversity; K ≥ the number of epochs gives every epoch a
new view.

Cached logits are fp16: in memory on the training device, or with
``distill.teacher_cache_store=disk`` in ``.npy`` shards of at most
``distill.teacher_cache_shard_mb`` MB each, read through memory maps.

For many classes, ``distill.teacher_cache_topk=K`` keeps only each view's K largest
logits (fp16), their classes (int16, or int32 past 32,767 classes) and the log of the
softmax mass of all the other classes (:class:`TopKLogits`), as FKD (Shen & Xing 2022) and
ReLabel (Yun et al. 2021) store soft labels. The loss gets the logits back with every other
class at the logit that spreads that mass evenly: at T = 1 the teacher's top-K
probabilities and the total of the rest are exact and only how the rest is shared out is
lost; at other temperatures the rest is an approximation. K = C is exact.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from kdcl import distributed
from kdcl.data import FixedViews, Preprocess, Source, StrongViews, TextPreprocess, fixed_view_keys, step_keys
from kdcl.distill.mixing import BatchMix
from kdcl.distributed import Part
from kdcl.errors import KdclError
from kdcl.files import replacing, write_text
from kdcl.registry import Registry

log = logging.getLogger(__name__)

# caches: the feed computes the teacher's logits once, before the first step, and a stage
# reuses them (none runs the teacher every step). counted: the feed is named NAME:K, K ≥ 1
# (views:K); the others by their name alone.
FEEDS: Registry[Callable[[FeedInputs], Feed]] = Registry("teacher cache", traits={"caches": True, "counted": False})
register_feed = FEEDS.register


class Feed(Protocol):
    """``feed(step, epoch, idx, x, y, part, mix)`` → (the student's float input, the teacher's
    logits or None); ``part``: this rank's share of the global batch under DDP; ``mix``: how
    to mix the step's images (``trainer.mix``; only the online feed takes one, as a stored
    teacher logit belongs to an unmixed view: :func:`kdcl.scenarios.standard.check_mixing`).
    ``view_keys(step, epoch, idx)``: the keys of the training views the data source draws
    for the global batch ``idx`` where it draws them per sample (:mod:`kdcl.data.views`)."""

    teaches: bool

    def view_keys(self, step: int, epoch: int, idx: Tensor) -> Tensor: ...

    def __call__(
        self,
        step: int,
        epoch: int,
        idx: Tensor,
        x: Tensor,
        y: Tensor,
        part: Part | None = None,
        mix: BatchMix | None = None,
    ) -> tuple[Tensor, Tensor | None]: ...


@dataclass
class FeedInputs:
    """What any feed may need: the data, the teacher and how to run it."""

    preprocess: Preprocess | TextPreprocess
    train: Source
    teacher_at: Callable[[int], nn.Module] | None  # the teacher of an optimizer step (None: no teacher)
    autocast: Callable[[], AbstractContextManager]
    num_classes: int
    batch_size: int  # examples per teacher pass when filling a cache: the training batch, as online
    seed: int  # seeds the views
    views: int  # K of a counted feed (views:K)
    store: str  # one of STORES
    directory: Path  # where disk shards go
    shard_mb: float
    topk: int | None = None  # keep each view's K largest logits only (None: all)
    strong: StrongViews | None = None  # online: also give a strongly augmented copy of each batch


def parse(spec: object) -> tuple[str, int]:
    """``"views:8"`` → ("views", 8); ``"none"`` / ``"no_aug"`` → (name, 1)."""
    name, _, k = str(spec).partition(":")
    if name not in FEEDS or FEEDS.trait(name, "counted") != bool(k) or (k and (not k.isdigit() or int(k) < 1)):
        raise KdclError(
            f"distill.teacher_cache={spec!r} is not a teacher cache", fix=f"choose one of: {', '.join(TEACHER_CACHES)}"
        )
    return name, int(k or 1)


def caches(spec: str) -> bool:
    """Whether the feed ``spec`` names computes the teacher's logits once (a cache)."""
    return FEEDS.trait(parse(spec)[0], "caches")


class FeedSpecs:
    """The values ``distill.teacher_cache`` takes: a feed's name, or ``NAME:K`` (K ≥ 1)
    for a counted feed. Like a registry to the config checks: ``spec in TEACHER_CACHES``,
    and listed as the forms a value may take."""

    kind = FEEDS.kind

    def __contains__(self, spec: object) -> bool:
        try:
            parse(spec)
        except KdclError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter([f"{name}:K (K ≥ 1)" if FEEDS.trait(name, "counted") else name for name in FEEDS])


TEACHER_CACHES = FeedSpecs()


def build_feed(spec: str, inputs: FeedInputs) -> Feed:
    name, _ = parse(spec)
    return FEEDS.create(name, inputs)


@register_feed("none", caches=False)
class OnlineTeacher:
    """Fresh random augmentation and a teacher pass every step (the teacher in eval mode,
    under ``inference_mode``: no autograd state at all). With ``inputs.strong`` the input and
    the logits are those of the batch's plain views followed by its strong views (2B rows).
    With a ``mix``, the views are mixed first and the teacher sees the mixed images
    ("function matching": :mod:`kdcl.distill.mixing`)."""

    def __init__(self, inputs: FeedInputs):
        self.preprocess, self.teacher_at, self.autocast = inputs.preprocess, inputs.teacher_at, inputs.autocast
        self.strong = inputs.strong
        self.teaches = inputs.teacher_at is not None
        if inputs.teacher_at is not None:
            inputs.teacher_at(0).eval()  # once: the step's teacher is a frozen model (kdcl.models.freeze)

    def __call__(
        self,
        step: int,
        epoch: int,
        idx: Tensor,
        x: Tensor,
        y: Tensor,
        part: Part | None = None,
        mix: BatchMix | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        views, count = self.preprocess.training(x, idx, epoch, part), 1
        if self.strong is not None:
            views, count = torch.cat([views, self.preprocess.training(self.strong(x, step), idx, epoch, part)]), 2
        if mix is not None:
            views = mix.images(views)
        if self.teacher_at is None:
            return views, None
        with torch.inference_mode(), self.autocast():
            logits = self.teacher_at(step)(views, y.repeat(count))
        return views, logits.float().clone()  # a normal tensor: the loss may save it for backward

    def view_keys(self, step: int, epoch: int, idx: Tensor) -> Tensor:
        """A new view of every example at every step."""
        return step_keys(step, len(idx))


class CachedViews:
    """The student trains on fixed views whose teacher logits were computed once.

    ``example_view(x, idx, v)``: the input of view ``v[j]`` of example ``idx[j]`` (the
    preprocess's :meth:`fixed_views`); ``phase[i]``: where example i starts cycling through
    its ``k`` views. ``logits``: the teacher's (N, K, C) fp16 logits. Images whose training
    views the data draws per sample (``preprocess.augmented_views``: folder data, FKD's
    setting) get view k of example i from the data source, by its key
    (:func:`kdcl.data.fixed_view_keys`: the same crop box and flip every time).
    """

    def __init__(self, inputs: FeedInputs, example_view: FixedViews, k: int, phase: Tensor):
        self.example_view, self.k, self.phase = example_view, k, phase
        self.drawn = inputs.preprocess.augmented_views
        self.teaches = True
        if inputs.teacher_at is None:
            raise KdclError(
                "distill.teacher_cache needs a teacher", fix="set distill.teacher_cache=none for this stage"
            )
        self.logits = _fill(inputs, self)

    def view(self, idx: Tensor, epoch: int) -> Tensor:
        """The view of each example in ``idx`` the student trains on in ``epoch`` (1-based)."""
        return (self.phase[idx] + epoch - 1) % self.k

    def __call__(
        self,
        step: int,
        epoch: int,
        idx: Tensor,
        x: Tensor,
        y: Tensor,
        part: Part | None = None,
        mix: BatchMix | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        v = self.view(idx, epoch)  # a function of the example and the epoch: the same on every rank
        return self.example_view(x, idx, v), self.logits.get(idx, v)

    def view_keys(self, step: int, epoch: int, idx: Tensor) -> Tensor:
        """The keys of the views the student sees in ``epoch``, where the data draws them."""
        return fixed_view_keys(idx, self.view(idx, epoch)) if self.drawn else step_keys(step, len(idx))


@register_feed("views", counted=True)
def fixed_views(inputs: FeedInputs) -> CachedViews:
    """K views per example, drawn once from the run seed (on the CPU, so a seed gives the
    same views on every device): crop offsets and flips of images; a text's masks of epochs
    1 … K (:meth:`kdcl.data.TextPreprocess.fixed_views`)."""
    pre, n, k = inputs.preprocess, len(inputs.train), inputs.views
    example_view, phase = pre.fixed_views(n, k, torch.Generator().manual_seed(inputs.seed))
    return CachedViews(inputs, example_view, k, phase.to(pre.generator.device))


def check_unaugmented(spec: str, preprocess: Preprocess | TextPreprocess) -> None:
    """``no_aug`` caches the teacher's logits on each example as it is: refused when the
    training examples are augmented (crop, flip, token masking)."""
    if parse(spec)[0] == "no_aug" and preprocess.augments:
        raise KdclError(
            "distill.teacher_cache=no_aug is for runs without augmentation, but this dataset augments its "
            "training examples (dataset.crop_padding, dataset.flip or dataset.token_mask)",
            fix="set distill.teacher_cache=views:K (K fixed augmented views of each example, the teacher's "
            "logits on each computed once), none (the teacher sees every augmented batch), "
            "or turn the augmentation off",
        )


@register_feed("no_aug")
def unaugmented(inputs: FeedInputs) -> CachedViews:
    """One view per example, the example itself (as evaluation sees it)."""
    pre, n = inputs.preprocess, len(inputs.train)
    check_unaugmented("no_aug", pre)
    phase = torch.zeros(n, dtype=torch.long, device=pre.generator.device)
    return CachedViews(inputs, lambda x, idx, v: pre(x, train=False), 1, phase)


# --------------------------------------------------------------------------- what a view keeps
class AllLogits:
    """A view's C logits, fp16."""

    def __init__(self, num_classes: int):
        self.fields = {"logits": ((num_classes,), torch.float16)}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        return {"logits": logits.to(torch.float16)}

    def decode(self, fields: dict[str, Tensor]) -> Tensor:
        return fields["logits"].float()


class TopKLogits:
    """A view's K largest logits ``z_(1) ≥ … ≥ z_(K)`` (fp16), their classes, and
    ``r = log Σ_{j ∉ top-K} exp(z_j) − z_(1)``, the log of the other classes' softmax mass
    relative to the largest logit (fp16, −inf when K = C).

    Decoded, class j outside the top K gets ``z_(1) + r − log(C − K)``, so
    ``softmax`` gives the top-K classes their exact probabilities and the others equal
    shares of exactly the remaining mass (FKD / ReLabel's uniform rest).
    """

    def __init__(self, k: int, num_classes: int):
        if not 1 <= k <= num_classes:
            raise KdclError(
                f"distill.teacher_cache_topk={k} must be between 1 and the number of classes ({num_classes})",
                fix=f"set distill.teacher_cache_topk to at most {num_classes}, or null to keep every logit",
            )
        self.k, self.num_classes = k, num_classes
        index_type = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
        self.fields = {"values": ((k,), torch.float16), "classes": ((k,), index_type), "rest": ((), torch.float16)}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        z = logits.float()
        values, classes = z.topk(self.k, dim=1)
        others = z.scatter(1, classes, -math.inf)
        rest = others.logsumexp(1) - values[:, 0]
        dtype = self.fields["classes"][1]
        return {"values": values.to(torch.float16), "classes": classes.to(dtype), "rest": rest.to(torch.float16)}

    def decode(self, fields: dict[str, Tensor]) -> Tensor:
        values, classes = fields["values"].float(), fields["classes"].long()
        if self.k == self.num_classes:
            return torch.empty_like(values).scatter_(1, classes, values)
        spread = values[:, :1] + fields["rest"].float()[:, None] - math.log(self.num_classes - self.k)
        return spread.expand(-1, self.num_classes).clone().scatter_(1, classes, values)


def view_codec(inputs: FeedInputs) -> AllLogits | TopKLogits:
    """What the cache keeps of a view's logits: all of them, or the top K."""
    return AllLogits(inputs.num_classes) if inputs.topk is None else TopKLogits(inputs.topk, inputs.num_classes)


def bytes_per_view(codec: AllLogits | TopKLogits) -> int:
    """The bytes one view of one example takes in the cache."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in codec.fields.values())


# --------------------------------------------------------------------------- storage
# shared: one store serves every process of a DDP run, each filling its own share of the
# chunks (the others' shards are read once all are filled); else each process fills its own.
STORES: Registry[Callable[[int, int, FeedInputs], MemoryLogits | DiskLogits]] = Registry(
    "teacher cache store", traits={"shared": False}
)


@STORES.register("memory")
class MemoryLogits:
    """The (N, K) views' encoded logits on the training device, a tensor per field."""

    def __init__(self, n: int, k: int, inputs: FeedInputs):
        self.where = "in memory"
        self.codec = view_codec(inputs)
        device = inputs.preprocess.generator.device
        self.tables = {
            name: torch.empty(n, k, *shape, dtype=dtype, device=device)
            for name, (shape, dtype) in self.codec.fields.items()
        }

    def put(self, idx: Tensor, v: int, logits: Tensor) -> None:
        for name, values in self.codec.encode(logits).items():
            self.tables[name][idx, v] = values

    def get(self, idx: Tensor, v: Tensor) -> Tensor:
        return self.codec.decode({name: table[idx, v] for name, table in self.tables.items()})

    def chunks(self) -> list[range]:
        """The examples filled together: all of them, every time."""
        return [range(len(next(iter(self.tables.values()))))]

    def filled(self, chunk: int) -> bool:
        return False

    def begin(self, chunk: int) -> None:
        """The tables are there from the start."""

    def mark_filled(self, chunk: int) -> None:
        """Nothing outlives the stage in memory."""

    def open_filled(self) -> None:
        """Every chunk is this process's own."""


def new_shard(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` memory map at ``path``: made as a new file beside it, mapped, then
    renamed to ``path``, so a file or link already there is replaced, never written through."""
    with replacing(path) as tmp:
        shard = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    return shard


@STORES.register("disk", shared=True)
class DiskLogits:
    """The (N, K) views' encoded logits in ``.npy`` shards of whole examples, at most
    ``shard_mb`` MB each (a file per field), read through memory maps (for caches larger
    than memory).

    A shard is filled whole, then marked (``shard_NNNN.filled``); the folder's
    ``store.json`` says what the shards hold. A store found in its folder again (a resumed
    run, or a keyed folder of the stage cache that another job filled) keeps its filled
    shards and fills the others: a fill cut off half-way resumes at its first unfilled
    shard. Under DDP the processes share the folder, each filling a share of the shards.
    A folder whose ``store.json`` or shards do not fit is one message naming it."""

    def __init__(self, n: int, k: int, inputs: FeedInputs):
        directory = self.directory = inputs.directory
        self.examples = n
        directory.mkdir(parents=True, exist_ok=True)
        self.where = f"on disk in {directory}"
        self.codec = view_codec(inputs)
        self.rows = max(1, int(inputs.shard_mb * 2**20 // (k * bytes_per_view(self.codec))))
        self.device = inputs.preprocess.generator.device
        fields = {name: [list(shape), str(dtype)] for name, (shape, dtype) in self.codec.fields.items()}
        layout = {"examples": n, "views": k, "rows_per_shard": self.rows, "fields": fields}
        self._check_layout(layout)
        self.layout = {  # each field's file: its numpy dtype, and the shape of one row
            name: (torch.empty(0, dtype=dtype).numpy().dtype, (k, *shape))
            for name, (shape, dtype) in self.codec.fields.items()
        }
        self.shards: list[dict[str, np.memmap]] = [{} for _ in range(math.ceil(n / self.rows))]

    def _check_layout(self, layout: dict) -> None:
        found = self.directory / "store.json"
        if not found.is_file():
            write_text(found, json.dumps(layout, indent=1) + "\n")
            return
        try:
            same = json.loads(found.read_text()) == layout
        except (OSError, ValueError):
            same = False
        if not same:
            raise self._damaged(f"its store.json describes other shards than this stage needs ({layout})")

    def _damaged(self, why: str) -> KdclError:
        return KdclError(
            f"the teacher cache in {self.directory} cannot be used: {why}",
            fix=f"delete {self.directory} (the teacher's logits are computed again)",
        )

    def _path(self, chunk: int, name: str) -> Path:
        return self.directory / f"shard_{chunk:04d}_{name}.npy"

    def chunks(self) -> list[range]:
        """The examples of each shard, filled together."""
        return [range(s * self.rows, min(self.examples, (s + 1) * self.rows)) for s in range(len(self.shards))]

    def filled(self, chunk: int) -> bool:
        return (self.directory / f"shard_{chunk:04d}.filled").is_file()

    def begin(self, chunk: int) -> None:
        """New, empty files for shard ``chunk``, to fill."""
        rows = len(self.chunks()[chunk])
        self.shards[chunk] = {
            name: new_shard(self._path(chunk, name), dtype, (rows, *row)) for name, (dtype, row) in self.layout.items()
        }

    def mark_filled(self, chunk: int) -> None:
        """Write shard ``chunk``'s views to disk, then mark it filled."""
        for table in self.shards[chunk].values():
            table.flush()
        write_text(self.directory / f"shard_{chunk:04d}.filled", "")

    def open_filled(self) -> None:
        """Every shard, read-only, each checked to be filled and to hold what it should."""
        for chunk, examples in enumerate(self.chunks()):
            if not self.filled(chunk):
                raise self._damaged(f"shard {chunk} was not filled (shard_{chunk:04d}.filled is missing)")
            self.shards[chunk] = {
                name: self._opened(chunk, name, (len(examples), *row)) for name, (_, row) in self.layout.items()
            }

    def _opened(self, chunk: int, name: str, shape: tuple[int, ...]) -> np.memmap:
        path, dtype = self._path(chunk, name), self.layout[name][0]
        try:
            shard = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise self._damaged(f"{path.name} cannot be read ({err})") from None
        if shard.shape != shape or shard.dtype != dtype:
            raise self._damaged(f"{path.name} holds {shard.dtype} {shard.shape}, not {dtype} {shape}")
        return shard

    def _locate(self, idx: Tensor) -> tuple[np.ndarray, np.ndarray]:
        i = idx.cpu().numpy()
        return i // self.rows, i % self.rows

    def put(self, idx: Tensor, v: int, logits: Tensor) -> None:
        shard, row = self._locate(idx)
        for name, values in self.codec.encode(logits).items():
            array = values.cpu().numpy()
            for s in np.unique(shard):
                self.shards[s][name][row[shard == s], v] = array[shard == s]

    def get(self, idx: Tensor, v: Tensor) -> Tensor:
        shard, row = self._locate(idx)
        view = v.cpu().numpy()
        fields = {}
        for name, (dtype, shape) in self.layout.items():
            out = np.empty((len(row), *shape[1:]), dtype=dtype)
            for s in np.unique(shard):
                out[shard == s] = self.shards[s][name][row[shard == s], view[shard == s]]
            fields[name] = torch.from_numpy(out).to(self.device, non_blocking=True)
        return self.codec.decode(fields)


def _fill(inputs: FeedInputs, views: CachedViews) -> MemoryLogits | DiskLogits:
    """Run the teacher once over every view of every training example (of the chunks not
    filled yet; under DDP a shared store's chunks are dealt out to the processes)."""
    assert inputs.teacher_at is not None  # CachedViews refuses a stage without a teacher
    teacher = inputs.teacher_at(0).eval()
    n, device = len(inputs.train), inputs.preprocess.generator.device
    store = STORES.create(inputs.store, n, views.k, inputs)
    chunks = store.chunks()
    todo = [c for c in range(len(chunks)) if not store.filled(c)]
    distributed.barrier()  # every process has seen the same filled chunks before any fills one
    mine = todo[distributed.rank() :: distributed.world()] if STORES.trait(inputs.store, "shared") else todo
    with torch.inference_mode():
        for c in mine:
            store.begin(c)
            examples = inputs.train.least_padding(torch.arange(chunks[c].start, chunks[c].stop))
            batches = examples.split(inputs.batch_size)
            for v in range(views.k):
                keys = (fixed_view_keys(b, torch.full_like(b, v)) for b in batches) if views.drawn else None
                for idx, x, y in inputs.train.batches(batches, keys):
                    idx = idx.to(device)
                    with inputs.autocast():
                        store.put(idx, v, teacher(views.example_view(x, idx, torch.full_like(idx, v)), y).float())
            store.mark_filled(c)
    distributed.barrier()  # every share is on disk
    store.open_filled()
    kept = "all logits" if inputs.topk is None else f"top-{inputs.topk} logits"
    again = f", {len(chunks) - len(todo)} of {len(chunks)} shards found filled" if len(todo) < len(chunks) else ""
    shared = f", this process filled {len(mine)} of {len(todo)}" if len(mine) < len(todo) else ""
    log.info("teacher cache: %d view(s) × %d examples, %s (fp16) %s%s%s", views.k, n, kept, store.where, again, shared)
    return store
