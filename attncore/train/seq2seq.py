"""GRU/LSTM encoder-decoder with Bahdanau or Luong attention (trainer model and reference).

The forward pass is the numerical reference the inference engine is tested against, so it is
written close to the formulas, batch-first, one decoder step at a time.

Encoder
    ``x = E_src[src]`` (B, S, E) -> stacked GRU/LSTM, optionally bidirectional -> memory
    (B, S, H). With ``packed_source`` (default) padded steps do not change the state
    (``pack_padded_sequence`` semantics) and memory rows past the length are 0. A bidirectional
    encoder uses H/2 units per direction and concatenates [forward; backward] (OpenNMT
    convention), so the memory width and the decoder state are always H.
    The decoder starts from the encoder's final state (per layer; both directions concatenated).

Decoder step, ``attention="bahdanau"`` (d2l.ai ``Seq2SeqAttentionDecoder``)
    ``q = h_{t-1}`` (top layer, previous step; LSTM: its h),
    ``score_s = w_v · tanh(W_q q + W_k m_s)``, ``α = masked_softmax(score)`` over valid source
    positions, ``c = Σ α_s m_s``, ``h_t = RNN([c ; E_tgt[y_{t-1}]], h_{t-1})``,
    ``logits = W_out h_t + b_out``.

Decoder step, ``attention="luong_dot" | "luong_general" | "luong_concat"`` (OpenNMT ``GlobalAttention``)
    ``h_t = RNN([E_tgt[y_{t-1}] ; h̃_{t-1}] if input_feeding else E_tgt[y_{t-1}], h_{t-1})``,
    scores with the *current* ``h_t``: dot ``h_t · m_s``; general ``(W_a h_t) · m_s``
    (``linear_in``, (H, H), no bias); concat ``w_v · tanh(W_q h_t + W_k m_s)``;
    ``c = Σ α_s m_s``, ``h̃_t = tanh(W_c [c ; h_t])`` (no bias), ``logits = W_out h̃_t + b_out``;
    ``h̃_0 = 0``.

A fully padded source (length 0) gives all-zero attention weights and a zero context.

Weight names and shapes (torch ``nn.Linear`` / ``nn.GRU`` / ``nn.LSTM`` layouts, G = 3 for GRU,
4 for LSTM, Hd = H per direction) are declared in :func:`attncore.io.weight_spec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import autograd as ag
from .config import ConfigDict
from .autograd import Tensor
from .decoding import greedy_decode
from .layers import Embedding, Linear, Module, RNN

__all__ = ["Seq2SeqConfig", "Seq2SeqAttention", "DecoderState", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("bahdanau", "luong_dot", "luong_general", "luong_concat")


@dataclass
class Seq2SeqConfig(ConfigDict):
    """Hyper-parameters of :class:`Seq2SeqAttention` (all written to ``config.json``).

    Attributes
    ----------
    src_vocab_size, tgt_vocab_size : int
    embed_dim : int
        E, the width of both token embeddings.
    hidden_size : int
        H, the decoder state width and the encoder memory width (even when bidirectional).
    num_layers : int
        Layers of the encoder and of the decoder (same for both).
    rnn_type : {"gru", "lstm"}
    bidirectional : bool
        Encoder only.
    attention : {"bahdanau", "luong_dot", "luong_general", "luong_concat"}
    attention_dim : int
        A, the hidden width of additive scores (bahdanau, luong_concat); 0 means H.
    input_feeding : bool
        Luong only: feed h̃_{t-1} into the decoder RNN.
    packed_source : bool
        Encoder ignores padded steps (True) or runs over them like d2l.ai (False).
    dropout : float
        Training-time dropout on embeddings and on the decoder output features.
    dtype : {"float32", "float64"}
    pad_id, bos_id, eos_id, unk_id : int
    tokenizer : dict or None
        Reference to the tokenizer (e.g. ``{"type": "vocab", "src": "src_vocab.json", ...}``).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 32
    hidden_size: int = 64
    num_layers: int = 1
    rnn_type: str = "gru"
    bidirectional: bool = False
    attention: str = "bahdanau"
    attention_dim: int = 0
    input_feeding: bool = False
    packed_source: bool = True
    dropout: float = 0.0
    dtype: str = "float32"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    tokenizer: Optional[dict] = None

    architecture = "seq2seq_attention"

    def __post_init__(self):
        if self.rnn_type not in ("gru", "lstm"):
            raise ValueError(f"rnn_type must be 'gru' or 'lstm', got {self.rnn_type!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.bidirectional and self.hidden_size % 2:
            raise ValueError(f"a bidirectional encoder needs an even hidden_size, got {self.hidden_size}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")



@dataclass
class DecoderState:
    """Everything one decoder step needs; :meth:`Seq2SeqAttention.decode_step` returns a new one.

    Attributes
    ----------
    memory : (B, S, H) encoder outputs
    memory_valid : bool (B, S), True on real (non-padded) source positions
    projected_keys : (B, S, A) ``W_k m_s``, computed once per source (additive scores only)
    rnn_state : list per decoder layer: h (B, H) for GRU, (h, c) for LSTM
    input_feed : (B, H) h̃ of the previous step (Luong with input feeding), else None
    """

    memory: Tensor
    memory_valid: np.ndarray
    projected_keys: Optional[Tensor]
    rnn_state: list
    input_feed: Optional[Tensor] = None


class _Attention(Module):
    """The attention parameters of the decoder (names ``decoder.attention.*``)."""

    def __init__(self, config: Seq2SeqConfig, rng: np.random.Generator, dtype):
        super().__init__()
        hidden, kind = config.hidden_size, config.attention
        attention_dim = config.attention_dim or hidden
        if kind in ("bahdanau", "luong_concat"):
            self.query = Linear(hidden, attention_dim, rng, bias=False, dtype=dtype)
            self.key = Linear(hidden, attention_dim, rng, bias=False, dtype=dtype)
            self.score = Linear(attention_dim, 1, rng, bias=False, dtype=dtype)
        if kind == "luong_general":
            self.linear_in = Linear(hidden, hidden, rng, bias=False, dtype=dtype)
        if kind.startswith("luong"):
            self.output = Linear(2 * hidden, hidden, rng, bias=False, dtype=dtype)


class _Encoder(Module):
    def __init__(self, config: Seq2SeqConfig, rng: np.random.Generator, dtype):
        super().__init__()
        per_direction = config.hidden_size // (2 if config.bidirectional else 1)
        self.embedding = Embedding(config.src_vocab_size, config.embed_dim, rng, std=1.0, dtype=dtype)
        self.rnn = RNN(config.rnn_type, config.embed_dim, per_direction, config.num_layers, rng,
                       bidirectional=config.bidirectional, dtype=dtype)


class _Decoder(Module):
    def __init__(self, config: Seq2SeqConfig, rng: np.random.Generator, dtype):
        super().__init__()
        hidden = config.hidden_size
        feeds_context = config.attention == "bahdanau" or config.input_feeding
        self.embedding = Embedding(config.tgt_vocab_size, config.embed_dim, rng, std=1.0, dtype=dtype)
        self.rnn = RNN(config.rnn_type, config.embed_dim + (hidden if feeds_context else 0), hidden,
                       config.num_layers, rng, dtype=dtype)
        self.attention = _Attention(config, rng, dtype)
        self.output = Linear(hidden, config.tgt_vocab_size, rng, dtype=dtype)


class Seq2SeqAttention(Module):
    """Encoder-decoder RNN with attention; see the module docstring for the equations.

    Parameters
    ----------
    config : Seq2SeqConfig
    seed : int
        Seeds the initialisation (and nothing else).
    """

    def __init__(self, config: Seq2SeqConfig, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "config", config)
        dtype = np.dtype(config.dtype)
        rng = np.random.default_rng(seed)
        self.encoder = _Encoder(config, rng, dtype)
        self.decoder = _Decoder(config, rng, dtype)
        # Dropout masks come from this generator; the training loop reseeds it (checkpointed).
        object.__setattr__(self, "dropout_rng", np.random.default_rng(seed + 1))

    # -- encoder ------------------------------------------------------------------------------
    def encode(self, src: np.ndarray, src_lengths: np.ndarray) -> DecoderState:
        """Run the encoder and build the initial decoder state.

        Parameters
        ----------
        src : int (B, S), padded with ``pad_id``
        src_lengths : int (B,), in [0, S]
        """
        config = self.config
        src, src_lengths = np.asarray(src), np.asarray(src_lengths)
        embedded = ag.dropout(self.encoder.embedding(src), config.dropout, self.dropout_rng, self.training)
        memory, final = self.encoder.rnn(embedded, src_lengths, packed=config.packed_source)
        memory_valid = np.arange(src.shape[1])[None, :] < src_lengths[:, None]

        if config.bidirectional:  # concatenate [forward; backward] per layer (and per h / c)
            final = [_concat_directions(final[2 * layer], final[2 * layer + 1]) for layer in range(config.num_layers)]
        attention = self.decoder.attention
        projected_keys = attention.key(memory) if config.attention in ("bahdanau", "luong_concat") else None
        input_feed = None
        if config.attention != "bahdanau" and config.input_feeding:
            input_feed = Tensor(np.zeros((src.shape[0], config.hidden_size), dtype=memory.dtype))
        return DecoderState(memory, memory_valid, projected_keys, final, input_feed)

    # -- one decoder step ---------------------------------------------------------------------
    def _attend(self, query: Tensor, state: DecoderState) -> Tuple[Tensor, Tensor]:
        """Attention weights (B, S) and context (B, H) for a query (B, H)."""
        attention, kind = self.decoder.attention, self.config.attention
        if kind in ("bahdanau", "luong_concat"):
            features = ag.tanh(attention.query(query)[:, None, :] + state.projected_keys)  # (B, S, A)
            scores = attention.score(features)[:, :, 0]                                     # (B, S)
        elif kind == "luong_dot":
            scores = (state.memory @ query[:, :, None])[:, :, 0]
        else:  # luong_general: (W_a h_t) · m_s
            scores = (state.memory @ attention.linear_in(query)[:, :, None])[:, :, 0]
        weights = ag.softmax(scores, axis=-1, valid=state.memory_valid)
        context = (weights[:, None, :] @ state.memory)[:, 0, :]
        return weights, context

    def decode_step(self, state: DecoderState, token: np.ndarray):
        """Advance the decoder by one target token.

        Parameters
        ----------
        state : DecoderState
        token : int (B,), the previous target token (``bos_id`` at the first step)

        Returns
        -------
        logits : (B, tgt_vocab_size)
        new_state : DecoderState
        attention_weights : (B, S)
        """
        config, decoder = self.config, self.decoder
        embedded = ag.dropout(decoder.embedding(np.asarray(token)), config.dropout, self.dropout_rng, self.training)
        if config.attention == "bahdanau":
            query = RNN.top(state.rnn_state[-1])
            weights, context = self._attend(query, state)
            output, rnn_state = decoder.rnn.step(ag.concat([context, embedded], axis=-1), state.rnn_state)
            features, input_feed = output, None
        else:
            rnn_input = embedded if state.input_feed is None else ag.concat([embedded, state.input_feed], axis=-1)
            output, rnn_state = decoder.rnn.step(rnn_input, state.rnn_state)
            weights, context = self._attend(output, state)
            features = ag.tanh(decoder.attention.output(ag.concat([context, output], axis=-1)))
            input_feed = features if state.input_feed is not None else None
        features = ag.dropout(features, config.dropout, self.dropout_rng, self.training)
        logits = decoder.output(features)
        new_state = dataclasses.replace(state, rnn_state=rnn_state, input_feed=input_feed)
        return logits, new_state, weights

    # -- whole sequences ------------------------------------------------------------------------
    def forward(self, src: np.ndarray, src_lengths: np.ndarray, tgt_in: np.ndarray,
                return_attention: bool = False):
        """Teacher forcing: logits for every position of ``tgt_in``.

        Parameters
        ----------
        src : int (B, S); src_lengths : int (B,)
        tgt_in : int (B, T), the target shifted right (starts with ``bos_id``)

        Returns
        -------
        logits : (B, T, tgt_vocab_size)
        attention : (B, T, S), only with ``return_attention``
        """
        state = self.encode(src, src_lengths)
        tgt_in = np.asarray(tgt_in)
        all_logits, all_weights = [], []
        for t in range(tgt_in.shape[1]):
            logits, state, weights = self.decode_step(state, tgt_in[:, t])
            all_logits.append(logits)
            all_weights.append(weights)
        logits = ag.stack(all_logits, axis=1)
        return (logits, ag.stack(all_weights, axis=1)) if return_attention else logits

    __call__ = forward

    def greedy_decode(self, src: np.ndarray, src_lengths: np.ndarray, max_len: int) -> np.ndarray:
        """Greedy decoding from ``bos_id``; stops when every row emitted ``eos_id``.

        Returns
        -------
        tokens : int (B, <= max_len), the predicted tokens (``eos_id`` included), ``pad_id`` after it
        """
        return greedy_decode(self, src, src_lengths, max_len)


def _concat_directions(forward, backward):
    if isinstance(forward, tuple):
        return tuple(ag.concat([f, b], axis=-1) for f, b in zip(forward, backward))
    return ag.concat([forward, backward], axis=-1)
