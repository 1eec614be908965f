# SPDX-License-Identifier: Apache-2.0
"""Greedy search, beam search and sampling over the decoder protocol of ``docs/ENGINE.md``.

Model-agnostic: a model provides ``state = model._start(sources)``,
``log_probs, attention = model._step(state, tokens)`` and ``state.select(rows)``, and may
provide ``model._greedy(state, tokens, ...)``, a whole greedy search in compiled code with the
results of :func:`_one_row_search` (docs/ENGINE.md). Arguments are validated by the caller
(:meth:`attncore.models.EncoderDecoderModel.generate`); this module assumes clean input.

Conventions (all searches)
    * Token log-probabilities are the model's float32 ``log_probs`` (never renormalised after
      ``min_length`` masking or sampling filters), summed in float64.
    * A hypothesis' ``n`` counts its generated tokens, EOS included when generated;
      ``score = log_prob / n ** length_penalty``.
    * Finished rows leave the batch (``state.select``), so late steps run on fewer rows.
    * Ties are broken towards the lower token id (and, in beam search, the earlier beam), so
      a source's result never depends on the other sources of the batch.
    * ``no_repeat_ngram_size=n`` (> 0) forbids, at each step of a hypothesis, every token that
      would complete an n-gram already in its decoder sequence: the start token (encoder-
      decoder models) or the prompt (language models), then the tokens generated so far --
      the sequence ``transformers``' ``no_repeat_ngram_size`` reads. EOS is never forbidden
      by it (it ends the hypothesis; it repeats nothing in the output).

Beam search
    All live beams of all sources run in one batch. At each step a source ranks the
    ``cum_log_prob + log_prob`` of every (beam, token) candidate; walking down that ranking,
    an EOS candidate becomes a finished hypothesis and any other token a live beam, until
    ``beam_size`` live beams are collected (EOS candidates ranked below them are dropped, so
    beam size 1 is exactly greedy). A source stops once it holds ``num_hypotheses`` finished
    hypotheses and the ``num_hypotheses``-th best finished score is at least the best live
    beam's ``cum_log_prob / n ** length_penalty`` (exact with ``length_penalty=0``, where log
    probabilities only decrease; the usual heuristic otherwise). Live beams still running at
    ``max_length`` finish without EOS.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .kernels import _softmax
from .models.base import GenerationResult

__all__ = ["generate", "generate_tokens", "greedy_search", "beam_search", "sample"]


def generate(model, sources: List[np.ndarray], *, bos_id: Optional[int], eos_id: int,
             max_length: int, min_length: int = 0, beam_size: int = 1, num_hypotheses: int = 1,
             length_penalty: float = 1.0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
             return_attention: bool = False, attention_heads: str = "mean",
             no_repeat_ngram_size: int = 0) -> List[GenerationResult]:
    """Dispatch to :func:`sample`, :func:`beam_search` or :func:`greedy_search`.

    ``bos_id=None`` is for decoder-only models: the first ``_step`` gets ``tokens=None`` and
    returns the distribution after the prompt.
    """
    common = dict(bos_id=bos_id, eos_id=eos_id, max_length=max_length, min_length=min_length,
                  length_penalty=length_penalty, return_attention=return_attention,
                  attention_heads=attention_heads, no_repeat_ngram_size=no_repeat_ngram_size)
    if do_sample:
        return sample(model, sources, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, **common)
    if beam_size > 1:
        return beam_search(model, sources, beam_size=beam_size, num_hypotheses=num_hypotheses,
                           **common)
    return greedy_search(model, sources, **common)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

#: The compiled greedy search allocates its outputs for max_length steps up front (8 bytes a
#: row and step, 4 more per source position with attention). Past this many bytes the search
#: runs step by step instead (the same results; memory grows with the steps taken), so a
#: generous max_length on a batch costs what the search uses, not 75 GiB at the start.
COMPILED_GREEDY_MAX_BYTES = 64 << 20

_NAN_MESSAGE = ("the model's log-probabilities are NaN {where}: its weights or activations "
                "overflow float32")


def _step(model, state, tokens, step, min_length, eos_id, return_attention):
    """One model step -> the float32 log-probs (a copy with EOS masked before ``min_length``)
    and the attention. Callers sum them into float64 (the float32 values convert exactly), so
    no (B, V) float64 copy is made per step."""
    log_probs, attention = model._step(state, tokens)
    # a NaN logit (or +inf) makes the log-softmax's sum NaN and so its whole row: one column
    # tells, at O(rows) a step
    if log_probs.shape[1] and np.isnan(log_probs[:, 0]).any():
        raise ValueError(_NAN_MESSAGE.format(where=f"at step {step}"))
    if return_attention and attention is None:
        raise ValueError("return_attention: this model has no cross-attention to return")
    if step < min_length:
        log_probs = log_probs.copy()
        log_probs[:, eos_id] = -np.inf
    return log_probs, attention


def _repeating_tokens(sequence: np.ndarray, size: int) -> np.ndarray:
    """The tokens that would complete an n-gram of ``size`` tokens already in ``sequence``
    (int64 1-d): the tokens after each earlier occurrence of its last ``size - 1`` tokens
    (every token of it when ``size`` is 1). O(len x size), in NumPy."""
    if size == 1:
        return sequence
    length = len(sequence)
    if length < size:
        return sequence[:0]
    earlier = sliding_window_view(sequence[:length - 1], size - 1)   # starts 0 .. length-size
    found = np.flatnonzero((earlier == sequence[length - size + 1:]).all(axis=1))
    return sequence[found + size - 1]


def _ban_repeated_ngrams(scores, sequences, size, eos_id):
    """``scores`` (B, V) with -inf at each row's tokens that would repeat an n-gram of
    ``size`` tokens in ``sequences[b]`` (its decoder sequence, int64 1-d), EOS excepted: the
    array itself when nothing is banned, else a copy (the model's log-probs are not
    written). ``size`` 0: off."""
    if not size:
        return scores
    banned = [(row, tokens) for row, tokens in
              enumerate(_repeating_tokens(sequence, size) for sequence in sequences)
              if tokens.size]
    if banned:
        scores = scores.copy()
        for row, tokens in banned:
            scores[row, tokens[tokens != eos_id]] = -np.inf
    return scores


def _check_tokens_left(scores, groups, step, size, label="sources[{}]"):
    """A ValueError where every row of a source has no finite entry left in ``scores``
    (``groups``: (source, first row, end row) of each source's rows; only
    no_repeat_ngram_size, with min_length forbidding EOS, can do that). The message starts
    with the source (``label`` of its index), as argument errors do, so a caller running
    sub-batches renames it to its own index (``models.base._named_by_index``)."""
    if not scores.shape[1]:
        return
    best = scores.max(axis=1)
    for source, lo, hi in groups:
        if best[lo:hi].max() == -np.inf:
            raise ValueError(f"{label.format(source)}: no_repeat_ngram_size={size} forbids "
                             f"every token but EOS at step {step}, and min_length forbids EOS "
                             f"there")


def _decoder_starts(sources, bos_id):
    """The start of each source's decoder sequence (what no_repeat_ngram_size reads): the
    prompt of a language model (``bos_id`` None), else the start token."""
    if bos_id is None:
        return [np.asarray(source, dtype=np.int64) for source in sources]
    return [np.array([bos_id], dtype=np.int64)] * len(sources)


def _attention_rows(attention, lengths, heads):
    """This step's attention (B, H, S_max) as one array per row, (S_i,) (heads averaged) or
    (H, S_i) (``"all"``), cut to the row's source length ``lengths[i]`` (the batch width may
    shrink when rows leave it)."""
    if heads == "mean":
        attention = attention.mean(axis=1, dtype=np.float64).astype(np.float32)
    return [row[..., :length].copy() for row, length in zip(attention, lengths)]


def _stack_attention(steps):
    """(n, S) or (n, H, S) float32 for one hypothesis."""
    return np.ascontiguousarray(np.stack(steps), dtype=np.float32)


def _score(log_prob: float, n: int, length_penalty: float) -> float:
    # (a Python float whatever log_prob is: greedy's and sampling's scores were np.float64,
    # beam search's floats)
    log_prob = float(log_prob)
    return log_prob / float(n) ** length_penalty if length_penalty else log_prob


def _source_length(source) -> int:
    return 0 if source is None else len(source)


def _first_tokens(bos_id, batch):
    return None if bos_id is None else np.full(batch, bos_id, dtype=np.int64)


# ------------------------------------------------------------------------------------------
# greedy search and sampling: one row per source
# ------------------------------------------------------------------------------------------

def greedy_search(model, sources, *, bos_id, eos_id, max_length, min_length=0,
                  length_penalty=1.0, return_attention=False, attention_heads="mean",
                  no_repeat_ngram_size=0):
    """Argmax decoding (ties -> the lowest id). Returns one-hypothesis results.

    A model with a compiled search (``model._greedy``, docs/ENGINE.md) runs it: the same
    results, bit for bit, without a Python round trip per step (unless its up-front outputs
    would pass COMPILED_GREEDY_MAX_BYTES, or n-grams are banned)."""
    widest = max((_source_length(source) for source in sources), default=0)
    upfront = len(sources) * max_length * (8 + (4 * widest if return_attention else 0))
    if getattr(model, "_greedy", None) is not None and bos_id is not None and \
            upfront <= COMPILED_GREEDY_MAX_BYTES and not no_repeat_ngram_size:
        return _compiled_greedy(model, sources, bos_id=bos_id, eos_id=eos_id,
                                max_length=max_length, min_length=min_length,
                                length_penalty=length_penalty,
                                return_attention=return_attention,
                                attention_heads=attention_heads)
    return _one_row_search(model, sources, _argmax, bos_id=bos_id, eos_id=eos_id,
                           max_length=max_length, min_length=min_length,
                           length_penalty=length_penalty, return_attention=return_attention,
                           attention_heads=attention_heads,
                           no_repeat_ngram_size=no_repeat_ngram_size)


def sample(model, sources, *, bos_id, eos_id, max_length, min_length=0, length_penalty=1.0,
           temperature=1.0, top_k=0, top_p=1.0, seed=None, return_attention=False,
           attention_heads="mean", no_repeat_ngram_size=0):
    """Ancestral sampling from softmax(log_probs / temperature) restricted to the ``top_k``
    most likely tokens (0: all) and to the ``top_p`` nucleus. Each source draws from its own
    stream, one uniform number a step: ``seed`` None gives fresh ones, an int gives source i
    ``default_rng(SeedSequence(seed, spawn_key=(i,)))``, a sequence one seed per source
    (``default_rng(seed[i])``: a source then samples the same tokens alone or in any batch).
    Recorded log-probabilities are the model's (untempered)."""
    streams = _sampling_streams(seed, len(sources))

    def choose(scores, rows):
        return _sample_rows(scores, [streams[row] for row in rows.tolist()], temperature,
                            top_k, top_p)

    return _one_row_search(model, sources, choose, bos_id=bos_id, eos_id=eos_id,
                           max_length=max_length, min_length=min_length,
                           length_penalty=length_penalty, return_attention=return_attention,
                           attention_heads=attention_heads,
                           no_repeat_ngram_size=no_repeat_ngram_size)


def generate_tokens(model, source, *, bos_id, eos_id, max_length, min_length=0,
                    do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                    no_repeat_ngram_size=0):
    """Yield ``(token, log_prob)`` for one source as greedy search (or sampling) chooses them,
    EOS not yielded: the steps of :func:`_one_row_search` for a batch of one (its draws:
    source 0's stream of ``seed``), each handed on when it is made. Arguments are validated
    by the caller (:meth:`attncore.models.base.GenerateTokensMixin.generate_tokens`); the
    sampling stream is made here, at the call (a seed list of another length is refused
    before the first ``next()``)."""
    streams = _sampling_streams(seed, 1) if do_sample else None
    return _token_stream(model, source, streams, bos_id=bos_id, eos_id=eos_id,
                         max_length=max_length, min_length=min_length, temperature=temperature,
                         top_k=top_k, top_p=top_p, no_repeat_ngram_size=no_repeat_ngram_size)


def _token_stream(model, source, streams, *, bos_id, eos_id, max_length, min_length,
                  temperature, top_k, top_p, no_repeat_ngram_size):
    state = model._start([source])
    tokens = _first_tokens(bos_id, 1)
    sequence = _decoder_starts([source], bos_id)[0]
    for step in range(max_length):
        scores, _ = _step(model, state, tokens, step, min_length, eos_id, False)
        scores = _ban_repeated_ngrams(scores, [sequence], no_repeat_ngram_size, eos_id)
        _check_tokens_left(scores, [(0, 0, 1)], step, no_repeat_ngram_size, label="source")
        if streams is None:
            token = int(_argmax(scores, None)[0])
        else:
            token = int(_sample_rows(scores, streams, temperature, top_k, top_p)[0])
        if token == eos_id:
            return
        yield token, float(scores[0, token])
        tokens = np.array([token], dtype=np.int64)
        if no_repeat_ngram_size:
            sequence = np.append(sequence, tokens)


def _compiled_greedy(model, sources, *, bos_id, eos_id, max_length, min_length,
                     length_penalty, return_attention, attention_heads):
    """Results of ``model._greedy`` in the form :func:`_one_row_search` gives them."""
    count = len(sources)
    tokens, counts, ended, log_prob, attention = model._greedy(
        model._start(sources), _first_tokens(bos_id, count), max_length=max_length,
        min_length=min_length, eos_id=eos_id, return_attention=return_attention)
    if np.isnan(log_prob).any():
        raise ValueError(_NAN_MESSAGE.format(
            where=f"for sources[{int(np.flatnonzero(np.isnan(log_prob))[0])}]"))
    results = []
    for i in range(count):
        n = int(counts[i]) + int(ended[i])
        att = None
        if return_attention:   # the n steps (n, H, S_max) cut as the step-by-step search does
            rows = _attention_rows(attention[i, :n], [_source_length(sources[i])] * n,
                                   attention_heads)
            att = [_stack_attention(rows)]
        results.append(GenerationResult([tokens[i, :counts[i]].tolist()],
                                        [_score(log_prob[i], n, length_penalty)],
                                        [float(log_prob[i])], att))
    return results


def _argmax(scores, rows):
    return scores.argmax(axis=1)


def source_seeds(seed, count, keys=None):
    """The seed of each of ``count`` sources for a validated ``seed`` (see :func:`sample`):
    fresh ``SeedSequence`` s for None, ``SeedSequence(seed, spawn_key=(key,))`` for an int, the
    entries of a sequence (which must have ``count``). ``keys`` (default ``0 .. count - 1``, the
    index in the call) are what an int seed's streams are keyed by: a batch job passes each
    line's index in its file."""
    if seed is None:
        return np.random.SeedSequence().spawn(count)
    if isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != count:
            raise ValueError(f"seed has {len(seed)} entries for "
                             f"{'one source' if count == 1 else f'{count} sources'}")
        return list(seed)
    keys = range(count) if keys is None else keys
    if len(keys) != count:
        raise ValueError(f"keys has {len(keys)} entries for {count} sources")
    return [np.random.SeedSequence(seed, spawn_key=(int(key),)) for key in keys]


def _sampling_streams(seed, count):
    """One ``numpy.random.Generator`` per source (see :func:`sample`)."""
    return [np.random.default_rng(s) for s in source_seeds(seed, count)]


def _sample_rows(scores, streams, temperature, top_k, top_p):
    """One token per row of log-probs (B, V) (-inf = forbidden), computed in float64, row b
    drawing one uniform number from ``streams[b]``.

    Rankings are by value, equal values by lower id (a stable sort's order), taken with
    :func:`_ranked` (no sort of the whole vocabulary for a few tokens)."""
    logits = scores.astype(np.float64)
    # the max first: a tiny temperature then sends the best token to 0 and the rest to -inf
    # (the greedy limit) instead of every logit to -inf and the row to NaN
    top = logits.max(axis=1, keepdims=True)
    logits -= np.where(np.isfinite(top), top, 0.0)
    with np.errstate(over="ignore"):
        logits /= temperature
    vocab = logits.shape[1]
    if 0 < top_k < vocab:
        # keep the top_k largest; ties at the boundary keep the lower ids
        kept = np.full_like(logits, -np.inf)
        for row, values in zip(kept, logits):
            best = _ranked(values, top_k)
            row[best] = values[best]
        logits = kept
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    if top_p < 1.0:
        probs = np.stack([_nucleus(row, top_p) for row in probs])
        probs /= probs.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    draws = np.array([stream.random() for stream in streams]) * cdf[:, -1]
    picked = (cdf <= draws[:, None]).sum(axis=1)
    # guard against rounding at the top end: never pick a zero-probability token
    picked = np.minimum(picked, vocab - 1)
    zero = probs[np.arange(len(picked)), picked] == 0.0
    if zero.any():
        picked[zero] = probs[zero].argmax(axis=1)
    return picked


def _ranked(values, count):
    """The indices of the ``count`` largest of values (V,) float64 (no NaN), largest first,
    equal values by lower index: the one-pass top-k for a few (its cost grows with count);
    for more, a partition finds the count-th largest value, and only the tokens above it (and
    the lowest-id ones equal to it) are sorted, not the whole row (a stable sort of 8000
    values cost 0.55 ms a row and step where a flat distribution's nucleus passed 64)."""
    vocab = values.shape[0]
    if count <= 256:
        return _softmax.top_k(values, count)
    if count >= vocab:
        return np.argsort(-values, kind="stable")
    kth = np.partition(values, vocab - count)[vocab - count]
    above = np.flatnonzero(values > kth)
    tied = np.flatnonzero(values == kth)[:count - above.size]
    # (every kept value above kth is larger than every tied one: a stable sort of the
    # concatenation orders equal values by index)
    chosen = np.concatenate((above, tied))
    return chosen[np.argsort(-values[chosen], kind="stable")]


def _nucleus(probs, top_p):
    """probs (V,) float64 with every token outside the top-p nucleus set to 0: the smallest
    prefix of the ranking whose mass reaches top_p (never empty). A trained model's nucleus
    is usually a few tokens: the ranking's first 64 come from the one-pass top-k. A larger
    one is found from the row's values sorted alone (``_softmax.nucleus``, a radix sort; no
    index sort: ties have equal values, so the running sums are the ranking's), as the tokens
    above the smallest kept value and the lowest-id ones equal to it. Either way the
    ranking's own prefix."""
    vocab = probs.shape[0]
    order = _ranked(probs, 64)
    ranked = probs[order]
    # mass of the better tokens, as the running sum itself (cumsum - ranked rounds: at a
    # top_p equal to the best j tokens' mass it kept token j + 1 in 141 of 1125 cases)
    before = np.concatenate(([0.0], np.cumsum(ranked)[:-1]))
    drop = before >= top_p
    drop[0] = False
    if drop.any() or order.size == vocab:
        ranked[drop] = 0.0
        kept = np.zeros_like(probs)
        kept[order] = ranked
        return kept
    # (a stable argsort of the row cost 0.55 ms a row and step at 8000 tokens, NumPy's sort
    # of its values 0.2 ms; the compiled radix sort 0.03 ms)
    kept = np.empty_like(probs)
    _softmax.nucleus(np.ascontiguousarray(probs, dtype=np.float64), float(top_p), kept)
    return kept


def _one_row_search(model, sources, choose, *, bos_id, eos_id, max_length, min_length,
                    length_penalty, return_attention, attention_heads, no_repeat_ngram_size=0):
    count = len(sources)
    starts = _decoder_starts(sources, bos_id) if no_repeat_ngram_size else None
    state = model._start(sources)
    rows = np.arange(count)                     # source index of each live row
    tokens = _first_tokens(bos_id, count)
    hypotheses = [[] for _ in range(count)]
    log_prob = np.zeros(count, dtype=np.float64)
    ended = np.zeros(count, dtype=bool)         # EOS generated
    attention = [[] for _ in range(count)]
    for step in range(max_length):
        scores, step_attention = _step(model, state, tokens, step, min_length, eos_id,
                                          return_attention)
        if no_repeat_ngram_size:
            scores = _ban_repeated_ngrams(
                scores, [np.concatenate([starts[row], hypotheses[row]]).astype(np.int64)
                         for row in rows.tolist()], no_repeat_ngram_size, eos_id)
            _check_tokens_left(scores, [(row, i, i + 1) for i, row in enumerate(rows.tolist())],
                               step, no_repeat_ngram_size)
        chosen = choose(scores, rows)
        log_prob[rows] += scores[np.arange(len(rows)), chosen]
        if return_attention:
            lengths = [_source_length(sources[row]) for row in rows.tolist()]
            for row, att in zip(rows, _attention_rows(step_attention, lengths, attention_heads)):
                attention[row].append(att)
        finished = chosen == eos_id
        for row, token, done in zip(rows.tolist(), chosen.tolist(), finished.tolist()):
            if done:
                ended[row] = True
            else:
                hypotheses[row].append(token)
        if finished.all() or step + 1 == max_length:
            break
        if finished.any():
            keep = np.flatnonzero(~finished)
            state = state.select(keep)
            rows, chosen = rows[keep], chosen[keep]
        tokens = np.ascontiguousarray(chosen, dtype=np.int64)
    results = []
    for i in range(count):
        n = len(hypotheses[i]) + int(ended[i])
        att = [_stack_attention(attention[i])] if return_attention else None
        results.append(GenerationResult([hypotheses[i]], [_score(log_prob[i], n, length_penalty)],
                                        [float(log_prob[i])], att))
    return results


# ------------------------------------------------------------------------------------------
# beam search
# ------------------------------------------------------------------------------------------

class _Beam:
    """A live or finished hypothesis: tokens, summed log-prob, per-step attention."""

    __slots__ = ("tokens", "log_prob", "attention")

    def __init__(self, tokens, log_prob, attention):
        self.tokens, self.log_prob, self.attention = tokens, log_prob, attention


def beam_search(model, sources, *, bos_id, eos_id, max_length, beam_size, num_hypotheses=1,
                min_length=0, length_penalty=1.0, return_attention=False,
                attention_heads="mean", no_repeat_ngram_size=0):
    """Batched beam search (see the module docstring). Returns ``num_hypotheses``-best
    results sorted by score."""
    count = len(sources)
    starts = _decoder_starts(sources, bos_id) if no_repeat_ngram_size else None
    state = model._start(sources)
    # live rows of the batch, grouped by source in source order
    row_source = np.arange(count)
    beams = [_Beam([], 0.0, []) for _ in range(count)]
    finished = [[] for _ in range(count)]     # (score, _Beam)
    tokens = _first_tokens(bos_id, count)
    for step in range(max_length):
        scores, step_attention = _step(model, state, tokens, step, min_length, eos_id,
                                          return_attention)
        groups = _groups(row_source)
        if no_repeat_ngram_size:
            scores = _ban_repeated_ngrams(
                scores, [np.concatenate([starts[source], beam.tokens]).astype(np.int64)
                         for source, beam in zip(row_source.tolist(), beams)],
                no_repeat_ngram_size, eos_id)
            # (a source is stuck only when none of its beams has a token left)
            _check_tokens_left(scores, groups, step, no_repeat_ngram_size)
        # each source's best candidates log_prob(beam) + log p(token), ranked in one compiled
        # pass without forming the (rows, V) float64 sums
        ranked = _softmax.beam_top_k(
            np.ascontiguousarray(scores), np.array([b.log_prob for b in beams], dtype=np.float64),
            np.array([lo for _, lo, _ in groups] + [len(beams)], dtype=np.int64), 2 * beam_size)
        att_rows = (_attention_rows(step_attention,
                                    [_source_length(sources[s]) for s in row_source.tolist()],
                                    attention_heads) if return_attention else None)
        last = step + 1 == max_length
        parents, next_tokens, next_beams, next_source = [], [], [], []
        for group, (source, lo, hi) in enumerate(groups):
            chosen = _expand(ranked, group, lo, scores.shape[1], beam_size, eos_id)
            for row, token, value in chosen:
                beam = beams[row]
                attention = beam.attention + [att_rows[row]] if return_attention else None
                if token == eos_id:
                    n = len(beam.tokens) + 1
                    finished[source].append((_score(value, n, length_penalty),
                                             _Beam(beam.tokens, value, attention)))
                elif last:
                    new = _Beam(beam.tokens + [token], value, attention)
                    finished[source].append((_score(value, len(new.tokens), length_penalty), new))
                else:
                    parents.append(row)
                    next_tokens.append(token)
                    next_beams.append(_Beam(beam.tokens + [token], value, attention))
                    next_source.append(source)
        keep = _still_running(next_source, next_beams, finished, num_hypotheses,
                              length_penalty)
        if not keep.any():
            break
        keep_rows = np.flatnonzero(keep)
        state = state.select(np.asarray(parents, dtype=np.int64)[keep_rows])
        beams = [next_beams[i] for i in keep_rows]
        row_source = np.asarray(next_source, dtype=np.int64)[keep_rows]
        tokens = np.asarray(next_tokens, dtype=np.int64)[keep_rows]
    return [_results(finished[i], num_hypotheses, return_attention) for i in range(count)]


def _groups(row_source):
    """(source, first row, end row) of each run of rows of one source (a few dozen rows: a
    Python walk costs less than NumPy's calls)."""
    groups, start = [], 0
    sources = row_source.tolist()
    for row in range(1, len(sources) + 1):
        if row == len(sources) or sources[row] != sources[start]:
            groups.append((sources[start], start, row))
            start = row
    return groups


def _expand(ranked, group, first_row, vocab, beam_size, eos_id):
    """Walk one source's ranked candidates (``_softmax.beam_top_k``'s group ``group``: the best
    2 * beam_size of its (beams, V) totals, best first, equal values in (beam, token) order --
    at most beam_size EOS and beam_size live tokens are needed, one EOS per beam); stop after
    ``beam_size`` non-EOS tokens. Returns [(row, token, total)] in rank order."""
    index, value, count = ranked
    n = int(count[group])
    chosen, live = [], 0
    for flat, total in zip(index[group, :n].tolist(), value[group, :n].tolist()):
        if total == -np.inf:
            break
        row, token = divmod(flat, vocab)
        chosen.append((first_row + row, token, total))
        if token != eos_id:
            live += 1
            if live == beam_size:
                break
    return chosen


def _still_running(next_source, next_beams, finished, num_hypotheses, length_penalty):
    """Bool per candidate live beam: False once its source is done (module docstring)."""
    keep = np.ones(len(next_beams), dtype=bool)
    best_live = {}
    for i, (source, beam) in enumerate(zip(next_source, next_beams)):
        bound = _score(beam.log_prob, len(beam.tokens), length_penalty)
        best_live[source] = max(best_live.get(source, -np.inf), bound)
    done = set()
    for source, bound in best_live.items():
        done_list = finished[source]
        if len(done_list) >= num_hypotheses:
            kth = sorted((s for s, _ in done_list), reverse=True)[num_hypotheses - 1]
            if kth >= bound:
                done.add(source)
    if done:
        keep = np.array([s not in done for s in next_source], dtype=bool)
    return keep


def _results(done, num_hypotheses, return_attention):
    # stable sort: among equal scores the hypothesis found first wins
    best = sorted(done, key=lambda item: -item[0])[:num_hypotheses]
    attention = ([_stack_attention(b.attention) for _, b in best]
                 if return_attention else None)
    return GenerationResult([list(b.tokens) for _, b in best], [float(s) for s, _ in best],
                            [float(b.log_prob) for _, b in best], attention)
