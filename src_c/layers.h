/* SPDX-License-Identifier: Apache-2.0
 *
 * Row-wise and element-wise layer kernels (float32 and float64):
 *
 *  ac_layer_norm:  y = gamma * (x - c) / sqrt(m2 + eps) + beta over rows of length D, where
 *      mode AC_NORM_STANDARD:  c = mean(x), m2 = mean((x - mean)^2)   (the usual LayerNorm)
 *      mode AC_NORM_UNCENTRED: c = mean(x), m2 = mean(x^2)            (RAN / langml LayerNorm)
 *      mode AC_NORM_RMS:       c = 0,       m2 = mean(x^2)            (RMSNorm)
 *    gamma / beta may be NULL (then 1 / 0). float64: two passes of float64 sums; float32: a row
 *    goes through simd.h's ac_layer_norm_row_f32 (one float64 pass over the row shifted by its
 *    first element, the output in float32 arithmetic; the same bits on every instruction set).
 *  ac_activation: y = f(x) element-wise, f one of AC_ACT_*; parallel over fixed chunks.
 *  ac_rotary: interleaved rotary embedding in place over x (N, L, D): for pair i of position
 *    p = positions[l], theta = p * base^(-2i/D): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
 *  ac_embedding: out[r, :] = table[ids[r], :].
 *  ac_swap_last_axes: y (P, B, A) = x (P, A, B) transposed in its last two axes (blocked).
 */
#ifndef ATTNCORE_LAYERS_H
#define ATTNCORE_LAYERS_H
#include "attncore.h"

enum { AC_NORM_STANDARD = 0, AC_NORM_UNCENTRED = 1, AC_NORM_RMS = 2 };
enum { AC_ACT_RELU = 0, AC_ACT_GELU = 1, AC_ACT_GELU_TANH = 2, AC_ACT_SWISH = 3,
       AC_ACT_TANH = 4, AC_ACT_SIGMOID = 5 };

#define AC_LAYERS_DECLARE(SUF, REAL)                                                             \
    void ac_layer_norm_##SUF(const REAL *x, REAL *y, const REAL *gamma, const REAL *beta,        \
                             ac_index rows, ac_index D, REAL eps, int mode, int num_threads);    \
    void ac_activation_##SUF(const REAL *x, REAL *y, ac_index n, int kind, int num_threads);     \
    void ac_rotary_##SUF(REAL *x, const int64_t *positions, ac_index N, ac_index L, ac_index D,  \
                         double base, int num_threads);                                          \
    void ac_embedding_##SUF(const REAL *table, const int64_t *ids, REAL *out, ac_index rows,     \
                            ac_index D, int num_threads);                                        \
    void ac_swap_last_axes_##SUF(const REAL *x, REAL *y, ac_index P, ac_index A, ac_index B,     \
                                 int num_threads);

AC_LAYERS_DECLARE(f32, float)
AC_LAYERS_DECLARE(f64, double)
#endif
