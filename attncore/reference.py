# SPDX-License-Identifier: Apache-2.0
"""Plain NumPy versions of every attncore kernel: the oracle for tests and the building blocks
of the trainer. Readable first: each function is the textbook formula (d2l.ai / Vaswani et al.),
materialising whatever it likes. No validation beyond what NumPy does; the compiled kernels in
``attncore.kernels`` are the validated, fast versions with the same signatures.

Conventions shared with the kernels: float32 or float64 in, same dtype out; a row with no valid
entry gives zero probabilities (never NaN); causal masks are aligned bottom-right.
"""
import math

import numpy as np

__all__ = [
    "softmax", "log_softmax", "attention", "additive_attention", "luong_scores",
    "nadaraya_watson", "linear", "matmul", "layer_norm", "relu", "gelu", "gelu_tanh", "swish",
    "tanh", "sigmoid", "embedding", "sinusoidal_positions", "rotary", "valid_mask",
    "causal_mask", "round_bfloat16", "quantize_int8", "linear_int8",
]


def valid_mask(shape, axis=-1, lengths=None, mask=None):
    """Boolean array of ``shape``: True where an entry takes part in the softmax over ``axis``."""
    keep = np.ones(shape, dtype=bool)
    if mask is not None:
        keep &= np.broadcast_to(np.asarray(mask, dtype=bool), shape)
    if lengths is not None:
        n = shape[axis]
        moved = np.moveaxis(keep, axis, -1)
        positions = np.arange(n)
        moved = moved & (positions < np.asarray(lengths)[..., None])
        keep = np.moveaxis(moved, -1, axis)
    return keep


def softmax(x, axis=-1, *, lengths=None, mask=None):
    """exp(x - max) / sum(exp(x - max)) over ``axis``, excluded entries 0, empty rows all 0.

    ``lengths`` (x.shape without ``axis``): entries at index >= length along ``axis`` are out;
    ``mask`` (broadcastable to x, bool): False entries are out.
    """
    x = np.asarray(x)
    keep = valid_mask(x.shape, axis, lengths, mask)
    shifted = np.where(keep, x, -np.inf)
    row_max = shifted.max(axis=axis, keepdims=True, initial=-np.inf)   # (an empty axis: -inf)
    # nothing valid, or every valid entry -inf: all 0. A NaN entry (or +inf: inf - inf) makes
    # the row's valid entries NaN, never a silent 0.
    no_key = row_max == -np.inf
    with np.errstate(invalid="ignore"):   # inf - inf, NaN / NaN: the NaN rows meant here
        e = np.where(keep, np.exp(shifted - np.where(no_key, 0, row_max)), 0).astype(x.dtype)
        total = e.sum(axis=axis, keepdims=True)
        return np.where(keep & ~no_key, e / np.where(no_key, 1, total), 0).astype(x.dtype)


def log_softmax(x, axis=-1, *, lengths=None, mask=None):
    """log(softmax(x)): excluded entries -inf; a row with nothing valid is all 0 (not -inf/NaN)."""
    x = np.asarray(x)
    keep = valid_mask(x.shape, axis, lengths, mask)
    shifted = np.where(keep, x, -np.inf)
    row_max = shifted.max(axis=axis, keepdims=True, initial=-np.inf)   # (an empty axis: -inf)
    no_key = row_max == -np.inf     # as in softmax; NaN or +inf: the valid entries NaN
    row_max = np.where(no_key, 0, row_max)
    with np.errstate(invalid="ignore"):
        total = np.where(keep, np.exp(shifted - row_max), 0).sum(axis=axis, keepdims=True)
        lse = row_max + np.log(np.where(no_key, 1, total))
        out = np.where(keep, x - lse, -np.inf)
    return np.where(no_key, 0, out).astype(x.dtype)


def causal_mask(q_len, kv_len):
    """(q_len, kv_len) bool, bottom-right aligned: query i sees key j iff j <= i + kv_len - q_len."""
    return np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)


def attention(q, k, v, *, causal=False, kv_lengths=None, mask=None, scale=None,
              return_weights=False):
    """Scaled dot-product attention, softmax(q k^T * scale) v, per head.

    q (batch, heads, q_len, head_dim); k, v (batch, kv_heads, kv_len, head_dim) with
    heads % kv_heads == 0 (query head h uses key/value head h // (heads // kv_heads)).
    kv_lengths (batch,): keys j >= kv_lengths[b] are masked; mask: bool broadcastable to
    (batch, heads, q_len, kv_len), False = masked. Default scale 1/sqrt(head_dim).
    Returns out (batch, heads, q_len, head_dim) [, weights (batch, heads, q_len, kv_len)].
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    scores = (q @ np.swapaxes(k, -1, -2)) * q.dtype.type(scale)
    keep = np.ones(scores.shape, dtype=bool)
    if causal:
        keep &= causal_mask(q_len, kv_len)
    if kv_lengths is not None:
        keep &= np.arange(kv_len) < np.asarray(kv_lengths)[:, None, None, None]
    if mask is not None:
        keep &= np.broadcast_to(np.asarray(mask, dtype=bool), scores.shape)
    weights = softmax(scores, axis=-1, mask=keep)
    if np.isfinite(v).all():
        out = weights @ v
    else:   # a key a query does not see adds nothing, whatever its value (0 x NaN would)
        out = np.einsum("bhqk,bhqkd->bhqd", weights, np.where(keep[..., None], v[:, :, None], 0))
    out = out.astype(q.dtype)
    return (out, weights) if return_weights else out


def additive_attention(queries, keys, values, w_q, w_k, w_v, *, kv_lengths=None,
                       return_weights=False):
    """Bahdanau attention: score(q, k) = w_v . tanh(q W_q + k W_k).

    queries (batch, q_len, q_dim), keys (batch, kv_len, k_dim), values (batch, kv_len, v_dim),
    w_q (q_dim, hidden), w_k (k_dim, hidden), w_v (hidden,). ``w_k=None`` means the keys are
    already projected (keys (batch, kv_len, hidden)). Returns (batch, q_len, v_dim)
    [, weights (batch, q_len, kv_len)].
    """
    q_proj = np.asarray(queries) @ w_q
    k_proj = np.asarray(keys) if w_k is None else np.asarray(keys) @ w_k
    features = np.tanh(q_proj[:, :, None, :] + k_proj[:, None, :, :])  # (b, q, k, hidden)
    scores = features @ w_v
    lengths = None
    if kv_lengths is not None:
        lengths = np.broadcast_to(np.asarray(kv_lengths)[:, None], scores.shape[:-1])
    weights = softmax(scores, axis=-1, lengths=lengths)
    out = (weights @ np.asarray(values)).astype(q_proj.dtype)
    return (out, weights) if return_weights else out


def luong_scores(queries, keys, *, method="dot", w=None, w_q=None, w_k=None, v=None):
    """Luong attention scores (batch, q_len, kv_len).

    dot: q . k;  general: q W k  (w (q_dim, k_dim));
    concat: v . tanh(W [q; k]) = v . tanh(q W_q + k W_k)  (w_q (q_dim, hidden), w_k, v (hidden,)).
    """
    queries, keys = np.asarray(queries), np.asarray(keys)
    if method == "dot":
        return queries @ np.swapaxes(keys, -1, -2)
    if method == "general":
        return (queries @ w) @ np.swapaxes(keys, -1, -2)
    if method == "concat":
        features = np.tanh((queries @ w_q)[:, :, None, :] + (keys @ w_k)[:, None, :, :])
        return features @ v
    raise ValueError(f"method must be 'dot', 'general' or 'concat', got {method!r}")


def nadaraya_watson(queries, keys, values, bandwidth=1.0, *, return_weights=False):
    """Gaussian-kernel attention pooling: softmax_j(-||q_i - k_j||^2 / (2 h^2)) . values.

    queries (n_q, d) or (n_q,), keys (n_k, d) or (n_k,), values (n_k, d_v) or (n_k,).
    """
    queries, keys, values = np.asarray(queries), np.asarray(keys), np.asarray(values)
    q2 = queries.reshape(len(queries), -1)
    k2 = keys.reshape(len(keys), -1)
    dist = ((q2[:, None, :] - k2[None, :, :]) ** 2).sum(-1)
    weights = softmax(-dist / (2 * bandwidth ** 2), axis=-1)
    # a query infinitely far from every key (an infinite query) has no nearest key: NaN
    weights[np.isposinf(dist).all(axis=-1) & (dist.shape[-1] > 0)] = np.nan
    out = weights @ values
    return (out, weights) if return_weights else out


def linear(x, weight, bias=None):
    """x (..., in) . weight (out, in)^T + bias (out,): the torch ``nn.Linear`` layout."""
    y = np.asarray(x) @ np.asarray(weight).T
    return y + bias if bias is not None else y


def round_bfloat16(x):
    """x rounded to the nearest bfloat16 (ties to even), as float32.

    A bfloat16 is the upper 16 bits of a float32. Adding 0x7fff, plus the lowest bit that is
    kept, to the float32's bits and dropping the lower 16 rounds to nearest with ties to even
    (a carry into the exponent is the correct rounding up; past the largest bfloat16 it gives
    infinity). NaN stays NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    kept = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = (kept << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), rounded)


def quantize_int8(x):
    """Each row of x (..., n) as int8 values q and a float32 scale s (...,) with x ~ s * q:
    s = max |x| / 127, q = round(x / s) in [-127, 127] (half to even), computed as
    ``round(x * (127 / max |x|))`` in float32, as the kernels do. A row of zeros (or one so
    small that 127 / max |x| overflows) gives s = 0 and q = 0; a row holding NaN or infinity
    gives s = NaN."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(127) / amax
        scale = amax / np.float32(127)
        zero = ~(amax > 0) | ~np.isfinite(inv)
        inv, scale = np.where(zero, 0, inv), np.where(zero, 0, scale)
        bad = ~np.all(np.isfinite(x), axis=-1)
        inv, scale = np.where(bad, 0, inv), np.where(bad, np.nan, scale)
        q = np.rint(np.clip(x * inv[..., None].astype(np.float32), -127, 127))
    return np.nan_to_num(q).astype(np.int8), scale.astype(np.float32)


def linear_int8(x, weight_q, weight_scale, bias=None):
    """The product of an int8 ``PackedLinearWeight``: x (..., in) quantized per row
    (:func:`quantize_int8`), times weight_q (out, in) int8 with scales (out,), summed exactly:

        y = fma(sum_k xq[k] wq[j, k], s_x * s_w[j], bias[j])

    (one rounding of the float32 product of the scales, then one of the fused multiply-add),
    except where that float32 product overflows or is subnormal while neither scale is 0: there
    float32(sum * (s_x * s_w[j]) + bias[j]) in float64, the sum's product rounded before the
    add (an inf scale turned a 0 sum into NaN; a subnormal one kept a few bits)."""
    xq, xs = quantize_int8(x)
    sums = xq.astype(np.int64) @ np.asarray(weight_q, dtype=np.int64).T
    # the int32 sum as a float32 (rounded to nearest, as the kernels convert)
    v = sums.astype(np.float32).astype(np.float64)
    ws = np.asarray(weight_scale, dtype=np.float32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scale32 = xs[..., None] * ws
    scale = scale32.astype(np.float64)
    b = np.float64(0) if bias is None else np.asarray(bias, dtype=np.float32).astype(np.float64)
    with np.errstate(invalid="ignore"):   # (0 x an inf scale: replaced below)
        out = _fma_float32(v * scale, b)    # v * scale: 24-bit times 24-bit, exact in float64
    tiny = np.finfo(np.float32).tiny
    off = (np.abs(scale32) > np.finfo(np.float32).max) | \
        ((np.abs(scale32) < tiny) & (xs[..., None] != 0) & (ws != 0))
    if off.any():
        wide = xs[..., None].astype(np.float64) * ws.astype(np.float64)   # exact
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.where(off, (v * wide + b).astype(np.float32), out)
    return out


def _fma_float32(p, b):
    """float32(p + b) rounded once, for p and b float64 (p exact, b a float32).

    float64(p + b) then float32 would round twice, and differ from a fused multiply-add where
    the first rounding lands on a float32 midpoint. So: the sum's float64 rounding s and its
    error e (TwoSum: s + e = p + b exactly), then s rounded to odd (the float64 neighbour of the
    exact sum with an odd last bit, when e != 0), which float32 rounds correctly (53 bits hold
    float32's 24 and 2 more)."""
    with np.errstate(invalid="ignore", over="ignore"):
        p, b = np.broadcast_arrays(np.asarray(p, np.float64), np.asarray(b, np.float64))
        s = p + b
        bb = s - p
        e = (p - (s - bb)) + (b - bb)
        even = (s.view(np.int64) & 1) == 0
        toward = np.where(e > 0, np.inf, -np.inf)
        s = np.where((e != 0) & even & np.isfinite(s), np.nextafter(s, toward), s)
        return s.astype(np.float32)


def matmul(a, b, *, transpose_b=False, alpha=1.0):
    """alpha * a (batch, m, k) . b (batch, k, n) (or b^T with b (batch, n, k))."""
    b = np.swapaxes(b, -1, -2) if transpose_b else b
    return (np.asarray(a) @ b) * np.asarray(a).dtype.type(alpha)


def layer_norm(x, gamma=None, beta=None, eps=1e-5, *, mode="standard"):
    """Normalise the last axis: gamma * (x - c) / sqrt(m2 + eps) + beta.

    standard: c = mean, m2 = variance;  uncentred (RAN/langml): c = mean, m2 = mean(x^2);
    rms: c = 0, m2 = mean(x^2).
    """
    x = np.asarray(x)
    mean = x.mean(-1, keepdims=True)
    if mode == "standard":
        y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    elif mode == "uncentred":
        y = (x - mean) / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    elif mode == "rms":
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    else:
        raise ValueError(f"mode must be 'standard', 'uncentred' or 'rms', got {mode!r}")
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y.astype(x.dtype)


def relu(x):
    return np.maximum(x, 0)


def gelu(x):
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    from scipy.special import erf
    x = np.asarray(x)
    return (0.5 * x * (1 + erf(x / math.sqrt(2)))).astype(x.dtype)


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = np.asarray(x)
    return (0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))).astype(x.dtype)


def sigmoid(x):
    x = np.asarray(x)
    return (1 / (1 + np.exp(-x))).astype(x.dtype)


def swish(x):
    """x * sigmoid(x) (SiLU)."""
    return np.asarray(x) * sigmoid(x)


def tanh(x):
    return np.tanh(x)


def embedding(table, ids):
    """table (vocab, dim)[ids] -> ids.shape + (dim,)."""
    return np.asarray(table)[np.asarray(ids)]


def sinusoidal_positions(length, dim, dtype=np.float32, base=10000.0, first=0):
    """Vaswani et al. table (length, dim): P[p, 2i] = sin(p / base^(2i/dim)), P[p, 2i+1] = cos(...),
    for positions p = first .. first + length - 1."""
    positions = np.arange(first, first + length, dtype=np.float64)[:, None]
    freqs = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(positions * freqs)
    table[:, 1::2] = np.cos(positions * freqs[: dim // 2])
    return table.astype(dtype)


def rotary(x, positions=None, base=10000.0):
    """Interleaved rotary embedding over the last axis of x (..., length, dim), dim even.

    Pair i = (x[2i], x[2i+1]) at position p turns by theta = p / base^(2i/dim).
    """
    x = np.asarray(x)
    length, dim = x.shape[-2], x.shape[-1]
    if positions is None:
        positions = np.arange(length)
    theta = np.asarray(positions, dtype=np.float64)[:, None] * base ** (
        -np.arange(0, dim, 2, dtype=np.float64) / dim)
    cos, sin = np.cos(theta), np.sin(theta)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out
