/* SPDX-License-Identifier: Apache-2.0 -- body of additive.c, included per precision */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#ifndef AC_ADDITIVE_PREFETCH_MAX
#define AC_ADDITIVE_PREFETCH_MAX (24 * 1024)
#endif

/* Scores of one projected query q (Hd) against n keys kb (n, Hd). The float32 build, given
 * the key factors eb = exp(2 kb) (NULL: none), takes the split tanh of simd.h when the query is
 * within its limit too (and pulls the keys' values vb (n, Dv), read next, into L1 meanwhile);
 * otherwise, and for float64, one fused tanh-dot per key. */
static void CAT(additive_scores_, SUF)(const REAL *q, const REAL *kb, const REAL *eb,
                                       REAL *ea_half, const REAL *w_v, ac_index n, ac_index Hd,
                                       REAL *scores, const REAL *vb, ac_index Dv) {
#if AC_ADDITIVE_SPLIT
    if (eb && ac_all_abs_le_f32(q, Hd, AC_TANH_SPLIT_LIMIT)) {
        ac_exp2x_f32(q, ea_half, Hd, 0.5f);
        /* at most what L1 keeps (32 KiB on the machines measured) beside the factors read
         * meanwhile: past that the first values would be evicted before they are summed */
        ac_index prefetch = n * Dv * (ac_index)sizeof(REAL);
        if (prefetch > AC_ADDITIVE_PREFETCH_MAX) prefetch = AC_ADDITIVE_PREFETCH_MAX;
        ac_tanh_split_scores_f32(ea_half, eb, n, w_v, Hd, scores, vb, prefetch);
        return;
    }
#else
    (void)eb;
    (void)ea_half;
    (void)vb;
    (void)Dv;
#endif
    for (ac_index j = 0; j < n; j++) scores[j] = CAT(ac_tanh_score_, SUF)(kb + j * Hd, q, w_v, Hd);
}

int CAT(ac_additive_, SUF)(const REAL *q_proj, const REAL *k_proj, const float *key_factors,
                           const uint8_t *key_in_limit, const REAL *w_v, const REAL *values,
                           REAL *out, REAL *weights, ac_index B, ac_index Lq, ac_index Lk,
                           ac_index Hd, ac_index Dv, const int64_t *kv_lengths, int num_threads) {
    int status = AC_OK;
    /* Key factors computed here cost one exp per key element, as much as the exact path per
     * query: worth it from two queries per batch element on. Given by the caller (computed
     * once per source), they pay from the first query. */
    const int cached = AC_ADDITIVE_SPLIT && key_factors && key_in_limit;
    const int use_split = AC_ADDITIVE_SPLIT && Lk > 0 && Hd > 0 && (cached || Lq >= 2);
    /* scratch: the scores, the query's factors, and the key factors when not cached */
    const size_t scratch = (size_t)(Lk > 0 ? Lk : 1) +
                           (use_split ? (size_t)Hd + (cached ? 0 : (size_t)(Lk * Hd)) : 0);
#pragma omp parallel num_threads(AC_THREADS(B * Lq * Lk * (Hd + Dv), num_threads))
    {
        REAL *scores = (REAL *)malloc(sizeof(REAL) * scratch);
        if (!scores) {
#pragma omp atomic write
            status = AC_ERR_NOMEM;
        }
        REAL *ea_half = use_split && scores ? scores + (Lk > 0 ? Lk : 1) : NULL;
        const REAL *eb = NULL; /* the key factors of the current batch element, or NULL */
#if AC_ADDITIVE_SPLIT
        ac_index eb_batch = -1;
#else
        (void)key_factors;
        (void)key_in_limit;
#endif
#pragma omp for schedule(static)
        for (ac_index row = 0; row < B * Lq; row++) {
            if (!scores) continue;
            const ac_index b = row / Lq;
            const ac_index n_valid = kv_lengths ? (ac_index)kv_lengths[b] : Lk;
            const REAL *q = q_proj + row * Hd;
            const REAL *kb = k_proj + b * Lk * Hd;
            const REAL *vb = values + b * Lk * Dv;
            REAL *o = out + row * Dv;
            memset(o, 0, sizeof(REAL) * Dv);
#if AC_ADDITIVE_SPLIT
            /* Only the valid keys decide and are exponentiated, so a source scores the same
             * alone and padded inside a batch. */
            if (use_split && b != eb_batch) {
                eb_batch = b;
                eb = NULL;
                if (cached) {
                    int ok = n_valid > 0;
                    for (ac_index j = 0; ok && j < n_valid; j++) ok = key_in_limit[b * Lk + j];
                    if (ok) eb = key_factors + b * Lk * Hd;
                } else if (n_valid > 0 &&
                           ac_all_abs_le_f32(kb, n_valid * Hd, AC_TANH_SPLIT_LIMIT)) {
                    ac_exp2x_f32(kb, ea_half + Hd, n_valid * Hd, 1.f);
                    eb = ea_half + Hd;
                }
            }
#endif
            if (n_valid > 0) {
                CAT(additive_scores_, SUF)(q, kb, eb, ea_half, w_v, n_valid, Hd, scores, vb, Dv);
                REAL mx = CAT(ac_max_, SUF)(scores, n_valid);
                REAL total = CAT(ac_exp_shift_sum_, SUF)(scores, n_valid, mx);
                CAT(ac_scale_, SUF)(scores, n_valid, 1 / total);
                CAT(ac_weighted_sum_, SUF)(scores, vb, n_valid, Dv, o);
            }
            if (weights) {
                REAL *w = weights + row * Lk;
                for (ac_index j = 0; j < Lk; j++) w[j] = j < n_valid ? scores[j] : 0;
            }
        }
        free(scores);
    }
    return status;
}

int CAT(ac_nadaraya_watson_, SUF)(const REAL *queries, const REAL *keys, const REAL *values,
                                  REAL *out, REAL *weights, ac_index Nq, ac_index Nk, ac_index D,
                                  ac_index Dv, REAL bandwidth, int num_threads) {
    int status = AC_OK;
    /* In double, and the scores taken against the nearest key (softmax does not change):
     * -(d_j - d_min) / (2 h^2). In float32, 1 / (2 h^2) overflowed for h < ~1e-19 and squared
     * distances past ~1e38 did, leaving every score -inf and the row NaN; now the nearest key
     * scores 0 and the others <= 0 (-inf only where their weight is 0 anyway). */
    const double inv = 1 / (2 * (double)bandwidth * (double)bandwidth);
#pragma omp parallel num_threads(AC_THREADS(Nq * Nk * (D + Dv), num_threads))
    {
        REAL *scores = (REAL *)malloc(sizeof(REAL) * (Nk > 0 ? Nk : 1));
        double *dist = (double *)malloc(sizeof(double) * (Nk > 0 ? Nk : 1));
        if (!scores || !dist) {
            free(scores);
            free(dist);
            scores = NULL;
            dist = NULL;
#pragma omp atomic write
            status = AC_ERR_NOMEM;
        }
#pragma omp for schedule(static)
        for (ac_index i = 0; i < Nq; i++) {
            if (!scores) continue;
            const REAL *q = queries + i * D;
            REAL *o = out + i * Dv;
            memset(o, 0, sizeof(REAL) * Dv);
            if (Nk == 0) continue;
            double nearest = INFINITY;
            for (ac_index j = 0; j < Nk; j++) {
                const REAL *kj = keys + j * D;
                double sq = 0;
                for (ac_index d = 0; d < D; d++) {
                    const double t = (double)q[d] - (double)kj[d];
                    sq += t * t;
                }
                dist[j] = sq;
                if (sq < nearest) nearest = sq;
            }
            if (nearest == INFINITY) { /* every key infinitely far (an infinite query): no
                                        * nearest key, NaN as attention gives, not the mean */
                for (ac_index d = 0; d < Dv; d++) o[d] = (REAL)NAN;
                if (weights)
                    for (ac_index j = 0; j < Nk; j++) weights[i * Nk + j] = (REAL)NAN;
                continue;
            }
            for (ac_index j = 0; j < Nk; j++)  /* (a NaN distance stays NaN) */
                scores[j] = dist[j] == nearest ? 0 : (REAL)(-(dist[j] - nearest) * inv);
            REAL mx = CAT(ac_max_, SUF)(scores, Nk);
            REAL total = CAT(ac_exp_shift_sum_, SUF)(scores, Nk, mx);
            CAT(ac_scale_, SUF)(scores, Nk, 1 / total);
            CAT(ac_weighted_sum_, SUF)(scores, values, Nk, Dv, o);
            if (weights) memcpy(weights + i * Nk, scores, sizeof(REAL) * Nk);
        }
        free(scores);
        free(dist);
    }
    return status;
}
