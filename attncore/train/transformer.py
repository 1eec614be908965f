"""Transformers for the trainer and as the engine's numerical reference.

Three kinds share one set of blocks, with ``torch.nn.Transformer`` semantics and parameter
names, so a PyTorch state dict imports by renaming only the embeddings and the output layer:

``encoder_decoder``  src -> encoder -> memory; tgt -> causal decoder with cross-attention -> logits
``decoder_only``     tokens -> causal decoder (self-attention + FFN, no cross-attention) -> logits
``encoder_only``     tokens -> encoder -> mean or first-token pooling -> class logits

Input: ``x = E[ids] * (sqrt(d_model) if scale_embedding else 1) + P[position]`` with positions
from 0; P is sinusoidal (Vaswani: ``P[p, 2i] = sin(p / 10000^(2i/d))``,
``P[p, 2i+1] = cos(p / 10000^(2i/d))``) or learned (``*_position.weight``).

Blocks (``norm_first=False``, post-norm, Vaswani / torch default)::

    x = norm1(x + SelfAttn(x));  [x = norm2(x + CrossAttn(x, memory))];  x = normN(x + FFN(x))

``norm_first=True`` (pre-norm)::

    x = x + SelfAttn(norm1(x));  [x = x + CrossAttn(norm2(x), memory)];  x = x + FFN(normN(x))

followed by a final LayerNorm (``encoder.norm`` / ``decoder.norm``) when ``final_norm`` (default:
on for pre-norm, off for post-norm; ``torch.nn.Transformer`` always has it, so converters set
it). ``FFN(x) = linear2(act(linear1(x)))`` with ReLU or exact (erf) GELU.

Multi-head attention (``torch.nn.MultiheadAttention`` layout): with ``fused_qkv`` the weights
are ``in_proj_weight`` (3d, d) = [W_q; W_k; W_v] in torch ``nn.Linear`` (out, in) layout,
otherwise ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (d, d); ``in_proj_bias`` (3d)
and ``out_proj.{weight (d, d), bias (d)}``. Heads split the projected width head-major
(``h * head_dim + j``), scores are ``q k^T / sqrt(head_dim)``. Masks: keys past a sequence's
length are excluded; the decoder's self-attention is causal, aligned bottom-right (query i of
Lq sees keys j <= i + Lk - Lq). A query with no visible key gets a zero output (never NaN).

Logits: ``h W_out^T + b_out`` with ``W_out = tgt_embedding.weight`` when ``tie_embeddings``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import reference
from . import autograd as ag
from .config import ConfigDict
from .autograd import Tensor
from .decoding import greedy_decode
from .layers import Embedding, LayerNorm, Linear, Module, ModuleList, linear

__all__ = ["TransformerConfig", "Transformer", "TransformerState", "sinusoidal_positions",
           "multi_head_attention", "KINDS"]

KINDS = ("encoder_decoder", "decoder_only", "encoder_only")


@dataclass
class TransformerConfig(ConfigDict):
    """Hyper-parameters of :class:`Transformer` (all written to ``config.json``).

    Attributes
    ----------
    kind : {"encoder_decoder", "decoder_only", "encoder_only"}
    src_vocab_size : int
        Encoder vocabulary (encoder_decoder, encoder_only).
    tgt_vocab_size : int
        Decoder vocabulary (encoder_decoder, decoder_only).
    d_model, num_heads, dim_feedforward : int
    num_encoder_layers, num_decoder_layers : int
    activation : {"relu", "gelu"}   GELU is the exact erf form.
    norm_first : bool               pre-norm (True) or post-norm (False).
    final_norm : bool or None       final LayerNorm after each stack; None means ``norm_first``.
    layer_norm_eps : float
    positions : {"sinusoidal", "learned"}
    max_positions : int             rows of the learned position tables (and a length limit).
    scale_embedding : bool          multiply embeddings by sqrt(d_model).
    fused_qkv : bool                ``in_proj_weight`` vs separate ``{q,k,v}_proj_weight``.
    attention_bias : bool           ``in_proj_bias`` and ``out_proj.bias``.
    tie_embeddings : bool           output layer shares ``tgt_embedding.weight``.
    num_classes : int               encoder_only: classifier outputs.
    pooling : {"mean", "first"}     encoder_only: mean over real tokens, or the first token.
    dropout : float                 training only: embeddings, residual branches, FFN hidden.
    dtype : {"float32", "float64"}
    pad_id, bos_id, eos_id, unk_id : int
    tokenizer : dict or None
    """

    kind: str = "encoder_decoder"
    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    d_model: int = 32
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dim_feedforward: int = 64
    activation: str = "relu"
    norm_first: bool = False
    final_norm: Optional[bool] = None
    layer_norm_eps: float = 1e-5
    positions: str = "sinusoidal"
    max_positions: int = 256
    scale_embedding: bool = True
    fused_qkv: bool = True
    attention_bias: bool = True
    tie_embeddings: bool = False
    num_classes: int = 0
    pooling: str = "mean"
    dropout: float = 0.0
    dtype: str = "float32"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    tokenizer: Optional[dict] = None

    architecture = "transformer"

    def __post_init__(self):
        if self.final_norm is None:
            self.final_norm = bool(self.norm_first)
        checks = [
            (self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}"),
            (self.num_heads >= 1 and self.d_model >= 1, "d_model and num_heads must be >= 1"),
            (self.num_heads < 1 or self.d_model % self.num_heads == 0,
             f"d_model {self.d_model} not divisible by num_heads {self.num_heads}"),
            (self.layer_norm_eps > 0, f"layer_norm_eps must be > 0, got {self.layer_norm_eps}"),
            (self.activation in ("relu", "gelu"), f"activation must be 'relu' or 'gelu', got {self.activation!r}"),
            (self.positions in ("sinusoidal", "learned"), f"positions must be sinusoidal or learned, got {self.positions!r}"),
            (self.pooling in ("mean", "first"), f"pooling must be 'mean' or 'first', got {self.pooling!r}"),
            (self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}"),
            (self.kind == "decoder_only" or self.src_vocab_size > 0, "src_vocab_size must be > 0"),
            (self.kind == "encoder_only" or self.tgt_vocab_size > 0, "tgt_vocab_size must be > 0"),
            (self.kind != "encoder_only" or self.num_classes > 0, "encoder_only needs num_classes > 0"),
            # (the engine refuses a decoder without layers: a run must not train, then fail)
            (self.kind == "encoder_only" or self.num_decoder_layers >= 1,
             f"a {self.kind} model needs num_decoder_layers >= 1"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("invalid TransformerConfig: " + "; ".join(problems))



def sinusoidal_positions(length: int, dim: int, dtype=np.float64) -> np.ndarray:
    """Vaswani table (length, dim): sin on even dims, cos on odd dims, positions from 0.

    ``P[p, 2i] = sin(p / 10000^(2i/dim))``, ``P[p, 2i+1] = cos(p / 10000^(2i/dim))``; the one
    definition is :func:`attncore.reference.sinusoidal_positions` (plain NumPy).
    """
    return reference.sinusoidal_positions(length, dim, dtype=dtype)


class MultiheadAttention(Module):
    """Parameters of one attention block, named like ``torch.nn.MultiheadAttention``."""

    def __init__(self, d_model: int, fused: bool, bias: bool, rng: np.random.Generator, dtype):
        super().__init__()
        # torch initialises in_proj with Xavier-uniform over the (3d, d) matrix and biases at 0.
        bound = math.sqrt(6.0 / (d_model + 3 * d_model))
        if fused:
            self.in_proj_weight = Tensor(rng.uniform(-bound, bound, (3 * d_model, d_model)).astype(dtype),
                                         requires_grad=True)
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                setattr(self, name, Tensor(rng.uniform(-bound, bound, (d_model, d_model)).astype(dtype),
                                           requires_grad=True))
        if bias:
            self.in_proj_bias = Tensor(np.zeros(3 * d_model, dtype=dtype), requires_grad=True)
        self.out_proj = Linear(d_model, d_model, rng, bias=bias, dtype=dtype)
        if bias:
            self.out_proj.bias = Tensor(np.zeros(d_model, dtype=dtype), requires_grad=True)
        object.__setattr__(self, "d_model", d_model)
        object.__setattr__(self, "fused", fused)
        object.__setattr__(self, "has_bias", bias)

    def projection(self, which: int):
        """(weight (d, d), bias (d,) or None) of q (0), k (1) or v (2)."""
        d = self.d_model
        if self.fused:
            weight = self.in_proj_weight[which * d:(which + 1) * d]
        else:
            weight = getattr(self, "qkv"[which] + "_proj_weight")
        bias = self.in_proj_bias[which * d:(which + 1) * d] if self.has_bias else None
        return weight, bias


def multi_head_attention(attention: MultiheadAttention, query_input: Tensor, key_value_input: Tensor,
                         num_heads: int, key_valid: Optional[np.ndarray] = None, causal: bool = False):
    """Scaled dot-product attention over ``num_heads`` heads.

    Parameters
    ----------
    attention : MultiheadAttention (the weights)
    query_input : (B, Lq, d)
    key_value_input : (B, Lk, d)
    key_valid : bool (B, Lk), optional; False keys are excluded (padding)
    causal : bool; query i sees keys j <= i + Lk - Lq

    Returns
    -------
    output : (B, Lq, d)
    weights : (B, H, Lq, Lk)
    """
    batch, query_len, d_model = query_input.shape
    key_len = key_value_input.shape[1]
    head_dim = d_model // num_heads

    def heads(x, which):
        weight, bias = attention.projection(which)
        projected = linear(x, weight, bias)                                   # (B, L, d)
        return projected.reshape(batch, x.shape[1], num_heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = heads(query_input, 0), heads(key_value_input, 1), heads(key_value_input, 2)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(head_dim))     # (B, H, Lq, Lk)
    valid = np.ones((batch, 1, query_len, key_len), dtype=bool)
    if key_valid is not None:
        valid &= np.asarray(key_valid, dtype=bool)[:, None, None, :]
    if causal:
        valid &= (np.arange(key_len)[None, :] <= np.arange(query_len)[:, None] + (key_len - query_len))
    weights = ag.softmax(scores, axis=-1, valid=valid)
    context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, query_len, d_model)
    return attention.out_proj(context), weights


class _FeedForwardLayer(Module):
    """Parameters shared by encoder and decoder layers: linear1/linear2 and norms."""

    def __init__(self, config: TransformerConfig, rng, dtype, cross: bool, num_norms: int):
        super().__init__()
        d = config.d_model
        self.self_attn = MultiheadAttention(d, config.fused_qkv, config.attention_bias, rng, dtype)
        if cross:
            self.multihead_attn = MultiheadAttention(d, config.fused_qkv, config.attention_bias, rng, dtype)
        self.linear1 = Linear(d, config.dim_feedforward, rng, dtype=dtype)
        self.linear2 = Linear(config.dim_feedforward, d, rng, dtype=dtype)
        for index in range(1, num_norms + 1):
            setattr(self, f"norm{index}", LayerNorm(d, config.layer_norm_eps, dtype=dtype))


class _Stack(Module):
    def __init__(self, layers, final_norm: Optional[LayerNorm]):
        super().__init__()
        self.layers = ModuleList(layers)
        if final_norm is not None:
            self.norm = final_norm


@dataclass
class TransformerState:
    """Per-call decoding state: the source memory and the target prefix (recomputed each step).

    Attributes
    ----------
    memory : (B, S, d) encoder output, or None for decoder_only
    memory_valid : bool (B, S), or None
    tokens : int64 (B, t), the decoder input so far
    """

    memory: Optional[Tensor]
    memory_valid: Optional[np.ndarray]
    tokens: np.ndarray


class Transformer(Module):
    """Encoder-decoder, decoder-only or encoder-only Transformer (see the module docstring).

    Parameters
    ----------
    config : TransformerConfig
    seed : int
        Seeds the initialisation; dropout uses ``dropout_rng`` (seeded from ``seed + 1``).
    """

    def __init__(self, config: TransformerConfig, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "config", config)
        dtype = np.dtype(config.dtype)
        rng = np.random.default_rng(seed)
        d = config.d_model
        has_encoder = config.kind in ("encoder_decoder", "encoder_only")
        has_decoder = config.kind in ("encoder_decoder", "decoder_only")
        embedding_std = d ** -0.5
        if has_encoder:
            self.src_embedding = Embedding(config.src_vocab_size, d, rng, std=embedding_std, dtype=dtype)
            if config.positions == "learned":
                self.src_position = Embedding(config.max_positions, d, rng, std=0.02, dtype=dtype)
            layers = [_FeedForwardLayer(config, rng, dtype, cross=False, num_norms=2)
                      for _ in range(config.num_encoder_layers)]
            self.encoder = _Stack(layers, LayerNorm(d, config.layer_norm_eps, dtype) if config.final_norm else None)
        if has_decoder:
            cross = config.kind == "encoder_decoder"
            self.tgt_embedding = Embedding(config.tgt_vocab_size, d, rng, std=embedding_std, dtype=dtype)
            if config.positions == "learned":
                self.tgt_position = Embedding(config.max_positions, d, rng, std=0.02, dtype=dtype)
            layers = [_FeedForwardLayer(config, rng, dtype, cross=cross, num_norms=3 if cross else 2)
                      for _ in range(config.num_decoder_layers)]
            self.decoder = _Stack(layers, LayerNorm(d, config.layer_norm_eps, dtype) if config.final_norm else None)
            self.output = Linear(d, config.tgt_vocab_size, rng, dtype=dtype)
            if config.tie_embeddings:
                # Drop the untied matrix: the output layer reads tgt_embedding.weight instead.
                del self.output._parameters["weight"]
                object.__setattr__(self.output, "weight", None)
        if config.kind == "encoder_only":
            self.classifier = Linear(d, config.num_classes, rng, dtype=dtype)
        object.__setattr__(self, "dropout_rng", np.random.default_rng(seed + 1))
        object.__setattr__(self, "_sinusoid", sinusoidal_positions(config.max_positions, d, dtype))

    # -- pieces -------------------------------------------------------------------------------
    def _dropout(self, x: Tensor) -> Tensor:
        return ag.dropout(x, self.config.dropout, self.dropout_rng, self.training)

    def _embed(self, ids: np.ndarray, embedding: Embedding, position: Optional[Embedding]) -> Tensor:
        """(B, L) ids -> (B, L, d): scaled token embedding + position."""
        config = self.config
        length = ids.shape[1]
        if length > config.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_positions {config.max_positions}")
        x = embedding(ids)
        if config.scale_embedding:
            x = x * math.sqrt(config.d_model)
        if position is not None:
            x = x + position(np.arange(length))
        else:
            x = x + self._sinusoid[:length]
        return self._dropout(x)

    def _feedforward(self, layer: _FeedForwardLayer, x: Tensor) -> Tensor:
        hidden = layer.linear1(x)
        hidden = ag.relu(hidden) if self.config.activation == "relu" else ag.gelu(hidden)
        return layer.linear2(self._dropout(hidden))

    def _sublayer(self, x: Tensor, norm: LayerNorm, fn) -> Tensor:
        """Post-norm ``norm(x + fn(x))`` or pre-norm ``x + fn(norm(x))`` (dropout on fn's output)."""
        if self.config.norm_first:
            return x + self._dropout(fn(norm(x)))
        return norm(x + self._dropout(fn(x)))

    def _encoder_layers(self, x: Tensor, valid: np.ndarray) -> Tensor:
        heads = self.config.num_heads
        for layer in self.encoder.layers:
            x = self._sublayer(x, layer.norm1, lambda h: multi_head_attention(layer.self_attn, h, h, heads, valid)[0])
            x = self._sublayer(x, layer.norm2, lambda h: self._feedforward(layer, h))
        return self.encoder.norm(x) if self.config.final_norm else x

    def _decoder_layers(self, x: Tensor, valid: Optional[np.ndarray], memory: Optional[Tensor],
                        memory_valid: Optional[np.ndarray]):
        """Returns the decoder output (B, T, d) and the last layer's cross-attention (B, H, T, S)."""
        heads = self.config.num_heads
        cross_weights = None
        for layer in self.decoder.layers:
            x = self._sublayer(x, layer.norm1,
                               lambda h: multi_head_attention(layer.self_attn, h, h, heads, valid, causal=True)[0])
            if memory is not None:
                def cross(h, layer=layer):
                    nonlocal cross_weights
                    out, cross_weights = multi_head_attention(layer.multihead_attn, h, memory, heads, memory_valid)
                    return out
                x = self._sublayer(x, layer.norm2, cross)
                x = self._sublayer(x, layer.norm3, lambda h: self._feedforward(layer, h))
            else:
                x = self._sublayer(x, layer.norm2, lambda h: self._feedforward(layer, h))
        x = self.decoder.norm(x) if self.config.final_norm else x
        return x, cross_weights

    def _logits(self, x: Tensor) -> Tensor:
        weight = self.tgt_embedding.weight if self.config.tie_embeddings else self.output.weight
        return linear(x, weight, self.output.bias)

    @staticmethod
    def _valid(lengths: Optional[np.ndarray], length: int, batch: int) -> Optional[np.ndarray]:
        if lengths is None:
            return None
        return np.arange(length)[None, :] < np.asarray(lengths)[:, None]

    # -- public API -------------------------------------------------------------------------
    def encode(self, src: np.ndarray, src_lengths: Optional[np.ndarray] = None) -> TransformerState:
        """Run the encoder (encoder_decoder) and return the decoding state with an empty prefix.

        For decoder_only, ``src`` is the prompt (B, P) with no padding and becomes the prefix.
        """
        src = np.asarray(src)
        if self.config.kind == "decoder_only":
            return TransformerState(None, None, src.astype(np.int64))
        memory, valid = self.encode_memory(src, src_lengths)
        return TransformerState(memory, valid, np.zeros((src.shape[0], 0), dtype=np.int64))

    def encode_memory(self, src: np.ndarray, src_lengths: Optional[np.ndarray] = None):
        """Encoder output (B, S, d) and its validity mask (B, S)."""
        if self.config.kind == "decoder_only":
            raise ValueError("a decoder_only Transformer has no encoder")
        src = np.asarray(src)
        valid = self._valid(src_lengths, src.shape[1], src.shape[0])
        x = self._embed(src, self.src_embedding, getattr(self, "src_position", None))
        return self._encoder_layers(x, valid), valid

    def decode(self, tgt_in: np.ndarray, memory: Optional[Tensor] = None, memory_valid: Optional[np.ndarray] = None,
               tgt_lengths: Optional[np.ndarray] = None):
        """Decoder over a whole (teacher-forced) input: logits (B, T, V), cross-attention (B, H, T, S)."""
        tgt_in = np.asarray(tgt_in)
        valid = self._valid(tgt_lengths, tgt_in.shape[1], tgt_in.shape[0])
        x = self._embed(tgt_in, self.tgt_embedding, getattr(self, "tgt_position", None))
        x, cross_weights = self._decoder_layers(x, valid, memory, memory_valid)
        return self._logits(x), cross_weights

    def forward(self, src: np.ndarray, src_lengths: Optional[np.ndarray] = None,
                tgt_in: Optional[np.ndarray] = None, tgt_lengths: Optional[np.ndarray] = None) -> Tensor:
        """Teacher-forced logits.

        * encoder_decoder: ``forward(src (B,S), src_lengths (B,), tgt_in (B,T))`` -> (B, T, V_tgt)
        * decoder_only: ``forward(tokens (B,T), lengths (B,))`` -> (B, T, V_tgt)
        * encoder_only: ``forward(tokens (B,S), lengths (B,))`` -> class logits (B, num_classes)
        """
        kind = self.config.kind
        if kind == "decoder_only":
            return self.decode(src, tgt_lengths=src_lengths)[0]
        memory, valid = self.encode_memory(src, src_lengths)
        if kind == "encoder_only":
            return self.classifier(self._pool(memory, valid))
        if tgt_in is None:
            raise ValueError("encoder_decoder forward needs tgt_in")
        return self.decode(tgt_in, memory, valid, tgt_lengths)[0]

    __call__ = forward

    def _pool(self, memory: Tensor, valid: Optional[np.ndarray]) -> Tensor:
        """(B, S, d) -> (B, d): mean over real positions, or position 0."""
        if self.config.pooling == "first":
            return memory[:, 0, :]
        if valid is None:
            return ag.mean(memory, axis=1)
        weights = valid.astype(memory.dtype) / np.maximum(valid.sum(axis=1, keepdims=True), 1)
        return ag.sum(memory * weights[:, :, None], axis=1)

    def decode_step(self, state: TransformerState, token: np.ndarray):
        """Append ``token`` (B,) to the prefix and return the next-token logits.

        Recomputes the decoder over the whole prefix (simple and exactly the teacher-forced
        computation; the engine uses a KV cache).

        Returns
        -------
        logits : (B, V_tgt)
        new_state : TransformerState
        attention_weights : (B, H, S) cross-attention of the last layer at the new position,
            or None for decoder_only
        """
        tokens = np.concatenate([state.tokens, np.asarray(token, dtype=np.int64)[:, None]], axis=1)
        logits, cross_weights = self.decode(tokens, state.memory, state.memory_valid)
        weights = None if cross_weights is None else cross_weights[:, :, -1, :]
        return logits[:, -1, :], dataclasses.replace(state, tokens=tokens), weights

    def greedy_decode(self, src: np.ndarray, src_lengths: np.ndarray, max_len: int) -> np.ndarray:
        """Greedy decoding of at most ``max_len`` tokens; see
        :func:`attncore.train.decoding.greedy_decode` for the result.

        encoder_decoder: from ``bos_id`` after the encoded source. decoder_only: each row's
        unpadded source (``source <eos>``, as :func:`attncore.train.loop.prefix_lm_batch`
        trains it) is the prompt, and the first token is predicted from it, as the engine's
        ``generate`` does (the padded batch plus ``bos_id`` as a prefix decoded other text).
        """
        if self.config.kind != "decoder_only":
            return greedy_decode(self, src, src_lengths, max_len)
        src = np.asarray(src)
        lengths = (np.full(len(src), src.shape[1]) if src_lengths is None
                   else np.asarray(src_lengths))
        out = np.full((len(src), max_len), self.config.pad_id, dtype=np.int64)
        used = 0
        for length in np.unique(lengths):   # (prompts of one length decode as one batch)
            rows = np.flatnonzero(lengths == length)
            new = self.generate(src[rows, :length], max_len)
            out[rows, :new.shape[1]] = new
            used = max(used, new.shape[1])
        return out[:, :used]

    def generate(self, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """decoder_only greedy continuation of an unpadded prompt (B, P), used as given.

        Returns the new tokens (B, <= max_new_tokens), ``pad_id`` after ``eos_id``.
        """
        prompt = np.asarray(prompt, dtype=np.int64)
        state = TransformerState(None, None, prompt[:, :-1])
        was_training = self.training
        self.eval()
        try:
            with ag.no_grad():
                token = prompt[:, -1]
                finished = np.zeros(len(prompt), dtype=bool)
                outputs = []
                for _ in range(max_new_tokens):
                    logits, state, _ = self.decode_step(state, token)
                    token = np.where(finished, self.config.pad_id, logits.data.argmax(-1)).astype(np.int64)
                    outputs.append(token)
                    finished |= token == self.config.eos_id
                    if finished.all():
                        break
        finally:
            self.train(was_training)
        return np.stack(outputs, axis=1) if outputs else np.zeros((len(prompt), 0), dtype=np.int64)
