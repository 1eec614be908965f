# SPDX-License-Identifier: Apache-2.0
"""``Seq2SeqAttention``: the engine twin of :mod:`attncore.train.seq2seq` (GRU/LSTM
encoder-decoder with Bahdanau or Luong attention), on the kernels.

It reproduces the trainer's equations exactly (see that module's docstring):

* Encoder: embedding -> stacked GRU/LSTM over the padded batch (B, S_max). With
  ``packed_source`` a row's state stops changing after its length and its memory rows past the
  length are 0, and the batch is encoded in length groups, each padded to its own longest
  (:func:`~attncore.models.base.length_groups`: the same bits, and one long source no
  longer makes every row scan its length); without it the RNN runs over the padding like the
  trainer (so a source's result then depends on the batch's longest source -- the model's
  own semantics).
  Bidirectional: H/2 units per direction, memory and final states are [forward; backward].
* Bahdanau step: ``q = h_{t-1}`` (top layer), additive scores on keys projected once per
  source, ``h_t = RNN([c ; E[y]], h_{t-1})``, ``logits = W_out h_t + b``.
* Luong step: ``h_t = RNN([E[y] ; h~_{t-1}] or E[y])``, dot / general / concat scores of
  ``h_t``, ``h~_t = tanh(W_c [c ; h_t])``, ``logits = W_out h~_t + b``.

All arrays are float32. The encoder's time scans and the whole decoder step are compiled calls
(:mod:`attncore.kernels._recurrent`) that release the GIL.
"""
from __future__ import annotations

from typing import List

import numpy as np

from .. import kernels as K
from ..kernels import _recurrent
from ..kernels.threads import BLAS_SMALL_GEMM_MACS, kernel_threads
from .base import EncoderDecoderModel, check_rows, check_step_tokens, length_groups

__all__ = ["Seq2SeqAttention", "Seq2SeqState", "EMBEDDING_FOLD_MAX_BYTES"]

_ADDITIVE = ("bahdanau", "luong_concat")

#: Embedding folding: the first RNN layer of the encoder (each direction) and of the decoder
#: multiply the embedding of a token by the embedding's columns of ``W_ih``, and a token's
#: embedding never changes, so the model computes that product (with ``b_ih``) once for every
#: token of the vocabulary at load, a table (vocab, G*H) float32, and its steps read one row
#: of it. The decoder step at batch 1 streams E*G*H fewer weights (a tenth of the step in
#: the bench's 256-wide model), and the encoder's first input projection becomes a gather.
#: A table larger than this many bytes is not made (that layer multiplies as before); 0 turns
#: folding off. Results match the unfolded model to float32 rounding: the decoder adds the
#: embedding's part to the other inputs' part instead of running one chain of products (with
#: weight_dtype="int8" the two parts are quantized apart, each with its own scales: the folded
#: and unfolded int8 models differ by quantization, both near the float32 model).
EMBEDDING_FOLD_MAX_BYTES = 64 << 20


class Seq2SeqState:
    """Per-call decoder state (batch B, longest source S, hidden H, additive width A, L layers).

    Attributes
    ----------
    memory : float32 (B, S, H), encoder outputs
    keys : float32 (B, S, A), ``memory W_k^T`` (additive scores), else an empty (B, S, 0)
    key_factors, key_in_limit : float32 (B, S, A) and bool (B, S), the keys' split-tanh factors
        (:class:`attncore.AdditiveKeys`: every step's additive scores take the split), or None
    lengths : int64 (B,), source lengths
    hidden : float32 (L, B, H), the decoder RNN's h per layer
    cells : float32 (L, B, H), the LSTM's c per layer (GRU: an unused (L, B, H) array)
    feed : float32 (B, H), h~ of the previous step (Luong; zeros before the first step)
    sources : int64 (B,), the source each row decodes (rows of one source share their memory)

    The compiled step writes ``hidden``, ``cells`` and ``feed`` in place, so :meth:`select`
    always copies them; ``memory``/``keys`` are only read and may be shared.
    """

    __slots__ = ("memory", "keys", "key_factors", "key_in_limit", "lengths", "hidden", "cells",
                 "feed", "sources", "_scratch")

    def __init__(self, memory, keys, lengths, hidden, cells, feed, key_factors=None,
                 key_in_limit=None, sources=None):
        self.memory, self.keys, self.lengths = memory, keys, lengths
        self.key_factors, self.key_in_limit = key_factors, key_in_limit
        self.hidden, self.cells, self.feed = hidden, cells, feed
        self.sources = np.arange(memory.shape[0]) if sources is None else sources
        self._scratch = None

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    def select(self, rows) -> "Seq2SeqState":
        """A new state of the given rows (int, may repeat / reorder / drop)."""
        rows = check_rows(rows, self.batch_size)
        copy = lambda a: np.ascontiguousarray(a[:, rows])  # noqa: E731  (fancy index: a copy)
        sources = self.sources[rows]
        if np.array_equal(sources, self.sources):
            # every row still decodes the source it did (a beam search reordering the beams of
            # each source): the memory rows are the same, share them
            return Seq2SeqState(self.memory, self.keys, self.lengths, copy(self.hidden),
                                copy(self.cells), np.ascontiguousarray(self.feed[rows]),
                                self.key_factors, self.key_in_limit, self.sources)
        lengths = self.lengths[rows]
        width = int(lengths.max()) if rows.size else 0  # drop padding no row needs any more
        cut = lambda a: None if a is None else np.ascontiguousarray(a[rows, :width])  # noqa: E731
        return Seq2SeqState(cut(self.memory), cut(self.keys), lengths, copy(self.hidden),
                            copy(self.cells), np.ascontiguousarray(self.feed[rows]),
                            cut(self.key_factors), cut(self.key_in_limit), sources)

    def scratch(self, floats_per_row: int) -> np.ndarray:
        """The step's work buffer (allocated once per state and batch size)."""
        size = self.batch_size * floats_per_row
        if self._scratch is None or self._scratch.shape[0] != size:
            self._scratch = np.empty(size, dtype=np.float32)
        return self._scratch


class Seq2SeqAttention(EncoderDecoderModel):
    """GRU/LSTM encoder-decoder with attention (``architecture = "seq2seq_attention"``).

    Build with :meth:`load`, :meth:`from_config` or ``Seq2SeqAttention(config, weights)``;
    decode with :meth:`generate` / :meth:`translate`.
    """

    architecture = "seq2seq_attention"

    # -- derived weights --------------------------------------------------------------------
    def _prepare(self) -> None:
        config, w = self.config, self.weights
        self.cell = config["rnn_type"]
        self.kind = config["attention"]
        self.hidden_size = int(config["hidden_size"])
        self.num_layers = int(config["num_layers"])
        self.directions = 2 if config["bidirectional"] else 1
        self.packed = bool(config["packed_source"])
        self.input_feeding = bool(config["input_feeding"]) and self.kind != "bahdanau"

        def rnn(prefix, suffix):
            return tuple(w[f"{prefix}.{part}{suffix}"]
                         for part in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))

        def packed(weights):  # packed once: the time scan's steps and the input projection
            w_ih, b_ih, w_hh, b_hh = weights  # of every step at once (no BLAS re-packing)
            return (K.PackedLinearWeight(w_ih, self.weight_dtype), b_ih,
                    K.PackedLinearWeight(w_hh, self.weight_dtype), b_hh)

        self.encoder_layers = [[packed(rnn("encoder.rnn", s)) for s in
                                [f"_l{k}", f"_l{k}_reverse"][:self.directions]]
                               for k in range(self.num_layers)]
        self.decoder_layers = [rnn("decoder.rnn", f"_l{k}") for k in range(self.num_layers)]
        self.src_embedding = w["encoder.embedding.weight"]
        self.tgt_embedding = w["decoder.embedding.weight"]
        # embedding folding (EMBEDDING_FOLD_MAX_BYTES): the encoder's first input projection
        # of every source token, per direction, computed by the same product a call would run
        gates = 4 if self.cell == "lstm" else 3
        self.src_input_tables = None
        if _fits_fold(self.src_embedding.shape[0], gates * self.hidden_size // self.directions):
            self.src_input_tables = [_frozen(K.linear(self.src_embedding, w_ih, b_ih))
                                     for w_ih, b_ih, _, _ in self.encoder_layers[0]]
        self.out_weight, self.out_bias = w["decoder.output.weight"], w["decoder.output.bias"]
        prefix = "decoder.attention."
        if self.kind in _ADDITIVE:  # keys are projected once per source, by project_keys
            self.w_key = _frozen(w[prefix + "key.weight"].T)
        # the whole decoder step as one compiled call (attncore.kernels._recurrent)
        get = lambda name: w.get(prefix + name)  # noqa: E731
        self._decoder_step = _recurrent.DecoderStep(
            self.kind, self.cell == "lstm", self.input_feeding, self.tgt_embedding,
            [layer[0] for layer in self.decoder_layers], [layer[2] for layer in self.decoder_layers],
            [layer[1] for layer in self.decoder_layers], [layer[3] for layer in self.decoder_layers],
            get("query.weight"), get("score.weight"), get("linear_in.weight"),
            get("output.weight"), self.out_weight, self.out_bias, BLAS_SMALL_GEMM_MACS,
            self.weight_dtype,
            fold_embedding=_fits_fold(self.tgt_embedding.shape[0], gates * self.hidden_size))

    # -- encoder ----------------------------------------------------------------------------
    def _start(self, sources: List[np.ndarray]) -> Seq2SeqState:
        """Encode validated int64 sources; the initial decoder state (docs/ENGINE.md)."""
        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        batch, steps = len(sources), int(lengths.max())
        groups = length_groups(lengths) if self.packed else [np.arange(batch)]
        if len(groups) == 1:
            memory, hidden, cells = self._encode_padded(sources)
            keys = self._projected_keys(memory)
        else:   # each group padded to its own longest, its rows placed in the batch's arrays
            memory = np.zeros((batch, steps, self.hidden_size), dtype=np.float32)
            hidden = np.empty((len(self.encoder_layers), batch, self.hidden_size), np.float32)
            cells = np.empty_like(hidden)
            # (past a source's length: the keys of a zero memory row, as one padded batch has)
            keys = [None if part is None else np.repeat(np.repeat(part, batch, 0), steps, 1)
                    for part in self._projected_keys(memory[:1, :1])]
            for rows in groups:
                m, h, c = self._encode_padded([sources[r] for r in rows])
                memory[rows, :m.shape[1]] = m
                hidden[:, rows], cells[:, rows] = h, c
                for whole, part in zip(keys, self._projected_keys(m)):
                    if part is not None:
                        whole[rows, :m.shape[1]] = part
        feed = np.zeros((batch, self.hidden_size), dtype=np.float32)
        return Seq2SeqState(memory, keys[0], lengths, hidden, cells, feed, keys[1], keys[2])

    def _projected_keys(self, memory: np.ndarray):
        """The additive keys of ``memory`` (n, S, H), projected once per source with the
        split tanh's factors for every step: (projected float32 (n, S, A), factors float32
        (n, S, A) or None, in_limit uint8 (n, S) or None); (n, S, 0), None, None without
        additive scores."""
        if self.kind not in _ADDITIVE:
            return np.zeros(memory.shape[:2] + (0,), dtype=np.float32), None, None
        keys = K.AdditiveKeys.project(memory, self.w_key)
        if keys.factors is None:
            return keys.projected, None, None
        return keys.projected, keys.factors, keys.in_limit.view(np.uint8)

    def _encode_padded(self, sources: List[np.ndarray]):
        """The encoder over ``sources`` padded to their longest (S): memory float32 (n, S, H)
        and the final h and c of each layer, float32 (L, n, H) each (the decoder's start)."""
        lengths = np.array([len(s) for s in sources], dtype=np.int64)
        batch, steps = len(sources), int(lengths.max())
        ids = np.full((batch, steps), self.pad_id, dtype=np.int64)
        for row, source in enumerate(sources):
            ids[row, :len(source)] = source
        tables = self.src_input_tables
        layer_input = None if tables else K.embedding(self.src_embedding, ids)  # (B, S, E)
        hidden, cells = [], []
        for layer, directions in enumerate(self.encoder_layers):
            outputs, finals = [], []
            for direction, weights in enumerate(directions):
                w_ih, b_ih = weights[0], weights[1]
                projected = (K.embedding(tables[direction], ids) if layer == 0 and tables
                             else K.linear(layer_input, w_ih, b_ih))     # (B, S, G*Hd)
                out, final = self._encode_direction(projected, lengths, weights, direction == 1)
                outputs.append(out)
                finals.append(final)
            layer_input = outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=2)
            # the decoder layer starts from [forward; backward] of the same encoder layer
            hidden.append(np.concatenate([f[0] for f in finals], axis=1))
            cells.append(np.concatenate([f[1] for f in finals], axis=1))
        memory = np.ascontiguousarray(layer_input, dtype=np.float32)   # (B, S, H)
        return memory, np.stack(hidden), np.stack(cells)

    def _encode_direction(self, projected, lengths, weights, reverse):
        """One direction of one encoder layer: the compiled time scan over ``projected``
        (B, S, G*Hd), every step's input projection ``x W_ih^T + b_ih`` (computed at once).

        Returns outputs (B, S, Hd) (0 on padded steps when packed) and the final (h, c).
        """
        _, _, w_hh, b_hh = weights
        batch, steps = projected.shape[0], projected.shape[1]
        units = w_hh.shape[1]
        h = np.zeros((batch, units), dtype=np.float32)
        c = np.zeros((batch, units), dtype=np.float32)
        outputs = np.empty((batch, steps, units), dtype=np.float32)
        _recurrent.rnn_scan(projected, w_hh.panels, b_hh, lengths, self.packed, reverse,
                            self.cell == "lstm", h, c, outputs, BLAS_SMALL_GEMM_MACS,
                            kernel_threads())
        return outputs, (h, c)

    # -- one decoder step -------------------------------------------------------------------
    def _step(self, state: Seq2SeqState, tokens: np.ndarray):
        """Advance ``state`` in place by the previous target tokens (B,) int64: one compiled
        call (embedding, attention, RNN stack, output layer, log-softmax) without the GIL.

        Returns float32 log_probs (B, V_tgt) and attention weights (B, 1, S).
        """
        step = self._decoder_step
        batch, steps = state.memory.shape[0], state.memory.shape[1]
        tokens = check_step_tokens(tokens, batch, step.vocab)   # (ids index the embedding)
        log_probs = np.empty((batch, step.vocab), dtype=np.float32)
        weights = np.empty((batch, steps), dtype=np.float32)
        step.step(tokens, state.hidden, state.cells,
                  state.feed, state.memory, state.keys, state.key_factors, state.key_in_limit,
                  state.lengths, log_probs, weights,
                  state.scratch(step.scratch_width), kernel_threads())
        return log_probs, weights[:, None, :]

    def _greedy(self, state: Seq2SeqState, tokens: np.ndarray, *, max_length: int,
                min_length: int, eos_id: int, return_attention: bool):
        """Greedy search from ``state`` (consumed) and the first tokens (B,) int64, every step
        in one compiled call without the GIL (``DecoderStep.greedy``): what
        :func:`attncore.generation.greedy_search` computes step by step, bit for bit.

        Returns tokens (B, max_length) int64 (row b's first counts[b] are its output, EOS
        excluded), counts (B,) int64, ended (B,) bool, log_prob (B,) float64 and, if asked,
        attention (B, max_length, 1, S) float32 (row b's first counts[b] + ended[b] steps).
        """
        batch, steps = state.memory.shape[0], state.memory.shape[1]
        # the search writes the state's arrays: a copy only of those that are read-only
        # (AdditiveKeys' projected keys and factors) or not C-contiguous
        own = lambda a: None if a is None else np.require(a, requirements=["C", "W"])  # noqa: E731
        out_tokens = np.empty((batch, max_length), dtype=np.int64)
        counts = np.zeros(batch, dtype=np.int64)
        ended = np.zeros(batch, dtype=np.uint8)
        log_prob = np.zeros(batch, dtype=np.float64)
        attention = (np.empty((batch, max_length, steps), dtype=np.float32)
                     if return_attention else None)
        self._decoder_step.greedy(
            np.ascontiguousarray(tokens, dtype=np.int64), own(state.hidden), own(state.cells),
            own(state.feed), own(state.memory), own(state.keys), own(state.key_factors),
            own(state.key_in_limit), own(state.lengths), max_length, min_length, eos_id,
            out_tokens, counts, ended, log_prob, attention, kernel_threads())
        if attention is not None:
            attention = attention[:, :, None, :]
        return out_tokens, counts, ended.astype(bool), log_prob, attention


def _fits_fold(vocab: int, gates: int) -> bool:
    """Whether a folded embedding table (vocab, gates) float32 is within
    EMBEDDING_FOLD_MAX_BYTES (read at load, so it can be changed before a model is built)."""
    return 0 < vocab * gates * 4 <= EMBEDDING_FOLD_MAX_BYTES


def _frozen(array) -> np.ndarray:
    out = np.ascontiguousarray(array, dtype=np.float32)
    out.flags.writeable = False
    return out
