"""kdcl's text models, registered in :data:`kdcl.models.registered.MODELS`: a BERT encoder
(``bert``, from ``transformers``, built from a config: no download) and students without
attention (``bilstm``, ``text_cnn``, ``bow``).

Every one maps a (B, L) batch of token ids, right-padded with ``pad_id``, to
``(B, num_classes)`` logits; the padding is masked out (``ids != pad_id``). The data gives
``vocab_size`` and ``pad_id`` (:attr:`kdcl.data.DataBundle.model_kwargs`), and
``input_shape`` is ``(max_length,)``. Ids arrive as any dtype (a probe pass sends float
zeros: all padding) and are read as integers. Each model keeps ``rebuild_kwargs`` (the
vocabulary's size and the pad id), so a checkpoint rebuilds it without the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdcl.errors import TEXT_EXTRA
from kdcl.models.registered import _no_pretrained, register_model
from kdcl.models.sources import optional_import


class TokenModel(nn.Module):
    """What every text model shares: the pad id, the mask, and what a checkpoint keeps."""

    def __init__(self, vocab_size: int, pad_id: int):
        super().__init__()
        self.vocab_size, self.pad_id = vocab_size, pad_id

    @property
    def rebuild_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "pad_id": self.pad_id}

    def ids_and_mask(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) int64 ids and their bool mask, True at the tokens that are not padding."""
        ids = ids.long()
        return ids, ids != self.pad_id


def token_embedding(vocab_size: int, width: int, pad_id: int) -> nn.Embedding:
    """Token embeddings drawn from N(0, 1/width) (unit expected norm; the pad row 0), not
    ``nn.Embedding``'s N(0, 1): vectors √width times smaller move √width times further
    per optimizer step, so a student trained from scratch learns its vocabulary in a few
    epochs at the learning rate its teacher trains with."""
    embedding = nn.Embedding(vocab_size, width, padding_idx=pad_id)
    with torch.no_grad():
        embedding.weight.normal_(0, width**-0.5)
        embedding.weight[pad_id].zero_()
    return embedding


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D) → (B, D): the mean over the unmasked positions (0 for an all-padding row)."""
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D) → (B, D): the max over the unmasked positions (0 for an all-padding row)."""
    pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))


class BertClassifier(TokenModel):
    """BERT (Devlin et al. 2019): token, position and segment embeddings, ``layers``
    Transformer encoder layers, the tanh pooler on ``[CLS]``, dropout and a linear head, as
    ``transformers.BertForSequenceClassification`` (whose parts and initialisation it takes).

    Module names, for feature distillation (``distill=fitnet``): ``bert.embeddings``,
    ``bert.encoder.layer.K`` (K = 0..layers−1; its output is the hidden states (B, L, H),
    or a tuple whose first element they are), ``bert.pooler``, ``classifier``."""

    def __init__(self, config: Any, pad_id: int):
        super().__init__(config.vocab_size, pad_id)
        transformers = optional_import("transformers", "model bert", TEXT_EXTRA)
        hf = transformers.BertForSequenceClassification(config)
        self.bert, self.dropout, self.classifier = hf.bert, hf.dropout, hf.classifier

    def forward(self, ids: Tensor) -> Tensor:
        ids, mask = self.ids_and_mask(ids)
        pooled = self.bert(input_ids=ids, attention_mask=mask.long()).pooler_output
        return self.classifier(self.dropout(pooled))


@register_model("bert", inputs="tokens")
def bert(
    num_classes: int,
    input_shape: Sequence[int],
    pretrained: bool = False,
    vocab_size: int = 30522,
    pad_id: int = 0,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    intermediate: int = 1024,
    dropout: float = 0.1,
) -> nn.Module:
    """A BERT encoder of ``layers`` layers of width ``hidden`` (``heads`` attention heads,
    feed-forward width ``intermediate``) with a classification head, randomly initialised
    from a ``BertConfig``; positions up to ``input_shape[0]`` (the data's max_length)."""
    _no_pretrained("bert", pretrained)
    transformers = optional_import("transformers", "model bert", TEXT_EXTRA)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=int(input_shape[0]),
        num_labels=num_classes,
        pad_token_id=pad_id,
    )
    return BertClassifier(config, pad_id)


class BiLSTMClassifier(TokenModel):
    """Tang et al. 2019 ("Distilling Task-Specific Knowledge from BERT into Simple Neural
    Networks"): word embeddings, one bidirectional LSTM, the last forward and backward
    hidden states concatenated, a ReLU layer and a linear head:
    ``z = W₂ ReLU(W₁ [h→_T ; h←_1] + b₁) + b₂``. Padding is packed away (the lengths are
    ``ids != pad_id``)."""

    def __init__(self, num_classes: int, vocab_size: int, pad_id: int, embed: int, hidden: int, dropout: float):
        super().__init__(vocab_size, pad_id)
        self.embedding = token_embedding(vocab_size, embed, pad_id)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, ids: Tensor) -> Tensor:
        ids, mask = self.ids_and_mask(ids)
        if torch.jit.is_tracing():  # an export: ONNX has no packed sequences
            return self.head(self.last_states_unpacked(ids, mask))
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (last, _) = self.lstm(packed)  # last: (2, B, hidden), forward then backward
        return self.head(torch.cat([last[0], last[1]], 1))

    def last_states_unpacked(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``[h→_T ; h←_1]`` without packing, for exporters: the forward direction's output at
        the last token of the right-padded batch, and the backward direction's at the first
        token of the same batch left-padded (its backward pass reads the tokens before any
        padding). Two LSTM passes; equal to the packed forward."""
        n, width = ids.shape
        lengths = mask.sum(1).clamp(min=1)
        positions = torch.arange(width, device=ids.device).expand(n, width)
        source = positions - (width - lengths).unsqueeze(1)  # left-padded position p holds token p − (L − len)
        left = torch.where(source >= 0, ids.gather(1, source.clamp(min=0)), torch.full_like(ids, self.pad_id))
        hidden = self.lstm.hidden_size
        right_out, _ = self.lstm(self.embedding(ids))
        left_out, _ = self.lstm(self.embedding(left))
        rows = torch.arange(n, device=ids.device)
        forward_last = right_out[rows, lengths - 1, :hidden]
        backward_first = left_out[rows, width - lengths, hidden:]
        return torch.cat([forward_last, backward_first], 1)


@register_model("bilstm", inputs="tokens")
def bilstm(
    num_classes: int,
    input_shape: Sequence[int],
    pretrained: bool = False,
    vocab_size: int = 30522,
    pad_id: int = 0,
    embed: int = 128,
    hidden: int = 128,
    dropout: float = 0.1,
) -> nn.Module:
    """BiLSTM student of Tang et al. 2019 (embedding width ``embed``, LSTM width ``hidden``
    per direction)."""
    _no_pretrained("bilstm", pretrained)
    return BiLSTMClassifier(num_classes, vocab_size, pad_id, embed, hidden, dropout)


class TextCNN(TokenModel):
    """Kim 2014 ("Convolutional Neural Networks for Sentence Classification"): word
    embeddings, 1-D convolutions of several widths with ReLU, max-pooled over the
    (unpadded) positions, concatenated, dropout and a linear head."""

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        pad_id: int,
        embed: int,
        filters: int,
        widths: Sequence[int],
        dropout: float,
    ):
        super().__init__(vocab_size, pad_id)
        self.embedding = token_embedding(vocab_size, embed, pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embed, filters, int(w), padding=int(w) // 2) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(filters * len(widths), num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        ids, mask = self.ids_and_mask(ids)
        x = self.embedding(ids).transpose(1, 2)  # (B, E, L)
        pooled = [masked_max(torch.relu(conv(x))[:, :, : ids.shape[1]].transpose(1, 2), mask) for conv in self.convs]
        return self.classifier(self.dropout(torch.cat(pooled, 1)))


@register_model("text_cnn", inputs="tokens")
def text_cnn(
    num_classes: int,
    input_shape: Sequence[int],
    pretrained: bool = False,
    vocab_size: int = 30522,
    pad_id: int = 0,
    embed: int = 128,
    filters: int = 100,
    widths: Sequence[int] = (3, 4, 5),
    dropout: float = 0.5,
) -> nn.Module:
    """CNN over embeddings of Kim 2014: ``filters`` filters per width in ``widths``."""
    _no_pretrained("text_cnn", pretrained)
    return TextCNN(num_classes, vocab_size, pad_id, embed, filters, widths, dropout)


class BagOfEmbeddings(TokenModel):
    """fastText-style (Joulin et al. 2017): the mean of the text's token embeddings and a
    linear head; word order plays no part (a bag of words)."""

    def __init__(self, num_classes: int, vocab_size: int, pad_id: int, embed: int):
        super().__init__(vocab_size, pad_id)
        self.embedding = token_embedding(vocab_size, embed, pad_id)
        self.classifier = nn.Linear(embed, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        ids, mask = self.ids_and_mask(ids)
        return self.classifier(masked_mean(self.embedding(ids), mask))


@register_model("bow", inputs="tokens")
def bow(
    num_classes: int,
    input_shape: Sequence[int],
    pretrained: bool = False,
    vocab_size: int = 30522,
    pad_id: int = 0,
    embed: int = 64,
) -> nn.Module:
    """Bag of embeddings (fastText-style) of width ``embed``."""
    _no_pretrained("bow", pretrained)
    return BagOfEmbeddings(num_classes, vocab_size, pad_id, embed)
