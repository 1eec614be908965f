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

/* Nadaraya-Watson's squared distances ||q - k_j||^2, directly in float64 (the exact way: no
 * cancellation) for one query. */
static void CAT(nw_direct_distances_, SUF)(const REAL *q, const REAL *keys, ac_index Nk,
                                           ac_index D, double *dist) {
    for (ac_index j = 0; j < Nk; j++) {
        const REAL *kj = keys + j * D;
        double sq = 0;
        for (ac_index d = 0; d < D; d++) {
            const double t = (double)q[d] - (double)kj[d];
            sq += t * t;
        }
        dist[j] = sq;
    }
}

/* Past this width the distances of a block of queries come from one float64 product,
 * ||q||^2 + ||k||^2 - 2 q . k (a GEMM, where the direct loop ran D subtract-multiply-adds per
 * pair in scalar code: 0.1x torch's cdist at D = 64). */
#define NW_PRODUCT_MIN_D 8
/* scratch of a block of queries: about 2 MiB of float64 distances, at most 64 queries */
#define NW_BLOCK_BYTES (2 << 20)
#define NW_BLOCK_MAX 64
#define NW_PRODUCT_MIN_BLOCK 8
#define NW_SUM_CHUNK 64

int CAT(ac_nadaraya_watson_, SUF)(const REAL *queries, const REAL *keys, const REAL *values,
                                  REAL *out, REAL *weights, ac_index Nq, ac_index Nk, ac_index D,
                                  ac_index Dv, REAL bandwidth, ac_dgemm_fn dgemm, GEMM_FN gemm,
                                  int num_threads) {
    int status = AC_OK;
    /* In double, and the scores taken against the nearest key (softmax does not change):
     * -(d_j - d_min) / (2 h^2). In float32, 1 / (2 h^2) overflowed for h < ~1e-19 and squared
     * distances past ~1e38 did, leaving every score -inf and the row NaN; now the nearest key
     * scores 0 and the others <= 0 (-inf only where their weight is 0 anyway). */
    const double inv = 1 / (2 * (double)bandwidth * (double)bandwidth);
    if (Nk == 0) {
        memset(out, 0, sizeof(REAL) * Nq * Dv);
        return AC_OK;
    }
    /* BLAS takes int sizes: wider problems keep the direct loops */
    const int blas_ok = Nk <= INT_MAX && D <= INT_MAX && Dv <= INT_MAX;
    ac_index block = NW_BLOCK_BYTES / (8 * Nk);
    block = block < 1 ? 1 : (block > NW_BLOCK_MAX ? NW_BLOCK_MAX : block);
    /* the product pays for its float64 copy of the keys (read again by every block) only over
     * blocks of several queries: few queries, or so many keys that a block holds few (past
     * 32768 keys), keep the direct distances (2-7x faster there) */
    const int by_product = blas_ok && dgemm && D >= NW_PRODUCT_MIN_D
                           && Nq >= NW_PRODUCT_MIN_BLOCK && block >= NW_PRODUCT_MIN_BLOCK;
    const int pv_product = blas_ok && gemm;
    const ac_index n_blocks = (Nq + block - 1) / block;
    /* the product's operands in float64: the keys (Nk, D) with their squared norms (Nk) */
    double *kd = NULL, *knorm = NULL, knorm_max = 0;
    if (by_product) {
        kd = (double *)malloc(sizeof(double) * Nk * D);
        knorm = (double *)malloc(sizeof(double) * Nk);
        if (!kd || !knorm) {
            free(kd);
            free(knorm);
            return AC_ERR_NOMEM;
        }
        for (ac_index j = 0; j < Nk; j++) {
            double n2 = 0;
            for (ac_index d = 0; d < D; d++) {
                kd[j * D + d] = (double)keys[j * D + d];
                n2 += kd[j * D + d] * kd[j * D + d];
            }
            knorm[j] = n2;
            if (!(n2 <= knorm_max)) knorm_max = n2;   /* (NaN sticks: every row direct) */
        }
    }
    /* The product's rounding: |error| <= (D + 2) 2^-52 (||q||^2 + ||k||^2) for each distance
     * (float64 sums of D terms and three roundings). A score is off by twice that times 1/2h^2,
     * a weight by as much relative: a query whose bound passes NW_TOLERANCE (a large norm
     * against a small bandwidth) takes the direct loop. */
#if AC_ADDITIVE_SPLIT
#define NW_TOLERANCE 0x1p-30
#else
#define NW_TOLERANCE 0x1p-36
#endif
#pragma omp parallel num_threads(AC_THREADS(Nq * Nk * (D + Dv), num_threads))
    {
        /* per thread: the block's distances, scores (then weights) and float64 queries; a
         * row's output in float64 and one chunk's sum (the row-by-row output) */
        double *dist = (double *)malloc(sizeof(double) * block * Nk);
        REAL *p = (REAL *)malloc(sizeof(REAL) * block * Nk);
        double *qd = by_product ? (double *)malloc(sizeof(double) * block * D) : NULL;
        double *acc = (double *)malloc(sizeof(double) * Dv);
        REAL *part = (REAL *)malloc(sizeof(REAL) * Dv);
        int ok = dist && p && (qd || !by_product) && acc && part;
        if (!ok) {
#pragma omp atomic write
            status = AC_ERR_NOMEM;
        }
#pragma omp for schedule(static)
        for (ac_index bi = 0; bi < n_blocks; bi++) {
            if (!ok) continue;
            const ac_index i0 = bi * block, nb = AC_MIN(block, Nq - i0);
            if (by_product) {
                for (ac_index r = 0; r < nb * D; r++) qd[r] = (double)queries[i0 * D + r];
                /* dist (nb, Nk) = ||k||^2 - 2 qd (nb, D) . kd^T: ||q - k||^2 less ||q||^2, which
                 * the scores do not need (they are taken against the nearest key); as
                 * column-major dist^T = -2 kd . qd^T + dist^T */
                for (ac_index r = 0; r < nb; r++) memcpy(dist + r * Nk, knorm, sizeof(double) * Nk);
                char tr = 'T', nt = 'N';
                int m = (int)Nk, n = (int)nb, kk = (int)D, ld = (int)D, ldc = (int)Nk;
                double minus_two = -2, one = 1;
                dgemm(&tr, &nt, &m, &n, &kk, &minus_two, kd, &ld, qd, &ld, &one, dist, &ldc);
            }
            for (ac_index r = 0; r < nb; r++) {
                const ac_index i = i0 + r;
                double *dr = dist + r * Nk;
                REAL *pr = p + r * Nk;
                int direct = !by_product;
                if (by_product) {
                    double qn = 0;
                    for (ac_index d = 0; d < D; d++) qn += qd[r * D + d] * qd[r * D + d];
                    const double bound = (double)(D + 2) * 0x1p-52 * (qn + knorm_max) * inv;
                    /* (NaN and inf too: the direct loop gives them as they always were) */
                    direct = !(bound <= NW_TOLERANCE);
                }
                if (direct) CAT(nw_direct_distances_, SUF)(queries + i * D, keys, Nk, D, dr);
                double nearest = INFINITY;
                for (ac_index j = 0; j < Nk; j++)
                    if (dr[j] < nearest) nearest = dr[j];
                if (nearest == INFINITY) { /* every key infinitely far (an infinite query): no
                                            * nearest key, NaN as attention gives, not the mean */
                    for (ac_index j = 0; j < Nk; j++) pr[j] = (REAL)NAN;
                    continue;
                }
                for (ac_index j = 0; j < Nk; j++)  /* (a NaN distance stays NaN) */
                    pr[j] = dr[j] == nearest ? 0 : (REAL)(-(dr[j] - nearest) * inv);
                REAL mx = CAT(ac_max_, SUF)(pr, Nk);
                REAL total = CAT(ac_exp_shift_sum_, SUF)(pr, Nk, mx);
                CAT(ac_scale_, SUF)(pr, Nk, 1 / total);
            }
            /* out (nb, Dv) = p (nb, Nk) . values (Nk, Dv): one product over a block of several
             * queries (BLAS ran a product of one row slower than the loop below) */
            REAL *o = out + i0 * Dv;
            if (pv_product && nb >= NW_PRODUCT_MIN_BLOCK) {
                char nt = 'N';
                int m = (int)Dv, n = (int)nb, kk = (int)Nk, lda = (int)Dv, ldb = (int)Nk;
                REAL one = 1, zero = 0;
                gemm(&nt, &nt, &m, &n, &kk, &one, (REAL *)values, &lda, p, &ldb, &zero, o, &lda);
            } else {
                /* row by row, in chunks of NW_SUM_CHUNK keys added up in float64: one float32
                 * chain over 262144 keys had lost 1e-5 of the output */
                for (ac_index r = 0; r < nb; r++) {
                    for (ac_index d = 0; d < Dv; d++) acc[d] = 0;
                    for (ac_index j0 = 0; j0 < Nk; j0 += NW_SUM_CHUNK) {
                        memset(part, 0, sizeof(REAL) * Dv);
                        CAT(ac_weighted_sum_, SUF)(p + r * Nk + j0, values + j0 * Dv,
                                                   AC_MIN(NW_SUM_CHUNK, Nk - j0), Dv, part);
                        for (ac_index d = 0; d < Dv; d++) acc[d] += part[d];
                    }
                    for (ac_index d = 0; d < Dv; d++) o[r * Dv + d] = (REAL)acc[d];
                }
            }
            /* (an infinite query's NaN weights give it a NaN row either way) */
            if (weights) memcpy(weights + i0 * Nk, p, sizeof(REAL) * nb * Nk);
        }
        free(dist);
        free(p);
        free(qd);
        free(acc);
        free(part);
    }
    free(kd);
    free(knorm);
    return status;
}
#undef NW_TOLERANCE
