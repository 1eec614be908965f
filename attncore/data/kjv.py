"""The ``kjv`` task: long-document classification of King James Bible chapters.

Data: Debian ``sword-text-kjv`` (public domain; ``apt-get install -y sword-text-kjv``),
read with :mod:`attncore.data.sword`: 1,189 chapters (929 Old / 260 New Testament),
median 630 words, longest 2,424 words. Without the package :class:`KJVTask` raises
FileNotFoundError (tests skip).

Labels (``label=``):

* ``"testament"``: ``OT`` / ``NT`` (the default);
* ``"genre"``: Law, History, Wisdom, Prophets, Gospels, Epistles, Apocalyptic (a
  conventional grouping, written out in :data:`GENRE_OF_BOOK`; Acts counts as History);
* ``"book"``: the 66 OSIS book ids.

Tokens are lower-cased words and punctuation marks (``level="word"``: a vocabulary of the
"words" level, which tokenizes raw text the same way, learnt on the training split) or BPE
subwords (``level="bpe"``). Chapters are split at random, or whole
books are held out (``split_by="book"``), which avoids near-duplicate leakage between, e.g.,
Kings and Chronicles.
"""
from __future__ import annotations

import os

import numpy as np

from .sword import KJV_MODULE_DIR, read_chapters
from .task import ClassificationTask
from .vocab import Vocab, tokenize_words

__all__ = ["GENRE_OF_BOOK", "KJVTask", "tokenize_words"]

_GENRES = {
    "Law": "Gen Exod Lev Num Deut",
    "History": "Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Acts",
    "Wisdom": "Job Ps Prov Eccl Song",
    "Prophets": "Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal",
    "Gospels": "Matt Mark Luke John",
    "Epistles": ("Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas "
                 "1Pet 2Pet 1John 2John 3John Jude"),
    "Apocalyptic": "Rev",
}
GENRE_OF_BOOK = {book: genre for genre, books in _GENRES.items() for book in books.split()}


class KJVTask(ClassificationTask):
    """Classify KJV chapters by testament, genre or book.

    Parameters
    ----------
    seed : int
        Fixes the split.
    label : {"testament", "genre", "book"}
    level : {"word", "bpe"}
    split_by : {"chapter", "book"}
        Hold out random chapters, or random whole books.
    valid_fraction, test_fraction : float
        Share of chapters (or books) held out.
    min_freq : int
        Word level: words rarer than this in training become ``<unk>``.
    vocab_size : int
        BPE level: vocabulary size.
    max_len : int or None
        Cut documents to their first ``max_len`` tokens.
    module_dir : str
        SWORD module directory.

    Attributes
    ----------
    vocab : Vocab or BPEVocab
    labels : list of str
        Sorted class names.
    chapters : list of attncore.data.sword.Chapter
        All chapters in canonical order.
    split_of_chapter : dict
        Split name of each chapter, by OSIS id (``"Gen.1"``).
    """

    name = "kjv"

    def __init__(self, seed: int = 0, *, label: str = "testament", level: str = "word",
                 split_by: str = "chapter", valid_fraction: float = 0.1,
                 test_fraction: float = 0.1, min_freq: int = 2, vocab_size: int = 8000,
                 max_len: int | None = None, module_dir: str | os.PathLike = KJV_MODULE_DIR):
        super().__init__(max_len=max_len)
        if label not in ("testament", "genre", "book"):
            raise ValueError(f"label must be 'testament', 'genre' or 'book', got {label!r}")
        if level not in ("word", "bpe"):
            raise ValueError(f"level must be 'word' or 'bpe', got {level!r}")
        if split_by not in ("chapter", "book"):
            raise ValueError(f"split_by must be 'chapter' or 'book', got {split_by!r}")
        self.seed, self.label, self.level = int(seed), label, level
        chapters = read_chapters(module_dir)
        self.chapters = chapters
        docs = [(c.text, self._label_of(c)) for c in chapters]
        self.labels = sorted({y for _, y in docs})

        units = [c.book for c in chapters] if split_by == "book" else list(range(len(chapters)))
        unique_units = list(dict.fromkeys(units))
        u = np.random.default_rng([self.seed, 11]).random(len(unique_units))
        split_of_unit = {unit: ("test" if x < test_fraction else
                                "valid" if x < test_fraction + valid_fraction else "train")
                         for unit, x in zip(unique_units, u)}
        self._split_docs = {"train": [], "valid": [], "test": []}
        self.split_of_chapter: dict[str, str] = {}  # osis id -> split
        for unit, doc, chapter in zip(units, docs, chapters):
            self._split_docs[split_of_unit[unit]].append(doc)
            self.split_of_chapter[chapter.osis_id] = split_of_unit[unit]

        train_texts = [t for t, _ in self._split_docs["train"]]
        if level == "word":
            # (level "words": the saved vocabulary tokenizes raw text as the task does; a
            # "word" vocabulary split on whitespace only, and a served model read "God" and
            # "earth." as unknown)
            self.vocab = Vocab.build((tokenize_words(t) for t in train_texts), level="words",
                                     min_freq=min_freq)
        else:
            from .bpe import BPEVocab, text_normalizer
            self.vocab = BPEVocab.train(train_texts, vocab_size=vocab_size,
                                        normalizer=text_normalizer())

    def _label_of(self, chapter) -> str:
        if self.label == "testament":
            return chapter.testament.upper()
        if self.label == "genre":
            return GENRE_OF_BOOK[chapter.book]
        return chapter.book

    def encode(self, text: str) -> list[int]:
        """Token ids of a chapter's text (cut to ``max_len``)."""
        ids = self.vocab.encode(text)
        return ids[:self.max_len] if self.max_len else ids

    def _make_examples(self, split: str) -> list[tuple[str, str]]:
        return list(self._split_docs[split])
