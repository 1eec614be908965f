# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of additive (Bahdanau) attention and Nadaraya-Watson pooling (src_c/additive.h).
Validation lives in ``attncore.kernels.additive_attention`` / ``nadaraya_watson``."""
from libc.stdint cimport int64_t
from cython cimport floating


def additive(const floating[:, :, ::1] q_proj, const floating[:, :, ::1] k_proj,
             const floating[::1] w_v, const floating[:, :, ::1] values, floating[:, :, ::1] out,
             floating[:, :, ::1] weights, const int64_t[::1] kv_lengths, int num_threads):
    """out (B, Lq, Dv) from projected queries (B, Lq, Hd) and keys (B, Lk, Hd)."""
    cdef const int64_t *lens = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef floating *w_ptr = &weights[0, 0, 0] if weights is not None else NULL
    cdef Py_ssize_t B = q_proj.shape[0], Lq = q_proj.shape[1], Hd = q_proj.shape[2]
    cdef Py_ssize_t Lk = k_proj.shape[1], Dv = values.shape[2]
    cdef int status
    with nogil:
        if floating is float:
            status = ac_additive_f32(&q_proj[0, 0, 0], &k_proj[0, 0, 0], &w_v[0],
                                     &values[0, 0, 0], &out[0, 0, 0], w_ptr, B, Lq, Lk, Hd, Dv,
                                     lens, num_threads)
        else:
            status = ac_additive_f64(&q_proj[0, 0, 0], &k_proj[0, 0, 0], &w_v[0],
                                     &values[0, 0, 0], &out[0, 0, 0], w_ptr, B, Lq, Lk, Hd, Dv,
                                     lens, num_threads)
    if status:
        raise MemoryError("attncore.additive_attention: could not allocate scratch memory")


def nadaraya_watson(const floating[:, ::1] queries, const floating[:, ::1] keys,
                    const floating[:, ::1] values, floating[:, ::1] out,
                    floating[:, ::1] weights, double bandwidth, int num_threads):
    """out (Nq, Dv) = Gaussian-kernel weighted average of values (Nk, Dv)."""
    cdef floating *w_ptr = &weights[0, 0] if weights is not None else NULL
    cdef Py_ssize_t Nq = queries.shape[0], D = queries.shape[1]
    cdef Py_ssize_t Nk = keys.shape[0], Dv = values.shape[1]
    cdef int status
    with nogil:
        if floating is float:
            status = ac_nadaraya_watson_f32(&queries[0, 0], &keys[0, 0], &values[0, 0],
                                            &out[0, 0], w_ptr, Nq, Nk, D, Dv, <float>bandwidth,
                                            num_threads)
        else:
            status = ac_nadaraya_watson_f64(&queries[0, 0], &keys[0, 0], &values[0, 0],
                                            &out[0, 0], w_ptr, Nq, Nk, D, Dv, bandwidth,
                                            num_threads)
    if status:
        raise MemoryError("attncore.nadaraya_watson: could not allocate scratch memory")
