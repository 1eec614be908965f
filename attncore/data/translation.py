"""The ``translation`` task: German -> English sentences from the Ding dictionary, BPE subwords.

Data: Debian package ``trans-de-en`` (TU Chemnitz Ding dictionary, GPL-2+), file
``/usr/share/trans/de-en``. It is read in place at run time and must never be copied into
the repository. Install it with ``apt-get install -y trans-de-en``; without it
:class:`TranslationTask` raises FileNotFoundError (tests skip).

Sentence pairs are extracted exactly as DATA.md §A1.1 describes (18,252 pairs from
version 1.9-6), see :func:`read_ding_pairs`. The task then normalises them lightly
(unicode spaces, typographic apostrophes, optional lower-casing), drops exact duplicates and
pairs longer than ``max_words``, and splits them so that an English sentence never appears
in two splits (the dictionary repeats some under several German entries). One BPE
vocabulary per language is learnt on the training split only.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import warnings

import numpy as np

from .metrics import bleu
from .task import Seq2SeqTask
from .vocab import normalize_text

__all__ = ["DING_PATH", "read_ding_pairs", "TranslationTask", "bleu"]

DING_PATH = "/usr/share/trans/de-en"

_TAGS = re.compile(r"\s*[\{\[][^\}\]]*[\}\]]")


def read_ding_pairs(path: str | os.PathLike = DING_PATH) -> list[tuple[str, str]]:
    """Sentence pairs ``(german, english)`` of a Ding dictionary file, in file order.

    Extraction (DATA.md §A1.1):

    1. split each non-comment line on ``' :: '``, each side on ``' | '``, and keep the line
       only if both sides have the same number of parts;
    2. remove ``{...}`` and ``[...]`` tags;
    3. drop parts containing ``;`` (synonym lists cannot be aligned);
    4. keep a pair when both sides end in ``.``, ``!`` or ``?`` and have at least 3 words.

    Raises
    ------
    FileNotFoundError
        When the file is missing, with the apt command that installs it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: install the Ding dictionary with "
                                "'apt-get install -y trans-de-en'")
    stat = os.stat(path)
    return list(_read_ding_cached(path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=2)
def _read_ding_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    # Reading the 25 MB file takes ~1.5 s; tests and tasks in one process share one read.
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                continue
            sides = line.rstrip("\n").split(" :: ")
            if len(sides) != 2:
                continue
            de_parts, en_parts = sides[0].split(" | "), sides[1].split(" | ")
            if len(de_parts) != len(en_parts):
                continue
            for de, en in zip(de_parts, en_parts):
                de, en = _TAGS.sub("", de).strip(), _TAGS.sub("", en).strip()
                if ";" in de or ";" in en:
                    continue
                if (de and en and de[-1] in ".!?" and en[-1] in ".!?"
                        and len(de.split()) >= 3 and len(en.split()) >= 3):
                    pairs.append((de, en))
    return tuple(pairs)


#: what the cleaning replaces before whitespace runs become one space
_REPLACEMENTS = (("\u202f", " "), ("\xa0", " "), ("\u2019", "'"))


def _normalize(text: str, lowercase: bool) -> str:
    text = normalize_text(text)
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def tokenizer_normalizer(lowercase: bool):
    """:func:`_normalize` as a ``tokenizers`` normalizer, saved in the BPE vocabularies: a model
    trained on the cleaned corpus then reads raw text ("Ich habe Hunger.") as it read the
    training data (lower-cased...). The same strings on every Ding sentence (a test)."""
    from .bpe import text_normalizer

    return text_normalizer(lowercase, _REPLACEMENTS)


_VOCABULARY_FILES = ("src_tokenizer.json", "tgt_tokenizer.json")
_VOCABULARY_SOURCE = "vocabulary_source.json"


def _vocabulary_source(train, vocab_size, min_frequency, lowercase) -> dict:
    """What a task's BPE vocabularies are learnt from: its options and a digest of its
    training pairs (another direction, seed, split or data file gives other pairs)."""
    digest = hashlib.sha256()
    for src, tgt in train:
        digest.update(json.dumps([src, tgt]).encode())
    return {"vocab_size": int(vocab_size), "min_frequency": int(min_frequency),
            "lowercase": bool(lowercase), "train_sha256": digest.hexdigest()}


def _cached_vocabularies(directory, source: dict):
    """The (source, target) vocabularies a tokenizer cache holds if its
    ``vocabulary_source.json`` is ``source`` and names these very files (their digests), else
    None. A cache written before that file existed, one unreadable in part, or one another
    task rewrote meanwhile, is learnt again."""
    from .bpe import BPEVocab
    try:
        with open(os.path.join(directory, _VOCABULARY_SOURCE), encoding="utf-8") as f:
            record = json.load(f)
        if not isinstance(record, dict) or record.get("learnt_from") != source:
            return None
        vocabularies = []
        for name in _VOCABULARY_FILES:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                text = f.read()
            if record.get("files", {}).get(name) != _digest(text):
                return None
            vocabularies.append(BPEVocab.from_json(text))
        return tuple(vocabularies)
    except (OSError, ValueError):
        return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_vocabularies(directory, vocabularies, source: dict) -> None:
    """Write the vocabularies and, last, their ``vocabulary_source.json`` (what they were
    learnt from, and each file's digest), each file whole (a temporary name, then a rename),
    the old record removed first: a write cut short leaves no record vouching for replaced
    files, and of two tasks writing at once, a record names the files it was written with
    (checked on reading)."""
    source_path = os.path.join(directory, _VOCABULARY_SOURCE)
    if any(os.path.exists(os.path.join(directory, name)) for name in _VOCABULARY_FILES):
        # (a fixed cache directory reused with direction=en-de trained English sources on the
        # German vocabulary, silently: the sizes still matched)
        warnings.warn(f"tokenizer_dir {os.fspath(directory)!r} held vocabularies learnt from "
                      f"other training pairs or options, or unreadable ones: they are learnt "
                      f"again and replaced", stacklevel=4)
    os.makedirs(directory, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(source_path)
    texts = [(name, vocabulary.to_json()) for vocabulary, name in zip(vocabularies,
                                                                      _VOCABULARY_FILES)]
    record = {"learnt_from": source, "files": {name: _digest(text) for name, text in texts}}
    texts.append((_VOCABULARY_SOURCE, json.dumps(record, indent=1, sort_keys=True)))
    from attncore.io import replaced_whole
    for name, text in texts:
        with replaced_whole(os.path.join(directory, name)) as temporary:
            temporary.write_text(text, encoding="utf-8")


class TranslationTask(Seq2SeqTask):
    """German -> English (or English -> German) sentence translation with BPE subwords.

    Parameters
    ----------
    seed : int
        Fixes the split.
    path : str, optional
        Ding file; default :data:`DING_PATH`.
    direction : {"de-en", "en-de"}
    lowercase : bool
        Lower-case both sides (the small corpus gains more from this than it loses).
    max_words : int or None
        Keep pairs whose sides both have at most this many words.
    num_valid, num_test : int
        Pairs held out (approximately: whole English-sentence groups are assigned).
    num_train : int or None
        Cap on training pairs (None: all that remain).
    vocab_size : int
        BPE vocabulary size per language.
    tokenizer_dir : str, optional
        A cache of the learnt vocabularies: ``src_tokenizer.json`` and
        ``tgt_tokenizer.json`` are loaded from it when its ``vocabulary_source.json`` says
        they were learnt from this task's training pairs (direction, split and cleaning
        included) with these BPE options; otherwise they are learnt and written there (with
        a warning where they replace others).

    Attributes
    ----------
    src_vocab, tgt_vocab : BPEVocab
    """

    name = "translation"

    def __init__(self, seed: int = 0, *, path: str | os.PathLike = DING_PATH,
                 direction: str = "de-en", lowercase: bool = True, max_words: int | None = 15,
                 num_valid: int = 500, num_test: int = 1000, num_train: int | None = None,
                 vocab_size: int = 4000, min_frequency: int = 2,
                 tokenizer_dir: str | os.PathLike | None = None):
        super().__init__()
        if direction not in ("de-en", "en-de"):
            raise ValueError(f"direction must be 'de-en' or 'en-de', got {direction!r}")
        from .bpe import BPEVocab

        self.seed = int(seed)
        self.direction = direction
        self.tokenizer_dir = tokenizer_dir
        pairs = self._clean_pairs(read_ding_pairs(path), lowercase, max_words)
        self._split_pairs = self._split(pairs, num_valid, num_test, num_train)
        if direction == "en-de":
            self._split_pairs = {k: [(e, d) for d, e in v] for k, v in self._split_pairs.items()}

        train = self._split_pairs["train"]
        bpe = dict(vocab_size=vocab_size, min_frequency=min_frequency,
                   normalizer=tokenizer_normalizer(lowercase))
        learnt_from = _vocabulary_source(train, vocab_size, min_frequency, lowercase)
        cached = None if tokenizer_dir is None else _cached_vocabularies(tokenizer_dir,
                                                                          learnt_from)
        if cached is not None:
            self.src_vocab, self.tgt_vocab = cached
        else:
            self.src_vocab = BPEVocab.train((s for s, _ in train), **bpe)
            self.tgt_vocab = BPEVocab.train((t for _, t in train), **bpe)
            if tokenizer_dir is not None:
                _cache_vocabularies(tokenizer_dir, (self.src_vocab, self.tgt_vocab), learnt_from)

    @staticmethod
    def _clean_pairs(pairs, lowercase, max_words):
        seen, out = set(), []
        for de, en in pairs:
            de, en = _normalize(de, lowercase), _normalize(en, lowercase)
            if max_words is not None and (len(de.split()) > max_words or len(en.split()) > max_words):
                continue
            if (de, en) not in seen:
                seen.add((de, en))
                out.append((de, en))
        return out

    def _split(self, pairs, num_valid, num_test, num_train):
        # Group by the English side so one English sentence never lands in two splits.
        groups: dict[str, list[tuple[str, str]]] = {}
        for de, en in pairs:
            groups.setdefault(en, []).append((de, en))
        keys = list(groups)
        order = np.random.default_rng([self.seed, 7]).permutation(len(keys))
        out = {"test": [], "valid": [], "train": []}
        for i in order:
            group = groups[keys[i]]
            if len(out["test"]) < num_test:
                out["test"] += group
            elif len(out["valid"]) < num_valid:
                out["valid"] += group
            else:
                out["train"] += group
        if num_train is not None:
            out["train"] = out["train"][:num_train]
        return out

    def _make_examples(self, split: str) -> list[tuple[str, str]]:
        return list(self._split_pairs[split])

    def bleu(self, hyps, split: str = "test") -> float:
        """Corpus BLEU of ``hyps`` (one per example of ``split``, in order)."""
        return bleu(hyps, [t for _, t in self.examples(split)])
