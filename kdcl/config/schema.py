"""The config schema: one dataclass per config section, registered in Hydra's ConfigStore.

Each field gives a key's **type** (enforced by OmegaConf while Hydra composes the config)
and, in its metadata, its **range** (``check`` and the ``allowed`` text, enforced by
:func:`kdcl.config.checks.validate` before anything trains). The YAML files keep the values and
their comments; the fields here are ``MISSING`` and set none.

How the schema enters composition: ``conf/config.yaml`` lists ``/schema/train`` (and
``conf/eval.yaml`` ``/schema/eval``) **last** in its defaults, after every group option.
Merging it onto what the options set

- types every key the options set (a value of the wrong type stops composition), keeps
  the values (``MISSING`` merges change nothing) and keeps an option's own keys;
- turns every section into a structured node: from then on, an experiment
  (``+experiment=…``, merged after it) or a command-line override can only set a key
  that exists, with a value of its type. ``trainer.epochz=3`` or ``distill.alpha=high``
  is refused while composing.

Listing the schema first, Hydra's usual pattern, would refuse every key an option file adds
beyond the schema. Some sections are **open** by nature (``OPEN = True``): a loss's own
keys (dkd's ``tckd_weight``, fitnet's layers, composed's ``losses``) belong to the loss
and are checked against its constructor's signature before training
(:func:`kdcl.distill.losses.create_loss`); an optimizer's and a schedule's extra keys are their
factories' arguments, a pacing function's extra parameters its own, and a dataset's
loader reads keys of its own (``root``, ``image_size``, …; those listed in
``OPTION_KEYS`` are typed and range-checked when present). Model ``kwargs`` are the
model factory's arguments (checked by its signature) and accept new keys
(``teacher.kwargs.cifar_stem=false``). In closed sections :func:`kdcl.config.checks.validate`
refuses any key the schema does not list.

How the code reads it: the sections a stage trains with (``trainer``, ``optimizer``,
``scheduler``, ``curriculum`` and the control's keys of ``distill``) are instances of these
classes (:func:`typed`), read by attribute; the run's config stays plain containers where
it is saved or hashed (``done.json``, checkpoints, the stage cache's keys).

Adding a config key: one field here (type, and ``key(allowed, check)`` for a range) plus
its line, with the value and a comment, in the YAML file that sets it. A key whose value
names a registry entry (``curriculum.order``, ``distill.teacher_cache_store``, …) has no
rule here: :func:`kdcl.config.checks.validate` checks it against the registry
(``_registered_names``), so the names live in one place, the registry. A key that may be
null *or* a list or mapping is typed ``Any`` with a rule: merged last, a ``MISSING``
container field would replace the null.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, TypeGuard, TypeVar, Union, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from kdcl.errors import KdclError
from kdcl.trust import trust_code_rule

S = TypeVar("S")


def key(allowed: str | None = None, check: Callable[[Any], bool] | None = None) -> Any:
    """A schema field: no value of its own (the YAML sets it); ``check(value)`` is its range
    rule and ``allowed`` says in words what passes it ("a number in [0, 1]")."""
    return field(default=MISSING, metadata={"allowed": allowed, "check": check})


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any, ok: Callable[[float], bool] = lambda x: True) -> bool:
    return isinstance(v, (list, tuple)) and all(_number(x) and ok(x) for x in v)


def _spec(v: Any) -> bool:
    """A model given as an option name (``resnet8``) or a spec mapping with a ``name`` or a ``_target_``."""
    return isinstance(v, str) or (isinstance(v, dict) and any(isinstance(v.get(k), str) for k in ("name", "_target_")))


def _device(v: str) -> bool:
    if v == "auto":
        return True
    import torch

    try:
        return torch.device(v).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError):
        return False


FRACTION_OPEN = ("a fraction in (0, 1)", lambda v: 0 < v < 1)
FRACTION = ("a fraction in (0, 1]", lambda v: 0 < v <= 1)
UNIT = ("a number in [0, 1]", lambda v: 0 <= v <= 1)
POSITIVE = ("a number > 0", lambda v: v > 0)
NON_NEGATIVE = ("a number ≥ 0", lambda v: v >= 0)
COUNT = ("an integer ≥ 1", lambda v: v >= 1)
COUNT_OR_ZERO = ("an integer ≥ 0", lambda v: v >= 0)
SMOOTHING = ("a number in [0, 1)", lambda v: 0 <= v < 1)
MIX_ALPHAS = (
    "a Beta α ≥ 0 for each batch mix ({mixup: 0.2, cutmix: 1.0}; 0: off)",
    lambda v: _numbers(list(v.values()), lambda a: a >= 0),
)
DEVICE = ("auto, cpu, cuda, cuda:N or mps", _device)
# Which import paths a file (checkpoint, cache entry, saved run config) may name and kdcl then calls.
TRUST_CODE = ("false, true, or a list of import paths [pkg.module.fn, ...]", trust_code_rule)


def _or_null(rule: tuple[str, Callable[[Any], bool]]) -> tuple[str, Callable[[Any], bool]]:
    text, check = rule
    return f"null or {text}", lambda v: v is None or check(v)


# student.init_from_teacher's value for the teacher's weights before it trains on the task
PRETRAINED_TEACHER = "pretrained"


# --------------------------------------------------------------------------- sections
@dataclass
class ModelSpec:
    """``student``: a model (a kdcl name, ``torchvision:NAME``, ``timm:NAME``,
    ``hf:PATH_OR_ID``, or a callable of your own, ``_target_``), its keyword arguments, its
    source's pretrained weights (:mod:`kdcl.models.sources`). ``_target_`` is read by kdcl,
    never instantiated by Hydra: kdcl does not call ``hydra.utils.instantiate`` on the run's
    config. ``trust_remote_code``: let an ``hf:`` model run the Python its repository ships
    (:mod:`kdcl.trust`); taken from the user's config only, never from a file."""

    option: Optional[str] = key()
    name: Optional[str] = key()
    kwargs: Dict[str, Any] = key()
    pretrained: bool = key()
    _target_: Optional[str] = key("null or an import path pkg.module.function", lambda v: v is None or "." in v)
    trust_remote_code: bool = key()


@dataclass
class StudentSpec(ModelSpec):
    """``student``: a model spec, and whether its stages start from the teacher's layers
    (``init_from_teacher``, DistilBERT's initialisation: :func:`kdcl.models.copy_teacher_layers`):
    ``true`` the trained teacher's, ``pretrained`` the teacher's pretrained weights, before its
    training on the task."""

    init_from_teacher: Any = key(
        "false, true (the trained teacher's layers) or pretrained (the teacher's pretrained weights)",
        lambda v: v is False or v is True or v == PRETRAINED_TEACHER,
    )


@dataclass
class TeacherSpec(ModelSpec):
    """``teacher``: a model spec, and trained weights to load instead of training
    (``checkpoint``: a kdcl checkpoint, state_dict, ``.safetensors``, TorchScript file or HF
    model directory; :mod:`kdcl.train.weights`)."""

    checkpoint: Optional[str] = key()
    route_points: int = key(*COUNT_OR_ZERO)


@dataclass
class DatasetOptionKeys:
    """Keys only some dataset options have (their loaders read them); checked when present."""

    test_fraction: float = key(*FRACTION_OPEN)  # digits: held-out share (no test split of its own)
    root: str = key()
    download: bool = key()
    class_names: Optional[List[str]] = key()
    image_size: int = key(*COUNT)
    train_samples: int = key(*COUNT)
    test_samples: int = key(*COUNT)
    image_shape: List[int] = key(
        "a list [channels, height, width] of integers ≥ 1", lambda v: len(v) == 3 and all(x >= 1 for x in v)
    )
    num_classes: int = key("an integer ≥ 2", lambda v: v >= 2)
    in_memory: bool = key()
    # images read per sample (kdcl.data.views): the training view (a registry name, checked
    # there), the evaluation crop's share of the resized side, RandomResizedCrop's ranges
    train_view: str = key()
    eval_crop_ratio: float = key(*FRACTION)
    crop_scale: List[float] = key(
        "a range [low, high] of area shares, 0 < low ≤ high ≤ 1", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1
    )
    crop_ratio: List[float] = key(
        "a range [low, high] of aspect ratios w/h, 0 < low ≤ high", lambda v: len(v) == 2 and 0 < v[0] <= v[1]
    )
    auto_augment: Optional[str] = key()  # null, or a registry name (checked there)
    decoder: str = key()  # image files: a registry name (checked there)
    random_erasing: float = key(*UNIT)  # the probability of erasing a box of a training view
    max_memory_gb: float = key(*POSITIVE)  # image datasets held in memory: the most their images may take
    train_manifest: str = key()  # csv: the manifests, relative to root
    test_manifest: str = key()
    path: str = key()  # hf: a save_to_disk folder, a builder or a Hub id
    data_dir: Optional[str] = key()
    data_files: Any = key(
        "null, a file, a list of files or a mapping split → file(s)",
        lambda v: v is None or isinstance(v, (str, list, dict)),
    )
    train_split: str = key()
    test_split: str = key()
    image_column: str = key()  # csv and hf: the column of the images (or their paths) and of the labels
    label_column: str = key()
    train_file: str = key()  # text_csv: the files, relative to root
    test_file: str = key()
    text_columns: List[str] = key()  # text_csv: the column(s) of the text, joined with text_separator
    text_separator: str = key()
    delimiter: Optional[str] = key()  # text_csv: the field separator (null: tab for .tsv, else comma)
    tokenizer: Optional[str] = key()  # text: an HF model directory's tokenizer (null: trained on train)
    vocab_size: int = key(*COUNT)  # text: the most pieces a trained tokenizer has
    max_length: int = key()  # text: the most token ids an example keeps (checked as the data loads)
    lowercase: bool = key()
    token_mask: float = key("a probability in [0, 1)", lambda v: 0 <= v < 1)  # text: training masks tokens
    trained_tokenizer: Optional[Dict[str, Any]] = key()  # kdcl eval: a checkpoint's tokenizer, as saved


@dataclass
class DatasetConfig:
    """``dataset``: the keys every option shares (``conf/base/dataset.yaml``) plus ``name``."""

    OPEN: ClassVar[bool] = True
    OPTION_KEYS: ClassVar[type] = DatasetOptionKeys

    name: str = key()
    val_fraction: float = key(*FRACTION_OPEN)
    split_seed: int = key()
    max_train_samples: Optional[int] = key(*_or_null(COUNT))
    max_test_samples: Optional[int] = key(*_or_null(COUNT))
    mean: Any = key("null or a list of numbers (one per channel)", lambda v: v is None or _numbers(v))
    std: Any = key(
        "null or a list of numbers > 0 (one per channel)", lambda v: v is None or _numbers(v, lambda x: x > 0)
    )
    crop_padding: int = key(*COUNT_OR_ZERO)
    crop_padding_mode: str = key()
    flip: bool = key()
    num_workers: Any = key("auto or an integer ≥ 0", lambda v: v == "auto" or (_number(v) and int(v) == v >= 0))


@dataclass
class PacingConfig:
    """``curriculum.pacing``: a pacing function and its start and full-data points.
    Open: a pacing function's own parameters (``+curriculum.pacing.c=5``) are its arguments."""

    OPEN: ClassVar[bool] = True

    name: str = key()
    start: float = key(*FRACTION)
    full_at: float = key(*FRACTION)


@dataclass
class CurriculumConfig:
    """``curriculum``: ``conf/base/curriculum.yaml`` plus the option's ``name``."""

    name: str = key()
    type: str = key()
    scorer: str = key()
    order: str = key()
    class_balanced: bool = key()
    score_all: bool = key()
    pacing: PacingConfig = field(default_factory=PacingConfig)
    adaptive_delta: Optional[float] = key(*_or_null(NON_NEGATIVE))
    weight_start: Optional[float] = key(*_or_null(UNIT))
    lambda_start: float = key(*POSITIVE)
    mu: float = key(*POSITIVE)
    weights: str = key()
    start_classes: int = key(*COUNT)
    add_classes: int = key(*COUNT)
    every_epochs: Optional[int] = key(*_or_null(COUNT))
    threshold: Optional[float] = key(*_or_null(UNIT))


@dataclass
class ControlConfig:
    """The keys of ``distill`` that are not the loss's, read by the engine around it: α and T
    (their per-step schedules, CTKD's learnable T), per-example KD weights and noise
    (:class:`kdcl.distill.control.DistillControl`), how several teachers combine and the
    teacher's route (:class:`kdcl.distill.teachers.Teachers`), and the teacher cache
    (:mod:`kdcl.distill.feeds`). ``alpha`` and ``temperature`` come from each loss option;
    the others from ``conf/base/distill.yaml``, which every option shares."""

    alpha: float = key(*UNIT)
    temperature: float = key(*POSITIVE)
    alpha_start: Optional[float] = key(*_or_null(UNIT))
    alpha_schedule: str = key()
    temperature_start: Optional[float] = key(*_or_null(POSITIVE))
    temperature_schedule: str = key()
    learnable_temperature: Any = key(
        "null or {ramp_epochs: N} with N ≥ 0",
        lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and set(v) == {"ramp_epochs"}
                and _number(v["ramp_epochs"])
                and v["ramp_epochs"] >= 0
            )
        ),
    )
    sample_weight: str = key()
    logit_standardization: bool = key()
    teacher_route: bool = key()
    teacher_noise: float = key(*NON_NEGATIVE)
    input_noise: float = key(*NON_NEGATIVE)
    teacher_combine: str = key()
    teacher_weights: Any = key(
        "null or a list of numbers ≥ 0 (one per teacher)", lambda v: v is None or _numbers(v, lambda x: x >= 0)
    )
    teacher_cache: str = key()
    teacher_cache_store: str = key()
    teacher_cache_shard_mb: float = key(*POSITIVE)
    teacher_cache_topk: Optional[int] = key(*_or_null(COUNT))


@dataclass
class DistillConfig(ControlConfig):
    """``distill``: the loss's ``name`` and the control's keys (:class:`ControlConfig`).
    Open: every other key is the loss's own, an argument of its constructor
    (:func:`kdcl.config.options.distill_parts` splits a section between the two)."""

    OPEN: ClassVar[bool] = True

    name: str = key()


@dataclass
class OptimizerOptionKeys:
    """Keys only some optimizers take; checked when present."""

    momentum: float = key("a number in [0, 1)", lambda v: 0 <= v < 1)
    nesterov: bool = key()
    betas: List[float] = key("two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v))


@dataclass
class OptimizerConfig:
    """``optimizer``. Open: an optimizer's other keys are its factory's arguments."""

    OPEN: ClassVar[bool] = True
    OPTION_KEYS: ClassVar[type] = OptimizerOptionKeys

    name: str = key()
    lr: float = key(*POSITIVE)
    weight_decay: float = key(*NON_NEGATIVE)


@dataclass
class SchedulerOptionKeys:
    """Keys only some LR schedules take; checked when present."""

    min_factor: float = key(*UNIT)
    milestones: List[float] = key("a list of fractions in (0, 1)", lambda v: all(0 < m < 1 for m in v))
    gamma: float = key(*POSITIVE)


@dataclass
class SchedulerConfig:
    """``scheduler``. Open: a schedule's other keys are its factory's arguments."""

    OPEN: ClassVar[bool] = True
    OPTION_KEYS: ClassVar[type] = SchedulerOptionKeys

    name: str = key()
    warmup_epochs: float = key(*NON_NEGATIVE)


@dataclass
class TrainerConfig:
    """``trainer``: how every training stage trains."""

    epochs: int = key(*COUNT)
    batch_size: int = key(*COUNT)
    eval_batch_size: int = key(*COUNT)
    device: str = key(*DEVICE)
    amp: Union[bool, str] = key(
        "auto, true (bf16), fp16 (with a gradient scaler) or false", lambda v: v in ("auto", True, False, "fp16")
    )
    channels_last: bool = key()
    early_stopping_patience: Optional[int] = key(*_or_null(COUNT))
    checkpoint_every_steps: Optional[int] = key(*_or_null(COUNT))
    compile: bool = key()
    threads: Optional[int] = key(*_or_null(COUNT))
    devices: int = key("an integer ≥ 1 (processes on this machine)", lambda v: v >= 1)
    label_smoothing: float = key(*SMOOTHING)
    mix: Dict[str, float] = key(*MIX_ALPHAS)
    progress_every_s: float = key("seconds > 0", lambda v: v > 0)
    grad_clip_norm: Optional[float] = key(*_or_null(("a norm > 0", lambda v: v > 0)))
    ema_decay: Optional[float] = key(*_or_null(("a decay in (0, 1)", lambda v: 0 < v < 1)))
    log_every_steps: Optional[int] = key(*_or_null(COUNT))


@dataclass
class StageRecipeConfig:
    """``stages.teacher``, ``stages.student``: how the stages of one role train, each key set
    replacing the shared one (:func:`kdcl.config.options.stage_recipe`). ``optimizer`` and
    ``scheduler`` hold keys of those sections (a ``name`` of its own starts from that option's
    file), checked there as the stage will train with them (:func:`kdcl.config.checks.validate`);
    ``epochs``, ``batch_size`` and ``label_smoothing``: null keeps ``trainer.*``."""

    optimizer: Dict[str, Any] = key()
    scheduler: Dict[str, Any] = key()
    epochs: Optional[int] = key(*_or_null(COUNT))
    batch_size: Optional[int] = key(*_or_null(COUNT))
    label_smoothing: Optional[float] = key(*_or_null(SMOOTHING))


@dataclass
class StagesConfig:
    """``stages``: a recipe for the teachers and one for every student stage. Closed: the
    students have one recipe between them (a fair comparison), so there is none per stage or arm."""

    WHY_CLOSED: ClassVar[str] = (
        "the baseline and every distilled student (distill, arms, born-again generations, assistants) "
        "share stages.student, so that they train on one optimizer-step budget and compare fairly"
    )

    teacher: StageRecipeConfig = field(default_factory=StageRecipeConfig)
    student: StageRecipeConfig = field(default_factory=StageRecipeConfig)


@dataclass
class BornAgainConfig:
    generations: int = key(*COUNT_OR_ZERO)


@dataclass
class LwfSettings:
    """``scenario.lwf``: the LwF arm's distillation (``kdcl.distill.losses.lwf.LearningWithoutForgetting``)."""

    lam: float = key(*NON_NEGATIVE)
    temperature: float = key(*POSITIVE)


def _class_order(v: Any) -> bool:
    """A class order's name (checked against its registry) or a list of distinct class indices."""
    if isinstance(v, str):
        return True
    return isinstance(v, list) and len(v) == len(set(v)) > 0 and all(isinstance(c, int) and c >= 0 for c in v)


@dataclass
class ScenarioOptionKeys:
    """Keys of ``scenario=class_incremental`` (checked when present)."""

    tasks: int = key("an integer ≥ 2", lambda v: v >= 2)
    class_order: Any = key("a class order's name or a list of distinct class indices", _class_order)
    arms: List[str] = key("a non-empty list of distinct strategies", lambda v: len(v) == len(set(v)) > 0)
    objective_arm: str = key()
    memory_per_class: int = key(*COUNT_OR_ZERO)
    warmup_epochs: int = key(*COUNT_OR_ZERO)
    lwf: LwfSettings = field(default_factory=LwfSettings)


@dataclass
class ScenarioConfig:
    """``scenario``: what ``kdcl train`` trains (:mod:`kdcl.scenarios`). Open: each
    option's keys (``OPTION_KEYS``) are checked when present."""

    OPEN: ClassVar[bool] = True
    OPTION_KEYS: ClassVar[type] = ScenarioOptionKeys

    name: str = key()


@dataclass
class PathsConfig:
    """``paths``: where things are read from, one key for every recipe."""

    data_dir: str = key()  # the recipes' data: ${paths.data_dir}/cifar10, /ag_news


@dataclass
class TrainConfig:
    """``kdcl train``: the top-level keys and every section (``conf/config.yaml``)."""

    seed: int = key(*COUNT_OR_ZERO)
    resume: Optional[str] = key()
    trust_code: Any = key(*TRUST_CODE)
    baseline: bool = key()
    arms: Any = key(
        "null or a mapping name → {distill: {...}, curriculum: {...}}",
        lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and all(isinstance(a, dict) and set(a) <= {"distill", "curriculum"} for a in v.values())
            )
        ),
    )
    assistants: List[Any] = key("a list of teacher options or {name, kwargs} specs", lambda v: all(_spec(s) for s in v))
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: bool = key()
    cache_dir: str = key()
    cache_teacher_logits_mb: float = key(*NON_NEGATIVE)
    teachers: Any = key(
        "null or a list of teacher options or {name or _target_, kwargs, pretrained, checkpoint} specs",
        lambda v: v is None or (isinstance(v, list) and all(_spec(s) for s in v)),
    )
    born_again: BornAgainConfig = field(default_factory=BornAgainConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    # Selected by ``logger=[csv,tensorboard,...]``: each option adds its own name → settings;
    # the names and settings are checked against kdcl.output.trackers.LOGGERS before training.
    logger: Any = key(
        "a mapping logger name → its settings (choose them with logger=[csv,tensorboard,mlflow,wandb])",
        lambda v: isinstance(v, dict) and all(isinstance(s, dict) for s in v.values()),
    )
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class BenchSettings:
    """``bench``: how ``kdcl bench`` measures (``conf/bench.yaml``)."""

    steps: int = key(*COUNT)
    warmup: int = key("an integer ≥ 1 (the teacher cache fills during warm-up)", lambda v: v >= 1)
    repeats: int = key(*COUNT)
    views: int = key(*COUNT)
    naive_workers: int = key(*COUNT_OR_ZERO)
    parity_epochs: int = key(*COUNT_OR_ZERO)


@dataclass
class BenchConfig(TrainConfig):
    """``kdcl bench``: a run config plus ``bench``."""

    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class TuneSettings:
    """``tune``: how ``kdcl tune`` searches (``conf/tune.yaml``); ``sampler`` and ``pruner``
    name entries of their registries (``kdcl/commands/tune.py``)."""

    study: str = key("a name of letters, digits, '.', '_' or '-'", lambda v: re.fullmatch(r"[\w.-]+", v) is not None)
    trials: int = key(*COUNT)
    sampler: str = key()
    pruner: str = key()
    startup_trials: int = key(*COUNT_OR_ZERO)
    warmup_epochs: int = key(*COUNT_OR_ZERO)
    prune_below: float = key(*UNIT)


@dataclass
class TuneConfig(TrainConfig):
    """``kdcl tune``: a run config plus ``tune`` and the search space ``search``
    (``conf/search/``: config key → how to sample it, checked by ``kdcl/commands/search_space.py``)."""

    tune: TuneSettings = field(default_factory=TuneSettings)
    search: Dict[str, Any] = key()


@dataclass
class EvalConfig:
    """``kdcl eval`` (``conf/eval.yaml``). Its optional ``dataset`` is checked against
    :class:`DatasetConfig` by ``kdcl eval`` itself: a group that may be absent cannot be a
    field of a schema merged last (the field would add a required ``???``)."""

    checkpoint: str = key()
    device: str = key(*DEVICE)
    batch_size: int = key(*COUNT)
    model: Optional[str] = key()
    model_kwargs: Any = key(
        "null or a mapping of the model's keyword arguments", lambda v: v is None or isinstance(v, dict)
    )
    trust_code: Any = key(*TRUST_CODE)


@dataclass
class ExportConfig:
    """``kdcl export`` (``conf/export.yaml``): one of ``checkpoint`` and ``run`` (the command
    refuses both or neither), the file format, the output check and the timing."""

    checkpoint: Optional[str] = key()
    run: Optional[str] = key()
    out: Optional[str] = key()
    format: str = key("onnx or torchscript", lambda v: v in ("onnx", "torchscript"))
    tolerance: float = key(*NON_NEGATIVE)
    check_examples: int = key(*COUNT)
    warmup: int = key(*COUNT_OR_ZERO)
    repeats: int = key(*COUNT)
    trust_code: Any = key(*TRUST_CODE)


# --------------------------------------------------------------------------- reading the schema
@dataclass(frozen=True)
class Entry:
    """One key of a schema class: its type and range rule."""

    name: str
    type: Any
    allowed: str
    check: Callable[[Any], bool] | None


def entries(cls: type) -> dict[str, Entry]:
    """The keys of schema class ``cls`` by name."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: Entry(
            f.name, hints[f.name], f.metadata.get("allowed") or describe(hints[f.name]), f.metadata.get("check")
        )
        for f in dataclasses.fields(cls)
    }


def is_open(cls: type) -> bool:
    return bool(getattr(cls, "OPEN", False))


def option_keys(cls: type) -> type | None:
    return getattr(cls, "OPTION_KEYS", None)


def is_section(tp: Any) -> TypeGuard[type]:
    """Whether the type of a key is a schema class: the key holds a section of keys."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe(tp: Any) -> str:
    """A type in words: ``int`` → an integer."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join((["null"] if type(None) in args else []) + parts)
    if origin in (list, List):
        return "a list"
    if origin in (dict, Dict):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "any value")


def is_instance(value: Any, tp: Any) -> bool:
    """Whether a plain value (as YAML gives it) is of type ``tp``, as OmegaConf would accept it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is Union:
        return any(is_instance(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin in (list, List):
        return isinstance(value, (list, tuple)) and all(is_instance(v, args[0]) for v in value if args)
    if origin in (dict, Dict) or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if tp is float:
        return _number(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def lookup(cls: type, path: str) -> Entry | None:
    """The key of ``cls`` at the dotted ``path`` (``trainer.epochs``), option keys included."""
    head, _, rest = path.partition(".")
    options = option_keys(cls)
    keys = {**(entries(options) if options else {}), **entries(cls)}
    entry = keys.get(head)
    if entry is None or not rest:
        return entry
    return lookup(entry.type, rest) if is_section(entry.type) else None


def section_type(cls: type, path: str) -> type | None:
    """The schema class of the section at ``path`` (``trainer`` → TrainerConfig; ``""`` → cls)."""
    if not path:
        return cls
    entry = lookup(cls, path)
    return entry.type if entry is not None and is_section(entry.type) else None


def typed(cls: type[S], values: Mapping[str, Any] | DictConfig, where: str) -> S:
    """Config section ``values`` (``where`` in the config) as an instance of schema class
    ``cls``, for code to read by attribute. OmegaConf types every field; the keys an open
    section adds beyond the schema (an optimizer's ``momentum``, a pacing function's ``c``)
    become plain attributes beside the fields, so ``vars(section)`` holds every key. A
    field without a value is a :class:`KdclError`."""
    node = OmegaConf.structured(cls)
    _open_sections(node, cls)
    try:
        return cast(S, OmegaConf.to_object(OmegaConf.merge(node, values)))
    except MissingMandatoryValue as err:
        raise KdclError(
            f"{where}.{err.full_key} has no value",
            fix=f"set {where}.{err.full_key} (conf/ sets every key: was this config written by an older kdcl?)",
        ) from None
    except ValidationError as err:
        raise KdclError(f"{where}.{err.full_key}: {err.msg}", fix="see kdcl/config/schema.py for its type") from None


def _open_sections(node: DictConfig, cls: type) -> None:
    """Let the open sections of the structured ``node`` (of schema class ``cls``), and its
    mappings (``trainer.mix``: names the schema does not list), take new keys."""
    OmegaConf.set_struct(node, not is_open(cls))
    for name, entry in entries(cls).items():
        if is_section(entry.type):
            _open_sections(cast(DictConfig, node._get_node(name)), entry.type)
        elif typing.get_origin(entry.type) is dict:
            OmegaConf.set_struct(cast(DictConfig, node._get_node(name)), False)


# --------------------------------------------------------------------------- registration
def _node(cls: type) -> DictConfig:
    """The structured node Hydra merges. Model ``kwargs`` and a stage recipe's ``optimizer``
    and ``scheduler`` accept new keys: the flag set here is copied onto the composed node, so
    ``teacher.kwargs.cifar_stem=false`` and ``stages.teacher.optimizer.lr=0.1`` work without
    ``+`` (the model factory's signature checks the names; :func:`kdcl.config.checks.validate`
    a recipe's keys)."""
    node = OmegaConf.structured(cls)
    open_mappings = [(section, "kwargs") for section in ("teacher", "student")]
    open_mappings += [
        (f"stages.{role}", group) for role in ("teacher", "student") for group in ("optimizer", "scheduler")
    ]
    for section, name in open_mappings:
        parent = OmegaConf.select(node, section)
        if parent is not None:
            OmegaConf.set_struct(parent._get_node(name), False)
    return node


def register() -> None:
    """``schema/train``, ``schema/bench``, ``schema/eval``, ``schema/export`` and ``schema/tune`` in Hydra's ConfigStore (done on import)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=_node(TrainConfig))
    store.store(group="schema", name="eval", node=_node(EvalConfig))
    store.store(group="schema", name="bench", node=_node(BenchConfig))
    store.store(group="schema", name="export", node=_node(ExportConfig))
    store.store(group="schema", name="tune", node=_node(TuneConfig))


register()
