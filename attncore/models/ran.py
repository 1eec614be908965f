# SPDX-License-Identifier: Apache-2.0
"""The RAN (Recurrent Attention Network) engine: the trainer's RAN on the kernels.

Semantics are those of :mod:`attncore.train.ran` (V3 of the official ``rannet``, per-document
padding, the causal summary-slot variant, the document and token heads); ``docs/RAN_MODEL.md``
lists where they differ from the released code. This module only changes *how* it is computed.

How one layer is computed
-------------------------
The work of a layer splits into a cheap sequential recurrence and bulk work around it.
A token row of window k has ``Z = LN_concat(x)`` and swish projections that do not depend on
the carried cell, so the projections of all token rows are computed in large GEMMs, block by
block. Windows are laid out *padded*, one row per slot::

    row 0          the GPC (cell) of the window        RoPE position 0 (identity)
    rows 1..w      the window's tokens                 RoPE positions 1..w
    row 1+w        the summary slot (causal only)      RoPE position w+1
    (rows up to R = 1 + W_max (+1) are padding, excluded through ``kv_lengths``)

so one ``rotary`` call with positions ``0..R-1`` gives every row its position, the summary
slot included. The sequential loop over windows then only computes what the next window
needs: the cell row's key/value (written into row 0 of the window's K/V) and one query row
(the cell row, or the summary row when causal) attended over the window, which yields g_k and
the next cell. Finally all token rows of a block attend at once: one batched ``attention``
call over (windows, heads, R, head_size) with ``kv_lengths`` (and the causal mask, whose
bottom-right alignment with q_len = kv_len is exactly "row i sees keys 0..i": a token sees the
cell and earlier tokens, never the summary slot that sits after the window's last token).

Windows of all documents run in lockstep, step-major (step k = window k of every document
that has one), so the windows of one step are contiguous and the recurrence of a step is a
handful of small batched kernel calls.

The memory review attends from token rows to the window GPCs with the fused attention kernel
(bidirectional: one call per document over all its windows; causal: one call per window over
the prefix ``[c_0, g_1 .. g_{k-1}]``). Nothing of size T x T or T x n is ever formed: working
memory is O(block x R x H x d) plus O(T x D) for the layer's input and output and O(n x D)
for the GPCs. Time is O(T x W) for the windows plus O(T x n x D) for the memory review, which
is the model's own cost (RAN.md §2.15).

State across calls
------------------
``encode(chunk, state)`` continues documents:

* **causal models** continue exactly: the state holds, per layer, the carried cell, the
  previous raw g, the projected memory-review keys/values of the finished windows and the
  ids of the unfinished window. A document fed in chunks of any sizes gives the outputs of
  one call (up to float rounding), its pooled vector and history included: the last,
  unfinished window of a call is computed as the end of the document but not committed.
* **bidirectional models** cannot continue exactly (every token's memory review reads every
  window of the document, and windows depend on the total length). Their state is the
  official ``history``: the last layer's last cell, used as layer 0's initial cell of the
  next chunk (all-zero rows mean none), which is ``rannet``'s ``Input-Cell`` approximation.

Every document of a call needs at least one token (a continued one: at least one new token).
States are immutable and their arrays read-only, so ``RANState.select`` (beams) shares them.

Generation
----------
A causal model with ``token_head="lm"`` implements the decoder protocol of ``docs/ENGINE.md``
(``_start`` prefills the prompts, ``_step`` feeds one token per row through the state), so
``RAN.generate`` offers greedy search, beam search and sampling. A token inside its window
runs through the layers and the LM head as two compiled calls with the GIL released
(:class:`attncore.kernels._ran.RANStep`); so does one that completes its window, which is then
committed from the window's cached keys and values: per layer the summary slot's one query row
and the cell recurrence, not the W token rows again.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .. import kernels as K
from ..kernels import _ran
from ..kernels.attention import flash_plan, sequence_attention
from ..kernels.threads import BLAS_SMALL_GEMM_MACS, kernel_threads
from ..io import MAX_SIZE
from ..train.ran_ops import partition_windows
from .base import (GenerateTokensMixin, GenerationResult, Model, _check_int, check_finite,
                   check_generation_options, check_rows, check_sources, check_step_tokens,
                   gather_cache_prefix, grow_cache)

__all__ = ["RAN", "RANEncoding", "RANState", "RANDecoderState"]

LN_EPS = 1e-7          # langml LayerNorm epsilon (RAN.md §2.3)
ROTARY_BASE = 10000.0  # RoPE base of the window attention
BLOCK_ROWS = 8192      # padded window rows (windows x R) whose projections are held at once


# ------------------------------------------------------------------------------------------
# Row primitives on the kernels
# ------------------------------------------------------------------------------------------

def _ln(x: np.ndarray, norm: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """langml LayerNorm (uncentred second moment) of x (..., D)."""
    return K.layer_norm(x, norm[0], norm[1], LN_EPS, mode="uncentred")


def _stdnorm(x: np.ndarray) -> np.ndarray:
    """RAN's parameter-free ``standard_normalize`` of x (..., D)."""
    return K.layer_norm(x, None, None, LN_EPS, mode="uncentred")


def _swish_linear(x: np.ndarray, dense: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """swish(x W^T + b): x (..., in) -> (..., out)."""
    return K.swish(K.linear(x, dense[0], dense[1]))


def _glu(x: np.ndarray, fused: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(x W_t^T + b_t) * sigmoid(x W_g^T + b_g), with [W_t; W_g] fused into one (2D, D) GEMM."""
    h = K.linear(x, fused[0], fused[1])
    half = h.shape[-1] // 2
    return h[..., :half] * K.sigmoid(h[..., half:])


# ------------------------------------------------------------------------------------------
# Results and state
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RANEncoding:
    """What :meth:`RAN.encode` returns besides the state.

    Attributes
    ----------
    sequence : list of float32 (n_b, D)
        Last layer's outputs for the tokens of this call, one array per document.
    pooled : float32 (B, D)
        Last layer's pooled GPC (``cell_pooling``): the document vector the classifier reads.
        A causal model pools over the document so far; a bidirectional one over this call's
        windows (its state carries the history cell only: earlier chunks reach this vector
        through it).
    history : float32 (B, D)
        Last layer's last carried cell (the official ``return_history``).
    """

    sequence: List[np.ndarray]
    pooled: np.ndarray
    history: np.ndarray


@dataclass(frozen=True)
class _LayerCarry:
    """One layer's carried state for one document of a causal model (arrays read-only).

    cell (D,): incoming cell of the next window. g_prev (D,) or None: raw g of the last
    finished window (None before the first). memory_keys / memory_values (1 + windows, D):
    swish-projected memory-review keys/values of [c_0, g_1 .. g_windows] (None without memory
    review). g_sum (D,) float64 and g_max (D,): running sum / max of the finished windows' g.
    """

    cell: np.ndarray
    g_prev: Optional[np.ndarray]
    memory_keys: Optional[np.ndarray]
    memory_values: Optional[np.ndarray]
    g_sum: np.ndarray
    g_max: np.ndarray

    def __setstate__(self, state):
        _set_read_only(self, state)


@dataclass(frozen=True)
class RANState:
    """State carried from one :meth:`RAN.encode` call to the next (immutable: a call returns a
    new state, so one state may be continued several ways).

    Attributes
    ----------
    causal : bool
        True: exact continuation (see the module docstring); False: official history only.
    window_size : int
        W of the calls that built it. A causal continuation must use the same (and keeps it
        when the call gives none); a bidirectional state carries only ``history``, so its next
        call may use another W.
    tokens : tuple of int
        Tokens seen so far per document.
    history : float32 (B, D)
        Last layer's last cell (bidirectional: layer 0's initial cell of the next call).
    windows : tuple of int
        Causal: finished windows per document.
    pending : tuple of int64 arrays
        Causal: ids of each document's unfinished window (fewer than W).
    layers : tuple (per document) of tuples (per layer) of :class:`_LayerCarry`
        Causal only.
    model : str
        Causal: the fingerprint of the model that made it (its config and weights): another
        model's state, whatever its shapes, is refused rather than continued.
    """

    causal: bool
    window_size: int
    tokens: Tuple[int, ...]
    history: np.ndarray
    windows: Tuple[int, ...] = ()
    pending: Tuple[np.ndarray, ...] = ()
    layers: Tuple[Tuple[_LayerCarry, ...], ...] = field(default=(), repr=False)
    model: str = ""

    def __setstate__(self, state):
        _set_read_only(self, state)

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    def select(self, rows) -> "RANState":
        """The state of documents ``rows`` (int, may repeat, drop or reorder): beams of a
        search share their carried arrays, which are read-only, so nothing is copied."""
        rows = check_rows(rows, self.batch_size)

        def pick(items):
            return tuple(items[r] for r in rows) if items else items

        return RANState(self.causal, self.window_size, pick(self.tokens),
                        _frozen(self.history[rows]), pick(self.windows), pick(self.pending),
                        pick(self.layers), self.model)

    @classmethod
    def from_history(cls, history) -> "RANState":
        """A bidirectional state from history cells float (B, D), e.g. the official
        ``return_history`` of another run (rows of zeros mean none)."""
        history = np.asarray(history)
        if history.ndim != 2 or history.dtype.kind != "f":
            raise ValueError(f"history must be a 2-d float array (B, D), got {history.dtype} "
                             f"{history.shape}")
        return cls(False, 0, (0,) * len(history), _frozen(history.astype(np.float32)))


class _WindowCache:
    """Every layer's keys and values of each row's unfinished window, so that a decoding step
    computes only its new token's row (the window's earlier rows are the same at every step).

    Attributes
    ----------
    keys, values : list (per layer) of float32 (B, H, capacity, d)
        Row 0: the incoming cell's key/value (no rotation; a window without tokens yet gets
        it at its first step, :meth:`RAN._start_windows`); rows 1..n: the window's n tokens
        (n = the row's pending and fed tokens, :meth:`RANDecoderState.tokens_held`), rotated at
        their positions; later rows unused (``kv_lengths`` leaves them out). The capacity
        follows the rows held (doubling, at most 1 + W), not the window size: sized by W, a
        cache of 8 beams at W = 16384 held 1 GiB from the start, copied by each ``select``.
    window : int, W
    """

    __slots__ = ("keys", "values", "window")

    def __init__(self, keys: List[np.ndarray], values: List[np.ndarray], window: int):
        self.keys, self.values, self.window = keys, values, window

    @staticmethod
    def capacity_for(rows: int, window: int) -> int:
        """The capacity that holds ``rows`` rows: a power of two (at least 8), at most 1 + W."""
        return min(1 + window, max(8, 1 << (max(rows, 1) - 1).bit_length()))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, rows: int, held: int) -> None:
        """Room for ``rows`` rows a window; ``held``: the rows in use, which are kept."""
        if rows > self.capacity:   # (both lists made, then both set: an interrupt in
            # between once left keys grown and values not, and every retried step failed)
            capacity = self.capacity_for(max(rows, 2 * self.capacity), self.window)
            keys = [grow_cache(k, capacity, held) for k in self.keys]
            values = [grow_cache(v, capacity, held) for v in self.values]
            self.keys, self.values = keys, values

    def select(self, rows: np.ndarray, held: int) -> "_WindowCache":
        """The cache of ``rows`` (copies of their first ``held`` rows)."""
        return _WindowCache([gather_cache_prefix(k, rows, held) for k in self.keys],
                            [gather_cache_prefix(v, rows, held) for v in self.values],
                            self.window)


class RANDecoderState:
    """Decoding state of a causal RAN language model (``docs/ENGINE.md`` decoder protocol).

    Attributes
    ----------
    state : RANState, each row's state after the prompt's ``encode`` call or its last
        committed window: the tokens up to the last finished window, then its pending ones
    fed : tuple of int64 arrays, per row the tokens fed since ``state`` (held in ``cache``,
        fewer than a window)
    cache : _WindowCache of the rows' unfinished windows
    pending : float32 (B, V) or None: the prompt's next-token log-probs, returned by the
        first ``_step(state, None)``
    """

    __slots__ = ("state", "fed", "cache", "pending")

    def __init__(self, state: RANState, fed: Tuple[np.ndarray, ...], cache: _WindowCache,
                 pending: Optional[np.ndarray]):
        self.state, self.fed, self.cache, self.pending = state, fed, cache, pending

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def tokens_held(self) -> np.ndarray:
        """int64 (B,): the tokens of each row's unfinished window (pending, then fed); the
        cache holds 1 + that many rows of each (row 0 of a window with no token yet is
        written at its first step)."""
        return np.array([len(p) + len(f) for p, f in zip(self.state.pending, self.fed)],
                        dtype=np.int64)

    def select(self, rows) -> "RANDecoderState":
        """Keep / repeat / reorder rows (beams); carried arrays are shared, the window caches
        copied (the rows in use)."""
        rows = check_rows(rows, self.batch_size)
        held = 1 + int(self.tokens_held()[rows].max()) if len(rows) else 1
        return RANDecoderState(self.state.select(rows), tuple(self.fed[r] for r in rows),
                               self.cache.select(rows, held),
                               None if self.pending is None else self.pending[rows])


def _pooled_sums(g_sum: np.ndarray, g_max: np.ndarray, g: np.ndarray):
    """The running sum (float64) and max (D,) of a document's finished windows' g, with the
    rows ``g`` (n, D) of its newly finished windows added."""
    return (g_sum + g.astype(np.float64).sum(axis=0),
            np.max(np.vstack([g_max[None], g]), axis=0))


def _concat_states(first: RANState, second: RANState) -> RANState:
    """The documents of ``first`` then those of ``second`` (two states of one model)."""
    return RANState(first.causal, first.window_size, first.tokens + second.tokens,
                    _frozen(np.concatenate([first.history, second.history])),
                    first.windows + second.windows, first.pending + second.pending,
                    first.layers + second.layers, first.model)


def _set_read_only(obj, state: dict) -> None:
    """A frozen dataclass's ``__setstate__`` (unpickling, ``copy.deepcopy``): its fields from
    ``state``, every array in them read-only again (they came back writeable, and ``select``
    shares carried arrays between beams on the promise that nobody writes them)."""
    def freeze(value):
        if isinstance(value, np.ndarray):
            value.flags.writeable = False   # (fresh copies: the pickle's or deepcopy's own)
        elif isinstance(value, tuple):
            for item in value:
                freeze(item)
    for name, value in state.items():
        freeze(value)
        object.__setattr__(obj, name, value)


#: Memory-review arrays this module made for a state (id -> array): checked finite when made,
#: read-only since, so a continuation need not scan them again (they grow with the document).
_CARRIED_MEMORY: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _carried_memory(array: Optional[np.ndarray], fresh: bool = False) -> Optional[np.ndarray]:
    """A memory-review array for a state, without a copy where none is needed: a state's
    (registered, read-only) array as it is, a ``fresh`` one (made by this call) frozen in
    place, anything else (the model's c_0 row, a caller's array) a private read-only copy.
    (Telling fresh arrays by ``base is None`` had adopted and frozen a caller's array.)"""
    if array is None or _is_carried_memory(array):
        return array
    if fresh and np.isfinite(array).all():
        array.flags.writeable = False
    else:
        array = _frozen(array)
        if not np.isfinite(array).all():
            return array   # (not registered: _check_carry names it when it is read)
    _CARRIED_MEMORY[id(array)] = array
    return array


def _is_carried_memory(array) -> bool:
    return isinstance(array, np.ndarray) and _CARRIED_MEMORY.get(id(array)) is array \
        and not array.flags.writeable


def _frozen(array: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if array is None:
        return None
    array = np.array(array, order="C")  # a private copy: the caller's buffers stay theirs
    array.flags.writeable = False
    return array


# ------------------------------------------------------------------------------------------
# Window plan of one call
# ------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """Where every window of one call sits, step-major (the same for every layer).

    Rows are the flat concatenation of the documents' layer inputs (causal: the unfinished
    window's earlier tokens first, then the new ones).
    """

    lengths: np.ndarray        # (B,) rows per document in this call
    offsets: np.ndarray        # (B+1,) first row of each document
    emit_from: np.ndarray      # (B,) rows already emitted by an earlier call (causal)
    win_doc: np.ndarray        # (nw,) document of each window
    win_row: np.ndarray        # (nw,) flat row of its first token
    win_width: np.ndarray      # (nw,) tokens
    win_global: np.ndarray     # (nw,) window number in its document (earlier calls included)
    win_final: np.ndarray      # (nw,) bool: finished (committed to the state)
    step_bounds: List[int]     # windows of step k: [step_bounds[k], step_bounds[k+1])
    doc_windows: List[np.ndarray]  # per document, its windows in order

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])


def _make_plan(lengths: Sequence[int], done_windows: Sequence[int], pending: Sequence[int],
               window_size: int, min_window_size: int, causal: bool) -> _Plan:
    """The step-major window plan of documents of ``lengths`` rows (see :class:`_Plan`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    bounds = [np.asarray(partition_windows(int(n), window_size, min_window_size,
                                           merge_tail=not causal), dtype=np.int64)
              for n in lengths]
    counts = np.array([len(w) for w in bounds], dtype=np.int64)
    spans = np.concatenate(bounds)                                          # doc-major
    doc = np.repeat(np.arange(len(lengths)), counts)
    step = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.lexsort((doc, step))                                         # step-major
    doc, step, spans = doc[order], step[order], spans[order]
    width = spans[:, 1] - spans[:, 0]
    # Causal: only a full window is final; a shorter last one is redone by the next call.
    final = np.ones(len(doc), dtype=bool) if not causal else width == window_size
    step_bounds = np.searchsorted(step, np.arange(counts.max() + 1)).tolist()
    doc_windows = np.split(np.argsort(doc, kind="stable"), np.cumsum(counts)[:-1])
    return _Plan(lengths, offsets, np.asarray(pending, dtype=np.int64), doc,
                 offsets[doc] + spans[:, 0], width,
                 np.asarray(done_windows, dtype=np.int64)[doc] + step, final, step_bounds,
                 doc_windows)


def _window_blocks(plan: _Plan, causal: bool) -> List[Tuple[int, int]]:
    """Consecutive ranges [lo, hi) of the step-major windows whose padded rows -- windows x
    (1 + the block's widest window + the summary slot) -- stay within BLOCK_ROWS (at least one
    window). A block may end inside a step (a step's windows are independent of each other),
    and pads only to its own widest window: whole steps padded to the plan's widest window
    made 400 one-token documents beside one 256-token one hold 400 x 258 rows (memory grew
    with documents x window, not with tokens)."""
    blocks, lo, widest = [], 0, 0
    for w, width in enumerate(plan.win_width.tolist()):
        widest = max(widest, width)
        if w > lo and (w + 1 - lo) * (1 + widest + causal) > BLOCK_ROWS:
            blocks.append((lo, w))
            lo, widest = w, width
    blocks.append((lo, len(plan.win_width)))
    return blocks


# ------------------------------------------------------------------------------------------
# Weights prepared for the kernels
# ------------------------------------------------------------------------------------------

@dataclass
class _Layer:
    """One RAN layer's weights, fused for the kernels (dense: (weight (out, in), bias))."""

    concat_norm: tuple
    qkv: tuple                  # [W_q; W_k; W_v] (3 H d, D)
    attn_out: tuple
    attn_glu: tuple             # [W_t; W_g] (2D, D)
    attn_norm: tuple
    initial_cell: np.ndarray    # beta of cell_init_norm: c_0 (D,)
    cell_glu: tuple
    cell_norm: tuple
    summary_qkv: Optional[np.ndarray] = None    # swish projections of LN_concat(summary)
                                                # (3 H d,), causal, before RoPE
    summary_glu: Optional[np.ndarray] = None    # GLU_attn(summary_z) (D,)
    review_query: Optional[tuple] = None
    review_kv: Optional[tuple] = None           # [W_k; W_v] (2D, D)
    review_out: Optional[tuple] = None
    review_glu: Optional[tuple] = None
    review_norm: Optional[tuple] = None
    initial_memory: Optional[np.ndarray] = None  # review [key; value] of c_0 (2, D), causal
    output_norm: Optional[tuple] = None          # without memory review


def _fuse(*arrays: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=np.float32)
    out.flags.writeable = False
    return out


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------

class RAN(GenerateTokensMixin, Model):
    """RAN encoder (bidirectional or causal) with its document and token heads, on the kernels.

    Build it with ``RAN(config, weights)``, ``RAN.from_config(config, seed)`` or
    ``attncore.load(path)``; ``config`` is the trainer's RAN ``config.json`` (architecture
    ``"ran"``, ``docs/RAN_MODEL.md``). Official ``rannet`` weights go through
    ``attncore.train.ran.from_rannet_variables`` first.

    Every method takes ``documents``: a list of 1-d integer token-id arrays of any lengths
    (no padding needed; each document gets exactly the result it gets alone), and an
    optional ``state`` from a previous call (see the module docstring), and returns the new
    state last. The window partition may be overridden per call (positions are relative);
    a continued state keeps the window size it was built with.
    """

    architecture = "ran"

    # -- weights --------------------------------------------------------------------------
    def _prepare(self) -> None:
        c, w = self.config, self.weights
        self.embedding_size = int(c["embedding_size"])
        self.vocab_size = int(c["vocab_size"])
        self.num_layers = int(c["ran_layers"])
        self.head_num = int(c["head_num"])
        self.head_size = int(c["head_size"])
        self.window_size = int(c.get("window_size", 16))
        self.min_window_size = int(c.get("min_window_size", 4))
        self.causal = bool(c.get("causal", False))
        self.memory_review = bool(c.get("memory_review", True))
        self.cell_pooling = c.get("cell_pooling", "last")
        self.num_classes = int(c.get("num_classes", 0))
        self.token_head_kind = c.get("token_head", "none")

        def dense(name):
            return (w[f"{name}.weight"], w[f"{name}.bias"])

        # Every matrix a product reads is packed once (PackedLinearWeight): on AVX2 / AVX-512
        # each output row is then one FMA chain whatever the number of rows, so a document
        # gives the same bits alone or inside a batch (plain linear picks its kernel by the
        # row count, which the other documents change).
        def packed(pair):
            return (K.PackedLinearWeight(pair[0], self.weight_dtype), pair[1])

        def linear(name):
            return packed(dense(name))

        def glu(name):
            return packed((_fuse(w[f"{name}.value.weight"], w[f"{name}.gate.weight"]),
                           _fuse(w[f"{name}.value.bias"], w[f"{name}.gate.bias"])))

        self.embedding_norm = dense("embedding_norm")
        self.layers: List[_Layer] = []
        for i in range(self.num_layers):
            p = f"layers.{i}"
            attn = f"{p}.window_attn"
            layer = _Layer(
                concat_norm=dense(f"{p}.concat_norm"),
                qkv=packed((_fuse(*(w[f"{attn}.{x}.weight"] for x in ("query", "key", "value"))),
                            _fuse(*(w[f"{attn}.{x}.bias"] for x in ("query", "key", "value"))))),
                attn_out=linear(f"{attn}.output"), attn_glu=glu(f"{attn}.glu"),
                attn_norm=dense(f"{attn}.norm"),
                initial_cell=w[f"{p}.cell_init_norm.bias"],
                cell_glu=glu(f"{p}.cell_glu"), cell_norm=dense(f"{p}.cell_norm"))
            if self.causal:
                # The summary slot's input is a constant: its LN, projections and GLU residual
                # are computed once here (RoPE, which depends on the window width, is not).
                z = _ln(w[f"{p}.summary"][None], layer.concat_norm)
                layer.summary_qkv = _swish_linear(z, layer.qkv)[0]
                layer.summary_glu = np.ascontiguousarray(_glu(z, layer.attn_glu)[0])
            if self.memory_review:
                review = f"{p}.memory_review"
                layer.review_query = linear(f"{review}.query")
                layer.review_kv = packed((
                    _fuse(w[f"{review}.key.weight"], w[f"{review}.value.weight"]),
                    _fuse(w[f"{review}.key.bias"], w[f"{review}.value.bias"])))
                layer.review_out = linear(f"{review}.output")
                layer.review_glu = glu(f"{review}.glu")
                layer.review_norm = dense(f"{review}.norm")
                if self.causal:
                    kv = _swish_linear(layer.initial_cell[None], layer.review_kv)[0]
                    layer.initial_memory = np.ascontiguousarray(kv.reshape(2, -1))
            else:
                layer.output_norm = dense(f"{p}.output_norm")
            self.layers.append(layer)
        self.classifier = linear("classifier") if self.num_classes else None
        if self.token_head_kind == "lm":
            self.lm_dense, self.lm_norm = linear("lm_head.dense"), dense("lm_head.norm")
            self.lm_bias = w["lm_head.bias"]
            self.lm_output = K.PackedLinearWeight(w["embedding.weight"], self.weight_dtype)
        elif self.token_head_kind == "tag":
            self.tagger = linear("tagger")
        self._decoding_step = (self._compiled_decoding_step()
                               if self.cannot("generate", c) is None else None)

    def _compiled_decoding_step(self) -> "_ran.RANStep":
        """A causal LM's per-token work inside a window, and its LM head, as compiled calls
        (attncore.kernels._ran)."""
        names = ["concat_norm", "qkv", "attn_out", "attn_glu", "attn_norm"] + (
            ["review_query", "review_out", "review_glu", "review_norm"] if self.memory_review
            else ["output_norm"])
        return _ran.RANStep(
            embedding_size=self.embedding_size, head_num=self.head_num,
            head_size=self.head_size, eps=LN_EPS, rotary_base=ROTARY_BASE,
            memory_review=self.memory_review, small_gemm_macs=BLAS_SMALL_GEMM_MACS,
            embedding=self.weights["embedding.weight"], embedding_norm=self.embedding_norm,
            layers=[{name: getattr(layer, name) for name in names} for layer in self.layers],
            lm_dense=self.lm_dense, lm_norm=self.lm_norm, lm_output=self.lm_output,
            lm_bias=self.lm_bias)

    # -- public ---------------------------------------------------------------------------
    def encode(self, documents, state: Optional[RANState] = None, *,
               window_size: Optional[int] = None, min_window_size: Optional[int] = None
               ) -> Tuple[RANEncoding, RANState]:
        """Run the embedding and every RAN layer.

        Parameters
        ----------
        documents : list of 1-d int arrays (B documents, n_b >= 1 tokens each, ids in [0, V))
        state : RANState, optional
            A previous call's state for the same B documents (continues them).
        window_size, min_window_size : int, optional
            Override the configured W and m.

        Returns
        -------
        (RANEncoding, RANState)
        """
        return self._encode(documents, state, window_size, min_window_size)

    def _encode(self, documents, state, window_size, min_window_size, captured=None):
        """:meth:`encode`; ``captured`` (causal): see :meth:`_layer`, one dict per layer."""
        documents = check_sources(documents, self.vocab_size, name="documents")
        window, minimum = self._windows(window_size, min_window_size, state)
        state = self._check_state(state, len(documents), window)
        if self.causal:
            encoding, state = self._encode_causal(documents, state, window, captured)
        else:
            encoding, state = self._encode_bidirectional(documents, state, window, minimum)
        check_finite(encoding.sequence + [encoding.pooled], "encoder outputs")
        return encoding, state

    def classify(self, documents, state: Optional[RANState] = None, **window
                 ) -> Tuple[np.ndarray, RANState]:
        """Document logits float32 (B, num_classes) from the pooled GPC, and the new state."""
        self._check_can("classify")
        encoding, state = self.encode(documents, state, **window)
        return check_finite(K.linear(encoding.pooled, *self.classifier), "class logits"), state

    def token_logits(self, documents, state: Optional[RANState] = None, **window
                     ) -> Tuple[List[np.ndarray], RANState]:
        """Per-token logits of this call's tokens, one float32 (n_b, V) (``token_head="lm"``)
        or (n_b, K) (``"tag"``) array per document, and the new state."""
        if self.token_head_kind == "none":
            raise ValueError("this RAN has no token head (token_head = 'none')")
        encoding, state = self.encode(documents, state, **window)
        sizes = [len(s) for s in encoding.sequence]
        logits = check_finite(self.token_head(np.concatenate(encoding.sequence, axis=0)),
                              "token logits")
        return np.split(logits, np.cumsum(sizes)[:-1]), state

    def token_head(self, sequence: np.ndarray) -> np.ndarray:
        """The token head on encoder outputs (..., D) -> (..., V or K)."""
        if self.token_head_kind == "lm":
            # RanNet MLM/LM head, tied to the token embedding: LN(swish(x W + b)) E^T + b.
            h = _ln(_swish_linear(sequence, self.lm_dense), self.lm_norm)
            return K.linear(h, self.lm_output, self.lm_bias)
        if self.token_head_kind == "tag":
            return K.linear(sequence, *self.tagger)
        raise ValueError("this RAN has no token head (token_head = 'none')")

    # -- generation (causal language models) ----------------------------------------------
    def generate(self, prompts, *, max_length, **options) -> List[GenerationResult]:
        """Continue ``prompts`` (list of 1-d int arrays, used as given) with the causal LM.

        Options as :meth:`attncore.models.EncoderDecoderModel.generate` (greedy, beam search,
        sampling); the first generated token is predicted from the prompt itself. Each step
        feeds one token through the carried state: one row through every layer against its
        window's cached keys and values, O(D^2 + W H d + n D) per token (n windows so far),
        and a full window's commit once every W tokens.
        """
        from .. import generation

        prompts, bos_id, options = self._generation_inputs(prompts, dict(max_length=max_length,
                                                                         **options))
        return generation.generate(self, prompts, bos_id=bos_id, eos_id=self.eos_id, **options)

    def _generation_inputs(self, prompts, options: dict):
        """(prompts, None, options) checked (:meth:`generate`, :meth:`generate_tokens`)."""
        self._check_can("generate")
        options = check_generation_options(**options)
        if options.get("return_attention"):   # (refused at the first step, after the prompts)
            raise ValueError("return_attention: a RAN language model has no cross-attention")
        return check_sources(prompts, self.vocab_size, name="prompts"), None, options

    def _check_can(self, method: str) -> None:
        reason = self.cannot(method, self.config)
        if reason is not None:
            raise ValueError(reason)

    @classmethod
    def cannot(cls, method: str, config) -> Optional[str]:
        """Why a RAN of ``config`` cannot run ``method`` (``"generate"``, ``"classify"``), or
        None: what a batch job checks from the config alone, before any line runs (with
        ``--dask``, before any weights load)."""
        if method == "classify" and not int(config.get("num_classes", 0)):
            return "this RAN has no classifier (num_classes = 0)"
        causal, head = bool(config.get("causal", False)), config.get("token_head", "none")
        if method == "generate" and (not causal or head != "lm"):
            return ("generation needs a causal RAN with token_head='lm' (this one has "
                    f"causal={causal}, token_head={head!r})")
        return None

    def _start(self, sources) -> RANDecoderState:
        """Prefill the prompts; the first ``_step(state, None)`` returns their next-token
        log-probs."""
        self._check_can("generate")
        encoding, state, cache = self._encode_prompts(sources)
        last = np.stack([s[-1] for s in encoding.sequence])
        empty = np.zeros(0, dtype=np.int64)
        return RANDecoderState(state, (empty,) * len(sources), cache,
                               self._next_log_probs(last))

    def _step(self, state: RANDecoderState, tokens):
        """One token per row -> (log_probs float32 (B, V), None).

        Every token is one row through the layers, against its window's cached keys and
        values and the carried memory review; a token that completes its window then commits
        it (:meth:`_commit_windows`). The same bits as one ``encode`` call over each row's
        sequence: every kernel's result for a row depends on that row's inputs only (see
        :func:`sequence_attention`), and the commit runs the kernels of ``encode``'s window
        recurrence.
        """
        if tokens is None:
            if state.pending is None:
                raise ValueError("tokens=None is only valid for the first step after _start")
            log_probs, state.pending = state.pending, None
            return log_probs, None
        tokens = check_step_tokens(tokens, state.batch_size, self.vocab_size)
        state.pending = None
        if state.batch_size == 0:   # (every row has left: nothing to run)
            return self._next_log_probs(np.empty((0, self.embedding_size), np.float32)), None
        held = state.tokens_held()
        every = np.arange(state.batch_size)
        # (a token completing its window is that window's row W, like any other in it)
        out = self._cached_step(state, every, tokens, held)
        full = np.flatnonzero(held + 1 == state.state.window_size)
        fed = [np.append(f, t) for f, t in zip(state.fed, tokens)]
        new_state = state.state
        if len(full):
            committed = self._commit_windows(state, full)
            for r in full:
                fed[r] = np.zeros(0, dtype=np.int64)
            if len(full) == state.batch_size:
                new_state = committed
            else:
                inside = np.flatnonzero(held + 1 < state.state.window_size)
                order = np.argsort(np.concatenate([inside, full]), kind="stable")
                new_state = _concat_states(state.state.select(inside), committed).select(order)
        log_probs = self._next_log_probs(out)
        # The step takes effect here, in one assignment: before it the state is the one the
        # step started from (the new token's cache rows are past what it holds, and row 0 of
        # a window with no token yet, written from the state's carried cell, gets the same
        # values when written again), so an interrupted step can be taken again (the cached
        # rows were once counted ahead of the tokens fed, and the retried step read the
        # wrong keys). A committed row's next window gets its row 0 at its first step.
        state.state, state.fed = new_state, tuple(fed)
        return log_probs, None

    def _commit_windows(self, state: RANDecoderState, rows: np.ndarray) -> RANState:
        """The states of ``rows`` once their full windows (held in the cache, rows 0..W, the
        last token's included) are committed: per layer the summary slot attends over the
        window, which gives g and the next cell, and g joins the memory review and the pooled
        sums. The kernels of the window's recurrence step in ``encode``, in its order, so the
        same bits as one call (each row's result depends on its own inputs only, whatever the
        number of rows), without recomputing the window's W token rows. Writes nothing: the
        caller's assignment makes it take effect."""
        old = state.state.select(rows)
        n, W, H, d, D = (len(rows), old.window_size, self.head_num, self.head_size,
                         self.embedding_size)
        carried = [[None] * self.num_layers for _ in range(n)]
        kv_lengths = np.full(n, W + 2, dtype=np.int64)   # the cell, W tokens, the summary
        for index, layer in enumerate(self.layers):
            before = [old.layers[i][index] for i in range(n)]
            k = np.empty((n, H, W + 2, d), dtype=np.float32)
            v = np.empty_like(k)
            k[:, :, :W + 1] = state.cache.keys[index][rows, :, :W + 1]
            v[:, :, :W + 1] = state.cache.values[index][rows, :, :W + 1]
            summary = layer.summary_qkv.reshape(3, 1, H, 1, d)
            qk = K.rotary(summary[:2], np.array([W + 1]), ROTARY_BASE)     # (2, 1, H, 1, d)
            k[:, :, W + 1], v[:, :, W + 1] = qk[1, 0, :, 0], summary[2, 0, :, 0]
            has_prev = np.array([c.g_prev is not None for c in before])
            g_prev = np.stack([np.zeros_like(c.cell) if c.g_prev is None else c.g_prev
                               for c in before])
            query = np.repeat(qk[0, :, :, 0], n, axis=0)                      # (n, H, d)
            g, cells = self._window_cells(layer, query, k, v, kv_lengths, layer.summary_glu,
                                          g_prev, has_prev)
            review = _swish_linear(g, layer.review_kv) if self.memory_review else None
            for i, c in enumerate(before):
                keys = values = None
                if review is not None:
                    keys = _carried_memory(np.concatenate([c.memory_keys, review[i:i + 1, :D]]),
                                           fresh=True)
                    values = _carried_memory(np.concatenate([c.memory_values,
                                                             review[i:i + 1, D:]]), fresh=True)
                g_sum, g_max = _pooled_sums(c.g_sum, c.g_max, g[i:i + 1])
                carried[i][index] = _LayerCarry(_frozen(cells[i]), _frozen(g[i]), keys, values,
                                                _frozen(g_sum), _frozen(g_max))
        empty = _frozen(np.zeros(0, dtype=np.int64))
        # (history: the last layer's cells)
        return RANState(True, W, tuple(t + len(state.fed[r]) + 1 for t, r in zip(old.tokens, rows)),
                        _frozen(cells), tuple(w + 1 for w in old.windows), (empty,) * n,
                        tuple(tuple(layers) for layers in carried), old.model)

    def _encode_prompts(self, documents):
        """``encode(documents)`` of a causal model, and the window cache of its state: the
        keys and values of each document's unfinished window as the call computed them (a
        document whose windows are all finished gets its row 0 at its first step)."""
        captured = [{} for _ in range(self.num_layers)]
        encoding, state = self._encode(documents, None, None, None, captured)
        batch, H, d, window = len(documents), self.head_num, self.head_size, state.window_size
        held = 1 + max(len(p) for p in state.pending)
        capacity = _WindowCache.capacity_for(held + 1, window)   # (and the next token's row)
        keys, values = [], []
        for index, (layer, windows) in enumerate(zip(self.layers, captured)):
            k = np.zeros((batch, H, capacity, d), dtype=np.float32)
            v = np.zeros_like(k)
            for b, (kb, vb) in windows.items():
                k[b, :, :kb.shape[1]], v[b, :, :vb.shape[1]] = kb, vb   # 1 + pending rows
            keys.append(k)
            values.append(v)
        return encoding, state, _WindowCache(keys, values, window)

    def _cached_step(self, state: RANDecoderState, rows: np.ndarray, tokens: np.ndarray,
                     held: np.ndarray) -> np.ndarray:
        """The last layer's outputs float32 (n, D) of one new token per row of ``rows``, each
        inside its unfinished window of ``held[row]`` tokens (its keys and values written to
        the cache's next row, after row 0 where the window holds no token yet,
        :meth:`_start_windows`): one compiled call (:class:`attncore.kernels._ran.RANStep`,
        the kernels of a window's own call in its order, so the same bits)."""
        cache = state.cache
        position = held[rows] + 1                                              # window row
        cache.reserve(int(position.max()) + 1, 1 + int(held.max()))
        self._start_windows(state, rows[held[rows] == 0])
        memory_keys = memory_values = None
        if self.memory_review:
            carried = [carry for r in rows for carry in state.state.layers[r]]
            memory_keys = [carry.memory_keys for carry in carried]
            memory_values = [carry.memory_values for carry in carried]
        out = np.empty((len(rows), self.embedding_size), dtype=np.float32)
        self._decoding_step.step(
            np.ascontiguousarray(tokens, dtype=np.int64), np.ascontiguousarray(rows, np.int64),
            np.ascontiguousarray(position, np.int64), cache.keys, cache.values, memory_keys,
            memory_values, out, flash_plan(self.head_size, True),
            flash_plan(self.embedding_size, False), kernel_threads())
        return check_finite(out, "encoder outputs")

    def _start_windows(self, state: RANDecoderState, rows: np.ndarray) -> None:
        """Row 0 of the window cache of ``rows``, whose windows hold no token yet: the key and
        value of each row's carried cell (no rotation), as a window's recurrence step computes
        them. Written at the window's first step rather than by the commit before it, so that
        the committing step, interrupted, can be taken again from the window it started in
        (writing them twice writes the same values)."""
        if not len(rows):
            return
        for index, layer in enumerate(self.layers):
            _, p0 = self._cell_rows(layer, np.stack([state.state.layers[r][index].cell
                                                     for r in rows]))
            state.cache.keys[index][rows, :, 0] = p0[:, 1]
            state.cache.values[index][rows, :, 0] = p0[:, 2]

    def _next_log_probs(self, x: np.ndarray) -> np.ndarray:
        """``log_softmax(token_head(x))`` (N, V) of last-layer outputs x (N, D), compiled."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        log_probs = np.empty((len(x), self.vocab_size), dtype=np.float32)
        self._decoding_step.head(x, log_probs, kernel_threads())
        return log_probs

    # -- argument checks ------------------------------------------------------------------
    def _windows(self, window_size, min_window_size, state) -> Tuple[int, int]:
        window = (self.window_size if window_size is None
                  else _check_int(window_size, "window_size", 1))
        minimum = (self.min_window_size if min_window_size is None
                   else _check_int(min_window_size, "min_window_size", 1))
        if self.causal and window_size is None and isinstance(state, RANState):
            window = state.window_size  # a causal continuation keeps its partition
        # the config's bounds (a W of 2**40 kept a causal document pending, re-encoded whole
        # by every later call); a W given alone may be below the configured m (every tail
        # then merges, as in the trainer)
        if window > MAX_SIZE:
            raise ValueError(f"window_size must be <= {MAX_SIZE}, got {window}")
        if min_window_size is not None and minimum > window:
            raise ValueError(f"min_window_size ({minimum}) must be <= window_size ({window})")
        return window, minimum

    def _check_state(self, state, batch: int, window: int) -> Optional[RANState]:
        if state is None:
            return None
        if not isinstance(state, RANState):
            raise TypeError(f"state must be a RANState from a previous call, got "
                            f"{type(state).__name__}")
        if state.causal != self.causal:
            raise ValueError("state was made by a "
                             f"{'causal' if state.causal else 'bidirectional'} RAN; this one is "
                             f"{'causal' if self.causal else 'bidirectional'}")
        if state.batch_size != batch:
            raise ValueError(f"state holds {state.batch_size} documents, documents has {batch}")
        if not isinstance(state.history, np.ndarray) or state.history.dtype.kind != "f":
            raise ValueError("state.history must be a float array (a state returned by "
                             "encode, or RANState.from_history)")
        if state.history.shape != (batch, self.embedding_size):
            raise ValueError(f"state.history must have shape ({batch}, {self.embedding_size}), "
                             f"got {state.history.shape}")
        if not np.all(np.isfinite(state.history)):
            raise ValueError("state.history holds NaN or infinity")
        if self.causal and any(len(layers) != self.num_layers for layers in state.layers):
            raise ValueError(f"state was made by a RAN with another number of layers than "
                             f"this one ({self.num_layers})")
        if self.causal and state.window_size != window:
            raise ValueError(f"window_size must stay {state.window_size} to continue this state, "
                             f"got {window}")
        if self.causal:
            self._check_causal_state(state, batch, window)
        return state

    def _check_causal_state(self, state: RANState, batch: int, window: int) -> None:
        """The carried fields of a causal state, checked before they are read (a state edited
        or made by hand failed with IndexError / AttributeError / NumPy errors, and one from
        another model of the same shapes was continued silently)."""
        if state.model != self._fingerprint():
            raise ValueError("state was made by another RAN model (another config or other "
                             "weights): continue a state with the model that made it")
        counts = {"tokens": state.tokens, "windows": state.windows, "pending": state.pending,
                  "layers": state.layers}
        for name, items in counts.items():
            if not isinstance(items, tuple) or len(items) != batch:
                raise ValueError(f"state.{name} must be a tuple of {batch} entries (one per "
                                 f"document)")
        for tokens, windows, pending in zip(state.tokens, state.windows, state.pending):
            if not isinstance(windows, (int, np.integer)) or windows < 0:
                raise ValueError(f"state.windows must hold counts >= 0, got {windows!r}")
            if not isinstance(pending, np.ndarray) or pending.ndim != 1 or \
                    pending.dtype.kind not in "iu" or len(pending) >= window:
                raise ValueError(f"state.pending must hold 1-d integer arrays of fewer than "
                                 f"{window} ids")
            if len(pending) and (pending.min() < 0 or pending.max() >= self.vocab_size):
                raise ValueError(f"state.pending must hold ids in [0, {self.vocab_size})")
            if tokens != windows * window + len(pending):
                raise ValueError(f"state.tokens ({tokens!r}) must be state.windows x "
                                 f"window_size + the pending ids ({windows} x {window} + "
                                 f"{len(pending)})")
        for windows, layers in zip(state.windows, state.layers):
            if not isinstance(layers, tuple) or not all(isinstance(c, _LayerCarry) for c in layers):
                raise ValueError("state.layers must hold tuples of the layers' carried arrays")
            for carry in layers:
                self._check_carry(carry, int(windows))

    def _check_carry(self, carry: "_LayerCarry", windows: int) -> None:
        """One layer's carried arrays: the shapes the model reads, finite values."""
        d = self.embedding_size

        def check(name, array, shape, allow_minus_inf=False):
            if not isinstance(array, np.ndarray) or array.shape != shape:
                got = array.shape if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"state.layers: {name} must be an array of shape {shape}, "
                                 f"got {got}")
            wanted = np.float64 if name == "g_sum" else np.float32
            if array.dtype != wanted:
                raise ValueError(f"state.layers: {name} must be {np.dtype(wanted)}, got "
                                 f"{array.dtype}")
            bad = np.isnan(array) | (array == np.inf) if allow_minus_inf else ~np.isfinite(array)
            if bad.any():
                raise ValueError(f"state.layers: {name} holds NaN or infinity")

        check("cell", carry.cell, (d,))
        check("g_sum", carry.g_sum, (d,))
        check("g_max", carry.g_max, (d,), allow_minus_inf=windows == 0)  # -inf: no window yet
        if windows == 0:
            if carry.g_prev is not None:
                raise ValueError("state.layers: g_prev must be None before the first window")
        else:
            check("g_prev", carry.g_prev, (d,))
        for name in ("memory_keys", "memory_values"):
            array = getattr(carry, name)
            if self.memory_review:
                if _is_carried_memory(array) and array.shape == (1 + windows, d):
                    continue   # made (and checked) by this module, read-only since
                check(name, array, (1 + windows, d))
            elif array is not None:
                raise ValueError(f"state.layers: {name} must be None without memory review")

    def _fingerprint(self) -> str:
        """A digest of the config and the weights (computed once, on the first causal call)."""
        digest = getattr(self, "_digest", None)
        if digest is None:
            import hashlib
            import json
            # the config without its file-format version (a saved and reloaded copy is the same
            # model), and the weight dtype: int8 keeps model.weights in float32 but computes
            # other values, so its state must not continue a float32 model's (or the reverse)
            config = {k: v for k, v in self.config.items() if k != "format_version"}
            h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
            h.update(self.weight_dtype.encode())
            for name in sorted(self.weights):
                h.update(name.encode())
                h.update(np.ascontiguousarray(self.weights[name]).tobytes())
            digest = self._digest = h.hexdigest()
        return digest

    # -- embedding ------------------------------------------------------------------------
    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """LN_emb(E[ids]): (N,) -> float32 (N, D)."""
        return _ln(K.embedding(self.weights["embedding.weight"], ids), self.embedding_norm)

    # -- bidirectional --------------------------------------------------------------------
    def _encode_bidirectional(self, documents, state, window, minimum):
        batch = len(documents)
        lengths = [len(d) for d in documents]
        plan = _make_plan(lengths, [0] * batch, [0] * batch, window, minimum, causal=False)
        x = self._embed(np.concatenate(documents))
        # V3: layer 0 starts from beta_ci, or from a non-zero history cell as is (per row).
        cell = np.tile(self.layers[0].initial_cell, (batch, 1))
        if state is not None:
            given = np.any(state.history != 0, axis=1)
            cell[given] = state.history[given]
        for layer in self.layers:
            x, cell, g = self._layer(layer, x, plan, cell, None, None)
        pooled = self._pool(plan, g, cell, batch)
        sequence = [x[plan.offsets[b]:plan.offsets[b + 1]] for b in range(batch)]
        tokens = tuple(lengths) if state is None else tuple(
            t + n for t, n in zip(state.tokens, lengths))
        new_state = RANState(False, window, tokens, _frozen(cell))
        return RANEncoding(sequence, pooled, cell), new_state

    def _pool(self, plan: _Plan, g: np.ndarray, cell: np.ndarray, batch: int) -> np.ndarray:
        """Bidirectional pooling of the last layer's g (nw, D) per document -> (B, D)."""
        if self.cell_pooling == "last":
            return cell.copy()
        pooled = np.empty((batch, self.embedding_size), dtype=np.float32)
        for b in range(batch):
            rows = g[plan.doc_windows[b]]
            pooled[b] = rows.mean(axis=0) if self.cell_pooling == "mean" else rows.max(axis=0)
        return pooled

    # -- one layer --------------------------------------------------------------------------
    def _layer(self, layer: _Layer, x: np.ndarray, plan: _Plan, cell: np.ndarray,
               carry: Optional[dict], memory: Optional[list], captured: Optional[dict] = None):
        """Run one RAN layer over every window of the call.

        Parameters
        ----------
        x : float32 (N, D), the layer input rows of all documents (plan.offsets)
        cell : float32 (B, D), each document's incoming cell
        carry : dict or None (causal continuation): ``g_prev`` (B, D), ``has_prev`` (B,) bool;
            updated in place with the committed ``cell``/``g_prev``/``has_prev`` (the values
            after each document's last finished window)
        captured : dict or None (causal): receives, per document with an unfinished window,
            that window's keys and values (H, 1 + w, d) each (row 0 the cell's), for decoding
        memory : causal only, per document a (keys, values) pair (m_b, D) of the committed
            memory review; the new finished windows' entries are appended in place

        Returns
        -------
        out (N, D), final cell (B, D), g (nw, D) raw window cells
        """
        batch, D = cell.shape
        cell = cell.copy()
        if carry is not None:
            g_prev, has_prev = carry["g_prev"].copy(), carry["has_prev"].copy()
        else:
            g_prev = np.zeros_like(cell)
            has_prev = np.zeros(batch, dtype=bool)
        g_all = np.empty((len(plan.win_doc), D), dtype=np.float32)
        y = np.empty((plan.num_rows, D), dtype=np.float32)
        for lo, hi in _window_blocks(plan, self.causal):
            self._window_block(layer, x, plan, lo, hi, cell, g_prev, has_prev, g_all, y, carry,
                               captured)
        if self.memory_review:
            out = self._memory_review(layer, y, g_all, plan, memory)
        else:
            out = _ln(y, layer.output_norm)
        return out, cell, g_all

    def _window_block(self, layer, x, plan, lo, hi, cell, g_prev, has_prev, g_all, y, carry,
                      captured=None):
        """Windows [lo, hi) (step-major; see _window_blocks): project the block's token rows,
        run the recurrence over the steps they belong to, then the token rows' attention;
        writes g_all and y for the block's windows (cell, g_prev, has_prev updated in place).
        Rows are padded to the block's widest window (R; the flash attention's result for a
        row does not depend on R)."""
        H, d = self.head_num, self.head_size
        W = int(plan.win_width[lo:hi].max())
        R = 1 + W + (1 if self.causal else 0)
        HD = H * d
        nb = hi - lo
        width = plan.win_width[lo:hi]
        slots = np.arange(W)
        valid = slots[None, :] < width[:, None]                                # (nb, W)
        rows = (plan.win_row[lo:hi, None] + slots[None, :])[valid]             # token rows
        z = _ln(x[rows], layer.concat_norm)                                    # (n_tok, D)

        # Projections of every token (and summary) row, laid out padded (nb, R, 3HD).
        padded = np.zeros((nb, R, 3 * HD), dtype=np.float32)
        padded[:, 1:1 + W][valid] = _swish_linear(z, layer.qkv)
        if self.causal:
            padded[np.arange(nb), 1 + width] = layer.summary_qkv
        heads = np.ascontiguousarray(
            padded.reshape(nb, R, 3, H, d).transpose(2, 0, 3, 1, 4))           # (3, nb, H, R, d)
        del padded
        qk = K.rotary(heads[:2], np.arange(R, dtype=np.int64), ROTARY_BASE)   # row = position
        q, k, v = qk[0], qk[1], heads[2]
        kv_lengths = 1 + width + (1 if self.causal else 0)

        # The recurrence: one step = the windows [a, b) of all documents that have a step k
        # (the part of it in this block).
        first_step = int(np.searchsorted(plan.step_bounds, lo, side="right")) - 1
        for step in range(first_step, len(plan.step_bounds) - 1):
            if plan.step_bounds[step] >= hi:
                break
            a = max(int(plan.step_bounds[step]), lo) - lo
            b = min(int(plan.step_bounds[step + 1]), hi) - lo
            docs = plan.win_doc[lo + a:lo + b]
            z0, p0 = self._cell_rows(layer, cell[docs])               # (n, D), (n, 3, H, d)
            k[a:b, :, 0] = p0[:, 1]                                            # position 0:
            v[a:b, :, 0] = p0[:, 2]                                            # no rotation
            if self.causal:
                query = q[np.arange(a, b), :, 1 + width[a:b]]                  # summary rows
                residual = layer.summary_glu
            else:
                query = p0[:, 0]                                               # the cell row
                residual = _glu(z0, layer.attn_glu)
            g, new_cell = self._window_cells(layer, query, k[a:b], v[a:b], kv_lengths[a:b],
                                             residual, g_prev[docs], has_prev[docs])
            if carry is not None:
                final = plan.win_final[lo + a:lo + b]
                if (~final).any():  # the unfinished window's effects are not committed
                    carry["cell"][docs[~final]] = cell[docs[~final]]
                    carry["g_prev"][docs[~final]] = g_prev[docs[~final]]
                    carry["has_prev"][docs[~final]] = has_prev[docs[~final]]
                carry["cell"][docs[final]] = new_cell[final]
                carry["g_prev"][docs[final]] = g[final]
                carry["has_prev"][docs[final]] = True
            cell[docs] = new_cell
            g_prev[docs] = g
            has_prev[docs] = True
            g_all[lo + a:lo + b] = g

        if captured is not None:
            for i in np.flatnonzero(~plan.win_final[lo:hi]):
                rows_held = 1 + int(width[i])
                captured[int(plan.win_doc[lo + i])] = (k[i, :, :rows_held].copy(),
                                                       v[i, :, :rows_held].copy())

        # Token rows: all windows of the block in one call (row i sees keys < kv_lengths and,
        # when causal, keys <= i: the cell and earlier tokens, not the summary slot).
        # (flash at every R: R comes from the block's longest window, so split-KV for a short
        # document alone and flash inside a batch would round differently)
        o = sequence_attention(q, k, v, kv_lengths=kv_lengths, causal=self.causal)  # (nb,H,R,d)
        o = o.transpose(0, 2, 1, 3)[:, 1:1 + W].reshape(nb, W, HD)[valid]      # (n_tok, HD)
        h = _swish_linear(o, layer.attn_out) + _glu(z, layer.attn_glu)
        y[rows] = _stdnorm(_ln(h, layer.attn_norm))

    def _cell_rows(self, layer: _Layer, cells: np.ndarray):
        """Row 0 of windows whose incoming cells are ``cells`` float32 (n, D): its
        ``LN_concat`` z (n, D) and swish QKV projections (n, 3, H, d), unrotated (position 0).
        The window recurrence in ``encode`` and a decoding window's first step both take them
        from here, so the decoding cache's row 0 has the bits of one call's."""
        z = _ln(cells, layer.concat_norm)
        return z, _swish_linear(z, layer.qkv).reshape(len(cells), 3, self.head_num,
                                                      self.head_size)

    def _window_cells(self, layer: _Layer, query, k, v, kv_lengths, residual, g_prev,
                      has_prev) -> Tuple[np.ndarray, np.ndarray]:
        """The recurrence step of n windows: ``query`` float32 (n, H, d) (the cell row, or the
        summary row when causal) attends over each window's first ``kv_lengths`` keys/values
        (n, H, R, d); ``residual`` (n, D) or (D,) is added after the output projection. Returns
        the raw g (n, D) and the next cell (n, D): g, or where ``has_prev`` (n,) bool,
        LN_cellres(g + GLU_cell(g_prev)) with the *raw* previous g (V3)."""
        o = K.attention(np.ascontiguousarray(query[:, :, None]), k, v,
                        kv_lengths=kv_lengths)                                 # (n, H, 1, d)
        h = _swish_linear(o.reshape(len(query), -1), layer.attn_out) + residual
        g = _stdnorm(_ln(h, layer.attn_norm))
        cell = g.copy()
        if has_prev.any():
            cell[has_prev] = _ln(g[has_prev] + _glu(g_prev[has_prev], layer.cell_glu),
                                 layer.cell_norm)
        return g, cell

    def _memory_review(self, layer: _Layer, y: np.ndarray, g_all: np.ndarray, plan: _Plan,
                       memory: Optional[list]) -> np.ndarray:
        """Out = LN_mr(swish(attn(Q, G) W_o + b_o) + GLU_mr(Q)), Q = swish(Y W_q + b_q).

        Bidirectional: a document's tokens attend to all its windows' g. Causal: a token of
        window j attends to [c_0, g_1 .. g_{j-1}] (``memory`` holds c_0 and the earlier calls'
        finished windows; this call's finished windows are appended to it). Rows are processed
        in groups of whole windows of about BLOCK_ROWS, so the temporaries stay bounded.
        """
        D = self.embedding_size
        kv = _swish_linear(g_all, layer.review_kv)                             # (nw, 2D)
        out = np.empty_like(y)
        for b in range(len(plan.lengths)):
            windows = plan.doc_windows[b]                                      # in window order
            if memory is None:
                keys, values = kv[windows, :D], kv[windows, D:]
            else:
                old_keys, old_values = memory[b]
                # g_j sits at row 1 + j (row 0 is c_0): window j sees rows 0..j, so the call's
                # last window needs the g of the ones before it, not its own. (A chunk inside
                # one window, a token at a time, then reads the carried arrays as they are:
                # copying them every call cost more than the review's attention.)
                if len(windows) > 1:
                    keys = np.concatenate([old_keys, kv[windows[:-1], :D]])
                    values = np.concatenate([old_values, kv[windows[:-1], D:]])
                else:
                    keys, values = old_keys, old_values
                finished = windows[plan.win_final[windows]]
                if len(finished):
                    memory[b] = (_carried_memory(np.concatenate([old_keys, kv[finished, :D]]),
                                                 fresh=True),
                                 _carried_memory(np.concatenate([old_values, kv[finished, D:]]),
                                                 fresh=True))
            keys = np.ascontiguousarray(keys)[None, None]                      # (1, 1, m, D)
            values = np.ascontiguousarray(values)[None, None]
            group = [windows[0]]
            for w in list(windows[1:]) + [None]:
                rows_in_group = (plan.win_row[group[-1]] + plan.win_width[group[-1]]
                                 - plan.win_row[group[0]])
                if w is not None and rows_in_group + plan.win_width[w] <= BLOCK_ROWS:
                    group.append(w)
                    continue
                self._review_group(layer, y, out, plan, group, keys, values, memory is not None)
                group = [w]
        return out

    def _review_group(self, layer, y, out, plan, group, keys, values, causal) -> None:
        """Memory review of the rows of consecutive windows ``group`` of one document."""
        first = int(plan.win_row[group[0]])
        rows = slice(first, int(plan.win_row[group[-1]] + plan.win_width[group[-1]]))
        query = _swish_linear(y[rows], layer.review_query)                     # (n, D)
        # (flash at every group and window size, scale 1/sqrt(D): the groups follow
        # BLOCK_ROWS, and a causal window cut by a chunk boundary has few rows; split-KV for
        # a few rows rounds differently, so a window continued in a later call or reached in
        # one call would not give the same bits)
        if not causal:
            context = sequence_attention(query[None, None], keys, values, kv_lengths=None,
                                         causal=False)[0, 0]
        else:
            context = np.empty_like(query)
            for w in group:
                part = slice(int(plan.win_row[w]) - first,
                             int(plan.win_row[w] + plan.win_width[w]) - first)
                seen = int(plan.win_global[w]) + 1                             # c_0 .. g_{j-1}
                context[part] = sequence_attention(query[None, None, part], keys[:, :, :seen],
                                                   values[:, :, :seen], kv_lengths=None,
                                                   causal=False)[0, 0]
        h = _swish_linear(context, layer.review_out) + _glu(query, layer.review_glu)
        out[rows] = _ln(h, layer.review_norm)

    # -- causal ---------------------------------------------------------------------------
    def _encode_causal(self, documents, state, window, captured=None):
        batch, L = len(documents), self.num_layers
        if state is None:
            pending = [np.zeros(0, dtype=np.int64)] * batch
            done = [0] * batch
            tokens_before = [0] * batch
        else:
            pending, done = list(state.pending), list(state.windows)
            tokens_before = list(state.tokens)
        ids = [np.concatenate([p.astype(np.int64, copy=False), d])   # (uint64 + int64: float)
               for p, d in zip(pending, documents)]
        plan = _make_plan([len(i) for i in ids], done, [len(p) for p in pending], window,
                          window, causal=True)
        x = self._embed(np.concatenate(ids))
        new_layers = [[None] * L for _ in range(batch)]
        for index, layer in enumerate(self.layers):
            carry, memory = self._carry_in(index, layer, state, batch)
            start_sum, start_max = (carry.pop("g_sum"), carry.pop("g_max"))
            x, cell, g = self._layer(layer, x, plan, carry.pop("start_cell"), carry, memory,
                                     None if captured is None else captured[index])
            for b in range(batch):
                final = plan.doc_windows[b][plan.win_final[plan.doc_windows[b]]]
                g_sum, g_max = _pooled_sums(start_sum[b], start_max[b], g[final])
                keys, values = memory[b] if memory is not None else (None, None)
                new_layers[b][index] = _LayerCarry(
                    _frozen(carry["cell"][b]),
                    _frozen(carry["g_prev"][b]) if carry["has_prev"][b] else None,
                    _carried_memory(keys), _carried_memory(values), _frozen(g_sum),
                    _frozen(g_max))
        pooled = self._pool_causal(plan, g, cell, new_layers, batch)
        sequence = [x[plan.offsets[b] + plan.emit_from[b]:plan.offsets[b + 1]]
                    for b in range(batch)]
        windows = [int(plan.win_final[plan.doc_windows[b]].sum()) + done[b] for b in range(batch)]
        new_pending = tuple(_frozen(i[(w - d) * window:]) for i, w, d in zip(ids, windows, done))
        new_state = RANState(True, window,
                             tuple(t + len(d) for t, d in zip(tokens_before, documents)),
                             _frozen(cell), tuple(windows), new_pending,
                             tuple(tuple(layers) for layers in new_layers), self._fingerprint())
        return RANEncoding(sequence, pooled, cell), new_state

    def _carry_in(self, index: int, layer: _Layer, state: Optional[RANState], batch: int):
        """Per-document carried arrays of layer ``index`` (fresh documents: c_0 = beta_ci)."""
        D = self.embedding_size
        start_cell = np.tile(layer.initial_cell, (batch, 1))
        carry = {"g_prev": np.zeros((batch, D), np.float32), "has_prev": np.zeros(batch, bool),
                 "g_sum": np.zeros((batch, D), np.float64),
                 "g_max": np.full((batch, D), -np.inf, np.float32)}
        memory = None
        if self.memory_review:
            initial = layer.initial_memory
            memory = [(initial[:1], initial[1:]) for _ in range(batch)]
        if state is not None:
            for b in range(batch):
                saved = state.layers[b][index]
                start_cell[b] = saved.cell
                if saved.g_prev is not None:
                    carry["g_prev"][b], carry["has_prev"][b] = saved.g_prev, True
                carry["g_sum"][b], carry["g_max"][b] = saved.g_sum, saved.g_max
                if memory is not None:
                    memory[b] = (saved.memory_keys, saved.memory_values)
        carry["cell"] = start_cell.copy()
        carry["start_cell"] = start_cell
        return carry, memory

    def _pool_causal(self, plan, g, cell, new_layers, batch) -> np.ndarray:
        """Pooled last-layer GPC over the document so far, the unfinished window included."""
        if self.cell_pooling == "last":
            return cell.copy()
        pooled = np.empty((batch, self.embedding_size), dtype=np.float32)
        for b in range(batch):
            saved = new_layers[b][-1]
            mine = plan.doc_windows[b]
            extra = g[mine[~plan.win_final[mine]]]                             # 0 or 1 row
            windows = int(plan.win_global[mine[-1]]) + 1
            if self.cell_pooling == "mean":
                pooled[b] = (saved.g_sum + extra.astype(np.float64).sum(axis=0)) / windows
            else:
                pooled[b] = np.max(np.vstack([saved.g_max[None], extra]), axis=0)
        return pooled
