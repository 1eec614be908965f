"""Evaluation metrics over decoded text: exact match and corpus BLEU (sacrebleu)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["exact_match", "bleu"]


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference, character for character (0.0 for none):
    the one definition, :func:`attncore.train.evaluate.exact_match` scores models with it."""
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs differ in length: {len(hyps)} vs {len(refs)}")
    if not refs:
        return 0.0
    return sum(h == r for h, r in zip(hyps, refs)) / len(refs)


def bleu(hyps: Sequence[str], refs: Sequence[str], *, tokenize: str = "13a",
         lowercase: bool = False) -> float:
    """Corpus BLEU (0-100) of detokenized hypotheses against one reference each.

    Uses ``sacrebleu.corpus_bleu`` (an optional dependency) so scores are comparable with
    published ones: it tokenizes both sides itself (``tokenize``, default ``"13a"``, the WMT
    standard), so pass plain text, not subword pieces.

    Parameters
    ----------
    hyps, refs : sequence of str, same length
    tokenize : str
        sacrebleu tokenizer name.
    lowercase : bool
        Case-insensitive BLEU.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs differ in length: {len(hyps)} vs {len(refs)}")
    if not hyps:   # (sacrebleu failed with an IndexError)
        raise ValueError("hyps and refs are empty: BLEU needs at least one sentence")
    try:
        import sacrebleu
    except ImportError as exc:
        raise ImportError("bleu() needs the 'sacrebleu' package: pip install 'sacrebleu>=2.3'") from exc
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize=tokenize,
                                       lowercase=lowercase).score)
