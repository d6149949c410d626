"""Distillation losses, one registry entry each.

A loss is built from the ``distill`` config group (:func:`create_loss`) and called as
``loss(student_logits, teacher_logits, target, alpha, temperature, ctx)``. It returns a
dict of **per-example** tensors of shape (B,): ``"loss"`` (what the engine averages, after
any per-example curriculum weights, and back-propagates) and one entry per term, which
the engine logs as ``train_<term>`` columns of ``metrics.csv``.

``alpha`` and ``temperature`` come from the engine's control each step
(:class:`kdcl.distill.control.DistillControl`, which reads ``distill.alpha`` and
``distill.temperature``): they may follow a schedule, ``alpha`` may differ per example,
and the temperature may be a learnable tensor, as in CTKD. A loss is built from its own
keys alone (:func:`create_loss`); it does not keep α or T.
``ctx`` (a :class:`LossContext`, optional) carries the epoch and the intermediate
features that forward hooks kept during this step's forward passes (kdcl/distill/features.py).
A loss that reads features resolves its layers and builds its adapters in ``bind``,
once per stage, before the optimizer is built (so the adapters train with the student),
and lists the layers to hook in ``layers``.

Every method has a *distillation term* D (``distill``): what it adds to the hard-label
cross-entropy. ``composed`` sums several methods' D. With ``distill.logit_standardization``
every logit-based D compares z-scored logits (:func:`standardize`; Sun et al. 2024).

Convention: ``alpha`` weighs the *distillation* (soft) terms and ``1 - alpha`` the
hard-label cross-entropy, ``L = (1 − α)·CE + α·D``, as in Hinton et al. (2015),
RepDistiller and mdistiller. (torchdistill's ``KDLoss`` uses the opposite convention:
its alpha weighs the hard term.) Methods whose papers fix the CE weight at 1 say so:
``dkd`` (alpha unused), ``fitnet`` and ``at`` (``(1 − α)·CE + α·KD + β·F``, α = 0 by default).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcl.distill.features import (
    adapter,
    attention_map,
    feature_shapes,
    match_spatial,
    pair_layers,
    require_maps,
    resolve_layers,
)
from kdcl.distill.mixing import BatchMix
from kdcl.errors import KdclError
from kdcl.registry import Registry

LOSSES = Registry("distillation loss")
register_loss = LOSSES.register

Weight = Tensor | float  # a scalar, or one value per example


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

    def layers(self) -> tuple[list[str], list[str]]:
        """The student's and the teacher's layers this loss reads from ``ctx`` (after :meth:`bind`)."""
        return [], []


@register_loss("none")
class CrossEntropyOnly(DistillLoss):
    """No distillation: ``L = CE(y, softmax(z_s))``. ``alpha`` and ``temperature`` are unused."""

    needs_teacher = False
    ignores = frozenset({"alpha", "temperature"})

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Any,
        target: Tensor,
        alpha: Weight = 0.0,
        temperature: Weight = 1.0,
        ctx: LossContext | None = None,
    ) -> dict[str, Tensor]:
        ce = (ctx or LossContext()).cross_entropy(student_logits, target)
        return {"loss": ce, "ce": ce}


@register_loss("kd")
class HintonKD(DistillLoss):
    """Knowledge distillation, Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``

    ``alpha`` (α) weighs the soft KD term; ``temperature`` is T.
    """

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        kd = kl_teacher_student(student_logits, teacher_logits, temperature)
        return kd, {"kd": kd}


@register_loss("mse")
class LogitMSE(DistillLoss):
    """Logit matching with MSE (Ba & Caruana 2014; compared with KL by Kim et al. 2021).

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·[MSE(z_s, z_t) + λ·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))]``

    MSE is the mean over classes. ``kl_weight`` (λ, default 0) adds the KL term;
    with α = 1 this is the users' ``MSE(z_s, z_t) + λ·KL`` form.
    """

    def __init__(self, kl_weight: float):
        super().__init__()
        self.kl_weight = float(kl_weight)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        mse = (student_logits.float() - teacher_logits.float()).pow(2).mean(1)
        terms = {"mse": mse}
        if not self.kl_weight:
            return mse, terms
        terms["kd"] = kl_teacher_student(student_logits, teacher_logits, temperature)
        return mse + self.kl_weight * terms["kd"], terms


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: Weight, gamma: float = 0.0
) -> Tensor:
    """Per example, ``T²·Σ_c −p_c·(1 − q_c)^γ·log q_c`` with ``p = softmax(z_t/T)``,
    ``q = softmax(z_s/T)``; γ = 0 gives the soft cross-entropy ``T²·H(p, q)``."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1)
    focus = (1 - log_q.exp()).pow(gamma) if gamma else 1.0
    return -(p * focus * log_q).sum(1) * (t * t)


@register_loss("soft_ce")
class SoftCrossEntropy(DistillLoss):
    """Cross-entropy with the teacher's soft targets (Hinton et al. 2015, §2).

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·H(p_t, q_s)``, ``H(p, q) = −Σ_c p_c log q_c``,
    ``p_t = softmax(z_t/T)``, ``q_s = softmax(z_s/T)``.

    ``H(p_t, q_s) = KL(p_t ‖ q_s) + H(p_t)`` and the teacher's entropy ``H(p_t)`` does not
    depend on the student, so the gradients equal ``kd``'s; the logged term is larger by
    ``T²·H(p_t)``. The T² is kept for the same reason as in ``kd``: it keeps the soft
    term's gradient scale independent of T, so α means the same at every T.
    """

    term = "soft_ce"
    gamma = 0.0

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        soft = soft_cross_entropy(student_logits, teacher_logits, temperature, self.gamma)
        return soft, {self.term: soft}


@register_loss("focal")
class FocalKD(SoftCrossEntropy):
    """Focal soft cross-entropy: the focal loss of Lin et al. (ICCV 2017), "Focal Loss for
    Dense Object Detection", with the teacher's soft targets in place of the one-hot label.

    ``L = (1 − α)·CE(y, softmax(z_s)) + α·T²·Σ_c −p_t,c·(1 − q_s,c)^γ·log q_s,c``,
    ``p_t = softmax(z_t/T)``, ``q_s = softmax(z_s/T)``.

    Classes the student already gives high probability are down-weighted by
    ``(1 − q_s,c)^γ``, so the distillation focuses on what the student gets wrong.
    With a one-hot ``p_t`` (and T = 1) it is Lin et al.'s ``−(1 − q_y)^γ·log q_y``; with
    γ = 0 it is ``soft_ce``. ``gamma`` (γ) defaults to 2, Lin et al.'s choice.
    """

    term = "focal"

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = float(gamma)


def decoupled_kl(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight
) -> tuple[Tensor, Tensor]:
    """Per example, DKD's two parts of ``T²·KL(p_t ‖ p_s)`` at temperature T (Zhao et al. 2022):

    - TCKD ``= T²·KL(b_t ‖ b_s)``, ``b = (p_y, 1 − p_y)``: the target class against all others;
    - NCKD ``= T²·KL(p̂_t ‖ p̂_s)``, ``p̂`` the softmax of ``z/T`` over the non-target classes.

    As in mdistiller, the target class is removed from NCKD by subtracting 1000 from its
    logit (its probability underflows to 0).
    """
    t = temperature
    zs, zt = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(target, zs.shape[1]).bool()

    def target_vs_rest(z: Tensor) -> Tensor:  # log (p_y, 1 − p_y)
        log_p = F.log_softmax(z, dim=1)
        return torch.cat(
            [log_p.gather(1, target[:, None]), log_p.masked_fill(gt, -math.inf).logsumexp(1, keepdim=True)], 1
        )

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(1) * (t * t)

    tckd = kl(target_vs_rest(zt), target_vs_rest(zs))
    nckd = kl(F.log_softmax(zt - 1000.0 * gt, dim=1), F.log_softmax(zs - 1000.0 * gt, dim=1))
    return tckd, nckd


@register_loss("dkd")
class DecoupledKD(DistillLoss):
    """Decoupled knowledge distillation, Zhao et al. (CVPR 2022), "Decoupled Knowledge Distillation".

    ``L = CE(y, softmax(z_s)) + w(e)·(a·TCKD + b·NCKD)``, ``w(e) = min(e / W, 1)``

    TCKD and NCKD as in :func:`decoupled_kl` (both carry T²). ``tckd_weight`` (a) and
    ``nckd_weight`` (b) are the paper's α and β (mdistiller: 1 and 8, T = 4); W =
    ``warmup_epochs`` (20 in mdistiller) ramps the DKD term linearly over the first epochs,
    e being the 1-based epoch, exactly as mdistiller's ``min(epoch / warmup, 1)``.
    The CE weight is 1, as in mdistiller: ``distill.alpha`` is not used.
    """

    ignores = frozenset({"alpha"})
    reads_label = True

    def __init__(self, tckd_weight: float, nckd_weight: float, warmup_epochs: float):
        super().__init__()
        self.tckd_weight, self.nckd_weight, self.warmup_epochs = float(tckd_weight), float(nckd_weight), warmup_epochs

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        tckd, nckd = decoupled_kl(student_logits, teacher_logits, target, temperature)
        warm = min(ctx.epoch / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0
        return warm * (self.tckd_weight * tckd + self.nckd_weight * nckd), {"tckd": tckd, "nckd": nckd}

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return ce + d


def pearson_distance(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per row, ``1 − ρ(a, b)``, ρ the Pearson correlation over the columns:
    the cosine of the rows centred on their means."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss("dist")
class DIST(DistillLoss):
    """DIST, Huang et al. (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

    ``L = CE(y, softmax(z_s)) + β·T²·(1 − ρ(p_s,i, p_t,i)) + γ·T²·(1 − (1/C)·Σ_c ρ(p_s[:, c], p_t[:, c]))``

    ``p = softmax(z/T)``, ρ the Pearson correlation (:func:`pearson_distance`). The
    inter-class term matches each example's ranking of the classes, the intra-class term
    each class's ranking of the batch's examples; only relations are matched, not values,
    which the paper finds to help most when the teacher is much stronger than the student.
    ``beta`` (β) and ``gamma`` (γ): 2 and 2 at T = 4 for CIFAR-100 in the paper (1, 1, T = 1
    on ImageNet). The intra-class term is a property of the batch: every example carries
    its value (under DDP, that of its rank's part of the batch). The CE weight is 1, as in
    the paper: ``distill.alpha`` is not used.
    """

    ignores = frozenset({"alpha"})

    def __init__(self, beta: float, gamma: float):
        super().__init__()
        self.beta, self.gamma = float(beta), float(gamma)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        t = temperature
        p_s = F.softmax(student_logits.float() / t, dim=1)
        p_t = F.softmax(teacher_logits.float() / t, dim=1)
        inter = pearson_distance(p_s, p_t) * (t * t)
        intra = (pearson_distance(p_s.T, p_t.T).mean() * (t * t)).expand_as(inter)
        return self.beta * inter + self.gamma * intra, {"inter": inter, "intra": intra}

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return ce + d


def share_at_or_below_median(scores: Tensor) -> Tensor:
    """The share of ``scores`` at or below their median (linearly interpolated, as
    ``numpy.percentile(scores, 50)``): a scalar tensor, computed on the device."""
    return (scores <= scores.quantile(0.5)).float().mean()


def correlation_gap(student_probs: Tensor, teacher_probs: Tensor, over_classes: bool) -> Tensor:
    """MLKD's class- or batch-level term for (B, C) predictions P (Jin et al. 2023):

    - ``over_classes``: ``‖P_tᵀP_t − P_sᵀP_s‖²_F / C``, the (C, C) class correlations;
    - otherwise ``‖P_tP_tᵀ − P_sP_sᵀ‖²_F / B``, the (B, B) example correlations.
    """
    s, t = (student_probs.T, teacher_probs.T) if over_classes else (student_probs, teacher_probs)
    return (t @ t.T - s @ s.T).pow(2).sum() / s.shape[0]


@register_loss("mlkd")
class MultiLevelKD(DistillLoss):
    """Multi-level logit distillation, Jin, Wang & Lin (CVPR 2023), "Multi-Level Logit Distillation".

    Each batch comes twice: its plain views w (crop and flip) and strongly augmented views s
    (RandAugment, :class:`kdcl.data.StrongViews`); student and teacher see both. At every
    temperature T of ``temperatures`` (the paper's 2, 3, 4, 5, 6; ``distill.temperature``
    is not used), with ``p = softmax(z/T)`` and P the batch's (B, C) predictions,

    ``L = CE(y, z_s^w) + CE(y, z_s^s) + Σ_T [m·KL_T^w + KL_T^s + m_c·CC_T + m·BC_T]`` (per example)

    - instance level, per example and view: ``KL_T = T²·KL(p_t ‖ p_s)``;
    - class level, on the plain views: ``CC_T = ‖P_tᵀP_t − P_sᵀP_s‖²_F / C``;
    - batch level, on the plain views: ``BC_T = ‖P_tP_tᵀ − P_sP_sᵀ‖²_F / B``
      (:func:`correlation_gap`; every example carries the batch's CC and BC);
    - m: the share of the batch whose teacher confidence ``max_c softmax(z_t^w)_c`` is at or
      below the batch's median; m_c: the share of classes whose summed teacher probability
      ``Σ_i softmax(z_t^w)_i,c`` is at or below the classes' median
      (:func:`share_at_or_below_median`; from the raw teacher logits, at T = 1).

    m and m_c are what the authors' code's confidence masks come to: it multiplies batch-mean
    losses by a 0/1 mask and averages (``(loss * mask).mean()``), which scales each loss by
    the share kept. Like that code, the class and batch levels use the plain views only and
    the CE weight is 1 (``distill.alpha`` is not used). One departure: the code's strong-view
    KL at T = 2 and 6 compares the *plain* views' logits, a slip against the paper; here
    every strong-view KL compares the strong views'. With ``distill.logit_standardization``
    every KL, CC and BC term sees z-scored logits (Sun et al. 2024's MLKD + LS).
    """

    ignores = frozenset({"alpha", "temperature"})
    views = 2

    def __init__(self, temperatures: Sequence[float]):
        super().__init__()
        self.temperatures = [float(t) for t in temperatures]
        if not self.temperatures or min(self.temperatures) <= 0:
            raise KdclError(
                f"distill=mlkd: temperatures={list(temperatures)} must be a non-empty list of numbers > 0",
                fix="set distill.temperatures='[2,3,4,5,6]' (the paper's)",
            )

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
        plain, strong = student_logits.chunk(2)
        ce, ce_strong = ctx.cross_entropy(plain, target), ctx.cross_entropy(strong, target)
        teacher_probs = F.softmax(teacher_logits[: len(target)].float(), dim=1)
        m = share_at_or_below_median(teacher_probs.amax(1))
        m_c = share_at_or_below_median(teacher_probs.sum(0))
        (s_w, s_s), (t_w, t_s) = (z.chunk(2) for z in ctx.soft_logits(student_logits, teacher_logits))
        kd_weak = kd_strong = cc = bc = 0
        for t in self.temperatures:
            kd_weak = kd_weak + kl_teacher_student(s_w, t_w, t)
            kd_strong = kd_strong + kl_teacher_student(s_s, t_s, t)
            p_s, p_t = F.softmax(s_w.float() / t, dim=1), F.softmax(t_w.float() / t, dim=1)
            cc = cc + correlation_gap(p_s, p_t, over_classes=True)
            bc = bc + correlation_gap(p_s, p_t, over_classes=False)
        cc, bc = cc.expand_as(ce), bc.expand_as(ce)
        loss = ce + ce_strong + m * kd_weak + kd_strong + m_c * cc + m * bc
        return {
            "loss": loss,
            "ce": ce,
            "ce_strong": ce_strong,
            "kd": kd_weak,
            "kd_strong": kd_strong,
            "cc": cc,
            "bc": bc,
        }


@register_loss("lwf")
class LearningWithoutForgetting(DistillLoss):
    """Learning without Forgetting, Li & Hoiem (ECCV 2016; TPAMI 2018).

    ``L = CE(y, softmax(z_s)) + λ·KL(softmax(z_o/T) ‖ softmax(z_s[:, :C_o]/T))``

    z_o are the previous model's logits on the same input, over its C_o classes, and
    z_s[:, :C_o] the student's outputs for those classes: the first C_o of a head grown
    with every task (:func:`kdcl.models.grow_head`). The KL term has the gradient of LwF's
    "knowledge distillation loss", the cross-entropy with the recorded soft targets, from
    which it differs by their entropy, a constant. As in the paper the CE weight is 1 and
    there is no T² factor (LwF: T = 2, λ = 1); ``lam`` is λ, ``temperature`` T, and
    ``distill.alpha`` is not used. With a teacher of as many classes as the student it is KD
    with the CE weight at 1.
    """

    ignores = frozenset({"alpha"})

    def __init__(self, lam: float):
        super().__init__()
        self.lam = float(lam)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        old = teacher_logits.shape[1]
        kl = kl_teacher_student(student_logits[:, :old], teacher_logits, temperature) / (temperature * temperature)
        return kl, {"lwf": kl}

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return ce + self.lam * d


# --------------------------------------------------------------------------- feature methods
class FeatureLoss(DistillLoss):
    """Base of the feature methods: ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·F``.

    F (the distillation term D) compares student and teacher features at layer pairs
    (``student_layer`` / ``teacher_layer``: module paths, aliases or lists, see
    kdcl/distill/features.py). With the default α = 0 this is ``CE + β·F``, RepDistiller's and
    mdistiller's form; α > 0 adds Hinton's KD term.
    """

    def __init__(self, beta: float, student_layer: Any, teacher_layer: Any):
        super().__init__()
        self.beta = float(beta)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.pairs: list[tuple[str, str]] = []

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        student_refs = resolve_layers(student, self.student_layer, "student", example)
        teacher_refs = resolve_layers(teacher, self.teacher_layer, "teacher", example)
        pairs = pair_layers(student_refs, teacher_refs, self.student_layer, self.teacher_layer)
        shapes = zip(
            feature_shapes(student, [s for s, _ in pairs], example),
            feature_shapes(teacher, [t for _, t in pairs], example),
        )
        self.connect(pairs, list(shapes))

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        """Use these (student, teacher) layer pairs, whose features have these shapes (without the batch)."""
        self.pairs = pairs

    def layers(self) -> tuple[list[str], list[str]]:
        return [s for s, _ in self.pairs], [t for _, t in self.pairs]

    def features(self, ctx: LossContext) -> list[tuple[Tensor, Tensor]]:
        """This step's (student, teacher) feature of every pair."""
        return [(ctx.student_features[s], ctx.teacher_features[t]) for s, t in self.pairs]

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
        kd = kl_teacher_student(*ctx.soft_logits(student_logits, teacher_logits), temperature)
        f, terms = self.distill(student_logits, teacher_logits, target, temperature, ctx)
        return {"loss": (1 - alpha) * ce + alpha * kd + self.beta * f, "ce": ce, "kd": kd, **terms}


@register_loss("fitnet")
class FitNet(FeatureLoss):
    """FitNets, Romero et al. (ICLR 2015), "FitNets: Hints for Thin Deep Nets".

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·H``, ``H = Σ_j mean((r_j(F_s^j) − F_t^j)²)``

    r_j is a regressor trained with the student (a 1×1 convolution between maps, a linear
    layer between vectors); the mean runs over the teacher feature's elements, and a map
    larger than the other is average-pooled to its size. β = ``beta`` (100, as in
    RepDistiller / mdistiller). ``hint_epochs`` = N > 0 is FitNets' first stage: the first
    N epochs train on ``β·H`` alone (only the layers up to the hinted one and the
    regressors get gradients), the remaining epochs on L. The N epochs are part of the
    students' epochs (``trainer.epochs``, or ``stages.student.epochs``): the step budget and
    the LR schedule stay those of every other arm.
    """

    def __init__(
        self,
        beta: float,
        student_layer: Any,
        teacher_layer: Any,
        hint_epochs: int,
    ):
        super().__init__(beta, student_layer, teacher_layer)
        self.hint_epochs = int(hint_epochs)
        self.adapters = nn.ModuleList()

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        super().connect(pairs, shapes)
        self.adapters = nn.ModuleList(adapter(s, t, pair) for pair, (s, t) in zip(pairs, shapes))

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        hint = 0
        for regressor, (fs, ft) in zip(self.adapters, self.features(ctx)):
            fs, ft = match_spatial(regressor(fs.to(regressor.weight.dtype)), ft)  # under bf16 autocast too
            hint = hint + (fs - ft.float()).pow(2).flatten(1).mean(1)
        return hint, {"hint": hint}

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
        out = super().forward(student_logits, teacher_logits, target, alpha, temperature, ctx)
        if ctx.epoch <= self.hint_epochs:
            out["loss"] = self.beta * out["hint"]
        return out


def nce_loss(scores: Tensor, num_examples: int, eps: float = 1e-7) -> Tensor:
    """Per example, the NCE loss of a positive ``scores[:, 0]`` among K negatives
    ``scores[:, 1:]`` drawn uniformly from N examples (noise probability ``P_n = 1/N``):

    ``−log(s₀ / (s₀ + K·P_n)) − Σ_k log(K·P_n / (s_k + K·P_n))`` (Tian et al. 2020, Eq. 18-19;
    Wu et al. 2018), ``eps`` added to each denominator as in their code."""
    k_pn = (scores.shape[1] - 1) / num_examples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + k_pn + eps))
    negative = torch.log(k_pn / (scores[:, 1:] + k_pn + eps)).sum(1)
    return -(positive + negative)


@register_loss("crd")
class ContrastiveRepresentation(FeatureLoss):
    """CRD, Tian, Krishnan & Isola (ICLR 2020), "Contrastive Representation Distillation".

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·(NCE(s → t) + NCE(t → s))``

    The student's and the teacher's features at ``student_layer`` / ``teacher_layer``
    (penultimate by default) are embedded, ``e = g(f) / ‖g(f)‖₂`` with g a linear head per
    side (``feat_dim`` wide) trained with the student. Each side has a memory bank of one
    unit vector per training example. Example i's student embedding is scored against the
    *teacher* bank's entry i (its positive) and K = ``negatives`` other entries drawn
    uniformly, ``s = exp(e·m / τ) / Z`` (τ = ``nce_temperature``; Z the mean of the first
    batch's scores times N, then fixed, as in the authors' code), and :func:`nce_loss` makes
    the positive stand out; the teacher's embedding is scored against the student bank the
    same way. After the step each bank entry i moves to its side's new embedding,
    ``m ← normalise(μ·m + (1 − μ)·e)`` (μ = ``momentum``). Defaults are the paper's:
    ``feat_dim`` 128, K = 16,384, τ = 0.07, μ = 0.5, β = 0.8, α = 0 (RepDistiller's CIFAR-100
    setting).

    The banks, Z and the seed of the negatives live in the loss's state, which checkpoints
    and ``resume.pt`` keep; the negatives of step t are drawn from that seed and t, so a
    resumed run draws exactly what the uninterrupted one would. Negatives are drawn from
    all other examples, not only other classes (the authors' CIFAR code samples from other
    classes). Under DDP each rank's banks see its part of every batch.
    """

    def __init__(
        self,
        beta: float,
        student_layer: Any,
        teacher_layer: Any,
        feat_dim: int,
        negatives: int,
        nce_temperature: float,
        momentum: float,
    ):
        super().__init__(beta, student_layer, teacher_layer)
        self.feat_dim, self.negatives = int(feat_dim), int(negatives)
        self.nce_temperature, self.momentum = float(nce_temperature), float(momentum)
        self.heads = nn.ModuleList()
        # The negatives' seed (a buffer, once bound) as a number on the host too, which every
        # step reads without waiting for the device; loading a state sets it again.
        self.host_seed: int | None = None
        self.register_load_state_dict_post_hook(_seed_to_host)

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        if len(pairs) != 1:
            raise KdclError(
                f"distill=crd contrasts one student layer with one teacher layer, got {len(pairs)} pairs",
                fix="give one layer each: distill.student_layer=auto:penultimate distill.teacher_layer=auto:penultimate",
            )
        super().connect(pairs, shapes)
        (s, t) = shapes[0]
        self.heads = nn.ModuleList(nn.Linear(math.prod(shape), self.feat_dim) for shape in (s, t))

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        super().bind(student, teacher, example, num_examples)
        if num_examples < 2:
            raise KdclError("distill=crd needs at least 2 training examples", fix="use more training data")
        self.negatives = min(self.negatives, num_examples - 1)
        bound = 1 / math.sqrt(self.feat_dim / 3)  # the authors' uniform initialisation
        for side in ("student_bank", "teacher_bank"):
            bank = torch.rand(num_examples, self.feat_dim) * 2 * bound - bound
            self.register_buffer(side, bank)
        self.register_buffer("normaliser", torch.full((2,), -1.0))  # Z of each side, set on the first batch
        self.register_buffer("negatives_seed", torch.randint(0, 2**31 - 1, ()))
        self.host_seed = int(self.negatives_seed)

    def embed(self, ctx: LossContext) -> tuple[Tensor, Tensor]:
        """The batch's unit-length student and teacher embeddings."""
        ((fs, ft),) = self.features(ctx)
        head_s, head_t = self.heads
        return (
            F.normalize(head_s(fs.flatten(1).to(head_s.weight.dtype)), dim=1),
            # the teacher ran under inference_mode: a normal copy, which its head's gradient can save
            F.normalize(head_t(ft.flatten(1).to(head_t.weight.dtype).clone()), dim=1),
        )

    def contrast_indices(self, idx: Tensor, step: int) -> Tensor:
        """(B, 1 + K): each example's own index, then K others drawn uniformly, from a
        generator seeded by the loss's seed and the step."""
        n = len(self.student_bank)
        generator = torch.Generator().manual_seed(self.host_seed + 1_000_003 * step)
        drawn = torch.randint(0, n - 1, (len(idx), self.negatives), generator=generator)
        drawn = drawn.to(idx.device, non_blocking=True)  # a blocking copy would wait for the GPU's queue
        others = drawn + (drawn >= idx[:, None]).long()  # skip the example itself
        return torch.cat([idx[:, None], others], 1)

    def scores(self, embedding: Tensor, bank: Tensor, contrast: Tensor, side: int) -> Tensor:
        """``exp(e·m / τ) / Z`` of each embedding against its contrast entries of ``bank``."""
        raw = torch.exp(torch.einsum("bkd,bd->bk", bank[contrast], embedding) / self.nce_temperature)
        # Z is set on the first batch (still −1 until then), chosen on the device: no sync
        z = torch.where(self.normaliser[side] < 0, raw.detach().mean() * len(bank), self.normaliser[side])
        self.normaliser[side] = z
        return raw / z

    @torch.no_grad()
    def update_banks(self, idx: Tensor, student: Tensor, teacher: Tensor) -> None:
        for bank, embedding in ((self.student_bank, student), (self.teacher_bank, teacher)):
            bank[idx] = F.normalize(bank[idx] * self.momentum + embedding.detach() * (1 - self.momentum), dim=1)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if ctx.indices is None:
            raise KdclError("distill=crd needs each example's index", fix="train it through kdcl's training loop")
        idx = ctx.indices
        e_s, e_t = self.embed(ctx)
        contrast = self.contrast_indices(idx, ctx.step)
        n = len(self.student_bank)
        to_teacher = nce_loss(self.scores(e_s, self.teacher_bank, contrast, 0), n)
        to_student = nce_loss(self.scores(e_t, self.student_bank, contrast, 1), n)
        if self.training:
            self.update_banks(idx, e_s, e_t)
        crd = to_teacher + to_student
        return crd, {"crd": crd}


def _seed_to_host(loss: ContrastiveRepresentation, incompatible_keys: Any) -> None:
    """After a state is loaded into ``loss``: its negatives' seed, read once, on the host."""
    if hasattr(loss, "negatives_seed"):
        loss.host_seed = int(loss.negatives_seed)


@register_loss("at")
class AttentionTransfer(FeatureLoss):
    """Attention transfer, Zagoruyko & Komodakis (ICLR 2017), "Paying More Attention to Attention".

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·Σ_j mean_hw((Q_s^j − Q_t^j)²)``,
    ``Q = vec(Σ_c |A_c|^p) / ‖vec(Σ_c |A_c|^p)‖₂`` per example and layer pair j (p = 2).

    The paper writes the term ``(β/2)·Σ_j ‖Q_s^j − Q_t^j‖_2`` with β = 1000 "divided by the
    number of elements in the attention map and batch size"; its released code
    (attention-transfer ``at_loss``) and RepDistiller / mdistiller compute
    ``β·Σ_j mean((Q_s^j − Q_t^j)²)`` over batch and positions with β = 1000, the form β was
    tuned for and the one used here (per example: the mean over the H·W positions). A map
    larger than its partner is average-pooled to its size first.
    """

    def __init__(
        self,
        beta: float,
        p: float,
        student_layer: Any,
        teacher_layer: Any,
    ):
        super().__init__(beta, student_layer, teacher_layer)
        self.p = float(p)

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        require_maps([s for s, _ in shapes], [s for s, _ in pairs], "student", "at")
        require_maps([t for _, t in shapes], [t for _, t in pairs], "teacher", "at")
        super().connect(pairs, shapes)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        at = 0
        for fs, ft in self.features(ctx):
            fs, ft = match_spatial(fs, ft)
            at = at + (attention_map(fs, self.p) - attention_map(ft, self.p)).pow(2).mean(1)
        return at, {"at": at}


def attention_mse(a_s: Tensor, a_t: Tensor) -> Tensor:
    """Per example, ``mean_{h,q,k} (A_s − A_t)²`` of (B, H, L, L) attention maps (TinyBERT)."""
    return (a_s - a_t).pow(2).flatten(1).mean(1)


def attention_kl(a_s: Tensor, a_t: Tensor) -> Tensor:
    """Per example, ``mean_{h,q} KL(A_t[h,q,:] ‖ A_s[h,q,:])`` of (B, H, L, L) attention maps (MiniLM)."""
    log_ratio = a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log()
    return (a_t * log_ratio).sum(-1).flatten(1).mean(1)


ATTENTION_GAPS = {"mse": attention_mse, "kl": attention_kl}


def eager_attention(model: nn.Module) -> None:
    """Switch the Hugging Face Transformers inside ``model`` to their eager attention, the
    implementation whose layers return the attention probabilities (SDPA returns None)."""
    for module in model.modules():
        if callable(getattr(module, "set_attn_implementation", None)):
            module.set_attn_implementation("eager")


@register_loss("attention_maps")
class AttentionMapKD(FeatureLoss):
    """Attention-map distillation between Transformers: TinyBERT's attention loss (Jiao et al.,
    Findings of EMNLP 2020, "TinyBERT: Distilling BERT for Natural Language Understanding")
    with ``measure: mse``, MiniLM's (Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention
    Distillation for Task-Agnostic Compression of Pre-Trained Transformers") with ``measure: kl``.

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·Σ_j M_j``, per example and layer pair j, with
    A the (H, L, L) attention probabilities of a layer:

    - mse: ``M_j = mean_{h,q,k} (A_s[h,q,k] − A_t[h,q,k])²`` (:func:`attention_mse`);
    - kl: ``M_j = mean_{h,q} KL(A_t[h,q,:] ‖ A_s[h,q,:])`` (:func:`attention_kl`).

    The layers are ``student_layer`` / ``teacher_layer`` (``bert.encoder.layer.K.attention.self:1``:
    element 1 of the self-attention's output, its probabilities); lists map student layers
    to teacher layers. Models of different head counts compare their head-averaged maps.
    TinyBERT compares the scores before the softmax; HF layers return the probabilities
    (after attention dropout, in training), what MiniLM compares. ``bind`` switches both
    models to HF's eager attention, the implementation that returns them.
    """

    def __init__(self, beta: float, measure: str, student_layer: Any, teacher_layer: Any):
        super().__init__(beta, student_layer, teacher_layer)
        if measure not in ATTENTION_GAPS:
            raise KdclError(
                f"distill=attention_maps: measure={measure!r} is not a measure",
                fix=f"set distill.measure to one of: {', '.join(ATTENTION_GAPS)}",
            )
        self.gap = ATTENTION_GAPS[measure]

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        eager_attention(student)
        eager_attention(teacher)
        super().bind(student, teacher, example, num_examples)

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        for (s, t), (s_shape, t_shape) in zip(pairs, shapes):
            if len(s_shape) != 3 or len(t_shape) != 3 or s_shape[1:] != t_shape[1:]:
                raise KdclError(
                    f"distill=attention_maps compares attention maps (heads, L, L), but {s} gives "
                    f"{s_shape} and {t} gives {t_shape}",
                    fix="name the self-attention modules' element 1, e.g. "
                    "distill.student_layer=bert.encoder.layer.0.attention.self:1",
                )
        super().connect(pairs, shapes)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        total = 0
        for a_s, a_t in self.features(ctx):
            a_s, a_t = (
                a_s.float(),
                a_t.float().clone(),
            )  # the clone: a normal tensor (the teacher ran in inference mode)
            if a_s.shape[1] != a_t.shape[1]:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            total = total + self.gap(a_s, a_t)
        return total, {"attention": total}


def hierarchical_context_loss(student: Tensor, teacher: Tensor, levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """ReviewKD's HCL for one pair of maps of equal shape, per example (Chen et al. 2021, §3.3):

    ``(mse(F_s, F_t) + Σ_l 2^-k(l)·mse(pool_l(F_s), pool_l(F_t))) / (1 + Σ_l 2^-k(l))``

    ``pool_l`` the adaptive average pooling to l×l for the levels l < H (4, 2, 1), weighted
    1/2, 1/4, 1/8 in turn as in the authors' code; mse the mean over channels and positions."""
    mse = (student - teacher).pow(2).flatten(1).mean(1)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= student.shape[2]:
            continue
        weight /= 2
        pooled = F.adaptive_avg_pool2d(student, level) - F.adaptive_avg_pool2d(teacher, level)
        mse = mse + weight * pooled.pow(2).flatten(1).mean(1)
        total += weight
    return mse / total


class AttentionFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF): a student map, narrowed by a 1×1 conv, is
    mixed with the fused map of the next deeper level by two per-position attention weights
    (a 1×1 conv and a sigmoid over both), resized to the teacher's map and widened to its
    channels by a 3×3 conv. Returns (the map to compare with the teacher's, the fused map
    passed to the next shallower level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.narrow = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.widen = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.narrow(x)
        if self.attention is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], 1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        fused = x
        if x.shape[2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.widen(x), fused


@register_loss("reviewkd")
class ReviewKD(FeatureLoss):
    """ReviewKD, Chen, Liu, Zhao & Jia (CVPR 2021), "Distilling Knowledge via Knowledge Review".

    ``L = (1 − α)·CE + α·T²·KL(p_t ‖ p_s) + β·w(e)·Σ_j HCL(R_j, F_t^j)``, ``w(e) = min(e / W, 1)``

    The student's maps at ``student_layer`` (``auto:stages``: one per resolution) are
    reviewed from the deepest up: level j's map is fused with the fused map of level j + 1
    (:class:`AttentionFusion`), so R_j, compared with the teacher's map at level j, carries
    the deeper levels too; HCL is :func:`hierarchical_context_loss`. The fusion modules train
    with the student; ``mid_channels`` is their inner width (the authors': min(512, the
    deepest student width)). β = ``beta`` (1, as in mdistiller's CIFAR-100 setting), W =
    ``warmup_epochs`` (20 of 240 there), α = 0. The authors compare pre-activation features
    and add the pooled feature as a last 1×1 level; here the hooked outputs of the layers
    named are compared (name the pooled feature's layer in both lists to add that level).
    """

    def __init__(
        self,
        beta: float,
        student_layer: Any,
        teacher_layer: Any,
        mid_channels: int | None,
        warmup_epochs: float,
    ):
        super().__init__(beta, student_layer, teacher_layer)
        self.mid_channels, self.warmup_epochs = mid_channels, warmup_epochs
        self.fusions = nn.ModuleList()
        self.teacher_sizes: list[tuple[int, int]] = []

    def connect(self, pairs: list[tuple[str, str]], shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        require_maps([s for s, _ in shapes], [s for s, _ in pairs], "student", "reviewkd")
        require_maps([t for _, t in shapes], [t for _, t in pairs], "teacher", "reviewkd")
        super().connect(pairs, shapes)
        mid = self.mid_channels or min(512, shapes[-1][0][0])
        deepest = len(shapes) - 1
        self.fusions = nn.ModuleList(
            AttentionFusion(s[0], mid, t[0], fuse=j < deepest) for j, (s, t) in enumerate(shapes)
        )
        self.teacher_sizes = [tuple(t[1:]) for _, t in shapes]

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.features(ctx)
        hcl, deeper = 0, None
        for j in reversed(range(len(features))):
            fs, ft = features[j]
            fusion = self.fusions[j]
            reviewed, deeper = fusion(fs.to(fusion.narrow[0].weight.dtype), deeper, self.teacher_sizes[j])
            hcl = hcl + hierarchical_context_loss(reviewed.float(), ft.float())
        warm = min(ctx.epoch / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0
        return warm * hcl, {"hcl": hcl}


# --------------------------------------------------------------------------- composition
@register_loss("composed")
class Composed(DistillLoss):
    """Several methods at once, e.g. KD plus hints (RepDistiller's ``γ·CE + α·KD + β·F``).

    ``L = (1 − α)·CE + (α / α₀)·Σ_k w_k·D_k``

    ``losses`` lists the methods: ``{name: kd, weight: 0.9}`` adds ``0.9·D_kd``, D_k being
    method k's distillation term (its formula without the CE part and its own weight:
    ``T²·KL`` for kd, ``H`` for fitnet, ``Σ_j mean((Q_s − Q_t)²)`` for at,
    ``w(e)·(a·TCKD + b·NCKD)`` for dkd). Other keys of an entry configure that method
    (layers, γ, ...); every method uses this loss's temperature. At the configured α₀ =
    ``alpha`` the loss is ``(1 − α₀)·CE + Σ_k w_k·D_k``; when the dynamic control moves α
    (schedules, per-example ``sample_weight``) every term moves with it by ``α/α₀``
    (by 1 when α₀ = 0). α₀ is ``distill.alpha``, the one control key a loss takes as its
    own (the control schedules α from it and passes α every step). Every method's terms
    are logged, a repeated name with the entry's position appended (``kd_1``).
    """

    def __init__(self, alpha: float, losses: Sequence[dict]):
        super().__init__()
        self.alpha0 = float(alpha)
        if not losses:
            raise KdclError(
                "distill=composed has no losses",
                fix="list them: distill.losses='[{name: kd, weight: 0.9}, {name: fitnet, weight: 100}]'",
            )
        self.parts = nn.ModuleList(create_loss({k: v for k, v in spec.items() if k != "weight"}) for spec in losses)
        for spec, part in zip(losses, self.parts):
            if part.views > 1:
                raise KdclError(
                    f"distill=composed cannot hold {spec['name']}: it compares {part.views} views of each batch",
                    fix=f"use distill={spec['name']} on its own",
                )
        self.weights = [float(spec.get("weight", 1.0)) for spec in losses]
        self.needs_teacher = any(part.needs_teacher for part in self.parts)
        self.reads_label = any(part.reads_label for part in self.parts)

    def distill(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Weight, ctx: LossContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        total, terms = 0, {}
        for k, (part, weight) in enumerate(zip(self.parts, self.weights)):
            d, part_terms = part.distill(student_logits, teacher_logits, target, temperature, ctx)
            total = total + weight * d
            terms.update({name if name not in terms else f"{name}_{k}": v for name, v in part_terms.items()})
        return total, terms

    def combine(self, ce: Tensor, d: Tensor, alpha: Weight) -> Tensor:
        return (1 - alpha) * ce + (alpha / self.alpha0 if self.alpha0 else 1.0) * d

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        for part in self.parts:
            part.bind(student, teacher, example, num_examples)

    def layers(self) -> tuple[list[str], list[str]]:
        student, teacher = [], []
        for part in self.parts:
            s, t = part.layers()
            student += s
            teacher += t
        return student, teacher


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
