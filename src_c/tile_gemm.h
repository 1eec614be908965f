/* SPDX-License-Identifier: Apache-2.0
 *
 * The two products of a flash-attention tile, scores = Q . K^T and out += P . V, without BLAS.
 *
 * Why: an attention tile is a few hundred KiB of work on operands already in L1/L2. OpenBLAS's
 * Haswell kernels (the AVX2 machines of bench/RESULTS.md, which have no small-matrix kernel)
 * copy both operands into packed buffers on every call; `perf` put ~12% of a 128-token prefill
 * there. This kernel reads the operands where they are: A(i, k) = a[i * lda + k * ak] (one
 * element broadcast per row and k: row-major K, or the transposed probabilities P^T), B as
 * 16-column groups whose k rows are `ldb` apart and whose groups are `group` apart (row-major
 * V: group 16, ldb D; queries transposed into panels of 16: group 16 * D, ldb 16).
 *
 *   C (m x n, row stride ldc) = A (m x kk) . B (kk x n)      (+ C when accumulate)
 *
 * AVX2: blocks of 6 rows x 16 columns, 12 accumulators (the 6x16 register block of BLIS's
 * Haswell kernel). AVX-512: 8 rows x 32 columns (two groups), 16 accumulators. Each output is
 * one FMA chain over k = 0 .. kk-1 in order, started from 0 or from C, whatever m, n, the
 * blocking or the instruction set: the bits of a row do not depend on the other rows, and the
 * AVX2, AVX-512 and scalar versions give the same bits.
 *
 * `target` attributes (the build stays portable), with a scalar fallback of the same chains for
 * machines without AVX2; callers check ac_tile_gemm_available() and otherwise use BLAS.
 */
#ifndef ATTNCORE_TILE_GEMM_H
#define ATTNCORE_TILE_GEMM_H
#include "attncore.h"

#define AC_TILE_GROUP 16
/* ac_tile_matmul_f32 copies op(B) this many columns at a time */
#define AC_TILE_MATMUL_COLS 64
#define AC_TILE_INPLACE_MAX_LDB 256

/* 1 when this process runs the AVX2 or AVX-512 kernels (simd.h's level 1 or 2): the flash path,
 * float32 matmul / linear and the packed products past the panel kernel's rows then use this
 * kernel. Until session 11 AVX-512 machines took SciPy's OpenBLAS (its SkylakeX small-matrix
 * kernel runs tile products unpacked at twice the AVX2 width: 91-107 GFLOP/s of flash on the
 * 16-core Xeon of session 8, 65-72 on the AVX2 kernel); the AVX-512 version runs matmul /
 * linear 1.1-2.0x faster than that BLAS (bench/RESULTS.md, session 11) and gives AVX-512
 * machines the AVX2 machines' row-independent bits. */
int ac_tile_gemm_available(void);

void ac_tile_gemm_f32(ac_index m, ac_index n, ac_index kk, const float *a, ac_index lda,
                      ac_index ak, const float *b, ac_index ldb, ac_index group, float *c,
                      ac_index ldc, int accumulate);

/* Columns [j0, j1) of C (m x n, row stride ldc) = alpha * A (m x kk, row stride lda) . op(B)
 * (+ bias (n), NULL: none), op(B) = B stored (kk x n, row stride ldb), or with trans_b B^T of B
 * stored (n x kk, row stride ldb): a plain row-major product, for BLAS-shaped callers
 * (attncore.matmul, linear).
 *
 * B's rows at most AC_TILE_INPLACE_MAX_LDB floats apart (1 KiB) are read in place, as the
 * flash path reads V. Wider B, and every B^T, is first copied 64 columns at a time into panels
 * of 16 (kk x 16 contiguous each) in a buffer of the calling thread's (kk * AC_TILE_MATMUL_COLS
 * floats, kept for its next call): in place, a group whose rows lie 2-4 KiB or more apart falls
 * on few L2 sets or a new page per row, and ran at 10-35 GMAC/s (n = 512-4000 columns) where
 * the copied panels ran 34-45 at every shape measured (this machine, session 9; Haswell BLAS
 * 9-39). Each output is the kernel's one FMA chain over k, times alpha when alpha != 1, plus
 * its bias: the bits do not depend on j0, j1, m or the copy. */
int ac_tile_matmul_f32(ac_index m, ac_index j0, ac_index j1, ac_index kk, float alpha,
                       const float *a, ac_index lda, const float *b, ac_index ldb, int trans_b,
                       const float *bias, float *c, ac_index ldc); /* AC_OK, or AC_ERR_NOMEM (no buffer) */

#endif
