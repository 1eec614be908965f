/* SPDX-License-Identifier: Apache-2.0 -- body of softmax.c, included per precision (REAL, SUF) */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* A row whose maximum came out -inf holds only -inf and NaN among its valid entries (a vector
 * max may drop a NaN lane): a NaN makes its valid entries NaN -- never a silent "nothing
 * valid" zero row -- and the others 0 (-inf for log-softmax), as a row with a finite maximum
 * and a NaN gets them. */
static int CAT(nan_row_, SUF)(const REAL *x, REAL *y, ac_index n_valid, ac_index n,
                              const uint8_t *mask, int log_output) {
    ac_index j = 0;
    while (j < n_valid && !((!mask || mask[j]) && x[j] != x[j])) j++;
    if (j == n_valid) return 0;
    for (ac_index t = 0; t < n; t++)
        y[t] = (t < n_valid && (!mask || mask[t])) ? (REAL)NAN
               : (log_output ? (REAL)-INFINITY : (REAL)0);
    return 1;
}

/* row r of x (n_rows, n) into y, a work item of ac_softmax */
static void CAT(softmax_row_, SUF)(const REAL *x, REAL *y, ac_index n, const int64_t *lengths,
                                   const uint8_t *mask, int log_output, ac_index r) {
    const REAL *xr = x + r * n;
    REAL *yr = y + r * n;
    const uint8_t *mr = mask ? mask + r * n : NULL;
    ac_index n_valid = lengths ? (ac_index)lengths[r] : n;
    if (n_valid > n) n_valid = n;
    if (n_valid < 0) n_valid = 0;
    if (!mr) {
        /* prefix of valid entries: vectorised path */
        if (n_valid == 0) { memset(yr, 0, sizeof(REAL) * n); return; }
        REAL mx = CAT(ac_max_, SUF)(xr, n_valid);
        /* every valid entry -inf (an additive mask over the whole row): nothing valid */
        if (mx == -INFINITY) {
            if (!CAT(nan_row_, SUF)(xr, yr, n_valid, n, NULL, log_output))
                memset(yr, 0, sizeof(REAL) * n);
            return;
        }
        if (log_output) {
            /* the sum only (y may be x: log-softmax runs in place in the seq2seq step) */
            REAL total = CAT(ac_exp_shift_sum_to_, SUF)(xr, NULL, n_valid, mx);
            /* (x - max) - log(sum): never round max + log(sum) to REAL first, which for
             * entries far from zero (ulp(1e4) ~ 1e-3 in float32) would shift every output */
            REAL log_total = (REAL)log((double)total);
            for (ac_index j = 0; j < n_valid; j++) yr[j] = (xr[j] - mx) - log_total;
            for (ac_index j = n_valid; j < n; j++) yr[j] = -INFINITY;
        } else {
            REAL total = CAT(ac_exp_shift_sum_to_, SUF)(xr, yr, n_valid, mx);
            CAT(ac_scale_, SUF)(yr, n_valid, 1 / total);
            if (n_valid < n) memset(yr + n_valid, 0, sizeof(REAL) * (n - n_valid));
        }
        return;
    }
    /* general mask: the entries it leaves out (and those past the length) are -inf in y,
     * then the vectorised path runs over the whole row (exp(-inf) is exactly 0). It was a
     * scalar loop with two double exps an entry, 20-30x the unmasked row. (y may be x:
     * only left-out entries are overwritten, and nan_row reads the valid ones.) */
    int any = 0;
    for (ac_index j = 0; j < n; j++) {
        const int keep = j < n_valid && mr[j];
        any |= keep;
        yr[j] = keep ? xr[j] : (REAL)-INFINITY;
    }
    REAL mx = any ? CAT(ac_max_, SUF)(yr, n) : (REAL)-INFINITY;
    if (mx == -INFINITY) {
        if (!CAT(nan_row_, SUF)(xr, yr, n_valid, n, mr, log_output))
            memset(yr, 0, sizeof(REAL) * n);
        return;
    }
    REAL total;
    if (log_output) {
        total = CAT(ac_exp_shift_sum_to_, SUF)(yr, NULL, n, mx);
        REAL log_total = (REAL)log((double)total);
        for (ac_index j = 0; j < n; j++) yr[j] = (yr[j] - mx) - log_total;   /* -inf stays */
    } else {
        total = CAT(ac_exp_shift_sum_to_, SUF)(yr, yr, n, mx);
        CAT(ac_scale_, SUF)(yr, n, 1 / total);
    }
    if (total != total)   /* a NaN among the valid entries: the left-out ones stay 0 / -inf */
        for (ac_index j = 0; j < n; j++)
            if (!(j < n_valid && mr[j])) yr[j] = log_output ? (REAL)-INFINITY : (REAL)0;
}

void CAT(ac_softmax_, SUF)(const REAL *x, REAL *y, ac_index n_rows, ac_index n,
                           const int64_t *lengths, const uint8_t *mask, int log_output,
                           int num_threads) {
    AC_PARALLEL_FOR(r, n_rows, AC_THREADS(n_rows * n, num_threads),
                    CAT(softmax_row_, SUF)(x, y, n, lengths, mask, log_output, r));
}
