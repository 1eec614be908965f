/* SPDX-License-Identifier: Apache-2.0 -- norm, activation, rotary and embedding kernels */
#include <math.h>
#include <string.h>
#include "layers.h"
#include "real_ops.h"
#include "simd.h"

/* float32 tanh / sigmoid / swish / GELU go through the SIMD row functions; relu has its own
 * loop (layers_impl.h); float64 stays scalar. */
#define ACT_VECTOR_HOOK(xp, yp, cnt, kind)                                                       \
    if ((kind) == AC_ACT_TANH) { ac_tanh_f32((xp), (yp), (cnt)); return; }                       \
    if ((kind) == AC_ACT_SIGMOID) { ac_sigmoid_f32((xp), (yp), (cnt)); return; }                 \
    if (((kind) == AC_ACT_GELU || (kind) == AC_ACT_GELU_TANH)                                    \
        && ac_gelu_f32((xp), (yp), (cnt), (kind) == AC_ACT_GELU_TANH)) return;                   \
    if ((kind) == AC_ACT_SWISH) {                                                                \
        float sig_[256]; /* stack block, so that x and y may alias */                            \
        for (ac_index t0 = 0; t0 < (cnt); t0 += 256) {                                           \
            ac_index m_ = AC_MIN(256, (cnt) - t0);                                               \
            ac_sigmoid_f32((xp) + t0, sig_, m_);                                                 \
            for (ac_index t = 0; t < m_; t++) (yp)[t0 + t] = (xp)[t0 + t] * sig_[t];             \
        }                                                                                        \
        return;                                                                                  \
    }
/* float32 layer-norm rows go through simd.c (one pass of float64 statistics, float32 output,
 * vector kernels with the scalar version's bits); float64 takes the two-pass loop below. */
#define LAYER_NORM_VECTOR_HOOK(xr, yr, gamma, beta, D, eps, mode)                                \
    ac_layer_norm_row_f32((xr), (yr), (gamma), (beta), (D), (eps), (mode) == AC_NORM_STANDARD,   \
                          (mode) != AC_NORM_RMS);                                                \
    return;
#define REAL float
#define SUF f32
#include "layers_impl.h"
#undef REAL
#undef SUF
#undef ACT_VECTOR_HOOK
#undef LAYER_NORM_VECTOR_HOOK

#define ACT_VECTOR_HOOK(xp, yp, cnt, kind)
#define LAYER_NORM_VECTOR_HOOK(xr, yr, gamma, beta, D, eps, mode)
#define REAL double
#define SUF f64
#include "layers_impl.h"
