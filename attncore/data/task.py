"""Task base classes: examples per split, encoding, and padded int64 batches.

A *task* owns its vocabularies and three splits (``"train"``, ``"valid"``, ``"test"``),
each built lazily on first use and cached. Subclasses only implement
``_make_examples(split)``; batching is shared.

Batch layout of a :class:`Seq2SeqTask` (all arrays int64, padded with ``pad = 0``)::

    src_ids      (batch, max_src_len)  source tokens followed by <eos> (no <bos>)
    src_lengths  (batch,)              number of real source ids, the <eos> included
    tgt_ids      (batch, max_tgt_len)  <bos> target tokens <eos>
    tgt_lengths  (batch,)              number of real target ids, <bos> and <eos> included

Teacher forcing uses ``tgt_ids[:, :-1]`` as the decoder input and ``tgt_ids[:, 1:]`` as
the labels; label position ``t`` is real when ``t < tgt_lengths - 1``. Every row holds
at least ``<bos> <eos>``, so ``tgt_lengths >= 2``.

Batch layout of a :class:`ClassificationTask`::

    ids      (batch, max_len)  document tokens, no special tokens (RAN adds none, see RAN.md §2.1)
    lengths  (batch,)          number of real tokens
    labels   (batch,)          class index into ``task.labels``
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np

__all__ = ["SPLITS", "Seq2SeqBatch", "ClassificationBatch", "pad_sequences", "is_classification",
           "Seq2SeqTask", "ClassificationTask"]

SPLITS = ("train", "valid", "test")


class Seq2SeqBatch(NamedTuple):
    """One padded sequence-to-sequence batch (unpacks as a 4-tuple)."""
    src_ids: np.ndarray      # (batch, max_src_len) int64
    src_lengths: np.ndarray  # (batch,) int64
    tgt_ids: np.ndarray      # (batch, max_tgt_len) int64
    tgt_lengths: np.ndarray  # (batch,) int64


class ClassificationBatch(NamedTuple):
    """One padded classification batch (unpacks as a 3-tuple)."""
    ids: np.ndarray      # (batch, max_len) int64
    lengths: np.ndarray  # (batch,) int64
    labels: np.ndarray   # (batch,) int64


def is_classification(task) -> bool:
    """Whether ``task`` yields ``(ids, lengths, labels)`` batches (it has ``labels`` and no
    ``tgt_vocab``), the test the trainer and the evaluation use for any task object."""
    return hasattr(task, "labels") and not hasattr(task, "tgt_vocab")


def pad_sequences(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into one array.

    Parameters
    ----------
    seqs : sequence of int sequences, length ``batch``
    pad : int
        Fill value.

    Returns
    -------
    ids : (batch, max_len) int64
    lengths : (batch,) int64
    """
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    ids = np.full((len(seqs), int(lengths.max(initial=0))), pad, dtype=np.int64)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = s
    return ids, lengths


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _batch_order(n: int, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool) -> Iterator[np.ndarray]:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


class _SplitCache:
    """Lazily built, cached per-split data shared by the task classes."""

    def __init__(self):
        self._examples: dict[str, list] = {}
        self._encoded: dict[str, tuple] = {}

    def _make_examples(self, split: str) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def examples(self, split: str) -> list:
        """The split's examples as text pairs; see the subclass for their meaning."""
        _check_split(split)
        if split not in self._examples:
            self._examples[split] = self._make_examples(split)
        return self._examples[split]

    def num_examples(self, split: str) -> int:
        return len(self.examples(split))


class Seq2SeqTask(_SplitCache):
    """Base class of text-to-text tasks (dates, toys, translation).

    Subclasses set ``name``, ``src_vocab`` and ``tgt_vocab`` and implement
    ``_make_examples(split) -> list[(src_text, tgt_text)]``.

    Attributes
    ----------
    src_vocab, tgt_vocab : Vocab or BPEVocab
    """

    name = "seq2seq"

    def __init__(self):
        super().__init__()
        self.src_vocab = None
        self.tgt_vocab = None

    def examples(self, split: str) -> list[tuple[str, str]]:
        """``[(source text, target text), ...]`` of ``split``, for evaluation."""
        return super().examples(split)

    def encode_src(self, text: str) -> list[int]:
        """Source ids as they appear in batches: tokens then ``<eos>``."""
        return self.src_vocab.encode(text, add_eos=True)

    def encode_tgt(self, text: str) -> list[int]:
        """Target ids as they appear in batches: ``<bos>``, tokens, ``<eos>``."""
        return self.tgt_vocab.encode(text, add_bos=True, add_eos=True)

    def decode_tgt(self, ids) -> str:
        """Text of a target or generated id row (stops at ``<eos>``)."""
        return self.tgt_vocab.decode(ids)

    def _encoded_split(self, split: str):
        if split not in self._encoded:
            pairs = self.examples(split)
            self._encoded[split] = ([self.encode_src(s) for s, _ in pairs],
                                    [self.encode_tgt(t) for _, t in pairs])
        return self._encoded[split]

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Seq2SeqBatch]:
        """Yield padded batches of ``split``.

        Parameters
        ----------
        split : {"train", "valid", "test"}
        batch_size : int
        shuffle : bool
            Visit the examples in a random order drawn from ``seed`` (same seed, same
            order); otherwise in split order.
        seed : int
        drop_last : bool
            Leave out a last batch smaller than ``batch_size``.

        Yields
        ------
        Seq2SeqBatch
            ``(src_ids, src_lengths, tgt_ids, tgt_lengths)``; layout in the module docstring.
        """
        _check_split(split)
        src, tgt = self._encoded_split(split)
        for idx in _batch_order(len(src), batch_size, shuffle, seed, drop_last):
            src_ids, src_len = pad_sequences([src[i] for i in idx])
            tgt_ids, tgt_len = pad_sequences([tgt[i] for i in idx])
            yield Seq2SeqBatch(src_ids, src_len, tgt_ids, tgt_len)


class ClassificationTask(_SplitCache):
    """Base class of document classification tasks (kjv).

    Subclasses set ``name``, ``vocab`` and ``labels`` and implement
    ``_make_examples(split) -> list[(text, label_name)]``.

    Attributes
    ----------
    vocab : Vocab or BPEVocab
        Also reachable as ``src_vocab`` so code written for seq2seq tasks finds it.
    labels : list of str
        Class names; a batch's ``labels`` array indexes into it.
    max_len : int or None
        Documents longer than this are cut to their first ``max_len`` tokens.
    """

    name = "classification"

    def __init__(self, max_len: int | None = None):
        super().__init__()
        self.vocab = None
        self.labels: list[str] = []
        self.max_len = max_len

    @property
    def src_vocab(self):
        return self.vocab

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def examples(self, split: str) -> list[tuple[str, str]]:
        """``[(document text, label name), ...]`` of ``split``."""
        return super().examples(split)

    def encode(self, text: str) -> list[int]:
        """Document ids as in batches: tokens only, cut to ``max_len``."""
        ids = self.vocab.encode(text)
        return ids[:self.max_len] if self.max_len else ids

    def _encoded_split(self, split: str):
        if split not in self._encoded:
            index = {name: i for i, name in enumerate(self.labels)}
            pairs = self.examples(split)
            self._encoded[split] = ([self.encode(t) for t, _ in pairs],
                                    np.array([index[y] for _, y in pairs], dtype=np.int64))
        return self._encoded[split]

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[ClassificationBatch]:
        """Yield padded ``(ids, lengths, labels)`` batches of ``split``.

        Parameters are those of :meth:`Seq2SeqTask.batches`.
        """
        _check_split(split)
        docs, labels = self._encoded_split(split)
        for idx in _batch_order(len(docs), batch_size, shuffle, seed, drop_last):
            ids, lengths = pad_sequences([docs[i] for i in idx])
            yield ClassificationBatch(ids, lengths, labels[idx])

    def class_counts(self, split: str) -> dict[str, int]:
        """Number of documents per label in ``split``."""
        counts = dict.fromkeys(self.labels, 0)
        for _, y in self.examples(split):
            counts[y] += 1
        return counts
