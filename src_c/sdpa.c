/* SPDX-License-Identifier: Apache-2.0 -- fused SDPA, see sdpa.h */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "sdpa.h"
#include "real_ops.h"
#ifdef __SSE2__
#include <emmintrin.h>
#endif

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

/* The n <= 64 lowest bits set: left_out_bits of n entries all left out. */
static inline uint64_t low_bits(ac_index n) {
    return n == 64 ? ~(uint64_t)0 : ((uint64_t)1 << n) - 1;
}

#ifdef __SSE2__
/* 0xFF in each of the 16 bytes at p that leaves its entry out (0), else 0 */
static inline __m128i left_out_16(const unsigned char *p) {
    return _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)p), _mm_setzero_si128());
}
#endif

/* Bit t set where the mask leaves out entry t of the n <= 64 at p, p + sj, ... */
static inline uint64_t left_out_bits(const unsigned char *p, ac_index sj, ac_index n) {
    uint64_t bits = 0;
    ac_index t = 0;
    if (sj == 0) /* (a mask broadcast along the keys) */
        return p[0] ? 0 : low_bits(n);
#ifdef __SSE2__
    if (sj == 1) /* 16 bytes a compare (SSE2: every x86-64 build) */
        for (; t + 16 <= n; t += 16)
            bits |= (uint64_t)(uint16_t)_mm_movemask_epi8(left_out_16(p + t)) << t;
#endif
    for (; t < n; t++) bits |= (uint64_t)(p[t * sj] == 0) << t;
    return bits;
}

/* The keys of a mask row (n entries at keep, stride sj) up to its last kept one: 0 when it
 * keeps none. */
static ac_index mask_row_extent(const unsigned char *keep, ac_index sj, ac_index n) {
    for (ac_index j0 = (n - 1) / 64 * 64; j0 >= 0; j0 -= 64) {
        const ac_index m = AC_MIN(64, n - j0);
        const uint64_t kept = ~left_out_bits(keep + j0 * sj, sj, m) & low_bits(m);
        if (kept) return j0 + 64 - __builtin_clzll(kept);
    }
    return 0;
}

/* What a dense mask (ac_sdpa_mask) keeps of one block of nq query rows x nk keys, `keep`
 * pointing at its first entry: nothing, everything, or some of it. */
enum { MASK_NONE_KEPT, MASK_ALL_KEPT, MASK_MIXED };

static int mask_block_state(const unsigned char *keep, ac_index si, ac_index sj, ac_index nq,
                            ac_index nk) {
    if (si == 1 && sj != 1) /* stored along the queries (a transposed view): read that way */
        return mask_block_state(keep, sj, si, nk, nq);
    int any_kept = 0, any_left_out = 0;
    for (ac_index i = 0; i < nq; i++) {
        for (ac_index j0 = 0; j0 < nk; j0 += 64) {
            const ac_index n = AC_MIN(64, nk - j0);
            const uint64_t bits = left_out_bits(keep + i * si + j0 * sj, sj, n);
            any_left_out |= bits != 0;
            any_kept |= bits != low_bits(n);
        }
        if (any_kept && any_left_out) return MASK_MIXED;
        if (si == 0) break;   /* (a mask broadcast over queries: every row is this one) */
    }
    return !any_kept ? MASK_NONE_KEPT : !any_left_out ? MASK_ALL_KEPT : MASK_MIXED;
}

/* A dense mask as one work item reads it: `keep` at (its first row, key 0), the strides, and
 * the states (mask_block_state) of its key blocks when they were classified beforehand, else
 * NULL (each block is classified as it comes). */
typedef struct {
    const unsigned char *keep;
    ac_index si, sj;
    const unsigned char *states;
} item_mask;

/* The state (mask_block_state) of the item's key block `block`, keys j0 .. j0 + nk of its nq
 * rows: from the table classified beforehand, else classified here. */
static inline int item_block_state(const item_mask *m, ac_index block, ac_index j0,
                                   ac_index nq, ac_index nk) {
    return m->states ? m->states[block]
                     : mask_block_state(m->keep + j0 * m->sj, m->si, m->sj, nq, nk);
}

/* The states (mask_block_state) of a flash call's (query tile, key block) pairs, for each
 * batch entry and head the mask has: one entry for all the batch (heads) where the mask
 * broadcasts over them, so that a (Lq, Lk) mask is classified once, not once per head. */
typedef struct {
    unsigned char *states;   /* NULL: no mask, or no room (items classify their own blocks) */
    ac_index mask_b, mask_h, n_qtiles, n_ktiles;
} mask_states;

static mask_states mask_states_build(const ac_sdpa_mask *mask, ac_index B, ac_index H,
                                     ac_index Lq, ac_index Lk, ac_index block_q,
                                     ac_index block_k, int num_threads) {
    mask_states ms = {NULL, 1, 1, (Lq + block_q - 1) / block_q, (Lk + block_k - 1) / block_k};
    if (!mask) return ms;
    ms.mask_b = mask->sb ? B : 1;
    ms.mask_h = mask->sh ? H : 1;
    const ac_index rows = ms.mask_b * ms.mask_h * ms.n_qtiles;
    ms.states = (unsigned char *)malloc((size_t)(rows * ms.n_ktiles));
    if (!ms.states) return ms;
#pragma omp parallel for schedule(static) num_threads(AC_THREADS(rows * block_q * Lk, num_threads))
    for (ac_index row = 0; row < rows; row++) {
        const ac_index bh = row / ms.n_qtiles, i0 = row % ms.n_qtiles * block_q;
        const unsigned char *keep = mask->keep + bh / ms.mask_h * mask->sb
                                    + bh % ms.mask_h * mask->sh + i0 * mask->si;
        for (ac_index kt = 0; kt < ms.n_ktiles; kt++) {
            const ac_index j0 = kt * block_k;
            ms.states[row * ms.n_ktiles + kt] = (unsigned char)mask_block_state(
                keep + j0 * mask->sj, mask->si, mask->sj, AC_MIN(block_q, Lq - i0),
                AC_MIN(block_k, Lk - j0));
        }
    }
    return ms;
}

/* The mask of the work item (b, h, the query tile from row i0) */
static item_mask item_mask_at(const ac_sdpa_mask *mask, const mask_states *ms, ac_index b,
                              ac_index h, ac_index i0, ac_index block_q) {
    item_mask m = {NULL, 0, 0, NULL};
    if (!mask) return m;
    m.keep = mask->keep + b * mask->sb + h * mask->sh + i0 * mask->si;
    m.si = mask->si;
    m.sj = mask->sj;
    if (ms->states) {
        const ac_index mb = ms->mask_b > 1 ? b : 0, mh = ms->mask_h > 1 ? h : 0;
        m.states = ms->states + ((mb * ms->mask_h + mh) * ms->n_qtiles + i0 / block_q)
                                    * ms->n_ktiles;
    }
    return m;
}

/* The keys [0, limit) an item of nq rows under mask m needs: up to the last key one of its
 * rows keeps. A padding mask thus bounds an item's keys as kv_lengths does, and its last key
 * block's products have the same sizes (BLAS rounds a product by its sizes). */
static ac_index item_mask_limit(const item_mask *m, ac_index nq, ac_index limit,
                                ac_index block_k) {
    for (ac_index j_end = limit; j_end > 0;) {
        const ac_index j0 = (j_end - 1) / block_k * block_k;
        if (!m->states || m->states[j0 / block_k] != MASK_NONE_KEPT) {
            ac_index extent = 0;
            for (ac_index i = 0; i < nq && extent < j_end - j0; i++) {
                extent = AC_MAX(extent, mask_row_extent(m->keep + i * m->si + j0 * m->sj, m->sj,
                                                        j_end - j0));
                if (m->si == 0) break;   /* (every row is this one) */
            }
            if (extent) return j0 + extent;
        }
        j_end = j0;
    }
    return 0;
}

/* The mask of rows [first, ...) of an item (a causal rerun): its blocks classified as they
 * come */
static item_mask item_mask_rows(const item_mask *m, ac_index first) {
    item_mask rows = {m->keep ? m->keep + first * m->si : NULL, m->si, m->sj, NULL};
    return rows;
}

#ifdef __SSE2__
/* The 16 bytes of b (0xFF / 0), each widened to a 32-bit lane: four vectors of four */
static inline void widen_bytes_32(__m128i b, __m128i lanes[4]) {
    const __m128i lo = _mm_unpacklo_epi8(b, b), hi = _mm_unpackhi_epi8(b, b);
    lanes[0] = _mm_unpacklo_epi16(lo, lo);
    lanes[1] = _mm_unpackhi_epi16(lo, lo);
    lanes[2] = _mm_unpacklo_epi16(hi, hi);
    lanes[3] = _mm_unpackhi_epi16(hi, hi);
}

/* s[0..15] = -inf where the bytes of left_out (0xFF / 0) say so (float32) */
static inline void set_minus_inf_16_f32(float *s, __m128i left_out) {
    const __m128 minus_inf = _mm_set1_ps(-INFINITY);
    __m128i lanes[4];
    widen_bytes_32(left_out, lanes);
    for (int c = 0; c < 4; c++) {
        const __m128 m = _mm_castsi128_ps(lanes[c]);
        _mm_storeu_ps(s + 4 * c, _mm_or_ps(_mm_and_ps(m, minus_inf),
                                           _mm_andnot_ps(m, _mm_loadu_ps(s + 4 * c))));
    }
}

/* the same for 16 doubles: each 32-bit lane widened again to 64 bits */
static inline void set_minus_inf_16_f64(double *s, __m128i left_out) {
    const __m128d minus_inf = _mm_set1_pd(-INFINITY);
    __m128i quads[4];
    widen_bytes_32(left_out, quads);
    for (int c = 0; c < 4; c++) {
        const __m128d m[2] = {_mm_castsi128_pd(_mm_unpacklo_epi32(quads[c], quads[c])),
                              _mm_castsi128_pd(_mm_unpackhi_epi32(quads[c], quads[c]))};
        for (int h = 0; h < 2; h++) {
            double *t = s + 4 * c + 2 * h;
            _mm_storeu_pd(t, _mm_or_pd(_mm_and_pd(m[h], minus_inf),
                                       _mm_andnot_pd(m[h], _mm_loadu_pd(t))));
        }
    }
}
#endif

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

/* mask_scores on the rows [i0, i1) x keys [j0, j1) of a block: each query row's left-out
 * keys found 64 at a time as bits, and only those entries written. */
static void mask_scores_by_rows(float *st, ac_index ldst, const unsigned char *keep,
                                ac_index si, ac_index sj, ac_index i0, ac_index i1, ac_index j0,
                                ac_index j1) {
    for (ac_index i = i0; i < i1; i++)
        for (ac_index j = j0; j < j1; j += 64) {
            uint64_t bits = left_out_bits(keep + i * si + j * sj, sj, AC_MIN(64, j1 - j));
            for (; bits; bits &= bits - 1)
                st[(j + __builtin_ctzll(bits)) * ldst + i] = -INFINITY;
        }
}

#ifdef __SSE2__
/* r[t] = byte t of each of the 16 rows r[0..15]: a 16 x 16 byte transpose in four rounds of
 * interleaves (pairs of rows, then 4, 8 and 16 rows per column). */
static inline void transpose_16x16_bytes(__m128i r[16]) {
    __m128i t[16], u[16], v[16];
    for (int k = 0; k < 8; k++) {   /* rows 2k, 2k+1: columns 0-7, 8-15 */
        t[2 * k] = _mm_unpacklo_epi8(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm_unpackhi_epi8(r[2 * k], r[2 * k + 1]);
    }
    for (int g = 0; g < 4; g++) {   /* rows 4g .. 4g+3: columns 0-3, 4-7, 8-11, 12-15 */
        u[4 * g] = _mm_unpacklo_epi16(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm_unpackhi_epi16(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm_unpacklo_epi16(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm_unpackhi_epi16(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int h = 0; h < 2; h++)     /* rows 8h .. 8h+7: columns in pairs */
        for (int c = 0; c < 4; c++) {
            v[8 * h + 2 * c] = _mm_unpacklo_epi32(u[8 * h + c], u[8 * h + 4 + c]);
            v[8 * h + 2 * c + 1] = _mm_unpackhi_epi32(u[8 * h + c], u[8 * h + 4 + c]);
        }
    for (int c = 0; c < 8; c++) {   /* all 16 rows: columns 2c, 2c+1 */
        r[2 * c] = _mm_unpacklo_epi64(v[c], v[8 + c]);
        r[2 * c + 1] = _mm_unpackhi_epi64(v[c], v[8 + c]);
    }
}

#endif

/* The scores st (nk keys x nq queries, row stride ldst) of the entries the mask leaves out
 * set to -inf (`keep` at the block's first entry). st runs along the queries, a mask mostly
 * along the keys. With SSE2 and a mask contiguous along the keys, 16 x 16 squares are
 * transposed in registers and st written a row of 16 queries at a time (a mask contiguous
 * along the queries is read as it lies); the rest row by row (mask_scores_by_rows). (A
 * scalar loop over every entry, branching on each byte, had cost a random mask more than the
 * block's two products; writing only the left-out entries down the columns of st, half as
 * much.) */
static void mask_scores(float *st, ac_index ldst, const unsigned char *keep, ac_index si,
                        ac_index sj, ac_index nq, ac_index nk) {
    if (si == 0) {   /* each key kept or left out for every query: whole rows of st */
        for (ac_index jj = 0; jj < nk; jj++)
            if (!keep[jj * sj])
                for (ac_index i = 0; i < nq; i++) st[jj * ldst + i] = -INFINITY;
        return;
    }
    ac_index rows = 0, keys = 0;   /* the squares cover [0, rows) x [0, keys) */
#ifdef __SSE2__
    if (si == 1 && sj != 1) {   /* stored along the queries, as st runs: no transpose */
        rows = nq / 16 * 16;
        keys = nk;
        for (ac_index jj = 0; jj < nk; jj++)
            for (ac_index i0 = 0; i0 < rows; i0 += 16) {
                const __m128i left_out = left_out_16(keep + jj * sj + i0);
                if (_mm_movemask_epi8(left_out))
                    set_minus_inf_16_f32(st + jj * ldst + i0, left_out);
            }
    } else if (sj == 1) {
        rows = nq / 16 * 16;
        keys = nk / 16 * 16;
        const __m128i zero = _mm_setzero_si128();
        for (ac_index i0 = 0; i0 < rows; i0 += 16)
            for (ac_index j0 = 0; j0 < keys; j0 += 16) {
                __m128i r[16];
                for (int t = 0; t < 16; t++)
                    r[t] = _mm_loadu_si128((const __m128i *)(keep + (i0 + t) * si + j0));
                transpose_16x16_bytes(r);   /* r[t]: key j0 + t, queries i0 .. i0 + 15 */
                for (int t = 0; t < 16; t++) {
                    const __m128i left_out = _mm_cmpeq_epi8(r[t], zero);
                    if (_mm_movemask_epi8(left_out))
                        set_minus_inf_16_f32(st + (j0 + t) * ldst + i0, left_out);
                }
            }
    }
#endif
    if (keys < nk) mask_scores_by_rows(st, ldst, keep, si, sj, 0, rows, keys, nk);
    mask_scores_by_rows(st, ldst, keep, si, sj, rows, nq, 0, nk);
}

/* One work item of the tile flash path: query rows i0 .. i0 + nq of one head over the keys
 * [0, tile_limit) (the last row's limit; a rerun passes fewer: causal_next_rerun), under the
 * dense mask m (NULL: none). */
static void flash_tiles_item(const float *q_tile, const float *k_head, const float *v_head,
                             float *o_tile, ac_index i0, ac_index nq, ac_index tile_limit,
                             ac_index offset, int causal, const item_mask *m, ac_index D,
                             float scale, ac_index block_q, ac_index block_k, float *qt,
                             float *st, float *col_max, float *col_sum, float *correction) {
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
        /* a block the mask leaves out whole would add exactly nothing (its scores -inf: the
         * maxima stay, the corrections are 1 or act on zeros, P = 0): skipped */
        const int kept = m ? item_block_state(m, j0 / block_k, j0, nq, nk) : MASK_ALL_KEPT;
        if (kept == MASK_NONE_KEPT) continue;
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
        if (kept == MASK_MIXED)
            mask_scores(st, block_q, m->keep + j0 * m->sj, m->si, m->sj, nq, nk);
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
    return ac_sdpa_flash_tiles_masked_f32(q, k, v, out, B, H, Hkv, Lq, Lk, D, kv_lengths, causal,
                                          NULL, scale, block_q, block_k, num_threads);
}

int ac_sdpa_flash_tiles_masked_f32(const float *q, const float *k, const float *v, float *out,
                                   ac_index B, ac_index H, ac_index Hkv, ac_index Lq,
                                   ac_index Lk, ac_index D, const int64_t *kv_lengths,
                                   int causal, const ac_sdpa_mask *mask, float scale,
                                   ac_index block_q, ac_index block_k, int num_threads) {
    const ac_index G = AC_TILE_GROUP;
    /* tiles past the problem hold one tile either way: the same work split, less scratch */
    block_q = AC_MIN(block_q, (Lq + G - 1) / G * G);
    block_k = AC_MIN(block_k, Lk);
    const ac_index group = H / Hkv;
    const ac_index n_qtiles = (Lq + block_q - 1) / block_q;
    const ac_index n_items = B * H * n_qtiles;
    int status = AC_OK;
    mask_states ms = mask_states_build(mask, B, H, Lq, Lk, block_q, block_k, num_threads);
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
            const item_mask m = item_mask_at(mask, &ms, b, h, i0, block_q);
            ac_index tile_limit = kv_valid;   /* keys the tile's last query may see */
            if (causal && i0 + nq + offset < tile_limit) tile_limit = i0 + nq + offset;
            if (mask) tile_limit = item_mask_limit(&m, nq, tile_limit, block_k);

            flash_tiles_item(q_tile, k_head, v_head, o_tile, i0, nq, tile_limit, offset, causal,
                             mask ? &m : NULL, D, scale, block_q, block_k, qt, st, col_max,
                             col_sum, correction);
            ac_index r = 0, jb = 0, first, count, cap;
            if (causal && causal_rerun_needed_f32(q_tile, o_tile, nq, D))
                while (causal_next_rerun_f32(v_head, o_tile, i0, nq, Lq, Lk, kv_valid, D,
                                             tile_limit, &r, &jb, &first, &count, &cap)) {
                    const item_mask rows = item_mask_rows(&m, first);
                    flash_tiles_item(q_tile + first * D, k_head, v_head, o_tile + first * D,
                                     i0 + first, count, cap, offset, causal,
                                     mask ? &rows : NULL, D, scale, block_q, block_k, qt, st,
                                     col_max, col_sum, correction);
                }
        }
        free(qt);
        free(st);
        free(col_max);
    }
    free(ms.states);
    return status;
}
