# SPDX-License-Identifier: Apache-2.0
"""The one module that owns BLAS: row-major GEMM through ``scipy.linalg.cython_blas``.

SciPy's BLAS is column-major (Fortran); a row-major product C = A . op(B) is computed as the
column-major C^T = op(B)^T . A^T, i.e. by swapping the operands -- done once, here.

Parallelism: the output is cut into fixed tiles of ``TILE`` x ``TILE`` (``matmul``: rows of
``TILE``, and column strips when there are few row tiles; all decided by the shape only), and
OpenMP hands tiles to threads; each tile is one single-threaded GEMM call (SciPy's
OpenBLAS is limited to one thread by ``attncore.kernels.threads``, so there is no nested
oversubscription). A tile is always computed by the same call whichever thread runs it, so the
results are bit-identical for every thread count.
"""
from cython cimport floating
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport sgemm, dgemm

from libc.limits cimport INT_MAX
from libc.stdint cimport int8_t, uint16_t

from ._packed_linear cimport (AC_I8_MAX_K, AC_MAX_THREADS, AC_PANEL_WIDTH, ac_int8_amx, ac_int8_vnni,
                              ac_pack_panels_bf16,
                              ac_i8_panel_rows, ac_pack_panels_f32, ac_pack_panels_i8, ac_packed_linear_rows,
                              ac_packed_panel_max_rows, ac_round_bf16_f32, panels_data,
                              panels_fit)

cdef extern from "simd.h":
    void ac_small_gemm_f32(const float *x, Py_ssize_t ldx, Py_ssize_t M, Py_ssize_t K,
                           const float *w, Py_ssize_t j0, Py_ssize_t j1, const float *bias,
                           float *out, Py_ssize_t ldo) nogil

cdef extern from "tile_gemm.h":
    int ac_tile_gemm_available() nogil
    int ac_tile_matmul_f32(Py_ssize_t m, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t kk,
                           float alpha, const float *a, Py_ssize_t lda, const float *b,
                           Py_ssize_t ldb, int trans_b, const float *bias, float *c,
                           Py_ssize_t ldc) nogil

PANEL_WIDTH = AC_PANEL_WIDTH
INT8_MAX_IN_FEATURES = AC_I8_MAX_K

cdef Py_ssize_t TILE = 256
# Below this many multiply-adds a product runs on one thread: waking a team costs more than it
# saves, and under load (other processes on the cores) a barrier can wait for a descheduled
# thread for a whole time slice. Decided by the shape only, so results stay thread-independent
# (the tiles, not the threads, fix the arithmetic).
cdef Py_ssize_t PARALLEL_MIN_MACS = 1 << 18
# float32 products of at most SMALL_M rows (decoding steps) skip GEMM, whose weight packing costs
# as much as the product at that size: ac_small_gemm_f32 streams each weight row once, and
# threads split the weight rows in blocks of SMALL_TILE_N.
cdef Py_ssize_t SMALL_M = 16
cdef Py_ssize_t SMALL_TILE_N = 64
# matmul: products with fewer row tiles than this are also cut by columns (strips of at least
# MATMUL_MIN_COLS, a multiple of 16), decided by the shape only like every other split.
cdef Py_ssize_t MATMUL_COL_SPLIT = 4
cdef Py_ssize_t MATMUL_MIN_COLS = 64
# float32 products with K up to this many run on attncore's tile kernel where it is the AVX2
# machines' kernel (tile_gemm.h: 34-45 GMAC/s from 8 to 512 rows where Haswell BLAS ran 9-39);
# past it a 16-column group no longer sits in L1 and BLAS, which blocks K, takes over.
cdef Py_ssize_t TILE_MATMUL_MAX_K = 1024


cdef inline bint use_tile_matmul(Py_ssize_t K) noexcept nogil:
    return K <= TILE_MATMUL_MAX_K and ac_tile_gemm_available()


def tile_matmul_used(Py_ssize_t K):
    """Whether float32 ``matmul`` / ``linear`` (past 16 rows) with inner dimension K run on the
    tile kernel on this machine (else BLAS): for tests."""
    return bool(use_tile_matmul(K))


cdef inline int threads_for(Py_ssize_t macs, int num_threads) noexcept nogil:
    if macs < PARALLEL_MIN_MACS or num_threads <= 1:
        return 1
    return min(num_threads, AC_MAX_THREADS)   # (a direct call's 100000 crashed the process)


cdef inline void gemm_rowmajor(bint trans_b, int m, int n, int k, floating alpha,
                               const floating *a, int lda, const floating *b, int ldb,
                               floating beta, floating *c, int ldc) noexcept nogil:
    """C (m, n) := alpha * A (m, k) . op(B) + beta * C, all row-major; op(B) = B^T when trans_b
    (B stored (n, k)), else B (stored (k, n))."""
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tn = b'N'
    if floating is float:
        sgemm(&ta, &tn, &n, &m, &k, &alpha, <float *>b, &ldb, <float *>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&ta, &tn, &n, &m, &k, &alpha, <double *>b, &ldb, <double *>a, &lda, &beta, c, &ldc)


cdef inline void add_bias(floating *out, Py_ssize_t ldo, const floating *bias, Py_ssize_t m,
                          Py_ssize_t n) noexcept nogil:
    """out[i, j] += bias[j] for an (m, n) tile of a row-major matrix with row stride ldo."""
    cdef Py_ssize_t i, j
    for i in range(m):
        for j in range(n):
            out[i * ldo + j] = out[i * ldo + j] + bias[j]


cdef _check_blas_int(str name, Py_ssize_t K, Py_ssize_t N):
    """ValueError where BLAS's int row strides (K, N) would wrap: a product with rows of 2^31
    elements or more (8 GiB a row in float32) is refused, not computed from wrapped strides."""
    if K > INT_MAX or N > INT_MAX:
        raise ValueError(f"{name}: rows of {max(K, N)} elements are past BLAS's int range "
                         f"(at most {INT_MAX})")


def linear(const floating[:, ::1] x, const floating[:, ::1] weight, const floating[::1] bias,
           floating[:, ::1] out, int num_threads):
    """out (M, N) = x (M, K) . weight (N, K)^T + bias (N) -- torch ``nn.Linear`` layout."""
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], N = weight.shape[0]
    cdef Py_ssize_t row_tiles = (M + TILE - 1) // TILE, col_tiles = (N + TILE - 1) // TILE
    cdef Py_ssize_t t, i0, j0, m, n, i, j
    cdef bint has_bias = bias is not None
    # the callers check their arguments for users; this guards the memory the loops touch
    if weight.shape[1] != K or out.shape[0] != M or out.shape[1] != N or \
            (has_bias and bias.shape[0] != N):
        raise ValueError(f"linear: inconsistent shapes x ({M}, {K}), weight ({N}, "
                         f"{weight.shape[1]}), out ({out.shape[0]}, {out.shape[1]})"
                         + (f", bias ({bias.shape[0]},)" if has_bias else ""))
    _check_blas_int("linear", K, N)
    if M == 0 or N == 0:
        return
    if K == 0:
        for i in range(M):
            for j in range(N):
                out[i, j] = bias[j] if has_bias else 0
        return
    cdef const float *bias_f32
    if floating is float:
        if M <= SMALL_M:
            bias_f32 = &bias[0] if has_bias else NULL
            for t in prange((N + SMALL_TILE_N - 1) // SMALL_TILE_N, nogil=True,
                            schedule="static", num_threads=threads_for(M * N * K, num_threads)):
                ac_small_gemm_f32(&x[0, 0], K, M, K, &weight[0, 0], t * SMALL_TILE_N,
                                  min(N, (t + 1) * SMALL_TILE_N), bias_f32, &out[0, 0], N)
            return
        if use_tile_matmul(K):
            tile_products(1, M, N, K, 1.0, &x[0, 0], 0, &weight[0, 0], 0, True,
                          &bias[0] if has_bias else NULL, &out[0, 0], 0, num_threads)
            return
    for t in prange(row_tiles * col_tiles, nogil=True, schedule="static",
                    num_threads=threads_for(M * N * K, num_threads)):
        i0 = (t // col_tiles) * TILE
        j0 = (t % col_tiles) * TILE
        m = min(TILE, M - i0)
        n = min(TILE, N - j0)
        gemm_rowmajor(True, <int>m, <int>n, <int>K, <floating>1, &x[i0, 0], <int>K,
                      &weight[j0, 0], <int>K, <floating>0, &out[i0, j0], <int>N)
        if has_bias:
            add_bias(&out[i0, j0], N, &bias[j0], m, n)


cdef inline Py_ssize_t strip_width(Py_ssize_t batch, Py_ssize_t row_tiles,
                                   Py_ssize_t N) noexcept nogil:
    """Columns of matmul's tiles: all N, or, with few row tiles (one product of a few hundred
    rows, e.g. a batch of queries times a weight), up to MATMUL_COL_SPLIT strips of a multiple
    of 16 so that threads share it."""
    cdef Py_ssize_t width = N
    if batch * row_tiles < MATMUL_COL_SPLIT:
        width = max(MATMUL_MIN_COLS, (N + MATMUL_COL_SPLIT - 1) // MATMUL_COL_SPLIT)
        width = min(N, (width + 15) // 16 * 16)
    return width


cdef void tile_products(Py_ssize_t batch, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, float alpha,
                        const float *a, Py_ssize_t a_stride, const float *b, Py_ssize_t b_stride,
                        bint trans_b, const float *bias, float *out, Py_ssize_t out_stride,
                        int num_threads) except *:
    """out[i] (M, N) = alpha * a[i] (M, K) . op(b[i]) (+ bias, NULL: none) on the tile kernel
    (ac_tile_matmul_f32), C-contiguous operands batch strides apart; op(b) = b^T (b (N, K))
    when trans_b, else b (K, N). Cut like BLAS's tiles, by the shape only (rows of TILE,
    strip_width columns) -- the bits do not depend on the cut anyway."""
    cdef Py_ssize_t row_tiles = (M + TILE - 1) // TILE
    cdef Py_ssize_t width = strip_width(batch, row_tiles, N)
    cdef Py_ssize_t col_tiles = (N + width - 1) // width, t, bi, i0, j0
    cdef int failed = 0
    for t in prange(batch * row_tiles * col_tiles, nogil=True, schedule="static",
                    num_threads=threads_for(batch * M * N * K, num_threads)):
        bi = t // (row_tiles * col_tiles)
        i0 = (t // col_tiles) % row_tiles * TILE
        j0 = t % col_tiles * width
        failed += ac_tile_matmul_f32(min(TILE, M - i0), j0, min(N, j0 + width), K, alpha,
                                     a + bi * a_stride + i0 * K, K, b + bi * b_stride,
                                     K if trans_b else N, trans_b, bias,
                                     out + bi * out_stride + i0 * N, N) != 0
    if failed:
        raise MemoryError("attncore: could not allocate a tile product's scratch")


def matmul(const floating[:, :, ::1] a, const floating[:, :, ::1] b, floating[:, :, ::1] out,
           bint trans_b, double alpha, int num_threads):
    """out[i] (M, N) = alpha * a[i] (M, K) . op(b[i]) for every batch index i;
    op(b) = b^T with b (batch, N, K) when trans_b, else b (batch, K, N)."""
    cdef Py_ssize_t batch = a.shape[0], M = a.shape[1], K = a.shape[2], N = out.shape[2]
    cdef Py_ssize_t row_tiles = (M + TILE - 1) // TILE, t, bi, i0, j0, m, n
    cdef int ldb
    # the callers check their arguments for users; this guards the memory the loops touch
    if b.shape[0] != batch or out.shape[0] != batch or out.shape[1] != M or \
            (trans_b and (b.shape[1] != N or b.shape[2] != K)) or \
            (not trans_b and (b.shape[1] != K or b.shape[2] != N)):
        raise ValueError(f"matmul: inconsistent shapes a ({batch}, {M}, {K}), "
                         f"b ({b.shape[0]}, {b.shape[1]}, {b.shape[2]}), "
                         f"out ({out.shape[0]}, {out.shape[1]}, {N}), trans_b={bool(trans_b)}")
    _check_blas_int("matmul", K, N)
    ldb = <int>(K if trans_b else N)
    if batch == 0 or M == 0 or N == 0:
        return
    if K == 0:
        out[:, :, :] = 0
        return
    if floating is float:
        if use_tile_matmul(K):
            tile_products(batch, M, N, K, <float>alpha, &a[0, 0, 0], M * K, &b[0, 0, 0],
                          N * K, trans_b, NULL, &out[0, 0, 0], M * N, num_threads)
            return
    cdef Py_ssize_t width = strip_width(batch, row_tiles, N)
    cdef Py_ssize_t col_tiles = (N + width - 1) // width
    for t in prange(batch * row_tiles * col_tiles, nogil=True, schedule="static",
                    num_threads=threads_for(batch * M * N * K, num_threads)):
        bi = t // (row_tiles * col_tiles)
        i0 = (t // col_tiles) % row_tiles * TILE
        j0 = t % col_tiles * width
        m = min(TILE, M - i0)
        n = min(width, N - j0)
        gemm_rowmajor(trans_b, <int>m, <int>n, <int>K, <floating>alpha, &a[bi, i0, 0], <int>K,
                      &b[bi, j0, 0] if trans_b else &b[bi, 0, j0], ldb, <floating>0,
                      &out[bi, i0, j0], <int>N)


cdef _check_panels(str name, weight, panels):
    """ValueError unless panels are (ceil(N / PANEL_WIDTH), K, PANEL_WIDTH) for weight (N, K)."""
    cdef Py_ssize_t N = weight.shape[0], K = weight.shape[1]
    want = ((N + AC_PANEL_WIDTH - 1) // AC_PANEL_WIDTH, K, AC_PANEL_WIDTH)
    got = (panels.shape[0], panels.shape[1], panels.shape[2])
    if got != want or N == 0 or K == 0:
        raise ValueError(f"{name}: panels of shape {got} do not hold a ({N}, {K}) weight "
                         f"(expected {want}, non-zero sizes)")


def pack_panels(const float[:, ::1] weight, float[:, :, ::1] panels):
    """panels (ceil(N / PANEL_WIDTH), K, PANEL_WIDTH) <- weight (N, K), zero-padded past N."""
    _check_panels("pack_panels", weight, panels)
    with nogil:
        ac_pack_panels_f32(&weight[0, 0], weight.shape[0], weight.shape[1], &panels[0, 0, 0])


def pack_panels_bf16(const float[:, ::1] weight, uint16_t[:, :, ::1] panels):
    """The same panels in bfloat16, each weight rounded to nearest (ties to even), in the pair
    order of ``ac_pack_panels_bf16`` (src_c/packed_linear.h)."""
    _check_panels("pack_panels_bf16", weight, panels)
    with nogil:
        ac_pack_panels_bf16(&weight[0, 0], weight.shape[0], weight.shape[1], &panels[0, 0, 0])


def pack_panels_i8(const float[:, ::1] weight, int8_t[:, :, ::1] panels):
    """The int8 panels of ``ac_pack_panels_i8`` (src_c/packed_linear.h): per output a scale
    max |w| / 127 and its weights rounded to int8, with the scales and weight sums after them.
    panels must have the shape ``int8_panels_shape(N, K)``."""
    import numpy as np
    want = int8_panels_shape(weight.shape[0], weight.shape[1])
    if not np.all(np.isfinite(np.asarray(weight))):
        raise ValueError("pack_panels_i8: weight holds NaN or infinity, which int8 cannot quantize")
    if (panels.shape[0], panels.shape[1], panels.shape[2]) != want:
        raise ValueError(f"pack_panels_i8: panels must have shape {want} to hold a "
                         f"({weight.shape[0]}, {weight.shape[1]}) weight")
    with nogil:
        ac_pack_panels_i8(&weight[0, 0], weight.shape[0], weight.shape[1], &panels[0, 0, 0])


def int8_panels_shape(Py_ssize_t n_out, Py_ssize_t n_in):
    """The shape of the int8 panels of an (n_out, n_in) weight (n_in at most
    ``INT8_MAX_IN_FEATURES``)."""
    if n_in > AC_I8_MAX_K:
        raise ValueError(f"int8 packing takes at most {AC_I8_MAX_K} in_features, got {n_in}")
    return ((n_out + AC_PANEL_WIDTH - 1) // AC_PANEL_WIDTH, ac_i8_panel_rows(n_in), AC_PANEL_WIDTH)


def int8_vnni():
    """True where int8 products run on AVX-512 VNNI (elsewhere a portable, slower loop)."""
    return bool(ac_int8_vnni())


def int8_amx():
    """True where int8 products of 2 rows or more run on AMX tiles (x86-64 with AMX-INT8 and
    the kernel's leave to use the tile state, which the first call asks for)."""
    return bool(ac_int8_amx())


def round_bf16(const float[::1] x, float[::1] out):
    """out = x rounded to the nearest bfloat16 (ties to even), as float32; as the packers round."""
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"round_bf16: out has {out.shape[0]} entries for {x.shape[0]}")
    with nogil:
        ac_round_bf16_f32(&x[0], &out[0], x.shape[0])


def linear_packed(const float[:, ::1] x, panels, Py_ssize_t N, const float[::1] bias,
                  float[:, ::1] out, Py_ssize_t small_gemm_macs, int num_threads):
    """out (M, N) = x (M, K) . W^T + bias for a weight packed by ``pack_panels`` (float32),
    ``pack_panels_bf16`` (uint16) or ``pack_panels_i8`` (int8, any M): up to :func:`packed_panel_max_rows` rows on attncore's
    panel kernel, more on BLAS reading the panels in place (``ac_packed_linear_rows``,
    src_c/packed_linear.h); small_gemm_macs: ``threads.BLAS_SMALL_GEMM_MACS``."""
    cdef int panel_type
    cdef const void *data = panels_data(panels, &panel_type)
    # the kernel reads N x K weights from the panels: a shape that does not match them (an
    # edited PackedLinearWeight) must not reach it (int8 panels, of K rounded up to 64, store K)
    if not panels_fit(panels, N, x.shape[1]):
        raise ValueError(f"packed weight: panels of shape {panels.shape} do not hold a "
                         f"({N}, {x.shape[1]}) weight")
    if (bias is not None and bias.shape[0] != N) or out.shape[0] != x.shape[0] or \
            out.shape[1] != N:
        raise ValueError("linear_packed: inconsistent bias or out shape")
    cdef const float *bias_ptr = &bias[0] if bias is not None else NULL
    if x.shape[0] == 0 or N == 0:
        return
    with nogil:
        ac_packed_linear_rows(&x[0, 0], x.shape[1], x.shape[0], x.shape[1], data, panel_type, N,
                              bias_ptr, &out[0, 0], N, sgemm, small_gemm_macs, num_threads)


def packed_panel_max_rows():
    """The most rows a product on packed weights runs on attncore's panel kernel (256 with the
    AVX2 / AVX-512 kernels, 16 with the scalar one); more rows run BLAS on the panels."""
    return ac_packed_panel_max_rows()
