/* SPDX-License-Identifier: Apache-2.0
 *
 * Fused scaled-dot-product attention.
 *
 *   out[b,h,i,:] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,g,j,:]) v[b,g,j,:],  g = h / (H / Hkv)
 *
 * over the keys j that query i may see: j < kv_lengths[b] (all Lk when kv_lengths is NULL) and,
 * when causal, j <= i + (Lk - Lq) (bottom-right alignment: one new token sees the whole cache).
 * A query that sees no key gets a zero output row (never NaN).
 *
 * Layouts: q (B, H, Lq, D), k and v (B, Hkv, Lk, D), out (B, H, Lq, D), all C-contiguous.
 *
 * Three strategies, chosen by the caller from the shapes only (never from the thread count, so
 * results are bit-identical for every thread count):
 *   - flash:    tiles of BQ queries x BK keys with an online softmax (running max, running sum,
 *               rescale); scores live in a BQ x BK per-thread tile, never B x H x Lq x Lk.
 *               Parallel over (batch, head, query tile). Both products go to BLAS gemm as
 *               NN products: K is first transposed per head into (B, Hkv, D, Lk) scratch (the
 *               size of K), so that BLAS may run small tiles without packing the operands.
 *               On AVX2 and AVX-512 machines float32 takes ac_sdpa_flash_tiles_f32 below.
 *   - split-KV: for decoding (few queries, long cache): the keys are cut in fixed chunks, each
 *               (batch, head, chunk) is one parallel work item producing a partial (max, sum,
 *               unnormalised output); partials are merged in chunk order by log-sum-exp.
 *               It takes a dense mask too (ac_sdpa_mask below, NULL: none): a chunk a row
 *               keeps nothing of is skipped, left-out scores are -inf, and a chunk whose sum
 *               a left-out non-finite value poisoned (0 x NaN) is summed again without it.
 *   - weights:  materialises the normalised weights (B, H, Lq, Lk) when the caller asks for them.
 *               With out NULL (v unread) it writes the weights alone: attncore's callers take
 *               the output from flash or split-KV as they would without weights, so asking
 *               for the weights never changes an output bit (the output of weights . v, a
 *               BLAS product whose rounding followed Lk, moved a Transformer's logits with the
 *               padding of the batch on AVX-512 machines).
 */
#ifndef ATTNCORE_SDPA_H
#define ATTNCORE_SDPA_H
#include "attncore.h"

/* A dense boolean mask over (B, H, Lq, Lk): entry (b, h, i, j) at keep[b * sb + h * sh + i * si
 * + j * sj] (strides in bytes, any sign, 0 where the caller's mask broadcasts); nonzero = the
 * query may see the key. */
typedef struct {
    const unsigned char *keep;
    ac_index sb, sh, si, sj;
} ac_sdpa_mask;

#define AC_SDPA_DECLARE(SUF, REAL, GEMM_FN)                                                        \
    int ac_sdpa_flash_##SUF(const REAL *q, const REAL *k, const REAL *v, REAL *out, ac_index B,  \
                            ac_index H, ac_index Hkv, ac_index Lq, ac_index Lk, ac_index D,      \
                            const int64_t *kv_lengths, int causal, const ac_sdpa_mask *mask,     \
                            REAL scale, ac_index block_q, ac_index block_k, GEMM_FN gemm,        \
                            int num_threads);                                                    \
    int ac_sdpa_splitkv_##SUF(const REAL *q, const REAL *k, const REAL *v, REAL *out, ac_index B,\
                              ac_index H, ac_index Hkv, ac_index Lq, ac_index Lk, ac_index D,    \
                              const int64_t *kv_lengths, int causal, const ac_sdpa_mask *mask,   \
                              REAL scale, ac_index chunk, int num_threads);                      \
    int ac_sdpa_weights_##SUF(const REAL *q, const REAL *k, const REAL *v, REAL *out,            \
                              REAL *weights, ac_index B, ac_index H, ac_index Hkv, ac_index Lq,  \
                              ac_index Lk, ac_index D, const int64_t *kv_lengths, int causal,    \
                              REAL scale, GEMM_FN gemm, int num_threads);

AC_SDPA_DECLARE(f32, float, ac_sgemm_fn)
AC_SDPA_DECLARE(f64, double, ac_dgemm_fn)

/* The flash path with both tile products on tile_gemm.h's kernel (float32, where
 * ac_tile_gemm_available()). The scores of a tile are computed transposed, keys x queries
 * (st = K_tile . (scale Q_tile)^T), so that only the query tile is transposed, once per tile
 * of queries, and the online softmax runs down the columns, one query per vector lane
 * (simd.h's ac_softmax_cols_update_f32). No scratch grows with the sequence: a few
 * block_k x block_q tiles per thread. block_q must be a multiple of 16. */
int ac_sdpa_flash_tiles_f32(const float *q, const float *k, const float *v, float *out,
                            ac_index B, ac_index H, ac_index Hkv, ac_index Lq, ac_index Lk,
                            ac_index D, const int64_t *kv_lengths, int causal, float scale,
                            ac_index block_q, ac_index block_k, int num_threads);

/* ac_sdpa_flash_tiles_f32 with a dense mask on top of kv_lengths and causal (mask NULL: none).
 * Each block of block_q queries x block_k keys is classified from the mask first: a block
 * with no kept entry is skipped (computing it would add exactly nothing), a block with every
 * entry kept runs as without a mask, and a mixed one has its left-out scores set to -inf.
 * A value row weighs exactly 0 where it is left out, but 0 x NaN = NaN: the values must be
 * finite (attention zeroes, in a copy, the ones no query keeps, and sends a call with a
 * non-finite value some query keeps to its chunked path). The BLAS flash path
 * (ac_sdpa_flash_f32 / _f64) takes a mask the same way. */
int ac_sdpa_flash_tiles_masked_f32(const float *q, const float *k, const float *v, float *out,
                                   ac_index B, ac_index H, ac_index Hkv, ac_index Lq,
                                   ac_index Lk, ac_index D, const int64_t *kv_lengths,
                                   int causal, const ac_sdpa_mask *mask, float scale,
                                   ac_index block_q, ac_index block_k, int num_threads);

#endif
