# SPDX-License-Identifier: Apache-2.0
"""Declarations of src_c/sdpa.h, for _sdpa (the attention wrappers) and _transformer (the
compiled decoder step)."""
from libc.stdint cimport int64_t

from ._packed_linear cimport ac_sgemm_fn

cdef extern from "sdpa.h" nogil:
    ctypedef void (*ac_dgemm_fn)(char *, char *, int *, int *, int *, double *, double *, int *,
                                 double *, int *, double *, double *, int *)
    ctypedef struct ac_sdpa_mask:
        const unsigned char *keep
        Py_ssize_t sb, sh, si, sj
    int ac_sdpa_flash_f32(const float *q, const float *k, const float *v, float *out,
                          Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv, Py_ssize_t Lq,
                          Py_ssize_t Lk, Py_ssize_t D, const int64_t *kv_lengths, int causal,
                          const ac_sdpa_mask *mask, float scale, Py_ssize_t block_q,
                          Py_ssize_t block_k, ac_sgemm_fn gemm, int num_threads)
    int ac_sdpa_flash_f64(const double *q, const double *k, const double *v, double *out,
                          Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv, Py_ssize_t Lq,
                          Py_ssize_t Lk, Py_ssize_t D, const int64_t *kv_lengths, int causal,
                          const ac_sdpa_mask *mask, double scale, Py_ssize_t block_q,
                          Py_ssize_t block_k, ac_dgemm_fn gemm, int num_threads)
    int ac_sdpa_flash_tiles_f32(const float *q, const float *k, const float *v, float *out,
                                Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv, Py_ssize_t Lq,
                                Py_ssize_t Lk, Py_ssize_t D, const int64_t *kv_lengths,
                                int causal, float scale, Py_ssize_t block_q, Py_ssize_t block_k,
                                int num_threads)
    int ac_sdpa_flash_tiles_masked_f32(const float *q, const float *k, const float *v,
                                       float *out, Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv,
                                       Py_ssize_t Lq, Py_ssize_t Lk, Py_ssize_t D,
                                       const int64_t *kv_lengths, int causal,
                                       const ac_sdpa_mask *mask, float scale, Py_ssize_t block_q,
                                       Py_ssize_t block_k, int num_threads)
    int ac_sdpa_splitkv_f32(const float *q, const float *k, const float *v, float *out,
                            Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv, Py_ssize_t Lq,
                            Py_ssize_t Lk, Py_ssize_t D, const int64_t *kv_lengths, int causal,
                            const ac_sdpa_mask *mask, float scale, Py_ssize_t chunk,
                            int num_threads)
    int ac_sdpa_splitkv_f64(const double *q, const double *k, const double *v, double *out,
                            Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv, Py_ssize_t Lq,
                            Py_ssize_t Lk, Py_ssize_t D, const int64_t *kv_lengths, int causal,
                            const ac_sdpa_mask *mask, double scale, Py_ssize_t chunk,
                            int num_threads)
    int ac_sdpa_weights_f32(const float *q, const float *k, const float *v, float *out,
                            float *weights, Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv,
                            Py_ssize_t Lq, Py_ssize_t Lk, Py_ssize_t D, const int64_t *kv_lengths,
                            int causal, float scale, ac_sgemm_fn gemm, int num_threads)
    int ac_sdpa_weights_f64(const double *q, const double *k, const double *v, double *out,
                            double *weights, Py_ssize_t B, Py_ssize_t H, Py_ssize_t Hkv,
                            Py_ssize_t Lq, Py_ssize_t Lk, Py_ssize_t D, const int64_t *kv_lengths,
                            int causal, double scale, ac_dgemm_fn gemm, int num_threads)


cdef extern from "tile_gemm.h" nogil:
    int ac_tile_gemm_available()
    void ac_tile_gemm_f32(Py_ssize_t m, Py_ssize_t n, Py_ssize_t kk, const float *a,
                          Py_ssize_t lda, Py_ssize_t ak, const float *b, Py_ssize_t ldb,
                          Py_ssize_t group, float *c, Py_ssize_t ldc, int accumulate)
