# SPDX-License-Identifier: Apache-2.0
"""Compiled recurrent steps (float32): the RNN time scan of an encoder layer and the whole
decoder step of a GRU/LSTM encoder-decoder with attention, each one call with the GIL released.

Layouts are PyTorch's (``nn.GRU``/``nn.LSTM`` gate order r, z, n / i, f, g, o; ``nn.Linear``
weights (out, in)); the equations are those of :mod:`attncore.train.seq2seq` (its docstring).
Callers (``attncore.models.seq2seq``) validate every shape; this module checks only what a
wrong call could turn into a memory error.

Parallelism and determinism: products go through :func:`_linear` on weights packed once into
panels (``PackedLinearWeight``, src_c/packed_linear.h: attncore's panel kernel up to 256 rows
(16 without AVX2), single-threaded BLAS calls on the panels past that), whose work split depends
only on the shapes; element-wise loops are split by rows. Results are therefore bit-identical
for every thread count, and a batch row never depends on the other rows (a sentence alone ==
inside a batch within the panel kernel's range).
"""
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint8_t
from libc.math cimport INFINITY
from libc.string cimport memcpy, memmove, memset
from libc.time cimport CLOCKS_PER_SEC, clock, clock_t
from scipy.linalg.cython_blas cimport sgemm

from ._additive cimport ac_additive_f32
from ._checks cimport first_outside
from ._packed_linear cimport (AC_MAX_THREADS, AC_PANEL_WIDTH, ac_packed_linear_rows, panels_data,
                              panels_fit)

cdef extern from "Python.h":
    int PyErr_CheckSignals()   # (GIL held; -1 with the handler's exception set)

#: How often a compiled search looks for signals, in seconds of the process's CPU time: a
#: Ctrl-C or SIGTERM (the CLI's handlers) then stops it within that, not at the end of a search
#: of 2^20 steps (minutes); rarely enough that taking the GIL costs nothing a step.
SIGNAL_CHECK_SECONDS = 0.05


cdef int _raise_pending() except -1:
    """Let the exception PyErr_CheckSignals set propagate."""
    return -1


cdef extern from "simd.h":
    void ac_tanh_f32(const float *x, float *y, Py_ssize_t n) nogil
    void ac_gru_cell_f32(const float *gx, const float *gh, float *h, Py_ssize_t H) nogil
    void ac_lstm_cell_f32(const float *gx, const float *gh, float *h, float *c,
                          Py_ssize_t H) nogil
    Py_ssize_t ac_argmax_f32(const float *x, Py_ssize_t n, Py_ssize_t skip) nogil

cdef extern from "softmax.h":
    void ac_softmax_f32(const float *x, float *y, Py_ssize_t n_rows, Py_ssize_t n,
                        const int64_t *lengths, const unsigned char *mask, int log_output,
                        int num_threads) nogil

# attention kinds (same order as attncore.train.seq2seq.ATTENTION_KINDS)
DEF BAHDANAU = 0
DEF LUONG_DOT = 1
DEF LUONG_GENERAL = 2
DEF LUONG_CONCAT = 3
ATTENTION_CODES = {"bahdanau": BAHDANAU, "luong_dot": LUONG_DOT,
                   "luong_general": LUONG_GENERAL, "luong_concat": LUONG_CONCAT}


cdef inline void _linear(const float *x, Py_ssize_t ldx, Py_ssize_t M, Py_ssize_t K,
                         const void *panels, int panel_type, Py_ssize_t N, const float *bias,
                         float *out, Py_ssize_t ldo, Py_ssize_t small_gemm_macs,
                         int num_threads) noexcept nogil:
    """out (M, N; row stride ldo) = x (M, K; row stride ldx) . W^T + bias, W packed into panels
    of panel_type (``PackedLinearWeight``; src_c/packed_linear.h)."""
    ac_packed_linear_rows(x, ldx, M, K, panels, panel_type, N, bias, out, ldo, sgemm,
                          small_gemm_macs, num_threads)


cdef void _folded_input(const float *x, Py_ssize_t ldx, Py_ssize_t B, Py_ssize_t K,
                       const void *w_rest, int panel_type, Py_ssize_t N, const float *table,
                       const int64_t *tokens, float *gx, Py_ssize_t small_gemm_macs,
                       int num_threads) noexcept nogil:
    """gx (B, N) = x (B, K; row stride ldx) . W_rest^T + table[tokens[b]]: layer 0's input
    product with the embedding's share (and the bias) looked up (``fold_embedding``). K = 0
    (no other inputs) copies the table rows."""
    cdef Py_ssize_t b, j
    cdef const float *row
    cdef float *g
    if K > 0:
        _linear(x, ldx, B, K, w_rest, panel_type, N, NULL, gx, N, small_gemm_macs, num_threads)
    for b in range(B):
        row = table + tokens[b] * N
        g = gx + b * N
        if K > 0:
            for j in range(N):
                g[j] = g[j] + row[j]
        else:
            memcpy(g, row, N * sizeof(float))


cdef void _cell(bint lstm, const float *gx, Py_ssize_t ldx, const float *gh, float *h, float *c,
                Py_ssize_t B, Py_ssize_t H, int num_threads) noexcept nogil:
    """In place: h (B, H) [and c] := cell(gx, gh, h [, c]). gx: rows ``ldx`` apart (one time
    step of a (B, T, G*H) projection has ldx = T*G*H); gh (B, G*H). Both include their biases.
    Each row is one pass of ``ac_gru_cell_f32`` / ``ac_lstm_cell_f32`` (simd.h): the gates in
    vector lanes, sigmoid and tanh on registers (libm calls per element cost more than the
    GEMMs; separate passes over the gate blocks cost ~5% of a batch-64 seq2seq call)."""
    cdef Py_ssize_t b, G = 4 if lstm else 3
    for b in prange(B, schedule="static", num_threads=min(num_threads, AC_MAX_THREADS) if B * H >= 8192 and num_threads > 1 else 1):
        if lstm:
            ac_lstm_cell_f32(gx + b * ldx, gh + b * G * H, h + b * H, c + b * H, H)
        else:
            ac_gru_cell_f32(gx + b * ldx, gh + b * G * H, h + b * H, H)


def rnn_scan(const float[:, :, ::1] x_proj, weight_hh,
             const float[::1] bias_hh, const int64_t[::1] lengths, bint packed, bint reverse,
             bint lstm, float[:, ::1] h, float[:, ::1] c, float[:, :, ::1] out,
             Py_ssize_t small_gemm_macs, int num_threads):
    """One RNN layer and direction over a whole sequence, in place on the state.

    x_proj (B, T, G*H): the input projection ``x W_ih^T + b_ih`` of every step (one GEMM by the
    caller); weight_hh: the panels of the (G*H, H) weight (``PackedLinearWeight(w).panels``,
    float32, bfloat16 or int8),
    bias_hh (G*H,); lengths (B,); h, c (B, H): the initial state, replaced by the final one (c is
    ignored for GRU); out (B, T, H): the outputs, zero on padded steps when ``packed``;
    small_gemm_macs: ``threads.BLAS_SMALL_GEMM_MACS``. ``packed``: a row's state does not change
    on steps t >= lengths[b] (``pack_padded_sequence``), so a reverse direction effectively
    starts at length - 1.
    """
    cdef Py_ssize_t B = x_proj.shape[0], T = x_proj.shape[1], GH = x_proj.shape[2]
    cdef Py_ssize_t H = h.shape[1], G = 4 if lstm else 3
    cdef Py_ssize_t s, t, b
    cdef int panel_type
    cdef const void *w_hh = panels_data(weight_hh, &panel_type)
    if GH != G * H or not panels_fit(weight_hh, GH, H) or \
            bias_hh.shape[0] != GH or lengths.shape[0] != B or h.shape[0] != B or \
            (lstm and (c.shape[0] != B or c.shape[1] != H)) or out.shape[0] != B or \
            out.shape[1] != T or out.shape[2] != H:
        raise ValueError("rnn_scan: inconsistent shapes")
    if B == 0 or T == 0 or H == 0:
        return
    import numpy as np
    cdef float[:, ::1] gh = np.empty((B, GH), dtype=np.float32)
    cdef float[:, ::1] h_keep = np.empty((B, H), dtype=np.float32)
    cdef float[:, ::1] c_keep = np.empty((B, H), dtype=np.float32)
    cdef float *cp = &c[0, 0] if lstm else NULL
    cdef Py_ssize_t shortest = T   # steps t < shortest are inside every row
    cdef bint keeps
    for b in range(B):
        shortest = min(shortest, lengths[b])
    with nogil:
        for s in range(T):
            t = T - 1 - s if reverse else s
            keeps = packed and t >= shortest
            if keeps:  # rows past their length keep their state: save it, restore below
                memcpy(&h_keep[0, 0], &h[0, 0], B * H * sizeof(float))
                if lstm:
                    memcpy(&c_keep[0, 0], cp, B * H * sizeof(float))
            _linear(&h[0, 0], H, B, H, w_hh, panel_type, GH, &bias_hh[0], &gh[0, 0], GH,
                    small_gemm_macs, num_threads)
            _cell(lstm, &x_proj[0, t, 0], T * GH, &gh[0, 0], &h[0, 0], cp, B, H, num_threads)
            for b in range(B):
                if keeps and t >= lengths[b]:
                    memcpy(&h[b, 0], &h_keep[b, 0], H * sizeof(float))
                    if lstm:
                        memcpy(&cp[b * H], &c_keep[b, 0], H * sizeof(float))
                    memset(&out[b, t, 0], 0, H * sizeof(float))
                else:
                    memcpy(&out[b, t, 0], &h[b, 0], H * sizeof(float))


def _check_tokens(const int64_t[::1] tokens, Py_ssize_t vocab, str name):
    """Token ids in [0, vocab): they index the embedding (a direct call of this private
    module with an id past it read other memory)."""
    cdef Py_ssize_t b = first_outside(tokens, 0, vocab - 1)
    if b >= 0:
        raise ValueError(f"DecoderStep: {name}[{b}] = {tokens[b]} is outside [0, {vocab})")


class _Kept:
    """The arrays a DecoderStep points into, checked and kept alive. A class, not closures
    over a list inside ``__init__``: those formed a reference cycle (a closure calling another
    keeps the scope that holds it), and a discarded model's weights waited for the cyclic
    collector; a service reloading models held dozens of them."""

    def __init__(self, attention, weight_dtype):
        self.attention, self.weight_dtype, self.arrays = attention, weight_dtype, []

    def f32(self, a, shape, name):
        import numpy as np
        if a is None:
            raise ValueError(f"DecoderStep: {name} is required for attention {self.attention!r}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.shape != shape:
            raise ValueError(f"DecoderStep: {name} must have shape {shape}, got {a.shape}")
        self.arrays.append(a)
        return a

    def packed(self, a, shape, name):
        from .basic import PackedLinearWeight
        panels = PackedLinearWeight(self.f32(a, shape, name), self.weight_dtype).panels
        self.arrays.append(panels)
        return panels


cdef class DecoderStep:
    """The whole decoder step of a GRU/LSTM encoder-decoder with attention, compiled.

    Built once per model from its float32 weights (torch layouts, names of
    :mod:`attncore.train.seq2seq`); :meth:`step` then advances a batch by one token with the GIL
    released. The object holds only read-only weights: any number of Python threads may call
    :meth:`step` at once on their own state arrays.
    """
    cdef readonly int attention, num_layers, embed_dim, hidden, attention_dim, vocab
    cdef readonly bint lstm, input_feeding, feeds_context, folds_embedding
    cdef Py_ssize_t small_gemm_macs
    cdef readonly str weight_dtype  # how the matrices are held: "float32", "bfloat16", "int8"
    cdef int panel_type
    cdef object _keep               # the weight arrays, alive as long as the pointers below
    cdef bint _built                # __init__ ran to the end (once: the pointers stay valid)
    # matrices are held as the panels of a PackedLinearWeight (shapes below are the weights')
    cdef const float *emb
    # embedding folded into layer 0's input product (``fold_embedding``): in_table (V_tgt, G*H)
    # = E . W_emb^T + b_ih[0], and w_ih[0] holds only the other columns (x_width of them; it is
    # NULL when there are none), so layer 0's gates are x . W_rest^T + in_table[y]
    cdef const float *in_table
    cdef Py_ssize_t x_width
    cdef const void *w_ih[64]
    cdef const void *w_hh[64]
    cdef const float *b_ih[64]
    cdef const float *b_hh[64]
    cdef const void *att_query      # (A, H)   bahdanau, luong_concat
    cdef const float *att_score     # (A,)     bahdanau, luong_concat
    cdef const void *linear_in      # (H, H)   luong_general
    cdef const void *att_output     # (H, 2H)  luong
    cdef const void *out_w          # (V, H)
    cdef const float *out_b         # (V,)

    def __init__(self, str attention, bint lstm, bint input_feeding, embedding, list w_ih,
                 list w_hh, list b_ih, list b_hh, att_query, att_score, linear_in, att_output,
                 out_weight, out_bias, Py_ssize_t small_gemm_macs=0, str weight_dtype="float32",
                 bint fold_embedding=False):
        """Weights in torch layouts; small_gemm_macs: ``threads.BLAS_SMALL_GEMM_MACS``;
        weight_dtype: how the matrices are packed (``PackedLinearWeight``: "float32",
        "bfloat16", each weight rounded to it, or "int8").

        fold_embedding: precompute the target embedding's share of layer 0's input product
        for every token, ``E . W_emb^T + b_ih[0]`` (V_tgt, G*H) float32, computed once by
        :func:`linear` on the packed (so, with bfloat16, rounded) columns: a step then reads
        one row of it instead of multiplying E[y] by W_emb (E*G*H of the step's multiply-adds,
        and of the weights it streams). The same sums, rounded once more (the embedding's and
        the other inputs' parts are added, not one chain); with int8 the two parts are also
        quantized apart (each its own row and per-output scales), so the step differs from the
        unfolded int8 step by quantization, as int8 differs from float32. Costs V_tgt*G*H*4
        bytes."""
        import numpy as np
        from .basic import PackedLinearWeight, linear
        if self._built:   # (a second __init__ repointed into arrays it might then free)
            raise RuntimeError("DecoderStep: already built; make a new one")
        if attention not in ATTENTION_CODES:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_CODES)}, got {attention!r}")
        if not 1 <= len(w_ih) <= 64 or not len(w_ih) == len(w_hh) == len(b_ih) == len(b_hh):
            raise ValueError("w_ih, w_hh, b_ih, b_hh: one entry per layer (1..64 layers)")
        self.attention = ATTENTION_CODES[attention]
        self.lstm, self.num_layers = lstm, len(w_ih)
        self.input_feeding = input_feeding and self.attention != BAHDANAU
        self.feeds_context = self.attention == BAHDANAU or self.input_feeding
        keeper = _Kept(attention, weight_dtype)
        f32, packed = keeper.f32, keeper.packed

        cdef const float[:, ::1] m2
        cdef const float[::1] m1
        cdef int panel_type = 0
        E = np.shape(embedding)[1]
        H = np.shape(w_hh[0])[1]
        G = 4 if lstm else 3
        V = np.shape(out_weight)[0]
        self.embed_dim, self.hidden, self.vocab = E, H, V
        self.small_gemm_macs = small_gemm_macs
        self.attention_dim = np.shape(att_query)[0] if att_query is not None else 0
        emb_array = f32(embedding, (np.shape(embedding)[0], E), "embedding")
        m2 = emb_array; self.emb = &m2[0, 0]
        self.in_table = NULL
        self.x_width = E + (H if self.feeds_context else 0)
        for layer in range(self.num_layers):
            width = self.x_width if layer == 0 else H
            if layer == 0 and fold_embedding:
                # the embedding's columns: [c ; E[y]] (Bahdanau) or [E[y] (; h~)] (Luong)
                w0 = f32(w_ih[0], (G * H, width), "w_ih[0]")
                emb_cols = slice(H, H + E) if self.attention == BAHDANAU else slice(0, E)
                rest = np.delete(w0, np.arange(width)[emb_cols], axis=1)
                m2 = f32(linear(emb_array, PackedLinearWeight(w0[:, emb_cols], weight_dtype),
                                f32(b_ih[0], (G * H,), "b_ih[0]")),
                         (np.shape(embedding)[0], G * H), "in_table")
                self.in_table = &m2[0, 0]
                self.x_width = rest.shape[1]
                self.w_ih[0] = NULL
                if self.x_width:
                    self.w_ih[0] = panels_data(packed(rest, rest.shape, "w_ih[0]"), &panel_type)
                self.w_hh[0] = panels_data(packed(w_hh[0], (G * H, H), "w_hh[0]"), &panel_type)
                m1 = f32(b_ih[0], (G * H,), "b_ih[0]"); self.b_ih[0] = &m1[0]
                m1 = f32(b_hh[0], (G * H,), "b_hh[0]"); self.b_hh[0] = &m1[0]
                continue
            self.w_ih[layer] = panels_data(packed(w_ih[layer], (G * H, width), f"w_ih[{layer}]"),
                                           &panel_type)
            self.w_hh[layer] = panels_data(packed(w_hh[layer], (G * H, H), f"w_hh[{layer}]"),
                                           &panel_type)
            m1 = f32(b_ih[layer], (G * H,), f"b_ih[{layer}]"); self.b_ih[layer] = &m1[0]
            m1 = f32(b_hh[layer], (G * H,), f"b_hh[{layer}]"); self.b_hh[layer] = &m1[0]
        self.att_query = self.att_score = self.linear_in = self.att_output = NULL
        if self.attention in (BAHDANAU, LUONG_CONCAT):
            A = self.attention_dim
            self.att_query = panels_data(packed(att_query, (A, H), "att_query"), &panel_type)
            m1 = f32(np.reshape(att_score, -1), (A,), "att_score"); self.att_score = &m1[0]
        if self.attention == LUONG_GENERAL:
            self.linear_in = panels_data(packed(linear_in, (H, H), "linear_in"), &panel_type)
        if self.attention != BAHDANAU:
            self.att_output = panels_data(packed(att_output, (H, 2 * H), "att_output"),
                                          &panel_type)
        self.out_w = panels_data(packed(out_weight, (V, H), "out_weight"), &panel_type)
        self.panel_type, self.weight_dtype = panel_type, weight_dtype
        self.folds_embedding = self.in_table != NULL
        m1 = f32(out_bias, (V,), "out_bias"); self.out_b = &m1[0]
        if np.shape(embedding)[0] != V:   # (greedy feeds its argmax tokens, < V, back in)
            raise ValueError(f"DecoderStep: embedding must have {V} rows (the output "
                             f"vocabulary), got {np.shape(embedding)[0]}")
        self._keep = keeper.arrays
        self._built = True

    @property
    def scratch_width(self):
        """Floats of scratch per batch row that :meth:`step` needs."""
        G = 4 if self.lstm else 3
        x_width = max(self.embed_dim + self.hidden, 2 * self.hidden)
        return x_width + 2 * G * self.hidden + max(self.attention_dim, self.hidden) + self.hidden

    def step(self, const int64_t[::1] tokens, float[:, :, ::1] h, float[:, :, ::1] c,
             float[:, ::1] feed, const float[:, :, ::1] memory, const float[:, :, ::1] keys,
             const float[:, :, ::1] key_factors, const uint8_t[:, ::1] key_in_limit,
             const int64_t[::1] lengths, float[:, ::1] log_probs, float[:, ::1] weights,
             float[::1] scratch, int num_threads):
        """Advance every row by one token, in place on (h, c, feed).

        tokens (B,) previous target tokens, in [0, tgt_vocab) (checked by the caller);
        h, c (num_layers, B, H) the RNN state (c: LSTM only, else any (L, B, H) array);
        feed (B, H) h~ of the previous step (Luong with input feeding; else any (B, H) array);
        memory (B, S, H); keys (B, S, A) the projected memory (additive scores; else any);
        key_factors (B, S, A), key_in_limit (B, S): the keys' split-tanh factors
        (``attncore.AdditiveKeys``; additive scores, optional: None computes no factors);
        lengths (B,) in [0, S]; log_probs (B, V) out; weights (B, S) out (attention);
        scratch (B * scratch_width,).
        """
        cdef Py_ssize_t B = tokens.shape[0], S = memory.shape[1]
        self._check_state(B, h, c, feed, memory, keys, key_factors, key_in_limit, lengths)
        if log_probs.shape[0] != B or log_probs.shape[1] != self.vocab or \
                weights.shape[0] != B or weights.shape[1] != S or \
                scratch.shape[0] != B * self.scratch_width:
            raise ValueError("DecoderStep.step: inconsistent shapes")
        _check_tokens(tokens, self.vocab, "tokens")
        if B == 0:
            return
        cdef int status
        cdef const float *kp = &keys[0, 0, 0] if self.attention_dim else NULL
        cdef const float *factors = NULL
        cdef const uint8_t *in_limit = NULL
        if _split_factors(key_factors, key_in_limit, self.attention_dim, S):
            factors, in_limit = &key_factors[0, 0, 0], &key_in_limit[0, 0]
        with nogil:
            status = self._advance(&tokens[0], B, S, &h[0, 0, 0], &c[0, 0, 0], &feed[0, 0],
                                   &memory[0, 0, 0], kp, factors, in_limit, &lengths[0],
                                   &log_probs[0, 0], &weights[0, 0], &scratch[0], num_threads)
        if status:
            raise MemoryError("DecoderStep.step: out of memory for attention scratch")

    def greedy(self, const int64_t[::1] first_tokens, float[:, :, ::1] h, float[:, :, ::1] c,
               float[:, ::1] feed, float[:, :, ::1] memory, float[:, :, ::1] keys,
               float[:, :, ::1] key_factors, uint8_t[:, ::1] key_in_limit,
               int64_t[::1] lengths, Py_ssize_t max_length, Py_ssize_t min_length,
               int64_t eos_id, int64_t[:, ::1] out_tokens, int64_t[::1] counts,
               uint8_t[::1] ended, double[::1] log_prob, float[:, :, ::1] attention,
               int num_threads):
        """Greedy search, every step in one call without the GIL: what
        :func:`attncore.generation.greedy_search` computes with :meth:`step`, bit for bit.

        Each step's token is the argmax of the row's log-probs (ties and NaN as
        ``numpy.argmax``; EOS excluded before ``min_length`` steps), its log-prob is added to
        ``log_prob`` in float64, and a row that chose EOS leaves the batch: the rows still
        running are moved up in place (h, c, feed, memory, keys, key_factors, key_in_limit,
        lengths: the arrays are consumed) and the source width cut to their longest length, as
        ``Seq2SeqState.select`` does. ``first_tokens`` (B,) start the search (BOS).

        Out: out_tokens (B, max_length) the chosen tokens without EOS (the first counts[b] of a
        row; the rest is left as it was), counts (B,), ended (B,) 1 where EOS was chosen,
        log_prob (B,) float64 (start from zeros), attention (B, max_length, S) the weights of
        each step a row ran (its first counts[b] + ended[b] steps; the rest is left as it was),
        or None. Called from the main thread, it looks for signals every
        SIGNAL_CHECK_SECONDS of CPU time: a handler's exception (KeyboardInterrupt) stops the
        search there and propagates, the outputs holding the steps done.
        """
        cdef Py_ssize_t B = first_tokens.shape[0], S = memory.shape[1], V = self.vocab
        self._check_state(B, h, c, feed, memory, keys, key_factors, key_in_limit, lengths)
        if max_length < 1 or min_length < 0 or not 0 <= eos_id < V:
            raise ValueError("DecoderStep.greedy: max_length >= 1, min_length >= 0 and eos_id "
                             "in [0, vocab) are required")
        if out_tokens.shape[0] != B or out_tokens.shape[1] < max_length or \
                counts.shape[0] != B or ended.shape[0] != B or log_prob.shape[0] != B or \
                (attention is not None and (attention.shape[0] != B or
                                            attention.shape[1] < max_length or
                                            attention.shape[2] != S)):
            raise ValueError("DecoderStep.greedy: inconsistent shapes")
        _check_tokens(first_tokens, V, "first_tokens")
        if B == 0:
            return
        counts[:] = 0   # (out_tokens[row, counts[row]] is written: counts start at 0 here)
        import numpy as np
        cdef int64_t[::1] tokens = np.array(first_tokens, dtype=np.int64)
        cdef int64_t[::1] source = np.arange(B, dtype=np.int64)    # source row of each live row
        cdef int64_t[::1] keep = np.empty(B, dtype=np.int64)       # live rows that go on
        cdef float[:, ::1] log_probs = np.empty((B, V), dtype=np.float32)
        cdef float[:, ::1] weights = np.empty((B, S), dtype=np.float32)
        cdef float[::1] scratch = np.empty(B * self.scratch_width, dtype=np.float32)
        cdef Py_ssize_t L = self.num_layers, H = self.hidden, A = self.attention_dim
        cdef Py_ssize_t live = B, width = S, t, i, kept, b, chosen, row
        cdef int status = 0
        cdef float *hp = &h[0, 0, 0]
        cdef float *cp = &c[0, 0, 0]
        cdef float *fp = &feed[0, 0]
        cdef float *mp = &memory[0, 0, 0]
        cdef float *kp = &keys[0, 0, 0] if A else NULL
        cdef float *fac = NULL
        cdef uint8_t *lim = NULL
        if _split_factors(key_factors, key_in_limit, A, S):
            fac, lim = &key_factors[0, 0, 0], &key_in_limit[0, 0]
        cdef float *att = &attention[0, 0, 0] if attention is not None else NULL
        cdef Py_ssize_t att_row = attention.shape[1] * S if attention is not None else 0
        # signals: handled in the main thread only (elsewhere PyErr_CheckSignals does nothing)
        import threading
        cdef bint watch = threading.current_thread() is threading.main_thread()
        cdef clock_t every = <clock_t>(SIGNAL_CHECK_SECONDS * CLOCKS_PER_SEC)
        cdef clock_t next_check = clock() + every
        cdef int interrupted = 0
        with nogil:
            for t in range(max_length):
                if watch and clock() >= next_check:
                    with gil:
                        interrupted = PyErr_CheckSignals()
                    if interrupted:
                        break
                    next_check = clock() + every
                status = self._advance(&tokens[0], live, width, hp, cp, fp, mp, kp, fac, lim,
                                       &lengths[0], &log_probs[0, 0], &weights[0, 0],
                                       &scratch[0], num_threads)
                if status:
                    break
                kept = 0
                for i in range(live):
                    row = source[i]
                    chosen = _argmax(&log_probs[0, 0] + i * V, V,
                                     eos_id if t < min_length else -1)
                    log_prob[row] += (-INFINITY if t < min_length and chosen == eos_id
                                      else log_probs[i, chosen])
                    if att != NULL:
                        memcpy(att + row * att_row + t * S, &weights[0, 0] + i * width,
                               width * sizeof(float))
                    if chosen == eos_id:
                        ended[row] = 1
                    else:
                        out_tokens[row, counts[row]] = chosen
                        counts[row] += 1
                        tokens[kept] = chosen
                        source[kept] = row
                        keep[kept] = i
                        kept += 1
                if kept == 0 or t + 1 == max_length:
                    break
                if kept < live:
                    width = _compact(&keep[0], kept, live, width, L, H, A, hp, cp, fp, mp, kp,
                                     fac, lim, &lengths[0], self.lstm)
                live = kept
        if interrupted:
            _raise_pending()
        if status:
            raise MemoryError("DecoderStep.greedy: out of memory for attention scratch")

    cdef int _check_state(self, Py_ssize_t B, float[:, :, ::1] h, float[:, :, ::1] c,
                          float[:, ::1] feed, const float[:, :, ::1] memory,
                          const float[:, :, ::1] keys, const float[:, :, ::1] key_factors,
                          const uint8_t[:, ::1] key_in_limit,
                          const int64_t[::1] lengths) except -1:
        """The checks of the state arrays that :meth:`step` and :meth:`greedy` read: shapes,
        and lengths in [0, S] (past S the attention read and wrote past its arrays)."""
        cdef Py_ssize_t L = self.num_layers, H = self.hidden, A = self.attention_dim
        cdef Py_ssize_t S = memory.shape[1], b
        if not self._built:
            raise ValueError("DecoderStep: not built (__init__ did not complete)")
        b = first_outside(lengths, 0, S) if lengths.shape[0] == B else -1
        if b >= 0:
            raise ValueError(f"DecoderStep: lengths[{b}] = {lengths[b]} is outside [0, {S}]")
        if h.shape[0] != L or h.shape[1] != B or h.shape[2] != H or memory.shape[0] != B or \
                memory.shape[2] != H or lengths.shape[0] != B or feed.shape[0] != B or \
                feed.shape[1] != H or \
                (self.lstm and (c.shape[0] != L or c.shape[1] != B or c.shape[2] != H)) or \
                (A and (keys.shape[0] != B or keys.shape[1] != S or keys.shape[2] != A)) or \
                (key_factors is not None and (key_factors.shape[0] != keys.shape[0] or
                                              key_factors.shape[1] != keys.shape[1] or
                                              key_factors.shape[2] != keys.shape[2])) or \
                (key_in_limit is not None and (key_in_limit.shape[0] != keys.shape[0] or
                                               key_in_limit.shape[1] != keys.shape[1])):
            raise ValueError("DecoderStep.step: inconsistent shapes")
        return 0

    cdef int _advance(self, const int64_t *tokens, Py_ssize_t B, Py_ssize_t S, float *h_all,
                      float *c_all, float *fp, const float *memory, const float *keys,
                      const float *factors, const uint8_t *in_limit, const int64_t *lengths,
                      float *log_probs, float *weights, float *scratch,
                      int num_threads) noexcept nogil:
        """The body of :meth:`step` on raw C-contiguous arrays of the shapes it checks (h_all,
        c_all (L, B, H), c_all not read for GRU; keys NULL without additive scores). Returns
        the additive kernel's status (non-zero: out of memory)."""
        cdef Py_ssize_t H = self.hidden
        cdef Py_ssize_t E = self.embed_dim, A = self.attention_dim, V = self.vocab
        cdef Py_ssize_t G = 4 if self.lstm else 3, L = self.num_layers
        cdef Py_ssize_t X = max(E + H, 2 * H), Q = max(A, H)
        cdef Py_ssize_t b, layer, width
        # scratch blocks, each row-major: x (B, X) | gx (B, GH) | gh (B, GH) | q (B, Q) | ctx (B, H)
        cdef float *x = scratch
        cdef float *gx = x + B * X
        cdef float *gh = gx + B * G * H
        cdef float *q = gh + B * G * H
        cdef float *ctx = q + B * Q
        cdef float *top = h_all + (L - 1) * B * H
        cdef int status = 0
        if self.attention == BAHDANAU:
            # query = h_{t-1} of the top layer; x = [c ; E[y]]
            _linear(top, H, B, H, self.att_query, self.panel_type, A, NULL, q, A,
                    self.small_gemm_macs, num_threads)
            status = ac_additive_f32(q, keys, factors, in_limit, self.att_score, memory, ctx,
                                     weights, B, 1, S, A, H, lengths, num_threads)
            for b in range(B):
                memcpy(x + b * X, ctx + b * H, H * sizeof(float))
                if self.in_table == NULL:
                    memcpy(x + b * X + H, self.emb + tokens[b] * E, E * sizeof(float))
        else:
            for b in range(B):
                if self.in_table == NULL:
                    memcpy(x + b * X, self.emb + tokens[b] * E, E * sizeof(float))
                    if self.input_feeding:
                        memcpy(x + b * X + E, fp + b * H, H * sizeof(float))
                elif self.input_feeding:
                    memcpy(x + b * X, fp + b * H, H * sizeof(float))
        width = self.x_width
        for layer in range(L):
            if layer == 0 and self.in_table != NULL:
                _folded_input(x, X, B, width, self.w_ih[0], self.panel_type, G * H,
                              self.in_table, tokens, gx, self.small_gemm_macs, num_threads)
            else:
                _linear(x, X, B, width, self.w_ih[layer], self.panel_type, G * H,
                        self.b_ih[layer], gx, G * H, self.small_gemm_macs, num_threads)
            _linear(h_all + layer * B * H, H, B, H, self.w_hh[layer], self.panel_type, G * H,
                    self.b_hh[layer], gh, G * H, self.small_gemm_macs, num_threads)
            _cell(self.lstm, gx, G * H, gh, h_all + layer * B * H,
                  c_all + layer * B * H if self.lstm else NULL, B, H, num_threads)
            for b in range(B):
                memcpy(x + b * X, h_all + (layer * B + b) * H, H * sizeof(float))
            width = H
        if self.attention == BAHDANAU:
            _linear(top, H, B, H, self.out_w, self.panel_type, V, self.out_b, log_probs, V,
                    self.small_gemm_macs, num_threads)
        else:
            # scores with the current top state h_t
            if self.attention == LUONG_CONCAT:
                _linear(top, H, B, H, self.att_query, self.panel_type, A, NULL, q, A,
                        self.small_gemm_macs, num_threads)
                status = ac_additive_f32(q, keys, factors, in_limit, self.att_score, memory,
                                         ctx, weights, B, 1, S, A, H, lengths, num_threads)
            else:
                if self.attention == LUONG_GENERAL:
                    _linear(top, H, B, H, self.linear_in, self.panel_type, H, NULL, q, H,
                            self.small_gemm_macs, num_threads)
                else:
                    memcpy(q, top, B * H * sizeof(float))
                _dot_attention(q, memory, lengths, weights, ctx, B, S, H, num_threads)
            # h~ = tanh(W_c [c ; h_t]) into feed (the next step's input feed)
            for b in range(B):
                memcpy(x + b * X, ctx + b * H, H * sizeof(float))
                memcpy(x + b * X + H, top + b * H, H * sizeof(float))
            _linear(x, X, B, 2 * H, self.att_output, self.panel_type, H, NULL, fp, H,
                    self.small_gemm_macs, num_threads)
            ac_tanh_f32(fp, fp, B * H)
            _linear(fp, H, B, H, self.out_w, self.panel_type, V, self.out_b, log_probs, V,
                    self.small_gemm_macs, num_threads)
        ac_softmax_f32(log_probs, log_probs, B, V, NULL, NULL, 1, num_threads)
        return status


cdef inline bint _split_factors(const float[:, :, ::1] key_factors,
                                const uint8_t[:, ::1] key_in_limit, Py_ssize_t A,
                                Py_ssize_t S) noexcept:
    """Whether the split-tanh key factors are passed (else NULL: the exact tanh)."""
    return A > 0 and S > 0 and key_factors is not None and key_in_limit is not None


cdef inline Py_ssize_t _argmax(const float *x, Py_ssize_t n, Py_ssize_t skip) noexcept nogil:
    """``numpy.argmax`` of x[:n] with x[skip] taken as -inf (skip < 0: none): the first
    maximum, or the first NaN (``ac_argmax_f32``, eight lanes at a time)."""
    return ac_argmax_f32(x, n, skip)


def argmax(const float[::1] x, Py_ssize_t skip=-1):
    """The greedy search's argmax (tests): ``numpy.argmax(x)`` with x[skip] taken as -inf."""
    if x.shape[0] == 0:
        raise ValueError("argmax of an empty array")
    return _argmax(&x[0], x.shape[0], skip)


cdef Py_ssize_t _compact(const int64_t *keep, Py_ssize_t kept, Py_ssize_t live,
                         Py_ssize_t width, Py_ssize_t L, Py_ssize_t H, Py_ssize_t A, float *h,
                         float *c, float *feed, float *memory, float *keys, float *factors,
                         uint8_t *in_limit, int64_t *lengths, bint lstm) noexcept nogil:
    """Keep the rows keep[0..kept) (ascending) of a state of ``live`` rows, in place, as
    ``Seq2SeqState.select`` keeps them: h and c (L, live, H) -> (L, kept, H), feed and lengths,
    and the source arrays (live, width, .) -> (kept, new width, .), the new width being the kept
    rows' longest length. Each row moves once, towards the front and in order, so none is
    overwritten before it moves. Returns the new width."""
    cdef Py_ssize_t j, i, layer, new = 0
    for j in range(kept):
        if lengths[keep[j]] > new:
            new = lengths[keep[j]]
    for layer in range(L):
        for j in range(kept):
            memmove(h + (layer * kept + j) * H, h + (layer * live + keep[j]) * H,
                    H * sizeof(float))
            if lstm:
                memmove(c + (layer * kept + j) * H, c + (layer * live + keep[j]) * H,
                        H * sizeof(float))
    for j in range(kept):
        i = keep[j]
        memmove(feed + j * H, feed + i * H, H * sizeof(float))
        _move_source_row(i, width, j, new, H, A, memory, keys, factors, in_limit)
        lengths[j] = lengths[i]
    return new


cdef inline void _move_source_row(Py_ssize_t i, Py_ssize_t width, Py_ssize_t to, Py_ssize_t new,
                                  Py_ssize_t H, Py_ssize_t A, float *memory, float *keys,
                                  float *factors, uint8_t *in_limit) noexcept nogil:
    """The first ``new`` source positions of row i of the (rows, width, .) memory, keys and key
    factors (and (rows, width) in_limit) -> row ``to`` of the same arrays laid out with width
    ``new`` (to <= i, new <= width: the destination never lies past the source)."""
    memmove(memory + to * new * H, memory + i * width * H, new * H * sizeof(float))
    if A and keys != NULL:
        memmove(keys + to * new * A, keys + i * width * A, new * A * sizeof(float))
    if A and factors != NULL:
        memmove(factors + to * new * A, factors + i * width * A, new * A * sizeof(float))
        memmove(in_limit + to * new, in_limit + i * width, new)


cdef inline int _valid_positions(const int64_t *lengths, Py_ssize_t b,
                                 Py_ssize_t S) noexcept nogil:
    """Row b's unpadded source positions: lengths[b] clamped to [0, S]; S without lengths."""
    if lengths == NULL:
        return <int>S
    return <int>min(max(lengths[b], 0), S)


cdef void _dot_attention(const float *q, const float *memory, const int64_t *lengths,
                         float *weights, float *ctx, Py_ssize_t B, Py_ssize_t S, Py_ssize_t H,
                         int num_threads) noexcept nogil:
    """Luong dot attention per row: weights (B, S) = masked softmax(memory_b . q_b) over the
    first lengths[b] positions (all zeros for an empty source); ctx_b (H) = weights_b . memory_b.
    q (B, H), memory (B, S, H), ctx (B, H).

    Each row's BLAS calls span only its own lengths[b] positions, never the padded width S:
    OpenBLAS blocks (and so rounds) by the problem size, so a call sized by S would make a
    source's result depend on the longest source it is batched with."""
    cdef Py_ssize_t b
    cdef int n_valid, h_ = <int>H, one_i = 1
    cdef float one = 1.0, zero = 0.0
    cdef char ta = b'T', tn = b'N'
    for b in range(B):
        n_valid = _valid_positions(lengths, b, S)
        # padded positions are masked out by the softmax; zero them so nothing stale is there
        memset(&weights[b * S + n_valid], 0, (S - n_valid) * sizeof(float))
        if n_valid > 0 and H > 0:
            # column-major memory_b is (H x n_valid): scores = memory_b^T . q_b
            sgemm(&ta, &tn, &n_valid, &one_i, &h_, &one, <float *>&memory[b * S * H], &h_,
                  <float *>&q[b * H], &h_, &zero, &weights[b * S], &n_valid)
    ac_softmax_f32(weights, weights, B, S, lengths, NULL, 0, num_threads)
    for b in range(B):
        n_valid = _valid_positions(lengths, b, S)
        if n_valid > 0 and H > 0:
            sgemm(&tn, &tn, &h_, &one_i, &n_valid, &one, <float *>&memory[b * S * H], &h_,
                  &weights[b * S], &n_valid, &zero, &ctx[b * H], &h_)
        else:
            memset(&ctx[b * H], 0, H * sizeof(float))
