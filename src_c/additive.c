/* SPDX-License-Identifier: Apache-2.0 -- additive attention and Nadaraya-Watson, see additive.h */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "additive.h"
#include "real_ops.h"
#include "simd.h"

#define REAL float
#define SUF f32
#define AC_ADDITIVE_SPLIT 1 /* the split tanh (simd.h) is a float32 primitive */
#define GEMM_FN ac_sgemm_fn
#include "additive_impl.h"
#undef REAL
#undef SUF
#undef AC_ADDITIVE_SPLIT
#undef GEMM_FN
#define REAL double
#define SUF f64
#define AC_ADDITIVE_SPLIT 0
#define GEMM_FN ac_dgemm_fn
#include "additive_impl.h"

void ac_additive_key_factors_f32(const float *k_proj, float *factors, uint8_t *in_limit,
                                 ac_index rows, ac_index Hd, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(AC_THREADS(rows * Hd * 16, num_threads))
    for (ac_index r = 0; r < rows; r++) {
        in_limit[r] = (uint8_t)ac_all_abs_le_f32(k_proj + r * Hd, Hd, AC_TANH_SPLIT_LIMIT);
        if (in_limit[r])
            ac_exp2x_f32(k_proj + r * Hd, factors + r * Hd, Hd, 1.f);
        else
            memset(factors + r * Hd, 0, sizeof(float) * Hd);
    }
}
