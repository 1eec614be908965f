# SPDX-License-Identifier: Apache-2.0
"""The compiled decoding step of a causal RAN language model (float32 activations): a token
inside its unfinished window through every RAN layer (window attention against the window's
cached keys and values, then the memory review against the carried memory), and the LM head
with its log-softmax -- each one call with the GIL released.

The maths and the order of operations are those of :mod:`attncore.models.ran` (RAN.md), and
every piece runs on the same C kernel the Python fronts call (packed panels for the products,
the flash tiles for both attentions, the row LayerNorm, the element-wise activations, the row
log-softmax), so a step gives the bits of the kernel-by-kernel composition, and so those of a
whole-window ``encode`` call. Callers (``attncore.models.ran``) check the tokens against the
vocabulary and keep the window cache; this module re-checks what a wrong call could turn into a
memory error.

Threads: each kernel splits its work by shape only, so results are bit-identical for every
thread count and a row never depends on the other rows. The object holds only read-only
weights; any number of Python threads may call it at once, each with its own caches.
"""
from libc.math cimport sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm

from ._packed_linear cimport (Linear, float32_array, float32_table, linear_rows, packed_linear,
                              two_parts)
from ._sdpa cimport ac_sdpa_flash_f32, ac_sdpa_flash_tiles_f32, ac_tile_gemm_available

import numpy as np

cdef extern from "layers.h" nogil:
    int AC_NORM_UNCENTRED, AC_ACT_SWISH, AC_ACT_SIGMOID
    void ac_layer_norm_f32(const float *x, float *y, const float *gamma, const float *beta,
                           Py_ssize_t rows, Py_ssize_t D, float eps, int mode, int num_threads)
    void ac_activation_f32(const float *x, float *y, Py_ssize_t n, int kind, int num_threads)
    void ac_rotary_f32(float *x, const int64_t *positions, Py_ssize_t N, Py_ssize_t L,
                       Py_ssize_t D, double base, int num_threads)

cdef extern from "softmax.h" nogil:
    void ac_softmax_f32(const float *x, float *y, Py_ssize_t n_rows, Py_ssize_t n,
                        const int64_t *lengths, const unsigned char *mask, int log_output,
                        int num_threads)


cdef struct Norm:
    const float *gamma      # (D,)
    const float *beta       # (D,)

cdef struct Layer:
    Norm concat_norm, attn_norm, review_norm, output_norm
    Linear qkv              # (3A, D): query, key, value of the window attention (A = H d)
    Linear attn_out         # (D, A)
    Linear attn_glu         # (2D, D): [value; gate]
    Linear review_query, review_out   # (D, D) each (memory review)
    Linear review_glu       # (2D, D)

cdef struct Flash:
    Py_ssize_t block_q, block_k
    bint tiles              # the tile kernel (else the BLAS flash path)


def _f32(a, shape, name, list keep):
    return float32_array(a, shape, "RANStep", name, keep)


cdef Linear _packed(pair, Py_ssize_t n_out, Py_ssize_t n_in, str name, list keep) except *:
    """The Linear of a (PackedLinearWeight, bias) pair (the bias required)."""
    if two_parts(pair, "RANStep", name)[1] is None:
        raise ValueError(f"RANStep: {name} needs its bias")
    return packed_linear(pair, n_out, n_in, "RANStep", name, keep)


cdef Norm _norm(pair, Py_ssize_t D, str name, list keep) except *:
    cdef Norm n
    cdef const float[::1] a
    gamma, beta = two_parts(pair, "RANStep", name)
    a = _f32(gamma, (D,), name + " gamma", keep); n.gamma = &a[0]
    a = _f32(beta, (D,), name + " beta", keep); n.beta = &a[0]
    return n


cdef Flash _flash_plan(plan, str name) except *:
    cdef Flash f
    f.block_q, f.block_k, f.tiles = plan
    if f.block_q <= 0 or f.block_k <= 0 or (f.tiles and f.block_q % 16):
        raise ValueError(f"RANStep: {name} must be (block_q > 0, block_k > 0, tiles) with "
                         f"block_q % 16 == 0 for the tile kernel, got {plan}")
    if f.tiles and not ac_tile_gemm_available():
        raise ValueError(f"RANStep: {name} asks for the tile kernel, which this machine lacks")
    return f


cdef inline int _attend(const float *q, const float *k, const float *v, float *out,
                        Py_ssize_t H, Py_ssize_t Lk, Py_ssize_t d, const int64_t *kv_length,
                        bint causal, Flash plan, int num_threads) noexcept nogil:
    """One query row per head (1, H, 1, d) against (1, H, Lk, d) on the flash path, as
    ``sequence_attention`` runs it (scale 1 / sqrt(d))."""
    cdef float scale = <float>(1.0 / sqrt(<double>d))
    if plan.tiles:
        return ac_sdpa_flash_tiles_f32(q, k, v, out, 1, H, H, 1, Lk, d, kv_length, causal, scale,
                                       plan.block_q, plan.block_k, num_threads)
    return ac_sdpa_flash_f32(q, k, v, out, 1, H, H, 1, Lk, d, kv_length, causal, NULL, scale,
                             plan.block_q, plan.block_k, sgemm, num_threads)


cdef class RANStep:
    """A causal RAN language model's per-token work, compiled; built once per model.

    Parameters (keywords)
    ---------------------
    embedding_size D, head_num H, head_size d (even) : int (the attention width is A = H d)
    eps : float (the langml LayerNorm epsilon); rotary_base : float
    memory_review : bool
    small_gemm_macs : int, ``threads.BLAS_SMALL_GEMM_MACS``
    embedding : (V, D) float32; embedding_norm : (gamma, beta)
    layers : list of dicts with ``concat_norm``, ``attn_norm`` and either ``review_norm`` or
        ``output_norm`` ((gamma, beta) pairs), and ``qkv`` (3A, D), ``attn_out`` (D, A),
        ``attn_glu`` (2D, D), with memory review ``review_query`` (D, D), ``review_out``
        (D, D), ``review_glu`` (2D, D): each a (PackedLinearWeight, bias) pair
    lm_dense : (D, D) pair; lm_norm : (gamma, beta); lm_output : PackedLinearWeight (V, D);
        lm_bias : (V,) float32
    """
    cdef readonly Py_ssize_t embedding_size, head_num, head_size, vocab, num_layers
    cdef readonly bint memory_review
    cdef float eps
    cdef double rotary_base
    cdef Py_ssize_t small_gemm_macs
    cdef const float *embedding
    cdef Norm embedding_norm, lm_norm
    cdef Linear lm_dense, lm_output
    cdef Layer *layers
    cdef object _keep
    cdef bint _built

    def __cinit__(self):
        self.layers = NULL
        self._built = False

    def __dealloc__(self):
        free(self.layers)

    def __init__(self, *, Py_ssize_t embedding_size, Py_ssize_t head_num, Py_ssize_t head_size,
                 double eps, double rotary_base, bint memory_review, Py_ssize_t small_gemm_macs,
                 embedding, embedding_norm, layers, lm_dense, lm_norm, lm_output, lm_bias):
        if self._built:
            raise RuntimeError("RANStep: already built; make a new one")
        cdef Py_ssize_t D = embedding_size
        if D <= 0 or head_num <= 0 or head_size <= 0 or head_size % 2:
            raise ValueError(f"RANStep: embedding_size ({D}), head_num ({head_num}) and "
                             f"head_size ({head_size}, even) must be > 0")
        layers = list(layers)   # (once: an __array__ below could grow the caller's list)
        if not layers:
            raise ValueError("RANStep: layers must hold at least one RAN layer")
        cdef const float[:, ::1] m2
        cdef Layer *layer
        cdef list keep = []
        self.embedding_size, self.head_num, self.head_size = D, head_num, head_size
        cdef Py_ssize_t A = head_num * head_size   # the attention width
        self.eps, self.rotary_base, self.memory_review = eps, rotary_base, memory_review
        self.small_gemm_macs = small_gemm_macs
        m2 = float32_table(embedding, D, "RANStep", "embedding", keep)
        self.embedding, self.vocab = &m2[0, 0], m2.shape[0]
        self.embedding_norm = _norm(embedding_norm, D, "embedding_norm", keep)
        self.lm_dense = _packed(lm_dense, D, D, "lm_dense", keep)
        self.lm_norm = _norm(lm_norm, D, "lm_norm", keep)
        self.lm_output = _packed((lm_output, lm_bias), self.vocab, D, "lm_output", keep)

        free(self.layers)
        self.num_layers = 0
        self.layers = <Layer *>malloc(len(layers) * sizeof(Layer))
        if self.layers == NULL:
            raise MemoryError("RANStep: could not allocate the layer table")
        for i, spec in enumerate(layers):
            layer = &self.layers[i]
            name = f"layers[{i}]."
            layer.concat_norm = _norm(spec["concat_norm"], D, name + "concat_norm", keep)
            layer.attn_norm = _norm(spec["attn_norm"], D, name + "attn_norm", keep)
            layer.qkv = _packed(spec["qkv"], 3 * A, D, name + "qkv", keep)
            layer.attn_out = _packed(spec["attn_out"], D, A, name + "attn_out", keep)
            layer.attn_glu = _packed(spec["attn_glu"], 2 * D, D, name + "attn_glu", keep)
            if memory_review:
                layer.review_query = _packed(spec["review_query"], D, D, name + "review_query",
                                             keep)
                layer.review_out = _packed(spec["review_out"], D, D, name + "review_out", keep)
                layer.review_glu = _packed(spec["review_glu"], 2 * D, D, name + "review_glu",
                                           keep)
                layer.review_norm = _norm(spec["review_norm"], D, name + "review_norm", keep)
            else:
                layer.output_norm = _norm(spec["output_norm"], D, name + "output_norm", keep)
        self.num_layers = len(layers)
        self._keep = keep
        self._built = True

    def step(self, const int64_t[::1] tokens, const int64_t[::1] rows,
             const int64_t[::1] positions, list k_caches, list v_caches, list memory_keys,
             list memory_values, float[:, ::1] out, tuple window_flash, tuple review_flash,
             int num_threads):
        """Feed one token per row of ``rows`` through every layer; in place on the caches.

        tokens (n,) in [0, V); rows (n,) distinct cache rows in [0, B); positions (n,) each token's
        row in its window (its keys and values are written there, and it attends to window
        rows [0, position]), < the cache capacity;
        k_caches, v_caches : one (B, H, capacity, d) float32 array per layer;
        memory_keys, memory_values : with memory review, n * L arrays (row i's layer l at
            i * L + l), each (m, D) float32 with m >= 1 (c_0 and the finished windows' cells);
            None without;
        out (n, D) : the last layer's outputs;
        window_flash, review_flash : (block_q, block_k, tile_kernel) of the flash path of the
            window attention (causal, head size d) and of the memory review (not causal, head
            size D), from ``attncore.kernels.attention.flash_plan``.
        """
        cdef Py_ssize_t n = tokens.shape[0], L = self.num_layers, H = self.head_num
        cdef Py_ssize_t d = self.head_size, D = self.embedding_size, B = -1, capacity = -1
        cdef Py_ssize_t i, j
        cdef const float[:, :, :, ::1] cache4
        cdef const float[:, ::1] memory
        if not self._built:
            raise ValueError("RANStep.step: not built (__init__ did not complete)")
        # this call's own lists: they hold the arrays while the GIL is released (another
        # thread emptying the caller's lists freed them under the step)
        k_caches, v_caches = list(k_caches), list(v_caches)
        memory_keys = list(memory_keys) if memory_keys is not None else None
        memory_values = list(memory_values) if memory_values is not None else None
        if rows.shape[0] != n or positions.shape[0] != n or out.shape[0] != n or \
                out.shape[1] != D:
            raise ValueError(f"RANStep.step: tokens ({n},), rows ({n},), positions ({n},) and "
                             f"out ({n}, {D}) disagree")
        if len(k_caches) != L or len(v_caches) != L:
            raise ValueError(f"RANStep.step: k_caches and v_caches need one array per layer ({L})")
        if self.memory_review != (memory_keys is not None) or \
                self.memory_review != (memory_values is not None):
            raise ValueError("RANStep.step: memory_keys and memory_values are required with "
                             "memory review and must be None without it")
        cdef Flash window_plan = _flash_plan(window_flash, "window_flash")
        cdef Flash review_plan = _flash_plan(review_flash, "review_flash")
        if n == 0:
            return
        for array in k_caches + v_caches:
            cache4 = array
            if B < 0:
                B, capacity = cache4.shape[0], cache4.shape[2]
            if cache4.shape[0] != B or cache4.shape[1] != H or cache4.shape[2] != capacity or \
                    cache4.shape[3] != d:
                raise ValueError(f"RANStep.step: every cache must have shape ({B}, {H}, "
                                 f"{capacity}, {d})")
        for i in range(n):
            if not 0 <= tokens[i] < self.vocab:
                raise ValueError(f"RANStep.step: tokens[{i}] = {tokens[i]} is outside "
                                 f"[0, {self.vocab})")
            if not 0 <= rows[i] < B:
                raise ValueError(f"RANStep.step: rows[{i}] = {rows[i]} is outside [0, {B})")
            if not 0 <= positions[i] < capacity:
                raise ValueError(f"RANStep.step: positions[{i}] = {positions[i]} is outside "
                                 f"[0, {capacity})")
        if np.unique(np.asarray(rows)).size != n:   # (two tokens would write one cache row)
            raise ValueError("RANStep.step: rows must be distinct")
        if self.memory_review and (len(memory_keys) != n * L or len(memory_values) != n * L):
            raise ValueError(f"RANStep.step: memory_keys and memory_values need {n} x {L} arrays")

        # per-call tables and scratch (the object itself stays read-only)
        cdef float **cache_ptr = <float **>malloc(2 * L * sizeof(float *))
        cdef const float **memory_ptr = <const float **>malloc(2 * n * L * sizeof(float *))
        cdef Py_ssize_t *memory_len = <Py_ssize_t *>malloc(n * L * sizeof(Py_ssize_t))
        cdef Py_ssize_t A = H * d
        cdef float *scratch = <float *>malloc(n * (5 * D + 2 * A + max(3 * A, 2 * D)) *
                                              sizeof(float))   # (see _run)
        cdef int64_t *lengths = <int64_t *>malloc(n * sizeof(int64_t))
        if cache_ptr == NULL or memory_ptr == NULL or memory_len == NULL or scratch == NULL or \
                lengths == NULL:
            free(cache_ptr); free(memory_ptr); free(memory_len); free(scratch); free(lengths)
            raise MemoryError("RANStep.step: could not allocate scratch memory")
        cdef float[:, :, :, ::1] writable
        try:   # (a read-only cache or a wrong memory array fails here: nothing may leak)
            for j in range(L):
                writable = k_caches[j]; cache_ptr[j] = &writable[0, 0, 0, 0]
                writable = v_caches[j]; cache_ptr[L + j] = &writable[0, 0, 0, 0]
            if self.memory_review:
                for j in range(n * L):
                    memory = memory_keys[j]
                    if memory.shape[0] < 1 or memory.shape[1] != D:
                        raise ValueError(f"RANStep.step: memory_keys[{j}] must have shape "
                                         f"(m >= 1, {D})")
                    memory_ptr[2 * j], memory_len[j] = &memory[0, 0], memory.shape[0]
                    memory = memory_values[j]
                    if memory.shape[0] != memory_len[j] or memory.shape[1] != D:
                        raise ValueError(f"RANStep.step: memory_values[{j}] must have shape "
                                         f"({memory_len[j]}, {D})")
                    memory_ptr[2 * j + 1] = &memory[0, 0]
        except BaseException:
            free(cache_ptr); free(memory_ptr); free(memory_len); free(scratch); free(lengths)
            raise
        cdef int status = 0
        with nogil:
            status = self._run(&tokens[0], &rows[0], &positions[0], n, capacity, cache_ptr,
                               cache_ptr + L, memory_ptr, memory_len, &out[0, 0], scratch,
                               lengths, window_plan, review_plan, num_threads)
        free(cache_ptr); free(memory_ptr); free(memory_len); free(scratch); free(lengths)
        if status != 0:
            raise MemoryError("RANStep.step: could not allocate attention scratch memory")

    def head(self, const float[:, ::1] x, float[:, ::1] log_probs, int num_threads):
        """Next-token log-probabilities (N, V) of the last layer's outputs x (N, D): the LM
        head LN(swish(x W + b)) E^T + b, then log-softmax."""
        cdef Py_ssize_t N = x.shape[0], D = self.embedding_size
        if not self._built:
            raise ValueError("RANStep.head: not built (__init__ did not complete)")
        if x.shape[1] != D or log_probs.shape[0] != N or log_probs.shape[1] != self.vocab:
            raise ValueError(f"RANStep.head: x must be ({N}, {D}) and log_probs ({N}, "
                             f"{self.vocab})")
        if N == 0:
            return
        cdef float *h = <float *>malloc(N * D * sizeof(float))
        if h == NULL:
            raise MemoryError("RANStep.head: could not allocate scratch memory")
        with nogil:
            self._linear(&x[0, 0], N, self.lm_dense, h, num_threads)
            ac_activation_f32(h, h, N * D, AC_ACT_SWISH, num_threads)
            self._norm(h, h, N, self.lm_norm, num_threads)
            self._linear(h, N, self.lm_output, &log_probs[0, 0], num_threads)
            ac_softmax_f32(&log_probs[0, 0], &log_probs[0, 0], N, self.vocab, NULL, NULL, 1,
                           num_threads)
        free(h)

    cdef inline void _linear(self, const float *x, Py_ssize_t rows, Linear w, float *out,
                             int num_threads) noexcept nogil:
        """out (rows, n_out) = x (rows, n_in) . W^T + bias on the packed panels."""
        linear_rows(x, rows, w, out, self.small_gemm_macs, num_threads)

    cdef inline void _norm(self, const float *x, float *y, Py_ssize_t rows, Norm norm,
                           int num_threads) noexcept nogil:
        """The langml LayerNorm (uncentred second moment) of rows (rows, D)."""
        ac_layer_norm_f32(x, y, norm.gamma, norm.beta, rows, self.embedding_size, self.eps,
                          AC_NORM_UNCENTRED, num_threads)

    cdef void _swish_glu(self, const float *a_in, Linear a_weight, const float *g_in,
                         Linear glu, Py_ssize_t n, float *h, float *wide, float *gate,
                         int num_threads) noexcept nogil:
        """h (n, D) = swish(a_in W_a^T + b_a) + GLU(g_in): the sum closing a RAN sublayer.
        wide (n, 2D) and gate (n, D) are scratch."""
        cdef Py_ssize_t D = self.embedding_size, i, j
        cdef float value
        self._linear(a_in, n, a_weight, h, num_threads)
        ac_activation_f32(h, h, n * D, AC_ACT_SWISH, num_threads)
        self._linear(g_in, n, glu, wide, num_threads)
        for i in range(n):   # (the gate half as its own contiguous array, as NumPy copies it)
            memcpy(gate + i * D, wide + i * 2 * D + D, D * sizeof(float))
        ac_activation_f32(gate, gate, n * D, AC_ACT_SIGMOID, num_threads)
        for i in range(n):
            for j in range(D):
                value = wide[i * 2 * D + j] * gate[i * D + j]   # (rounded, as NumPy's product)
                h[i * D + j] = h[i * D + j] + value

    cdef int _run(self, const int64_t *tokens, const int64_t *rows, const int64_t *positions,
                  Py_ssize_t n, Py_ssize_t capacity, float **k_caches, float **v_caches,
                  const float **memory, const Py_ssize_t *memory_len, float *x, float *scratch,
                  int64_t *lengths, Flash window_flash, Flash review_flash,
                  int num_threads) noexcept nogil:
        """The step proper on validated pointers (x is the output (n, D), also the running
        layer input); returns a kernel's non-zero status on an allocation failure. Scratch
        blocks (row-major): z, h, y, query, ctx (n, D) each, q, o (n, A) each | wide: the QKV
        rows (n, 3A) or a GLU's (n, 2D)."""
        cdef Py_ssize_t D = self.embedding_size, H = self.head_num, d = self.head_size
        cdef Py_ssize_t A = H * d, L = self.num_layers, i, hh, index
        cdef float *z = scratch
        cdef float *h = z + n * D
        cdef float *y = h + n * D
        cdef float *query = y + n * D
        cdef float *ctx = query + n * D
        cdef float *q = ctx + n * D
        cdef float *o = q + n * A
        cdef float *wide = o + n * A
        cdef const Layer *layer
        cdef float *kc
        cdef float *vc
        cdef Py_ssize_t row_block = H * capacity * d
        cdef int status = 0

        # x = LN_emb(E[token])
        for i in range(n):
            memcpy(x + i * D, self.embedding + tokens[i] * D, D * sizeof(float))
            lengths[i] = positions[i] + 1
        self._norm(x, x, n, self.embedding_norm, num_threads)

        for index in range(L):
            layer = &self.layers[index]
            kc, vc = k_caches[index], v_caches[index]
            # window attention: fused QKV (swish), rotary on q and k at the window row
            self._norm(x, z, n, layer.concat_norm, num_threads)
            self._linear(z, n, layer.qkv, wide, num_threads)
            ac_activation_f32(wide, wide, n * 3 * A, AC_ACT_SWISH, num_threads)
            for i in range(n):
                ac_rotary_f32(wide + i * 3 * A, &positions[i], 2 * H, 1, d, self.rotary_base, 1)
                for hh in range(H):
                    memcpy(kc + rows[i] * row_block + (hh * capacity + positions[i]) * d,
                           wide + i * 3 * A + A + hh * d, d * sizeof(float))
                    memcpy(vc + rows[i] * row_block + (hh * capacity + positions[i]) * d,
                           wide + i * 3 * A + 2 * A + hh * d, d * sizeof(float))
                memcpy(q + i * A, wide + i * 3 * A, A * sizeof(float))
            for i in range(n):
                # causal, as the window's own call: the flash tiles follow the causal flag,
                # and the length stops the query at its own row
                status = _attend(q + i * A, kc + rows[i] * row_block, vc + rows[i] * row_block,
                                 o + i * A, H, capacity, d, &lengths[i], True,
                                 window_flash, num_threads)
                if status != 0:
                    return status
            self._swish_glu(o, layer.attn_out, z, layer.attn_glu, n, h, wide, ctx, num_threads)
            self._norm(h, y, n, layer.attn_norm, num_threads)
            ac_layer_norm_f32(y, y, NULL, NULL, n, D, self.eps, AC_NORM_UNCENTRED, num_threads)
            if not self.memory_review:
                self._norm(y, x, n, layer.output_norm, num_threads)
                continue
            # memory review against the row's carried memory (c_0 and the finished cells)
            self._linear(y, n, layer.review_query, query, num_threads)
            ac_activation_f32(query, query, n * D, AC_ACT_SWISH, num_threads)
            for i in range(n):
                status = _attend(query + i * D, memory[2 * (i * L + index)],
                                 memory[2 * (i * L + index) + 1], ctx + i * D, 1,
                                 memory_len[i * L + index], D, NULL, False, review_flash,
                                 num_threads)
                if status != 0:
                    return status
            # (the gate's scratch: z, spent since the window attention's GLU)
            self._swish_glu(ctx, layer.review_out, query, layer.review_glu, n, h, wide, z,
                            num_threads)
            self._norm(h, x, n, layer.review_norm, num_threads)
        return 0
