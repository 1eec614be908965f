# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of the masked softmax kernel (src_c/softmax.c). Inputs are validated by
``attncore.kernels.softmax``: 2-D C-contiguous rows, lengths int64 (n_rows,), mask uint8."""
from libc.stdint cimport int64_t, uint8_t
from cython cimport floating

cdef extern from "softmax.h" nogil:
    void ac_softmax_f32(const float *x, float *y, Py_ssize_t n_rows, Py_ssize_t n,
                        const int64_t *lengths, const uint8_t *mask, int log_output,
                        int num_threads)
    void ac_softmax_f64(const double *x, double *y, Py_ssize_t n_rows, Py_ssize_t n,
                        const int64_t *lengths, const uint8_t *mask, int log_output,
                        int num_threads)


def softmax_rows(const floating[:, ::1] x, floating[:, ::1] out, const int64_t[::1] lengths,
                 const uint8_t[:, ::1] mask, bint log_output, int num_threads):
    """out (n_rows, n) = (log-)softmax of each row of x (n_rows, n); lengths/mask may be None."""
    cdef const int64_t *lengths_ptr = &lengths[0] if lengths is not None else NULL
    cdef const uint8_t *mask_ptr = &mask[0, 0] if mask is not None else NULL
    cdef Py_ssize_t n_rows = x.shape[0], n = x.shape[1]
    if n_rows == 0 or n == 0:
        return
    with nogil:
        if floating is float:
            ac_softmax_f32(&x[0, 0], &out[0, 0], n_rows, n, lengths_ptr, mask_ptr, log_output,
                           num_threads)
        else:
            ac_softmax_f64(&x[0, 0], &out[0, 0], n_rows, n, lengths_ptr, mask_ptr, log_output,
                           num_threads)
