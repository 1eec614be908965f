# SPDX-License-Identifier: Apache-2.0
"""The compiled decoding step of a Transformer decoder (float32): token embedding, every
decoder layer against its KV cache, the final norm, the vocabulary projection and the
log-softmax -- one call with the GIL released.

The maths and the order of operations are those of :mod:`attncore.models.transformer`
(``torch.nn.Transformer`` names; pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``),
and every piece runs on the same C kernel the Python fronts call (packed panels for the
products, the split-KV decode attention, the row LayerNorm, the row log-softmax), so a step gives
the bits the kernel-by-kernel composition gives. Callers (``attncore.models.transformer``) check
the token ids against their vocabulary and the positions against the position table with
messages for users; this module re-checks what a wrong call could turn into a memory error.

Threads: each kernel splits its work by shape only, so results are bit-identical for every
thread count and a batch row never depends on the other rows. The object holds only read-only
weights; any number of Python threads may call :meth:`DecoderStep.step` at once, each with its
own caches.
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport sgemm

from ._packed_linear cimport (AC_MAX_THREADS, Linear, float32_array, float32_table, linear_rows,
                              packed_linear, two_parts)
from ._sdpa cimport ac_sdpa_splitkv_f32, ac_sdpa_weights_f32

import numpy as np

cdef extern from "layers.h" nogil:
    int AC_NORM_STANDARD, AC_ACT_RELU, AC_ACT_GELU
    void ac_layer_norm_f32(const float *x, float *y, const float *gamma, const float *beta,
                           Py_ssize_t rows, Py_ssize_t D, float eps, int mode, int num_threads)
    void ac_activation_f32(const float *x, float *y, Py_ssize_t n, int kind, int num_threads)

cdef extern from "softmax.h" nogil:
    void ac_softmax_f32(const float *x, float *y, Py_ssize_t n_rows, Py_ssize_t n,
                        const int64_t *lengths, const unsigned char *mask, int log_output,
                        int num_threads)


cdef struct Layer:
    Linear self_qkv, self_out, cross_q, cross_out, linear1, linear2
    const float *norm_weight[3]    # norm1, norm2 (+ norm3 with cross-attention), each (d,)
    const float *norm_bias[3]


def _f32(a, shape, name, list keep):
    return float32_array(a, shape, "DecoderStep", name, keep)


cdef Linear _packed(pair, Py_ssize_t n_out, Py_ssize_t n_in, str name, list keep) except *:
    return packed_linear(pair, n_out, n_in, "DecoderStep", name, keep)


cdef Py_ssize_t _common_length(list arrays, Py_ssize_t B, Py_ssize_t H, Py_ssize_t hd,
                               str what) except -1:
    """The length L shared by ``arrays``, each C-contiguous float32 (B, H, L, hd)."""
    cdef const float[:, :, :, ::1] a
    cdef Py_ssize_t length = -1
    for array in arrays:
        a = array
        if length < 0:
            length = a.shape[2]
        if a.shape[0] != B or a.shape[1] != H or a.shape[2] != length or a.shape[3] != hd:
            raise ValueError(f"DecoderStep.step: {what} must have shape ({B}, {H}, {length}, {hd})")
    return length


#: Bytes a cache gather copies before a second thread joins in (below it the copy is done
#: before a thread would have started).
cdef Py_ssize_t _GATHER_PARALLEL_BYTES = 1 << 20


def gather_cache_prefix(const float[:, :, :, ::1] cache, const int64_t[::1] rows,
                        Py_ssize_t filled, float[:, :, :, ::1] out, int num_threads):
    """``out[i, :, :filled] = cache[rows[i], :, :filled]`` for every i (beam search reordering
    a KV cache): one memcpy per (row, head) block, without the GIL, over ``num_threads``.

    cache (B, H, capacity, head_dim) and out (R, H, capacity, head_dim) float32, C-contiguous,
    not overlapping; rows (R,) int64 in [0, B); 0 <= filled <= capacity. Positions past
    ``filled`` of ``out`` are left as they are.
    """
    cdef Py_ssize_t B = cache.shape[0], H = cache.shape[1], cap = cache.shape[2]
    cdef Py_ssize_t D = cache.shape[3], R = rows.shape[0], i, block, row
    if out.shape[0] != R or out.shape[1] != H or out.shape[2] != cap or out.shape[3] != D:
        raise ValueError(f"out must have shape ({R}, {H}, {cap}, {D}), got "
                         f"({out.shape[0]}, {out.shape[1]}, {out.shape[2]}, {out.shape[3]})")
    if filled < 0 or filled > cap:
        raise ValueError(f"filled must lie in [0, {cap}], got {filled}")
    for i in range(R):
        if rows[i] < 0 or rows[i] >= B:
            raise ValueError(f"rows must lie in [0, {B}), got {rows[i]}")
    if R == 0 or H == 0 or filled == 0 or D == 0:
        return
    cdef const char *c0 = <const char *>&cache[0, 0, 0, 0]
    cdef const char *o0 = <const char *>&out[0, 0, 0, 0]
    if o0 < c0 + B * H * cap * D * sizeof(float) and c0 < o0 + R * H * cap * D * sizeof(float):
        raise ValueError("out must not overlap cache")
    cdef Py_ssize_t nbytes = filled * D * sizeof(float)
    cdef int threads = num_threads if R * H * nbytes >= _GATHER_PARALLEL_BYTES else 1
    with nogil:
        for block in prange(R * H, schedule="static", num_threads=min(max(threads, 1), AC_MAX_THREADS)):
            row = rows[block // H]
            memcpy(&out[block // H, block % H, 0, 0], &cache[row, block % H, 0, 0], nbytes)


cdef class DecoderStep:
    """A Transformer decoder's per-token work, compiled; built once per model.

    Parameters (keywords)
    ---------------------
    d_model, num_heads, dim_feedforward : int
    norm_first, gelu : bool; eps : float (LayerNorm)
    embed_scale : float or None (token embeddings are multiplied by it, e.g. sqrt(d_model))
    attention_scale : float (1 / sqrt(head_dim)); decode_chunk : int (the split-KV chunk)
    small_gemm_macs : int, ``threads.BLAS_SMALL_GEMM_MACS`` (how products past the panel kernel's rows are cut)
    embedding : (V_in, d) float32; positions : (P, d) float32 (rows added at each position)
    final_norm : (gamma, beta) each (d,), or None
    output : PackedLinearWeight (V, d); output_bias : (V,) float32
    layers : list of dicts, one per decoder layer, with keys ``norms`` (2 or 3 (gamma, beta)
        pairs), ``self_qkv`` (3d, d), ``self_out`` (d, d), ``cross_q`` (d, d) or None,
        ``cross_out`` (d, d) or None, ``linear1`` (F, d), ``linear2`` (d, F): each a pair
        (PackedLinearWeight, bias or None). Either every layer has cross-attention or none.
    """
    cdef readonly Py_ssize_t d_model, num_heads, head_dim, ffn, vocab, num_layers
    cdef readonly Py_ssize_t embedding_rows, position_rows
    cdef readonly bint norm_first, gelu, has_cross
    cdef float eps, embed_scale, attention_scale
    cdef bint scaled
    cdef Py_ssize_t decode_chunk, small_gemm_macs
    cdef const float *embedding
    cdef const float *positions
    cdef const float *final_weight
    cdef const float *final_bias
    cdef Linear output
    cdef Layer *layers
    cdef object _keep               # every array the pointers above point into
    cdef bint _built                # __init__ ran to the end (once: the pointers stay valid)

    def __cinit__(self):
        self.layers = NULL
        self._built = False

    def __dealloc__(self):
        free(self.layers)

    def __init__(self, *, Py_ssize_t d_model, Py_ssize_t num_heads, Py_ssize_t dim_feedforward,
                 bint norm_first, bint gelu, double eps, embed_scale, double attention_scale,
                 Py_ssize_t decode_chunk, Py_ssize_t small_gemm_macs, embedding, positions,
                 final_norm, output, output_bias, layers):
        if self._built:   # (a second __init__ repointed into arrays it might then free)
            raise RuntimeError("DecoderStep: already built; make a new one")
        if d_model <= 0 or num_heads <= 0 or d_model % num_heads or dim_feedforward <= 0:
            raise ValueError(f"DecoderStep: d_model ({d_model}) must be a positive multiple of "
                             f"num_heads ({num_heads}), dim_feedforward ({dim_feedforward}) > 0")
        layers = list(layers)   # (once: an __array__ below could grow the caller's list)
        if not layers:
            raise ValueError("DecoderStep: layers must hold at least one decoder layer")
        if decode_chunk <= 0:
            raise ValueError(f"DecoderStep: decode_chunk must be > 0, got {decode_chunk}")
        cdef const float[::1] m1
        cdef const float[:, ::1] m2
        cdef Layer *layer
        cdef list keep = []
        cdef Py_ssize_t d = d_model, F = dim_feedforward
        f32 = lambda a, shape, name: _f32(a, shape, name, keep)  # noqa: E731

        self.d_model, self.num_heads, self.head_dim, self.ffn = d, num_heads, d // num_heads, F
        self.norm_first, self.gelu, self.eps = norm_first, gelu, eps
        self.scaled = embed_scale is not None
        self.embed_scale = embed_scale if self.scaled else 1.0
        self.attention_scale, self.decode_chunk = attention_scale, decode_chunk
        self.small_gemm_macs = small_gemm_macs
        self.has_cross = layers[0]["cross_q"] is not None
        m2 = float32_table(embedding, d, "DecoderStep", "embedding", keep)
        self.embedding, self.embedding_rows = &m2[0, 0], m2.shape[0]
        m2 = float32_table(positions, d, "DecoderStep", "positions", keep)
        self.positions, self.position_rows = &m2[0, 0], m2.shape[0]
        self.final_weight = self.final_bias = NULL
        if final_norm is not None:
            gamma, beta = two_parts(final_norm, "DecoderStep", "final_norm")
            m1 = f32(gamma, (d,), "final_norm weight"); self.final_weight = &m1[0]
            m1 = f32(beta, (d,), "final_norm bias"); self.final_bias = &m1[0]
        self.vocab = output.shape[0]
        self.output = _packed((output, output_bias), self.vocab, d, "output", keep)
        if self.output.bias == NULL:
            raise ValueError("DecoderStep: output_bias is required")

        free(self.layers)   # (the table of an __init__ that failed part-way)
        self.num_layers = 0
        self.layers = <Layer *>malloc(len(layers) * sizeof(Layer))
        if self.layers == NULL:
            raise MemoryError("DecoderStep: could not allocate the layer table")
        for i, spec in enumerate(layers):
            layer = &self.layers[i]
            name = f"layers[{i}]."
            if (spec["cross_q"] is not None) != self.has_cross or \
                    (spec["cross_out"] is not None) != self.has_cross:
                raise ValueError(f"DecoderStep: {name}cross_q/cross_out: every layer has "
                                 f"cross-attention or none does")
            layer.self_qkv = _packed(spec["self_qkv"], 3 * d, d, name + "self_qkv", keep)
            layer.self_out = _packed(spec["self_out"], d, d, name + "self_out", keep)
            if self.has_cross:
                layer.cross_q = _packed(spec["cross_q"], d, d, name + "cross_q", keep)
                layer.cross_out = _packed(spec["cross_out"], d, d, name + "cross_out", keep)
            layer.linear1 = _packed(spec["linear1"], F, d, name + "linear1", keep)
            layer.linear2 = _packed(spec["linear2"], d, F, name + "linear2", keep)
            norms = spec["norms"]
            if len(norms) != (3 if self.has_cross else 2):
                raise ValueError(f"DecoderStep: {name}norms must hold {3 if self.has_cross else 2}"
                                 f" (gamma, beta) pairs, got {len(norms)}")
            for j, (gamma, beta) in enumerate(norms):
                m1 = f32(gamma, (d,), f"{name}norms[{j}] gamma"); layer.norm_weight[j] = &m1[0]
                m1 = f32(beta, (d,), f"{name}norms[{j}] beta"); layer.norm_bias[j] = &m1[0]
        self.num_layers = len(layers)   # (only now is every layer filled)
        self._keep = keep
        self._built = True

    def step(self, const int64_t[::1] tokens, const int64_t[::1] positions, list k_caches,
             list v_caches, list cross_k, list cross_v, const int64_t[::1] src_lengths,
             float[:, ::1] log_probs, float[:, :, ::1] weights, int num_threads):
        """Feed one token per row through the decoder; in place on the caches.

        tokens (B,) in [0, embedding rows); positions (B,) each row's position (= tokens already
        in its cache), < the position table and the cache capacity;
        k_caches, v_caches : one (B, H, capacity, head_dim) float32 array per layer; the new
            keys/values are written at each row's position, and row b then attends to its
            positions [0, positions[b]] (nothing past them is read, so they need no initialising)
        cross_k, cross_v : one (B, H, S, head_dim) per layer, or None without cross-attention;
        src_lengths (B,) in [0, S], or None without cross-attention;
        log_probs (B, V) out: next-token log-probabilities;
        weights (B, H, S) out: the last layer's cross-attention weights, or None (not computed).
        """
        cdef Py_ssize_t B = tokens.shape[0], L = self.num_layers, H = self.num_heads
        cdef Py_ssize_t d = self.d_model, hd = self.head_dim, F = self.ffn
        cdef Py_ssize_t capacity = -1, S = 0, b, layer_index
        cdef float[:, :, :, ::1] cache
        cdef const float[:, :, :, ::1] source
        if not self._built:
            raise ValueError("DecoderStep.step: not built (__init__ did not complete)")
        # this call's own lists: they hold the arrays while the GIL is released (another
        # thread emptying the caller's lists freed them under the step)
        k_caches, v_caches = list(k_caches), list(v_caches)
        cross_k = list(cross_k) if cross_k is not None else None
        cross_v = list(cross_v) if cross_v is not None else None
        if positions.shape[0] != B or log_probs.shape[0] != B or log_probs.shape[1] != self.vocab:
            raise ValueError(f"DecoderStep.step: tokens ({B},), positions ({B},) and log_probs "
                             f"({B}, {self.vocab}) disagree")
        if len(k_caches) != L or len(v_caches) != L:
            raise ValueError(f"DecoderStep.step: k_caches and v_caches need one array per layer ({L})")
        if self.has_cross != (cross_k is not None) or self.has_cross != (cross_v is not None) or \
                self.has_cross != (src_lengths is not None):
            raise ValueError("DecoderStep.step: cross_k, cross_v and src_lengths are required "
                             "with cross-attention and must be None without it")
        if weights is not None and not self.has_cross:
            raise ValueError("DecoderStep.step: weights needs cross-attention")
        if B == 0:
            return
        capacity = _common_length(k_caches + v_caches, B, H, hd, "every KV cache")
        for b in range(B):
            if not 0 <= tokens[b] < self.embedding_rows:
                raise ValueError(f"DecoderStep.step: tokens[{b}] = {tokens[b]} is outside "
                                 f"[0, {self.embedding_rows})")
            if not 0 <= positions[b] < min(capacity, self.position_rows):
                raise ValueError(f"DecoderStep.step: positions[{b}] = {positions[b]} is outside "
                                 f"[0, {min(capacity, self.position_rows)})")
        if self.has_cross:
            if len(cross_k) != L or len(cross_v) != L or src_lengths.shape[0] != B:
                raise ValueError(f"DecoderStep.step: cross_k / cross_v need one array per layer "
                                 f"and src_lengths shape ({B},)")
            S = _common_length(cross_k + cross_v, B, H, hd, "every cross K/V array")
            for b in range(B):
                if not 0 <= src_lengths[b] <= S:
                    raise ValueError(f"DecoderStep.step: src_lengths[{b}] is outside [0, {S}]")
            if weights is not None and (weights.shape[0] != B or weights.shape[1] != H or
                                        weights.shape[2] != S):
                raise ValueError(f"DecoderStep.step: weights must have shape ({B}, {H}, {S})")

        # per-call tables and scratch (the object itself stays read-only)
        cdef float **k_ptr = <float **>malloc(4 * L * sizeof(float *))
        cdef Py_ssize_t widest = max(3 * d, F)
        cdef float *scratch = <float *>malloc((4 * d + widest) * B * sizeof(float))
        cdef int64_t *kv_lengths = <int64_t *>malloc(B * sizeof(int64_t))
        if k_ptr == NULL or scratch == NULL or kv_lengths == NULL:
            free(k_ptr); free(scratch); free(kv_lengths)
            raise MemoryError("DecoderStep.step: could not allocate scratch memory")
        cdef float **v_ptr = k_ptr + L
        cdef float **ck_ptr = k_ptr + 2 * L
        cdef float **cv_ptr = k_ptr + 3 * L
        try:   # (a read-only cache fails its memoryview here: the tables must not leak)
            for layer_index in range(L):
                cache = k_caches[layer_index]; k_ptr[layer_index] = &cache[0, 0, 0, 0]
                cache = v_caches[layer_index]; v_ptr[layer_index] = &cache[0, 0, 0, 0]
                if self.has_cross:
                    source = cross_k[layer_index]; ck_ptr[layer_index] = <float *>&source[0, 0, 0, 0]
                    source = cross_v[layer_index]; cv_ptr[layer_index] = <float *>&source[0, 0, 0, 0]
        except BaseException:
            free(k_ptr); free(scratch); free(kv_lengths)
            raise
        cdef const int64_t *src_len = &src_lengths[0] if self.has_cross else NULL
        cdef float *weights_out = &weights[0, 0, 0] if weights is not None else NULL
        cdef int status = 0
        with nogil:
            status = self._run(&tokens[0], &positions[0], B, capacity, S, k_ptr, v_ptr, ck_ptr,
                               cv_ptr, src_len, &log_probs[0, 0], weights_out, scratch,
                               kv_lengths, num_threads)
        free(k_ptr); free(scratch); free(kv_lengths)
        if status != 0:
            raise MemoryError("DecoderStep.step: could not allocate attention scratch memory")

    cdef int _run(self, const int64_t *tokens, const int64_t *positions, Py_ssize_t B,
                  Py_ssize_t capacity, Py_ssize_t S, float **k_caches, float **v_caches,
                  float **cross_k, float **cross_v, const int64_t *src_lengths, float *log_probs,
                  float *weights, float *scratch, int64_t *kv_lengths,
                  int num_threads) noexcept nogil:
        """The step proper on validated pointers; returns a kernel's non-zero status on an
        allocation failure. Scratch blocks (row-major): x, h, q, att (B, d) | wide (B, max(3d, F))."""
        cdef Py_ssize_t d = self.d_model, H = self.num_heads, hd = self.head_dim, F = self.ffn
        cdef Py_ssize_t b, h, j, i, last = self.num_layers - 1
        cdef float *x = scratch
        cdef float *hn = x + B * d           # the normed sublayer input (pre-norm)
        cdef float *q = hn + B * d
        cdef float *att = q + B * d
        cdef float *wide = att + B * d       # the fused QKV rows, or the feed-forward hidden rows
        cdef const float *src
        cdef const float *e
        cdef const float *p
        cdef float *dst
        cdef const Layer *layer
        cdef int status = 0, norm_index

        # x = E[token] (* scale) + P[position]
        for b in range(B):
            e = self.embedding + tokens[b] * d
            p = self.positions + positions[b] * d
            for j in range(d):
                x[b * d + j] = (e[j] * self.embed_scale if self.scaled else e[j]) + p[j]
            kv_lengths[b] = positions[b] + 1

        for i in range(self.num_layers):
            layer = &self.layers[i]
            # self-attention: one fused QKV product; K and V go straight into the cache
            src = self._sublayer_input(x, hn, B, layer, 0, num_threads)
            linear_rows(src, B, layer.self_qkv, wide, self.small_gemm_macs, num_threads)
            for b in range(B):
                for h in range(H):
                    dst = k_caches[i] + ((b * H + h) * capacity + positions[b]) * hd
                    memcpy(dst, wide + b * 3 * d + d + h * hd, hd * sizeof(float))
                    dst = v_caches[i] + ((b * H + h) * capacity + positions[b]) * hd
                    memcpy(dst, wide + b * 3 * d + 2 * d + h * hd, hd * sizeof(float))
                memcpy(q + b * d, wide + b * 3 * d, d * sizeof(float))
            status = ac_sdpa_splitkv_f32(q, k_caches[i], v_caches[i], att, B, H, H, 1, capacity,
                                         hd, kv_lengths, 0, NULL, self.attention_scale,
                                         self.decode_chunk, num_threads)
            if status != 0:
                return status
            self._project_residual(x, att, B, layer.self_out, layer, 0, hn, num_threads)

            # cross-attention over the source K/V projected once per source
            if self.has_cross:
                src = self._sublayer_input(x, hn, B, layer, 1, num_threads)
                linear_rows(src, B, layer.cross_q, q, self.small_gemm_macs, num_threads)
                status = ac_sdpa_splitkv_f32(q, cross_k[i], cross_v[i], att, B, H, H, 1, S, hd,
                                             src_lengths, 0, NULL, self.attention_scale,
                                             self.decode_chunk, num_threads)
                if status == 0 and weights != NULL and i == last:
                    # the weights alone: the output stays split-KV's (weights . v on BLAS
                    # rounded with the batch's padded source length on AVX-512 machines)
                    status = ac_sdpa_weights_f32(q, cross_k[i], NULL, NULL, weights, B, H, H, 1,
                                                 S, hd, src_lengths, 0, self.attention_scale,
                                                 sgemm, num_threads)
                if status != 0:
                    return status
                self._project_residual(x, att, B, layer.cross_out, layer, 1, hn, num_threads)

            # feed-forward
            norm_index = 2 if self.has_cross else 1
            src = self._sublayer_input(x, hn, B, layer, norm_index, num_threads)
            linear_rows(src, B, layer.linear1, wide, self.small_gemm_macs, num_threads)
            ac_activation_f32(wide, wide, B * F, AC_ACT_GELU if self.gelu else AC_ACT_RELU,
                              num_threads)
            self._project_residual(x, wide, B, layer.linear2, layer, norm_index, hn, num_threads)

        if self.final_weight != NULL:
            ac_layer_norm_f32(x, x, self.final_weight, self.final_bias, B, d, self.eps,
                              AC_NORM_STANDARD, num_threads)
        linear_rows(x, B, self.output, log_probs, self.small_gemm_macs, num_threads)
        ac_softmax_f32(log_probs, log_probs, B, self.vocab, NULL, NULL, 1, num_threads)
        return 0

    cdef const float *_sublayer_input(self, float *x, float *hn, Py_ssize_t B,
                                      const Layer *layer, int norm_index,
                                      int num_threads) noexcept nogil:
        """norm(x) into hn before a pre-norm sublayer; x itself after post-norm."""
        if not self.norm_first:
            return x
        ac_layer_norm_f32(x, hn, layer.norm_weight[norm_index], layer.norm_bias[norm_index], B,
                          self.d_model, self.eps, AC_NORM_STANDARD, num_threads)
        return hn

    cdef void _project_residual(self, float *x, const float *y_in, Py_ssize_t B, Linear w,
                                const Layer *layer, int norm_index, float *y,
                                int num_threads) noexcept nogil:
        """x = x + y_in W^T (pre-norm) or norm(x + y_in W^T) (post-norm); y is (B, d) scratch
        (it may be the buffer the sublayer input was normed into: that input is spent)."""
        cdef Py_ssize_t n = B * self.d_model, j
        linear_rows(y_in, B, w, y, self.small_gemm_macs, num_threads)
        for j in range(n):
            x[j] = x[j] + y[j]
        if not self.norm_first:
            ac_layer_norm_f32(x, x, layer.norm_weight[norm_index], layer.norm_bias[norm_index],
                              B, self.d_model, self.eps, AC_NORM_STANDARD, num_threads)

