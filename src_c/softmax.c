/* SPDX-License-Identifier: Apache-2.0 -- masked softmax, see softmax.h */
#include <math.h>
#include <string.h>
#include "softmax.h"
#include "real_ops.h"
#include "simd.h"

#define REAL float
#define SUF f32
#include "softmax_impl.h"
#undef REAL
#undef SUF
#define REAL double
#define SUF f64
#include "softmax_impl.h"

/* columns of a work item: each of its rows is read as one run of 1 KiB (a column block
 * narrower than that touched a new 4 KiB page for every 64 bytes it read: TLB-bound) */
#define COLS_BLOCK 256

void ac_softmax_cols_f32(const float *x, float *y, ac_index P, ac_index A, ac_index B,
                         int log_output, int num_threads) {
    const ac_index n_blocks = (B + COLS_BLOCK - 1) / COLS_BLOCK;
#pragma omp parallel for schedule(static) num_threads(AC_THREADS(P * A * B, num_threads))
    for (ac_index item = 0; item < P * n_blocks; item++) {
        const ac_index p = item / n_blocks, b0 = item % n_blocks * COLS_BLOCK;
        const ac_index cb = AC_MIN(COLS_BLOCK, B - b0);
        const float *xs = x + p * A * B + b0;
        float *ys = y + p * A * B + b0;
        float shift[COLS_BLOCK], f[COLS_BLOCK];
        double total[COLS_BLOCK];
        /* the column maxima, row by row (x > m ? x : m: a NaN is passed over here and makes
         * its column's sum NaN below) */
        for (ac_index c = 0; c < cb; c++) shift[c] = -INFINITY;
        for (ac_index a = 0; a < A; a++)
            for (ac_index c = 0; c < cb; c++)
                shift[c] = xs[a * B + c] > shift[c] ? xs[a * B + c] : shift[c];
        /* a column of -inf shifts by 0 (exp(-inf) = 0: sum 0), never -inf - -inf = NaN */
        for (ac_index c = 0; c < cb; c++) {
            if (shift[c] == -INFINITY) shift[c] = 0.0f;
            total[c] = 0.0;
        }
        /* y = exp(x - shift) row by row (log-softmax: into a scratch row, only the sums are
         * needed), the sums in float64 (4096 float32 terms summed one by one would lose up to
         * 2^-12 of the sum) */
        for (ac_index a = 0; a < A; a++) {
            float *yr = log_output ? f : ys + a * B;
            for (ac_index c = 0; c < cb; c++) yr[c] = xs[a * B + c] - shift[c];
            ac_exp_f32(yr, cb);
            for (ac_index c = 0; c < cb; c++) total[c] += yr[c];
        }
        if (!log_output) {
            /* sum 0 (a column of -inf): its exps are 0, times 0; NaN: NaN */
            for (ac_index c = 0; c < cb; c++)
                f[c] = total[c] > 0 ? (float)(1.0 / total[c]) : (float)total[c];
            for (ac_index a = 0; a < A; a++)
                for (ac_index c = 0; c < cb; c++) ys[a * B + c] *= f[c];
        } else {
            /* (x - shift) - log(sum), the shift first: shift + log(sum) rounded to float32
             * would carry an error of |x|'s size into small results; a column of -inf
             * (nothing valid) all 0 */
            int empty_columns = 0;
            for (ac_index c = 0; c < cb; c++) {
                f[c] = total[c] > 0 ? (float)log(total[c]) : (float)total[c];
                empty_columns |= total[c] == 0;
            }
            for (ac_index a = 0; a < A; a++)
                for (ac_index c = 0; c < cb; c++)
                    ys[a * B + c] = (xs[a * B + c] - shift[c]) - f[c];
            if (empty_columns)
                for (ac_index c = 0; c < cb; c++)
                    if (total[c] == 0)
                        for (ac_index a = 0; a < A; a++) ys[a * B + c] = 0.0f;
        }
    }
}
