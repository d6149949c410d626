"""What every distillation loss shares: the ``LOSSES`` registry and its decorator
``register_loss``, the base class :class:`DistillLoss`, the :class:`LossContext` a loss
reads besides the logits, :func:`create_loss`, and the helpers several methods use
(:func:`kl_teacher_student`, :func:`standardize`, :func:`cross_entropy`).

The methods are the package's other modules (kdcl/distill/losses/__init__.py lists
them); the conventions every loss follows are in the package's docstring.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcl.distill.mixing import BatchMix
from kdcl.errors import KdclError
from kdcl.registry import Registry

LOSSES: Registry[type[DistillLoss]] = Registry("distillation loss")
register_loss = LOSSES.register

Weight = Tensor | float  # a scalar, or one value per example


def add_up(terms: Sequence[Tensor]) -> Tensor:
    """The sum of one or more terms, in their order."""
    return sum(terms[1:], terms[0])


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s weights (its first parameter): what its input is cast to."""
    return next(module.parameters()).dtype


def kl_teacher_student(student_logits: Tensor, teacher_logits: Tensor, temperature: Weight) -> Tensor:
    """Per example, ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    KL(p‖q) = Σ_i p_i log(p_i / q_i) with p from the teacher. ``kl_div`` takes the
    student's *log*-probabilities first and the teacher's probabilities second.
    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_q, p, reduction="none").sum(1) * (t * t)


def standardize(logits: Tensor) -> Tensor:
    """Each example's logits z-scored over the classes, Sun et al. (CVPR 2024), "Logit
    Standardization in Knowledge Distillation":

    ``Z(z) = (z − mean(z)) / (std(z) + 1e-7)``, std with Bessel's correction, as in the paper's code.

    Softmax ignores the shift, so ``softmax(Z(z)/T) = softmax(z / (T·std(z)))``: each model
    and example gets its own temperature, and the student matches the teacher's logit
    *relations* rather than their range.
    """
    z = logits.float()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Per-example cross-entropy with the hard labels, smoothed by ε = ``smoothing``
    (Szegedy et al. 2016, "Rethinking the Inception Architecture"): the target puts 1 − ε
    on the label and ε/C on every class, so ``CE = (1 − ε)·(−log q_y) + ε·mean_c(−log q_c)``."""
    return F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=smoothing)


@dataclass
class LossContext:
    """What a loss may read besides the logits: the 1-based epoch of the step (for
    warm-ups), the features the forward hooks kept in this step, by layer reference,
    whether the distillation terms see standardized logits (``distill.logit_standardization``),
    and the step with its examples' indices (for a per-example memory)."""

    epoch: int = 1
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    logit_standardization: bool = False
    step: int = 0  # the optimizer step
    indices: Tensor | None = None  # the batch's training-example indices
    label_smoothing: float = 0.0  # ε of the hard-label cross-entropy (the stage's recipe)
    mix: BatchMix | None = None  # how the step's images were mixed (trainer.mix), if they were

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """The hard-label term of the loss: :func:`cross_entropy`, smoothed by ``label_smoothing``;
        of a mixed batch, ``λ·CE(y) + (1 − λ)·CE(y_π)`` (:class:`kdcl.distill.mixing.BatchMix`)."""
        if self.mix is None:
            return cross_entropy(logits, target, self.label_smoothing)
        return self.mix.mixed(lambda labels: cross_entropy(logits, labels, self.label_smoothing), target)

    def soft_logits(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The logits the distillation terms compare: as they are, or each passed through :func:`standardize`.
        The hard-label cross-entropy always takes the student's own logits."""
        if not self.logit_standardization:
            return student_logits, teacher_logits
        return standardize(student_logits), standardize(teacher_logits)


class DistillLoss(nn.Module):
    """Base class: ``L = (1 − α)·CE + α·D``, D the method's distillation term (:meth:`distill`).

    ``needs_teacher`` tells the engine whether to run the teacher. A method that weighs
    CE and D differently overrides :meth:`combine`; one that reads features overrides
    :meth:`bind` and :meth:`layers`. ``views`` is how many views of each batch the loss
    compares: 2 (MLKD) gets the logits of the plain views and then of the strongly
    augmented ones, 2B rows, from both models (kdcl/distill/feeds.py). ``reads_label``: D itself
    reads the hard label (DKD's target class), which a mixed image (``trainer.mix``) does not
    have, so mixing is refused for it. ``ignores`` names the
    control's knobs (``alpha``, ``temperature``) the loss does not read, so that a search of
    them is refused (kdcl/commands/search_space.py).
    """

    needs_teacher = True
    views = 1
    reads_label = False
    ignores: frozenset[str] = frozenset()

    def __init__(self) -> None:  # a loss's constructor takes its own keys alone (none here)
        super().__init__()

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """D per example, and the raw terms to log (``train_<term>`` columns)."""
        raise NotImplementedError

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        """The per-example loss from the hard-label CE and the distillation term D."""
        return (1 - alpha) * ce + alpha * d

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        alpha: Weight,
        temperature: Weight,
        ctx: LossContext | None = None,
    ) -> dict[str, Tensor]:
        ctx = ctx or LossContext()
        ce = ctx.cross_entropy(student_logits, target)
        d, terms = self.distill(*ctx.soft_logits(student_logits, teacher_logits), target, temperature, ctx)
        return {"loss": self.combine(ce, d, alpha), "ce": ce, **terms}

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        """Called once per stage before the optimizer is built: feature methods resolve
        their layers on the models (``example``: an input batch) and build their adapters;
        ``num_examples``: the training examples (the size of a per-example memory)."""

    def release(self) -> None:
        """Called once when the stage ends, however it ends: undo what :meth:`bind` changed
        in the models (the teacher outlives the stage)."""

    def layers(self) -> tuple[list[str], list[str]]:
        """The student's and the teacher's layers this loss reads from ``ctx`` (after :meth:`bind`)."""
        return [], []


def create_loss(spec: dict) -> DistillLoss:
    """Build the loss named ``spec["name"]`` with the rest of ``spec``, its own keys
    (:func:`kdcl.config.options.distill_parts` takes them out of a ``distill`` section);
    a key it does not take is a :class:`KdclError`."""
    name = spec["name"]
    cls = LOSSES.get(name)
    params = {k: v for k, v in spec.items() if k != "name"}
    signature = inspect.signature(cls)
    try:
        signature.bind(**params)
    except TypeError as err:
        keys = ", ".join(signature.parameters)
        raise KdclError(
            f"distill={name}: {err}",
            fix=f"{name} takes the keys: {keys}" if keys else f"{name} takes no keys of its own",
        ) from None
    return cls(**params)
