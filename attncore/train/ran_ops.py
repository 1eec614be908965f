"""Building blocks of the RAN trainer model: window layout, rotary tables, GLU, norms.

Everything differentiable here is composed from :mod:`attncore.train.autograd` ops, so no
hand-written backward is needed (the tests still check the composed gradients against finite
differences). The window layout is plain NumPy: it depends only on the lengths.

Window layout of a padded batch
-------------------------------
RAN cuts a sequence of length T into windows (RAN.md §2.4): one window if T <= W; otherwise
full windows of W tokens, and a last window of r tokens that is merged into the previous one
when r < min_window_size. The released code decides the windows from the *padded* length, so
a short document in a padded batch gets windows (and results) different from running alone.
attncore partitions each document by its **own** length instead, and steps through the
windows of all documents in lockstep: at step k, document b runs its k-th window if it has
one (``active``); its tokens are gathered into a (batch, width_k) block whose padding is
masked as keys. A document with fewer windows keeps its state unchanged in later steps. The
result for each document equals running it alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from . import autograd as ag
from .autograd import Tensor
from .layers import Linear, Module

__all__ = ["LN_EPS", "partition_windows", "WindowLayout", "window_layout", "rotary_tables",
           "RANLayerNorm", "GLU", "stdnorm", "swish_linear", "gather_rows", "masked_max",
           "masked_mean"]

LN_EPS = 1e-7  # langml LayerNorm epsilon (RAN.md §2.3)


def partition_windows(length: int, window_size: int, min_window_size: int,
                      merge_tail: bool = True) -> List[Tuple[int, int]]:
    """Window boundaries ``[(start, stop), ...]`` of a sequence of ``length`` tokens.

    Parameters
    ----------
    length : int
        Number of tokens (>= 1).
    window_size : int
        W.
    min_window_size : int
        m: a last window shorter than m is merged into the previous window.
    merge_tail : bool
        False keeps every window at most W long (used by the causal model, where the
        partition of a prefix must not depend on tokens still to come).

    Examples
    --------
    >>> partition_windows(520, 256, 16)
    [(0, 256), (256, 520)]
    >>> partition_windows(272, 256, 16)
    [(0, 256), (256, 272)]
    >>> partition_windows(13, 6, 2, merge_tail=False)
    [(0, 6), (6, 12), (12, 13)]
    """
    if length < 1:
        raise ValueError(f"a sequence needs at least one token, got length {length}")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if length <= window_size:
        return [(0, length)]
    count = -(-length // window_size)
    bounds = [(k * window_size, (k + 1) * window_size) for k in range(count - 1)]
    tail_start = (count - 1) * window_size
    if merge_tail and length - tail_start < min_window_size:
        bounds[-1] = (bounds[-1][0], length)
    else:
        bounds.append((tail_start, length))
    return bounds


@dataclass
class WindowLayout:
    """Where every window of every document sits; see the module docstring.

    Attributes
    ----------
    lengths : (B,) int64
    num_windows : (B,) int64
        n_b, windows of document b.
    starts, widths : list over steps k of (B,) int64
        Start and token count of window k of each document (0 where inactive).
    active : list over steps k of (B,) bool
        Document b has a window k.
    token_index : list over steps k of (B, width_k) int64
        Sequence position of each gathered token (0 for padding slots).
    token_valid : list over steps k of (B, width_k) bool
    scatter_index : (B, T) int64
        Position of token t of document b in the concatenation of the steps' token blocks
        (0 for padded positions).
    window_of_token : (B, T) int64
        Step k whose window holds token t (0 for padded positions).
    """
    lengths: np.ndarray
    num_windows: np.ndarray
    starts: List[np.ndarray]
    widths: List[np.ndarray]
    active: List[np.ndarray]
    token_index: List[np.ndarray]
    token_valid: List[np.ndarray]
    scatter_index: np.ndarray
    window_of_token: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.active)

    def window_valid(self) -> np.ndarray:
        """(B, num_steps) bool: step k is a real window of document b."""
        return np.stack(self.active, axis=1)


def window_layout(lengths: Sequence[int], padded_length: int, window_size: int,
                  min_window_size: int, merge_tail: bool = True) -> WindowLayout:
    """Build the :class:`WindowLayout` of a padded batch.

    Parameters
    ----------
    lengths : (B,) int
        Real tokens per document, each in [1, padded_length].
    padded_length : int
        T, the width of the id array.
    window_size, min_window_size, merge_tail
        As in :func:`partition_windows`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if (lengths < 1).any() or (lengths > padded_length).any():
        raise ValueError(f"lengths must lie in [1, {padded_length}], got {lengths.tolist()}")
    batch = len(lengths)
    windows = [partition_windows(int(n), window_size, min_window_size, merge_tail) for n in lengths]
    num_steps = max(len(w) for w in windows)
    starts, widths, active, token_index, token_valid = [], [], [], [], []
    scatter_index = np.zeros((batch, padded_length), dtype=np.int64)
    window_of_token = np.zeros((batch, padded_length), dtype=np.int64)
    offset = 0
    for k in range(num_steps):
        start = np.array([w[k][0] if k < len(w) else 0 for w in windows], dtype=np.int64)
        width = np.array([w[k][1] - w[k][0] if k < len(w) else 0 for w in windows], dtype=np.int64)
        block = int(width.max())
        slots = np.arange(block)
        valid = slots[None, :] < width[:, None]
        index = np.where(valid, start[:, None] + slots[None, :], 0)
        for b in range(batch):
            if width[b]:
                span = slice(start[b], start[b] + width[b])
                scatter_index[b, span] = offset + np.arange(width[b])
                window_of_token[b, span] = k
        starts.append(start)
        widths.append(width)
        active.append(width > 0)
        token_index.append(index)
        token_valid.append(valid)
        offset += block
    return WindowLayout(lengths, np.array([len(w) for w in windows], dtype=np.int64), starts,
                        widths, active, token_index, token_valid, scatter_index, window_of_token)


def rotary_tables(positions: np.ndarray, head_size: int, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin of the interleaved RoPE angles ``p / 10000**(2i/d)``.

    Parameters
    ----------
    positions : int array (...)
    head_size : int
        d (even).

    Returns
    -------
    cos, sin : (..., d/2) arrays of ``dtype``
    """
    if head_size % 2:
        raise ValueError(f"RoPE needs an even head_size, got {head_size}")
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


class RANLayerNorm(Module):
    """langml LayerNorm: ``weight * (x - mean) / sqrt(mean(x**2) + 1e-7) + bias`` (uncentred)."""

    def __init__(self, dim: int, dtype=np.float32):
        super().__init__()
        self.weight = Tensor(np.ones(dim, dtype=dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(dim, dtype=dtype), requires_grad=True)

    def __call__(self, x: Tensor) -> Tensor:
        """x : (..., D) -> (..., D)."""
        return ag.uncentred_layer_norm(x, self.weight, self.bias, eps=LN_EPS)


def stdnorm(x: Tensor) -> Tensor:
    """RAN's parameter-free ``standard_normalize``: the uncentred norm without weight or bias."""
    return ag.uncentred_layer_norm(x, eps=LN_EPS)


class GLU(Module):
    """``(x W_t^T + b_t) * sigmoid(x W_g^T + b_g)``, D -> D (rannet ``glu/dense-t``, ``dense-g``)."""

    def __init__(self, dim: int, rng: np.random.Generator, dtype=np.float32):
        super().__init__()
        self.value = Linear(dim, dim, rng, dtype=dtype)
        self.gate = Linear(dim, dim, rng, dtype=dtype)

    def __call__(self, x: Tensor) -> Tensor:
        return self.value(x) * ag.sigmoid(self.gate(x))


def swish_linear(layer: Linear, x: Tensor) -> Tensor:
    """``swish(x W^T + b)``: every RAN projection is a dense layer with swish."""
    return ag.swish(layer(x))


def gather_rows(x: Tensor, index: np.ndarray) -> Tensor:
    """``x[b, index[b, j]]`` for x (B, T, D) and index (B, J) -> (B, J, D)."""
    rows = np.arange(index.shape[0])[:, None]
    return ag.getitem(x, (rows, index))


def masked_max(x: Tensor, valid: np.ndarray, axis: int) -> Tensor:
    """Max over ``axis`` of the entries where ``valid`` (broadcastable) is True."""
    floor = ag.as_tensor(np.array(-np.inf, dtype=x.dtype))
    return ag.max(ag.where(np.broadcast_to(valid, x.shape), x, floor), axis=axis)


def masked_mean(x: Tensor, valid: np.ndarray, axis: int) -> Tensor:
    """Mean over ``axis`` of the entries where ``valid`` (broadcastable, float-able) is True."""
    weights = np.broadcast_to(valid, x.shape).astype(x.dtype)
    count = weights.sum(axis=axis)
    return ag.sum(x * weights, axis=axis) / np.maximum(count, 1)

