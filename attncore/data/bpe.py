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

from ..io import is_rust_panic
from .vocab import SPECIAL_TOKENS, _check_unicode

try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
except ImportError as exc:  # pragma: no cover - exercised only without the package
    raise ImportError("BPE vocabularies need the 'tokenizers' package: "
                      "pip install 'tokenizers>=0.15.1'") from exc

__all__ = ["BPEVocab", "text_normalizer"]


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
        _check_pipeline(json.loads(tokenizer.to_str()))
        ids = sorted(tokenizer.get_vocab(with_added_tokens=True).values())
        if ids != list(range(len(ids))):
            # (an id past a gap passed the size check, and tokenizers decoded it as nothing)
            raise ValueError(f"tokenizer ids must be 0..{len(ids) - 1} without gaps")
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
            served model reads raw user text as training read the cleaned text. One of the
            pieces a model directory may hold (:func:`_check_pipeline`): Lowercase, Strip,
            StripAccents, the NF* forms, Prepend, Replace that never lengthens the text, and
            Sequences of them.
        """
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
        tok.decoder = decoders.Metaspace()
        _check_pipeline(json.loads(tok.to_str()))   # (before training, not after it)
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
        """Token string of ``index``; raises IndexError outside ``[0, len)``, as
        :meth:`Vocab.id_to_token` (tokenizers raised OverflowError for -1 and 2**40)."""
        if not 0 <= int(index) < len(self):
            raise IndexError(f"token id {index} outside [0, {len(self)})")
        return self.tokenizer.id_to_token(int(index))

    def _encoding(self, text: str):
        # (the file's own normalizer decides: NFC is in text_normalizer's, and a vocabulary
        # saved without it reads text as its training did; a lone surrogate is a ValueError
        # naming it, where tokenizers raised a bare TypeError)
        _check_unicode(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tokenize(self, text: str) -> list[str]:
        """Subword strings of ``text`` (``▁`` marks a word start)."""
        return self._encoding(text).tokens

    def unknown_pieces(self, text: str) -> list[str]:
        """The pieces of ``text`` (its own characters) that encode to ``<unk>``: a BPE token
        of an unknown character is spelled ``<unk>``, which would hide what was unknown."""
        encoding = self._encoding(text)
        return [text[start:end] for i, (start, end) in zip(encoding.ids, encoding.offsets)
                if i == self.unk]

    def encode(self, text: str | Sequence[str], *, add_bos: bool = False,
               add_eos: bool = False) -> list[int]:
        """Ids of a string, or of an already tokenized list of subword strings."""
        if isinstance(text, str):
            ids = list(self._encoding(text).ids)
        else:
            ids = [self.token_to_id(t) for t in text]
        return ([self.bos] if add_bos else []) + ids + ([self.eos] if add_eos else [])

    def decode(self, ids: Iterable[int], *, strip_special: bool = True) -> str:
        """Text of ``ids``; by default stops at the first ``eos`` and drops ``pad``/``bos``.
        An id outside ``[0, len)`` raises IndexError, as :meth:`Vocab.decode` (tokenizers
        dropped it silently)."""
        ids = [int(i) for i in ids]
        if strip_special:
            if self.eos in ids:
                ids = ids[:ids.index(self.eos)]
            ids = [i for i in ids if i not in (self.pad, self.bos)]
        size = len(self)
        for i in ids:
            if not 0 <= i < size:
                raise IndexError(f"token id {i} outside [0, {size})")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        """The ``tokenizers`` JSON text :meth:`save` writes (``Tokenizer.save``'s pretty form)."""
        return self.tokenizer.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``tokenizers`` JSON file (whole or not at all: an existing file is
        replaced only once the new one is written)."""
        from attncore.io import replaced_whole
        with replaced_whole(path) as temporary:
            temporary.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPEVocab":
        """Open a file written by :meth:`save` (or a compatible ``tokenizer.json``: a BPE model
        with the pieces listed in :func:`_check_pipeline`). ValueError for anything else."""
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    @classmethod
    def from_json(cls, text: str) -> "BPEVocab":
        """The vocabulary of a ``tokenizers`` JSON text (what :meth:`to_json` gives and
        :meth:`load` reads). ValueError for anything else."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a tokenizers JSON file holds an object, got {type(data).__name__}")
        _check_pipeline(data)   # (before tokenizers parses a piece it may panic on)
        try:
            tokenizer = Tokenizer.from_str(text)
        except MemoryError:
            raise
        except BaseException as error:
            # tokenizers raises a bare Exception for a malformed file, and a Rust panic
            # (pyo3's PanicException, a BaseException that escapes ``except Exception``) for
            # some
            if not (isinstance(error, Exception) or is_rust_panic(error)):
                raise   # (KeyboardInterrupt, SystemExit)
            message = " ".join(str(error).split())[:300]
            raise ValueError(f"not a tokenizers JSON file: {message}") from None
        return cls(tokenizer)

    def to_dict(self) -> dict:
        return json.loads(self.tokenizer.to_str())


def text_normalizer(lowercase: bool = False, replacements=()):
    """The normalizer of the BPE vocabularies the bundled tasks train: NFC, the
    ``(old, new)`` ``replacements`` (strings), any run of whitespace (tab, no-break space,
    newline...) read as one space, the ends stripped, and lower-casing when asked. The word
    levels split on any whitespace; without this a BPE vocabulary split on " " only, and
    "the\\tcat" read the tab as ``<unk>`` and "cat" as a word's continuation."""
    from tokenizers import Regex, normalizers

    steps = [normalizers.NFC()]
    steps += [normalizers.Replace(old, new) for old, new in replacements]
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


# What a vocabulary file may ask of ``tokenizers``: the pieces :meth:`BPEVocab.train` and the
# bundled tasks write, and common fixed ones. A model directory can come from anywhere, and
# other pieces turn text into something else than the model read in training, or cost without
# bound: a regex ``Split`` or ``Replace`` can backtrack for minutes on a line (or panic), a
# ``Replace`` with a long content multiplies the text (10^7 ids from 100 characters), and
# truncation, padding or BPE dropout change the ids the model reads, silently.
_NORMALIZERS = {"Sequence", "Lowercase", "Strip", "StripAccents", "NFC", "NFD", "NFKC", "NFKD",
                "Replace", "Prepend"}
_PRE_TOKENIZERS = {"Sequence", "Metaspace", "Punctuation", "Whitespace", "WhitespaceSplit",
                   "ByteLevel", "Digits", "CharDelimiterSplit"}
_DECODERS = {"Sequence", "Metaspace", "ByteLevel", "BPEDecoder", "Fuse", "Strip", "ByteFallback",
             "Replace"}
#: the regular expressions a ``Replace`` may use (the translation task's whitespace runs)
_REGEXES = {r"\s+"}
#: at most this many characters in a ``Replace``'s pattern or content, a ``Prepend``'s text
_REPLACE_MAX = 16


def _check_pipeline(data: dict) -> None:
    """ValueError naming the first piece of a ``tokenizers`` JSON outside the allowed set."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"tokenizer model must be BPE, got "
                         f"{model.get('type') if isinstance(model, dict) else model!r}")
    if model.get("dropout") not in (None, 0, 0.0):
        raise ValueError(f"tokenizer model has BPE dropout {model.get('dropout')!r}: encodings "
                         f"would change from call to call")
    for key in ("truncation", "padding"):
        if data.get(key) is not None:
            raise ValueError(f"tokenizer has {key} settings: the model must read every token "
                             f"as given")
    for key, allowed in (("normalizer", _NORMALIZERS), ("pre_tokenizer", _PRE_TOKENIZERS),
                         ("decoder", _DECODERS)):
        _check_piece(data.get(key), key, allowed)


#: a Sequence's children, by the kind of piece
_SEQUENCE_KEYS = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers",
                  "decoder": "decoders"}
#: the most pieces a Sequence may hold
_SEQUENCE_MAX = 32


def _check_piece(piece, where: str, allowed: set) -> None:
    if piece is None:
        return
    kind = piece.get("type") if isinstance(piece, dict) else None
    if kind not in allowed:
        raise ValueError(f"tokenizer {where} {kind!r} is not supported (supported: "
                         f"{', '.join(sorted(allowed))})")
    if kind == "Sequence":
        children = piece.get(_SEQUENCE_KEYS[where])
        if not isinstance(children, list) or len(children) > _SEQUENCE_MAX:
            raise ValueError(f"tokenizer {where} Sequence must list at most {_SEQUENCE_MAX} "
                             f"pieces")
        for child in children:
            _check_piece(child, where, allowed)
    elif kind == "Replace":
        _check_replace(piece, where)
    elif kind == "Prepend" and len(str(piece.get("prepend", ""))) > _REPLACE_MAX:
        raise ValueError(f"tokenizer {where} Prepend text longer than {_REPLACE_MAX} characters")


def _check_replace(piece: dict, where: str) -> None:
    """A Replace never lengthens the text (chained ones grew it exponentially): a string
    pattern of 1 to 16 characters by at most as many, the whitespace regex by at most one."""
    pattern, content = piece.get("pattern"), piece.get("content")
    text = pattern.get("String", pattern.get("Regex")) if isinstance(pattern, dict) else None
    if not isinstance(text, str) or not isinstance(content, str):
        raise ValueError(f"tokenizer {where} Replace needs a string or regex pattern and a "
                         f"string content")
    if "Regex" in pattern:
        if text not in _REGEXES:
            raise ValueError(f"tokenizer {where} Replace regex {text!r} is not supported "
                             f"(supported: {', '.join(sorted(_REGEXES))})")
        longest = 1
    else:
        longest = len(text)
        if not 1 <= len(text) <= _REPLACE_MAX:
            raise ValueError(f"tokenizer {where} Replace pattern must hold 1 to {_REPLACE_MAX} "
                             f"characters")
    if len(content) > longest:
        raise ValueError(f"tokenizer {where} Replace content {content!r} is longer than what "
                         f"it replaces: text could grow without bound")

