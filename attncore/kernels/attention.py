# SPDX-License-Identifier: Apache-2.0
"""Fronts of the attention kernels: fused scaled-dot-product attention, additive (Bahdanau),
Luong and Nadaraya-Watson attention.

Strategy choice for ``attention`` (by shape only, never by thread count, so results are
bit-identical for every thread count):

* a dense ``mask`` on split-KV (any values), and on flash (finite values where some query
  keeps the key: :func:`_flash_values`): both read the caller's broadcast mask in place.
  Flash classifies each tile of queries x keys from it (once per batch entry and head the
  mask really has): tiles it leaves out whole are skipped, tiles it keeps whole run as
  without a mask, the others get -inf scores where it leaves keys out. A padding or causal
  pattern given as a mask thus costs about what ``kv_lengths`` / ``causal`` cost, and an
  all-True mask changes no bit.
* a dense ``mask`` with a non-finite value some query keeps, at q_len > DECODE_MAX_Q: scores
  through BLAS and the masked softmax, chunk by chunk of (batch, head) slices
  (:data:`MASKED_CHUNK_BYTES`), then the product with V, the rows that see a non-finite value
  summed apart; the weights pass of any masked call takes the same chunks.
* ``return_weights=True``: the output comes from the path it would take without weights
  (below), and the weights from a pass of their own (one more q k^T), so asking for them never
  changes an output bit.
* ``q_len <= DECODE_MAX_Q`` (decoding, a few new tokens against a cache): split-KV. Keys are cut
  into chunks of ``DECODE_CHUNK``; (batch, head, chunk) items run in parallel and are merged by
  log-sum-exp in chunk order. Peers run one thread per (batch, head) here and leave cores idle.
* otherwise: flash. Query tiles x key tiles (:func:`flash_tiles`) with an online softmax;
  scores never exceed one tile per thread.
"""
import math

import numpy as np

from . import _additive, _blas, _sdpa, _softmax, _threads
from ._arrays import plain_qkv
from ._memory import read_only_view
from ._validation import (check_bool, check_bool_mask, check_finite_float, check_float_array,
                          check_lengths, check_positive_float)
from .threads import BLAS_SMALL_MATRIX_KERNEL, SMALL_MATRIX_MACS, kernel_threads

__all__ = ["attention", "additive_attention", "project_keys", "AdditiveKeys", "luong_attention",
           "nadaraya_watson"]

# Flash tiles. Each tile product (scores = Q_tile . K_tile^T, out += P . V_tile) is one call of
# a matrix kernel.
# * On the AVX2 and AVX-512 kernels (TILE_PRODUCTS) float32 tiles run on tile_gemm.h's kernel,
#   which reads K, V and the probabilities in place, scores computed keys x queries (only the
#   query tile transposed; src_c/sdpa.h): TILE_BLOCK_Q queries (a multiple of 16) x
#   TILE_BLOCK_K keys.
#   Causal prefill takes narrower query tiles, which compute less above the diagonal
#   (bench/flash_tiles.py, L 128-2048 at one thread: 128 x 96 ran 65-73 GFLOP/s without a
#   mask; with it 48 x 192 ran 45-68, 128 x 96 32-66).
#   On the AVX-512 machine of session 11 (bench/RESULTS.md) the same tiles ran 0.88-1.48x torch
#   where the BLAS path below ran 0.72-1.26x.
# * Otherwise (float64, scalar builds) both products are BLAS calls, K transposed once per
#   head so that both are plain NN products. Where OpenBLAS has its SkylakeX-class small-matrix
#   kernel (threads.BLAS_SMALL_MATRIX_KERNEL), products of at most SMALL_MATRIX_MACS
#   multiply-adds skip the copy of both operands into packed buffers: SMALL_BLOCK_Q queries x as
#   many keys as keep a product under the limit (64 x 192 at head_dim 64) ran prefill 1.1-1.3x
#   faster than 256 x 512 (bench/RESULTS.md, "Flash tiles"). Without it every product packs
#   its operands and large tiles amortise that: BLOCK_Q x BLOCK_K, a 512 KiB float32 score
#   tile (L2-resident).
# FLASH_TILES, when set to (block_q, block_k), overrides them all, and USE_TILE_PRODUCTS = False
# sends float32 back to BLAS (bench/flash_tiles.py compares them).
BLOCK_Q = 256
BLOCK_K = 512
SMALL_BLOCK_Q = 64
TILE_BLOCK_Q = 128
TILE_BLOCK_K = 96
CAUSAL_TILE_BLOCK_Q = 48
CAUSAL_TILE_BLOCK_K = 192
# AVX-512 (8 x 32 register blocks, twice the lanes in the column softmax): causal prefill ran
# 1.03-2.10x torch with 96 x 96 tiles where 48 x 192 ran 0.90-1.79x (bench/flash_tiles.py,
# L 512-8192, 1 and 2 threads, session 11); without a mask 128 x 96 stays (0.91-1.15x).
AVX512_CAUSAL_TILE_BLOCK_Q = 96
AVX512_CAUSAL_TILE_BLOCK_K = 96
AVX512 = _threads.simd_name() == "avx512"
TILE_PRODUCTS = _sdpa.tile_products()
USE_TILE_PRODUCTS = TILE_PRODUCTS
FLASH_TILES = None
DECODE_MAX_Q = 8
DECODE_CHUNK = 256


def flash_tiles(head_dim: int, small_matrix_kernel: bool = BLAS_SMALL_MATRIX_KERNEL,
                tile_products: "bool | None" = None, causal: bool = False):
    """(block_q, block_k) of the flash path for this head_dim (see the comment above); the
    tiles depend on the shape and the kernels of the process only, never on the thread count.
    tile_products: whether the tile kernel runs the products (default: USE_TILE_PRODUCTS)."""
    if FLASH_TILES is not None:
        return FLASH_TILES
    if tile_products is None:
        tile_products = USE_TILE_PRODUCTS
    if tile_products:
        if not causal:
            return TILE_BLOCK_Q, TILE_BLOCK_K
        return ((AVX512_CAUSAL_TILE_BLOCK_Q, AVX512_CAUSAL_TILE_BLOCK_K) if AVX512
                else (CAUSAL_TILE_BLOCK_Q, CAUSAL_TILE_BLOCK_K))
    if small_matrix_kernel:
        keys = SMALL_MATRIX_MACS // (SMALL_BLOCK_Q * head_dim)
        keys = keys // 64 * 64 if keys >= 64 else keys // 16 * 16
        if keys >= 16:
            return SMALL_BLOCK_Q, keys
    return BLOCK_Q, BLOCK_K


BLAS_INT_MAX = 2 ** 31 - 1   # BLAS's int dimensions and leading dimensions


def _check_blas_range(q, k) -> None:
    """ValueError for a q_len, kv_len or head_dim past BLAS's int range (the flash path and the
    weights pass them to sgemm as int: 2^31 keys wrapped to a negative size, BLAS refused the
    call and the weights came back uniform; 2^32 + 4 keys wrapped to 4, silently). Read from
    the shapes before any copy, so a broadcast view is refused without being materialised.
    (The common case never comes here: ``_arrays.plain_qkv`` passes it first.)"""
    for name, array, axes in (("q", q, ("q_len", "head_dim")), ("k", k, ("kv_len", "head_dim"))):
        shape = array.shape if isinstance(array, np.ndarray) else ()
        if len(shape) != 4:
            continue   # (check_float_array names the wrong ndim, converts and checks others)
        for axis, size in zip(axes, shape[2:]):
            if size > BLAS_INT_MAX:
                raise ValueError(f"{name}: {axis} of {size} is past BLAS's int range (at most "
                                 f"{BLAS_INT_MAX})")


def _check_qkv(q, k, v):
    if plain_qkv(q, k, v):
        return q, k, v   # (the common case, in C: the checks below cost 1.2 us)
    _check_blas_range(q, k)
    q = check_float_array(q, "q", ndim=4)
    k = check_float_array(k, "k", ndim=4, dtype=q.dtype)
    v = check_float_array(v, "v", ndim=4, dtype=q.dtype)
    batch, heads, q_len, head_dim = q.shape
    if head_dim == 0:
        raise ValueError("q: head_dim must be > 0")
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"q, k and v must have the same batch size, got {batch}, {k.shape[0]}, "
                         f"{v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k must have head_dim {head_dim} like q, got {k.shape[3]}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}) for "
                         f"grouped-query attention")
    return q, k, v


def attention(q, k, v, *, causal=False, kv_lengths=None, mask=None, scale=None,
              return_weights=False):
    """Scaled dot-product attention: softmax(scale * q k^T) v, fused (FlashAttention style).

    Parameters
    ----------
    q : (batch, heads, q_len, head_dim) float32 or float64
    k, v : (batch, kv_heads, kv_len, head_dim), same dtype; heads % kv_heads == 0
        (grouped-query: query head h reads key/value head h // (heads // kv_heads)).
    causal : bool
        Bottom-right aligned: query i sees keys j <= i + kv_len - q_len, so a single new token
        sees the whole cache. (torch's ``is_causal`` is top-left aligned; the two agree when
        q_len == kv_len.)
    kv_lengths : (batch,) int, optional
        Keys j >= kv_lengths[b] are padding.
    mask : bool, broadcastable to (batch, heads, q_len, kv_len), optional
        True = the query may see the key. NumPy broadcasting applies: a Hugging Face
        ``attention_mask`` (batch, kv_len) goes in as ``attention_mask.astype(bool)[:, None,
        None, :]``, an additive float mask (0 / -inf) as ``additive == 0``. Read in place
        (never broadcast into a copy) by the fused paths, which skip the tiles of queries x
        keys it leaves out whole. Past q_len 8 with a NaN or inf in v at a key some query
        keeps, every score is computed, a chunk of heads at a time.

        ``causal``, ``kv_lengths`` and ``mask`` combine: a query sees the keys all of them
        allow. A query that sees no key gets a zero row (weights 0), never NaN.
    scale : float, optional
        Default 1 / sqrt(head_dim).
    return_weights : bool
        Also return the attention weights (batch, heads, q_len, kv_len): a new array of that
        size, computed on a pass of its own (the output keeps its bits).

    Returns
    -------
    out : (batch, heads, q_len, head_dim) [, weights]
    """
    q, k, v = _check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    return_weights = check_bool(return_weights, "return_weights")
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    scale = (1.0 / math.sqrt(head_dim) if scale is None
             else check_finite_float(scale, "scale", q.dtype))
    if kv_lengths is not None:
        kv_lengths = check_lengths(kv_lengths, "kv_lengths", (batch,), kv_len)
    threads = kernel_threads()
    empty = batch * heads * q_len * head_dim == 0 or kv_len == 0
    # every path below writes each element of out; only an empty problem returns it as made
    out = (np.zeros if empty else np.empty)((batch, heads, q_len, head_dim), dtype=q.dtype)
    if mask is not None:
        mask = check_bool_mask(mask, "mask", (batch, heads, q_len, kv_len))
        weights = (np.zeros((batch, heads, q_len, kv_len), dtype=q.dtype)
                   if return_weights else None)
        # (split-KV takes any values; flash finite ones, or None: the chunked path)
        fused_v = (v if empty or q_len <= DECODE_MAX_Q
                   else _flash_values(v, mask, kv_lengths))
        if empty:
            pass
        elif fused_v is not None:
            keep = mask.view(np.uint8)
            if q_len <= DECODE_MAX_Q:
                _sdpa.split_kv(q, k, v, out, kv_lengths, bool(causal), scale, DECODE_CHUNK,
                               threads, keep)
            else:
                _flash(q, k, fused_v, out, kv_lengths, bool(causal), scale, threads, keep)
            if weights is not None:   # (on a pass of their own, as without a mask)
                _masked_attention(q, k, v, None, weights, scale, causal, kv_lengths, mask,
                                  threads)
        else:
            _masked_attention(q, k, v, out, weights, scale, causal, kv_lengths, mask, threads)
        return (out, weights) if return_weights else out
    if not empty:
        if q_len <= DECODE_MAX_Q:
            _sdpa.split_kv(q, k, v, out, kv_lengths, bool(causal), scale, DECODE_CHUNK, threads)
        else:
            _flash(q, k, v, out, kv_lengths, bool(causal), scale, threads)
    if not return_weights:
        return out
    # the weights on their own pass (one more q k^T): the output above is the one a call
    # without weights gets, bit for bit
    weights = np.zeros((batch, heads, q_len, kv_len), dtype=q.dtype)
    if not empty:
        _sdpa.weights_only(q, k, weights, kv_lengths, bool(causal), scale, threads)
    return out, weights


def flash_plan(head_dim: int, causal: bool, dtype=np.float32) -> "tuple[int, int, bool]":
    """(block_q, block_k, tile_kernel) of the flash path at this head_dim: the tiles
    (:func:`flash_tiles`) and whether attncore's tile kernel runs the products (float32 where
    it is built, AVX2 / AVX-512) rather than BLAS. Compiled model steps take it from here, so
    that they run the flash path exactly as :func:`sequence_attention` does."""
    own = USE_TILE_PRODUCTS and np.dtype(dtype) == np.float32
    block_q, block_k = flash_tiles(head_dim, tile_products=own, causal=causal)
    return block_q, block_k, bool(own and block_q % 16 == 0)


def _flash(q, k, v, out, kv_lengths, causal, scale, threads, keep=None):
    """The flash path into out, on the tile kernel where it runs (float32, AVX2); ``keep``: a
    dense mask as bytes (batch, heads, q_len, kv_len), with finite values only
    (:func:`_flash_values`)."""
    block_q, block_k, own = flash_plan(q.shape[3], causal, q.dtype)
    _sdpa.flash(q, k, v, out, kv_lengths, causal, scale, block_q, block_k, own, threads, keep)


def _flash_values(v, mask, kv_lengths):
    """The values for the flash path under a dense mask, which needs them finite: a left-out
    key weighs exactly 0 there, but 0 x NaN is NaN, and rows that do not see a NaN value must
    not turn NaN. ``v`` itself when every value is finite (checked by one BLAS dot of v with
    itself: finite only if every value is, faster than a sum or ``isfinite``; squares
    overflowing from finite values merely take the slower checks below). Else, when every
    value some query may see is finite (keys below kv_lengths that the mask keeps for some
    query of their batch entry), a copy with the others 0: a padded cache left as allocated,
    NaN or not, at either end, runs as it would with those values finite, bit for bit. Else
    None: the chunked path (:func:`_masked_attention`) sums the rows that see a non-finite
    value apart. ``mask``: broadcast (batch, heads, q_len, kv_len)."""
    flat = v.reshape(-1)   # (v is C-contiguous: a view)
    if np.isfinite(np.dot(flat, flat)):
        return v
    batch, _, _, kv_len = mask.shape
    # the mask as the caller made it (its broadcast axes of size 1): the keys some query of
    # each batch entry keeps
    made = mask[tuple(slice(0, 1) if step == 0 else slice(None) for step in mask.strides[:3])]
    seen = np.broadcast_to(np.logical_or.reduce(made, axis=(1, 2)), (batch, kv_len))
    if kv_lengths is not None:
        seen = seen & (np.arange(kv_len) < kv_lengths[:, None])
    by_key = v.transpose(0, 2, 1, 3)                          # (batch, kv_len, kv_heads, D)
    if not np.isfinite(by_key[seen]).all():
        return None
    clean = v.copy()
    clean.transpose(0, 2, 1, 3)[~seen] = 0
    return clean


def sequence_attention(q, k, v, *, kv_lengths, causal):
    """``attention(q, k, v, kv_lengths=..., causal=...)`` on the flash path at every q_len, for
    models running whole padded sequences (a Transformer's encoder and prompts).

    :func:`attention` takes split-KV for a few queries (q_len <= DECODE_MAX_Q, faster for
    decoding), and the two paths round differently: a 3-token sentence alone would then not
    give the bits it gets padded to 30 inside a batch. On the flash path a query's result
    depends on its own keys only (tiles start at fixed key indices, padded keys weigh exactly
    0), so with the tile kernel (float32 on AVX2 and AVX-512 machines) a row gives the same bits whatever
    the batch around it. Arguments as :func:`attention` (checked the same way).
    """
    q, k, v = _check_qkv(q, k, v)
    causal = check_bool(causal, "causal")
    if kv_lengths is not None:
        kv_lengths = check_lengths(kv_lengths, "kv_lengths", (q.shape[0],), k.shape[2])
    out = np.zeros(q.shape, dtype=q.dtype)
    if q.size and k.shape[2]:
        _flash(q, k, v, out, kv_lengths, bool(causal), 1.0 / math.sqrt(q.shape[3]),
               kernel_threads())
    return out


#: The dense-mask path materialises the scores of this many bytes of (batch, head) slices at
#: a time (at least one slice): no (batch, heads, q_len, kv_len) array is made unless the
#: weights are asked for (it made two, and a copy of the mask as large: 1.1 GB at 1 x 8 x
#: 4096 x 4096 for a (4096, 4096) mask), and the scores stay in cache from their product
#: through the masked softmax to the product with V.
MASKED_CHUNK_BYTES = 2 << 20


def _masked_attention(q, k, v, out, weights, scale, causal, kv_lengths, mask, threads):
    """The dense-mask path into out: BLAS scores, the masked softmax, the product with V,
    chunk by chunk of (batch, head) slices; ``weights`` (batch, heads, q_len, kv_len) or None
    receives the probabilities (the same chunks either way, so asking for the weights never
    changes an output bit), and with ``out`` None they are all it computes. ``mask`` is the
    caller's, broadcast (batch, heads, q_len, kv_len): only a chunk of it is copied at a time,
    with the causal and length limits applied."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    group = heads // k.shape[1]
    k_full = np.ascontiguousarray(np.repeat(k, group, axis=1)) if group > 1 else k
    slices = batch * heads
    q3 = q.reshape(slices, q_len, head_dim)
    k3 = k_full.reshape(slices, kv_len, head_dim)
    if out is not None:
        v_full = np.ascontiguousarray(np.repeat(v, group, axis=1)) if group > 1 else v
        out3 = out.reshape(slices, q_len, head_dim)
        v3 = v_full.reshape(slices, kv_len, head_dim)
    allowed = None   # the causal limit, the same for every slice
    if causal:
        allowed = np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)
    per = max(1, MASKED_CHUNK_BYTES // (q_len * kv_len * q.dtype.itemsize))
    scratch = None if weights is not None else np.empty((min(per, slices), q_len, kv_len),
                                                        dtype=q.dtype)
    for s0 in range(0, slices, per):
        s1 = min(slices, s0 + per)
        # the chunk's slices of the broadcast mask, copied: the batch entries they lie in when
        # the chunk holds a whole entry's heads (at most 2 (heads - 1) slices more than the
        # chunk: a partial entry at each end), else the heads of the one or two it touches
        b0, b1 = s0 // heads, (s1 - 1) // heads + 1
        if s1 - s0 >= heads:
            keep = np.array(mask[b0:b1], dtype=bool, order="C").reshape(-1, q_len, kv_len)[
                s0 - b0 * heads:s1 - b0 * heads]
        else:
            keep = np.ascontiguousarray(np.concatenate(
                [mask[b, max(s0 - b * heads, 0):min(s1 - b * heads, heads)]
                 for b in range(b0, b1)]))
        if allowed is not None:
            keep &= allowed
        if kv_lengths is not None:
            keep &= (np.arange(kv_len) < kv_lengths[np.arange(s0, s1) // heads, None, None])
        w = (weights.reshape(slices, q_len, kv_len)[s0:s1] if weights is not None
             else scratch[:s1 - s0])
        _blas.matmul(q3[s0:s1], k3[s0:s1], w, True, scale, threads)
        # (in place: the masked softmax writes every entry)
        _softmax.softmax_rows(w.reshape(-1, kv_len), w.reshape(-1, kv_len), None,
                              keep.reshape(-1, kv_len).view(np.uint8), False, threads)
        if out is None:
            continue
        # a value row a query does not see adds nothing to it, NaN or not (0 x NaN would: a
        # NaN in a padded cache's tail made every row of its slice NaN, where kv_lengths alone
        # does not). (attention() sends here only calls with a non-finite value some query
        # keeps; the chunks without one take the plain product.)
        values = v3[s0:s1]
        bad = ~np.isfinite(values)                                   # (n, kv_len, head_dim)
        if not bad.any():
            _blas.matmul(w, values, out3[s0:s1], False, 1.0, threads)
            continue
        _blas.matmul(w, np.where(bad, 0, values), out3[s0:s1], False, 1.0, threads)
        # the rows that do see a non-finite value: their own sum over the keys they keep
        seen = keep & bad.any(axis=2)[:, None, :]                     # (n, q_len, kv_len)
        for i, row in np.argwhere(seen.any(axis=2)):
            kept = keep[i, row]
            out3[s0 + i, row] = (w[i, row, kept, None] * values[i, kept]).sum(axis=0)


def project_keys(keys, w_k):
    """keys (batch, kv_len, k_dim) . w_k (k_dim, hidden): the encoder memory projected once per
    source, to pass as ``keys`` with ``w_k=None`` to :func:`additive_attention` at every step."""
    keys = check_float_array(keys, "keys", ndim=3)
    w_k = check_float_array(w_k, "w_k", ndim=2, dtype=keys.dtype)
    if w_k.shape[0] != keys.shape[2]:
        raise ValueError(f"w_k must have shape ({keys.shape[2]}, hidden), got {w_k.shape}")
    rows = keys.shape[0] * keys.shape[1]
    out = np.empty((1, rows, w_k.shape[1]), dtype=keys.dtype)
    _blas.matmul(keys.reshape(1, rows, keys.shape[2]), w_k[None], out, False, 1.0,
                 kernel_threads())
    return out.reshape(keys.shape[0], keys.shape[1], w_k.shape[1])


class AdditiveKeys:
    """Keys projected once for additive attention, with the factors a decoder's steps reuse.

    ``AdditiveKeys(projected)`` keeps a read-only copy of ``projected`` (batch, kv_len,
    hidden); ``AdditiveKeys.project(keys, w_k)`` projects ``keys`` (batch, kv_len, k_dim) by
    ``w_k`` (k_dim, hidden) first. Pass it as ``keys`` with ``w_k=None`` to
    :func:`additive_attention`.

    Why: float32 additive attention splits its tanh, tanh(a + b) = 1 - 2 / (1 + e^2a e^2b),
    so that a score term is a multiply-add and a reciprocal instead of a tanh -- but the key
    factors e^2b cost one exp per key element, which only pays from two queries on when they
    are computed inside the call. Computed here once per source (``factors`` = exp(2
    ``projected``), float32 (batch, kv_len, hidden)), they make every single-query decoder step
    take the split: the scores are those a call with two or more queries computes from
    ``projected`` alone, bit for bit. Rows with an entry beyond the split's limit (|x| > 21,
    or NaN) have ``in_limit`` False (bool (batch, kv_len)) and factors 0; a batch element with
    such a valid key keeps the exact tanh. float64 has no split: ``factors`` and ``in_limit``
    are None. Cost: the factors double the keys' memory.
    """

    __slots__ = ("projected", "factors", "in_limit")

    def __init__(self, projected):
        projected = check_float_array(projected, "projected", ndim=3)
        self._set(np.array(projected, order="C", copy=True))

    @classmethod
    def project(cls, keys, w_k) -> "AdditiveKeys":
        """keys (batch, kv_len, k_dim) . w_k (k_dim, hidden), then the factors."""
        self = cls.__new__(cls)
        self._set(project_keys(keys, w_k))
        return self

    def _set(self, projected):
        # read-only views that cannot be made writeable again: factors and in_limit are
        # derived from projected once, and an edit of projected left them stale
        self.projected = read_only_view(projected)
        self.factors = self.in_limit = None
        if projected.dtype == np.float32:
            batch, kv_len, hidden = projected.shape
            factors = np.empty(projected.shape, dtype=np.float32)
            in_limit = np.empty((batch, kv_len), dtype=np.uint8)
            _additive.key_factors(projected.reshape(-1, hidden), factors.reshape(-1, hidden),
                                  in_limit.reshape(-1), kernel_threads())
            self.factors = read_only_view(factors)
            self.in_limit = read_only_view(in_limit).view(bool)

    @property
    def shape(self):
        """(batch, kv_len, hidden)"""
        return self.projected.shape

    @property
    def dtype(self):
        return self.projected.dtype

    def __repr__(self):
        return f"AdditiveKeys(shape={self.shape}, dtype={self.dtype})"


def additive_attention(queries, keys, values, w_q, w_k, w_v, *, kv_lengths=None,
                       return_weights=False):
    """Additive (Bahdanau) attention, score(q, k) = w_v . tanh(q W_q + k W_k), fused.

    Parameters
    ----------
    queries : (batch, q_len, q_dim)
    keys : (batch, kv_len, k_dim), or (batch, kv_len, hidden) already projected when w_k is None
        (see :func:`project_keys`: a decoder projects the encoder memory once per source), or
        an :class:`AdditiveKeys` with w_k None (projected, with the split tanh's key factors:
        single-query steps then take the split too).
    values : (batch, kv_len, v_dim)
    w_q : (q_dim, hidden); w_k : (k_dim, hidden) or None; w_v : (hidden,)
    kv_lengths : (batch,) int, optional -- keys j >= kv_lengths[b] are padding.

    Returns (batch, q_len, v_dim) [, weights (batch, q_len, kv_len)]. The
    batch x q_len x kv_len x hidden tensor of the textbook formula is never formed.
    """
    return_weights = check_bool(return_weights, "return_weights")
    queries = check_float_array(queries, "queries", ndim=3)
    dtype = queries.dtype
    factors = in_limit = None
    if isinstance(keys, AdditiveKeys):
        if w_k is not None:
            raise ValueError("w_k must be None when keys is an AdditiveKeys (already projected)")
        if keys.dtype != dtype:
            raise TypeError(f"keys must have dtype {dtype} like queries, got an AdditiveKeys of "
                            f"{keys.dtype}")
        keys, factors, in_limit = keys.projected, keys.factors, keys.in_limit
    keys = check_float_array(keys, "keys", ndim=3, dtype=dtype)
    values = check_float_array(values, "values", ndim=3, dtype=dtype)
    w_q = check_float_array(w_q, "w_q", ndim=2, dtype=dtype)
    w_v = check_float_array(w_v, "w_v", ndim=1, dtype=dtype)
    batch, q_len, q_dim = queries.shape
    if keys.shape[0] != batch or values.shape[0] != batch:
        raise ValueError(f"queries, keys and values must have the same batch size, got {batch}, "
                         f"{keys.shape[0]}, {values.shape[0]}")
    if values.shape[1] != keys.shape[1]:
        raise ValueError(f"keys and values must have the same kv_len, got {keys.shape[1]} and "
                         f"{values.shape[1]}")
    if w_q.shape[0] != q_dim:
        raise ValueError(f"w_q must have shape ({q_dim}, hidden), got {w_q.shape}")
    hidden = w_q.shape[1]
    if w_v.shape[0] != hidden:
        raise ValueError(f"w_v must have shape ({hidden},), got {w_v.shape}")
    if w_k is not None:
        w_k = check_float_array(w_k, "w_k", ndim=2, dtype=dtype)
        if w_k.shape != (keys.shape[2], hidden):
            raise ValueError(f"w_k must have shape ({keys.shape[2]}, {hidden}), got {w_k.shape}")
        keys = project_keys(keys, w_k)
    elif keys.shape[2] != hidden:
        raise ValueError(f"keys must be projected to hidden={hidden} when w_k is None, got last "
                         f"dimension {keys.shape[2]}")
    kv_len = keys.shape[1]
    if kv_lengths is not None:
        kv_lengths = check_lengths(kv_lengths, "kv_lengths", (batch,), kv_len)
    threads = kernel_threads()
    q_proj = np.empty((1, batch * q_len, hidden), dtype=dtype)
    _blas.matmul(queries.reshape(1, batch * q_len, q_dim), w_q[None], q_proj, False, 1.0, threads)
    out = np.zeros((batch, q_len, values.shape[2]), dtype=dtype)
    weights = np.zeros((batch, q_len, kv_len), dtype=dtype) if return_weights else None
    if out.size and kv_len:
        _additive.additive(q_proj.reshape(batch, q_len, hidden), keys, w_v, values, out, weights,
                           kv_lengths, threads, factors,
                           None if in_limit is None else in_limit.view(np.uint8))
    return (out, weights) if return_weights else out


def luong_attention(queries, keys, values, *, method="dot", w=None, w_q=None, w_k=None, v=None,
                    kv_lengths=None, return_weights=False):
    """Luong attention: softmax over keys of a score, then the weighted sum of values.

    method "dot": q . k;  "general": q W k with w (q_dim, k_dim);
    "concat": v . tanh(W [q; k]) with W split as w_q (q_dim, hidden), w_k (k_dim, hidden) and
    v (hidden,) -- the additive kernel.
    queries (batch, q_len, q_dim), keys (batch, kv_len, k_dim), values (batch, kv_len, v_dim).
    Returns (batch, q_len, v_dim) [, weights (batch, q_len, kv_len)].
    """
    return_weights = check_bool(return_weights, "return_weights")
    if method == "concat":
        for name, val in (("w_q", w_q), ("w_k", w_k), ("v", v)):
            if val is None:
                raise ValueError(f"luong_attention(method='concat') needs {name}")
        return additive_attention(queries, keys, values, w_q, w_k, v, kv_lengths=kv_lengths,
                                  return_weights=return_weights)
    if method not in ("dot", "general"):
        raise ValueError(f"method must be 'dot', 'general' or 'concat', got {method!r}")
    queries = check_float_array(queries, "queries", ndim=3)
    keys = check_float_array(keys, "keys", ndim=3, dtype=queries.dtype)
    values = check_float_array(values, "values", ndim=3, dtype=queries.dtype)
    if queries.shape[0] != keys.shape[0]:
        raise ValueError(f"queries must have batch {keys.shape[0]} like keys, got "
                         f"{queries.shape[0]}")
    if method == "general":
        if w is None:
            raise ValueError("luong_attention(method='general') needs w")
        w = check_float_array(w, "w", ndim=2, dtype=queries.dtype)
        if w.shape != (queries.shape[2], keys.shape[2]):
            raise ValueError(f"w must have shape ({queries.shape[2]}, {keys.shape[2]}), got {w.shape}")
        rows = queries.shape[0] * queries.shape[1]
        q2 = np.empty((1, rows, w.shape[1]), dtype=queries.dtype)
        _blas.matmul(queries.reshape(1, rows, queries.shape[2]), w[None], q2, False, 1.0,
                     kernel_threads())
        queries = q2.reshape(queries.shape[0], queries.shape[1], w.shape[1])
    if queries.shape[2] != keys.shape[2]:
        raise ValueError(f"dot scores need queries and keys of one width, got {queries.shape[2]} "
                         f"and {keys.shape[2]}")
    if values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"values must have shape ({keys.shape[0]}, {keys.shape[1]}, v_dim), got "
                         f"{values.shape}")
    if values.shape[2] != keys.shape[2] or keys.shape[2] == 0:
        # the fused kernel wants one head_dim, and a non-zero one (its error named its own
        # argument q); fall back to scores + masked softmax
        scores = np.empty((queries.shape[0], queries.shape[1], keys.shape[1]), dtype=queries.dtype)
        _blas.matmul(queries, keys, scores, True, 1.0, kernel_threads())
        from .basic import softmax
        lengths = None if kv_lengths is None else np.broadcast_to(
            check_lengths(kv_lengths, "kv_lengths", (keys.shape[0],), keys.shape[1])[:, None],
            scores.shape[:2])
        weights = softmax(scores, lengths=lengths)
        out = np.empty((queries.shape[0], queries.shape[1], values.shape[2]), dtype=queries.dtype)
        _blas.matmul(np.ascontiguousarray(weights), values, out, False, 1.0, kernel_threads())
        return (out, weights) if return_weights else out
    result = attention(queries[:, None], keys[:, None], values[:, None], kv_lengths=kv_lengths,
                       scale=1.0, return_weights=return_weights)
    if return_weights:
        return result[0][:, 0], result[1][:, 0]
    return result[:, 0]


def nadaraya_watson(queries, keys, values, bandwidth=1.0, *, return_weights=False):
    """Nadaraya-Watson kernel regression as attention pooling (Gaussian kernel):

        out_i = sum_j softmax_j(-||q_i - k_j||^2 / (2 bandwidth^2)) values_j

    queries (n_q, d) or (n_q,), keys (n_k, d) or (n_k,), values (n_k, d_v) or (n_k,).
    Returns (n_q, d_v) or (n_q,) [, weights (n_q, n_k)].
    """
    return_weights = check_bool(return_weights, "return_weights")
    queries = check_float_array(queries, "queries")
    keys = check_float_array(keys, "keys", dtype=queries.dtype)
    values = check_float_array(values, "values", dtype=queries.dtype)
    bandwidth = check_positive_float(bandwidth, "bandwidth")
    for name, arr in (("queries", queries), ("keys", keys), ("values", values)):
        if arr.ndim not in (1, 2):
            raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
    # explicit widths: NumPy cannot infer -1 for a zero-sized array
    q2 = queries.reshape(queries.shape[0], queries.shape[1] if queries.ndim == 2 else 1)
    k2 = keys.reshape(keys.shape[0], keys.shape[1] if keys.ndim == 2 else 1)
    if q2.shape[1] != k2.shape[1]:
        raise ValueError(f"queries and keys must have the same feature size, got {q2.shape[1]} "
                         f"and {k2.shape[1]}")
    if values.shape[0] != keys.shape[0]:
        raise ValueError(f"values must have {keys.shape[0]} rows like keys, got {values.shape[0]}")
    v2 = np.ascontiguousarray(values.reshape(values.shape[0],
                                             values.shape[1] if values.ndim == 2 else 1))
    out = np.zeros((q2.shape[0], v2.shape[1]), dtype=queries.dtype)
    weights = np.zeros((q2.shape[0], k2.shape[0]), dtype=queries.dtype) if return_weights else None
    if q2.shape[0] and k2.shape[0]:
        _additive.nadaraya_watson(np.ascontiguousarray(q2), np.ascontiguousarray(k2), v2, out,
                                  weights, bandwidth, kernel_threads())
    out = out.reshape(-1) if values.ndim == 1 else out
    return (out, weights) if return_weights else out
