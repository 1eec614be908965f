"""RAN (Recurrent Attention Network) for the NumPy trainer: encoder, heads, causal LM, weights.

The forward pass follows ``shared/design/RAN.md`` §2.2-2.12 (V3 semantics of the official
``rannet`` 0.3.1) and is the reference the inference engine is tested against. Per layer::

    for each window k of about W tokens (GPC = the carried "global perception cell" c):
        Z   = LN_concat([c ; X_k])                         (1+w, D), concat-LN row by row
        Q,K,V = swish(Z W + b), RoPE on Q and K (positions 0..w, GPC at 0, restart per window)
        O   = swish(concat_heads(softmax(QK^T/sqrt(d)) V) W_o + b_o)
        A   = LN_attn(O + GLU_attn(Z))
        g_k = stdnorm(A[0]);  Y_k = stdnorm(A[1:])
        c   = g_1 if k == 1 else LN_cellres(g_k + GLU_cell(g_{k-1}))   (raw previous g)
    memory review: Out = LN_mr(swish(softmax(Q G^T/sqrt(D)) V W_o + b_o) + GLU_mr(Q)),
        Q = swish(Y W_q + b_q), K,V = swish(G W + b), G = [g_1 .. g_n]
    pooled = c_n ("last"), mean or max of G; the next layer starts from c_n.

``c_0`` is ``beta`` of ``cell-initializer-layernorm`` unless a non-zero history cell is given
(then it is used as is). There is no feed-forward block. The uncentred LayerNorm
(``sqrt(mean(x^2) + 1e-7)``) is used everywhere.

Where attncore deliberately differs from the released code
----------------------------------------------------------
* **Padded batches** (RAN.md §2.14, §7): every document is cut into windows by its own length,
  padded keys and padded windows are masked (in the window attention, the memory review and
  mean/max pooling), and the all-zero history test is made per row. A document's result in a
  padded batch therefore equals running it alone; the released code gives padding-dependent
  results. For an unpadded single sequence both agree (tested against official outputs).
* **Causal mode** (``causal=True``, RAN.md §7). Under the released causal mask the GPC only sees
  itself, so no information crosses windows. Here every window gets one extra **summary slot**
  appended after its tokens (input: a learned per-layer vector ``summary``; RoPE position
  w+1). Under the causal mask it sees the incoming GPC and every token of the window, and its
  output (stdnorm'ed) replaces ``g_k``: it feeds the GPC recurrence and the memory review, so
  window k+1 starts from a state that has read window k. Token rows still see only the GPC and
  earlier tokens of their own window. The memory review is masked too: a token of window k
  attends to ``[c_0, g_1 .. g_{k-1}]`` (the initial cell and *finished* windows only). Tail
  merging is switched off in causal mode (every window has at most W tokens), and a layer
  >= 1 starts from its own initial cell (``beta`` of its ``cell_init_norm``) instead of the
  previous layer's last cell, which has read the whole sequence. So the outputs at positions
  <= t depend on tokens <= t only, whatever the total length: a prefix gives the same outputs
  as the whole sequence, which generation needs. ``history`` still feeds layer 0 only.

Heads
-----
* ``num_classes > 0``: document classifier ``logits = pooled W^T + b`` on the last layer's
  pooled GPC (``classifier.*``).
* ``token_head="lm"``: the RanNet MLM/LM head, tied to the token embedding:
  ``logits = LN_mlm(swish(X W + b)) E^T + b_mlm`` (``lm_head.*``).
* ``token_head="tag"``: a token classifier ``logits = X W^T + b`` (``tagger.*``).

Weight layout: dense weights are (out, in) like ``torch.nn.Linear`` (the official kernels are
(in, out): :func:`from_rannet_variables` transposes them). Names are declared once in
:func:`ran_weight_spec`, registered as architecture ``"ran"`` in :mod:`attncore.io`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Union

import numpy as np

from . import autograd as ag
from .config import ConfigDict
from .autograd import Tensor
from .layers import Embedding, Linear, Module, ModuleList
from .ran_ops import (GLU, RANLayerNorm, WindowLayout, gather_rows, masked_max, masked_mean,
                      rotary_tables, stdnorm, swish_linear, window_layout)

__all__ = ["RANConfig", "RAN", "RANOutput", "ran_weight_spec", "from_rannet_variables",
           "CELL_POOLINGS", "TOKEN_HEADS"]

CELL_POOLINGS = ("last", "mean", "max")
TOKEN_HEADS = ("none", "lm", "tag")


@dataclass
class RANConfig(ConfigDict):
    """Hyper-parameters of :class:`RAN` (all written to ``config.json``).

    Attributes
    ----------
    vocab_size : int
        V.
    embedding_size : int
        D, the model width.
    ran_layers : int
        L.
    head_num, head_size : int
        H heads of d dimensions in the window attention (H*d need not equal D).
    window_size, min_window_size : int
        W and m of the window partition (RAN.md §2.4). An inference-time choice: positions
        are relative, so a model may run with other values.
    cell_pooling : {"last", "mean", "max"}
        How the last layer's GPCs become the document vector.
    causal : bool
        Causal (language-model) mode with the summary slot; see the module docstring.
    memory_review : bool
        Memory review after the windows (True in released models); else ``LN_output(Y)``.
    num_classes : int
        Document classes of the classifier head; 0 for none.
    token_head : {"none", "lm", "tag"}
    num_token_classes : int
        Classes of the ``"tag"`` head.
    dropout : float
        Training-time dropout on the embeddings and on each layer's output.
    dtype : {"float32", "float64"}
    pad_id, bos_id, eos_id, unk_id : int
    tokenizer : dict or None
    """

    vocab_size: int
    embedding_size: int = 64
    ran_layers: int = 2
    head_num: int = 4
    head_size: int = 16
    window_size: int = 16
    min_window_size: int = 4
    cell_pooling: str = "last"
    causal: bool = False
    memory_review: bool = True
    num_classes: int = 0
    token_head: str = "none"
    num_token_classes: int = 0
    dropout: float = 0.0
    dtype: str = "float32"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    tokenizer: Optional[dict] = None

    architecture = "ran"

    def __post_init__(self):
        for name in ("vocab_size", "embedding_size", "ran_layers", "head_num", "head_size",
                     "window_size", "min_window_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_window_size > self.window_size:
            raise ValueError(f"min_window_size ({self.min_window_size}) must be <= window_size "
                             f"({self.window_size})")
        if self.head_size % 2:
            raise ValueError(f"head_size must be even (RoPE pairs), got {self.head_size}")
        if self.cell_pooling not in CELL_POOLINGS:
            raise ValueError(f"cell_pooling must be one of {CELL_POOLINGS}, got {self.cell_pooling!r}")
        if self.token_head not in TOKEN_HEADS:
            raise ValueError(f"token_head must be one of {TOKEN_HEADS}, got {self.token_head!r}")
        if self.token_head == "tag" and self.num_token_classes < 1:
            raise ValueError("token_head='tag' needs num_token_classes >= 1")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")



def _as_config(config: Union[RANConfig, Mapping]) -> RANConfig:
    return config if isinstance(config, RANConfig) else RANConfig.from_dict(config)


# ------------------------------------------------------------------------------------------
# Weight spec
# ------------------------------------------------------------------------------------------

def ran_weight_spec(config: Union[RANConfig, Mapping]) -> Dict[str, tuple]:
    """Every weight of a RAN model: ``{name: (shape, dtype)}``.

    ==============================================  ===========  ==================================
    name                                            shape        official rannet name (in, out)
    ==============================================  ===========  ==================================
    embedding.weight                                (V, D)       token-embedding/embeddings
    embedding_norm.{weight,bias}                    (D)          embedding-layernorm/{gamma,beta}
    layers.i.concat_norm.{weight,bias}              (D)          ran-i/concat-layernorm
    layers.i.window_attn.{query,key,value}.weight   (H*d, D)     ran-i/encode-attn/dense-{q,k,v}
    layers.i.window_attn.{query,key,value}.bias     (H*d)
    layers.i.window_attn.output.{weight,bias}       (D, H*d)     ran-i/encode-attn/dense-o
    layers.i.window_attn.glu.{value,gate}.*         (D, D)       ran-i/encode-attn/glu/dense-{t,g}
    layers.i.window_attn.norm.{weight,bias}         (D)          ran-i/encode-attn/layernorm
    layers.i.cell_init.weight                       (D, D)       cell-initializer/kernel (no bias)
    layers.i.cell_init_norm.{weight,bias}           (D)          cell-initializer-layernorm
    layers.i.cell_glu.{value,gate}.*                (D, D)       ran-i/cell-glu/dense-{t,g}
    layers.i.cell_norm.{weight,bias}                (D)          ran-i/cell-residual-layernorm
    layers.i.summary                                (D)          causal only (attncore)
    layers.i.memory_review.{query,key,value,output}.*  (D, D)    ran-i/output-attn/dense-{q,k,v,o}
    layers.i.memory_review.glu.{value,gate}.*       (D, D)       ran-i/output-attn/glu/dense-{t,g}
    layers.i.memory_review.norm.{weight,bias}       (D)          ran-i/output-attn/layernorm
    layers.i.output_norm.{weight,bias}              (D)          ran-i/output-layernorm (no review)
    classifier.{weight,bias}                        (C, D), (C)  num_classes > 0 (attncore)
    lm_head.dense.{weight,bias}                     (D, D)       mlm-hidden/dense
    lm_head.norm.{weight,bias}                      (D)          mlm-hidden/layernorm
    lm_head.bias                                    (V)          mlm-matching/bias
    tagger.{weight,bias}                            (K, D), (K)  token_head = "tag" (attncore)
    ==============================================  ===========  ==================================

    ``cell_init.weight`` never changes a V3 output (it multiplies a zero vector) but is kept so
    official checkpoints convert one to one.
    """
    c = _as_config(config)
    dt = c.dtype
    D, V, HD = c.embedding_size, c.vocab_size, c.head_num * c.head_size

    def dense(prefix, n_out, n_in):
        return {f"{prefix}.weight": ((n_out, n_in), dt), f"{prefix}.bias": ((n_out,), dt)}

    def norm(prefix):
        return {f"{prefix}.weight": ((D,), dt), f"{prefix}.bias": ((D,), dt)}

    def glu(prefix):
        return {**dense(f"{prefix}.value", D, D), **dense(f"{prefix}.gate", D, D)}

    spec = {"embedding.weight": ((V, D), dt), **norm("embedding_norm")}
    for i in range(c.ran_layers):
        p = f"layers.{i}"
        spec.update(norm(f"{p}.concat_norm"))
        for proj in ("query", "key", "value"):
            spec.update(dense(f"{p}.window_attn.{proj}", HD, D))
        spec.update(dense(f"{p}.window_attn.output", D, HD))
        spec.update(glu(f"{p}.window_attn.glu"))
        spec.update(norm(f"{p}.window_attn.norm"))
        spec[f"{p}.cell_init.weight"] = ((D, D), dt)
        spec.update(norm(f"{p}.cell_init_norm"))
        spec.update(glu(f"{p}.cell_glu"))
        spec.update(norm(f"{p}.cell_norm"))
        if c.causal:
            spec[f"{p}.summary"] = ((D,), dt)
        if c.memory_review:
            for proj in ("query", "key", "value", "output"):
                spec.update(dense(f"{p}.memory_review.{proj}", D, D))
            spec.update(glu(f"{p}.memory_review.glu"))
            spec.update(norm(f"{p}.memory_review.norm"))
        else:
            spec.update(norm(f"{p}.output_norm"))
    if c.num_classes:
        spec.update(dense("classifier", c.num_classes, D))
    if c.token_head == "lm":
        spec.update(dense("lm_head.dense", D, D))
        spec.update(norm("lm_head.norm"))
        spec["lm_head.bias"] = ((V,), dt)
    elif c.token_head == "tag":
        spec.update(dense("tagger", c.num_token_classes, D))
    return spec


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------

class _WindowAttention(Module):
    """pMHSA: swish projections, RoPE, masked softmax, GLU residual and LN (RAN.md §2.5)."""

    def __init__(self, c: RANConfig, rng, dtype):
        super().__init__()
        D, HD = c.embedding_size, c.head_num * c.head_size
        self.query = Linear(D, HD, rng, dtype=dtype)
        self.key = Linear(D, HD, rng, dtype=dtype)
        self.value = Linear(D, HD, rng, dtype=dtype)
        self.output = Linear(HD, D, rng, dtype=dtype)
        self.glu = GLU(D, rng, dtype)
        self.norm = RANLayerNorm(D, dtype)


class _MemoryReview(Module):
    """Single-head cross-attention from tokens to window GPCs (RAN.md §2.8)."""

    def __init__(self, c: RANConfig, rng, dtype):
        super().__init__()
        D = c.embedding_size
        self.query = Linear(D, D, rng, dtype=dtype)
        self.key = Linear(D, D, rng, dtype=dtype)
        self.value = Linear(D, D, rng, dtype=dtype)
        self.output = Linear(D, D, rng, dtype=dtype)
        self.glu = GLU(D, rng, dtype)
        self.norm = RANLayerNorm(D, dtype)


class _RANLayer(Module):
    def __init__(self, c: RANConfig, rng, dtype):
        super().__init__()
        D = c.embedding_size
        self.concat_norm = RANLayerNorm(D, dtype)
        self.window_attn = _WindowAttention(c, rng, dtype)
        self.cell_init = Linear(D, D, rng, bias=False, dtype=dtype)
        self.cell_init_norm = RANLayerNorm(D, dtype)
        # Its beta is the initial GPC c_0. Zero (the usual LN init) would make the GPC row of
        # the first window the zero vector, where the uncentred LN has slope 1/sqrt(1e-7):
        # start from a random unit-scale cell instead.
        self.cell_init_norm.bias.data = rng.standard_normal(D).astype(dtype)
        self.cell_glu = GLU(D, rng, dtype)
        self.cell_norm = RANLayerNorm(D, dtype)
        if c.causal:
            self.summary = Tensor((rng.standard_normal(D) * 0.02).astype(dtype), requires_grad=True)
        if c.memory_review:
            self.memory_review = _MemoryReview(c, rng, dtype)
        else:
            self.output_norm = RANLayerNorm(D, dtype)


class _LMHead(Module):
    def __init__(self, c: RANConfig, rng, dtype):
        super().__init__()
        self.dense = Linear(c.embedding_size, c.embedding_size, rng, dtype=dtype)
        self.norm = RANLayerNorm(c.embedding_size, dtype)
        self.bias = Tensor(np.zeros(c.vocab_size, dtype=dtype), requires_grad=True)


@dataclass
class RANOutput:
    """Outputs of :meth:`RAN.encode`.

    Attributes
    ----------
    sequence : Tensor (B, T, D)
        Last layer's token outputs; rows past a document's length are meaningless.
    pooled : Tensor (B, D)
        Last layer's pooled GPC (``cell_pooling``): the document vector.
    history : Tensor (B, D)
        Last layer's last carried GPC c_n, to pass as ``history`` of a following chunk.
    window_cells : Tensor (B, n, D)
        Last layer's raw per-window GPCs g_k (steps past a document's windows are meaningless).
    layout : WindowLayout
    """
    sequence: Tensor
    pooled: Tensor
    history: Tensor
    window_cells: Tensor
    layout: WindowLayout


class RAN(Module):
    """RAN encoder (bidirectional or causal) with optional document and token heads.

    Parameters
    ----------
    config : RANConfig
    seed : int
        Seeds the initialisation (dense layers uniform in ±1/sqrt(fan_in), embeddings
        N(0, 1) -- N(0, 0.02^2), the official RanNet's scale, with the tied LM head --, norms
        weight 1 bias 0 except the initial cell ``cell_init_norm.bias`` N(0, 1)).
    """

    def __init__(self, config: RANConfig, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "config", config)
        dtype = np.dtype(config.dtype)
        rng = np.random.default_rng(seed)
        D = config.embedding_size
        # The tied LM head's logits are a unit-variance LayerNorm output times the embedding:
        # N(0, 1) rows made their spread sqrt(D) (initial loss 29-84 nats for ln V = 9 at
        # D = 64-512). Elsewhere a LayerNorm follows the embedding, so its scale only changes
        # how fast Adam moves it; N(0, 1) keeps the recorded classifier trainings reproducible.
        std = 0.02 if config.token_head == "lm" else 1.0
        self.embedding = Embedding(config.vocab_size, D, rng, std=std, dtype=dtype)
        self.embedding_norm = RANLayerNorm(D, dtype)
        self.layers = ModuleList([_RANLayer(config, rng, dtype) for _ in range(config.ran_layers)])
        if config.num_classes:
            self.classifier = Linear(D, config.num_classes, rng, dtype=dtype)
        if config.token_head == "lm":
            self.lm_head = _LMHead(config, rng, dtype)
        elif config.token_head == "tag":
            self.tagger = Linear(D, config.num_token_classes, rng, dtype=dtype)
        object.__setattr__(self, "dropout_rng", np.random.default_rng(seed + 1))

    # -- inputs -------------------------------------------------------------------------------
    def _lengths(self, ids: np.ndarray, lengths: Optional[np.ndarray]) -> np.ndarray:
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 2-D integer array (batch, length), got {ids.dtype} {ids.shape}")
        if lengths is None:
            # Right padding with pad_id is assumed; RAN's own mask is ``id > 0`` (RAN.md §2.1).
            lengths = (ids != self.config.pad_id).sum(axis=1)
            cols = np.arange(ids.shape[1])[None, :]
            if ((cols >= lengths[:, None]) != (ids == self.config.pad_id)).any():
                raise ValueError("ids contain pad_id inside a sequence: pass lengths explicitly")
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (ids.shape[0],):
            raise ValueError(f"lengths must have shape ({ids.shape[0]},), got {lengths.shape}")
        return lengths

    def _initial_cell(self, layer: _RANLayer, history, batch: int, dtype) -> Tensor:
        # V3: no (or an all-zero) cell -> LN_ci(swish(0 W_ci)) = beta_ci exactly; a non-zero
        # cell is used as is. Decided per row here (the released code decides per batch).
        beta = ag.reshape(layer.cell_init_norm.bias, (1, -1))
        init = ag.add(beta, np.zeros((batch, 1), dtype=dtype))
        if history is None:
            return init
        history = ag.as_tensor(history)
        if history.shape != (batch, self.config.embedding_size):
            raise ValueError(f"history must have shape ({batch}, {self.config.embedding_size}), "
                             f"got {history.shape}")
        zero_rows = ~np.any(history.data != 0, axis=1, keepdims=True)
        return ag.where(zero_rows, init, history)

    # -- one layer ----------------------------------------------------------------------------
    def _window_step(self, layer: _RANLayer, cell: Tensor, x: Tensor, layout: WindowLayout,
                     k: int):
        """Run window k of every document: returns (g (B, D), Y_k (B, width_k, D))."""
        c = self.config
        attn = layer.window_attn
        batch = cell.shape[0]
        index, valid, width = layout.token_index[k], layout.token_valid[k], layout.widths[k]
        block = index.shape[1]
        rows = [ag.reshape(cell, (batch, 1, -1)), gather_rows(x, index)]
        if c.causal:
            rows.append(ag.add(ag.reshape(layer.summary, (1, 1, -1)),
                               np.zeros((batch, 1, 1), dtype=cell.dtype)))
        z = layer.concat_norm(ag.concat(rows, axis=1))                       # (B, R, D)
        num_rows = z.shape[1]

        # RoPE positions: GPC 0, tokens 1..block, summary slot w_b + 1 (its true position).
        positions = np.broadcast_to(np.arange(num_rows), (batch, num_rows)).copy()
        if c.causal:
            positions[:, -1] = width + 1
        cos, sin = rotary_tables(positions[:, None, :], c.head_size, cell.dtype)   # (B,1,R,d/2)

        def heads(t):  # (B, R, H*d) -> (B, H, R, d)
            return ag.transpose(ag.reshape(t, (batch, num_rows, c.head_num, c.head_size)), (0, 2, 1, 3))

        q = ag.rotary_interleaved(heads(swish_linear(attn.query, z)), cos, sin)
        k_ = ag.rotary_interleaved(heads(swish_linear(attn.key, z)), cos, sin)
        v = heads(swish_linear(attn.value, z))
        scores = ag.matmul(q, ag.transpose(k_, (0, 1, 3, 2))) * (1.0 / math.sqrt(c.head_size))

        key_valid = np.concatenate([np.ones((batch, 1), bool), valid]
                                   + ([np.ones((batch, 1), bool)] if c.causal else []), axis=1)
        allowed = key_valid[:, None, None, :]                                # (B, 1, 1, R)
        if c.causal:
            allowed = allowed & np.tril(np.ones((num_rows, num_rows), bool))[None, None]
        probs = ag.softmax(scores, axis=-1, valid=allowed)
        context = ag.reshape(ag.transpose(ag.matmul(probs, v), (0, 2, 1, 3)),
                             (batch, num_rows, c.head_num * c.head_size))    # head-major h*d+j
        out = swish_linear(attn.output, context)
        a = attn.norm(out + attn.glu(z))                                     # (B, R, D)
        g = stdnorm(a[:, -1] if c.causal else a[:, 0])
        y = stdnorm(a[:, 1:1 + block])
        return g, y

    def _memory_review(self, layer: _RANLayer, y: Tensor, cells: Tensor, initial: Tensor,
                       layout: WindowLayout) -> Tensor:
        """Tokens (B, T, D) attend to window GPCs (B, n, D) -> (B, T, D)."""
        review = layer.memory_review
        if self.config.causal:
            # Token of window k sees the initial cell and the GPCs of windows < k only.
            keys = ag.concat([ag.reshape(initial, (initial.shape[0], 1, -1)), cells], axis=1)
            allowed = (np.arange(keys.shape[1])[None, None, :]
                       <= layout.window_of_token[:, :, None])               # (B, T, 1+n)
        else:
            keys = cells
            allowed = layout.window_valid()[:, None, :]                      # (B, 1, n)
        q = swish_linear(review.query, y)
        k = swish_linear(review.key, keys)
        v = swish_linear(review.value, keys)
        scores = ag.matmul(q, ag.transpose(k, (0, 2, 1))) * (1.0 / math.sqrt(self.config.embedding_size))
        probs = ag.softmax(scores, axis=-1, valid=allowed)
        out = swish_linear(review.output, ag.matmul(probs, v))
        return review.norm(out + review.glu(q))                              # GLU of projected Q

    def _layer(self, layer: _RANLayer, x: Tensor, cell: Tensor, layout: WindowLayout):
        """One RAN layer over the whole batch: returns (Out, last cell, pooled, G)."""
        initial = cell
        g_prev = None
        window_outputs, window_cells = [], []
        for k in range(layout.num_steps):
            g, y = self._window_step(layer, cell, x, layout, k)
            if k == 0:
                new_cell = g                                                 # no residual
            else:
                new_cell = layer.cell_norm(g + layer.cell_glu(g_prev))       # raw previous g
            active = layout.active[k][:, None]
            cell = new_cell if active.all() else ag.where(active, new_cell, cell)
            g_prev = g if g_prev is None or active.all() else ag.where(active, g, g_prev)
            window_outputs.append(y)
            window_cells.append(g)
        y_all = gather_rows(ag.concat(window_outputs, axis=1), layout.scatter_index)   # (B, T, D)
        cells = ag.stack(window_cells, axis=1)                                          # (B, n, D)
        if self.config.memory_review:
            out = self._memory_review(layer, y_all, cells, initial, layout)
        else:
            out = layer.output_norm(y_all)
        window_valid = layout.window_valid()[:, :, None]
        pooling = self.config.cell_pooling
        if pooling == "last":
            pooled = cell
        elif pooling == "mean":
            pooled = masked_mean(cells, window_valid, axis=1)
        else:
            pooled = masked_max(cells, window_valid, axis=1)
        return out, cell, pooled, cells

    # -- public -------------------------------------------------------------------------------
    def encode(self, ids: np.ndarray, lengths: Optional[np.ndarray] = None, history=None, *,
               window_size: Optional[int] = None, min_window_size: Optional[int] = None) -> RANOutput:
        """Run the embedding and every RAN layer.

        Parameters
        ----------
        ids : int (B, T)
            Token ids, right-padded with ``pad_id``.
        lengths : int (B,), optional
            Real tokens per row (each >= 1); by default the count of non-pad ids.
        history : (B, D) array or Tensor, optional
            Initial GPC of layer 0 (a previous chunk's ``history``); all-zero rows mean none.
        window_size, min_window_size : int, optional
            Override the configured window partition (positions are relative).

        Returns
        -------
        RANOutput
        """
        c = self.config
        ids = np.asarray(ids)
        lengths = self._lengths(ids, lengths)
        # (None, not any falsy value: window_size=0 ran the configured W, where the engine
        # refuses it)
        window = c.window_size if window_size is None else int(window_size)
        minimum = c.min_window_size if min_window_size is None else int(min_window_size)
        if window < 1 or minimum < 1:
            raise ValueError(f"window_size and min_window_size must be >= 1, got {window} and "
                             f"{minimum}")
        layout = window_layout(lengths, ids.shape[1], window, minimum, merge_tail=not c.causal)
        x = self.embedding_norm(ag.embedding(self.embedding.weight, ids))
        x = ag.dropout(x, c.dropout, self.dropout_rng, self.training)
        cell = None
        for index, layer in enumerate(self.layers):
            if index == 0:
                cell = self._initial_cell(layer, history, ids.shape[0], x.dtype)
            elif c.causal:
                # The previous layer's last cell has read the whole sequence, future included:
                # a causal layer starts from its own initial cell instead.
                cell = self._initial_cell(layer, None, ids.shape[0], x.dtype)
            # Bidirectional layers >= 1 start from the previous layer's last cell as is (V3).
            x, cell, pooled, cells = self._layer(layer, x, cell, layout)
            x = ag.dropout(x, c.dropout, self.dropout_rng, self.training)
        return RANOutput(x, pooled, cell, cells, layout)

    def __call__(self, ids: np.ndarray, lengths: Optional[np.ndarray] = None, history=None,
                 **window) -> Tensor:
        """The model's main output: document logits when it has a classifier (what the
        trainer's ``classification_loss`` calls), else per-token logits."""
        if self.config.num_classes:
            return self.classify(ids, lengths, history, **window)
        return self.token_logits(ids, lengths, history, **window)

    def classify(self, ids: np.ndarray, lengths: Optional[np.ndarray] = None, history=None,
                 **window) -> Tensor:
        """Document logits (B, num_classes) from the pooled GPC."""
        if not self.config.num_classes:
            raise ValueError("this RAN has no classifier (num_classes = 0)")
        return self.classifier(self.encode(ids, lengths, history, **window).pooled)

    def token_logits(self, ids: np.ndarray, lengths: Optional[np.ndarray] = None, history=None,
                     **window) -> Tensor:
        """Per-token logits (B, T, V) for ``token_head="lm"`` or (B, T, K) for ``"tag"``."""
        return self.token_head(self.encode(ids, lengths, history, **window).sequence)

    def token_head(self, sequence: Tensor) -> Tensor:
        """Apply the token head to encoder outputs (B, T, D)."""
        if self.config.token_head == "lm":
            head = self.lm_head
            h = head.norm(swish_linear(head.dense, sequence))
            return ag.matmul(h, ag.transpose(self.embedding.weight)) + head.bias
        if self.config.token_head == "tag":
            return self.tagger(sequence)
        raise ValueError("this RAN has no token head (token_head = 'none')")

    def lm_loss(self, ids: np.ndarray, lengths: Optional[np.ndarray] = None) -> Tensor:
        """Mean next-token cross-entropy of a causal LM (position t predicts ids[t+1])."""
        if not self.config.causal or self.config.token_head != "lm":
            raise ValueError("lm_loss needs causal=True and token_head='lm'")
        ids = np.asarray(ids)
        lengths = self._lengths(ids, lengths)
        logits = self.token_logits(ids, lengths)[:, :-1]
        targets = np.where(np.arange(1, ids.shape[1])[None, :] < lengths[:, None], ids[:, 1:], -1)
        return ag.cross_entropy(logits, targets, ignore_index=-1)


# ------------------------------------------------------------------------------------------
# Official (rannet / TensorFlow) variable names
# ------------------------------------------------------------------------------------------

_LAYER_PARTS = {
    "concat-layernorm/gamma": "concat_norm.weight",
    "concat-layernorm/beta": "concat_norm.bias",
    "encode-attn/layernorm/gamma": "window_attn.norm.weight",
    "encode-attn/layernorm/beta": "window_attn.norm.bias",
    "cell-initializer/kernel": "cell_init.weight",
    "cell-initializer-layernorm/gamma": "cell_init_norm.weight",
    "cell-initializer-layernorm/beta": "cell_init_norm.bias",
    "cell-residual-layernorm/gamma": "cell_norm.weight",
    "cell-residual-layernorm/beta": "cell_norm.bias",
    "output-attn/layernorm/gamma": "memory_review.norm.weight",
    "output-attn/layernorm/beta": "memory_review.norm.bias",
    "output-layernorm/gamma": "output_norm.weight",
    "output-layernorm/beta": "output_norm.bias",
}
for _block, _ours in (("encode-attn", "window_attn"), ("output-attn", "memory_review")):
    for _d, _p in zip("qkvo", ("query", "key", "value", "output")):
        _LAYER_PARTS[f"{_block}/dense-{_d}/kernel"] = f"{_ours}.{_p}.weight"
        _LAYER_PARTS[f"{_block}/dense-{_d}/bias"] = f"{_ours}.{_p}.bias"
    for _tg, _p in (("t", "value"), ("g", "gate")):
        _LAYER_PARTS[f"{_block}/glu/dense-{_tg}/kernel"] = f"{_ours}.glu.{_p}.weight"
        _LAYER_PARTS[f"{_block}/glu/dense-{_tg}/bias"] = f"{_ours}.glu.{_p}.bias"
for _tg, _p in (("t", "value"), ("g", "gate")):
    _LAYER_PARTS[f"cell-glu/dense-{_tg}/kernel"] = f"cell_glu.{_p}.weight"
    _LAYER_PARTS[f"cell-glu/dense-{_tg}/bias"] = f"cell_glu.{_p}.bias"

_GLOBAL_PARTS = {
    "token-embedding/embeddings": "embedding.weight",
    "embedding-layernorm/gamma": "embedding_norm.weight",
    "embedding-layernorm/beta": "embedding_norm.bias",
    "mlm-hidden/dense/kernel": "lm_head.dense.weight",
    "mlm-hidden/dense/bias": "lm_head.dense.bias",
    "mlm-hidden/layernorm/gamma": "lm_head.norm.weight",
    "mlm-hidden/layernorm/beta": "lm_head.norm.bias",
    "mlm-matching/bias": "lm_head.bias",
}

_ORDER_PREFIX = re.compile(r"^weight::(\d+)::")


def _normalise_name(name: str) -> str:
    name = _ORDER_PREFIX.sub("", name)
    name = re.sub(r":\d+$", "", name).lower()
    name = re.sub(r"^(rannet|ran-net|model)/", "", name)
    return name.replace("/window-loop/", "/")


def from_rannet_variables(mapping: Mapping[str, np.ndarray], config, *,
                          strict: bool = True) -> Dict[str, np.ndarray]:
    """Map official ``rannet`` variables to attncore RAN weights.

    Accepted names (case-insensitive): TF variable names such as
    ``RAN-0/encode-attn/dense-q/kernel:0`` or ``RAN-1/window-loop/cell-glu/dense-t/bias:0``,
    checkpoint names such as ``rannet/ran-0/encode-attn/dense-q/kernel``, and the fixture form
    ``weight::NNN::<name>:0``. ``cell-initializer/*`` variables may come without a layer
    prefix (as Keras creates them): the first belongs to layer 0, the next to layer 1, ...,
    in the ``NNN`` order when given, else in the mapping's order.

    Parameters
    ----------
    mapping : mapping name -> array
    config : RANConfig or dict
        Target configuration; weights are cast to its dtype.
    strict : bool
        Raise on variables that map to nothing (e.g. the fine-tuning ``Output-Cell-*``
        head); with False they are ignored.

    Returns
    -------
    dict name -> np.ndarray
        Exactly the tensors of :func:`ran_weight_spec` (kernels transposed to (out, in)).

    Raises
    ------
    ValueError
        Listing unknown variables (strict), missing weights and shape mismatches.
    """
    c = _as_config(config)
    spec = ran_weight_spec(c)
    items = list(mapping.items())
    order = [int(m.group(1)) if (m := _ORDER_PREFIX.match(k)) else i for i, (k, _) in enumerate(items)]
    items = [item for _, item in sorted(zip(order, items), key=lambda pair: pair[0])]

    weights: Dict[str, np.ndarray] = {}
    sources: Dict[str, str] = {}        # weight -> the variable it came from
    unknown: List[str] = []
    bad: List[str] = []
    unprefixed_seen: Dict[str, int] = {}
    for raw_name, value in items:
        name = _normalise_name(raw_name)
        target = None
        match = re.match(r"^ran-(\d+)/(.+)$", name)
        if match and match.group(2) in _LAYER_PARTS:
            target = f"layers.{int(match.group(1))}.{_LAYER_PARTS[match.group(2)]}"
        elif name.startswith("cell-initializer") and name in _LAYER_PARTS:
            layer = unprefixed_seen.get(name, 0)
            unprefixed_seen[name] = layer + 1
            target = f"layers.{layer}.{_LAYER_PARTS[name]}"
        elif name in _GLOBAL_PARTS:
            target = _GLOBAL_PARTS[name]
        if target is None or target not in spec:
            unknown.append(raw_name)
            continue
        array = np.asarray(value)
        # a real floating tensor only (an int kernel was cast silently, a complex one lost its
        # imaginary part), each weight from one variable (two names of one weight: the later
        # silently won)
        if array.dtype.kind != "f":
            bad.append(f"variable {raw_name!r} has dtype {array.dtype}, expected a float dtype")
            continue
        if target in sources:
            bad.append(f"variables {sources[target]!r} and {raw_name!r} both map to {target!r}")
            continue
        sources[target] = raw_name
        if name.endswith("kernel"):
            array = array.T  # TF dense kernels are (in, out); ours are (out, in)
        weights[target] = np.ascontiguousarray(array, dtype=c.dtype)

    problems = bad + ([f"unknown variable {n!r}" for n in unknown] if strict else [])
    for name, (shape, _) in spec.items():
        if name not in weights:
            problems.append(f"missing weight {name!r} {list(shape)}")
        elif weights[name].shape != tuple(shape):
            problems.append(f"{name}: shape {list(weights[name].shape)}, expected {list(shape)}")
    if problems:
        raise ValueError("cannot convert rannet variables:\n  " + "\n  ".join(problems))
    return weights


def _register() -> None:
    from .. import io as _io

    _io.register_architecture("ran", ran_weight_spec, (
        "vocab_size", "embedding_size", "ran_layers", "head_num", "head_size", "window_size",
        "min_window_size", "cell_pooling", "causal", "memory_review", "num_classes",
        "token_head", "num_token_classes", "dtype", *_io.SPECIAL_TOKEN_KEYS))


_register()
