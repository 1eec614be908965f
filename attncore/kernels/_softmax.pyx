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


def top_k(const double[::1] x, Py_ssize_t k):
    """The indices of the k largest values of x (n,), largest first, equal values by lower index
    (a stable, deterministic ranking; NaN never ranks). Returns int64 (min(k, non-NaN count),).

    One pass keeping the best k in order: O(n) comparisons against the k-th best, O(k) for the
    few values that enter. Beam search ranks a source's beams x vocabulary candidates with it.
    """
    import numpy as np
    cdef Py_ssize_t n = x.shape[0], count = 0, i, j, p
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, n)
    cdef double[::1] best = np.empty(max(k, 1), dtype=np.float64)
    out = np.empty(max(k, 1), dtype=np.int64)
    cdef int64_t[::1] index = out
    cdef double v
    if k == 0:
        return out[:0]
    with nogil:
        for i in range(n):
            v = x[i]
            if v != v or (count == k and not v > best[k - 1]):
                continue
            # the first place holding a smaller value (equal values keep their earlier index)
            p = count if count < k else k - 1
            while p > 0 and best[p - 1] < v:
                p -= 1
            if count < k:
                count += 1
            for j in range(count - 1, p, -1):
                best[j] = best[j - 1]
                index[j] = index[j - 1]
            best[p] = v
            index[p] = i
    return out[:count]
