"""Text as token ids: the tokenizer (trained on the training split, or an HF model's),
the encoding of texts into an (N, L) id array, and the batch step on the device
(:class:`TextPreprocess`).

A trained tokenizer is byte-pair encoding (BPE, Sennrich et al. 2016) with BERT's
normalisation (Unicode clean-up, accents stripped, lowercased unless
``dataset.lowercase=false``) and pre-tokenisation (whitespace and punctuation), each word
marked at its start with ``▁`` (SentencePiece's Metaspace, Kudo & Richardson 2018), a
vocabulary of at most ``dataset.vocab_size`` pieces learnt from the training texts with the
``tokenizers`` package, offline; every text is framed as ``[CLS] … [SEP]`` and ``[PAD]`` is
id 0. Training is deterministic: the same texts give the same pieces and ids. (WordPiece's
trainer is not: it numbers its ``##`` pieces in hash order, which changes how it breaks ties
between equally frequent merges, so the vocabulary differs from one call to the next.)

Each example is truncated to ``dataset.max_length`` ids (the frame included) and
right-padded with the pad id to that length in memory; a batch is cut to its longest
example when it reaches the model, whose attention mask (or sequence lengths) is
``ids != pad_id``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from kdcl.data.preprocess import FixedViews
from kdcl.distributed import Part
from kdcl.errors import TEXT_EXTRA, KdclError
from kdcl.trust import remote_code_refused

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # [PAD] first: pad id 0


def text_import(module: str, user: str) -> ModuleType:
    """``import module`` for ``user``; missing, one :class:`KdclError` naming the ``text`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KdclError(f"{user} needs the package {module}, which is not installed", fix=TEXT_EXTRA) from None


@dataclass(frozen=True)
class TextEncoding:
    """How a text dataset's examples became ids: the tokenizer (``tokenizers`` JSON, saved
    with the run and in its checkpoints), its pad id and vocabulary size, and the most ids
    an example keeps."""

    tokenizer_json: str
    pad_id: int
    vocab_size: int
    max_length: int

    def mask_and_special_ids(self) -> tuple[int, list[int]]:
        """The id that masks a token ([MASK] or ``<mask>``, else the unknown token) and the ids
        of every special token, as the tokenizer declares them."""
        declared = json.loads(self.tokenizer_json).get("added_tokens", [])
        special = {t["content"]: t["id"] for t in declared if t.get("special")}
        name = next((n for n in ("[MASK]", "<mask>", "[UNK]", "<unk>") if n in special), None)
        if name is None:
            raise KdclError(
                "dataset.token_mask needs a mask or unknown token, but the tokenizer declares neither",
                fix="set dataset.token_mask=0, or use a tokenizer with [MASK] or [UNK]",
            )
        return special[name], list(special.values())

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` itself, truncating to ``max_length`` ids, not padding."""
        tokenizers = text_import("tokenizers", "text data")
        tokenizer = tokenizers.Tokenizer.from_str(self.tokenizer_json)
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_length)
        return tokenizer

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int64 ids (N, max_length): each text's ids, right-padded with ``pad_id``."""
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        for row, encoded in enumerate(self.tokenizer().encode_batch(list(texts))):
            ids[row, : len(encoded.ids)] = encoded.ids
        return ids


def check_max_length(max_length: int) -> None:
    if max_length <= 0:
        raise KdclError(
            f"dataset.max_length={max_length}: an example must keep at least one token",
            fix="set dataset.max_length to a positive number of tokens, e.g. 64",
        )


def trained_tokenizer(texts: Sequence[str], vocab_size: int, lowercase: bool, max_length: int) -> TextEncoding:
    """A BPE tokenizer of at most ``vocab_size`` pieces learnt from ``texts``."""
    tokenizers = text_import("tokenizers", "a tokenizer trained on the data")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise KdclError(
            f"dataset.vocab_size={vocab_size} leaves no room beside the {len(SPECIAL_TOKENS)} special tokens",
            fix="set dataset.vocab_size to a few thousand, e.g. 8000",
        )
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Metaspace()])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return TextEncoding(tokenizer.to_str(), tokenizer.token_to_id("[PAD]"), tokenizer.get_vocab_size(), max_length)


def model_tokenizer(path: str, max_length: int) -> TextEncoding:
    """The (fast) tokenizer of the Hugging Face model directory ``path``, read offline."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise KdclError(
            f"dataset.tokenizer={path}: no such directory",
            fix="point dataset.tokenizer at a Hugging Face model directory holding its tokenizer files, "
            "or set dataset.tokenizer=null to train one on the training split",
        )
    transformers = text_import("transformers", f"dataset.tokenizer={path}")
    try:
        with remote_code_refused(
            f"dataset.tokenizer={path}",
            fix="use a tokenizer transformers reads without code of its own (a fast tokenizer.json)",
        ):
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
    except (OSError, ValueError) as err:
        raise KdclError(
            f"dataset.tokenizer={path}: no tokenizer could be read from it ({str(err).splitlines()[0]})",
            fix="save one there with tokenizer.save_pretrained(path), or set dataset.tokenizer=null",
        ) from None
    if not tokenizer.is_fast or tokenizer.pad_token_id is None:
        raise KdclError(
            f"dataset.tokenizer={path}: its tokenizer is {'not a fast one' if not tokenizer.is_fast else 'without a pad token'}",
            fix="use a model directory with a fast tokenizer (tokenizer.json) that has a pad token",
        )
    backend = tokenizer.backend_tokenizer
    return TextEncoding(backend.to_str(), int(tokenizer.pad_token_id), len(tokenizer), max_length)


class TextPreprocess:
    """The batch step for token ids (a batch comes cut to its longest text:
    :class:`kdcl.data.sources.TensorSource`). In training, with ``token_mask`` p > 0, each token that is
    not a special one ([CLS], [SEP], padding, ...) is replaced by the mask token ([MASK], or
    [UNK] in a vocabulary without one) with probability p: the masking augmentation of Tang
    et al. 2019 ("Distilling task-specific knowledge from BERT into simple neural networks",
    §3.2), whose point is that the teacher labels the masked texts the data does not hold.
    Without it training and evaluation see the same ids, and the ``no_aug`` teacher cache
    (whose view is the example itself) works as for images.

    Which tokens a text loses is a function of the stage's seed, the text, the epoch and the
    token's place (:meth:`masks`: a keyed hash, :func:`keyed_uint32`), not of a generator's
    stream: the same in any batch, order, padded length or process, after a resume, and for
    every stage of one seed (the baseline and each distilled student mask each text alike,
    so their difference is the loss alone; the teacher, of another seed, learnt on other
    masks). A teacher cache's view v of a text (``views:K``, :meth:`fixed_views`) is its
    masking in epoch v + 1: with K ≥ the epochs, a cached teacher teaches exactly the texts an
    online one does, and the run trains to the same numbers."""

    augmented_views = False  # no view of a text is drawn per sample (kdcl.data.views)

    def __init__(
        self,
        pad_id: int,
        device: torch.device,
        seed: int,
        token_mask: float = 0.0,
        mask_id: int | None = None,
        special_ids: Sequence[int] = (),
    ):
        self.pad_id, self.token_mask, self.mask_id = pad_id, token_mask, mask_id
        self.special = torch.tensor(sorted({pad_id, *special_ids}), device=device)
        self.generator = torch.Generator(device=device)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start a stage of seed ``seed``: its masks are keyed with it."""
        self.generator.manual_seed(seed)
        self.salt = seed & UINT32

    @property
    def augments(self) -> bool:
        return self.token_mask > 0

    def __call__(self, x: Tensor, train: bool, part: Part | None = None) -> Tensor:
        """The ids as a model reads them: as they are (training masks them in :meth:`training`)."""
        return x

    def training(self, x: Tensor, idx: Tensor, epoch: int, part: Part | None = None) -> Tensor:
        """The training batch ``x`` of examples ``idx`` in ``epoch`` (1-based): view ``epoch − 1``."""
        if not self.augments:
            return x
        return self.masks(x, idx, torch.full_like(idx, epoch - 1))

    def masks(self, x: Tensor, idx: Tensor, view: Tensor) -> Tensor:
        """``x`` (the ids of examples ``idx``) with token t of example i masked in view v when
        ``h(s, i·2¹⁶ + v, t) < p·2³²``: ``h`` :func:`keyed_uint32`, s the stage's seed, p
        ``token_mask``; special tokens never."""
        keys = idx.long() * VIEWS_PER_TEXT + view.long()
        chosen = keyed_uint32(self.salt, keys, x.shape[1]) < round(self.token_mask * 2**32)
        assert self.mask_id is not None  # given whenever tokens are masked (token_mask > 0)
        return torch.where(chosen & ~torch.isin(x, self.special), self.mask_id, x)

    def fixed_views(self, n: int, k: int, generator: torch.Generator) -> tuple[FixedViews, Tensor]:
        """A teacher cache's ``k`` views of each of ``n`` texts: ``(x, idx, v) →`` view ``v[j]``
        of text ``idx[j]``, the masks of epoch v + 1 (:meth:`masks`), and each text's phase, 0:
        in epoch e a text shows view ``(e − 1) mod k``, as online training masks it when
        k ≥ the epochs."""
        return self.masks, torch.zeros(n, dtype=torch.long)


VIEWS_PER_TEXT = 2**16  # the views (epochs) a text's mask keys tell apart
UINT32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2³² / φ: consecutive places land far apart before they are mixed


def _times(x: Tensor, m: int) -> Tensor:
    """``x · m mod 2³²`` for ``x`` in [0, 2³²) held in int64, in 16-bit halves of ``m`` so no
    product leaves int64."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & UINT32


def mix32(x: Tensor) -> Tensor:
    """Wellons' ``lowbias32`` integer hash (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
    x *= 0x846ca68b; x ^= x >> 16, all mod 2³²) of int64 tensors holding values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uint32(salt: int, keys: Tensor, length: int) -> Tensor:
    """``(len(keys), length)`` hashes in [0, 2³²), int64: entry (j, t) mixes ``salt``, the
    64-bit ``keys[j]`` and the place ``t``, so each is a uniform draw that a key and a place
    alone decide (a counter-based generator, on any device, with no state)."""
    keys = keys.long()
    h = mix32((keys & UINT32) ^ salt)
    h = mix32(h ^ ((keys >> 32) & UINT32))
    places = _times(torch.arange(length, device=keys.device), GOLDEN)
    return mix32(h[:, None] ^ places)
