# SPDX-License-Identifier: Apache-2.0
"""Declarations of src_c/additive.h, for _additive (the Python-facing wrappers) and _recurrent
(the compiled seq2seq decoder step)."""
from libc.stdint cimport int64_t, uint8_t

from ._packed_linear cimport ac_sgemm_fn
from ._sdpa cimport ac_dgemm_fn

cdef extern from "additive.h" nogil:
    void ac_additive_key_factors_f32(const float *k_proj, float *factors, uint8_t *in_limit,
                                     Py_ssize_t rows, Py_ssize_t Hd, int num_threads)
    int ac_additive_f32(const float *q_proj, const float *k_proj, const float *key_factors,
                        const uint8_t *key_in_limit, const float *w_v, const float *values,
                        float *out, float *weights, Py_ssize_t B, Py_ssize_t Lq, Py_ssize_t Lk,
                        Py_ssize_t Hd, Py_ssize_t Dv, const int64_t *kv_lengths, int num_threads)
    int ac_additive_f64(const double *q_proj, const double *k_proj, const float *key_factors,
                        const uint8_t *key_in_limit, const double *w_v, const double *values,
                        double *out, double *weights, Py_ssize_t B, Py_ssize_t Lq, Py_ssize_t Lk,
                        Py_ssize_t Hd, Py_ssize_t Dv, const int64_t *kv_lengths, int num_threads)
    int ac_nadaraya_watson_f32(const float *queries, const float *keys, const float *values,
                               float *out, float *weights, Py_ssize_t Nq, Py_ssize_t Nk,
                               Py_ssize_t D, Py_ssize_t Dv, float bandwidth, ac_dgemm_fn dgemm,
                               ac_sgemm_fn gemm, int num_threads)
    int ac_nadaraya_watson_f64(const double *queries, const double *keys, const double *values,
                               double *out, double *weights, Py_ssize_t Nq, Py_ssize_t Nk,
                               Py_ssize_t D, Py_ssize_t Dv, double bandwidth, ac_dgemm_fn dgemm,
                               ac_dgemm_fn gemm, int num_threads)

