/* SPDX-License-Identifier: Apache-2.0 -- fused SDPA, see sdpa.h */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "sdpa.h"
#include "real_ops.h"

/* A flash work item: one query tile (rows i0 .. i0 + nq) of head h of batch element b, which
 * reads kv head g. Items are numbered in (b, h, query tile) order. */
typedef struct {
    ac_index b, h, g, i0, nq;
} flash_item;

static inline flash_item flash_item_at(ac_index item, ac_index n_qtiles, ac_index H,
                                       ac_index group, ac_index block_q, ac_index Lq) {
    flash_item it;
    const ac_index bh = item / n_qtiles;
    it.b = bh / H;
    it.h = bh % H;
    it.g = it.h / group;
    it.i0 = item % n_qtiles * block_q;
    it.nq = AC_MIN(block_q, Lq - it.i0);
    return it;
}

#define REAL float
#define SUF f32
#define GEMM_FN ac_sgemm_fn
#include "sdpa_impl.h"
#undef REAL
#undef SUF
#undef GEMM_FN

#define REAL double
#define SUF f64
#define GEMM_FN ac_dgemm_fn
#include "sdpa_impl.h"
#undef REAL
#undef SUF
#undef GEMM_FN

/* ------------------------------------------------------------ flash on the tile kernel ----- */
#include "simd.h"
#include "tile_gemm.h"

/* the diagonal block's P . V runs in chunks of this many query rows (two of the tile kernel's
 * 6-row blocks), each over the keys its last row sees */
#define CAUSAL_PV_ROWS 12

/* One work item of the tile flash path: query rows i0 .. i0 + nq of one head over the keys
 * [0, tile_limit) (the last row's limit; a rerun passes fewer: causal_next_rerun). */
static void flash_tiles_item(const float *q_tile, const float *k_head, const float *v_head,
                             float *o_tile, ac_index i0, ac_index nq, ac_index tile_limit,
                             ac_index offset, int causal, ac_index D, float scale,
                             ac_index block_q, ac_index block_k, float *qt, float *st,
                             float *col_max, float *col_sum, float *correction) {
    const ac_index G = AC_TILE_GROUP;
    const ac_index nq16 = (nq + G - 1) / G * G;   /* padded queries score 0, unused */
    for (ac_index i = 0; i < nq16; i++) {
        float *panel = qt + (i / G) * D * G + i % G;
        if (i < nq)
            for (ac_index d = 0; d < D; d++) panel[d * G] = q_tile[i * D + d] * scale;
        else
            for (ac_index d = 0; d < D; d++) panel[d * G] = 0.0f;
    }
    for (ac_index i = 0; i < nq16; i++) {
        col_max[i] = -INFINITY;
        col_sum[i] = 0.0f;
    }
    memset(o_tile, 0, sizeof(float) * nq * D);

    for (ac_index j0 = 0; j0 < tile_limit; j0 += block_k) {
        const ac_index nk = AC_MIN(block_k, tile_limit - j0);
        /* keys of this block some query of the tile may not see (causal): the block
         * crossing the diagonal */
        const int diagonal = causal && j0 + nk > i0 + offset + 1;
        /* st (nk, nq16) = k[j0 : j0 + nk] . qt; on the diagonal, each group of 16
         * queries only up to its last query's last key (the rest is masked below) */
        if (!diagonal)
            ac_tile_gemm_f32(nk, nq16, D, k_head + j0 * D, D, 1, qt, G, G * D, st,
                             block_q, 0);
        else
            for (ac_index q0 = 0; q0 < nq16; q0 += G) {
                const ac_index rows = AC_MIN(nk, i0 + q0 + G + offset - j0);
                if (rows > 0)
                    ac_tile_gemm_f32(rows, G, D, k_head + j0 * D, D, 1, qt + q0 * D, G,
                                     G * D, st + q0, block_q, 0);
            }
        if (causal) /* key j is hidden from the queries i < j - offset of the tile */
            for (ac_index jj = 0; jj < nk; jj++) {
                const ac_index hidden = AC_MIN(nq16, j0 + jj - offset - i0);
                for (ac_index i = 0; i < hidden; i++) st[jj * block_q + i] = -INFINITY;
            }
        ac_softmax_cols_update_f32(st, nk, nq16, block_q, col_max, col_sum, correction);
        for (ac_index i = 0; i < nq; i++)
            if (correction[i] != 1.0f) ac_scale_f32(o_tile + i * D, D, correction[i]);
        /* o_tile (nq, D) += P (nq, nk) . v[j0 : j0 + nk], P read from st transposed;
         * on the diagonal, rows in chunks of 12 stop after their last visible key
         * (the terms left out have P = 0: the same sums) */
        if (!diagonal)
            ac_tile_gemm_f32(nq, D, nk, st, 1, block_q, v_head + j0 * D, D, G, o_tile, D,
                             1);
        else
            for (ac_index r0 = 0; r0 < nq; r0 += CAUSAL_PV_ROWS) {
                const ac_index rows = AC_MIN(CAUSAL_PV_ROWS, nq - r0);
                const ac_index keys = AC_MIN(nk, i0 + r0 + rows + offset - j0);
                if (keys > 0)
                    ac_tile_gemm_f32(rows, D, keys, st + r0, 1, block_q, v_head + j0 * D,
                                     D, G, o_tile + r0 * D, D, 1);
            }
    }
    /* sum 0: the query saw no key (zeros); a NaN score (NaN in q or k) makes the sum
     * and the row NaN, as the weights path gives -- never a silent zero row */
    for (ac_index i = 0; i < nq; i++) {
        if (col_sum[i] != 0) ac_scale_f32(o_tile + i * D, D, 1 / col_sum[i]);
        else memset(o_tile + i * D, 0, sizeof(float) * D);
    }
}

int ac_sdpa_flash_tiles_f32(const float *q, const float *k, const float *v, float *out,
                            ac_index B, ac_index H, ac_index Hkv, ac_index Lq, ac_index Lk,
                            ac_index D, const int64_t *kv_lengths, int causal, float scale,
                            ac_index block_q, ac_index block_k, int num_threads) {
    const ac_index G = AC_TILE_GROUP;
    /* tiles past the problem hold one tile either way: the same work split, less scratch */
    block_q = AC_MIN(block_q, (Lq + G - 1) / G * G);
    block_k = AC_MIN(block_k, Lk);
    const ac_index group = H / Hkv;
    const ac_index n_qtiles = (Lq + block_q - 1) / block_q;
    const ac_index n_items = B * H * n_qtiles;
    int status = AC_OK;
#pragma omp parallel num_threads(AC_THREADS(B * H * Lq * Lk * D, num_threads))
    {
        /* per-thread scratch, allocated once per call (block_q is a multiple of 16):
         *   qt      (block_q / 16, D, 16)  the query tile times `scale`, transposed in panels
         *   st      (block_k, block_q)     transposed scores, turned into probabilities in place
         *   col_max, col_sum, correction (block_q)  the online softmax of each query */
        float *qt = (float *)malloc(sizeof(float) * block_q * D);
        float *st = (float *)malloc(sizeof(float) * block_k * block_q);
        float *col_max = (float *)malloc(sizeof(float) * block_q * 3);
        float *col_sum = col_max ? col_max + block_q : NULL;
        float *correction = col_max ? col_max + 2 * block_q : NULL;
        int ok = qt && st && col_max;
        if (!ok) {
#pragma omp atomic write
            status = AC_ERR_NOMEM;
        }
        /* as in the BLAS flash path: costly causal tiles first, one thread per item */
#pragma omp for schedule(dynamic, 1)
        for (ac_index item_rev = 0; item_rev < n_items; item_rev++) {
            if (!ok) continue;
            const flash_item it = flash_item_at(n_items - 1 - item_rev, n_qtiles, H, group,
                                                block_q, Lq);
            const ac_index b = it.b, h = it.h, g = it.g, i0 = it.i0, nq = it.nq;
            const ac_index kv_valid = kv_lengths ? (ac_index)kv_lengths[b] : Lk;
            const ac_index offset = Lk - Lq;   /* causal: query i sees keys j <= i + offset */
            const float *q_tile = q + ((b * H + h) * Lq + i0) * D;
            const float *k_head = k + (b * Hkv + g) * Lk * D;
            const float *v_head = v + (b * Hkv + g) * Lk * D;
            float *o_tile = out + ((b * H + h) * Lq + i0) * D;
            ac_index tile_limit = kv_valid;   /* keys the tile's last query may see */
            if (causal && i0 + nq + offset < tile_limit) tile_limit = i0 + nq + offset;

            flash_tiles_item(q_tile, k_head, v_head, o_tile, i0, nq, tile_limit, offset, causal, D,
                             scale, block_q, block_k, qt, st, col_max, col_sum, correction);
            ac_index r = 0, jb = 0, first, count, cap;
            if (causal && causal_rerun_needed_f32(q_tile, o_tile, nq, D))
                while (causal_next_rerun_f32(v_head, o_tile, i0, nq, Lq, Lk, kv_valid, D,
                                             tile_limit, &r, &jb, &first, &count, &cap))
                    flash_tiles_item(q_tile + first * D, k_head, v_head, o_tile + first * D,
                                     i0 + first, count, cap, offset, causal, D, scale, block_q,
                                     block_k, qt, st, col_max, col_sum, correction);
        }
        free(qt);
        free(st);
        free(col_max);
    }
    return status;
}
