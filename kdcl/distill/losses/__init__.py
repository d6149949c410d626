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

Layout: :mod:`.base` holds the registry (``LOSSES``, ``register_loss``), :class:`DistillLoss`,
:class:`LossContext`, :func:`create_loss` and the shared helpers; :mod:`.feature_base` the
base of the feature methods; every other module one method, or a small family sharing
its helpers (``soft_ce`` and ``focal``), and registers it on import. Adding a method is one
module here with one ``@register_loss("name")`` class, plus ``conf/distill/<name>.yaml``:
every module of the package is imported below, so it registers itself.
"""

import importlib
import pkgutil

from kdcl.distill.losses.at import AttentionTransfer
from kdcl.distill.losses.attention_maps import (
    ATTENTION_GAPS,
    AttentionMapKD,
    attention_kl,
    attention_mse,
    eager_attention,
)
from kdcl.distill.losses.base import (
    LOSSES,
    DistillLoss,
    LossContext,
    Weight,
    create_loss,
    cross_entropy,
    kl_teacher_student,
    register_loss,
    standardize,
)
from kdcl.distill.losses.ce import CrossEntropyOnly
from kdcl.distill.losses.composed import Composed
from kdcl.distill.losses.crd import ContrastiveRepresentation, nce_loss
from kdcl.distill.losses.dist import DIST, pearson_distance
from kdcl.distill.losses.dkd import DecoupledKD, decoupled_kl
from kdcl.distill.losses.feature_base import FeatureLoss
from kdcl.distill.losses.fitnet import FitNet
from kdcl.distill.losses.kd import HintonKD
from kdcl.distill.losses.lwf import LearningWithoutForgetting
from kdcl.distill.losses.mlkd import MultiLevelKD, correlation_gap, share_at_or_below_median
from kdcl.distill.losses.mse import LogitMSE
from kdcl.distill.losses.reviewkd import AttentionFusion, ReviewKD, hierarchical_context_loss
from kdcl.distill.losses.soft_ce import FocalKD, SoftCrossEntropy, soft_cross_entropy

for _module in pkgutil.iter_modules(__path__):  # the methods not named above register too
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ATTENTION_GAPS",
    "AttentionFusion",
    "AttentionMapKD",
    "AttentionTransfer",
    "Composed",
    "ContrastiveRepresentation",
    "CrossEntropyOnly",
    "DIST",
    "DecoupledKD",
    "DistillLoss",
    "FeatureLoss",
    "FitNet",
    "FocalKD",
    "HintonKD",
    "LOSSES",
    "LearningWithoutForgetting",
    "LogitMSE",
    "LossContext",
    "MultiLevelKD",
    "ReviewKD",
    "SoftCrossEntropy",
    "Weight",
    "attention_kl",
    "attention_mse",
    "correlation_gap",
    "create_loss",
    "cross_entropy",
    "decoupled_kl",
    "eager_attention",
    "hierarchical_context_loss",
    "kl_teacher_student",
    "nce_loss",
    "pearson_distance",
    "register_loss",
    "share_at_or_below_median",
    "soft_cross_entropy",
    "standardize",
]
