"""Tasks and corpus readers for training and evaluating attncore models.

``get_task(name, seed=0, **opts)`` builds a task:

=============  =====================================================  ==========================
name           what                                                   needs
=============  =====================================================  ==========================
``dates``      human-readable date -> ``YYYY-MM-DD`` (characters)     ``babel==2.18.0``
``copy``       copy a list of symbols                                 --
``reverse``    reverse it                                             --
``sort``       sort it                                                --
``translation``  German -> English sentences, BPE subwords            ``apt trans-de-en``, ``tokenizers``
``kjv``        KJV chapter -> testament / genre / book                ``apt sword-text-kjv``
``pairs``      your ``source<TAB>target`` files                       (``tokenizers`` for BPE)
``labelled``   your ``label<TAB>text`` files (classification)         (``tokenizers`` for BPE)
=============  =====================================================  ==========================

``pairs`` and ``labelled`` read files named by options (``train``, ``valid``, ``test``; see
:mod:`attncore.data.files`).

Sequence-to-sequence tasks (:class:`~attncore.data.task.Seq2SeqTask`) expose ``src_vocab``,
``tgt_vocab``, ``examples(split)`` (text pairs) and ``batches(split, batch_size, *, shuffle,
seed)`` yielding ``(src_ids, src_lengths, tgt_ids, tgt_lengths)`` int64 arrays: sources end
in ``<eos>``, targets are ``<bos> ... <eos>``, padding is 0 (see :mod:`attncore.data.task`).
The classification tasks (``kjv``, ``labelled``) yield ``(ids, lengths, labels)`` instead.

Vocabularies share the special ids ``pad=0, bos=1, eos=2, unk=3`` and are saved as JSON
(:class:`~attncore.data.vocab.Vocab`, :class:`~attncore.data.bpe.BPEVocab`,
:func:`~attncore.data.vocab.load_vocab`). Nothing here depends on the compiled kernels.
"""
from __future__ import annotations

import re
from typing import Callable

from .metrics import bleu, exact_match
from .task import (SPLITS, ClassificationBatch, ClassificationTask, Seq2SeqBatch,
                   Seq2SeqTask, pad_sequences)
from .vocab import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, Vocab, load_vocab

__all__ = ["get_task", "register_task", "list_tasks", "Vocab", "load_vocab", "Seq2SeqTask",
           "ClassificationTask", "Seq2SeqBatch", "ClassificationBatch", "pad_sequences",
           "SPLITS", "PAD", "BOS", "EOS", "UNK", "SPECIAL_TOKENS", "bleu", "exact_match"]


def _dates(seed=0, **opts):
    from .dates import DatesTask
    return DatesTask(seed, **opts)


def _toy(kind):
    def make(seed=0, **opts):
        from .toys import ToyTask
        return ToyTask(kind, seed, **opts)
    return make


def _translation(seed=0, **opts):
    from .translation import TranslationTask
    return TranslationTask(seed, **opts)


def _kjv(seed=0, **opts):
    from .kjv import KJVTask
    return KJVTask(seed, **opts)


def _pairs(seed=0, **opts):
    from .files import PairsTask
    return PairsTask(seed, **opts)


def _labelled(seed=0, **opts):
    from .files import LabelledTask
    return LabelledTask(seed, **opts)


# Factories import their module lazily so optional dependencies (babel, tokenizers) are
# only needed by the tasks that use them.
_REGISTRY: dict[str, Callable] = {
    "dates": _dates,
    "copy": _toy("copy"),
    "reverse": _toy("reverse"),
    "sort": _toy("sort"),
    "translation": _translation,
    "kjv": _kjv,
    "pairs": _pairs,
    "labelled": _labelled,
}


def register_task(name: str, factory: Callable) -> None:
    """Make ``get_task(name, seed, **opts)`` call ``factory(seed=seed, **opts)``."""
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def list_tasks() -> list[str]:
    """Names accepted by :func:`get_task`."""
    return sorted(_REGISTRY)


def get_task(name: str, seed: int = 0, **opts):
    """Build the task ``name`` with ``seed`` and task-specific options.

    Raises
    ------
    KeyError
        Unknown name (the message lists the known ones).
    ImportError, FileNotFoundError
        A package or data file the task needs is missing; the message says how to get it.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None
    try:
        return factory(seed=seed, **opts)
    except TypeError as exc:
        # (a misspelt option read "PairsTask.__init__() got an unexpected keyword argument")
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown is None or unknown.group(1) not in opts:
            raise
        raise ValueError(f"task {name!r} has no option {unknown.group(1)!r} (its options: "
                         f"docs/TRAINING.md)") from None
