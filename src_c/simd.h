/* SPDX-License-Identifier: Apache-2.0
 *
 * Vector primitives for the float32 hot loops, with run-time dispatch: AVX-512 (simd_avx512.h)
 * and AVX2+FMA versions (compiled through `target` attributes, so the build stays portable) and
 * a scalar fallback. The choice is made once per process from CPUID; ATTNCORE_FORCE_ISA=avx2 or
 * =scalar caps it (to test the other paths, or to compare machines).
 * Results are deterministic for a given machine: a row is always reduced by the same code in
 * the same order, whichever thread runs it.
 */
#ifndef ATTNCORE_SIMD_H
#define ATTNCORE_SIMD_H
#include "attncore.h"

/* 2 when the AVX-512 paths are in use, 1 for AVX2+FMA, 0 for scalar. */
int ac_simd_level(void);
const char *ac_simd_name(void);

/* max_i x[i] over n >= 1 elements. */
float ac_max_f32(const float *x, ac_index n);
/* x[i] = exp(x[i] - shift) in place; returns the sum of the new x (0 for n == 0).
 * exp(-inf) is exactly 0. */
float ac_exp_shift_sum_f32(float *x, ac_index n, float shift);
/* y[i] = exp(x[i] - shift) (x and y may be the same); returns the sum of y. With y NULL only
 * the sum is computed (log-softmax in place). */
float ac_exp_shift_sum_to_f32(const float *x, float *y, ac_index n, float shift);
/* x[i] *= a */
void ac_scale_f32(float *x, ac_index n, float a);
/* sum_i a[i] * b[i] */
float ac_dot_f32(const float *a, const float *b, ac_index n);
/* y[i] += a * x[i] */
void ac_axpy_f32(float *y, float a, const float *x, ac_index n);
/* sum_j w[j] * tanh(k[j] + q[j]) : the Bahdanau score of one key. */
float ac_tanh_score_f32(const float *k, const float *q, const float *w, ac_index n);
/* Bahdanau scores through the split tanh(a + b) = 1 - 2 / (1 + e^(2a) e^(2b)), which leaves
 * one multiply-add and a reciprocal per term once the exponentials of the projected query (a)
 * and keys (b) are known (each computed once, not once per query-key pair):
 *   out[j] = sum_h w[h] * (1 - 1 / (ea_half[h] * eb[j, h] + 1/2))
 * with ea_half = exp(2a) / 2 (n), eb = exp(2b) (n_keys, n). Within float32 rounding of tanh
 * when every |a|, |b| <= AC_TANH_SPLIT_LIMIT: each factor is then a normal float and their
 * product stays finite. prefetch (prefetch_bytes; NULL: none): what the caller reads next,
 * pulled into L1 meanwhile by the AVX2 version (the additive kernel passes the keys' values). */
#define AC_TANH_SPLIT_LIMIT 21.0f
void ac_tanh_split_scores_f32(const float *ea_half, const float *eb, ac_index n_keys,
                              const float *w, ac_index n, float *out, const void *prefetch,
                              ac_index prefetch_bytes);
/* y[i] = scale * exp(2 x[i]) (the factors of the split above). */
void ac_exp2x_f32(const float *x, float *y, ac_index n, float scale);
/* 1 when every |x[i]| <= limit; 0 otherwise, and when any x[i] is NaN. */
int ac_all_abs_le_f32(const float *x, ac_index n, float limit);
/* y[i] = tanh(x[i]) and y[i] = sigmoid(x[i]), in place allowed. */
void ac_tanh_f32(const float *x, float *y, ac_index n);
void ac_sigmoid_f32(const float *x, float *y, ac_index n);
/* One row of a recurrent cell, in place on the state. gx: the input projection x W_ih^T + b_ih
 * (3H for GRU gates r, z, n; 4H for LSTM gates i, f, g, o), gh: h W_hh^T + b_hh (same layout);
 *   GRU:  r = s(x_r + g_r), z = s(x_z + g_z), n = tanh(x_n + r g_n), h := (1 - z) n + z h
 *   LSTM: c := s(x_f + g_f) c + s(x_i + g_i) tanh(x_g + g_g), h := s(x_o + g_o) tanh(c)
 * (s the sigmoid), one pass over the gates in vector lanes. gx and gh are only read. */
void ac_gru_cell_f32(const float *gx, const float *gh, float *h, ac_index H);
void ac_lstm_cell_f32(const float *gx, const float *gh, float *h, float *c, ac_index H);
/* y[i] = GELU(x[i]) (erf, or tanh_form: the tanh approximation), in place allowed, on the AVX2
 * kernels; returns 0 without them (then the caller computes it). */
int ac_gelu_f32(const float *x, float *y, ac_index n, int tanh_form);
/* One row of float32 layer norm (layers.h), the same bits on every ISA. Statistics in float64,
 * one pass: with the shift k = x[0] when center_stats (0 otherwise), the sums of t = x - k and
 * t^2 run in 16 chains (chain j takes d = j mod 16) added in a fixed tree; then
 * mean = k + S1 / D and m2 = S2 / D - (S1 / D)^2 (clamped at 0), or m2 = S2 / D without
 * centring. The shift keeps the difference exact enough: m2's relative error is about
 * (D + 1) * 2^-53, however far the row sits from 0. The output in float32:
 *   y = (((x - c_hi) - c_lo) * inv) * gamma + beta,  c_hi + c_lo = c (the mean when
 * center_output, else 0) split into two floats, inv = 1 / sqrt(m2 + eps): x - c_hi is exact
 * wherever it cancels, so a row far from 0 keeps its digits; a few float32 roundings in all.
 * Rows where float32 would overflow or lose digits (a spread past 2^100 or under 2^-100, or
 * 1 / sqrt(m2 + eps) past 2^50; NaN or inf) take the float64 output:
 * ((double)x - c) * inv * gamma + beta.
 * gamma / beta NULL: 1 / 0. x and y may be the same row. */
void ac_layer_norm_row_f32(const float *x, float *y, const float *gamma, const float *beta,
                           ac_index D, float eps, int center_stats, int center_output);
/* out[j] = scale * (q . k[j, :]) for n_keys rows of k (n_keys, D): the decode score loop. */
void ac_scores_f32(const float *q, const float *k, ac_index n_keys, ac_index D, float scale,
                   float *out);
/* o[:] += sum_j p[j] * v[j, :] over n rows of v (n, D), o kept in registers across rows. */
void ac_weighted_sum_f32(const float *p, const float *v, ac_index n, ac_index D, float *o);
/* out[i * ldo + j] = x[i, :] . w[j, :] (+ bias[j]) for i < M, j0 <= j < j1; x rows ldx apart,
 * w (N, K) row-major (nn.Linear layout). For a few rows (decoding); bit-identical per row
 * whatever M is. */
void ac_small_gemm_f32(const float *x, ac_index ldx, ac_index M, ac_index K, const float *w,
                       ac_index j0, ac_index j1, const float *bias, float *out, ac_index ldo);
/* One step of an online softmax down the columns of s (rows, cols; row stride lds): a tile of
 * transposed scores, one column per query. For each column c, with m the max of col_max[c]
 * and the column, and shift = m (0 when m is -inf: nothing valid yet):
 *   s[:, c] = exp(s[:, c] - shift),  correction[c] = exp(col_max[c] - shift),
 *   col_sum[c] = col_sum[c] * correction[c] + sum of the new s[:, c],  col_max[c] = m.
 * Entries of -inf (masked) become exactly 0; correction is exactly 1 when the max is unchanged.
 * The vector exp is 2^((x - shift) log2(e)) (simd.c's exp2_256, ~2e-7 relative). */
void ac_softmax_cols_update_f32(float *s, ac_index rows, ac_index cols, ac_index lds,
                                float *col_max, float *col_sum, float *correction);
/* numpy.argmax(x[:n]) with x[skip] taken as -inf (skip outside [0, n): none): the index of
 * the first NaN, else of the first maximum; 0 when every entry is -inf. n >= 1. */
ac_index ac_argmax_f32(const float *x, ac_index n, ac_index skip);
/* exp over a row with no shift, in place */
void ac_exp_f32(float *x, ac_index n);

#endif
