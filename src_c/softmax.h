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
#endif
