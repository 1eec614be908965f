# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of additive (Bahdanau) attention and Nadaraya-Watson pooling (src_c/additive.h).
Validation lives in ``attncore.kernels.additive_attention`` / ``nadaraya_watson``."""
from libc.stdint cimport int64_t, uint8_t
from cython cimport floating

from scipy.linalg.cython_blas cimport sgemm, dgemm

from ._checks cimport first_outside


def key_factors(const float[:, ::1] k_proj, float[:, ::1] factors, uint8_t[::1] in_limit,
                int num_threads):
    """The split tanh's key factors of k_proj (rows, Hd) into factors (rows, Hd) and
    in_limit (rows,) (src_c/additive.h)."""
    cdef Py_ssize_t rows = k_proj.shape[0], Hd = k_proj.shape[1]
    if factors.shape[0] != rows or factors.shape[1] != Hd or in_limit.shape[0] != rows:
        raise ValueError("key_factors: inconsistent shapes")
    if rows == 0 or Hd == 0:
        in_limit[:] = 0
        return
    with nogil:
        ac_additive_key_factors_f32(&k_proj[0, 0], &factors[0, 0], &in_limit[0], rows, Hd,
                                    num_threads)


def additive(const floating[:, :, ::1] q_proj, const floating[:, :, ::1] k_proj,
             const floating[::1] w_v, const floating[:, :, ::1] values, floating[:, :, ::1] out,
             floating[:, :, ::1] weights, const int64_t[::1] kv_lengths, int num_threads,
             const float[:, :, ::1] key_factors=None, const uint8_t[:, ::1] key_in_limit=None):
    """out (B, Lq, Dv) from projected queries (B, Lq, Hd) and keys (B, Lk, Hd); float32 may
    pass the keys' split-tanh factors (B, Lk, Hd) and in-limit flags (B, Lk) (float64: ignored,
    it has no split)."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef const float *factors = NULL
    cdef const uint8_t *in_limit = NULL
    if key_factors is not None and key_in_limit is not None:
        if (key_factors.shape[0] != k_proj.shape[0] or key_factors.shape[1] != k_proj.shape[1]
                or key_factors.shape[2] != k_proj.shape[2]
                or key_in_limit.shape[0] != k_proj.shape[0]
                or key_in_limit.shape[1] != k_proj.shape[1]):
            raise ValueError("additive: key factors do not match k_proj")
        if key_factors.shape[0] and key_factors.shape[1] and key_factors.shape[2]:
            factors = &key_factors[0, 0, 0]
            in_limit = &key_in_limit[0, 0]
    cdef Py_ssize_t B = q_proj.shape[0], Lq = q_proj.shape[1], Hd = q_proj.shape[2]
    cdef Py_ssize_t Lk = k_proj.shape[1], Dv = values.shape[2]
    cdef int status
    # the shapes the kernel indexes by, again: a direct call past the front wrote past the
    # scores scratch with kv_lengths > Lk
    if (k_proj.shape[0] != B or k_proj.shape[2] != Hd or w_v.shape[0] != Hd
            or values.shape[0] != B or values.shape[1] != Lk or out is None
            or out.shape[0] != B or out.shape[1] != Lq or out.shape[2] != Dv
            or (weights is not None and (weights.shape[0] != B or weights.shape[1] != Lq
                                         or weights.shape[2] != Lk))):
        raise ValueError("additive: inconsistent shapes")
    if kv_lengths is not None and (kv_lengths.shape[0] != B
                                   or first_outside(kv_lengths, 0, Lk) >= 0):
        raise ValueError("additive: kv_lengths must be (B,) in [0, Lk]")
    cdef floating *w_ptr = &weights[0, 0, 0] if weights is not None else NULL
    with nogil:
        if floating is float:
            status = ac_additive_f32(&q_proj[0, 0, 0], &k_proj[0, 0, 0], factors, in_limit,
                                     &w_v[0], &values[0, 0, 0], &out[0, 0, 0], w_ptr, B, Lq, Lk,
                                     Hd, Dv, lens, num_threads)
        else:
            status = ac_additive_f64(&q_proj[0, 0, 0], &k_proj[0, 0, 0], NULL, NULL, &w_v[0],
                                     &values[0, 0, 0], &out[0, 0, 0], w_ptr, B, Lq, Lk, Hd, Dv,
                                     lens, num_threads)
    if status:
        raise MemoryError("attncore.additive_attention: could not allocate scratch memory")


def nadaraya_watson(const floating[:, ::1] queries, const floating[:, ::1] keys,
                    const floating[:, ::1] values, floating[:, ::1] out,
                    floating[:, ::1] weights, double bandwidth, int num_threads):
    """out (Nq, Dv) = Gaussian-kernel weighted average of values (Nk, Dv)."""
    cdef Py_ssize_t Nq = queries.shape[0], D = queries.shape[1]
    cdef Py_ssize_t Nk = keys.shape[0], Dv = values.shape[1]
    cdef int status
    if (keys.shape[1] != D or values.shape[0] != Nk or out is None or out.shape[0] != Nq
            or out.shape[1] != Dv or (weights is not None and (weights.shape[0] != Nq
                                                                or weights.shape[1] != Nk))):
        raise ValueError("nadaraya_watson: inconsistent shapes")
    cdef floating *w_ptr = &weights[0, 0] if weights is not None else NULL
    with nogil:
        if floating is float:
            status = ac_nadaraya_watson_f32(&queries[0, 0], &keys[0, 0], &values[0, 0],
                                            &out[0, 0], w_ptr, Nq, Nk, D, Dv, <float>bandwidth,
                                            dgemm, sgemm, num_threads)
        else:
            status = ac_nadaraya_watson_f64(&queries[0, 0], &keys[0, 0], &values[0, 0],
                                            &out[0, 0], w_ptr, Nq, Nk, D, Dv, bandwidth,
                                            dgemm, dgemm, num_threads)
    if status:
        raise MemoryError("attncore.nadaraya_watson: could not allocate scratch memory")
