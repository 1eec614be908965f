# SPDX-License-Identifier: Apache-2.0
"""Declarations of src_c/packed_linear.h (and the BLAS pointer type of attncore.h it takes), for
the Cython modules that run products on packed weights: _blas, _recurrent, _transformer."""

cdef extern from "packed_linear.h" nogil:
    ctypedef void (*ac_sgemm_fn)(char *, char *, int *, int *, int *, float *, float *, int *,
                                 float *, int *, float *, float *, int *)
    Py_ssize_t AC_PANEL_WIDTH
    void ac_pack_panels_f32(const float *w, Py_ssize_t N, Py_ssize_t K, float *panels)
    void ac_packed_linear_rows_f32(const float *x, Py_ssize_t ldx, Py_ssize_t M, Py_ssize_t K,
                                   const float *panels, Py_ssize_t N, const float *bias,
                                   float *out, Py_ssize_t ldo, ac_sgemm_fn sgemm,
                                   Py_ssize_t small_gemm_macs, int num_threads)
