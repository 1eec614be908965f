/* SPDX-License-Identifier: Apache-2.0
 *
 * Row softmax / log-softmax over x (n_rows, n) with entries excluded by a per-row length
 * (entries j >= lengths[r] are out; NULL: none) and/or a byte mask (mask[r, j] == 0: out;
 * NULL: none). Excluded entries get probability 0 (log-softmax: -inf). A row with nothing
 * valid is all zeros in both cases, so padded rows never produce NaN or inf downstream.
 * Numerically stable: the row maximum over valid entries is subtracted before exp.
 * Parallel over rows; each row is reduced by one thread, so results do not depend on threads.
 */
#ifndef ATTNCORE_SOFTMAX_H
#define ATTNCORE_SOFTMAX_H
#include "attncore.h"

void ac_softmax_f32(const float *x, float *y, ac_index n_rows, ac_index n, const int64_t *lengths,
                    const uint8_t *mask, int log_output, int num_threads);
void ac_softmax_f64(const double *x, double *y, ac_index n_rows, ac_index n,
                    const int64_t *lengths, const uint8_t *mask, int log_output, int num_threads);
/* The same over the middle axis of x (P, A, B), C-contiguous, float32, nothing excluded:
 * y[p, :, b] = (log-)softmax of x[p, :, b] for every p, b. Work items are (p, block of 256
 * columns), read row by row: the column maxima, then exp(x - max) with float64 column sums,
 * then the scaling, so the axis need not be moved last by two transposes. A NaN, or +inf, in
 * a column makes it NaN; a column of -inf is all zeros, as in the row kernel. */
void ac_softmax_cols_f32(const float *x, float *y, ac_index P, ac_index A, ac_index B,
                         int log_output, int num_threads);
#endif
