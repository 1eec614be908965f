# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of the fused SDPA kernels (src_c/sdpa.h). Validation with messages for users
lives in ``attncore.kernels.attention``; here arrays are already C-contiguous, 4-D and
consistent, and _check_args checks that again so that no direct call indexes out of bounds."""
from libc.stdint cimport int64_t
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm

from ._checks cimport first_outside


cdef _check(int status):
    if status != 0:
        raise MemoryError("attncore.attention: could not allocate kernel scratch memory")


cdef const ac_sdpa_mask *_mask_view(const unsigned char[:, :, :, :] mask, ac_sdpa_mask *view,
                                    Py_ssize_t B, Py_ssize_t H, Py_ssize_t Lq,
                                    Py_ssize_t Lk) except? NULL:
    """view filled from mask ((B, H, Lq, Lk) bytes, nonzero = kept, any strides: a broadcast
    view is read in place) and returned; NULL for no mask."""
    if mask is None:
        return NULL
    if mask.shape[0] != B or mask.shape[1] != H or mask.shape[2] != Lq or mask.shape[3] != Lk:
        raise ValueError("mask must be (B, H, Lq, Lk)")
    view.keep = &mask[0, 0, 0, 0]
    view.sb, view.sh = mask.strides[0], mask.strides[1]
    view.si, view.sj = mask.strides[2], mask.strides[3]
    return view


cdef int _check_args(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
                     const floating[:, :, :, ::1] v, const floating[:, :, :, ::1] out,
                     const int64_t[::1] kv_lengths, bint out_needed=True) except -1:
    """q, out (B, H, Lq, D) (out None only where the kernel skips it: ``out_needed=False``);
    k, v (B, Hkv, Lk, D) with H % Hkv == 0, no dimension 0 (attention() answers those without
    a kernel; here Lq = 0 divided by zero); kv_lengths None or (B,) in [0, Lk]: the shapes the
    kernels index by. (C comparisons: the Python-level version of these checks, building
    tuples of the shapes, cost 3 us a call, a tenth of a decoding step's attention.)"""
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3]
    cdef int axis
    if out is None and out_needed:
        raise ValueError("out is required")
    cdef bint k_like_v = True
    for axis in range(4):
        if q.shape[axis] == 0 or k.shape[axis] == 0:
            raise ValueError("q and k must have no dimension of size 0")
        k_like_v = k_like_v and k.shape[axis] == v.shape[axis]
    if not k_like_v or k.shape[0] != B or k.shape[3] != D:
        raise ValueError("k and v must be (B, Hkv, Lk, D) with q's B and D")
    if H % k.shape[1]:
        raise ValueError("k: its heads must divide q's heads")
    if out is not None and (out.shape[0] != B or out.shape[1] != H or out.shape[2] != Lq
                            or out.shape[3] != D):
        raise ValueError("out must have q's shape")
    if kv_lengths is not None and (kv_lengths.shape[0] != B
                                   or first_outside(kv_lengths, 0, k.shape[2]) >= 0):
        raise ValueError("kv_lengths must be (B,) in [0, Lk]")
    return 0


def flash(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
          const floating[:, :, :, ::1] v, floating[:, :, :, ::1] out,
          const int64_t[::1] kv_lengths, bint causal, double scale, Py_ssize_t block_q,
          Py_ssize_t block_k, bint tile_kernel, int num_threads,
          const unsigned char[:, :, :, :] mask=None):
    """Tiled online-softmax attention; out (B, H, Lq, D). With tile_kernel (float32 only, where
    tile_products() is True, block_q a multiple of 16) the tile products run on tile_gemm.h's
    kernel (ac_sdpa_flash_tiles_f32), otherwise on BLAS. mask: (B, H, Lq, Lk) bytes, nonzero =
    kept, any strides (a broadcast view is read in place); finite values only (a left-out key
    weighs 0, and 0 x NaN = NaN: ac_sdpa_flash_tiles_masked_f32)."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], Lk = k.shape[2]
    cdef int status
    cdef ac_sdpa_mask keep
    cdef const ac_sdpa_mask *keep_or_null
    _check_args(q, k, v, out, kv_lengths)
    keep_or_null = _mask_view(mask, &keep, B, H, Lq, Lk)
    if block_q <= 0 or block_k <= 0:
        raise ValueError("block_q and block_k must be > 0")
    if tile_kernel and (floating is double or not ac_tile_gemm_available() or block_q % 16):
        raise ValueError("tile_kernel needs float32, the AVX2 or AVX-512 kernels and block_q % 16 == 0")
    with nogil:
        if floating is float:
            if tile_kernel:
                status = ac_sdpa_flash_tiles_masked_f32(
                    &q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0], &out[0, 0, 0, 0], B, H, Hkv,
                    Lq, Lk, D, lens, causal, keep_or_null, <float>scale,
                    block_q, block_k, num_threads)
            else:
                status = ac_sdpa_flash_f32(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                           &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                           keep_or_null, <float>scale, block_q, block_k, sgemm,
                                           num_threads)
        else:
            status = ac_sdpa_flash_f64(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                       &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                       keep_or_null, scale, block_q, block_k, dgemm,
                                       num_threads)
    _check(status)


def tile_products():
    """True when the float32 flash path can run its tile products on tile_gemm.h's kernel (this
    process runs the AVX2 or AVX-512 kernels, simd.h level 1 or 2)."""
    return bool(ac_tile_gemm_available())


def tile_gemm(const float[:, ::1] a, const float[:, ::1] b, float[:, ::1] c, bint accumulate,
              bint a_transposed=False, bint b_panels=False):
    """c (m, n) = A (m, kk) . B (+ c when accumulate), on tile_gemm.h's kernel (for tests).
    A is a, or a.T with a_transposed (a is then (kk, m)); B is b (kk, n), or with b_panels b is
    (ceil(n / 16), kk * 16): B in panels of 16 columns, as the flash path stores queries."""
    cdef Py_ssize_t m = c.shape[0], n = c.shape[1]
    cdef Py_ssize_t kk = a.shape[0] if a_transposed else a.shape[1]
    cdef Py_ssize_t lda = 1 if a_transposed else a.shape[1]
    cdef Py_ssize_t ak = a.shape[1] if a_transposed else 1
    if (a.shape[1] if a_transposed else a.shape[0]) != m:
        raise ValueError("a: must give c.shape[0] rows")
    if b_panels:
        if b.shape[1] != kk * 16 or b.shape[0] * 16 < n:
            raise ValueError("b: panels must be (ceil(n / 16), kk * 16)")
    elif b.shape[0] != kk or b.shape[1] != n:
        raise ValueError("b: must be (kk, c.shape[1])")
    if m == 0 or n == 0 or kk == 0:
        if not accumulate:
            c[:, :] = 0
        return
    with nogil:
        if b_panels:
            ac_tile_gemm_f32(m, n, kk, &a[0, 0], lda, ak, &b[0, 0], 16, 16 * kk, &c[0, 0], n,
                             accumulate)
        else:
            ac_tile_gemm_f32(m, n, kk, &a[0, 0], lda, ak, &b[0, 0], n, 16, &c[0, 0], n,
                             accumulate)


def split_kv(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
             const floating[:, :, :, ::1] v, floating[:, :, :, ::1] out,
             const int64_t[::1] kv_lengths, bint causal, double scale, Py_ssize_t chunk,
             int num_threads, const unsigned char[:, :, :, :] mask=None):
    """Decode-time attention with keys split in fixed chunks merged by log-sum-exp. mask as
    for flash (finite values only)."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], Lk = k.shape[2]
    cdef int status
    cdef ac_sdpa_mask keep
    cdef const ac_sdpa_mask *keep_or_null
    _check_args(q, k, v, out, kv_lengths)
    keep_or_null = _mask_view(mask, &keep, B, H, Lq, Lk)
    if chunk <= 0:
        raise ValueError("chunk must be > 0")
    with nogil:
        if floating is float:
            status = ac_sdpa_splitkv_f32(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                         &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                         keep_or_null, <float>scale, chunk, num_threads)
        else:
            status = ac_sdpa_splitkv_f64(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                         &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                         keep_or_null, scale, chunk, num_threads)
    _check(status)


def weights_only(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
                 floating[:, :, :, ::1] weights, const int64_t[::1] kv_lengths, bint causal,
                 double scale, int num_threads):
    """The normalised attention weights (B, H, Lq, Lk) alone (ac_sdpa_weights with out NULL):
    the output comes from flash or split-KV, so asking for weights changes no output bit."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], Lk = k.shape[2]
    cdef int status
    cdef const floating[:, :, :, ::1] no_out = None
    _check_args(q, k, k, no_out, kv_lengths, out_needed=False)
    if (weights.shape[0] != B or weights.shape[1] != H or weights.shape[2] != Lq
            or weights.shape[3] != Lk):
        raise ValueError("weights must be (B, H, Lq, Lk)")
    with nogil:
        if floating is float:
            status = ac_sdpa_weights_f32(&q[0, 0, 0, 0], &k[0, 0, 0, 0], NULL, NULL,
                                         &weights[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens,
                                         causal, <float>scale, sgemm, num_threads)
        else:
            status = ac_sdpa_weights_f64(&q[0, 0, 0, 0], &k[0, 0, 0, 0], NULL, NULL,
                                         &weights[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens,
                                         causal, scale, dgemm, num_threads)
    _check(status)
