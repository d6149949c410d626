"""``distill=crd``: contrastive representation distillation, Tian, Krishnan & Isola
(ICLR 2020), "Contrastive Representation Distillation" (:class:`ContrastiveRepresentation`,
its NCE loss in :func:`nce_loss`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcl.distill.losses.base import LossContext, Weight, register_loss, weight_dtype
from kdcl.distill.losses.feature_base import FeatureLoss
from kdcl.errors import KdclError


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

    student_bank: Tensor  # buffers, registered once bound
    teacher_bank: Tensor
    normaliser: Tensor
    negatives_seed: Tensor

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
            F.normalize(head_s(fs.flatten(1).to(weight_dtype(head_s))), dim=1),
            # the teacher ran under inference_mode: a normal copy, which its head's gradient can save
            F.normalize(head_t(ft.flatten(1).to(weight_dtype(head_t)).clone()), dim=1),
        )

    def contrast_indices(self, idx: Tensor, step: int) -> Tensor:
        """(B, 1 + K): each example's own index, then K others drawn uniformly, from a
        generator seeded by the loss's seed and the step."""
        n = len(self.student_bank)
        assert self.host_seed is not None  # set by bind, and by loading a state
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
