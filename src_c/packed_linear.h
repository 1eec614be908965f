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
 *
 * Panels are stored in float32 or in bfloat16 (the upper half of a float32: the weight rounded
 * to nearest, ties to even). A decoding step at batch 1 is bound by streaming its weights, and
 * bfloat16 halves the bytes. Products convert each bfloat16 weight back to float32 exactly and
 * run the same FMA chains, so bfloat16 panels give the bits float32 panels of the rounded
 * weight give, on every path (activations stay float32).
 */
#ifndef ATTNCORE_PACKED_LINEAR_H
#define ATTNCORE_PACKED_LINEAR_H
#include "attncore.h"

#define AC_PANEL_WIDTH 64

/* Number of panels for N outputs. */
static inline ac_index ac_panel_count(ac_index N) { return (N + AC_PANEL_WIDTH - 1) / AC_PANEL_WIDTH; }

/* How panels are stored (the panel_type arguments below). */
enum { AC_PANELS_F32 = 0, AC_PANELS_BF16 = 1, AC_PANELS_I8 = 2 };

/* The bfloat16 nearest to a float32 (ties to even), as its 16 bits; NaN stays NaN, a finite
 * value past the largest bfloat16 (~3.39e38) becomes infinity. */
static inline uint16_t ac_bf16_from_f32(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* quiet NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* y[i] = x[i] rounded to the nearest bfloat16, as a float32 (x and y may be the same). */
void ac_round_bf16_f32(const float *x, float *y, ac_index n);

/* panels (ac_panel_count(N), K, 64) <- w (N, K) row-major, zero-padded past N. */
void ac_pack_panels_f32(const float *w, ac_index N, ac_index K, float *panels);

/* The same panels in bfloat16 (ac_bf16_from_f32 of each weight). Within row k of a panel the
 * 64 values are stored in pairs, (column c, column c + 16) for c < 16, then (32 + c, 48 + c):
 * one 32-bit word holds two weights, and a shift (low half) or a mask (high half) turns a
 * vector of words into a vector of float32 weights. */
void ac_pack_panels_bf16(const float *w, ac_index N, ac_index K, uint16_t *panels);

/* int8 panels (packed_int8.c). Each output j keeps its weights as int8, W[j, k] ~ scale[j] *
 * Wq[j, k] with scale[j] = max_k |W[j, k]| / 127 and Wq = round(W / scale[j]) (half to even);
 * a product quantizes each row of x the same way (scale_x[i], Xq in [-127, 127]) and computes
 *
 *     out[i, j] = fma((float)(sum_k Xq[i, k] Wq[j, k]), scale_x[i] * scale[j], bias[j])
 *
 * with the sum in exact int32 arithmetic: the same bits on every kernel, for every row blocking,
 * batch and thread count (where scale_x[i] * scale[j] overflows or is subnormal in float32, that
 * output is (float)(sum * ((double)scale_x[i] * scale[j]) + bias[j]) instead). A row of x
 * holding NaN or infinity gives NaN outputs. A panel is
 * ac_i8_panel_rows(K) rows of 64 bytes: for each group g of 4 k values (K padded with zeros to
 * a multiple of 64, an AMX tile's k step), 64 columns x 4 bytes (byte 4c + t is
 * Wq[64b + c, 4g + t]; one 32-bit lane of a vector holds a column's 4 weights), then 64 float32
 * scales, the 64 int32 sums sum_k Wq[j, k] (the VNNI kernel multiplies Xq + 128 as unsigned
 * bytes and takes 128 sum_k Wq[j, k] back off), and a last row starting with K as an int32: the
 * padding makes panels of every K in 64 values the same size, so products check it (panels of
 * another K give NaN outputs; the Cython fronts refuse them first). The first panel's last row
 * holds after K the weight's largest and smallest non-zero scale[j] (two float32): a product
 * tests its rows against them for the double finish once, not every output. In features are limited to
 * AC_I8_MAX_K, so that int32 sums cannot overflow and a quantized row fits the kernel's 64 KiB
 * buffer (or, without memory for it, a 32 KiB one on the stack, a row at a time);
 * ac_pack_panels_i8 leaves zero panels past it, and
 * expects finite weights (its callers check). */
#define AC_I8_MAX_K 32768
static inline ac_index ac_i8_panel_rows(ac_index K) { return (K + 63) / 64 * 64 + 9; }
void ac_pack_panels_i8(const float *w, ac_index N, ac_index K, int8_t *panels);
/* 1 where the int8 products run on AVX-512 VNNI, 0 where they run a portable loop (much slower:
 * for speed, int8 needs an AVX-512 VNNI machine). */
int ac_int8_vnni(void);
/* 1 where products of 2 rows or more run on AMX tiles (x86-64 AMX-INT8 CPUs whose kernel
 * grants the tile state, asked on the first call; ATTNCORE_FORCE_ISA=avx512 turns it off): the
 * same int32 sums, 16 rows x 16 columns x 64 k values an instruction, in blocks of 16 rows (a
 * last block of 2 to 15 too, its tile reading rows of the buffer past it); a last single row
 * runs VNNI, and so do all rows where K padded is over 4096 (16 rows would not fit the 64 KiB
 * buffer). */
int ac_int8_amx(void);
/* out (M, N) = x . W^T (+ bias) on int8 panels, as above; threads split the panels. */
void ac_packed_linear_i8(const float *x, ac_index ldx, ac_index M, ac_index K,
                         const int8_t *panels, ac_index N, const float *bias, float *out,
                         ac_index ldo, int num_threads);

/* out (M, N; row stride ldo) = x (M, K; row stride ldx) . W^T (+ bias), on num_threads threads.
 *
 * Up to ac_packed_panel_max_rows() rows run the panel kernel above, threads splitting the
 * panels: AC_PACKED_PANEL_MAX_M rows with the AVX2 or AVX-512 kernels, whose row blocks keep
 * both FMA pipes busy at any row count (on the AVX2 machine of bench/RESULTS.md they ran the
 * seq2seq step's products at 40 GMAC/s from 3 to 256 rows, where BLAS on the panels ran 14-36),
 * AC_PACKED_SCALAR_MAX_M with the scalar one. So within that range a row's bits do not depend on
 * the other rows: a sentence gives the same result alone or in a batch.
 *
 * More rows (a whole source's projection) run per (row tile, panel), the panel read in place as
 * a row-major (K, 64) matrix: on the AVX2 / AVX-512 kernels by tile_gemm.h's kernel, whose outputs are
 * the same FMA chains as the panel kernel's (so on those machines a row's bits never depend on
 * the other rows; 39-42 GMAC/s at 300-1536 rows on the machine of bench/RESULTS.md session 8,
 * where BLAS packing each panel ran 26-35), elsewhere as single-threaded `sgemm` calls.
 * small_gemm_macs > 0 says the
 * BLAS runs products of at most that many multiply-adds without packing their operands
 * (OpenBLAS's small-matrix kernel): then each call stays under it (K in chunks of 256,
 * accumulated); 0: tiles of at most AC_PACKED_TILE_M rows over the whole K. Row tiles are equal,
 * and threads split the panels (each with all its row tiles). bfloat16 panels take the same
 * path: the BLAS products read a float32 copy of each panel (of the K range of one call),
 * converted by the thread that runs it.
 *
 * The work split depends on the shapes (and the SIMD level, fixed per process) only, so the
 * bits do not depend on num_threads. int8 panels (panel_type AC_PANELS_I8) run
 * ac_packed_linear_i8 at any M. */
#define AC_PACKED_PANEL_MAX_M 256
#define AC_PACKED_SCALAR_MAX_M 16
#define AC_PACKED_TILE_M 256
ac_index ac_packed_panel_max_rows(void);
void ac_packed_linear_rows(const float *x, ac_index ldx, ac_index M, ac_index K,
                           const void *panels, int panel_type, ac_index N, const float *bias,
                           float *out, ac_index ldo, ac_sgemm_fn sgemm,
                           ac_index small_gemm_macs, int num_threads);

#endif
