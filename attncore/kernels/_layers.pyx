# SPDX-License-Identifier: Apache-2.0
"""Cython wrapper of the norm / activation / rotary / embedding kernels (src_c/layers.h).
Validation lives in the fronts of ``attncore.kernels``."""
cimport numpy as cnp
from libc.stdint cimport int64_t
from cython cimport floating

from ._checks cimport first_outside_of
from ._ndarray cimport empty_like, float_type, int64_array, last_axis_length

cnp.import_array()

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

def layer_norm(x, gamma, beta, double eps, int mode, int num_threads):
    """Each row along the last axis of x (..., D) normalised, as a new array of x's shape;
    gamma and beta None or (D,) of x's dtype; mode 0 standard, 1 uncentred (RAN), 2 RMS."""
    cdef int type_num = float_type(x, "x")
    cdef cnp.ndarray arr = <cnp.ndarray>x
    cdef Py_ssize_t D = last_axis_length(arr, "layer_norm: x")
    cdef Py_ssize_t size = cnp.PyArray_SIZE(arr)
    cdef const void *g = _row_parameter(gamma, "gamma", type_num, D)
    cdef const void *b = _row_parameter(beta, "beta", type_num, D)
    if not 0 <= mode <= 2:
        raise ValueError("layer_norm: mode must be 0, 1 or 2")
    cdef cnp.ndarray out = empty_like(arr)
    if size == 0:
        return out
    cdef const void *src = cnp.PyArray_DATA(arr)
    cdef void *dst = cnp.PyArray_DATA(out)
    cdef Py_ssize_t rows = size // D
    with nogil:
        if type_num == cnp.NPY_FLOAT32:
            ac_layer_norm_f32(<const float *>src, <float *>dst, <const float *>g,
                              <const float *>b, rows, D, <float>eps, mode, num_threads)
        else:
            ac_layer_norm_f64(<const double *>src, <double *>dst, <const double *>g,
                              <const double *>b, rows, D, eps, mode, num_threads)
    return out


cdef const void *_row_parameter(object p, str name, int type_num, Py_ssize_t D) except? NULL:
    """The data of gamma / beta: NULL for None, else checked to be (D,) of x's dtype."""
    if p is None:
        return NULL
    if (float_type(p, name) != type_num or cnp.PyArray_NDIM(<cnp.ndarray>p) != 1
            or cnp.PyArray_DIMS(<cnp.ndarray>p)[0] != D):
        raise ValueError(f"layer_norm: {name} must be (D,) of x's dtype")
    return cnp.PyArray_DATA(<cnp.ndarray>p)


def activation(x, int kind, int num_threads):
    """f(x) element-wise (kinds: see layers.h), a new array of x's shape and dtype."""
    cdef int type_num = float_type(x, "x")
    cdef cnp.ndarray arr = <cnp.ndarray>x
    cdef cnp.ndarray out = empty_like(arr)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(arr)
    cdef const void *src = cnp.PyArray_DATA(arr)
    cdef void *dst = cnp.PyArray_DATA(out)
    if n == 0:
        return out
    with nogil:
        if type_num == cnp.NPY_FLOAT32:
            ac_activation_f32(<const float *>src, <float *>dst, n, kind, num_threads)
        else:
            ac_activation_f64(<const double *>src, <double *>dst, n, kind, num_threads)
    return out


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


def embedding(table, ids, int num_threads):
    """table (vocab, D)[ids]: a new array of shape ids.shape + (D,), ids int64 in [0, vocab)."""
    cdef int type_num = float_type(table, "table")
    cdef cnp.ndarray t = <cnp.ndarray>table
    cdef cnp.ndarray rows_of = int64_array(ids, "ids")
    if cnp.PyArray_NDIM(t) != 2:
        raise ValueError("embedding: table must be 2-D")
    cdef int nd = cnp.PyArray_NDIM(rows_of)
    cdef cnp.npy_intp shape[65]
    if nd + 1 > 64:   # (NumPy 2's NPY_MAXDIMS; 1.x allows 32)
        raise ValueError("embedding: ids has too many dimensions")
    cdef Py_ssize_t rows = cnp.PyArray_SIZE(rows_of), D = cnp.PyArray_DIMS(t)[1]
    cdef const int64_t *index = <const int64_t *>cnp.PyArray_DATA(rows_of)
    if first_outside_of(index, rows, 0, cnp.PyArray_DIMS(t)[0] - 1) >= 0:
        raise ValueError("embedding: ids must lie in [0, rows of table)")
    cdef int axis
    for axis in range(nd):
        shape[axis] = cnp.PyArray_DIMS(rows_of)[axis]
    shape[nd] = D
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(nd + 1, shape, type_num, 0)
    if rows == 0 or D == 0:
        return out
    cdef const void *src = cnp.PyArray_DATA(t)
    cdef void *dst = cnp.PyArray_DATA(out)
    with nogil:
        if type_num == cnp.NPY_FLOAT32:
            ac_embedding_f32(<const float *>src, index, <float *>dst, rows, D, num_threads)
        else:
            ac_embedding_f64(<const double *>src, index, <double *>dst, rows, D, num_threads)
    return out


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
