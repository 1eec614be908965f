# SPDX-License-Identifier: Apache-2.0
"""Text <-> token ids for a model directory's tokenizer (``config["tokenizer"]``).

The one tokenizer type is ``"attncore.data.vocab"`` (written by
:func:`attncore.train.export.export`)::

    "tokenizer": {"type": "attncore.data.vocab", "src": "src_vocab.json", "tgt": "tgt_vocab.json"}

Each side names a JSON vocabulary file in the model directory, read with
:func:`attncore.data.vocab.load_vocab` (a plain :class:`~attncore.data.vocab.Vocab`, or a BPE
vocabulary when the optional ``tokenizers`` package is installed). No pickle. A decoder-only
or encoder-only model may give one side only; it then serves both.

Source EOS: an encoder-decoder's sources end with ``<eos>`` as the trainer saw them
(:meth:`attncore.data.task.Seq2SeqTask.encode_src`), so :meth:`Tokenizer.encode_source` appends
it when the entry names both a ``src`` and a ``tgt`` vocabulary; a one-sided tokenizer
(decoder-only prompts, classifier documents) does not. ``"source_eos": true|false`` in the
entry overrides this.

Unknown tokens: by default a token the source vocabulary lacks maps to ``<unk>`` (id 3), as
in training (the vocabularies were built with a frequency cut-off, so unseen tokens are
normal input). ``encode_source(text, strict=True)`` raises ``ValueError`` naming the token
instead.

Text is read as the vocabulary's training read it: in Unicode NFC for the vocabularies the
trainer writes now (version-2 files, :func:`attncore.data.vocab.normalize_text`; BPE files
whose normalizer has NFC), so an accent typed as a combining character is the composed
character; a file saved before keeps its own rules. A str holding a lone surrogate is not
text: ValueError.

Surrounding whitespace is stripped from sources (training data is; a RAN language model's
prompts keep their trailing space at the character level, where it is text in a prefix), and
a classifier trained on documents cut to their first N tokens cuts them the same way
(``"max_source_tokens": N``).

Special tokens: text is text. ``"<eos>"``, ``"<pad>"``... typed in a string never become
the control ids (an EOS or PAD inside a source, a RAN document's "no token" id): a word-level
vocabulary reads them as unknown words, a BPE one splits them into ordinary pieces.
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["Tokenizer", "load_tokenizer", "TOKENIZER_TYPE"]

TOKENIZER_TYPE = "attncore.data.vocab"
_SIDES = ("src", "tgt")


class Tokenizer:
    """Source and target vocabularies of a model.

    Parameters
    ----------
    src, tgt : vocabulary objects (``encode``, ``decode``, ``len()``, ``to_dict``), at least one
    src_file, tgt_file : str, the file names used when the model is saved
    source_eos : bool, optional
        Append ``<eos>`` to encoded sources; default: when both vocabularies are given
        (an encoder-decoder, see the module docstring).
    max_source_tokens : int, optional
        Cut encoded sources to their first this many tokens, as training cut its documents
        (a classification task's ``max_len``); default: no cut.
    keep_trailing_space : bool
        Strip only leading whitespace from sources of a character vocabulary: a document
        language model's prompt is a prefix, and "the " asks for the next word, not for a
        space (set by :func:`load_tokenizer` for a RAN with an LM head).
    """

    def __init__(self, src=None, tgt=None, *, src_file: str = "src_vocab.json",
                 tgt_file: str = "tgt_vocab.json", source_eos: Optional[bool] = None,
                 max_source_tokens: Optional[int] = None, keep_trailing_space: bool = False):
        if src is None and tgt is None:
            raise ValueError("a tokenizer needs a src or a tgt vocabulary")
        if source_eos is not None and not isinstance(source_eos, bool):
            raise TypeError(f"source_eos must be a bool, got {type(source_eos).__name__}")
        if max_source_tokens is not None and (
                isinstance(max_source_tokens, bool) or not isinstance(max_source_tokens, int)
                or max_source_tokens < 1):
            raise ValueError(f"max_source_tokens must be a positive integer, got "
                             f"{max_source_tokens!r}")
        self.max_source_tokens = max_source_tokens
        self.keep_trailing_space = bool(keep_trailing_space)
        self.src, self.tgt = src, tgt
        self._files = {"src": src_file, "tgt": tgt_file}
        self._default_eos = src is not None and tgt is not None
        self.source_eos = self._default_eos if source_eos is None else source_eos

    @property
    def source_vocab(self):
        return self.src if self.src is not None else self.tgt

    @property
    def target_vocab(self):
        return self.tgt if self.tgt is not None else self.src

    def encode_source(self, text: str, *, strict: bool = False) -> np.ndarray:
        """int64 (n,) source ids of ``text`` stripped of surrounding whitespace (leading only
        with :attr:`keep_trailing_space`), cut to
        :attr:`max_source_tokens` (then ``<eos>`` when :attr:`source_eos`). Unknown tokens ->
        ``<unk>``, or a ValueError naming them when ``strict``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        vocab = self.source_vocab
        # (training data is stripped, and a character vocabulary would read the spaces; a
        # BPE one read a prompt's trailing space as a lone "▁" its training never showed
        # before a word: a prompt's next word starts a piece by itself)
        keep = self.keep_trailing_space and getattr(vocab, "level", None) == "char"
        text = text.lstrip() if keep else text.strip()
        ids = vocab.encode(text)
        if self.max_source_tokens is not None:
            ids = ids[:self.max_source_tokens]
        if self.source_eos and ids:  # an empty text stays empty: callers reject it
            ids.append(getattr(vocab, "eos", 2))
        ids = np.asarray(ids, dtype=np.int64)
        unk = getattr(vocab, "unk", 3)
        if strict and (ids == unk).any():
            # what the text holds there (a BPE vocabulary spells an unknown character <unk>);
            # a literal "<unk>" typed in the text is unknown text like any other
            pieces = getattr(vocab, "unknown_pieces", None)
            found = pieces(text) if pieces is not None else \
                [tok for tok, i in zip(_tokens(vocab, text), ids) if i == unk]
            raise ValueError(f"text has tokens missing from the source vocabulary: "
                             f"{sorted(set(found))[:10]}")
        return ids

    def encode_target(self, text: str) -> np.ndarray:
        """int64 (n,) target ids of ``text`` (unknown tokens -> ``<unk>``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.asarray(self.target_vocab.encode(text), dtype=np.int64)

    def decode_target(self, ids: Sequence[int]) -> str:
        """Text of target ids; stops at EOS, drops PAD / BOS. ValueError for an id the
        vocabulary lacks (a model whose output layer is padded past it)."""
        return _decode(self.target_vocab, ids, "target")

    def decode_continuation(self, prompt: Sequence[int], ids: Sequence[int]) -> str:
        """The text that ``ids`` add after the token ids ``prompt``: ``prompt``'s text followed
        by it is the text of ``prompt + ids``. A decoder-only model's output: decoded alone,
        a BPE continuation lost its word start ("unto" after "said" and "id" after "sa" both
        read as a word), and a word-level one the space before it. A prompt holding EOS
        (``source <eos>``, what a pairs-trained language model reads) is followed by a text of
        its own: ``ids`` decoded alone."""
        prompt = list(prompt)
        if getattr(self.target_vocab, "eos", 2) in prompt:
            # a prompt that ends a text (a pairs-trained language model reads "source <eos>"
            # and writes the target): what follows is a text of its own (decoding the whole
            # stopped at that EOS: every output was "")
            return _decode(self.target_vocab, ids, "target")
        head = _decode(self.target_vocab, prompt, "target")
        whole = _decode(self.target_vocab, prompt + list(ids), "target")
        if whole.startswith(head):
            return whole[len(head):]
        return _decode(self.target_vocab, ids, "target")   # (a decoder that rewrites the head)

    def decode_source(self, ids: Sequence[int]) -> str:
        """Text of source ids; stops at EOS, drops PAD / BOS."""
        return _decode(self.source_vocab, ids, "source")

    # -- storage --------------------------------------------------------------------------
    def config(self) -> dict:
        """The ``config["tokenizer"]`` entry describing this tokenizer."""
        entry = {"type": TOKENIZER_TYPE}
        for side in _SIDES:
            if getattr(self, side) is not None:
                entry[side] = self._files[side]
        if self.source_eos != self._default_eos:
            entry["source_eos"] = self.source_eos
        if self.max_source_tokens is not None:
            entry["max_source_tokens"] = self.max_source_tokens
        return entry

    def files(self) -> Dict[str, str]:
        """{file name: JSON text} of the vocabularies, for :func:`attncore.io.save_model_dir`."""
        out = {}
        for side in _SIDES:
            vocab = getattr(self, side)
            if vocab is not None:
                out[self._files[side]] = _vocab_json(vocab)
        return out

    def __repr__(self) -> str:
        sizes = {side: len(getattr(self, side)) for side in _SIDES if getattr(self, side) is not None}
        return f"Tokenizer({sizes})"


def _decode(vocab, ids, side: str) -> str:
    """``vocab.decode`` of ids checked against the vocabulary first: a JSON vocabulary raised a
    bare IndexError, and a ``tokenizers`` one dropped the id silently."""
    if isinstance(ids, (str, bytes)):   # (iterated digit by digit: "56" decoded 5 and 6)
        raise TypeError("ids must be a sequence of integer token ids, got a string")
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_))
               for i in ids):   # (int() truncated 5.9 and read True as BOS)
        bad = next(i for i in ids if not isinstance(i, numbers.Integral)
                   or isinstance(i, (bool, np.bool_)))
        raise TypeError(f"ids must be integer token ids, got {bad} ({type(bad).__name__})")
    ids = [int(i) for i in ids]
    size = len(vocab)
    bad = next((i for i in ids if not 0 <= i < size), None)
    if bad is not None:
        raise ValueError(f"cannot decode token id {bad}: the {side} vocabulary has {size} "
                         f"tokens (a model whose output layer is larger than its tokenizer?)")
    return vocab.decode(ids)


def _tokens(vocab, text: str):
    tokenize = getattr(vocab, "tokenize", None)
    return tokenize(text) if tokenize is not None else list(text)


def _vocab_json(vocab) -> str:
    to_dict = getattr(vocab, "to_dict", None)
    if to_dict is not None:
        return json.dumps(to_dict(), ensure_ascii=False, indent=0)
    to_str = getattr(vocab, "to_str", None)  # a tokenizers-backed vocabulary
    if to_str is not None:
        return to_str()
    raise TypeError(f"cannot serialise vocabulary of type {type(vocab).__name__}")


def load_tokenizer(directory, config: dict) -> Optional[Tokenizer]:
    """The tokenizer ``config["tokenizer"]`` describes, with files read from ``directory``.

    Returns None when the entry is absent or null. Raises ValueError for an unknown type, a
    file name that leaves the directory, a missing or unreadable file, or a vocabulary larger
    than the model's ``src_vocab_size`` / ``tgt_vocab_size`` (a RAN's ``vocab_size``). A smaller one is allowed (output
    layers padded past the tokenizer are common); decoding an id it lacks raises ValueError.
    """
    from .data.vocab import load_vocab

    entry = config.get("tokenizer")
    if not entry:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"config['tokenizer'] must be an object, got {entry!r}")
    if entry.get("type") != TOKENIZER_TYPE:
        raise ValueError(f"config['tokenizer']: unsupported type {entry.get('type')!r} "
                         f"(supported: {TOKENIZER_TYPE!r})")
    directory = Path(directory)
    vocabs, names = {}, {}
    for side in _SIDES:
        name = entry.get(side)
        if name is None:
            continue
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"config['tokenizer'][{side!r}] must be a file name inside the model "
                             f"directory, got {name!r}")
        path = directory / name
        if not path.is_file():
            from .io import absent
            raise ValueError(f"config['tokenizer'][{side!r}]: "
                             + absent(path, f"missing file {str(path)!r}", repr(str(path))))
        try:
            vocab = load_vocab(path)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError,
                RecursionError) as exc:   # (json's errors are ValueErrors)
            detail = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"config['tokenizer'][{side!r}]: {str(path)!r} is not a readable "
                             f"vocabulary: {detail}") from None
        # (a RAN has one vocabulary for both sides: its vocab_size)
        size_key = f"{side}_vocab_size" if f"{side}_vocab_size" in config else "vocab_size"
        if size_key in config and len(vocab) > int(config[size_key]):
            raise ValueError(f"{name} has {len(vocab)} tokens, more than {size_key}="
                             f"{config[size_key]}")
        vocabs[side], names[f"{side}_file"] = vocab, name
    if not vocabs:
        raise ValueError("config['tokenizer'] names neither a 'src' nor a 'tgt' file")
    vocab = next(iter(vocabs.values()))
    for key, fixed in (("pad_id", vocab.pad), ("bos_id", vocab.bos), ("eos_id", vocab.eos),
                       ("unk_id", vocab.unk)):
        # (an eos_id of 4 stopped generation on a real token while sources ended with 2)
        if key in config and config[key] != fixed:
            raise ValueError(f"config: {key} {config[key]!r} is not the tokenizer's {fixed}: "
                             f"text would be read and written with other ids than the model's")
    source_eos = entry.get("source_eos")
    if source_eos is not None and not isinstance(source_eos, bool):
        raise ValueError(f"config['tokenizer']['source_eos'] must be true or false, got "
                         f"{source_eos!r}")
    cut = entry.get("max_source_tokens")
    if cut is not None and (isinstance(cut, bool) or not isinstance(cut, int) or cut < 1):
        raise ValueError(f"config['tokenizer']['max_source_tokens'] must be a positive "
                         f"integer, got {cut!r}")
    # (a RAN language model continues prompts: their trailing space is text)
    prefix_prompts = config.get("architecture") == "ran" and config.get("token_head") == "lm"
    return Tokenizer(**vocabs, **names, source_eos=source_eos, max_source_tokens=cut,
                     keep_trailing_space=prefix_prompts)
