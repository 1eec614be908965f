"""Token vocabularies: token <-> id maps with fixed special ids, saved as JSON.

Every vocabulary in attncore reserves the same four ids, so models, batches and the
engine agree on them without looking anything up:

====  =========  ==========================================================
 id   token      meaning
====  =========  ==========================================================
 0    ``<pad>``  padding; also the "no token" id RAN masks with ``id > 0``
 1    ``<bos>``  begin of a target sequence (decoder start token)
 2    ``<eos>``  end of sequence
 3    ``<unk>``  any token not in the vocabulary
====  =========  ==========================================================

Two kinds are provided: :class:`Vocab` (a plain list of tokens; character or
whitespace-word level) and :class:`attncore.data.bpe.BPEVocab` (subwords learnt with the
``tokenizers`` package). Both share the interface used by tasks and the trainer:
``encode``, ``decode``, ``len()``, ``save`` and ``load``. :func:`load_vocab` opens
either from its JSON file. No pickle is used anywhere.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import re
import sys
import unicodedata
from typing import Iterable, Sequence

__all__ = ["PAD", "BOS", "EOS", "UNK", "SPECIAL_TOKENS", "Vocab", "load_vocab", "normalize_text",
           "tokenize_words"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# Format tag written into every saved plain vocabulary, and its version: 2 reads text in NFC
# and keeps combining marks inside "words" words; a version-1 file (saved before) keeps its
# own rules (raw code points; ``\w+|[^\w\s]``), so a model exported then reads text as its
# training did.
_FORMAT = "attncore.vocab"
_VERSION = 2
_VERSIONS = (1, 2)
_LEVELS = ("char", "word", "words")


class Vocab:
    """A list of tokens with ``<pad>=0, <bos>=1, <eos>=2, <unk>=3`` in front.

    Parameters
    ----------
    tokens : iterable of str
        The ordinary tokens, in id order; they get ids 4, 5, ... Special tokens in
        the iterable are ignored (they always keep ids 0..3). Duplicates raise.
    level : {"char", "word", "words"}
        How :meth:`tokenize` splits a string: into characters, on whitespace, or ("words")
        lower-cased into words and single punctuation marks (:func:`tokenize_words`).
        :meth:`decode` joins with ``""`` or ``" "`` accordingly.

    Examples
    --------
    >>> v = Vocab("0123456789-", level="char")
    >>> v.encode("2019-03-07")
    [6, 4, 5, 13, 14, 4, 7, 14, 4, 11]
    >>> v.decode([1, 6, 4, 2, 0])
    '20'
    """

    pad = 0
    bos = 1
    eos = 2
    unk = 3

    def __init__(self, tokens: Iterable[str], *, level: str = "char", version: int = _VERSION):
        if level not in _LEVELS:
            raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
        if version not in _VERSIONS:
            raise ValueError(f"unsupported vocabulary version {version!r}")
        self.level = level
        self.version = version
        itos = list(SPECIAL_TOKENS)
        for tok in tokens:
            if tok in SPECIAL_TOKENS:
                continue
            if not isinstance(tok, str) or tok == "":
                raise ValueError(f"tokens must be non-empty strings, got {tok!r}")
            if level != "char" and any(c.isspace() for c in tok):
                raise ValueError(f"word-level tokens cannot contain spaces, got {tok!r}")
            itos.append(tok)
        stoi = {tok: i for i, tok in enumerate(itos)}
        if len(stoi) != len(itos):
            dup = [t for t, n in collections.Counter(itos).items() if n > 1]
            raise ValueError(f"duplicate tokens in vocabulary: {dup[:10]}")
        self._itos = itos
        self._stoi = stoi

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, texts: Iterable[str | Sequence[str]], *, level: str = "char",
              min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        """Count tokens over ``texts`` and keep the frequent ones.

        Tokens are ordered by decreasing count, ties broken by the token string, so
        the result does not depend on the order of ``texts``.

        Parameters
        ----------
        texts : iterable of str or of token lists
        level : {"char", "word"}
        min_freq : int
            Tokens seen fewer times are left out (they will encode as ``<unk>``).
        max_size : int, optional
            Largest number of ordinary tokens kept (specials not counted).
        """
        if level not in _LEVELS:
            raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(_split(text, level) if isinstance(text, str) else text)
        for tok in SPECIAL_TOKENS:
            counts.pop(tok, None)
        kept = sorted((t for t, n in counts.items() if n >= min_freq),
                      key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max_size]
        return cls(kept, level=level)

    # ------------------------------------------------------------------ mapping
    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: str) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Vocab) and type(other) is type(self)
                and self.level == other.level and self.version == other.version
                and self._itos == other._itos)

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, level={self.level!r})"

    @property
    def tokens(self) -> list[str]:
        """All tokens in id order, specials included (a copy)."""
        return list(self._itos)

    def token_to_id(self, token: str) -> int:
        """Id of ``token``, or ``unk`` (3) when it is not in the vocabulary."""
        return self._stoi.get(token, self.unk)

    def id_to_token(self, index: int) -> str:
        """Token string of ``index``; raises IndexError outside ``[0, len)``."""
        if not 0 <= int(index) < len(self._itos):
            raise IndexError(f"token id {index} outside [0, {len(self._itos)})")
        return self._itos[int(index)]

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into tokens: characters, or whitespace-separated words."""
        return _split(text, self.level, self.version)

    def encode(self, text: str | Sequence[str], *, add_bos: bool = False,
               add_eos: bool = False) -> list[int]:
        """Map a string (tokenized first) or a token list to ids.

        Text is text: a ``"<eos>"`` (or another special token's spelling) inside a string is
        an unknown word (``unk``), never the control id, so user input cannot end or pad a
        sequence. A token *list* is looked up as given (specials included).

        Parameters
        ----------
        text : str or sequence of str
        add_bos, add_eos : bool
            Put ``bos`` (1) in front / ``eos`` (2) at the end.

        Returns
        -------
        list of int
        """
        stoi, unk = self._stoi, self.unk
        if isinstance(text, str):
            # (the special ids are the four lowest)
            ids = [i if i >= len(SPECIAL_TOKENS) else unk
                   for i in (stoi.get(t, unk) for t in self.tokenize(text))]
        else:
            ids = [stoi.get(t, unk) for t in text]
        if add_bos:
            ids.insert(0, self.bos)
        if add_eos:
            ids.append(self.eos)
        return ids

    def decode(self, ids: Iterable[int], *, strip_special: bool = True) -> str:
        """Map ids back to a string.

        With ``strip_special`` (the default) decoding stops at the first ``eos`` and
        ``pad``/``bos`` are dropped, so a padded or generated row decodes to its text;
        ``unk`` is kept as ``<unk>``. Without it every token is written out.
        """
        itos, size = self._itos, len(self._itos)   # (locals: a batch job decodes every line)
        eos, dropped = self.eos, (self.pad, self.bos)
        out = []
        for i in ids:
            i = int(i)
            if strip_special:
                if i == eos:
                    break
                if i in dropped:
                    continue
            if not 0 <= i < size:
                raise IndexError(f"token id {i} outside [0, {size})")
            out.append(itos[i])
        return ("" if self.level == "char" else " ").join(out)

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        """JSON-ready description (format tag, version, level, all tokens)."""
        return {"format": _FORMAT, "version": self.version, "level": self.level,
                "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocab":
        if not isinstance(data, dict):
            raise ValueError(f"a vocabulary is a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise ValueError(f"not an attncore vocabulary (format={data.get('format')!r})")
        version = data.get("version")
        if isinstance(version, bool) or version not in _VERSIONS:
            raise ValueError(f"unsupported vocabulary version {version!r}")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("a vocabulary's 'tokens' must be a list of strings")
        # (its start is not echoed: a message can travel further than the file)
        if list(tokens[:4]) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        repeated = sorted(set(SPECIAL_TOKENS) & set(tokens[4:]))
        if repeated:   # (the constructor skips them: every later token's id moved down one)
            raise ValueError(f"vocabulary repeats the special tokens {repeated} after its start")
        return cls(tokens[4:], level=data.get("level"), version=version)

    def to_json(self) -> str:
        """The JSON text :meth:`save` writes."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=0)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as UTF-8 JSON to ``path`` (whole or not at all: an existing
        file is replaced only once the new one is written)."""
        from attncore.io import replaced_whole
        with replaced_whole(path) as temporary:
            temporary.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


@functools.lru_cache(maxsize=None)
def _word_or_mark() -> "re.Pattern":
    """The "words" level's tokens: runs of word characters, and single punctuation marks.

    A word character is ``\\w``, a combining mark (Unicode category M) or a zero-width
    (non-)joiner: ``\\w`` alone reads the vowel signs and viramas of Indic scripts (and
    Arabic or Hebrew points) as punctuation, so "नमस्ते" came out as six tokens and decoded
    as "नमस ् त े". Built on first use (a 0.1 s scan of the code points)."""
    marks, start, previous = [], None, None
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code))[0] == "M":
            if start is None or code != previous + 1:
                if start is not None:
                    marks.append((start, previous))
                start = code
            previous = code
    marks.append((start, previous))
    ranges = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in marks)
    return re.compile(rf"[\w{ranges}\u200c\u200d]+|[^\w\s]")


def normalize_text(text: str) -> str:
    """Unicode NFC of ``text``, applied to every text a vocabulary reads (in training and in
    serving): "é" typed as "e" and a combining accent (macOS file names, some PDFs) is the
    same token as the one code point "é", instead of ``<unk>``. ValueError for a lone
    surrogate (a str that is not Unicode text, such as JSON's ``"\\ud800"``: a BPE
    vocabulary's ``tokenizers`` raised a bare TypeError on it)."""
    _check_unicode(text)
    if unicodedata.is_normalized("NFC", text):
        return text
    return unicodedata.normalize("NFC", text)


def _check_unicode(text: str) -> None:
    """ValueError naming a lone surrogate of ``text`` (its index in ``text``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text holds a lone surrogate {text[exc.start]!r} at index "
                         f"{exc.start}: not valid Unicode text") from None


def tokenize_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks of NFC ``text``: ``"Amen."`` ->
    ``["amen", "."]`` (the "words" level; the KJV task's tokenization)."""
    return _split(text, "words")


#: version 1's "words" tokens (a combining mark was punctuation of its own)
_WORD_OR_MARK_V1 = re.compile(r"\w+|[^\w\s]")


def _split(text: str, level: str, version: int = _VERSION) -> list[str]:
    if version == 1:   # (a file saved before version 2: its own rules; no surrogate is text)
        _check_unicode(text)
    else:
        text = normalize_text(text)
    if level == "words":
        words = _WORD_OR_MARK_V1 if version == 1 else _word_or_mark()
        return words.findall(text.lower())
    return list(text) if level == "char" else text.split()


def load_vocab(path: str | os.PathLike):
    """Open a saved vocabulary of either kind.

    A file written by :meth:`Vocab.save` gives a :class:`Vocab`; a ``tokenizers``
    JSON file (written by :meth:`attncore.data.bpe.BPEVocab.save`) gives a
    :class:`~attncore.data.bpe.BPEVocab`.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)!r} holds a JSON {type(data).__name__}, not a "
                         f"vocabulary object")
    if data.get("format") == _FORMAT:
        return Vocab.from_dict(data)
    if "model" in data and "added_tokens" in data:
        from .bpe import BPEVocab  # needs the optional ``tokenizers`` package
        return BPEVocab.load(path)
    raise ValueError(f"{os.fspath(path)!r} is neither an attncore vocabulary nor a tokenizer JSON")
