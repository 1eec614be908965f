"""Tasks read from your own files: text pairs (sequence to sequence) and labelled texts
(classification), so ``attncore train`` is not limited to the bundled corpora::

    attncore train pairs --arch transformer --out my-model \\
        --task-option train=train.tsv --task-option valid=valid.tsv --task-option level=bpe
    attncore train labelled --arch ran-classifier --out my-classifier \\
        --task-option train=reviews.tsv

Files are UTF-8 text (a byte-order mark and CRLF line ends are fine), one example a line, two
fields separated by one tab:

* ``pairs``: ``source<TAB>target`` (:class:`PairsTask`);
* ``labelled``: ``label<TAB>text`` (:class:`LabelledTask`).

Blank lines are skipped; any other line must be UTF-8 and hold exactly one tab (a text with a
tab in it could not be told from its fields) and two non-empty fields, else a ``ValueError``
names the file and line. Without a ``valid`` file, a ``holdout`` fraction of the distinct
training sources (pairs) or texts (labelled, the same share of each label), drawn with the
task's seed, is the validation split; without a ``test`` file the test split is the
validation split.

Vocabularies are built on the training split only, at ``level``:

* ``"words"`` (default): lower-cased words and single punctuation marks
  (:func:`attncore.data.vocab.tokenize_words`), tokens seen fewer than ``min_freq`` times
  left to ``<unk>``;
* ``"word"``: whitespace-separated tokens as they are; ``"char"``: characters;
* ``"bpe"``: ``vocab_size`` subwords (the ``tokenizers`` package); the vocabulary's normalizer
  (:func:`attncore.data.bpe.text_normalizer`) reads any whitespace run as one space and
  applies ``lowercase``, so the exported model reads what it is given the same way.

Every level reads text in Unicode NFC (:func:`attncore.data.vocab.normalize_text`).

The vocabulary travels with the exported model, which therefore reads raw text the way
training did. Targets are kept as the vocabulary writes them back (``"Amen."`` is ``"amen ."``
at the "words" level, a word it lacks ``<unk>``), so exact match and BLEU compare what a model
can produce. ``shared_vocab=True`` (pairs) builds one vocabulary for both sides, which a
decoder-only ``transformer-lm`` needs.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from .metrics import bleu
from .task import ClassificationTask, Seq2SeqTask
from .vocab import Vocab

__all__ = ["read_tab_file", "PairsTask", "LabelledTask"]

LEVELS = ("words", "word", "char", "bpe")


def read_tab_file(path, argument: str = "file") -> List[Tuple[str, str]]:
    """The ``(first, second)`` fields of each non-blank line of a two-column tab file.

    Lines end at ``\\n`` (a ``\\r`` before it is removed; one inside a line is text, as the
    command line reads input); a byte-order mark opening a line is dropped (files joined with
    ``cat`` carry one per part); fields are stripped of surrounding spaces.

    Raises FileNotFoundError naming ``argument`` for a missing file, ValueError naming the
    file and line for a line that is not UTF-8, has no or several tabs, or an empty field.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a file path, got {type(path).__name__}")
    if not os.path.isfile(path):   # (a directory, a FIFO or /dev/null was "no file" too)
        from pathlib import Path

        from ..io import absent
        raise FileNotFoundError(f"{argument}: " + absent(Path(path), f"no file "
                                                         f"{os.fspath(path)!r}",
                                                         repr(os.fspath(path))))
    where = f"{argument} {os.fspath(path)!r}"
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where} line {number}: not valid UTF-8 ({exc.reason} at byte "
                                 f"{exc.start}); save the file as UTF-8") from None
            line = line[:-1] if line.endswith("\n") else line
            line = line[:-1] if line.endswith("\r") else line
            line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                found = (f"{len(fields) - 1} tabs" if len(fields) != 2 else "an empty field")
                raise ValueError(f"{where} line {number}: expected two non-empty fields "
                                 f"separated by one tab, found {found}")
            rows.append((fields[0].strip(), fields[1].strip()))
    if not rows:
        raise ValueError(f"{where} holds no examples")
    return rows


def _check_options(level, holdout, min_freq, vocab_size, **flags):
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or \
            not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    for name, value in (("min_freq", min_freq), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in flags.items():   # (a command line's "no" was a true string)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false, got {value!r}")


def _splits(seed: int, train, valid, test, holdout: float, read, key, stratum=None) -> dict:
    """{"train", "valid", "test"} example lists: the files given, else a seeded holdout.

    The holdout takes whole groups of examples with the same ``key`` (a source or a document
    text: its duplicates, or other targets of it, in training would make the held-out score a
    training score), ``round(holdout x groups)`` of them in all; with ``stratum`` (a label)
    spread over the strata by largest remainder, leaving each at least one group in training
    (a label held out entirely could not be learnt).
    """
    rows = read(train, "train")
    if valid is None:
        groups: dict = {}
        for row in rows:
            groups.setdefault(key(row), []).append(row)
        keys = list(groups)
        order = np.random.default_rng([seed, 13]).permutation(len(keys))
        strata: dict = {}
        for index in order:
            strata.setdefault(stratum(groups[keys[index]][0]) if stratum else None,
                              []).append(keys[index])
        # round(holdout x groups) in all, shared by largest remainder (a share rounded per label
        # gave small labels none: 20 labels of 9 texts held out 1 text, not 9)
        total = max(1, int(round(holdout * len(keys))))
        quota = {name: holdout * len(members) for name, members in strata.items()}
        take = {name: min(int(quota[name]), len(members) - 1)
                for name, members in strata.items()}
        for name in sorted(strata, key=lambda name: int(quota[name]) - quota[name]):
            if sum(take.values()) >= total:
                break
            if take[name] < len(strata[name]) - 1:
                take[name] += 1
        held = {k for name, members in strata.items() for k in members[:take[name]]}
        if stratum:   # (a label filed only beside another on shared texts has no stratum of
            carriers: dict = {}   # its own: keep one of its texts in training)
            for k in keys:
                for label in {stratum(row) for row in groups[k]}:
                    carriers.setdefault(label, []).append(k)
            for label, texts in carriers.items():
                if all(k in held for k in texts):
                    held.discard(texts[0])
        if not held:
            raise ValueError(f"train: holdout {holdout} of {len(keys)} distinct examples holds "
                             f"none out for validation: give a valid file or a larger holdout")
        valid_rows = [row for row in rows if key(row) in held]
        rows = [row for row in rows if key(row) not in held]
    else:
        valid_rows = read(valid, "valid")
    test_rows = valid_rows if test is None else read(test, "test")
    return {"train": rows, "valid": valid_rows, "test": test_rows}


def _build_vocab(texts: List[str], level: str, min_freq: int, vocab_size: int,
                 lowercase: bool):
    if level == "bpe":
        from .bpe import BPEVocab, text_normalizer
        return BPEVocab.train(texts, vocab_size=vocab_size,
                              normalizer=text_normalizer(lowercase))
    if lowercase and level != "words":    # ("words" lower-cases by itself)
        raise ValueError(f"lowercase applies to the 'words' and 'bpe' levels; level {level!r} "
                         f"reads text as it is")
    # (the level's own tokenize: NFC first, as the exported vocabulary reads served text)
    return Vocab.build(texts, level=level, min_freq=min_freq)


class PairsTask(Seq2SeqTask):
    """Sequence to sequence on ``source<TAB>target`` files (see the module docstring).

    Parameters
    ----------
    seed : int
        Draws the validation holdout when no ``valid`` file is given.
    train, valid, test : path
        Tab-separated files; ``train`` is required.
    level : {"words", "word", "char", "bpe"}
    shared_vocab : bool
        One vocabulary for sources and targets (a decoder-only model needs it).
    holdout : float
        Fraction of the distinct training sources held out (with all their lines) without a
        ``valid`` file.
    min_freq : int
        Word and character levels: tokens seen fewer times become ``<unk>``.
    vocab_size : int
        BPE level: the vocabulary size of each side.
    lowercase : bool
        BPE level: lower-case text (the "words" level always does).
    """

    name = "pairs"

    def __init__(self, seed: int = 0, *, train=None, valid=None, test=None,
                 level: str = "words", shared_vocab: bool = False, holdout: float = 0.05,
                 min_freq: int = 1, vocab_size: int = 8000, lowercase: bool = False):
        super().__init__()
        if train is None:
            raise ValueError("the pairs task needs a training file: --task-option train=FILE "
                             "(lines of source<TAB>target)")
        _check_options(level, holdout, min_freq, vocab_size, shared_vocab=shared_vocab,
                       lowercase=lowercase)
        self.seed, self.level = int(seed), level
        # (held out by source: its duplicates or other targets in training would make the
        # held-out score a training score)
        splits = _splits(self.seed, train, valid, test, holdout, read_tab_file,
                         key=lambda pair: pair[0])
        sources = [s for s, _ in splits["train"]]
        targets = [t for _, t in splits["train"]]
        if shared_vocab:
            self.src_vocab = self.tgt_vocab = _build_vocab(sources + targets, level, min_freq,
                                                           vocab_size, lowercase)
        else:
            self.src_vocab = _build_vocab(sources, level, min_freq, vocab_size, lowercase)
            self.tgt_vocab = _build_vocab(targets, level, min_freq, vocab_size, lowercase)
        # examples hold the targets as the target vocabulary writes them back (lower-cased,
        # spaced, <unk> for what it lacks): what a model can produce. Batches encode the
        # file's text (a written-back "<unk>" would read as three tokens).
        vocab = self.tgt_vocab
        self._file_pairs = splits
        self._split_pairs = {split: [(s, vocab.decode(vocab.encode(t))) for s, t in pairs]
                             for split, pairs in splits.items()}

    def _make_examples(self, split: str) -> list[tuple[str, str]]:
        return list(self._split_pairs[split])

    def _encoded_split(self, split: str):
        if split not in self._encoded:
            pairs = self._file_pairs[split]
            self._encoded[split] = ([self.encode_src(s) for s, _ in pairs],
                                    [self.encode_tgt(t) for _, t in pairs])
        return self._encoded[split]

    @property
    def bleu_tokenize(self) -> str:
        """sacrebleu's tokenizer for this task's texts: "char" at the character level (the
        WMT "13a" read each space-less output as one word: BLEU 0.00 beside 100% exact
        match), "13a" otherwise."""
        return "char" if self.level == "char" else "13a"

    def bleu(self, hyps, split: str = "test") -> float:
        """Corpus BLEU of ``hyps`` (one per example of ``split``, in order)."""
        return bleu(hyps, [t for _, t in self.examples(split)], tokenize=self.bleu_tokenize)


class LabelledTask(ClassificationTask):
    """Document classification on ``label<TAB>text`` files (see the module docstring).

    Parameters are those of :class:`PairsTask` (no ``shared_vocab``), and ``max_len``: cut
    documents to their first ``max_len`` tokens (the exported model cuts what it classifies
    the same way). The labels are the training file's, sorted; a label of the validation or
    test file that training never saw is a ValueError. The holdout takes distinct texts, the
    same share of each label's, and leaves every label at least one text in training.
    """

    name = "labelled"

    def __init__(self, seed: int = 0, *, train=None, valid=None, test=None,
                 level: str = "words", holdout: float = 0.05, min_freq: int = 1,
                 vocab_size: int = 8000, lowercase: bool = False,
                 max_len: Optional[int] = None):
        super().__init__(max_len=max_len)
        if train is None:
            raise ValueError("the labelled task needs a training file: --task-option "
                             "train=FILE (lines of label<TAB>text)")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                    or max_len < 1):
            raise ValueError(f"max_len must be a positive integer or None, got {max_len!r}")
        _check_options(level, holdout, min_freq, vocab_size, lowercase=lowercase)
        self.seed, self.level = int(seed), level

        def documents(path, argument):   # (files hold label<TAB>text; examples are (text, label))
            return [(text, label) for label, text in read_tab_file(path, argument)]

        # (by text: a text filed under two labels stays on one side)
        self._split_docs = _splits(self.seed, train, valid, test, holdout, documents,
                                   key=lambda doc: doc[0], stratum=lambda doc: doc[1])
        self.labels = sorted({label for _, label in self._split_docs["train"]})
        if len(self.labels) < 2:
            raise ValueError(f"train: a classifier needs at least 2 labels, the file has "
                             f"{self.labels}")
        for split in ("valid", "test"):
            unseen = sorted({label for _, label in self._split_docs[split]} - set(self.labels))
            if unseen:
                raise ValueError(f"{split}: labels the training file does not have: "
                                 f"{unseen[:10]}")
        self.vocab = _build_vocab([t for t, _ in self._split_docs["train"]], level, min_freq,
                                  vocab_size, lowercase)

    def _make_examples(self, split: str) -> list[tuple[str, str]]:
        return list(self._split_docs[split])
