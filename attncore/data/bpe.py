"""Byte-pair-encoding subword vocabularies, learnt and applied with the ``tokenizers`` package.

:class:`BPEVocab` has the interface of :class:`attncore.data.vocab.Vocab` (``encode``,
``decode``, ``len()``, the special ids ``pad=0, bos=1, eos=2, unk=3``, ``save``/``load``) and
is stored as the ``tokenizers`` JSON file (``tokenizer.json``), which any HF-compatible
tool can also read.

Pre-tokenisation splits on whitespace (marked with ``▁`` as in SentencePiece, so decoding
restores the spaces) and isolates punctuation; BPE merges are learnt inside those pieces.
``tokenizers`` is an optional dependency: importing this module without it raises
ImportError with the install hint.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from .vocab import SPECIAL_TOKENS

try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
except ImportError as exc:  # pragma: no cover - exercised only without the package
    raise ImportError("BPE vocabularies need the 'tokenizers' package: "
                      "pip install 'tokenizers>=0.15.1'") from exc

__all__ = ["BPEVocab"]


class BPEVocab:
    """Subword vocabulary backed by a ``tokenizers.Tokenizer``.

    Build one with :meth:`train`, or open a saved one with :meth:`load`.

    Parameters
    ----------
    tokenizer : tokenizers.Tokenizer
        Must map ``<pad> <bos> <eos> <unk>`` to ids 0..3 (true for tokenizers made by
        :meth:`train`). Its ``encode_special_tokens`` is switched on: text is text, so a
        ``"<eos>"`` typed in a string is split like any other characters instead of becoming
        the control id (as :meth:`attncore.data.vocab.Vocab.encode` does).
    """

    pad = 0
    bos = 1
    eos = 2
    unk = 3
    level = "bpe"

    def __init__(self, tokenizer: "Tokenizer"):
        got = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if got != [0, 1, 2, 3]:
            raise ValueError(f"tokenizer must give {SPECIAL_TOKENS} ids 0..3, got {got}")
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 4000,
              min_frequency: int = 2, normalizer=None) -> "BPEVocab":
        """Learn a BPE vocabulary from ``texts``.

        Parameters
        ----------
        texts : iterable of str
            Training sentences only (never the held-out splits).
        vocab_size : int
            Size including the four specials and the single characters.
        min_frequency : int
            A pair must occur this often to be merged.
        normalizer : tokenizers.normalizers.Normalizer, optional
            Applied to every text before pre-tokenisation, and saved with the vocabulary: a
            task that cleans its data (lower-casing...) passes the same cleaning here, so a
            served model reads raw user text as training read the cleaned text.
        """
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        tok.train_from_iterator(list(texts), trainer)
        return cls(tok)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPEVocab) and self.tokenizer.to_str() == other.tokenizer.to_str()

    def __repr__(self) -> str:
        return f"BPEVocab(size={len(self)})"

    @property
    def tokens(self) -> list[str]:
        """All tokens in id order, specials included."""
        return [self.tokenizer.id_to_token(i) for i in range(len(self))]

    def token_to_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        return self.unk if i is None else i

    def id_to_token(self, index: int) -> str:
        tok = self.tokenizer.id_to_token(int(index))
        if tok is None:
            raise IndexError(f"token id {index} outside [0, {len(self)})")
        return tok

    def tokenize(self, text: str) -> list[str]:
        """Subword strings of ``text`` (``▁`` marks a word start)."""
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def unknown_pieces(self, text: str) -> list[str]:
        """The pieces of ``text`` (its own characters) that encode to ``<unk>``: a BPE token
        of an unknown character is spelled ``<unk>``, which would hide what was unknown."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return [text[start:end] for i, (start, end) in zip(encoding.ids, encoding.offsets)
                if i == self.unk]

    def encode(self, text: str | Sequence[str], *, add_bos: bool = False,
               add_eos: bool = False) -> list[int]:
        """Ids of a string, or of an already tokenized list of subword strings."""
        if isinstance(text, str):
            ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        else:
            ids = [self.token_to_id(t) for t in text]
        return ([self.bos] if add_bos else []) + ids + ([self.eos] if add_eos else [])

    def decode(self, ids: Iterable[int], *, strip_special: bool = True) -> str:
        """Text of ``ids``; by default stops at the first ``eos`` and drops ``pad``/``bos``."""
        ids = [int(i) for i in ids]
        if strip_special:
            if self.eos in ids:
                ids = ids[:ids.index(self.eos)]
            ids = [i for i in ids if i not in (self.pad, self.bos)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``tokenizers`` JSON file."""
        self.tokenizer.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPEVocab":
        """Open a file written by :meth:`save` (or any compatible ``tokenizer.json``)."""
        return cls(Tokenizer.from_file(os.fspath(path)))

    def to_dict(self) -> dict:
        return json.loads(self.tokenizer.to_str())

