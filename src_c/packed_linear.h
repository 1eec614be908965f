/* SPDX-License-Identifier: Apache-2.0
 *
 * The product of a decoding step, y = x . W^T + b for a few rows of x, on a weight packed once
 * at model load.
 *
 * Why: a decoding step multiplies a handful of rows (the live sentences) by every weight matrix
 * of the decoder. A GEMM library packs the weights on every call, which at that size costs as
 * much as the product; a dot-product kernel on the nn.Linear layout (simd.c, small_gemm) needs
 * one horizontal reduction per output, which dominates once there are more than a few rows.
 * Packed panels fix both: the weight (N, K) is stored as ceil(N / 64) panels of K x 64 (panel
 * b holds W[64b : 64b + 64, :]^T, zero-padded past N), so a step reads each panel as one
 * sequential stream and accumulates 64 outputs of a row in vector lanes, broadcasting x[i, k].
 *
 * Every output is one FMA chain over k = 0 .. K-1 in order, then + bias: a row gives the same
 * bits whatever the other rows are and however rows are blocked (a sentence alone or in a
 * batch), and the AVX-512 and AVX2 versions give the same bits as each other.
 */
#ifndef ATTNCORE_PACKED_LINEAR_H
#define ATTNCORE_PACKED_LINEAR_H
#include "attncore.h"

#define AC_PANEL_WIDTH 64

/* Number of panels for N outputs. */
static inline ac_index ac_panel_count(ac_index N) { return (N + AC_PANEL_WIDTH - 1) / AC_PANEL_WIDTH; }

/* panels (ac_panel_count(N), K, 64) <- w (N, K) row-major, zero-padded past N. */
void ac_pack_panels_f32(const float *w, ac_index N, ac_index K, float *panels);

/* out[i * ldo + j] = x[i * ldx : +K] . W[j] (+ bias[j]) for i < M and j in panels [b0, b1)
 * (j < N). */
void ac_packed_linear_f32(const float *x, ac_index ldx, ac_index M, ac_index K,
                          const float *panels, ac_index N, ac_index b0, ac_index b1,
                          const float *bias, float *out, ac_index ldo);

/* out (M, N; row stride ldo) = x (M, K; row stride ldx) . W^T (+ bias), on num_threads threads:
 * up to AC_PACKED_SMALL_M rows (decoding steps) on the panel kernel above, threads splitting the
 * panels; more rows as single-threaded `sgemm` calls per (row tile, panel), the panel read in
 * place as a row-major (K, 64) matrix. small_gemm_macs > 0 says the BLAS runs products of at
 * most that many multiply-adds without packing their operands (OpenBLAS's small-matrix kernel):
 * then each call stays under it (K in chunks of 256, accumulated); 0: tiles of at most
 * AC_PACKED_TILE_M rows over the whole K. Row tiles are equal, and threads split the panels
 * (each with all its row tiles). The work split depends on the shapes only, so the bits
 * do not depend on num_threads. */
#define AC_PACKED_SMALL_M 16
#define AC_PACKED_TILE_M 256
void ac_packed_linear_rows_f32(const float *x, ac_index ldx, ac_index M, ac_index K,
                               const float *panels, ac_index N, const float *bias, float *out,
                               ac_index ldo, ac_sgemm_fn sgemm, ac_index small_gemm_macs,
                               int num_threads);

#endif
