/* SPDX-License-Identifier: Apache-2.0
 *
 * AVX-512 versions of the float32 row primitives of simd.h, included once by simd.c (which owns
 * the dispatch). Compiled through `target` attributes, so the build stays portable; used only
 * when CPUID reports AVX-512F/DQ/BW/VL (Skylake-X and later, Zen 4 and later).
 *
 * Tails are handled with masked loads and stores rather than scalar loops: a row's last partial
 * vector goes through the same instructions as the others (masked-off lanes load 0, or -inf
 * where the result must vanish under exp), so results do not depend on where a row ends.
 */
#ifndef ATTNCORE_SIMD_AVX512_H
#define ATTNCORE_SIMD_AVX512_H
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

/* Lanes [0, n) of a 16-lane vector, n in [0, 16]. */
static inline AVX512 __mmask16 mask16(ac_index n) {
    return (__mmask16)(n >= 16 ? 0xFFFF : ((1u << n) - 1u));
}

/* exp_poly256, exp_reduced256 and expm1_reduced256 (simd.c) on 16 lanes. */
static inline AVX512 __m512 exp_poly512(__m512 r) {
    __m512 y = _mm512_set1_ps(EXP_P0);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P4));
    return _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P5));
}

static inline AVX512 __m512 exp_reduced512(__m512 r) {
    return _mm512_fmadd_ps(exp_poly512(r), _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
}

static inline AVX512 __m512 expm1_reduced512(__m512 r) {
    return _mm512_fmadd_ps(exp_poly512(r), _mm512_mul_ps(r, r), r);
}

/* exp_split256 (simd.c) on 16 lanes. */
static inline AVX512 __m512 exp_split512(__m512 x, __m512 *n) {
    *n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(EXP_LOG2E), _mm512_set1_ps(0.5f)),
                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(*n, _mm512_set1_ps(EXP_LN2_HI), x);
    return _mm512_fnmadd_ps(*n, _mm512_set1_ps(EXP_LN2_LO), x);
}

/* exp(x) for 16 floats: the range reduction and polynomial of exp256 (simd.c, the EXP_*
 * constants), with 2^n applied by `vscalefps`, which needs no integer detour and stays finite
 * up to the clamp at 88.38.
 * Inputs below -87.34 (including -inf, used for masked scores) give exactly 0; NaN propagates
 * (min/max take the NaN from their second operand). */
static inline AVX512 __m512 exp512(__m512 x) {
    const __m512 hi = _mm512_set1_ps(EXP_HI);
    const __m512 lo = _mm512_set1_ps(EXP_LO);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(hi, x);
    x = _mm512_max_ps(lo, x);
    __m512 fx;
    x = exp_split512(x, &fx);
    const __m512 y = exp_reduced512(x);
    return _mm512_maskz_mov_ps((__mmask16)~underflow, _mm512_scalef_ps(y, fx));
}

/* tanh256 (simd.c) on 16 lanes: sign(x) (-m / (2 + m)), m = expm1(-2|x|), 2^n by vscalefps. */
static inline AVX512 __m512 tanh512(__m512 x) {
    const __m512 sign = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.f);
    __m512 v = _mm512_or_ps(_mm512_add_ps(x, x), sign);                 /* -2|x| */
    v = _mm512_max_ps(_mm512_set1_ps(TANH_ARG_LO), v);                  /* (bound, v): NaN stays */
    __m512 n;
    const __m512 r = exp_split512(v, &n);
    const __m512 s = _mm512_scalef_ps(one, n);
    const __m512 m = _mm512_fmadd_ps(s, expm1_reduced512(r), _mm512_sub_ps(s, one));
    const __m512 d = _mm512_add_ps(m, _mm512_set1_ps(2.f));
    const __m512 t = _mm512_div_ps(m, d);   /* -t */
    return _mm512_or_ps(_mm512_andnot_ps(sign, t), _mm512_and_ps(sign, x));
}

static AVX512 float max_avx512(const float *x, ac_index n) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 vm = ninf;
    ac_index i = 0;
    for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + i));
    if (i < n) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(ninf, mask16(n - i), x + i));
    return _mm512_reduce_max_ps(vm);
}

static AVX512 float exp_shift_sum_avx512(const float *x, float *y, ac_index n, float shift) {
    const __m512 vs = _mm512_set1_ps(shift);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    double total = 0;
    ac_index i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vs));
        __m512 e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vs));
        if (y) {
            _mm512_storeu_ps(y + i, e0);
            _mm512_storeu_ps(y + i + 16, e1);
        }
        acc0 = _mm512_add_ps(acc0, e0);
        acc1 = _mm512_add_ps(acc1, e1);
        if ((i + 32) % EXP_SUM_BLOCK == 0 && i + 32 < n) {   /* (see exp_shift_sum_avx2) */
            total += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
            acc0 = acc1 = _mm512_setzero_ps();
        }
    }
    for (; i < n; i += 16) { /* at most two more vectors, the last one masked */
        const __mmask16 m = mask16(n - i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, x + i), vs));
        if (y) _mm512_mask_storeu_ps(y + i, m, e);
        acc0 = _mm512_add_ps(acc0, e);
    }
    return (float)(total + _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)));
}

static AVX512 void exp_avx512(float *x, ac_index n) {
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        _mm512_mask_storeu_ps(x + i, m, exp512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

static AVX512 void scale_avx512(float *x, ac_index n, float a) {
    const __m512 va = _mm512_set1_ps(a);
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), va));
    }
}

static AVX512 float dot_avx512(const float *a, const float *b, ac_index n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    ac_index i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

static AVX512 void axpy_avx512(float *y, float a, const float *x, ac_index n) {
    const __m512 va = _mm512_set1_ps(a);
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
    }
}

static AVX512 float tanh_score_avx512(const float *k, const float *q, const float *w, ac_index n) {
    __m512 acc = _mm512_setzero_ps();
    for (ac_index i = 0; i < n; i += 16) { /* masked lanes: w = 0 and tanh(0) = 0 */
        const __mmask16 m = mask16(n - i);
        __m512 t = tanh512(_mm512_add_ps(_mm512_maskz_loadu_ps(m, k + i), _mm512_maskz_loadu_ps(m, q + i)));
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), t, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* 1 when every |x[i]| <= limit (a NaN makes it 0). */
static AVX512 int all_abs_le_avx512(const float *x, ac_index n, float limit) {
    const __m512 vl = _mm512_set1_ps(limit);
    __mmask16 bad = 0;
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i));
        bad |= _mm512_mask_cmp_ps_mask(m, a, vl, _CMP_NLE_UQ);
    }
    return bad == 0;
}

static AVX512 void exp2x_avx512(const float *x, float *y, ac_index n, float scale) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(exp512(_mm512_add_ps(v, v)), vs));
    }
}

/* One term of the split tanh, t = 1 - 1/d with d = ea_half * eb + 1/2 = (1 + e^(2(a+b))) / 2,
 * the reciprocal from vrcp14ps plus one Newton step (relative error ~1e-7, as exact as the
 * division of tanh512 at a fraction of its cost). d lies in [1/2, 3e36] under the split's
 * limit, so the reciprocal is a normal float. Masked-off lanes load 0: d = 1/2, t = -1, and
 * their w is 0. */
static inline AVX512 __m512 tanh_split_term512(__m512 ea_half, __m512 eb) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 d = _mm512_fmadd_ps(ea_half, eb, _mm512_set1_ps(0.5f));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
    return _mm512_sub_ps(one, r);
}

/* Four keys per pass, so each vector of ea_half and w is loaded once for four scores. */
static AVX512 void tanh_split_scores_avx512(const float *ea_half, const float *eb,
                                            ac_index n_keys, const float *w, ac_index n,
                                            float *out) {
    ac_index j = 0;
    for (; j + 4 <= n_keys; j += 4) {
        const float *e0 = eb + j * n, *e1 = e0 + n, *e2 = e1 + n, *e3 = e2 + n;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
        for (ac_index h = 0; h < n; h += 16) {
            const __mmask16 m = mask16(n - h);
            const __m512 a = _mm512_maskz_loadu_ps(m, ea_half + h);
            const __m512 wv = _mm512_maskz_loadu_ps(m, w + h);
            acc0 = _mm512_fmadd_ps(wv, tanh_split_term512(a, _mm512_maskz_loadu_ps(m, e0 + h)), acc0);
            acc1 = _mm512_fmadd_ps(wv, tanh_split_term512(a, _mm512_maskz_loadu_ps(m, e1 + h)), acc1);
            acc2 = _mm512_fmadd_ps(wv, tanh_split_term512(a, _mm512_maskz_loadu_ps(m, e2 + h)), acc2);
            acc3 = _mm512_fmadd_ps(wv, tanh_split_term512(a, _mm512_maskz_loadu_ps(m, e3 + h)), acc3);
        }
        out[j] = _mm512_reduce_add_ps(acc0);
        out[j + 1] = _mm512_reduce_add_ps(acc1);
        out[j + 2] = _mm512_reduce_add_ps(acc2);
        out[j + 3] = _mm512_reduce_add_ps(acc3);
    }
    for (; j < n_keys; j++) { /* same per-key arithmetic as above, so blocking never shows */
        const float *e0 = eb + j * n;
        __m512 acc0 = _mm512_setzero_ps();
        for (ac_index h = 0; h < n; h += 16) {
            const __mmask16 m = mask16(n - h);
            acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + h),
                                   tanh_split_term512(_mm512_maskz_loadu_ps(m, ea_half + h),
                                                      _mm512_maskz_loadu_ps(m, e0 + h)), acc0);
        }
        out[j] = _mm512_reduce_add_ps(acc0);
    }
}

static AVX512 void tanh_avx512(const float *x, float *y, ac_index n) {
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        _mm512_mask_storeu_ps(y + i, m, tanh512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* 1 / (1 + exp(-v)); 0 where exp(-v) overflows float32, as sigmoid256 (simd.c). */
static inline AVX512 __m512 sigmoid512(__m512 v) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
    const __mmask16 zero = _mm512_cmp_ps_mask(v, _mm512_set1_ps(AC_SIGMOID_ZERO_BELOW),
                                              _CMP_LT_OQ);
    return _mm512_maskz_div_ps((__mmask16)~zero, one, _mm512_add_ps(one, e));
}

static AVX512 void sigmoid_avx512(const float *x, float *y, ac_index n) {
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        _mm512_mask_storeu_ps(y + i, m, sigmoid512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* gru_cell_avx2 / lstm_cell_avx2 (simd.c) on 16 lanes. */
static AVX512 void gru_cell_avx512(const float *gx, const float *gh, float *h, ac_index H) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (ac_index j = 0; j < H; j += 16) {
        const __mmask16 m = mask16(H - j);
        const __m512 r = sigmoid512(_mm512_add_ps(_mm512_maskz_loadu_ps(m, gx + j),
                                                  _mm512_maskz_loadu_ps(m, gh + j)));
        const __m512 z = sigmoid512(_mm512_add_ps(_mm512_maskz_loadu_ps(m, gx + H + j),
                                                  _mm512_maskz_loadu_ps(m, gh + H + j)));
        const __m512 n = tanh512(_mm512_add_ps(
            _mm512_maskz_loadu_ps(m, gx + 2 * H + j),
            _mm512_mul_ps(r, _mm512_maskz_loadu_ps(m, gh + 2 * H + j))));
        const __m512 hv = _mm512_maskz_loadu_ps(m, h + j);
        _mm512_mask_storeu_ps(h + j, m, _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(one, z), n),
                                                      _mm512_mul_ps(z, hv)));
    }
}

static AVX512 void lstm_cell_avx512(const float *gx, const float *gh, float *h, float *c,
                                    ac_index H) {
    for (ac_index j = 0; j < H; j += 16) {
        const __mmask16 m = mask16(H - j);
#define GATE(k) _mm512_add_ps(_mm512_maskz_loadu_ps(m, gx + (k) * H + j), \
                              _mm512_maskz_loadu_ps(m, gh + (k) * H + j))
        const __m512 i = sigmoid512(GATE(0)), f = sigmoid512(GATE(1));
        const __m512 g = tanh512(GATE(2)), o = sigmoid512(GATE(3));
#undef GATE
        const __m512 cv = _mm512_add_ps(_mm512_mul_ps(f, _mm512_maskz_loadu_ps(m, c + j)),
                                        _mm512_mul_ps(i, g));
        _mm512_mask_storeu_ps(c + j, m, cv);
        _mm512_mask_storeu_ps(h + j, m, _mm512_mul_ps(o, tanh512(cv)));
    }
}

/* GELU (erf form), x Phi(x), in float lanes: Phi(-|x|) = 0.5 erfc(|z|), z = x / sqrt 2, with
 * Numerical Recipes' erfcc, 0.5 t exp(-z^2 + P(t)), t = 1 / (1 + |z| / 2), P of degree 9
 * (1.2e-7 relative everywhere); Phi = that for x < 0 and 1 minus it otherwise (no 1 + erf,
 * which cancels for negative x). What the double lanes of gelu256 (simd.c) bought, kept here:
 *  - z^2 = x^2 / 2 enters the exponent exactly: x^2 = hi + lo by an fma, and the range
 *    reduction subtracts n ln2_hi from -hi / 2 exactly (Cody-Waite), so the exponent's error
 *    is that of P and r, not 87 * 2^-24 (1e-5 relative at x = -13);
 *  - 2^n is applied last, to x * 0.5 t exp(r) on the negative side (vscalefps, one rounding,
 *    gradually underflowing), so the tail keeps its relative accuracy down to the smallest
 *    normal float; |x| is clamped to 20 (beyond it the result is x or 0 either way).
 * t comes from vrcp14ps and one Newton step (~2^-28). GELU(-inf) = NaN (-inf * 0), as the
 * scalar loop and the reference; NaN propagates. About 6x the speed of the double lanes of
 * gelu256 it replaced on AVX-512 machines (5.5 -> 0.9 ns an element, session 14). */
static inline AVX512 __m512 gelu512(__m512 x) {
    const __m512 ax = _mm512_min_ps(_mm512_set1_ps(20.0f),   /* (bound, |x|): NaN stays NaN */
                                    _mm512_abs_ps(x));
    const __m512 d = _mm512_fmadd_ps(_mm512_set1_ps(0.35355339059327373f), ax,  /* 1 + |z|/2 */
                                     _mm512_set1_ps(1.0f));
    __m512 t = _mm512_rcp14_ps(d);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
    __m512 c = _mm512_set1_ps(ERFCC_P9);
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P8));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P7));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P6));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P5));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P4));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P3));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P2));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P1));
    c = _mm512_fmadd_ps(c, t, _mm512_set1_ps(ERFCC_P0));          /* P(t) */
    const __m512 hi = _mm512_mul_ps(ax, ax);
    const __m512 lo = _mm512_fmsub_ps(ax, ax, hi);                      /* x^2 = hi + lo */
    const __m512 half_hi = _mm512_mul_ps(_mm512_set1_ps(-0.5f), hi);   /* exact */
    const __m512 n = _mm512_roundscale_ps(
        _mm512_mul_ps(_mm512_add_ps(half_hi, c), _mm512_set1_ps(EXP_LOG2E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), half_hi);  /* exact */
    r = _mm512_add_ps(r, c);
    r = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), lo, r);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);           /* |r| <= ~0.35 */
    const __m512 p = exp_reduced512(r);
    const __m512 half_t_p = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), t), p);
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    /* x >= 0 (and NaN): x (1 - e); x < 0: 2^n (x 0.5 t exp(r)) */
    const __m512 e = _mm512_scalef_ps(half_t_p, n);
    __m512 y = _mm512_mul_ps(x, _mm512_sub_ps(_mm512_set1_ps(1.0f), e));
    y = _mm512_mask_scalef_ps(y, negative, _mm512_mul_ps(x, half_t_p), n);
    const __mmask16 minus_inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
    return _mm512_mask_mov_ps(y, minus_inf, _mm512_set1_ps(NAN));
}

/* GELU (tanh approximation) as gelu_tanh256 (simd.c): x / (1 + exp(-2u)), exactly 0 where
 * -2u > 88 (x below about -10). */
static inline AVX512 __m512 gelu_tanh512(__m512 x) {
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 u2 = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f),
                                    _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
    const __m512 y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(u2)));
    const __mmask16 far = _mm512_cmp_ps_mask(u2, _mm512_set1_ps(88.0f), _CMP_GT_OQ);
    return _mm512_mask_mul_ps(y, far, x, _mm512_setzero_ps());
}

static AVX512 void gelu_avx512(const float *x, float *y, ac_index n, int tanh_form) {
    for (ac_index i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        _mm512_mask_storeu_ps(y + i, m, tanh_form ? gelu_tanh512(v) : gelu512(v));
    }
}

/* Layer-norm row (simd.h): the 16 chains as two 8-lane vectors per sum. */
static AVX512 void layer_norm_row_avx512(const float *x, float *y, const float *gamma,
                                         const float *beta, ac_index D, float eps,
                                         int center_stats, int center_output) {
    const double k = center_stats ? (double)x[0] : 0.0;
    const ac_index d16 = D - D % LN_CHAINS;
    const __m512d kv = _mm512_set1_pd(k);
    __m512d s1a = _mm512_setzero_pd(), s1b = s1a, s2a = s1a, s2b = s1a;
    for (ac_index d = 0; d < d16; d += LN_CHAINS) {
        const __m512d ta = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + d)), kv);
        const __m512d tb = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + d + 8)), kv);
        s1a = _mm512_add_pd(s1a, ta);
        s1b = _mm512_add_pd(s1b, tb);
        s2a = _mm512_add_pd(s2a, _mm512_mul_pd(ta, ta));
        s2b = _mm512_add_pd(s2b, _mm512_mul_pd(tb, tb));
    }
    double a1[LN_CHAINS], a2[LN_CHAINS];
    _mm512_storeu_pd(a1, s1a);
    _mm512_storeu_pd(a1 + 8, s1b);
    _mm512_storeu_pd(a2, s2a);
    _mm512_storeu_pd(a2 + 8, s2b);
    ln_stats st;
    if (!ln_finish(x, y, gamma, beta, d16, D, k, a1, a2, eps, center_stats, center_output, &st))
        return;
    const __m512 hi = _mm512_set1_ps(st.c_hi), lo = _mm512_set1_ps(st.c_lo);
    const __m512 inv = _mm512_set1_ps(st.inv_f);
    for (ac_index d = 0; d < D; d += 16) {
        const __mmask16 m = mask16(D - d);
        __m512 t = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + d), hi), lo), inv);
        if (gamma) t = _mm512_mul_ps(t, _mm512_maskz_loadu_ps(m, gamma + d));
        if (beta) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, beta + d));
        _mm512_mask_storeu_ps(y + d, m, t);
    }
}

/* out[i, j] = x_i . w_j (+ bias_j) for rows i < M and weight rows j in [j0, j1): see
 * small_gemm_avx2 in simd.c for why (decoding steps). Every element is accumulated in two FMA
 * chains (16-lane blocks alternating between them; two chains keep a single row from waiting on
 * FMA latency), the K % 16 tail masked into the chain its block index gives, then one fixed
 * reduction: a row gives the same bits whether it falls in a block of 4 rows or not. */
static AVX512 void small_gemm_avx512(const float *x, ac_index ldx, ac_index M, ac_index K,
                                     const float *w, ac_index j0, ac_index j1, const float *bias,
                                     float *out, ac_index ldo) {
    const ac_index k32 = K - K % 32;
    const ac_index rest = K - k32;             /* 0..31 trailing columns */
    const __mmask16 m_a = mask16(rest), m_b = mask16(rest > 16 ? rest - 16 : 0);
    for (ac_index j = j0; j < j1; j++) {
        const float *wj = w + j * K;
        const float b = bias ? bias[j] : 0.0f;
        const __m512 wa = _mm512_maskz_loadu_ps(m_a, wj + k32);
        const __m512 wb = _mm512_maskz_loadu_ps(m_b, wj + k32 + 16);
        ac_index i = 0;
        for (; i + 4 <= M; i += 4) {
            const float *x0 = x + i * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
            for (ac_index k = 0; k < k32; k += 32) {
                const __m512 w0 = _mm512_loadu_ps(wj + k), w1 = _mm512_loadu_ps(wj + k + 16);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k), w0, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k), w0, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k), w0, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k), w0, a3);
                c0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k + 16), w1, c0);
                c1 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k + 16), w1, c1);
                c2 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k + 16), w1, c2);
                c3 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k + 16), w1, c3);
            }
            if (rest) {
                a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_a, x0 + k32), wa, a0);
                a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_a, x1 + k32), wa, a1);
                a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_a, x2 + k32), wa, a2);
                a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_a, x3 + k32), wa, a3);
                c0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_b, x0 + k32 + 16), wb, c0);
                c1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_b, x1 + k32 + 16), wb, c1);
                c2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_b, x2 + k32 + 16), wb, c2);
                c3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_b, x3 + k32 + 16), wb, c3);
            }
            out[i * ldo + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, c0)) + b;
            out[(i + 1) * ldo + j] = _mm512_reduce_add_ps(_mm512_add_ps(a1, c1)) + b;
            out[(i + 2) * ldo + j] = _mm512_reduce_add_ps(_mm512_add_ps(a2, c2)) + b;
            out[(i + 3) * ldo + j] = _mm512_reduce_add_ps(_mm512_add_ps(a3, c3)) + b;
        }
        for (; i < M; i++) {
            const float *xi = x + i * ldx;
            __m512 a = _mm512_setzero_ps(), c = a;
            for (ac_index k = 0; k < k32; k += 32) {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(xi + k), _mm512_loadu_ps(wj + k), a);
                c = _mm512_fmadd_ps(_mm512_loadu_ps(xi + k + 16), _mm512_loadu_ps(wj + k + 16), c);
            }
            if (rest) {
                a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_a, xi + k32), wa, a);
                c = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m_b, xi + k32 + 16), wb, c);
            }
            out[i * ldo + j] = _mm512_reduce_add_ps(_mm512_add_ps(a, c)) + b;
        }
    }
}

/* Eight 16-lane sums -> one 8-lane vector of their totals (a transposing reduction). */
static inline AVX512 __m256 reduce8x16(__m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 a4,
                                       __m512 a5, __m512 a6, __m512 a7) {
#define HALVES(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))
    __m256 h01 = _mm256_hadd_ps(HALVES(a0), HALVES(a1)), h23 = _mm256_hadd_ps(HALVES(a2), HALVES(a3));
    __m256 h45 = _mm256_hadd_ps(HALVES(a4), HALVES(a5)), h67 = _mm256_hadd_ps(HALVES(a6), HALVES(a7));
#undef HALVES
    __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
    /* lo = [s0 s1 s2 s3 | s0' s1' s2' s3'] (128-bit halves), hi likewise for s4..s7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* out[j] = scale * q . k[j, :]: eight keys at a time, eight FMA chains over D. The last block
 * reads its missing keys as copies of the last key (results discarded), so every key's score
 * comes from the same instructions wherever it sits. */
static AVX512 void scores_avx512(const float *q, const float *k, ac_index n_keys, ac_index D,
                                 float scale, float *out) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (ac_index j = 0; j < n_keys; j += 8) {
        const float *kr[8];
        for (int t = 0; t < 8; t++) kr[t] = k + AC_MIN(j + t, n_keys - 1) * D;
        __m512 a[8];
        for (int t = 0; t < 8; t++) a[t] = _mm512_setzero_ps();
        for (ac_index d = 0; d < D; d += 16) {
            const __mmask16 m = mask16(D - d);
            const __m512 qd = _mm512_maskz_loadu_ps(m, q + d);
            for (int t = 0; t < 8; t++) a[t] = _mm512_fmadd_ps(qd, _mm512_maskz_loadu_ps(m, kr[t] + d), a[t]);
        }
        __m256 s = _mm256_mul_ps(reduce8x16(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), vscale);
        _mm256_mask_storeu_ps(out + j, (__mmask8)mask16(AC_MIN(8, n_keys - j)), s);
    }
}

/* o += sum_j p[j] v[j, :]: 64 output columns at a time in four registers, even and odd rows in
 * separate chains (so consecutive rows do not wait on each other's FMA), added at the end. */
static AVX512 void weighted_sum_avx512(const float *p, const float *v, ac_index n, ac_index D,
                                       float *o) {
    for (ac_index d0 = 0; d0 < D; d0 += 64) {
        const ac_index width = AC_MIN(64, D - d0);
        __mmask16 m[4];
        __m512 even[4], odd[4];
        for (int i = 0; i < 4; i++) {
            m[i] = mask16(width > 16 * i ? width - 16 * i : 0);
            even[i] = _mm512_maskz_loadu_ps(m[i], o + d0 + 16 * i);
            odd[i] = _mm512_setzero_ps();
        }
        ac_index j = 0;
        if (width == 64) {
            for (; j + 2 <= n; j += 2) {
                const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
                const float *v0 = v + j * D + d0, *v1 = v0 + D;
                for (int i = 0; i < 4; i++) {
                    even[i] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * i), even[i]);
                    odd[i] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * i), odd[i]);
                }
            }
        } else {
            for (; j + 2 <= n; j += 2) {
                const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
                const float *v0 = v + j * D + d0, *v1 = v0 + D;
                for (int i = 0; i < 4; i++) {
                    even[i] = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(m[i], v0 + 16 * i), even[i]);
                    odd[i] = _mm512_fmadd_ps(p1, _mm512_maskz_loadu_ps(m[i], v1 + 16 * i), odd[i]);
                }
            }
        }
        if (j < n) {
            const __m512 p0 = _mm512_set1_ps(p[j]);
            for (int i = 0; i < 4; i++)
                even[i] = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(m[i], v + j * D + d0 + 16 * i), even[i]);
        }
        for (int i = 0; i < 4; i++)
            _mm512_mask_storeu_ps(o + d0 + 16 * i, m[i], _mm512_add_ps(even[i], odd[i]));
    }
}

/* exp2_256 (simd.c) on 16 lanes: the same operations in the same order, so a lane gives the
 * bits exp2_256 gives it. */
static inline AVX512 __m512 exp2_512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-126.0f);
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(lo, x);   /* (bound, x): a NaN x stays NaN */
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.326472615e-03f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.671512991e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550733581e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402224243e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470037e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(p),
                                          _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
    return _mm512_maskz_mov_ps((__mmask16)~underflow, _mm512_castsi512_ps(bits));
}

/* softmax_cols_update_avx2 (simd.c) 16 columns at a time, with the same operations per lane
 * (the same bits); the last columns (fewer than 16) go to the AVX2 version. The flash path on
 * the tile kernel spent ~19% of a 2048-token prefill in the 8-lane version. */
static AVX512 void softmax_cols_update_avx512(float *s, ac_index rows, ac_index cols,
                                              ac_index lds, float *col_max, float *col_sum,
                                              float *correction) {
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    const __m512 log2e = _mm512_set1_ps(EXP_LOG2E);
    ac_index c = 0;
    for (; c + 16 <= cols; c += 16) {
        const __m512 old_max = _mm512_loadu_ps(col_max + c);
        __m512 m = old_max;
        for (ac_index r = 0; r < rows; r++) m = _mm512_max_ps(m, _mm512_loadu_ps(s + r * lds + c));
        /* a column with nothing valid yet shifts by 0: exp(-inf) = 0, never exp(-inf + inf) */
        const __m512 shift =
            _mm512_maskz_mov_ps((__mmask16)~_mm512_cmp_ps_mask(m, minus_inf, _CMP_EQ_OQ), m);
        __m512 total = _mm512_setzero_ps();
        for (ac_index r = 0; r < rows; r++) {
            const __m512 e = exp2_512(
                _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + r * lds + c), shift), log2e));
            _mm512_storeu_ps(s + r * lds + c, e);
            total = _mm512_add_ps(total, e);
        }
        const __m512 corr = exp2_512(_mm512_mul_ps(_mm512_sub_ps(old_max, shift), log2e));
        _mm512_storeu_ps(correction + c, corr);
        _mm512_storeu_ps(col_sum + c, _mm512_fmadd_ps(_mm512_loadu_ps(col_sum + c), corr, total));
        _mm512_storeu_ps(col_max + c, m);
    }
    if (c < cols)
        softmax_cols_update_avx2(s + c, rows, cols - c, lds, col_max + c, col_sum + c,
                                 correction + c);
}

#endif
