# SPDX-License-Identifier: Apache-2.0
"""The engine's model objects: :class:`Model`, :class:`GenerationResult`,
:class:`GenerateTokensMixin` (``generate_tokens`` and ``translate`` of every generating model)
and :class:`EncoderDecoderModel` (the public ``generate``).

A model is a config dict, a dict of read-only C-contiguous float32 weights (checked against
:func:`attncore.io.weight_spec`) and an optional tokenizer. It holds no per-call state: every
call builds its own decoder state, so several Python threads may run one model at once
(the kernels release the GIL). See ``docs/ENGINE.md``.
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import io
from ..kernels._memory import read_only_view
from ..kernels._validation import check_bool
from ..kernels.basic import check_weight_dtype, round_bfloat16

__all__ = ["Model", "EncoderDecoderModel", "GenerationResult", "check_sources",
           "check_generation_options"]


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    """The n-best list of one source, best first.

    Attributes
    ----------
    hypotheses : list of list of int
        Generated token ids, without BOS and EOS.
    scores : list of float
        ``log_probs[i] / n_i ** length_penalty``, n_i = scored tokens (EOS included when
        generated); sorted in decreasing order.
    log_probs : list of float
        Sum of the model's token log-probabilities of each hypothesis (EOS included).
    attention : list of np.ndarray or None
        Per hypothesis, float32 (n_i, S) (heads averaged) or (n_i, H, S) (``"all"``), S the
        source length; None unless ``return_attention``.
    """

    hypotheses: List[List[int]]
    scores: List[float]
    log_probs: List[float]
    attention: Optional[List[np.ndarray]] = None

    @property
    def tokens(self) -> List[int]:
        """The best hypothesis."""
        return self.hypotheses[0]

    @property
    def score(self) -> float:
        """The best hypothesis' score."""
        return self.scores[0]


# ------------------------------------------------------------------------------------------
# Argument checks shared by every engine model
# ------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_int(value, name: str, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_sources(sources, vocab_size: int, max_source_length: Optional[int] = None,
                  name: str = "sources") -> List[np.ndarray]:
    """Validate a batch of token-id sequences.

    Parameters
    ----------
    sources : sequence of 1-d integer sequences (lists or arrays), of any lengths. A 2-D
        array is taken row by row, each row a whole sequence: its pad ids, if any, would be
        read as tokens (the trainer's padded batches drop them) -- pass a list of unpadded
        rows for ragged input.
    vocab_size : int
        Ids must lie in ``[0, vocab_size)``.
    max_source_length : int, optional
        Longest allowed source (a position table's length).

    Returns
    -------
    list of C-contiguous int64 arrays, one per source

    Raises
    ------
    TypeError
        ``sources`` is a string / not a sequence, or a source is not integer.
    ValueError
        Empty batch, empty source, not 1-d, ids out of range, source too long.
    """
    if isinstance(sources, (str, bytes)) or not isinstance(sources, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a list of token-id sequences, got {type(sources).__name__}")
    if len(sources) == 0:
        raise ValueError(f"{name} is an empty batch")
    return [check_token_ids(source, f"{name}[{i}]", vocab_size, max_source_length)
            for i, source in enumerate(sources)]


def check_token_ids(source, label: str, vocab_size: Optional[int],
                    max_source_length: Optional[int] = None) -> np.ndarray:
    """One non-empty 1-d sequence of integer token ids in ``[0, vocab_size)`` (no range check
    when ``vocab_size`` is None), as C-contiguous int64; errors name it ``label``."""
    if isinstance(source, (str, bytes)):
        raise TypeError(f"{label} must be a sequence of token ids, got a string "
                        f"(use translate() for text)")
    try:
        array = np.asarray(source)
    except ValueError:   # NumPy's "inhomogeneous shape": a nested, ragged source
        raise TypeError(f"{label} must be a flat sequence of token ids") from None
    if array.dtype == object or array.dtype.kind not in "iu":
        if array.size == 0 and array.ndim == 1:
            raise ValueError(f"{label} is empty")
        raise TypeError(f"{label} must hold integer token ids, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{label} must be 1-d, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{label} is empty")
    low, high = int(array.min()), int(array.max())
    if vocab_size is not None and (low < 0 or high >= vocab_size):
        bad = low if low < 0 else high
        raise ValueError(f"{label} has token id {bad} outside [0, {vocab_size})")
    if high > np.iinfo(np.int64).max:   # (uint64 ids wrapped to negative ones)
        raise ValueError(f"{label} has token id {high}, past int64")
    if max_source_length is not None and array.size > max_source_length:
        raise ValueError(f"{label} has {array.size} tokens, longer than the position "
                         f"table ({max_source_length})")
    return np.ascontiguousarray(array, dtype=np.int64)


def check_finite(outputs, what: str):
    """``outputs`` (an array or a list of arrays), or ValueError when one holds NaN or
    infinity: weights or activations that overflow float32 are never handed back silently
    (generation raises the same way)."""
    for array in (outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        if not np.isfinite(array).all():
            raise ValueError(f"the model's {what} are not finite (NaN or infinity): its weights "
                             f"or activations overflow float32")
    return outputs


def gather_cache_prefix(cache: np.ndarray, rows: np.ndarray, filled: int) -> np.ndarray:
    """A key/value cache (B, H, capacity, d) ``cache[rows]`` restricted to positions
    [0, filled) (the tail is left uninitialised: attention reads keys below ``kv_lengths``
    only). For the Transformer's self-attention cache and the RAN's window cache.

    Compiled, one memcpy per (row, head) block: ``cache[rows, :, :filled]`` made a temporary
    and copied it again, and a Python loop over rows cost ~1 us a row (a beam-4 batch-16
    Transformer-base call spent 8% of its time here that way)."""
    from ..kernels import _transformer
    from ..kernels.threads import kernel_threads
    out = np.empty((rows.shape[0],) + cache.shape[1:], dtype=cache.dtype)
    _transformer.gather_cache_prefix(cache, rows, filled, out, kernel_threads())
    return out


def grow_cache(cache: np.ndarray, capacity: int, filled: int) -> np.ndarray:
    """``cache`` (B, H, old capacity, d) with room for ``capacity`` positions, its first
    ``filled`` kept (the tail uninitialised, as :func:`gather_cache_prefix`'s)."""
    out = np.empty(cache.shape[:2] + (capacity,) + cache.shape[3:], dtype=cache.dtype)
    out[:, :, :filled] = cache[:, :, :filled]
    return out


#: What running one more padded batch costs, in padded rows: the kernel calls of a whole
#: encoder pass (a few per layer, ~1 ms for Transformer-base at one thread) against one
#: row's products (0.04-0.4 ms a row across the benchmark models), rounded up so that
#: small models split only where the padding is a real cost.
GROUP_OVERHEAD_ROWS = 32


def length_groups(lengths, overhead_rows: int = GROUP_OVERHEAD_ROWS) -> List[np.ndarray]:
    """The rows of a ragged batch (``lengths`` (B,)) split into groups that are each padded
    to their own longest: int64 row arrays, longest group first, rows of equal length never
    split. The split minimises ``sum(overhead_rows + rows * longest)`` over the groups, so
    one long source no longer pads every short one to its length (a 400-token source among
    63 of 10 tokens made a Transformer encode 25x the rows it needed). Exact over the
    distinct lengths (a dynamic programme, O(distinct^2) NumPy work: a few hundred at most).
    The models' per-row results do not depend on the batch, so grouping changes no bit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    distinct, counts = np.unique(lengths, return_counts=True)
    distinct, counts = distinct[::-1], counts[::-1]                        # longest first
    before = np.concatenate(([0], np.cumsum(counts)))                      # rows before u
    best = np.zeros(len(distinct) + 1)
    cut = np.zeros(len(distinct) + 1, dtype=np.int64)
    for end in range(1, len(distinct) + 1):   # groups over distinct[:end], the last [i, end)
        costs = best[:end] + overhead_rows + (before[end] - before[:end]) * distinct[:end]
        cut[end] = int(np.argmin(costs))
        best[end] = costs[cut[end]]
    bounds, end = [], len(distinct)
    while end:
        bounds.append((distinct[end - 1], distinct[cut[end]]))             # (shortest, longest)
        end = cut[end]
    order = np.argsort(-lengths, kind="stable")
    return [order[(lengths[order] >= low) & (lengths[order] <= high)]
            for low, high in reversed(bounds)]


def check_rows(rows, batch: int) -> np.ndarray:
    """The ``rows`` of a decoder state's ``select`` (docs/ENGINE.md): a 1-d integer sequence
    in ``[0, batch)`` (rows may repeat, drop or reorder), as C-contiguous int64. Floats are
    refused, not truncated: a beam search handing over scores instead of indices."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise ValueError(f"rows must be a 1-d integer array, got shape {rows.shape} dtype {rows.dtype}")
    rows = np.ascontiguousarray(rows, dtype=np.int64)   # (compiled gathers read it flat)
    if rows.size and (rows.min() < 0 or rows.max() >= batch):
        raise ValueError(f"rows must lie in [0, {batch}), got {int(rows[(rows < 0) | (rows >= batch)][0])}")
    return rows


def check_step_tokens(tokens, batch: int, vocab_size: int) -> np.ndarray:
    """The tokens of a decoder ``_step``: integer ids of shape (batch,) in
    ``[0, vocab_size)``, as C-contiguous int64 (the compiled steps index tables with them)."""
    tokens = np.asarray(tokens)
    if tokens.shape != (batch,):
        raise ValueError(f"tokens must have shape ({batch},), got {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if batch and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"tokens has an id outside [0, {vocab_size})")
    return np.ascontiguousarray(tokens, dtype=np.int64)


def _default_limit(source_length: int) -> int:
    """``2 * source_length + 10``: the generation limit of a source when none is given, at most
    :data:`MAX_GENERATION_LENGTH` (a 600k-token source was refused for a max_length nobody
    gave)."""
    return min(2 * int(source_length) + 10, MAX_GENERATION_LENGTH)


def generate_with_default_lengths(model, sources, *, name: str = "sources",
                                  **options) -> List[GenerationResult]:
    """``model.generate`` with each source's own limit, ``model.default_max_length(length)``
    (``2 * length + 10`` for a model without one), or ``min_length + 1`` where that is more
    (room for EOS after the floor; at most ``model.longest_generation(length)``). Sources with the
    same limit run as one batch, so a source's result does not depend on which others came
    with it (one limit for the whole batch, from its longest source, made a line's output
    depend on its batch). With sampling, an int ``seed`` gives source i (its index here) the
    stream ``SeedSequence(seed, spawn_key=(i,))`` whatever group it runs in, as one call would.
    Errors name a source as ``name[i]``, its index here (not in its group)."""
    if isinstance(sources, (str, bytes)) or not isinstance(sources, (Sequence, np.ndarray)):
        raise TypeError(f"sources must be a list of token-id sequences, got "
                        f"{type(sources).__name__}")
    if len(sources) == 0:
        raise ValueError("sources is an empty batch")
    default = getattr(model, "default_max_length", _default_limit)
    floor = options.get("min_length", 0)
    # (a numpy integer counts as one; a floor past the longest generation is min_length's error,
    # not the max_length it would become)
    floor = int(floor) if isinstance(floor, (int, np.integer)) and not isinstance(floor, bool) \
        else 0
    if floor > MAX_GENERATION_LENGTH:
        raise ValueError(f"min_length must be at most {MAX_GENERATION_LENGTH}, got {floor}")
    # (an entry without a length is left to generate's checks, which name it)
    lengths = [len(source) if hasattr(source, "__len__") else 1 for source in sources]
    longest = getattr(model, "longest_generation", None)
    for i, length in enumerate(lengths):
        # (past a position table the floor became a max_length the caller never gave, and the
        # error blamed that)
        cap = longest(length) if longest is not None and length else None
        if cap is not None and 1 <= cap < floor:   # (cap < 1: a prompt too long, generate's)
            raise ValueError(f"min_length is {floor}, more tokens than {name}[{i}] can have "
                             f"(at most {cap} for its length: the position table)")
    limits = []
    for length in lengths:
        limit = default(length)
        if floor >= limit:
            # one step more than the floor, for EOS (a limit of exactly min_length cut every
            # such output there, unfinished), within the room the model has
            room = longest(length) if longest is not None else MAX_GENERATION_LENGTH
            limit = max(1, min(floor + 1, room))
        limits.append(limit)
    results: List[Optional[GenerationResult]] = [None] * len(sources)
    seeds = None
    if options.get("seed") is not None:   # each source's seed, by its index here
        from .. import generation
        seeds = generation.source_seeds(check_seed(options["seed"]), len(sources))
    for limit in sorted(set(limits)):
        rows = [i for i, row_limit in enumerate(limits) if row_limit == limit]
        if seeds is not None:
            options["seed"] = [seeds[i] for i in rows]
        with _named_by_index(name, rows):
            group = model.generate([sources[i] for i in rows], max_length=limit, **options)
        for i, result in zip(rows, group):
            results[i] = result
    return results


@contextlib.contextmanager
def _named_by_index(name: str, rows: Sequence[int]):
    """An argument error of ``generate`` on a sub-batch, ``sources[k] ...``, re-raised as
    ``{name}[rows[k]] ...``: the caller's index and argument name."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        match = re.match(r"(sources|prompts)\[(\d+)\]", str(exc))
        if match is None or int(match.group(2)) >= len(rows):
            raise
        message = f"{name}[{rows[int(match.group(2))]}]{str(exc)[match.end():]}"
        raise type(exc)(message) from None


#: The longest generation ``generate`` accepts (a seq2seq search allocates its outputs for
#: max_length steps up front; Transformers are bounded by their position table as well).
MAX_GENERATION_LENGTH = 1 << 20
#: The widest beam ``generate`` accepts: candidates grow as beams x vocabulary a step, and a
#: beam of 10^9 ran for minutes without an error (usual widths are 1 to 16).
MAX_BEAM_SIZE = 1024
#: Largest |length_penalty|: n ** 10 for n up to MAX_GENERATION_LENGTH stays a float64 with room
#: to divide log-probs by (400 overflowed in the scoring); usual values are 0 to 2.
MAX_LENGTH_PENALTY = 10.0


def check_seed(seed):
    """A sampling seed: an int >= 0, or a sequence of them (numpy ``SeedSequence`` entries
    allowed), one per source (generation.sample checks the count)."""
    if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, (str, bytes)):
        return [entry if isinstance(entry, np.random.SeedSequence)
                else _check_int(entry, f"seed[{i}]", 0) for i, entry in enumerate(seed)]
    return _check_int(seed, "seed", 0)


def check_generation_options(*, max_length, min_length=0, beam_size=1, num_hypotheses=1,
                             length_penalty=1.0, do_sample=False, temperature=1.0, top_k=0,
                             top_p=1.0, seed=None, return_attention=False,
                             attention_heads="mean", no_repeat_ngram_size=0) -> dict:
    """Validate the options of ``generate`` (docs/ENGINE.md) and return them normalised.

    Raises TypeError / ValueError naming the offending argument.
    """
    max_length = _check_int(max_length, "max_length", 1)
    if max_length > MAX_GENERATION_LENGTH:   # (outputs are allocated for max_length steps)
        raise ValueError(f"max_length must be at most {MAX_GENERATION_LENGTH}, got {max_length}")
    min_length = _check_int(min_length, "min_length", 0)
    if min_length > max_length:
        raise ValueError(f"min_length ({min_length}) must be <= max_length ({max_length})")
    beam_size = _check_int(beam_size, "beam_size", 1)
    if beam_size > MAX_BEAM_SIZE:
        raise ValueError(f"beam_size must be at most {MAX_BEAM_SIZE}, got {beam_size}")
    num_hypotheses = _check_int(num_hypotheses, "num_hypotheses", 1)
    if num_hypotheses > beam_size:
        raise ValueError(f"num_hypotheses ({num_hypotheses}) must be <= beam_size ({beam_size})")
    length_penalty = _check_float(length_penalty, "length_penalty")
    if not -MAX_LENGTH_PENALTY <= length_penalty <= MAX_LENGTH_PENALTY:
        raise ValueError(f"length_penalty must lie in [-{MAX_LENGTH_PENALTY:g}, "
                         f"{MAX_LENGTH_PENALTY:g}], got {length_penalty}")
    do_sample = check_bool(do_sample, "do_sample")
    temperature = _check_float(temperature, "temperature")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    top_k = _check_int(top_k, "top_k", 0)
    top_p = _check_float(top_p, "top_p")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if do_sample and beam_size != 1:
        raise ValueError(f"beam_size must be 1 when do_sample=True, got {beam_size}")
    if not do_sample:   # else a search would run and the option be silently ignored
        for name, value, default in (("temperature", temperature, 1.0), ("top_k", top_k, 0),
                                     ("top_p", top_p, 1.0)):
            if value != default:
                raise ValueError(f"{name}={value!r} only applies to sampling: pass "
                                 f"do_sample=True, or leave {name} at {default!r}")
    if seed is not None:
        seed = check_seed(seed)
    return_attention = check_bool(return_attention, "return_attention")
    if attention_heads not in ("mean", "all"):
        raise ValueError(f"attention_heads must be 'mean' or 'all', got {attention_heads!r}")
    no_repeat_ngram_size = _check_int(no_repeat_ngram_size, "no_repeat_ngram_size", 0)
    return dict(max_length=max_length, min_length=min_length, beam_size=beam_size,
                num_hypotheses=num_hypotheses, length_penalty=length_penalty,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, return_attention=return_attention,
                attention_heads=attention_heads, no_repeat_ngram_size=no_repeat_ngram_size)


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------

class ReadOnlyWeights(Mapping):
    """``model.weights``: name -> read-only float32 array, a mapping that cannot be changed.
    A copy or a pickle of it is a plain dict (``copy.deepcopy``: of writeable copies of the
    arrays), for the caller to edit and build a new model from."""

    __slots__ = ("_arrays",)

    def __init__(self, arrays: dict):
        self._arrays = arrays

    def __getitem__(self, name):
        return self._arrays[name]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)

    def __repr__(self):
        return f"ReadOnlyWeights({len(self)} tensors)"

    def __reduce__(self):
        return (dict, (dict(self._arrays),))


def _refuse_edit(self, *args, **kwargs):
    raise TypeError("model.config is read-only, the objects and lists inside it too (the model "
                    "was built from it): model.config.to_dict() is a plain copy to edit, and "
                    "type(model)({**model.config, key: value}, model.weights, model.tokenizer, "
                    "weight_dtype=model.weight_dtype) a model with an entry changed")


class ReadOnlyConfig(dict):
    """``model.config``: the ``config.json`` object the model was built from, a dict (so
    ``json.dumps`` and ``==`` work) whose edits raise ``TypeError``, nested objects and lists
    included. :meth:`to_dict`, ``copy.deepcopy`` and pickle give plain dicts all the way down
    (``dict(...)`` and ``.copy()`` a shallow copy, whose nested objects stay read-only), for
    the caller to edit and build a new model from, or for a serialiser that takes exact types
    only (``yaml.safe_dump``)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse_edit
    clear = pop = popitem = setdefault = update = _refuse_edit

    def __reduce__(self):
        return (dict, (dict(self),))

    def to_dict(self) -> dict:
        """A plain, editable copy: dicts and lists all the way down."""
        return copy.deepcopy(self)


class ReadOnlyList(list):
    """A list inside a :class:`ReadOnlyConfig` (e.g. ``labels``): edits raise ``TypeError``."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse_edit
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse_edit

    def __reduce__(self):
        return (list, (list(self),))


def read_only_config(value):
    """``value`` (a JSON value) with every dict and list in it made read-only."""
    if isinstance(value, dict):
        return ReadOnlyConfig({key: read_only_config(item) for key, item in value.items()})
    if isinstance(value, list):
        return ReadOnlyList(read_only_config(item) for item in value)
    return value


class Model:
    """Base of the engine models: config, weights, tokenizer.

    Parameters
    ----------
    config : mapping
        A ``config.json`` dict (``docs/FORMAT.md``); copied. ``model.config`` is a read-only
        dict (:class:`ReadOnlyConfig`; ``model.config.to_dict()`` is a plain copy): to change
        an entry, build a new model, ``type(model)({**model.config, key: value},
        model.weights, model.tokenizer, weight_dtype=model.weight_dtype)``.
    weights : mapping name -> array
        Exactly the names and shapes of ``attncore.io.weight_spec(config)``, any float dtype;
        copied. ``model.weights`` is a read-only mapping of read-only C-contiguous float32
        arrays (a float64 model runs in float32): to change a weight, build a new model,
        ``type(model)(model.config, {**model.weights, name: new_array}, model.tokenizer,
        weight_dtype=model.weight_dtype)`` (without ``weight_dtype`` the new model is float32).
    tokenizer : :class:`attncore.tokenizer.Tokenizer`, optional
    weight_dtype : "float32" (default), "bfloat16" or "int8"
        ``"bfloat16"`` rounds every weight matrix (each tensor of two or more dimensions:
        embeddings, linear and recurrent weights; not biases or norms) to the nearest bfloat16
        (:func:`attncore.kernels.round_bfloat16`) and keeps the weights decoding steps stream
        (``PackedLinearWeight``) in bfloat16: half the bytes per generated token, which is
        what bounds a small batch's decoding speed. Everything still computes in float32 on
        the rounded values: the model is exactly the float32 model of the rounded weights
        (``weights`` then holds those values, and :meth:`save` writes them).
        ``"int8"`` quantizes: every product on a packed weight (all linear and recurrent
        matrices; not embeddings) runs on int8 weights with a scale per output and inputs
        quantized per row on the fly, summed in exact integers (AVX-512 VNNI where the CPU has
        it; elsewhere a portable loop, slower than float32). A quarter of float32's bytes.
        Outputs differ from float32 by the quantization, like CTranslate2's int8; they are
        still deterministic (alone or in a batch, any thread count). ``weights`` keeps the
        float32 values and :meth:`save` writes them.

    Subclasses set :attr:`architecture` and may override :meth:`_prepare`, which derives
    inference-only arrays (transposed / fused weights) once after validation, packing step
    weights in :attr:`weight_dtype`.
    """

    architecture: Optional[str] = None

    def __init__(self, config: Mapping, weights: Mapping[str, np.ndarray], tokenizer=None, *,
                 weight_dtype: str = "float32"):
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a dict of arrays, got {type(weights).__name__}")
        config = copy.deepcopy(dict(config))
        architecture = config.get("architecture")
        if self.architecture is not None and architecture != self.architecture:
            raise ValueError(f"config: {type(self).__name__} needs architecture "
                             f"{self.architecture!r}, got {architecture!r}")
        weight_dtype = check_weight_dtype(weight_dtype)
        spec = io.weight_spec(config)  # ValueError on unknown architecture / bad hyper-parameters
        # read-only like the weights: the model reads most entries once, here, and a few
        # (special ids, vocabulary sizes) at every call, so an edit took effect in part
        self.config = read_only_config(config)
        weights = self._check_weights(spec, weights)
        if weight_dtype == "bfloat16":
            weights = self._rounded_to_bfloat16(weights)
        if weight_dtype == "int8":
            self._check_int8_widths(weights)
        # read-only all the way down: the compiled steps read packed copies of the matrices
        # and the biases, norms and embeddings in place, so an edit took effect in part, and
        # save() or a copy rebuilt from the edited dict a model unlike the one in memory
        self.weights = ReadOnlyWeights({name: read_only_view(array)
                                        for name, array in weights.items()})
        self.weight_dtype = weight_dtype
        if tokenizer is not None and not all(
                callable(getattr(tokenizer, name, None))
                for name in ("encode_source", "decode_target", "config", "files")):
            # (a path or a vocabulary passed here failed later, in translate or save, with an
            # AttributeError)
            raise TypeError(f"tokenizer must be an attncore.tokenizer.Tokenizer or None, got "
                            f"{type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self._prepare()

    def __reduce__(self):
        """Pickled (and deep-copied) as what builds it: the compiled decoding steps hold raw
        pointers into the packed weights, so an unpickled model packs them again."""
        return (_rebuilt_model, (type(self), self.config, dict(self.weights), self.tokenizer,
                                 self.weight_dtype))

    @staticmethod
    def _check_weights(spec, weights) -> dict:
        problems = [f"missing tensor {name!r}" for name in spec if name not in weights]
        problems += [f"unexpected tensor {name!r}" for name in weights if name not in spec]
        stored = {}
        for name in spec.keys() & weights.keys():
            array = np.asarray(weights[name])
            if array.dtype.kind != "f":
                problems.append(f"tensor {name!r} has dtype {array.dtype}, expected a float dtype")
            elif tuple(array.shape) != spec[name][0]:
                problems.append(f"tensor {name!r} has shape {list(array.shape)}, expected "
                                f"{list(spec[name][0])}")
            elif not np.all(np.isfinite(array)):
                problems.append(f"tensor {name!r} holds NaN or infinity")
            else:
                with np.errstate(over="ignore"):   # (checked on the float32 copy below)
                    array = np.array(array, dtype=np.float32, order="C")  # a private copy
                if not np.all(np.isfinite(array)):   # float64 values past float32's range
                    problems.append(f"tensor {name!r} holds values beyond float32's range "
                                    f"(~3.4e38)")
                    continue
                array.flags.writeable = False
                stored[name] = array
        if problems:
            raise ValueError("weights do not match the spec:\n  " + "\n  ".join(sorted(problems)))
        return stored

    @staticmethod
    def _rounded_to_bfloat16(weights: dict) -> dict:
        """``weights`` with every tensor of two or more dimensions rounded to bfloat16."""
        rounded = {}
        for name, array in weights.items():
            if array.ndim >= 2:
                array = round_bfloat16(array)
                if not np.all(np.isfinite(array)):
                    raise ValueError(f"tensor {name!r} holds values beyond bfloat16's range "
                                     f"(~3.39e38): load it with weight_dtype='float32'")
                array.flags.writeable = False
            rounded[name] = array
        return rounded

    @staticmethod
    def _check_int8_widths(weights: dict) -> None:
        """ValueError naming the first matrix wider than int8 packing takes (the packer's own
        error named no tensor). Matrices that stay float32 count too: their width is a model
        dimension some packed matrix shares."""
        from ..kernels._blas import INT8_MAX_IN_FEATURES
        for name, array in sorted(weights.items()):
            if array.ndim == 2 and array.shape[1] > INT8_MAX_IN_FEATURES:
                raise ValueError(f"tensor {name!r} has {array.shape[1]} in_features; int8 "
                                 f"weights take at most {INT8_MAX_IN_FEATURES}: load it with "
                                 f"weight_dtype='float32' or 'bfloat16'")

    def _prepare(self) -> None:
        """Hook: derive inference arrays from ``self.weights`` (called once by ``__init__``)."""

    def default_max_length(self, source_length: int) -> int:
        """The generation limit of a source when the caller gives none: ``2 * its length +
        10`` tokens (models with a position table cap it there)."""
        return _default_limit(source_length)

    def longest_generation(self, source_length: int) -> int:
        """The largest ``max_length`` :meth:`generate` takes for a source of this length
        (:data:`MAX_GENERATION_LENGTH`; a Transformer's position table caps it lower)."""
        return MAX_GENERATION_LENGTH

    def generate_default_lengths(self, sources, **options) -> List["GenerationResult"]:
        """:meth:`generate` with each source's own :meth:`default_max_length`
        (:func:`generate_with_default_lengths`)."""
        return generate_with_default_lengths(self, sources, **options)

    # -- special ids ----------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return int(self.config.get("pad_id", 0))

    @property
    def bos_id(self) -> int:
        return self._target_id("bos_id", 1)

    @property
    def eos_id(self) -> int:
        return self._target_id("eos_id", 2)

    def _target_id(self, key: str, default: int) -> int:
        """A special id of the generated tokens (``config[key]``, else ``default``), checked
        against the output vocabulary: the config check covers the ids a config states, and a
        default outside a tiny vocabulary would index past the embedding table."""
        value = int(self.config.get(key, default))
        vocab = getattr(self, "target_vocab_size", None) or getattr(self, "vocab_size", None)
        if vocab and not 0 <= value < int(vocab):
            given = "" if key in self.config else " (the default: config.json has none)"
            raise ValueError(f"config: {key} {value}{given} lies outside the target vocabulary "
                             f"[0, {int(vocab)})")
        return value

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping, seed: int = 0, tokenizer=None, *,
                    weight_dtype: str = "float32") -> "Model":
        """A model with random weights drawn by the trainer's initialisation (``seed``);
        ``weight_dtype`` as in the constructor."""
        from ..train.export import model_from_config

        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        seed = _check_int(seed, "seed", 0)
        # the values given, checked as a model directory's are (the trainer's arithmetic on a
        # num_heads or hidden_size of 0 was a ZeroDivisionError)
        io.check_config_values(config)
        trainer = model_from_config(dict(config), seed)
        weights = {name: np.asarray(value) for name, value in trainer.state_dict().items()}
        # the config completed with the architecture's defaults, as the trainer reads it: a
        # model directory must state every hyper-parameter (FORMAT.md), so a model made from a
        # partial config is saved (and loaded again) with all of them
        config = {**config, **trainer.config.to_dict()}
        target = cls._class_for(config) if cls.architecture is None else cls
        return target(config, weights, tokenizer=tokenizer, weight_dtype=weight_dtype)

    @classmethod
    def _class_for(cls, config: Mapping):
        from . import model_class  # the architecture registry of attncore.models
        return model_class(config.get("architecture"))

    @classmethod
    def load(cls, path, *, weight_dtype: str = "float32") -> "Model":
        """Read a model directory (``docs/FORMAT.md``); ``Model.load`` picks the class from
        ``config["architecture"]``, a subclass insists on its own architecture.
        ``weight_dtype`` as in the constructor (``"bfloat16"``: faster small-batch decoding on
        weights rounded to bfloat16)."""
        from ..tokenizer import load_tokenizer

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        config, weights = io.load_model_dir(path)
        target = cls._class_for(config) if cls.architecture is None else cls
        tokenizer = load_tokenizer(Path(path), config) if config.get("tokenizer") else None
        return target(config, weights, tokenizer=tokenizer, weight_dtype=weight_dtype)

    def save(self, path) -> Path:
        """Write the model as a model directory (weights cast to ``config["dtype"]``, tokenizer
        files included). Returns the directory."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        spec = io.weight_spec(self.config)
        weights = {name: self.weights[name].astype(dtype) for name, (_, dtype) in spec.items()}
        files = self.tokenizer.files() if self.tokenizer is not None else None
        config = dict(self.config)
        # the entry must describe the files actually written (none without a tokenizer)
        config["tokenizer"] = self.tokenizer.config() if self.tokenizer is not None else None
        return io.save_model_dir(path, config, weights, tokenizer_files=files)

    def __repr__(self) -> str:
        size = sum(w.size for w in self.weights.values())
        dtype = "" if self.weight_dtype == "float32" else f", weight_dtype={self.weight_dtype!r}"
        return f"{type(self).__name__}(architecture={self.config.get('architecture')!r}, " \
               f"parameters={size}{dtype})"


#: the one source of generate_tokens as the batch checks name it
_ONE_SOURCE = re.compile(r"\b(?:sources|prompts)\[0\]")


def _rebuilt_model(cls, config, weights, tokenizer, weight_dtype) -> "Model":
    """:meth:`Model.__reduce__`'s constructor."""
    return cls(config, weights, tokenizer, weight_dtype=weight_dtype)


def continues_prompts(config: Mapping) -> bool:
    """Whether a model of ``config`` continues its inputs (a language model: a decoder-only
    Transformer or a causal RAN with an LM head), so that its text output is what follows
    each prompt."""
    if config.get("architecture") == "ran":
        return bool(config.get("causal", False)) and config.get("token_head", "none") == "lm"
    return config.get("kind") == "decoder_only"


class GenerateTokensMixin:
    """:meth:`generate_tokens` and :meth:`translate` (text in, text out) for a model with
    ``_generation_inputs`` (every generating model)."""

    def generate_tokens(self, source, *, max_length, min_length=0, do_sample=False,
                        temperature=1.0, top_k=0, top_p=1.0, seed=None, no_repeat_ngram_size=0
                        ) -> Iterator[Tuple[int, float]]:
        """Stream one source's (or prompt's) generated tokens as they are chosen.

        Yields ``(token id, log-probability)`` a step, greedy (the default) or sampled
        (``do_sample=True`` with ``temperature``, ``top_k``, ``top_p`` and ``seed`` as in
        :meth:`generate`; ``no_repeat_ngram_size`` too), and stops at EOS (not yielded) or
        after ``max_length`` tokens: the tokens and log-probabilities ``generate([source],
        ...)`` returns with the same
        options, each as soon as its step is done (a service sends it on; a caller that
        stops iterating stops the decoding). Beam search ranks whole hypotheses at the end,
        so it cannot stream. Arguments are checked here, before the first token.
        """
        from .. import generation

        try:
            sources, bos_id, options = self._generation_inputs([source], dict(
                max_length=max_length, min_length=min_length, do_sample=do_sample,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                no_repeat_ngram_size=no_repeat_ngram_size))
        except (TypeError, ValueError) as exc:   # ("sources[0] has token id 99": the source)
            raise type(exc)(_ONE_SOURCE.sub("source", str(exc))) from None
        # a copy: the stream starts at its first next(), and a caller's buffer reused by then
        # (a service's next request) was decoded instead of the source checked here
        return generation.generate_tokens(
            self, sources[0].copy(), bos_id=bos_id, eos_id=self.eos_id,
            **{key: options[key] for key in ("max_length", "min_length", "do_sample",
                                             "temperature", "top_k", "top_p", "seed",
                                             "no_repeat_ngram_size")})

    def translate(self, texts, *, max_length=None, **options) -> List[str]:
        """Text in, text out, through the model's tokenizer.

        Parameters
        ----------
        texts : list of str
        max_length : int, optional
            Default: each text's own ``default_max_length`` (``2 * its length + 10`` tokens),
            or ``min_length + 1`` where that is more (:func:`generate_with_default_lengths`).
        **options : the other :meth:`generate` options

        Returns
        -------
        list of str, the best hypothesis of each text (a language model's -- a decoder-only
        Transformer's or a causal RAN's: the text that follows its prompt,
        :meth:`attncore.tokenizer.Tokenizer.decode_continuation`)
        """
        if self.tokenizer is None:
            raise ValueError("translate needs a tokenizer; this model has none "
                             "(config['tokenizer'] is empty): use generate() with token ids")
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        sources = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            try:
                ids = self.tokenizer.encode_source(text)
            except ValueError as exc:   # (a lone surrogate: not Unicode text)
                raise ValueError(f"texts[{i}]: {exc}") from None
            if len(ids) == 0:
                raise ValueError(f"texts[{i}] is empty (no tokens)")
            sources.append(ids)
        if not sources:
            raise ValueError("texts is an empty batch")
        if max_length is None:
            results = generate_with_default_lengths(self, sources, name="texts", **options)
        else:
            with _named_by_index("texts", range(len(sources))):
                results = self.generate(sources, max_length=max_length, **options)
        if continues_prompts(self.config):
            # what follows each prompt, as `attncore generate` writes it (decoded alone, a BPE
            # continuation lost its word start; a pairs-trained model's target is its own text)
            return [self.tokenizer.decode_continuation(source.tolist(), result.tokens)
                    for source, result in zip(sources, results)]
        return [self.tokenizer.decode_target(result.tokens) for result in results]


class EncoderDecoderModel(GenerateTokensMixin, Model):
    """An encoder-decoder engine model: the decoder protocol of ``docs/ENGINE.md``
    (``_start``, ``_step``, ``state.select``) plus the public :meth:`generate`.

    Subclasses implement ``_start(sources) -> state`` and ``_step(state, tokens) ->
    (log_probs (B, V) float32, attention (B, H, S_max) float32)``, and may override
    :attr:`source_vocab_size`, :attr:`target_vocab_size` and :attr:`max_source_length`.
    """

    @property
    def source_vocab_size(self) -> int:
        return int(self.config["src_vocab_size"])

    @property
    def target_vocab_size(self) -> int:
        return int(self.config["tgt_vocab_size"])

    @property
    def max_source_length(self) -> Optional[int]:
        """Longest source the model accepts (None: unbounded)."""
        return None

    def _start(self, sources: List[np.ndarray]):
        raise NotImplementedError

    def _step(self, state, tokens: np.ndarray):
        raise NotImplementedError

    def generate(self, sources, *, max_length, min_length=0, beam_size=1, num_hypotheses=1,
                 length_penalty=1.0, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, return_attention=False, attention_heads="mean",
                 no_repeat_ngram_size=0) -> List[GenerationResult]:
        """Generate target sequences for a batch of token-id sources.

        Parameters
        ----------
        sources : list of 1-d int sequences (different lengths allowed), ids in [0, V_src),
            as the model saw them in training (attncore's tasks end each source with EOS;
            :meth:`translate` / the tokenizer add it)
        max_length : int >= 1, the most generated tokens (EOS included)
        min_length : int, EOS is forbidden before this many tokens
        beam_size, num_hypotheses : beam search width and the n-best size (<= beam_size)
        length_penalty : float, ``score = log_prob / n ** length_penalty``
        do_sample, temperature, top_k, top_p : sampling (``beam_size`` must be 1; the other
            three need ``do_sample=True`` unless left at their defaults)
        seed : the sampling streams: None (fresh entropy), an int (source i draws from
            ``SeedSequence(seed, spawn_key=(i,))``: its own stream, whatever the other sources
            are and whenever they end) or one seed per source (ints or ``SeedSequence``; source
            i draws from ``default_rng(seed[i])``: the same tokens alone or in any batch)
        return_attention : bool; attention_heads : "mean" or "all"
        no_repeat_ngram_size : int >= 0, no hypothesis repeats an n-gram of this many tokens
            of its decoder sequence (the start token, or a language model's prompt, then the
            generated tokens; EOS is never forbidden by it); 0 (the default): off

        Returns
        -------
        list of :class:`GenerationResult`, one per source, in order
        """
        from .. import generation

        sources, bos_id, options = self._generation_inputs(sources, dict(
            max_length=max_length, min_length=min_length, beam_size=beam_size,
            num_hypotheses=num_hypotheses, length_penalty=length_penalty, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            return_attention=return_attention, attention_heads=attention_heads,
            no_repeat_ngram_size=no_repeat_ngram_size))
        return generation.generate(self, sources, bos_id=bos_id, eos_id=self.eos_id, **options)

    def _generation_inputs(self, sources, options: dict):
        """``(sources, bos_id, options)`` checked for a search: what :meth:`generate` and
        :meth:`generate_tokens` run (a decoder-only model's ``bos_id`` is None)."""
        options = check_generation_options(**options)
        sources = check_sources(sources, self.source_vocab_size, self.max_source_length)
        return sources, self.bos_id, options
