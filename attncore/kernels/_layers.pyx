# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of the norm / activation / rotary / embedding kernels (src_c/layers.h).
Validation lives in the fronts of ``attncore.kernels``."""
from libc.stdint cimport int64_t
from cython cimport floating

from ._checks cimport first_outside

cdef extern from "layers.h" nogil:
    void ac_layer_norm_f32(const float *x, float *y, const float *gamma, const float *beta,
                           Py_ssize_t rows, Py_ssize_t D, float eps, int mode, int num_threads)
    void ac_layer_norm_f64(const double *x, double *y, const double *gamma, const double *beta,
                           Py_ssize_t rows, Py_ssize_t D, double eps, int mode, int num_threads)
    void ac_activation_f32(const float *x, float *y, Py_ssize_t n, int kind, int num_threads)
    void ac_activation_f64(const double *x, double *y, Py_ssize_t n, int kind, int num_threads)
    void ac_rotary_f32(float *x, const int64_t *positions, Py_ssize_t N, Py_ssize_t L,
                       Py_ssize_t D, double base, int num_threads)
    void ac_rotary_f64(double *x, const int64_t *positions, Py_ssize_t N, Py_ssize_t L,
                       Py_ssize_t D, double base, int num_threads)
    void ac_embedding_f32(const float *table, const int64_t *ids, float *out, Py_ssize_t rows,
                          Py_ssize_t D, int num_threads)
    void ac_embedding_f64(const double *table, const int64_t *ids, double *out, Py_ssize_t rows,
                          Py_ssize_t D, int num_threads)
    void ac_swap_last_axes_f32(const float *x, float *y, Py_ssize_t P, Py_ssize_t A,
                               Py_ssize_t B, int num_threads)
    void ac_swap_last_axes_f64(const double *x, double *y, Py_ssize_t P, Py_ssize_t A,
                               Py_ssize_t B, int num_threads)


# The shapes each kernel indexes by are checked again here (the fronts check them for users):
# a direct call of this private module with a short out, gamma or positions, or an id past the
# table, read or wrote past the arrays.

def layer_norm(const floating[:, ::1] x, floating[:, ::1] out, const floating[::1] gamma,
               const floating[::1] beta, double eps, int mode, int num_threads):
    """Row-wise normalisation of x (rows, D); mode 0 standard, 1 uncentred (RAN), 2 RMS."""
    cdef Py_ssize_t rows = x.shape[0], D = x.shape[1]
    if (out is None or out.shape[0] != rows or out.shape[1] != D
            or (gamma is not None and gamma.shape[0] != D)
            or (beta is not None and beta.shape[0] != D)):
        raise ValueError("layer_norm: out must be x's shape, gamma and beta (D,)")
    if not 0 <= mode <= 2:
        raise ValueError("layer_norm: mode must be 0, 1 or 2")
    if rows == 0 or D == 0:
        return
    cdef const floating *g = &gamma[0] if gamma is not None else NULL
    cdef const floating *b = &beta[0] if beta is not None else NULL
    with nogil:
        if floating is float:
            ac_layer_norm_f32(&x[0, 0], &out[0, 0], g, b, rows, D, <float>eps, mode, num_threads)
        else:
            ac_layer_norm_f64(&x[0, 0], &out[0, 0], g, b, rows, D, eps, mode, num_threads)


def activation(const floating[::1] x, floating[::1] out, int kind, int num_threads):
    """Element-wise activation of a flat array (kinds: see layers.h)."""
    cdef Py_ssize_t n = x.shape[0]
    if out is None or out.shape[0] != n:
        raise ValueError("activation: out must be x's shape")
    if n == 0:
        return
    with nogil:
        if floating is float:
            ac_activation_f32(&x[0], &out[0], n, kind, num_threads)
        else:
            ac_activation_f64(&x[0], &out[0], n, kind, num_threads)


def rotary(floating[:, :, ::1] x, const int64_t[::1] positions, double base, int num_threads):
    """Interleaved rotary embedding, in place over x (N, L, D) with positions (L,)."""
    cdef Py_ssize_t N = x.shape[0], L = x.shape[1], D = x.shape[2]
    if positions is None or positions.shape[0] != L:
        raise ValueError("rotary: positions must be (L,)")
    if N == 0 or L == 0 or D == 0:
        return
    with nogil:
        if floating is float:
            ac_rotary_f32(&x[0, 0, 0], &positions[0], N, L, D, base, num_threads)
        else:
            ac_rotary_f64(&x[0, 0, 0], &positions[0], N, L, D, base, num_threads)


def embedding(const floating[:, ::1] table, const int64_t[::1] ids, floating[:, ::1] out,
              int num_threads):
    """out (rows, D) = table[ids]."""
    cdef Py_ssize_t rows = ids.shape[0], D = table.shape[1]
    if out is None or out.shape[0] != rows or out.shape[1] != D:
        raise ValueError("embedding: out must be (len(ids), D)")
    if first_outside(ids, 0, table.shape[0] - 1) >= 0:
        raise ValueError("embedding: ids must lie in [0, rows of table)")
    if rows == 0 or D == 0:
        return
    with nogil:
        if floating is float:
            ac_embedding_f32(&table[0, 0], &ids[0], &out[0, 0], rows, D, num_threads)
        else:
            ac_embedding_f64(&table[0, 0], &ids[0], &out[0, 0], rows, D, num_threads)


def swap_last_axes(const floating[:, :, ::1] x, floating[:, :, ::1] out, int num_threads):
    """out (P, B, A) = x (P, A, B) with its last two axes swapped (a blocked transpose)."""
    cdef Py_ssize_t P = x.shape[0], A = x.shape[1], B = x.shape[2]
    if out is None or out.shape[0] != P or out.shape[1] != B or out.shape[2] != A:
        raise ValueError("swap_last_axes: out must have shape (P, B, A) for x (P, A, B)")
    if P == 0 or A == 0 or B == 0:
        return
    with nogil:
        if floating is float:
            ac_swap_last_axes_f32(&x[0, 0, 0], &out[0, 0, 0], P, A, B, num_threads)
        else:
            ac_swap_last_axes_f64(&x[0, 0, 0], &out[0, 0, 0], P, A, B, num_threads)
