"""``distill=attention_maps``: attention-map distillation between Transformers, TinyBERT's
(Jiao et al., Findings of EMNLP 2020, "TinyBERT: Distilling BERT for Natural Language
Understanding") and MiniLM's (Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers") attention
losses (:class:`AttentionMapKD`, the measures in ``ATTENTION_GAPS``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdcl.distill.losses.base import LossContext, Weight, add_up, register_loss
from kdcl.distill.losses.feature_base import FeatureLoss
from kdcl.errors import KdclError


def attention_mse(a_s: Tensor, a_t: Tensor) -> Tensor:
    """Per example, ``mean_{h,q,k} (A_s − A_t)²`` of (B, H, L, L) attention maps (TinyBERT)."""
    return (a_s - a_t).pow(2).flatten(1).mean(1)


def attention_kl(a_s: Tensor, a_t: Tensor) -> Tensor:
    """Per example, ``mean_{h,q} KL(A_t[h,q,:] ‖ A_s[h,q,:])`` of (B, H, L, L) attention maps (MiniLM)."""
    log_ratio = a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log()
    return (a_t * log_ratio).sum(-1).flatten(1).mean(1)


ATTENTION_GAPS = {"mse": attention_mse, "kl": attention_kl}


def eager_attention(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Switch the Hugging Face Transformers inside ``model`` to their eager attention, the
    implementation whose layers return the attention probabilities (SDPA returns None);
    return each one switched with the implementation it had."""
    switched = []
    for module in model.modules():
        switch = getattr(module, "set_attn_implementation", None)
        if callable(switch):
            config: Any = module.config
            switched.append((module, config._attn_implementation))
            switch("eager")
    return switched


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
    models to HF's eager attention, the implementation that returns them, and ``release``
    switches them back (the teacher teaches later stages at its own speed).
    """

    def __init__(self, beta: float, measure: str, student_layer: Any, teacher_layer: Any):
        super().__init__(beta, student_layer, teacher_layer)
        if measure not in ATTENTION_GAPS:
            raise KdclError(
                f"distill=attention_maps: measure={measure!r} is not a measure",
                fix=f"set distill.measure to one of: {', '.join(ATTENTION_GAPS)}",
            )
        self.gap = ATTENTION_GAPS[measure]
        self.switched: list[tuple[nn.Module, str]] = []

    def bind(self, student: nn.Module, teacher: nn.Module, example: Tensor, num_examples: int) -> None:
        self.switched = [*eager_attention(student), *eager_attention(teacher)]
        super().bind(student, teacher, example, num_examples)

    def release(self) -> None:
        for module, implementation in reversed(self.switched):
            transformer: Any = module
            transformer.set_attn_implementation(implementation)

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
        gaps = []
        for a_s, a_t in self.features(ctx):
            a_s, a_t = (
                a_s.float(),
                a_t.float().clone(),
            )  # the clone: a normal tensor (the teacher ran in inference mode)
            if a_s.shape[1] != a_t.shape[1]:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            gaps.append(self.gap(a_s, a_t))
        total = add_up(gaps)
        return total, {"attention": total}
