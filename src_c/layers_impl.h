/* SPDX-License-Identifier: Apache-2.0 -- body of layers.c, included per precision */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define ACT_CHUNK 16384 /* elements per parallel work item: fixed, so threads never change results */

/* row r of x (rows, D) normalised into y, a work item of ac_layer_norm */
static void CAT(layer_norm_row_, SUF)(const REAL *x, REAL *y, const REAL *gamma,
                                      const REAL *beta, ac_index D, REAL eps, int mode,
                                      ac_index r) {
    const REAL *xr = x + r * D;
    REAL *yr = y + r * D;
    LAYER_NORM_VECTOR_HOOK(xr, yr, gamma, beta, D, eps, mode) /* float32 rows leave here */
    /* the two sums in 8 interleaved chains (lane j takes d = j mod 8) added in a fixed
     * order: one chain waited on each add's latency (~8 cycles an element, 6% of a RAN
     * encode), these run as vectors; a row's result still depends on its values only */
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const ac_index d8 = D - D % 8;
    for (ac_index d = 0; d < d8; d += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)xr[d + j];
    for (ac_index d = d8; d < D; d++) acc[d % 8] += (double)xr[d];
    double mean = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    mean /= (double)D;
    const double center_sum = mode == AC_NORM_STANDARD ? mean : 0.0;
    for (int j = 0; j < 8; j++) acc[j] = 0;
    for (ac_index d = 0; d < d8; d += 8)
        for (int j = 0; j < 8; j++) {
            const double t = (double)xr[d + j] - center_sum;
            acc[j] += t * t;
        }
    for (ac_index d = d8; d < D; d++) {
        const double t = (double)xr[d] - center_sum;
        acc[d % 8] += t * t;
    }
    double m2 = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    m2 /= (double)D;
    const double center = mode == AC_NORM_RMS ? 0.0 : mean;
    const double inv = 1.0 / sqrt(m2 + (double)eps);
    for (ac_index d = 0; d < D; d++) {
        double t = (xr[d] - center) * inv;
        if (gamma) t *= gamma[d];
        if (beta) t += beta[d];
        yr[d] = (REAL)t;
    }
}

void CAT(ac_layer_norm_, SUF)(const REAL *x, REAL *y, const REAL *gamma, const REAL *beta,
                              ac_index rows, ac_index D, REAL eps, int mode, int num_threads) {
    AC_PARALLEL_FOR(r, rows, AC_THREADS(rows * D, num_threads),
                    CAT(layer_norm_row_, SUF)(x, y, gamma, beta, D, eps, mode, r));
}

static inline REAL CAT(act_scalar_, SUF)(REAL v, int kind) {
    switch (kind) {
    case AC_ACT_RELU: return v < 0 ? 0 : v; /* a NaN stays NaN, as np.maximum(x, 0) */
    /* forms without cancellation: 1 + erf(x / sqrt 2) and 1 + tanh(u) lose every digit in
     * the negative tail (x < -8: 1e-16 of noise on a value near 1e-15 or below) */
    case AC_ACT_GELU: return (REAL)(0.5 * v * erfc(v * -0.70710678118654752440));
    case AC_ACT_GELU_TANH: {
        double u = 0.7978845608028654 * (v + 0.044715 * (double)v * v * v);
        return (REAL)(v / (1.0 + exp(-2.0 * u)));
    }
    case AC_ACT_SWISH: return (REAL)(v / (1.0 + exp(-(double)v)));
    case AC_ACT_TANH: return (REAL)tanh(v);
    default: return (REAL)(1.0 / (1.0 + exp(-(double)v)));
    }
}

/* elements [c * ACT_CHUNK, (c + 1) * ACT_CHUNK) of n, a work item of ac_activation */
static void CAT(act_chunk_, SUF)(const REAL *x, REAL *y, ac_index n, int kind, ac_index c) {
    const ac_index i0 = c * ACT_CHUNK, i1 = AC_MIN(n, i0 + ACT_CHUNK);
    if (kind == AC_ACT_RELU) {
        /* a loop of its own, which the compiler turns into compares and blends: through
         * the switch below each element took a branch, mispredicted half the time on
         * signed data (~3.7 ns an element, 6% of a Transformer-base beam search) */
        for (ac_index i = i0; i < i1; i++) y[i] = x[i] < 0 ? (REAL)0 : x[i];
        return;
    }
    ACT_VECTOR_HOOK(x + i0, y + i0, i1 - i0, kind)
    for (ac_index i = i0; i < i1; i++) y[i] = CAT(act_scalar_, SUF)(x[i], kind);
}

void CAT(ac_activation_, SUF)(const REAL *x, REAL *y, ac_index n, int kind, int num_threads) {
    AC_PARALLEL_FOR(c, (n + ACT_CHUNK - 1) / ACT_CHUNK, AC_THREADS(n, num_threads),
                    CAT(act_chunk_, SUF)(x, y, n, kind, c));
}

/* Rows sharing a position share its cos / sin: work items are (position, block of ROTARY_ROWS
 * rows), each computing the angles of its position once per ROTARY_PAIRS pairs (the same
 * expressions as one element at a time, so the same bits) instead of once per row -- RAN's
 * window attention rotates 2 x heads x windows rows per position, and sincos / pow element by
 * element took 15% of its encode (session 11). */
#define ROTARY_ROWS 16
#define ROTARY_PAIRS 512
void CAT(ac_rotary_, SUF)(REAL *x, const int64_t *positions, ac_index N, ac_index L, ac_index D,
                          double base, int num_threads) {
    const ac_index half = D / 2;
    const ac_index blocks = (N + ROTARY_ROWS - 1) / ROTARY_ROWS;
#pragma omp parallel for schedule(static) num_threads(AC_THREADS(N * L * D, num_threads))
    for (ac_index item = 0; item < L * blocks; item++) {
        const ac_index l = item / blocks, n0 = item % blocks * ROTARY_ROWS;
        const double p = (double)positions[l];
        double c[ROTARY_PAIRS], s[ROTARY_PAIRS];
        for (ac_index i0 = 0; i0 < half; i0 += ROTARY_PAIRS) {
            const ac_index i1 = AC_MIN(half, i0 + ROTARY_PAIRS);
            for (ac_index i = i0; i < i1; i++) {
                const double theta = p * pow(base, -2.0 * (double)i / (double)D);
                c[i - i0] = cos(theta);
                s[i - i0] = sin(theta);
            }
            for (ac_index n = n0; n < AC_MIN(N, n0 + ROTARY_ROWS); n++) {
                REAL *xr = x + (n * L + l) * D;
                for (ac_index i = i0; i < i1; i++) {
                    const double x0 = xr[2 * i], x1 = xr[2 * i + 1];
                    xr[2 * i] = (REAL)(x0 * c[i - i0] - x1 * s[i - i0]);
                    xr[2 * i + 1] = (REAL)(x1 * c[i - i0] + x0 * s[i - i0]);
                }
            }
        }
    }
}
#undef ROTARY_ROWS
#undef ROTARY_PAIRS

void CAT(ac_embedding_, SUF)(const REAL *table, const int64_t *ids, REAL *out, ac_index rows,
                             ac_index D, int num_threads) {
    AC_PARALLEL_FOR(r, rows, AC_THREADS(rows * D, num_threads),
                    memcpy(out + r * D, table + ids[r] * D, sizeof(REAL) * D));
}
#undef ACT_CHUNK

/* y (P, B, A) = x (P, A, B) with its last two axes swapped, in 32 x 32 blocks: NumPy's copy of
 * a moved axis reads one element per cache line (30 ms for a 4096 x 1024 float32 softmax over
 * axis 0, against 1.6 ms for the softmax itself). */
#define SWAP_BLOCK 32
void CAT(ac_swap_last_axes_, SUF)(const REAL *x, REAL *y, ac_index P, ac_index A, ac_index B,
                                  int num_threads) {
    const ac_index blocks_a = (A + SWAP_BLOCK - 1) / SWAP_BLOCK;
    const ac_index blocks_b = (B + SWAP_BLOCK - 1) / SWAP_BLOCK;
#pragma omp parallel for schedule(static) num_threads(AC_THREADS(P * A * B, num_threads))
    for (ac_index item = 0; item < P * blocks_a * blocks_b; item++) {
        const ac_index p = item / (blocks_a * blocks_b), rest = item % (blocks_a * blocks_b);
        const ac_index a0 = rest / blocks_b * SWAP_BLOCK, b0 = rest % blocks_b * SWAP_BLOCK;
        const ac_index a1 = AC_MIN(A, a0 + SWAP_BLOCK), b1 = AC_MIN(B, b0 + SWAP_BLOCK);
        const REAL *xp = x + p * A * B;
        REAL *yp = y + p * A * B;
        /* through a tile, so that x's and y's rows are each read / written whole: at a
         * power-of-two stride the 32 rows of a block share one cache set, and a row touched
         * an element at a time was evicted between its elements (4 GB/s) */
        REAL tile[SWAP_BLOCK][SWAP_BLOCK + 1];
        for (ac_index a = a0; a < a1; a++)
            for (ac_index b = b0; b < b1; b++) tile[a - a0][b - b0] = xp[a * B + b];
        for (ac_index b = b0; b < b1; b++)
            for (ac_index a = a0; a < a1; a++) yp[b * A + a] = tile[a - a0][b - b0];
    }
}
#undef SWAP_BLOCK
