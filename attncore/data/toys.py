"""Toy sequence tasks over small integer vocabularies: ``copy``, ``reverse``, ``sort``.

A source is a space-separated list of symbols ``"0"`` .. ``str(num_symbols - 1)``, its
length drawn uniformly from ``[min_len, max_len]``; the target is the same list copied,
reversed, or sorted (numerically). They are the quickest checks that an attention model
learns an alignment: copy is the diagonal, reverse the anti-diagonal, sort needs content
based attention.

The three splits hold disjoint source sequences (validation and test are drawn first, the
training set draws again on a collision), as long as the space of sequences is large
enough; a request that cannot be met raises ValueError.
"""
from __future__ import annotations

import numpy as np

from .task import Seq2SeqTask
from .vocab import Vocab

__all__ = ["ToyTask", "TOY_TASKS"]

TOY_TASKS = ("copy", "reverse", "sort")

#: Each kind's random stream, with the seed. The key was len(kind), which "copy" and "sort"
#: share: the two tasks drew the same sources. copy and reverse keep their keys (4, 7), so
#: their data, and results recorded on it, stay as they were; sort now has its own.
_STREAM_OF_KIND = {"copy": 4, "reverse": 7, "sort": 104}


class ToyTask(Seq2SeqTask):
    """``copy`` / ``reverse`` / ``sort`` of random symbol lists.

    Parameters
    ----------
    kind : {"copy", "reverse", "sort"}
    seed : int
    num_symbols : int
        Vocabulary size without specials; symbols are ``"0"`` .. ``str(num_symbols-1)``.
    min_len, max_len : int
        Source length range (inclusive), without ``<eos>``.
    num_train, num_valid, num_test : int

    Attributes
    ----------
    src_vocab, tgt_vocab : Vocab
        The same word-level vocabulary: symbol ``k`` has id ``k + 4``.
    """

    def __init__(self, kind: str = "copy", seed: int = 0, *, num_symbols: int = 10,
                 min_len: int = 2, max_len: int = 10, num_train: int = 10000,
                 num_valid: int = 500, num_test: int = 500):
        super().__init__()
        if kind not in TOY_TASKS:
            raise ValueError(f"kind must be one of {TOY_TASKS}, got {kind!r}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if num_symbols < 2:
            raise ValueError(f"num_symbols must be >= 2, got {num_symbols}")
        self.name = kind
        self.kind = kind
        self.seed = int(seed)
        self.num_symbols = int(num_symbols)
        self.min_len, self.max_len = int(min_len), int(max_len)
        self.sizes = {"train": int(num_train), "valid": int(num_valid), "test": int(num_test)}
        self.src_vocab = self.tgt_vocab = Vocab([str(k) for k in range(num_symbols)], level="word")
        self._sources: dict[str, list[tuple[int, ...]]] | None = None

    def target_of(self, seq) -> list[int]:
        """The target symbol list of a source symbol list."""
        if self.kind == "copy":
            return list(seq)
        if self.kind == "reverse":
            return list(seq)[::-1]
        return sorted(seq)

    def _draw_all(self) -> dict[str, list[tuple[int, ...]]]:
        rng = np.random.default_rng([self.seed, _STREAM_OF_KIND[self.kind]])
        # Sorting only sees the multiset, but disjoint *sources* is what "held out" means for
        # all three tasks, so the same rule is used everywhere.
        seen: set[tuple[int, ...]] = set()
        out = {}
        for split in ("test", "valid", "train"):
            wanted, seqs, attempts = self.sizes[split], [], 0
            while len(seqs) < wanted:
                attempts += 1
                if attempts > 20 * wanted + 1000:
                    raise ValueError(f"cannot draw {wanted} distinct {split} sequences: "
                                     "the space of sequences is too small")
                n = int(rng.integers(self.min_len, self.max_len + 1))
                seq = tuple(int(x) for x in rng.integers(0, self.num_symbols, n))
                if seq in seen:  # held out (or already in this evaluation split): draw again
                    continue
                if split != "train":
                    seen.add(seq)
                seqs.append(seq)
            out[split] = seqs
        return out

    def _make_examples(self, split: str) -> list[tuple[str, str]]:
        if self._sources is None:
            self._sources = self._draw_all()
        return [(" ".join(map(str, s)), " ".join(map(str, self.target_of(s))))
                for s in self._sources[split]]

