"""``distill=mlkd``: multi-level logit distillation, Jin, Wang & Lin (CVPR 2023),
"Multi-Level Logit Distillation" (:class:`MultiLevelKD`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdcl.distill.losses.base import DistillLoss, LossContext, Weight, kl_teacher_student, register_loss
from kdcl.errors import KdclError


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

    ``L = λ_CE·[CE(y, z_s^w) + CE(y, z_s^s)] + λ_KD·Σ_T [m·KL_T^w + KL_T^s + m_c·CC_T + m·BC_T]``
    (per example; λ_CE = ``ce_weight``, λ_KD = ``kd_weight``: the authors' 0.1 and 0.9)

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
    the share kept. Like that code, the class and batch levels use the plain views only, and
    its default weights apply (its configs leave them unset: CE 0.1, every distillation term
    0.9; ``distill.alpha`` is not used). One departure: the code's strong-view
    KL at T = 2 and 6 compares the *plain* views' logits, a slip against the paper; here
    every strong-view KL compares the strong views'. With ``distill.logit_standardization``
    the KL terms see z-scored logits and the CC and BC terms the raw ones, as in the code of
    Sun et al. 2024's MLKD + LS (``distill=mlkd_ls``: their temperatures 2, 3, 5, 2, 6, CE
    weight 0.1, KD weight 9).
    """

    ignores = frozenset({"alpha", "temperature"})
    views = 2

    def __init__(self, temperatures: Sequence[float], ce_weight: float, kd_weight: float):
        super().__init__()
        self.temperatures = [float(t) for t in temperatures]
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
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
        raw_t_w = teacher_logits[: len(target)]  # the plain views' raw logits: the masks, CC and BC
        teacher_probs = F.softmax(raw_t_w.float(), dim=1)
        m = share_at_or_below_median(teacher_probs.amax(1))
        m_c = share_at_or_below_median(teacher_probs.sum(0))
        (s_w, s_s), (t_w, t_s) = (z.chunk(2) for z in ctx.soft_logits(student_logits, teacher_logits))
        kd_weak = kd_strong = cc = bc = teacher_probs.new_zeros(())
        for t in self.temperatures:
            kd_weak = kd_weak + kl_teacher_student(s_w, t_w, t)
            kd_strong = kd_strong + kl_teacher_student(s_s, t_s, t)
            p_s, p_t = F.softmax(plain.float() / t, dim=1), F.softmax(raw_t_w.float() / t, dim=1)
            cc = cc + correlation_gap(p_s, p_t, over_classes=True)
            bc = bc + correlation_gap(p_s, p_t, over_classes=False)
        cc, bc = cc.expand_as(ce), bc.expand_as(ce)
        loss = self.ce_weight * (ce + ce_strong) + self.kd_weight * (m * kd_weak + kd_strong + m_c * cc + m * bc)
        return {
            "loss": loss,
            "ce": ce,
            "ce_strong": ce_strong,
            "kd": kd_weak,
            "kd_strong": kd_strong,
            "cc": cc,
            "bc": bc,
        }
