# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of the fused SDPA kernels (src_c/sdpa.h). Validation lives in
``attncore.kernels.attention``; here arrays are already C-contiguous, 4-D and consistent."""
from libc.stdint cimport int64_t
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm


cdef _check(int status):
    if status != 0:
        raise MemoryError("attncore.attention: could not allocate kernel scratch memory")


def flash(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
          const floating[:, :, :, ::1] v, floating[:, :, :, ::1] out,
          const int64_t[::1] kv_lengths, bint causal, double scale, Py_ssize_t block_q,
          Py_ssize_t block_k, int num_threads):
    """Tiled online-softmax attention; out (B, H, Lq, D)."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], Lk = k.shape[2]
    cdef int status
    with nogil:
        if floating is float:
            status = ac_sdpa_flash_f32(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                       &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                       <float>scale, block_q, block_k, sgemm, num_threads)
        else:
            status = ac_sdpa_flash_f64(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                       &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                       scale, block_q, block_k, dgemm, num_threads)
    _check(status)


def split_kv(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
             const floating[:, :, :, ::1] v, floating[:, :, :, ::1] out,
             const int64_t[::1] kv_lengths, bint causal, double scale, Py_ssize_t chunk,
             int num_threads):
    """Decode-time attention with keys split in fixed chunks merged by log-sum-exp."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], Lk = k.shape[2]
    cdef int status
    with nogil:
        if floating is float:
            status = ac_sdpa_splitkv_f32(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                         &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                         <float>scale, chunk, num_threads)
        else:
            status = ac_sdpa_splitkv_f64(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                         &out[0, 0, 0, 0], B, H, Hkv, Lq, Lk, D, lens, causal,
                                         scale, chunk, num_threads)
    _check(status)


def with_weights(const floating[:, :, :, ::1] q, const floating[:, :, :, ::1] k,
                 const floating[:, :, :, ::1] v, floating[:, :, :, ::1] out,
                 floating[:, :, :, ::1] weights, const int64_t[::1] kv_lengths, bint causal,
                 double scale, int num_threads):
    """Attention that also writes the normalised weights (B, H, Lq, Lk)."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef Py_ssize_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], D = q.shape[3]
    cdef Py_ssize_t Hkv = k.shape[1], Lk = k.shape[2]
    cdef int status
    with nogil:
        if floating is float:
            status = ac_sdpa_weights_f32(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                         &out[0, 0, 0, 0], &weights[0, 0, 0, 0], B, H, Hkv, Lq,
                                         Lk, D, lens, causal, <float>scale, sgemm, num_threads)
        else:
            status = ac_sdpa_weights_f64(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                         &out[0, 0, 0, 0], &weights[0, 0, 0, 0], B, H, Hkv, Lq,
                                         Lk, D, lens, causal, scale, dgemm, num_threads)
    _check(status)
