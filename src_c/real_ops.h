/* SPDX-License-Identifier: Apache-2.0
 *
 * Row primitives named per precision, so templated kernel bodies (sdpa_impl.h, ...) can be
 * written once: R_MAX, R_EXP_SHIFT_SUM, R_DOT, R_AXPY, R_SCALE, R_EXP.
 * float32 maps to the SIMD-dispatched versions in simd.c; float64 uses plain loops (it is the
 * reference-grade dtype for tests, not the production one).
 */
#ifndef ATTNCORE_REAL_OPS_H
#define ATTNCORE_REAL_OPS_H
#include <math.h>
#include "simd.h"

static inline double ac_max_f64(const double *x, ac_index n) {
    double m = x[0];
    for (ac_index i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}
static inline double ac_exp_shift_sum_f64(double *x, ac_index n, double shift) {
    double s = 0.0;
    for (ac_index i = 0; i < n; i++) { x[i] = exp(x[i] - shift); s += x[i]; }
    return s;
}
static inline double ac_exp_shift_sum_to_f64(const double *x, double *y, ac_index n, double shift) {
    double s = 0.0;
    for (ac_index i = 0; i < n; i++) {
        const double e = exp(x[i] - shift);
        if (y) y[i] = e;
        s += e;
    }
    return s;
}
static inline double ac_dot_f64(const double *a, const double *b, ac_index n) {
    double s = 0.0;
    for (ac_index i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
static inline void ac_axpy_f64(double *y, double a, const double *x, ac_index n) {
    for (ac_index i = 0; i < n; i++) y[i] += a * x[i];
}
static inline void ac_scale_f64(double *x, ac_index n, double a) {
    for (ac_index i = 0; i < n; i++) x[i] *= a;
}
static inline double ac_tanh_score_f64(const double *k, const double *q, const double *w, ac_index n) {
    double s = 0.0;
    for (ac_index i = 0; i < n; i++) s += w[i] * tanh(k[i] + q[i]);
    return s;
}
static inline void ac_scores_f64(const double *q, const double *k, ac_index n_keys, ac_index D,
                                 double scale, double *out) {
    for (ac_index j = 0; j < n_keys; j++) out[j] = ac_dot_f64(q, k + j * D, D) * scale;
}
static inline void ac_weighted_sum_f64(const double *p, const double *v, ac_index n, ac_index D,
                                       double *o) {
    for (ac_index j = 0; j < n; j++) ac_axpy_f64(o, p[j], v + j * D, D);
}
#endif
