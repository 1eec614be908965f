/* SPDX-License-Identifier: Apache-2.0
 *
 * Body of the SDPA kernels (see sdpa.h), included once per precision by sdpa.c with
 *   REAL  float | double      SUF  f32 | f64      GEMM_FN  ac_sgemm_fn | ac_dgemm_fn
 * Row primitives come from real_ops.h through the CAT(ac_xxx_, SUF) names; flash_item_at (the
 * work items of both flash drivers) from sdpa.c.
 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define R_MAX CAT(ac_max_, SUF)
#define R_EXP_SHIFT_SUM CAT(ac_exp_shift_sum_, SUF)
#define R_DOT CAT(ac_dot_, SUF)
#define R_AXPY CAT(ac_axpy_, SUF)
#define R_SCALE CAT(ac_scale_, SUF)

/* Number of keys query i (absolute index in 0..Lq) may see: a prefix [0, limit). */
static inline ac_index CAT(key_limit_, SUF)(ac_index i, ac_index Lq, ac_index Lk,
                                            ac_index kv_valid, int causal) {
    ac_index limit = kv_valid;
    if (causal) {
        ac_index c = i + (Lk - Lq) + 1;
        if (c < limit) limit = c;
    }
    return limit < 0 ? 0 : limit;
}

/* Row-major C (m x n, ldc) = alpha * A (m x kk, lda) . B^T (B is n x kk, ldb) + beta * C,
 * expressed for the column-major BLAS as C^T = B . A^T. */
static inline void CAT(gemm_abt_, SUF)(GEMM_FN gemm, int m, int n, int kk, REAL alpha,
                                       const REAL *a, int lda, const REAL *b, int ldb, REAL beta,
                                       REAL *c, int ldc) {
    char tr = 'T', nt = 'N';
    gemm(&tr, &nt, &n, &m, &kk, &alpha, (REAL *)b, &ldb, (REAL *)a, &lda, &beta, c, &ldc);
}

/* Row-major C (m x n, ldc) = alpha * A (m x kk, lda) . B (kk x n, ldb) + beta * C. */
static inline void CAT(gemm_ab_, SUF)(GEMM_FN gemm, int m, int n, int kk, REAL alpha,
                                      const REAL *a, int lda, const REAL *b, int ldb, REAL beta,
                                      REAL *c, int ldc) {
    char nt = 'N';
    gemm(&nt, &nt, &n, &m, &kk, &alpha, (REAL *)b, &ldb, (REAL *)a, &lda, &beta, c, &ldc);
}

static inline int CAT(row_finite_, SUF)(const REAL *x, ac_index n) {
    for (ac_index i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* Causal flash tiles and non-finite values. The product P . V of a key block crossing the
 * diagonal runs over keys some rows of the query tile do not see, with P = 0 there: a NaN or
 * inf value at key j (0 x inf = NaN) made the tile's rows blind to j NaN in j's columns, where
 * the reference (and the query alone) is finite. After a query tile (rows i0 .. i0 + nq of one
 * head over the keys [0, tile_limit)), the caller asks causal_rerun_needed whether some row
 * came out non-finite with a finite query (else every NaN is the inputs' own), then takes the
 * ranges causal_next_rerun gives: rows blind to the same first non-finite value past their
 * keys, at least one of them non-finite, to compute again with the keys cut at that value.
 * Run over exactly the keys they see (and no later bad value), they come out as they would
 * with those values finite: the blocks past a row's last key only ever added zeros. The ranges
 * are disjoint (at most the tile once more); the values past the first row's keys are read
 * once. */
static int CAT(causal_rerun_needed_, SUF)(const REAL *q_tile, const REAL *o_tile, ac_index nq,
                                          ac_index D) {
    for (ac_index r = 0; r < nq; r++)
        if (!CAT(row_finite_, SUF)(o_tile + r * D, D) && CAT(row_finite_, SUF)(q_tile + r * D, D))
            return 1;
    return 0;
}

/* The next range of rows to compute again (see above), from row *r with the value scan at
 * key *jb (both 0 at first, advanced here): 1 with rows [*start, *start + *count) and the
 * keys cut at *cap; 0 when there is none left. */
static int CAT(causal_next_rerun_, SUF)(const REAL *v_head, const REAL *o_tile, ac_index i0,
                                        ac_index nq, ac_index Lq, ac_index Lk, ac_index kv_valid,
                                        ac_index D, ac_index tile_limit, ac_index *r,
                                        ac_index *jb, ac_index *start, ac_index *count,
                                        ac_index *cap) {
    while (*r < nq) {
        const ac_index limit = CAT(key_limit_, SUF)(i0 + *r, Lq, Lk, kv_valid, 1);
        if (*jb < limit) *jb = limit;
        while (*jb < tile_limit && CAT(row_finite_, SUF)(v_head + *jb * D, D)) (*jb)++;
        if (*jb >= tile_limit) return 0;   /* no non-finite value past these rows' keys */
        /* the rows from *r blind to key *jb (limits grow with the row) */
        const ac_index first = *r;
        int poisoned = 0;
        while (*r < nq && CAT(key_limit_, SUF)(i0 + *r, Lq, Lk, kv_valid, 1) <= *jb) {
            poisoned |= !CAT(row_finite_, SUF)(o_tile + *r * D, D);
            (*r)++;
        }
        if (poisoned) {
            *start = first;
            *count = *r - first;
            *cap = *jb;
            return 1;
        }
    }
    return 0;
}

/* The scores (n) of the keys a mask row leaves out set to -inf. */
static void CAT(mask_row_scores_, SUF)(REAL *scores, const unsigned char *keep, ac_index sj,
                                       ac_index n) {
    ac_index j = 0;
#ifdef __SSE2__
    if (sj == 1) /* 16 keys a compare and a select (a write per left-out entry was slow) */
        for (; j + 16 <= n; j += 16) {
            const __m128i left_out = left_out_16(keep + j);
            if (_mm_movemask_epi8(left_out)) CAT(set_minus_inf_16_, SUF)(scores + j, left_out);
        }
#endif
    for (ac_index j0 = j; j0 < n; j0 += 64)
        for (uint64_t bits = left_out_bits(keep + j0 * sj, sj, AC_MIN(64, n - j0)); bits;
             bits &= bits - 1)
            scores[j0 + __builtin_ctzll(bits)] = -INFINITY;
}

/* A masked row's chunk whose weighted sum of values came out non-finite: a left-out key
 * weighs exactly 0, but 0 x NaN = NaN. When some left-out key's value is not finite, o is
 * summed again over a copy of the chunk's values (n x D, into `values`) with those rows 0:
 * the sum the row gets with those values finite (the same products in the same order, a
 * left-out key adding 0). A NaN among the kept values stays NaN. */
static void CAT(mask_row_values_repair_, SUF)(const REAL *p, const unsigned char *keep,
                                              ac_index sj, const REAL *v, ac_index n, ac_index D,
                                              REAL *values, REAL *o) {
    int left_out_bad = 0;
    for (ac_index j = 0; j < n && !left_out_bad; j++)
        left_out_bad = !keep[j * sj] && !CAT(row_finite_, SUF)(v + j * D, D);
    if (!left_out_bad) return;
    for (ac_index j = 0; j < n; j++) {
        if (keep[j * sj]) memcpy(values + j * D, v + j * D, sizeof(REAL) * D);
        else memset(values + j * D, 0, sizeof(REAL) * D);
    }
    memset(o, 0, sizeof(REAL) * D);
    CAT(ac_weighted_sum_, SUF)(p, values, n, D, o);
}

/* One work item of the BLAS flash path: query rows i0 .. i0 + nq of one head over the keys
 * [0, tile_limit) (the last row's limit; a rerun passes fewer: causal_next_rerun), under the
 * dense mask m (NULL: none; see the tile path in sdpa.c). */
static void CAT(flash_item_, SUF)(GEMM_FN gemm, const REAL *q_tile, const REAL *kt_head,
                                  const REAL *v_head, REAL *o_tile, ac_index i0, ac_index nq,
                                  ac_index tile_limit, ac_index Lq, ac_index Lk, ac_index kv_valid,
                                  int causal, const item_mask *m, ac_index D, REAL scale,
                                  ac_index block_k, REAL *q_scaled, REAL *scores, REAL *row_max,
                                  REAL *row_sum) {
    for (ac_index r = 0; r < nq; r++) {
        for (ac_index d = 0; d < D; d++) q_scaled[r * D + d] = q_tile[r * D + d] * scale;
        row_max[r] = -INFINITY;
        row_sum[r] = 0;
    }
    memset(o_tile, 0, sizeof(REAL) * nq * D);

    for (ac_index j0 = 0; j0 < tile_limit; j0 += block_k) {
        const ac_index nk = AC_MIN(block_k, tile_limit - j0);
        /* (a block the mask leaves out whole adds exactly nothing: skipped) */
        const int kept = m ? item_block_state(m, j0 / block_k, j0, nq, nk) : MASK_ALL_KEPT;
        if (kept == MASK_NONE_KEPT) continue;
        /* scores (nq, nk) = q_scaled . kt[:, j0:j0+nk] */
        CAT(gemm_ab_, SUF)(gemm, (int)nq, (int)nk, (int)D, 1, q_scaled, (int)D,
                           kt_head + j0, (int)Lk, 0, scores, (int)block_k);
        for (ac_index r = 0; r < nq; r++) {
            REAL *s = scores + r * block_k;
            ac_index n_valid = CAT(key_limit_, SUF)(i0 + r, Lq, Lk, kv_valid, causal) - j0;
            if (n_valid > nk) n_valid = nk;
            if (n_valid <= 0) { /* this row sees no key of the tile */
                memset(s, 0, sizeof(REAL) * nk);
                continue;
            }
            if (kept == MASK_MIXED)
                CAT(mask_row_scores_, SUF)(s, m->keep + r * m->si + j0 * m->sj, m->sj, n_valid);
            REAL new_max = R_MAX(s, n_valid);
            if (row_max[r] > new_max) new_max = row_max[r];
            /* rescale what was accumulated under the old maximum */
            if (new_max != row_max[r] && row_sum[r] != 0) {
                REAL correction = (REAL)exp((double)(row_max[r] - new_max));
                row_sum[r] *= correction;
                R_SCALE(o_tile + r * D, D, correction);
            }
            row_max[r] = new_max;
            /* every score -inf so far (finite q . k overflowing): shift by 0, so that
             * the row stays "no key" (zeros), as the float32 tile path gives it, not
             * exp(-inf + inf) = NaN */
            row_sum[r] += R_EXP_SHIFT_SUM(s, n_valid,
                                          new_max == -INFINITY ? (REAL)0 : new_max);
            if (n_valid < nk) memset(s + n_valid, 0, sizeof(REAL) * (nk - n_valid));
        }
        /* o_tile (nq, D) += probabilities (nq, nk) . v[j0:j0+nk] */
        CAT(gemm_ab_, SUF)(gemm, (int)nq, (int)D, (int)nk, 1, scores, (int)block_k,
                           v_head + j0 * D, (int)D, 1, o_tile, (int)D);
    }
    /* a row that saw no key has sum 0: zeros. A NaN score (NaN in q or k) makes the
     * sum NaN, and the row NaN, as the weights path gives: never a silent zero row */
    for (ac_index r = 0; r < nq; r++) {
        if (row_sum[r] != 0) R_SCALE(o_tile + r * D, D, 1 / row_sum[r]);
        else memset(o_tile + r * D, 0, sizeof(REAL) * D);
    }
}

int CAT(ac_sdpa_flash_, SUF)(const REAL *q, const REAL *k, const REAL *v, REAL *out, ac_index B,
                             ac_index H, ac_index Hkv, ac_index Lq, ac_index Lk, ac_index D,
                             const int64_t *kv_lengths, int causal, const ac_sdpa_mask *mask,
                             REAL scale, ac_index block_q, ac_index block_k, GEMM_FN gemm,
                             int num_threads) {
    /* tiles past the problem hold one tile either way: the same work split, less scratch */
    block_q = AC_MIN(block_q, Lq);
    block_k = AC_MIN(block_k, Lk);
    const ac_index group = H / Hkv;
    const ac_index n_qtiles = (Lq + block_q - 1) / block_q;
    const ac_index n_items = B * H * n_qtiles;
    int status = AC_OK;
    /* K transposed per head, (B, Hkv, D, Lk): both tile products are then plain NN products
     * of unit-stride operands, which BLAS can run without re-packing them (see sdpa.h). */
    REAL *kt = (REAL *)malloc(sizeof(REAL) * B * Hkv * D * Lk);
    if (!kt) return AC_ERR_NOMEM;
    mask_states ms = mask_states_build(mask, B, H, Lq, Lk, block_q, block_k, num_threads);

#pragma omp parallel num_threads(AC_THREADS(B * H * Lq * Lk * D, num_threads))
    {
#pragma omp for schedule(static)
        for (ac_index bg = 0; bg < B * Hkv; bg++) {
            const REAL *src = k + bg * Lk * D;
            REAL *dst = kt + bg * D * Lk;
            for (ac_index j0 = 0; j0 < Lk; j0 += 64) {   /* 64-key blocks stay in L1 */
                const ac_index j1 = AC_MIN(Lk, j0 + 64);
                for (ac_index d = 0; d < D; d++)
                    for (ac_index j = j0; j < j1; j++) dst[d * Lk + j] = src[j * D + d];
            }
        }
        /* per-thread scratch, allocated once per call:
         *   q_scaled (block_q, D)   the query tile times `scale`
         *   scores   (block_q, block_k)  one tile of scores, turned into probabilities in place
         *   row_max, row_sum (block_q)   the online-softmax state of each query row */
        REAL *q_scaled = (REAL *)malloc(sizeof(REAL) * block_q * D);
        REAL *scores = (REAL *)malloc(sizeof(REAL) * block_q * block_k);
        REAL *row_max = (REAL *)malloc(sizeof(REAL) * block_q);
        REAL *row_sum = (REAL *)malloc(sizeof(REAL) * block_q);
        int ok = q_scaled && scores && row_max && row_sum;
        if (!ok) {
#pragma omp atomic write
            status = AC_ERR_NOMEM;
        }
        /* Items run in reverse order so that, under causal masking, the costly last query tiles
         * are handed out first (dynamic schedule); each item is computed whole by one thread,
         * so the result does not depend on the schedule. */
#pragma omp for schedule(dynamic, 1)
        for (ac_index item_rev = 0; item_rev < n_items; item_rev++) {
            if (!ok) continue;
            const flash_item it = flash_item_at(n_items - 1 - item_rev, n_qtiles, H, group,
                                                block_q, Lq);
            const ac_index b = it.b, h = it.h, g = it.g, i0 = it.i0, nq = it.nq;
            const ac_index kv_valid = kv_lengths ? (ac_index)kv_lengths[b] : Lk;
            const REAL *q_tile = q + ((b * H + h) * Lq + i0) * D;
            const REAL *kt_head = kt + (b * Hkv + g) * D * Lk;
            const REAL *v_head = v + (b * Hkv + g) * Lk * D;
            REAL *o_tile = out + ((b * H + h) * Lq + i0) * D;
            /* the last row of the tile sees the most keys (limits grow with i) */
            ac_index tile_limit = CAT(key_limit_, SUF)(i0 + nq - 1, Lq, Lk, kv_valid, causal);
            const item_mask m = item_mask_at(mask, &ms, b, h, i0, block_q);
            if (mask) tile_limit = item_mask_limit(&m, nq, tile_limit, block_k);

            CAT(flash_item_, SUF)(gemm, q_tile, kt_head, v_head, o_tile, i0, nq, tile_limit, Lq,
                                  Lk, kv_valid, causal, mask ? &m : NULL, D, scale, block_k,
                                  q_scaled, scores, row_max, row_sum);
            ac_index r = 0, jb = 0, first, count, cap;
            if (causal && CAT(causal_rerun_needed_, SUF)(q_tile, o_tile, nq, D))
                while (CAT(causal_next_rerun_, SUF)(v_head, o_tile, i0, nq, Lq, Lk, kv_valid, D,
                                                    tile_limit, &r, &jb, &first, &count, &cap)) {
                    const item_mask rows = item_mask_rows(&m, first);
                    CAT(flash_item_, SUF)(gemm, q_tile + first * D, kt_head, v_head,
                                          o_tile + first * D, i0 + first, count, cap, Lq, Lk,
                                          kv_valid, causal, mask ? &rows : NULL, D, scale,
                                          block_k, q_scaled, scores, row_max, row_sum);
                }
        }
        free(q_scaled);
        free(scores);
        free(row_max);
        free(row_sum);
    }
    free(kt);
    free(ms.states);
    return status;
}

int CAT(ac_sdpa_splitkv_, SUF)(const REAL *q, const REAL *k, const REAL *v, REAL *out,
                               ac_index B, ac_index H, ac_index Hkv, ac_index Lq, ac_index Lk,
                               ac_index D, const int64_t *kv_lengths, int causal,
                               const ac_sdpa_mask *mask, REAL scale, ac_index chunk,
                               int num_threads) {
    const ac_index group = H / Hkv;
    const ac_index n_chunks = (Lk + chunk - 1) / chunk;
    const ac_index n_items = B * H * n_chunks;
    /* partials of every (b, h, chunk, query row): unnormalised output (D), max, sum */
    REAL *part_out = (REAL *)malloc(sizeof(REAL) * n_items * Lq * D);
    REAL *part_max = (REAL *)malloc(sizeof(REAL) * n_items * Lq);
    REAL *part_sum = (REAL *)malloc(sizeof(REAL) * n_items * Lq);
    int status = AC_OK;
    if (!part_out || !part_max || !part_sum) {
        free(part_out); free(part_max); free(part_sum);
        return AC_ERR_NOMEM;
    }
    /* the mask's state of each (query row, chunk), once per batch entry and head it has: a
     * row's chunk kept whole runs as without a mask, one left out whole is skipped, and only
     * the others are scanned (scanning every chunk of every row had cost decoding 6%) */
    mask_states ms = mask_states_build(mask, B, H, Lq, Lk, 1, chunk, num_threads);

#pragma omp parallel num_threads(AC_THREADS(B * H * Lq * Lk * D, num_threads))
    {
        REAL *scores = (REAL *)malloc(sizeof(REAL) * chunk);  /* one row of one chunk */
        /* a chunk of values for mask_row_values_repair, made when one is first needed */
        REAL *values = NULL;
        if (!scores) {
#pragma omp atomic write
            status = AC_ERR_NOMEM;
        }
#pragma omp for schedule(static)
        for (ac_index item = 0; item < n_items; item++) {
            if (!scores) continue;
            const ac_index bh = item / n_chunks, c = item % n_chunks;
            const ac_index b = bh / H, h = bh % H, g = h / group;
            const ac_index kv_valid = kv_lengths ? (ac_index)kv_lengths[b] : Lk;
            const REAL *k_head = k + (b * Hkv + g) * Lk * D;
            const REAL *v_head = v + (b * Hkv + g) * Lk * D;
            for (ac_index i = 0; i < Lq; i++) {
                const REAL *q_row = q + ((b * H + h) * Lq + i) * D;
                REAL *o = part_out + (item * Lq + i) * D;
                const ac_index limit = CAT(key_limit_, SUF)(i, Lq, Lk, kv_valid, causal);
                const ac_index j0 = c * chunk;
                ac_index j1 = AC_MIN(j0 + chunk, limit);
                /* the mask's row over this chunk's keys where it keeps some of them only
                 * (NULL: none, or all of them), which ends the chunk at its last kept key: a
                 * padding mask then runs exactly as kv_lengths (the vector sums split a row
                 * at the same place) */
                const unsigned char *keep = NULL;
                if (mask && j1 > j0) {
                    const item_mask m = item_mask_at(mask, &ms, b, h, i, 1);
                    const int kept = item_block_state(&m, c, j0, 1, j1 - j0);
                    if (kept == MASK_NONE_KEPT) {
                        j1 = j0;
                    } else if (kept == MASK_MIXED) {
                        keep = m.keep + j0 * m.sj;
                        j1 = j0 + mask_row_extent(keep, m.sj, j1 - j0);
                    }
                }
                memset(o, 0, sizeof(REAL) * D);
                if (j1 <= j0) {
                    part_max[item * Lq + i] = -INFINITY;
                    part_sum[item * Lq + i] = 0;
                    continue;
                }
                CAT(ac_scores_, SUF)(q_row, k_head + j0 * D, j1 - j0, D, scale, scores);
                if (keep) CAT(mask_row_scores_, SUF)(scores, keep, mask->sj, j1 - j0);
                REAL mx = R_MAX(scores, j1 - j0);
                part_max[item * Lq + i] = mx;
                /* (every score -inf: shift by 0, a sum of 0, as in the flash paths) */
                part_sum[item * Lq + i] = R_EXP_SHIFT_SUM(scores, j1 - j0,
                                                          mx == -INFINITY ? (REAL)0 : mx);
                CAT(ac_weighted_sum_, SUF)(scores, v_head + j0 * D, j1 - j0, D, o);
                if (keep && !CAT(row_finite_, SUF)(o, D)) {
                    if (!values) values = (REAL *)malloc(sizeof(REAL) * chunk * D);
                    if (!values) {
#pragma omp atomic write
                        status = AC_ERR_NOMEM;
                        continue;
                    }
                    CAT(mask_row_values_repair_, SUF)(scores, keep, mask->sj, v_head + j0 * D,
                                                      j1 - j0, D, values, o);
                }
            }
        }
        free(scores);
        free(values);

        /* merge the chunks of each (b, h, i) in chunk order: a fixed reduction order */
#pragma omp for schedule(static)
        for (ac_index row = 0; row < B * H * Lq; row++) {
            const ac_index bh = row / Lq, i = row % Lq;
            REAL *o = out + row * D;
            REAL mx = -INFINITY, total = 0;
            int nan_seen = 0;
            for (ac_index c = 0; c < n_chunks; c++) {
                const ac_index p = (bh * n_chunks + c) * Lq + i;
                const REAL m = part_max[p];
                if (m != m || part_sum[p] != part_sum[p]) nan_seen = 1;
                else if (m > mx) mx = m;
            }
            /* a NaN score (NaN in q or k) gives a NaN row, as the weights path does; a row that
             * saw no key gives zeros */
            for (ac_index d = 0; d < D; d++) o[d] = nan_seen ? (REAL)NAN : 0;
            if (nan_seen || mx == -INFINITY) continue;
            for (ac_index c = 0; c < n_chunks; c++) {
                const ac_index p = (bh * n_chunks + c) * Lq + i;
                if (part_sum[p] == 0) continue;
                REAL w = (REAL)exp((double)(part_max[p] - mx));
                total += part_sum[p] * w;
                R_AXPY(o, w, part_out + p * D, D);
            }
            R_SCALE(o, D, 1 / total);
        }
    }
    free(part_out);
    free(part_max);
    free(part_sum);
    free(ms.states);
    return status;
}

int CAT(ac_sdpa_weights_, SUF)(const REAL *q, const REAL *k, const REAL *v, REAL *out,
                               REAL *weights, ac_index B, ac_index H, ac_index Hkv, ac_index Lq,
                               ac_index Lk, ac_index D, const int64_t *kv_lengths, int causal,
                               REAL scale, GEMM_FN gemm, int num_threads) {
    const ac_index group = H / Hkv;
    int status = AC_OK;
#pragma omp parallel num_threads(AC_THREADS(B * H * Lq * Lk * D, num_threads))
    {
        REAL *q_scaled = (REAL *)malloc(sizeof(REAL) * (Lq * D > 0 ? Lq * D : 1));
        if (!q_scaled) {
#pragma omp atomic write
            status = AC_ERR_NOMEM;
        }
#pragma omp for schedule(static)
        for (ac_index bh = 0; bh < B * H; bh++) {
            if (!q_scaled) continue;
            const ac_index b = bh / H, h = bh % H, g = h / group;
            const ac_index kv_valid = kv_lengths ? (ac_index)kv_lengths[b] : Lk;
            const REAL *q_head = q + bh * Lq * D;
            const REAL *k_head = k + (b * Hkv + g) * Lk * D;
            const REAL *v_head = out ? v + (b * Hkv + g) * Lk * D : NULL;
            REAL *w = weights + bh * Lq * Lk;
            for (ac_index x = 0; x < Lq * D; x++) q_scaled[x] = q_head[x] * scale;
            /* Only the row's valid keys go through the products (kv_valid columns, then
             * kv_valid terms): BLAS rounds by the problem's shape, so products over the padded
             * width Lk made a sentence's weights (a Transformer's attention map) depend on the
             * longest source of its batch, in the last bits. */
            if (kv_valid > 0)
                CAT(gemm_abt_, SUF)(gemm, (int)Lq, (int)kv_valid, (int)D, 1, q_scaled, (int)D,
                                    k_head, (int)D, 0, w, (int)Lk);
            for (ac_index i = 0; i < Lq; i++) {
                REAL *s = w + i * Lk;
                const ac_index n_valid = CAT(key_limit_, SUF)(i, Lq, Lk, kv_valid, causal);
                if (n_valid > 0) {
                    REAL mx = R_MAX(s, n_valid);
                    /* every score -inf (finite q . k overflowing): shift by 0, a zero row as
                     * in the fused paths, not exp(-inf + inf) = NaN; a NaN score: NaN row */
                    REAL total = R_EXP_SHIFT_SUM(s, n_valid, mx == -INFINITY ? (REAL)0 : mx);
                    if (total != 0) R_SCALE(s, n_valid, 1 / total);
                    else memset(s, 0, sizeof(REAL) * n_valid);
                }
                if (n_valid < Lk) memset(s + n_valid, 0, sizeof(REAL) * (Lk - n_valid));
            }
            if (out && kv_valid > 0) /* NULL: the weights alone (the output from elsewhere) */
                CAT(gemm_ab_, SUF)(gemm, (int)Lq, (int)D, (int)kv_valid, 1, w, (int)Lk, v_head,
                                   (int)D, 0, out + bh * Lq * D, (int)D);
            else if (out)
                memset(out + bh * Lq * D, 0, sizeof(REAL) * Lq * D);
        }
        free(q_scaled);
    }
    return status;
}

#undef R_MAX
#undef R_EXP_SHIFT_SUM
#undef R_DOT
#undef R_AXPY
#undef R_SCALE
