/* SPDX-License-Identifier: Apache-2.0
 *
 * Additive (Bahdanau) attention with the keys already projected:
 *
 *   score[b,i,j] = w_v . tanh(q_proj[b,i,:] + k_proj[b,j,:])     (j < kv_lengths[b])
 *   out[b,i,:]   = sum_j softmax_j(score[b,i,:]) values[b,j,:]
 *
 * q_proj (B, Lq, Hd), k_proj (B, Lk, Hd), w_v (Hd), values (B, Lk, Dv), out (B, Lq, Dv),
 * weights (B, Lq, Lk) or NULL. The B x Lq x Lk x Hd tensor of the textbook formula is never
 * formed: each score is one fused tanh-dot over Hd. In float32 with two or more queries per
 * batch element, the tanh is split (simd.h: tanh(a + b) from exp(2a) and exp(2b), each computed
 * once), leaving a multiply-add and a reciprocal per term; a query or batch element whose
 * projections exceed the split's limit (|x| > 21) takes the exact tanh. Projecting the keys once
 * per source (not once per decoder step) is the caller's job; per step only the query
 * projection (a GEMV) remains; a caller that also keeps the key factors
 * (ac_additive_key_factors_f32) lets steps of one query take the split as well.
 * Luong's "concat" score is the same formula with W_a split into its query and key halves.
 *
 * Nadaraya-Watson pooling (Gaussian kernel):
 *   out[i,:] = sum_j softmax_j(-||q_i - k_j||^2 / (2 h^2)) values[j,:]
 * queries (Nq, D), keys (Nk, D), values (Nk, Dv), out (Nq, Dv), weights (Nq, Nk) or NULL.
 * Blocks of queries: the squared distances from one float64 product (dgemm) past a few
 * features, unless its rounding could move a weight (then directly, as for NULL dgemm), and
 * the output from one product of the weights with the values (gemm; NULL: row by row).
 */
#ifndef ATTNCORE_ADDITIVE_H
#define ATTNCORE_ADDITIVE_H
#include "attncore.h"

#define AC_ADDITIVE_DECLARE(SUF, REAL, GEMM_FN)                                                  \
    int ac_additive_##SUF(const REAL *q_proj, const REAL *k_proj, const float *key_factors,      \
                          const uint8_t *key_in_limit, const REAL *w_v, const REAL *values,      \
                          REAL *out, REAL *weights, ac_index B, ac_index Lq, ac_index Lk,        \
                          ac_index Hd, ac_index Dv, const int64_t *kv_lengths, int num_threads); \
    int ac_nadaraya_watson_##SUF(const REAL *queries, const REAL *keys, const REAL *values,      \
                                 REAL *out, REAL *weights, ac_index Nq, ac_index Nk, ac_index D, \
                                 ac_index Dv, REAL bandwidth, ac_dgemm_fn dgemm, GEMM_FN gemm,   \
                                 int num_threads);

/* The split tanh's key factors, computed once per source for a decoder's steps:
 * factors[r, :] = exp(2 k_proj[r, :]) and in_limit[r] = 1 where every |k_proj[r, h]| <= the
 * split's limit; factors[r, :] = 0 and in_limit[r] = 0 elsewhere (NaN included).
 * k_proj and factors (rows, Hd), in_limit (rows). Passed to ac_additive_f32 as key_factors
 * (B, Lk, Hd) and key_in_limit (B, Lk), they let single-query steps take the split too, with
 * the scores the call would compute from k_proj alone at two or more queries, bit for bit.
 * The float64 build has no split: it takes NULL for both. */
void ac_additive_key_factors_f32(const float *k_proj, float *factors, uint8_t *in_limit,
                                 ac_index rows, ac_index Hd, int num_threads);

AC_ADDITIVE_DECLARE(f32, float, ac_sgemm_fn)
AC_ADDITIVE_DECLARE(f64, double, ac_dgemm_fn)
#endif
