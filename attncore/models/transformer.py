# SPDX-License-Identifier: Apache-2.0
"""The Transformer engine: encoder–decoder, decoder-only and encoder-only models on the kernels.

Semantics are those of the trainer (:mod:`attncore.train.transformer`, ``torch.nn.Transformer``
names and maths): ``x = E[ids] * (sqrt(d) if scale_embedding) + P[pos]``; post-norm blocks
``x = norm(x + f(x))`` or pre-norm ``x = x + f(norm(x))``; an optional final LayerNorm per
stack; ReLU or exact GELU; logits ``h W_out^T + b`` with ``W_out = E_tgt`` when tied.

What the engine adds over the trainer's recomputing oracle:

* **Fused QKV.** Every attention block holds one (3d, d) matrix ``[W_q; W_k; W_v]`` (built at
  load time when the model stores separate ``{q,k,v}_proj_weight``), so self-attention is one
  ``linear``. Cross-attention uses the row views ``W[:d]`` (queries) and ``W[d:]`` (keys and
  values, projected **once per source** in :meth:`Transformer._start`).
* **KV cache.** Each decoder layer owns K and V arrays (B, H, capacity, head_dim), written in
  place at each row's position; attention reads the filled prefix through ``kv_lengths`` (the
  kernel never touches entries past a row's length, so the unfilled tail is never initialised).
  Capacity starts at the caller's hint and doubles when full (amortised O(1) per step, never
  one concatenation per step), up to ``max_positions``.
* **Packed weights.** Every layer's matrices (self-attention QKV and output, cross-attention
  queries, keys/values and output, feed-forward) and the vocabulary projection are also held
  as :class:`~attncore.kernels.PackedLinearWeight` (packed once at load, in the model's
  ``weight_dtype``; as much memory again as those weights, half with bfloat16), so a decoding
  step's few-row products stream each weight once and never re-pack, and the encoder, the
  cross-attention keys/values and prompts run on them too: on AVX2 / AVX-512 each output row is
  then one FMA chain whatever the number of rows (the panel kernel up to 256 rows, the tile
  kernel past that), and their attention takes the flash path at every length
  (:func:`attncore.kernels.attention.sequence_attention`), so a sentence gives the same bits
  alone or padded inside any batch.
* **One compiled step.** A decoding step (token embedding, every decoder layer against its
  cache, final norm, vocabulary projection, log-softmax) is one call to
  :class:`attncore.kernels._transformer.DecoderStep` with the GIL released, on the same C
  kernels as the rest of the engine; Python only validates the tokens and grows the caches.
* **Ragged batches.** Sources (and decoder-only prompts) of different lengths are padded with
  ``pad_id`` and masked with ``kv_lengths``; every row keeps its own decoding position. The
  encoder and the prompt's prefill run the batch in length groups
  (:func:`~attncore.models.base.length_groups`), each padded to its own longest, so one long
  source does not pad every short one to its length (the same bits: rows are independent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import numpy as np

from .. import kernels
from ..kernels import _transformer
from ..kernels.attention import DECODE_CHUNK, sequence_attention
from ..kernels.threads import BLAS_SMALL_GEMM_MACS, kernel_threads
from .base import (EncoderDecoderModel, GenerationResult, check_finite, check_generation_options,
                   gather_cache_prefix, grow_cache, length_groups,
                   check_rows, check_sources, check_step_tokens)

__all__ = ["Transformer", "TransformerDecoderState"]

_FLOAT = np.float32
KINDS = ("encoder_decoder", "decoder_only", "encoder_only")


# -- prepared weights ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Attention:
    """One attention block's weights, prepared for the kernels.

    qkv_weight : (3d, d) float32, ``[W_q; W_k; W_v]`` in ``nn.Linear`` (out, in) layout
    qkv_bias : (3d,) or None
    out_weight : (d, d); out_bias : (d,) or None
    q_weight (d, d) / kv_weight (2d, d) and the matching biases are C-contiguous row views of
    the fused matrix (no copies), for cross-attention where queries and keys differ.
    """

    qkv_weight: np.ndarray
    qkv_bias: Optional[np.ndarray]
    out_weight: np.ndarray
    out_bias: Optional[np.ndarray]

    @property
    def d_model(self) -> int:
        return self.out_weight.shape[0]

    @property
    def q_weight(self) -> np.ndarray:
        return self.qkv_weight[: self.d_model]

    @property
    def q_bias(self) -> Optional[np.ndarray]:
        return None if self.qkv_bias is None else self.qkv_bias[: self.d_model]

    @property
    def kv_weight(self) -> np.ndarray:
        return self.qkv_weight[self.d_model:]

    @property
    def kv_bias(self) -> Optional[np.ndarray]:
        return None if self.qkv_bias is None else self.qkv_bias[self.d_model:]


@dataclass(frozen=True)
class _PackedWeights:
    """A layer's matrices packed once (same values as the layer's arrays; cross_* are None
    without cross-attention): what decoding steps and the full-sequence products run on."""

    self_qkv: kernels.PackedLinearWeight
    self_out: kernels.PackedLinearWeight
    cross_q: Optional[kernels.PackedLinearWeight]
    cross_kv: Optional[kernels.PackedLinearWeight]
    cross_out: Optional[kernels.PackedLinearWeight]
    linear1: kernels.PackedLinearWeight
    linear2: kernels.PackedLinearWeight


@dataclass(frozen=True)
class _Layer:
    """One encoder or decoder layer.

    norms : ((gamma, beta), ...) for norm1, norm2 (+ norm3 with cross-attention), each (d,)
    cross : the cross-attention block (encoder–decoder decoders only)
    packed : the packed copies every product runs on (:func:`_with_packed_weights`)
    """

    self_attn: _Attention
    cross: Optional[_Attention]
    linear1_weight: np.ndarray   # (F, d)
    linear1_bias: np.ndarray     # (F,)
    linear2_weight: np.ndarray   # (d, F)
    linear2_bias: np.ndarray     # (d,)
    norms: Tuple[Tuple[np.ndarray, np.ndarray], ...]
    packed: Optional[_PackedWeights] = None


def _with_packed_weights(layer: _Layer, weight_dtype: str) -> _Layer:
    """The layer with its matrices packed (in ``weight_dtype``)."""
    def pack(weight):
        return kernels.PackedLinearWeight(weight, weight_dtype)

    cross = layer.cross
    return replace(layer, packed=_PackedWeights(
        self_qkv=pack(layer.self_attn.qkv_weight), self_out=pack(layer.self_attn.out_weight),
        cross_q=pack(cross.q_weight) if cross is not None else None,
        cross_kv=pack(cross.kv_weight) if cross is not None else None,
        cross_out=pack(cross.out_weight) if cross is not None else None,
        linear1=pack(layer.linear1_weight), linear2=pack(layer.linear2_weight)))


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=_FLOAT)


def _attention_weights(weights: dict, prefix: str, d_model: int) -> _Attention:
    """Fuse ``{q,k,v}_proj_weight`` into one (3d, d) matrix when the model stores them apart."""
    fused = weights.get(prefix + ".in_proj_weight")
    if fused is None:
        fused = np.concatenate([weights[f"{prefix}.{p}_proj_weight"] for p in "qkv"], axis=0)
    return _Attention(qkv_weight=_f32(fused), qkv_bias=_optional(weights, prefix + ".in_proj_bias"),
                      out_weight=_f32(weights[prefix + ".out_proj.weight"]),
                      out_bias=_optional(weights, prefix + ".out_proj.bias"))


def _optional(weights: dict, name: str) -> Optional[np.ndarray]:
    return _f32(weights[name]) if name in weights else None


def _layer_weights(weights: dict, prefix: str, d_model: int, cross: bool) -> _Layer:
    norm_names = ("norm1", "norm2", "norm3") if cross else ("norm1", "norm2")
    return _Layer(
        self_attn=_attention_weights(weights, prefix + ".self_attn", d_model),
        cross=_attention_weights(weights, prefix + ".multihead_attn", d_model) if cross else None,
        linear1_weight=_f32(weights[prefix + ".linear1.weight"]),
        linear1_bias=_f32(weights[prefix + ".linear1.bias"]),
        linear2_weight=_f32(weights[prefix + ".linear2.weight"]),
        linear2_bias=_f32(weights[prefix + ".linear2.bias"]),
        norms=tuple((_f32(weights[f"{prefix}.{n}.weight"]), _f32(weights[f"{prefix}.{n}.bias"]))
                    for n in norm_names))


# -- head layout helpers ------------------------------------------------------------------------

def _split_heads(x: np.ndarray, parts: int, heads: int) -> np.ndarray:
    """(B, L, parts * d) -> (parts, B, H, L, head_dim), C-contiguous (the kernel layout).

    Heads split the projected width head-major (``h * head_dim + j``) as in torch."""
    batch, length, width = x.shape
    head_dim = width // (parts * heads)
    return np.ascontiguousarray(
        x.reshape(batch, length, parts, heads, head_dim).transpose(2, 0, 3, 1, 4))


def _merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, L, head_dim) -> (B, L, H * head_dim)."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


# -- decoder state ------------------------------------------------------------------------------

class TransformerDecoderState:
    """Per-call decoding state of :class:`Transformer` (the model itself is never mutated).

    Attributes
    ----------
    self_k, self_v : list over decoder layers of float32 (B, H, capacity, head_dim); row b holds
        keys/values at positions ``[0, lengths[b])``; entries past that are never read.
    lengths : int64 (B,), tokens already in each row's cache (= the position of its next token).
    cross_k, cross_v : list over decoder layers of (B, H, S_max, head_dim), or None
        (decoder-only). Computed once per source in ``_start``.
    src_lengths : int64 (B,) or None.
    source_rows : int64 (B,) or None: which ``_start`` source each row decodes, so that
        ``select`` can keep the cross K/V arrays unchanged when beams only reorder within sources.
    pending : float32 (B, V) or None: decoder-only next-token log-probs of the prompt, returned by
        the first ``_step(state, None)``.
    """

    __slots__ = ("self_k", "self_v", "lengths", "cross_k", "cross_v", "src_lengths",
                 "source_rows", "pending", "max_positions")

    def __init__(self, self_k, self_v, lengths, cross_k, cross_v, src_lengths, source_rows,
                 pending, max_positions):
        self.self_k: List[np.ndarray] = self_k
        self.self_v: List[np.ndarray] = self_v
        self.lengths: np.ndarray = lengths
        self.cross_k: Optional[List[np.ndarray]] = cross_k
        self.cross_v: Optional[List[np.ndarray]] = cross_v
        self.src_lengths: Optional[np.ndarray] = src_lengths
        self.source_rows: Optional[np.ndarray] = source_rows
        self.pending: Optional[np.ndarray] = pending
        self.max_positions: int = max_positions

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        """Positions the self-attention caches can hold before they grow."""
        return int(self.self_k[0].shape[2]) if self.self_k else 0

    def select(self, rows) -> "TransformerDecoderState":
        """A new state made of the rows ``rows`` (int, may repeat, drop or reorder rows).

        Copies the filled prefix of the self-attention caches; the cross-attention K/V arrays
        are shared unchanged when every kept row still decodes the same source at the same
        index (beams reordered within their sources), and gathered otherwise.
        """
        rows = check_rows(rows, self.batch_size)
        filled = int(self.lengths[rows].max()) if rows.size else 0
        self_k = [gather_cache_prefix(k, rows, filled) for k in self.self_k]
        self_v = [gather_cache_prefix(v, rows, filled) for v in self.self_v]
        cross_k, cross_v, src_lengths, source_rows = (self.cross_k, self.cross_v,
                                                      self.src_lengths, self.source_rows)
        if source_rows is not None:
            new_sources = source_rows[rows]
            if not np.array_equal(new_sources, source_rows):
                cross_k = [np.take(k, rows, axis=0) for k in cross_k]
                cross_v = [np.take(v, rows, axis=0) for v in cross_v]
                src_lengths = src_lengths[rows]
            source_rows = new_sources
        pending = None if self.pending is None else self.pending[rows]
        return TransformerDecoderState(self_k, self_v, self.lengths[rows], cross_k, cross_v,
                                       src_lengths, source_rows, pending, self.max_positions)

    def _reserve(self, needed: int) -> None:
        """Grow the caches (doubling, capped at max_positions) to hold ``needed`` positions."""
        if needed <= self.capacity:
            return
        capacity = min(max(needed, 2 * self.capacity), self.max_positions)
        filled = int(self.lengths.max()) if self.lengths.size else 0
        self.self_k = [grow_cache(k, capacity, filled) for k in self.self_k]
        self.self_v = [grow_cache(v, capacity, filled) for v in self.self_v]


def _sublayer(x: np.ndarray, norm, fn, norm_first: bool, eps: float) -> np.ndarray:
    """Pre-norm ``x + fn(norm(x))`` or post-norm ``norm(x + fn(x))``."""
    if norm_first:
        return x + fn(kernels.layer_norm(x, norm[0], norm[1], eps))
    return kernels.layer_norm(x + fn(x), norm[0], norm[1], eps)


def _feedforward(layer: _Layer, x: np.ndarray, gelu: bool) -> np.ndarray:
    """linear2(act(linear1(x))), x (..., d), on the packed weights."""
    hidden = kernels.linear(x, layer.packed.linear1, layer.linear1_bias)
    hidden = kernels.gelu(hidden) if gelu else kernels.relu(hidden)
    return kernels.linear(hidden, layer.packed.linear2, layer.linear2_bias)


# -- the model ----------------------------------------------------------------------------------

class Transformer(EncoderDecoderModel):
    """Transformer engine model (see the module docstring).

    Parameters
    ----------
    config : dict, the model directory's ``config.json`` (``architecture = "transformer"``)
    weights : dict name -> array, as in ``attncore.io.weight_spec(config)``
    tokenizer : optional

    Public API by kind: ``generate`` / ``translate`` (encoder_decoder; decoder_only, where the
    sources are prompts), ``encode`` (encoder_decoder, encoder_only), ``classify``
    (encoder_only).
    """

    architecture = "transformer"

    # -- load-time preparation --------------------------------------------------------------
    def _prepare(self) -> None:
        """Fuse, cast and arrange the weights once; read the hyper-parameters the steps use."""
        config, weights = self.config, self.weights
        kind = config["kind"]
        for key, allowed in (("kind", KINDS), ("activation", ("relu", "gelu")),
                             ("pooling", ("mean", "first"))):
            if config.get(key, allowed[0]) not in allowed:
                raise ValueError(f"config['{key}'] must be one of {allowed}, got {config[key]!r}")
        d = int(config["d_model"])
        self.kind = kind
        self.d_model = d
        self.num_heads = int(config["num_heads"])
        self.head_dim = d // self.num_heads
        self.norm_first = bool(config["norm_first"])
        self.eps = float(config["layer_norm_eps"])
        self.gelu = config["activation"] == "gelu"
        self.max_positions = int(config["max_positions"])
        self.embed_scale = math.sqrt(d) if config["scale_embedding"] else None
        sinusoid = (kernels.sinusoidal_positions(self.max_positions, d, dtype=_FLOAT)
                    if config["positions"] == "sinusoidal" else None)

        self.has_encoder = kind in ("encoder_decoder", "encoder_only")
        self.has_decoder = kind in ("encoder_decoder", "decoder_only")
        if self.has_encoder:
            self.src_embedding = _f32(weights["src_embedding.weight"])
            self.src_positions = sinusoid if sinusoid is not None else _f32(weights["src_position.weight"])
            self.encoder_layers = tuple(
                _with_packed_weights(_layer_weights(weights, f"encoder.layers.{i}", d,
                                                    cross=False), self.weight_dtype)
                for i in range(int(config["num_encoder_layers"])))
            self.encoder_norm = self._final_norm(weights, "encoder.norm")
        if self.has_decoder:
            self.tgt_embedding = _f32(weights["tgt_embedding.weight"])
            self.tgt_positions = sinusoid if sinusoid is not None else _f32(weights["tgt_position.weight"])
            self.decoder_layers = tuple(
                _with_packed_weights(_layer_weights(weights, f"decoder.layers.{i}", d,
                                                    cross=kind == "encoder_decoder"),
                                     self.weight_dtype)
                for i in range(int(config["num_decoder_layers"])))
            self.decoder_norm = self._final_norm(weights, "decoder.norm")
            self.output_weight = (self.tgt_embedding if config["tie_embeddings"]
                                  else _f32(weights["output.weight"]))
            self.output_bias = _f32(weights["output.bias"])
            self.output_step = kernels.PackedLinearWeight(self.output_weight, self.weight_dtype)
            self._decoder_step = self._compiled_decoder_step()
        if kind == "encoder_only":
            classifier = _f32(weights["classifier.weight"])
            # packed (float32: a few rows, nothing to gain from fewer bytes): a document's
            # logits then have the same bits in a batch of any size (the dense product's kernel
            # changes with the row count); without classes (num_classes = 0) the empty array
            self.classifier_weight = (kernels.PackedLinearWeight(classifier)
                                      if classifier.size else classifier)
            self.classifier_bias = _f32(weights["classifier.bias"])
            self.pooling = config["pooling"]

    def _compiled_decoder_step(self) -> "_transformer.DecoderStep":
        """The decoder's per-token work as one compiled call (attncore.kernels._transformer)."""
        def pair(packed, bias):
            return None if packed is None else (packed, bias)

        layers = [dict(norms=layer.norms,
                       self_qkv=pair(layer.packed.self_qkv, layer.self_attn.qkv_bias),
                       self_out=pair(layer.packed.self_out, layer.self_attn.out_bias),
                       cross_q=pair(layer.packed.cross_q, layer.cross and layer.cross.q_bias),
                       cross_out=pair(layer.packed.cross_out, layer.cross and layer.cross.out_bias),
                       linear1=pair(layer.packed.linear1, layer.linear1_bias),
                       linear2=pair(layer.packed.linear2, layer.linear2_bias))
                  for layer in self.decoder_layers]
        return _transformer.DecoderStep(
            d_model=self.d_model, num_heads=self.num_heads,
            dim_feedforward=self.decoder_layers[0].linear1_weight.shape[0],
            norm_first=self.norm_first, gelu=self.gelu, eps=self.eps,
            embed_scale=self.embed_scale, attention_scale=1.0 / math.sqrt(self.head_dim),
            decode_chunk=DECODE_CHUNK, small_gemm_macs=BLAS_SMALL_GEMM_MACS,
            embedding=self.tgt_embedding,
            positions=self.tgt_positions, final_norm=self.decoder_norm, output=self.output_step,
            output_bias=self.output_bias, layers=layers)

    @staticmethod
    def _final_norm(weights: dict, prefix: str):
        """(gamma, beta) of a stack's final LayerNorm, or None. Its presence follows the weight
        spec the weights were checked against (``final_norm`` in config.json)."""
        if prefix + ".weight" not in weights:
            return None
        return _f32(weights[prefix + ".weight"]), _f32(weights[prefix + ".bias"])

    @property
    def source_vocab_size(self) -> int:
        """Vocabulary of the sources: the encoder's, or the decoder's for decoder-only prompts."""
        return (self.src_embedding if self.has_encoder else self.tgt_embedding).shape[0]

    @property
    def target_vocab_size(self) -> int:
        return self.tgt_embedding.shape[0] if self.has_decoder else 0

    @property
    def max_source_length(self) -> int:
        """Sources (and prompts) longer than the position table are refused."""
        return self.max_positions

    # -- input checks -----------------------------------------------------------------------
    def _check_sequences(self, sequences, name: str) -> List[np.ndarray]:
        """Non-empty 1-d int64 arrays, ids in range, at most ``max_positions`` tokens
        (ValueError / TypeError naming ``name`` otherwise)."""
        return check_sources(sequences, self.source_vocab_size, self.max_positions, name=name)

    def _pad(self, sequences: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """int64 (B, L_max) padded with pad_id, and the lengths (B,)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        ids = np.full((len(sequences), int(lengths.max())), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
        return ids, lengths

    def _padded_groups(self, sequences: List[np.ndarray]):
        """``(rows, ids, lengths)`` of each length group of ``sequences``
        (:func:`~attncore.models.base.length_groups`): its rows of the batch, their ids
        padded to the group's longest, their lengths."""
        for rows in length_groups([len(s) for s in sequences]):
            ids, lengths = self._pad([sequences[r] for r in rows])
            yield rows, ids, lengths

    def _encoded(self, sequences: List[np.ndarray]) -> List[np.ndarray]:
        """The encoder outputs float32 (len_i, d) of each sequence, group by group."""
        outputs: List[Optional[np.ndarray]] = [None] * len(sequences)
        for rows, ids, lengths in self._padded_groups(sequences):
            memory = self._encoder_forward(ids, lengths)
            for row, out, length in zip(rows.tolist(), memory, lengths.tolist()):
                outputs[row] = out[:length].copy()
        return outputs

    # -- full-sequence pieces ---------------------------------------------------------------
    def _embed(self, ids: np.ndarray, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(B, L) ids -> (B, L, d): scaled token embedding + the position rows 0..L-1."""
        x = kernels.embedding(table, ids)
        if self.embed_scale is not None:
            x *= _FLOAT(self.embed_scale)
        x += positions[: ids.shape[1]]
        return x

    def _self_attention(self, layer: _Layer, x: np.ndarray, lengths: np.ndarray, causal: bool):
        """The layer's self-attention over padded sequences x (B, L, d); returns (output
        (B, L, d), k, v) with k, v (B, H, L, head_dim) for the caller's cache. On the packed
        weights and the flash path: a row's bits do not depend on the batch (module docstring)."""
        attn, packed = layer.self_attn, layer.packed
        q, k, v = _split_heads(kernels.linear(x, packed.self_qkv, attn.qkv_bias), 3,
                               self.num_heads)
        out = sequence_attention(q, k, v, kv_lengths=lengths, causal=causal)
        return kernels.linear(_merge_heads(out), packed.self_out, attn.out_bias), k, v

    def _encoder_forward(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Encoder output (B, S, d) float32 for padded ids (B, S); padded rows are junk."""
        x = self._embed(ids, self.src_embedding, self.src_positions)
        for layer in self.encoder_layers:
            x = _sublayer(x, layer.norms[0],
                          lambda h: self._self_attention(layer, h, lengths, False)[0],
                          self.norm_first, self.eps)
            x = _sublayer(x, layer.norms[1], lambda h: _feedforward(layer, h, self.gelu),
                          self.norm_first, self.eps)
        if self.encoder_norm is not None:
            x = kernels.layer_norm(x, self.encoder_norm[0], self.encoder_norm[1], self.eps)
        return x

    def _log_probs(self, hidden: np.ndarray) -> np.ndarray:
        """Decoder output (B, d) -> float32 log-probabilities (B, V) (final norm included)."""
        if self.decoder_norm is not None:
            hidden = kernels.layer_norm(hidden, self.decoder_norm[0], self.decoder_norm[1], self.eps)
        return kernels.log_softmax(kernels.linear(hidden, self.output_step, self.output_bias))

    # -- decoder protocol (docs/ENGINE.md) --------------------------------------------------
    def _new_caches(self, batch: int, capacity: int):
        shape = (batch, self.num_heads, capacity, self.head_dim)
        return ([np.empty(shape, dtype=_FLOAT) for _ in self.decoder_layers],
                [np.empty(shape, dtype=_FLOAT) for _ in self.decoder_layers])

    def _start(self, sources, max_length: Optional[int] = None) -> TransformerDecoderState:
        """Decoding state for ``sources`` (list of 1-d int arrays, different lengths allowed).

        encoder_decoder: encodes the sources and projects the cross-attention K/V of every
        decoder layer once. decoder_only: ``sources`` are prompts, used as given (include
        ``bos_id`` if the model expects it); the prompt is prefilled into the KV cache and
        the first ``_step(state, None)`` returns its next-token log-probs.
        max_length : optional hint, the number of tokens that will be generated (sizes the
        caches so that they never grow); the caches grow on demand otherwise.
        """
        if not self.has_decoder:
            raise ValueError("an encoder_only Transformer does not decode; use encode or classify")
        if self.kind == "decoder_only":
            return self._prefill(self._check_sequences(sources, "sources"),
                                 max_length)
        sources = self._check_sequences(sources, "sources")
        batch = len(sources)
        src_lengths = np.array([len(s) for s in sources], dtype=np.int64)
        # (positions past a source's length are never read: kv_lengths)
        shape = (batch, self.num_heads, int(src_lengths.max()), self.head_dim)
        cross_k = [np.zeros(shape, dtype=_FLOAT) for _ in self.decoder_layers]
        cross_v = [np.zeros(shape, dtype=_FLOAT) for _ in self.decoder_layers]
        for rows, ids, lengths in self._padded_groups(sources):
            memory = self._encoder_forward(ids, lengths)
            for index, layer in enumerate(self.decoder_layers):
                k, v = _split_heads(kernels.linear(memory, layer.packed.cross_kv,
                                                   layer.cross.kv_bias), 2, self.num_heads)
                cross_k[index][rows, :, :k.shape[2]] = k
                cross_v[index][rows, :, :v.shape[2]] = v
        self_k, self_v = self._new_caches(batch, self._initial_capacity(0, max_length))
        return TransformerDecoderState(self_k, self_v, np.zeros(batch, dtype=np.int64), cross_k,
                                       cross_v, src_lengths, np.arange(batch, dtype=np.int64),
                                       None, self.max_positions)

    def _initial_capacity(self, prefix: int, max_length: Optional[int]) -> int:
        extra = 32 if max_length is None else max(int(max_length), 1)
        return max(1, min(prefix + extra, self.max_positions))

    def _prefill(self, prompts: List[np.ndarray], max_length: Optional[int]) -> TransformerDecoderState:
        """decoder_only: run the causal decoder over the prompts (padded, length group by
        length group), filling the caches."""
        batch = len(prompts)
        prompt_lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        self_k, self_v = self._new_caches(
            batch, self._initial_capacity(int(prompt_lengths.max()), max_length))
        last = np.empty((batch, self.d_model), dtype=_FLOAT)                 # (B, d)
        for rows, ids, lengths in self._padded_groups(prompts):
            x = self._embed(ids, self.tgt_embedding, self.tgt_positions)
            for index, layer in enumerate(self.decoder_layers):
                def attend(h, layer=layer, index=index):
                    out, k, v = self._self_attention(layer, h, lengths, True)
                    self_k[index][rows, :, :k.shape[2]] = k
                    self_v[index][rows, :, :v.shape[2]] = v
                    return out
                x = _sublayer(x, layer.norms[0], attend, self.norm_first, self.eps)
                x = _sublayer(x, layer.norms[1],
                              lambda h, layer=layer: _feedforward(layer, h, self.gelu),
                              self.norm_first, self.eps)
            last[rows] = x[np.arange(len(rows)), lengths - 1]
        return TransformerDecoderState(self_k, self_v, prompt_lengths, None, None, None, None,
                                       self._log_probs(last), self.max_positions)

    def _step(self, state: TransformerDecoderState, tokens):
        """Feed one token per row; returns (log_probs float32 (B, V), cross-attention (B, H, S)
        of the last decoder layer, or None for decoder_only).

        ``tokens=None`` returns the decoder-only prompt's next-token distribution (once).
        """
        if tokens is None:
            if state.pending is None:
                raise ValueError("tokens=None is only valid for the first step after a "
                                 "decoder_only _start")
            log_probs, state.pending = state.pending, None
            return log_probs, None
        tokens = check_step_tokens(tokens, state.batch_size, self.target_vocab_size)
        positions = state.lengths
        if positions.size and int(positions.max()) >= self.max_positions:
            raise ValueError(f"max_length: decoding past position {self.max_positions - 1} "
                             f"exceeds the position table (max_positions={self.max_positions})")
        state.pending = None
        state._reserve(int(positions.max(initial=0)) + 1)
        batch = state.batch_size
        cross = state.cross_k is not None
        log_probs = np.empty((batch, self.target_vocab_size), dtype=_FLOAT)
        weights = (np.empty((batch, self.num_heads, state.cross_k[0].shape[2]), dtype=_FLOAT)
                   if cross else None)
        self._decoder_step.step(tokens, positions, state.self_k, state.self_v, state.cross_k,
                                state.cross_v, state.src_lengths, log_probs, weights,
                                kernel_threads())
        state.lengths = positions + 1
        return log_probs, weights

    # -- generation -------------------------------------------------------------------------
    def generate(self, sources, *, max_length, **options) -> List[GenerationResult]:
        """Generate continuations (see :meth:`EncoderDecoderModel.generate` for the options).

        encoder_decoder: ``sources`` are source sentences; decoding starts from ``bos_id``.
        decoder_only: ``sources`` are prompts (used as given, ``bos_id`` included if the model
        expects it); the first generated token is predicted from the prompt itself.
        Every generated token needs a row of the position table, so ``max_length`` (plus the
        longest prompt less one, for decoder-only) may not exceed ``max_positions``.
        """
        return super().generate(sources, max_length=max_length, **options)

    def _generation_inputs(self, sources, options: dict):
        if not self.has_decoder:
            raise ValueError("generate needs a decoder; an encoder_only Transformer has none "
                             "(use encode or classify)")
        options = check_generation_options(**options)
        decoder_only = self.kind == "decoder_only"
        if decoder_only and options.get("return_attention"):   # (refused at the first step)
            raise ValueError("return_attention: a decoder-only model has no cross-attention")
        sources = check_sources(sources, self.source_vocab_size, self.max_source_length)
        needed = options["max_length"] + (max(len(s) for s in sources) - 1 if decoder_only else 0)
        if needed > self.max_positions:
            what = "the longest prompt plus max_length - 1" if decoder_only else "max_length"
            raise ValueError(f"max_length: {what} is {needed}, more positions than the position "
                             f"table has (max_positions={self.max_positions})")
        return sources, None if decoder_only else self.bos_id, options

    def default_max_length(self, source_length: int) -> int:
        """``2 * length + 10`` tokens, within the position table: ``max_positions`` for an
        encoder-decoder, what the prompt leaves of it for a decoder-only model."""
        return max(1, min(super().default_max_length(source_length),
                          self.longest_generation(source_length)))

    def longest_generation(self, source_length: int) -> int:
        """What the position table leaves: ``max_positions`` for an encoder-decoder, less
        the prompt's length - 1 for a decoder-only model."""
        return self.max_positions - (int(source_length) - 1 if self.kind == "decoder_only" else 0)

    # -- encoder API ------------------------------------------------------------------------
    def encode(self, tokens_list) -> List[np.ndarray]:
        """Encoder outputs: a list of float32 (len_i, d_model) arrays, one per sequence
        (final norm included; encoder_decoder and encoder_only)."""
        if not self.has_encoder:
            raise ValueError("a decoder_only Transformer has no encoder")
        sequences = self._check_sequences(tokens_list, "tokens_list")
        return check_finite(self._encoded(sequences), "encoder outputs")

    def classify(self, tokens_list) -> np.ndarray:
        """encoder_only class logits, float32 (B, num_classes): the classifier over the encoder
        output pooled as in the trainer (mean over the real tokens, or the first token)."""
        if self.kind != "encoder_only":
            raise ValueError(f"classify needs an encoder_only Transformer, this one is {self.kind}")
        if self.classifier_weight.shape[0] == 0:   # (logits of shape (B, 0) before)
            raise ValueError("this Transformer has no classifier (num_classes = 0)")
        outputs = self._encoded(self._check_sequences(tokens_list, "tokens_list"))
        if self.pooling == "first":
            pooled = np.stack([out[0] for out in outputs])
        else:
            pooled = np.stack([out.mean(axis=0, dtype=np.float64)
                               for out in outputs]).astype(_FLOAT)
        return check_finite(kernels.linear(pooled, self.classifier_weight, self.classifier_bias),
                            "class logits")
