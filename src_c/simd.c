/* SPDX-License-Identifier: Apache-2.0 -- see simd.h */
#include "simd.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define AC_X86 1
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------- dispatch ---------- */
/* Found on the first call; threads racing on it compute the same value, read and written
 * atomically (a plain int would be a data race in C11's terms). */
static int ac_level = -1;

int ac_simd_level(void) {
    int cached = __atomic_load_n(&ac_level, __ATOMIC_RELAXED);
    if (cached < 0) {
        int level = 0;
#ifdef AC_X86
        const char *force = getenv("ATTNCORE_FORCE_ISA");
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = 1;
        if (level == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
            level = 2;
        if (force && strcmp(force, "scalar") == 0) level = 0;
        if (force && strcmp(force, "avx2") == 0 && level > 1) level = 1;
#endif
        __atomic_store_n(&ac_level, level, __ATOMIC_RELAXED);
        cached = level;
    }
    return cached;
}

const char *ac_simd_name(void) {
    static const char *names[] = {"scalar", "avx2+fma", "avx512"};
    return names[ac_simd_level()];
}

/* ---------------------------------------------------------------- scalar ------------ */
static float max_scalar(const float *x, ac_index n) {
    float m = x[0];
    for (ac_index i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}
/* numpy.argmax of x[lo:hi) (hi > lo): the first NaN, else the first maximum. */
static ac_index argmax_span_scalar(const float *x, ac_index lo, ac_index hi) {
    ac_index best = lo;
    if (x[lo] != x[lo]) return lo;
    for (ac_index i = lo + 1; i < hi; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}
static float exp_shift_sum_scalar(const float *x, float *y, ac_index n, float shift) {
    double s = 0;   /* one float32 chain over 9000 terms lost 1e-5 of the sum */
    for (ac_index i = 0; i < n; i++) {
        const float e = expf(x[i] - shift);
        if (y) y[i] = e;
        s += e;
    }
    return (float)s;
}
static void scale_scalar(float *x, ac_index n, float a) { for (ac_index i = 0; i < n; i++) x[i] *= a; }
static float dot_scalar(const float *a, const float *b, ac_index n) {
    float s = 0.f;
    for (ac_index i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
static void axpy_scalar(float *y, float a, const float *x, ac_index n) {
    for (ac_index i = 0; i < n; i++) y[i] += a * x[i];
}
static float tanh_score_scalar(const float *k, const float *q, const float *w, ac_index n) {
    float s = 0.f;
    for (ac_index i = 0; i < n; i++) s += w[i] * tanhf(k[i] + q[i]);
    return s;
}
static int all_abs_le_scalar(const float *x, ac_index n, float limit) {
    for (ac_index i = 0; i < n; i++)
        if (!(fabsf(x[i]) <= limit)) return 0;
    return 1;
}
static void exp2x_scalar(const float *x, float *y, ac_index n, float scale) {
    for (ac_index i = 0; i < n; i++) y[i] = scale * expf(2 * x[i]);
}
static void tanh_split_scores_scalar(const float *ea_half, const float *eb, ac_index n_keys,
                                     const float *w, ac_index n, float *out) {
    for (ac_index j = 0; j < n_keys; j++) {
        float s = 0;
        for (ac_index h = 0; h < n; h++) s += w[h] * (1 - 1 / (ea_half[h] * eb[j * n + h] + 0.5f));
        out[j] = s;
    }
}
static void tanh_scalar(const float *x, float *y, ac_index n) { for (ac_index i = 0; i < n; i++) y[i] = tanhf(x[i]); }
static inline float sigmoid1(float x) { return 1.f / (1.f + expf(-x)); }
static void sigmoid_scalar(const float *x, float *y, ac_index n) {
    for (ac_index i = 0; i < n; i++) y[i] = sigmoid1(x[i]);
}
static void gru_cell_scalar(const float *gx, const float *gh, float *h, ac_index H) {
    for (ac_index j = 0; j < H; j++) {
        const float r = sigmoid1(gx[j] + gh[j]), z = sigmoid1(gx[H + j] + gh[H + j]);
        const float n = tanhf(gx[2 * H + j] + r * gh[2 * H + j]);
        h[j] = (1.f - z) * n + z * h[j];
    }
}
static void lstm_cell_scalar(const float *gx, const float *gh, float *h, float *c, ac_index H) {
    for (ac_index j = 0; j < H; j++) {
        const float i = sigmoid1(gx[j] + gh[j]), f = sigmoid1(gx[H + j] + gh[H + j]);
        const float g = tanhf(gx[2 * H + j] + gh[2 * H + j]);
        const float o = sigmoid1(gx[3 * H + j] + gh[3 * H + j]);
        c[j] = f * c[j] + i * g;
        h[j] = o * tanhf(c[j]);
    }
}
static void exp_scalar(float *x, ac_index n) { for (ac_index i = 0; i < n; i++) x[i] = expf(x[i]); }
static void scores_scalar(const float *q, const float *k, ac_index n_keys, ac_index D, float scale,
                          float *out) {
    for (ac_index j = 0; j < n_keys; j++) out[j] = dot_scalar(q, k + j * D, D) * scale;
}
static void weighted_sum_scalar(const float *p, const float *v, ac_index n, ac_index D, float *o) {
    for (ac_index j = 0; j < n; j++) axpy_scalar(o, p[j], v + j * D, D);
}
static void small_gemm_scalar(const float *x, ac_index ldx, ac_index M, ac_index K,
                              const float *w, ac_index j0, ac_index j1, const float *bias,
                              float *out, ac_index ldo) {
    for (ac_index j = j0; j < j1; j++)
        for (ac_index i = 0; i < M; i++)
            out[i * ldo + j] = dot_scalar(x + i * ldx, w + j * K, K) + (bias ? bias[j] : 0.0f);
}

/* see ac_softmax_cols_update_f32 */
static void softmax_cols_update_scalar(float *s, ac_index rows, ac_index cols, ac_index lds,
                                       float *col_max, float *col_sum, float *correction) {
    for (ac_index c = 0; c < cols; c++) {
        float m = col_max[c];
        for (ac_index r = 0; r < rows; r++) m = s[r * lds + c] > m ? s[r * lds + c] : m;
        const float shift = m == -INFINITY ? 0.0f : m;
        float total = 0.0f;
        for (ac_index r = 0; r < rows; r++) {
            const float e = expf(s[r * lds + c] - shift);
            s[r * lds + c] = e;
            total += e;
        }
        correction[c] = expf(col_max[c] - shift);
        col_sum[c] = col_sum[c] * correction[c] + total;
        col_max[c] = m;
    }
}

/* Layer-norm row (simd.h). The chains' sums, the statistics and the output tail are shared by
 * the three versions, so their bits agree: the vector loops give lane j of their accumulators
 * exactly chain j's sequence of adds. */
#define LN_CHAINS 16
typedef struct {
    float c_hi, c_lo, inv_f;   /* the float32 output's centre (c_hi + c_lo) and 1 / std */
} ln_stats;
static double ln_sum_chains(const double *s) {
    double half[8];
    for (int j = 0; j < 8; j++) half[j] = s[j] + s[j + 8];
    return ((half[0] + half[1]) + (half[2] + half[3]))
           + ((half[4] + half[5]) + (half[6] + half[7]));
}
/* A row's statistics from its chains' sums over the first d0 elements (a multiple of
 * LN_CHAINS; the rest are added here). Returns 1 when the float32 output is safe; otherwise
 * writes the row's output in float64 and returns 0. It is not safe when 0 < m2 < 2^-200 (a
 * spread under 2^-100: values near the denormals, where c_lo underflows and the float
 * differences lose their digits), nor when m2 + eps < 2^-100 (inv past 2^50), nor when
 * D m2 > 2^200 (|x - c| <= sqrt(D m2) could pass FLT_MAX: values near it of both signs), nor
 * with NaN or inf. (m2 = 0 is a constant row: x - c_hi is exactly 0.) */
static int ln_finish(const float *x, float *y, const float *gamma, const float *beta,
                     ac_index d0, ac_index D, double k, double *s1, double *s2, float eps,
                     int center_stats, int center_output, ln_stats *st) {
    for (ac_index d = d0; d < D; d++) {
        const double t = (double)x[d] - k;
        s1[d % LN_CHAINS] += t;
        s2[d % LN_CHAINS] += t * t;
    }
    const double m1 = ln_sum_chains(s1) / (double)D, q = ln_sum_chains(s2) / (double)D;
    const double mean = k + m1;
    double m2 = center_stats ? q - m1 * m1 : q;
    if (m2 < 0) m2 = 0; /* rounding only: a constant row gives 0 exactly */
    const double center = center_output ? mean : 0.0, inv = 1.0 / sqrt(m2 + (double)eps);
    st->c_hi = (float)center;
    st->c_lo = (float)(center - (double)st->c_hi);
    st->inv_f = (float)inv;
    if ((m2 == 0 || m2 >= 0x1p-200) && m2 + (double)eps >= 0x1p-100 && (double)D * m2 <= 0x1p200)
        return 1;
    for (ac_index d = 0; d < D; d++) {
        double t = ((double)x[d] - center) * inv;
        if (gamma) t *= gamma[d];
        if (beta) t += beta[d];
        y[d] = (float)t;
    }
    return 0;
}
/* The float32 output of elements d0 .. D (the scalar version's row, the vector versions'
 * tail). */
static void ln_output(const float *x, float *y, const float *gamma, const float *beta,
                      ac_index d0, ac_index D, const ln_stats *st) {
    for (ac_index d = d0; d < D; d++) {
        float t = ((x[d] - st->c_hi) - st->c_lo) * st->inv_f;
        if (gamma) t *= gamma[d];
        if (beta) t += beta[d];
        y[d] = t;
    }
}
static void layer_norm_row_scalar(const float *x, float *y, const float *gamma, const float *beta,
                                  ac_index D, float eps, int center_stats, int center_output) {
    const double k = center_stats ? (double)x[0] : 0.0;
    double s1[LN_CHAINS] = {0}, s2[LN_CHAINS] = {0};
    ln_stats st;
    if (ln_finish(x, y, gamma, beta, 0, D, k, s1, s2, eps, center_stats, center_output, &st))
        ln_output(x, y, gamma, beta, 0, D, &st);
}

/* ---------------------------------------------------------------- AVX2 -------------- */
#ifdef AC_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* Constants of the vector exp (exp256 here, exp512 in simd_avx512.h): Cephes-style range
 * reduction x = n ln2 + r (ln2 split in two for accuracy), degree-5 polynomial for exp(r).
 * Inputs below EXP_LO underflow to exactly 0; above EXP_HI they are clamped. */
#define EXP_HI 88.3762626647949f
#define EXP_LO (-87.3365447504f)
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
#define EXP_P0 1.9875691500E-4f
#define EXP_P1 1.3981999507E-3f
#define EXP_P2 8.3334519073E-3f
#define EXP_P3 4.1665795894E-2f
#define EXP_P4 1.6666665459E-1f
#define EXP_P5 5.0000001201E-1f

/* P(r) of exp(r) = 1 + r + r^2 P(r) for a reduced argument |r| <= ~0.35 (x = n ln2 + r): the
 * degree-5 polynomial of exp256, shared by exp_reduced256 and expm1_reduced256. */
static inline AVX2 __m256 exp_poly256(__m256 r) {
    __m256 y = _mm256_set1_ps(EXP_P0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P4));
    return _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P5));
}

/* exp(r) for a reduced argument (exp256, and gelu256's own range reduction). */
static inline AVX2 __m256 exp_reduced256(__m256 r) {
    return _mm256_fmadd_ps(exp_poly256(r), _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
}

/* exp(r) - 1 for a reduced argument, without the cancellation of exp(r) - 1: relatively
 * accurate down to the smallest float (tanh256). */
static inline AVX2 __m256 expm1_reduced256(__m256 r) {
    return _mm256_fmadd_ps(exp_poly256(r), _mm256_mul_ps(r, r), r);
}

/* The range reduction of exp256 and tanh256: x = n ln2 + r, n = floor(x log2(e) + 1/2) (to *n),
 * ln2 subtracted in two parts (Cody-Waite); returns r, |r| <= ~0.35. */
static inline AVX2 __m256 exp_split256(__m256 x, __m256 *n) {
    *n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(*n, _mm256_set1_ps(EXP_LN2_HI), x);
    return _mm256_fnmadd_ps(*n, _mm256_set1_ps(EXP_LN2_LO), x);
}

/* 2^n through the exponent bits, for an integral float n in [-126, 127]. */
static inline AVX2 __m256 pow2_256(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
}

/* exp(x) for 8 floats, 2^n through the exponent bits. Relative error ~2 ulp. Inputs below
 * EXP_LO (including -inf, used for masked scores) give exactly 0. */
static inline AVX2 __m256 exp256(__m256 x) {
    const __m256 hi = _mm256_set1_ps(EXP_HI);
    const __m256 lo = _mm256_set1_ps(EXP_LO);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(hi, x);   /* (bound, x): a NaN x stays NaN, as in exp512 */
    x = _mm256_max_ps(lo, x);
    __m256 fx;
    x = exp_split256(x, &fx);
    const __m256 y = _mm256_mul_ps(exp_reduced256(x), pow2_256(fx));
    return _mm256_andnot_ps(underflow, y);
}

static inline AVX2 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    return _mm_cvtss_f32(s);
}

/* tanh(x) = sign(x) t, t = -m / (2 + m), m = expm1(-2|x|) in (-1, 0]. m comes from exp256's
 * range reduction and polynomial without exp's "+ 1": m = 2^n q + (2^n - 1), q = expm1(r), one
 * fma (for n = 0, |x| <= ln2 / 4, that is q itself). So t keeps its relative accuracy down to
 * the smallest float, where 1 - 2 / (exp(2x) + 1) cancelled (166% off at |x| = 4e-8, 9e-4 at
 * 1e-3), at the same speed (A/B, session 15). -2|x| is clamped at TANH_ARG_LO, where m is -1
 * in float (t = 1); NaN propagates; tanh(-0) = -0. tanh512 (simd_avx512.h) is the same on 16
 * lanes. (vrcpps with Newton steps instead of vdivps measured no faster here.) */
#define TANH_ARG_LO -40.0f
static inline AVX2 __m256 tanh256(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.f);
    __m256 v = _mm256_or_ps(_mm256_add_ps(x, x), sign);                 /* -2|x| */
    v = _mm256_max_ps(_mm256_set1_ps(TANH_ARG_LO), v);                  /* (bound, v): NaN stays */
    __m256 n;
    const __m256 r = exp_split256(v, &n);
    const __m256 s = pow2_256(n);                                      /* n >= -58 */
    const __m256 m = _mm256_fmadd_ps(s, expm1_reduced256(r), _mm256_sub_ps(s, one));
    const __m256 d = _mm256_add_ps(m, _mm256_set1_ps(2.f));
    const __m256 t = _mm256_div_ps(m, d);   /* -t */
    return _mm256_or_ps(_mm256_andnot_ps(sign, t), _mm256_and_ps(sign, x));
}

/* argmax_span_scalar's answer, eight lanes at a time in two interleaved sets (vectors at even
 * and odd multiples of 8: one compare-and-blend chain a set, where one chain bound the loop by
 * its latency): each lane keeps its first maximum (a strict > replaces it) and that index; the
 * answer is the smallest index among the 16 lanes that hold the overall maximum, then the tail
 * (later indices) replaces it only when larger. A NaN anywhere hands the span to the scalar
 * loop, which finds the first one. */
static AVX2 ac_index argmax_span_avx2(const float *x, ac_index lo, ac_index hi) {
    if (hi - lo < 16 || hi > 0x7fffffff) return argmax_span_scalar(x, lo, hi); /* int32 lanes */
    __m256 vmax[2] = {_mm256_loadu_ps(x + lo), _mm256_loadu_ps(x + lo + 8)};
    __m256 nan = _mm256_or_ps(_mm256_cmp_ps(vmax[0], vmax[0], _CMP_UNORD_Q),
                              _mm256_cmp_ps(vmax[1], vmax[1], _CMP_UNORD_Q));
    const __m256i sixteen = _mm256_set1_epi32(16);
    __m256i at[2], vidx[2];
    at[0] = _mm256_add_epi32(_mm256_set1_epi32((int)lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    at[1] = _mm256_add_epi32(at[0], _mm256_set1_epi32(8));
    vidx[0] = at[0];
    vidx[1] = at[1];
    ac_index i = lo + 16;
    for (; i + 16 <= hi; i += 16)
        for (int t = 0; t < 2; t++) {
            const __m256 v = _mm256_loadu_ps(x + i + 8 * t);
            at[t] = _mm256_add_epi32(at[t], sixteen);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            const __m256 gt = _mm256_cmp_ps(v, vmax[t], _CMP_GT_OQ);
            vmax[t] = _mm256_blendv_ps(vmax[t], v, gt);
            vidx[t] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx[t]),
                                                           _mm256_castsi256_ps(at[t]), gt));
        }
    if (_mm256_movemask_ps(nan)) return argmax_span_scalar(x, lo, hi);
    float m[16];
    int idx[16];
    _mm256_storeu_ps(m, vmax[0]);
    _mm256_storeu_ps(m + 8, vmax[1]);
    _mm256_storeu_si256((__m256i *)idx, vidx[0]);
    _mm256_storeu_si256((__m256i *)(idx + 8), vidx[1]);
    ac_index best = idx[0];
    float top = m[0];
    for (int l = 1; l < 16; l++)
        if (m[l] > top || (m[l] == top && idx[l] < best)) { top = m[l]; best = idx[l]; }
    for (; i < hi; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > top) { top = x[i]; best = i; }
    }
    return best;
}

static AVX2 float max_avx2(const float *x, ac_index n) {
    ac_index i = 0;
    float m;
    if (n >= 8) {
        __m256 vm = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 0x55));
        m = _mm_cvtss_f32(s);
    } else {
        m = x[0];
        i = 1;
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* The exponentials' sum over rows past EXP_SUM_BLOCK elements: each block's vector sum is added
 * up in float64 (one vector accumulator over 2^20 elements had lost 2e-5 of the sum); rows up
 * to a block keep the bits of the plain vector sum. */
#define EXP_SUM_BLOCK 1024
static AVX2 float exp_shift_sum_avx2(const float *x, float *y, ac_index n, float shift) {
    __m256 vs = _mm256_set1_ps(shift), acc = _mm256_setzero_ps();
    double total = 0;
    ac_index i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        if (y) _mm256_storeu_ps(y + i, e);
        acc = _mm256_add_ps(acc, e);
        if ((i + 8) % EXP_SUM_BLOCK == 0 && i + 8 < n) {
            total += hsum256(acc);
            acc = _mm256_setzero_ps();
        }
    }
    if (i < n) { /* tail through a padded lane block, so the tail uses the same exp */
        float buf[8];
        ac_index r = n - i;
        for (ac_index j = 0; j < 8; j++) buf[j] = j < r ? x[i + j] - shift : -INFINITY;
        __m256 e = exp256(_mm256_loadu_ps(buf));
        _mm256_storeu_ps(buf, e);
        if (y)
            for (ac_index j = 0; j < r; j++) y[i + j] = buf[j];
        acc = _mm256_add_ps(acc, e);
    }
    return (float)(total + hsum256(acc));
}

static AVX2 void exp_avx2(float *x, ac_index n) {
    ac_index i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float buf[8] = {0};
        ac_index r = n - i;
        for (ac_index j = 0; j < r; j++) buf[j] = x[i + j];
        _mm256_storeu_ps(buf, exp256(_mm256_loadu_ps(buf)));
        for (ac_index j = 0; j < r; j++) x[i + j] = buf[j];
    }
}

static AVX2 void scale_avx2(float *x, ac_index n, float a) {
    __m256 va = _mm256_set1_ps(a);
    ac_index i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), va));
    for (; i < n; i++) x[i] *= a;
}

static AVX2 float dot_avx2(const float *a, const float *b, ac_index n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    ac_index i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float s = hsum256(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static AVX2 void axpy_avx2(float *y, float a, const float *x, ac_index n) {
    __m256 va = _mm256_set1_ps(a);
    ac_index i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

static AVX2 float tanh_score_avx2(const float *k, const float *q, const float *w, ac_index n) {
    __m256 acc = _mm256_setzero_ps();
    ac_index i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 t = tanh256(_mm256_add_ps(_mm256_loadu_ps(k + i), _mm256_loadu_ps(q + i)));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), t, acc);
    }
    if (i < n) {
        float bk[8] = {0}, bw[8] = {0};
        for (ac_index j = 0; j < n - i; j++) { bk[j] = k[i + j] + q[i + j]; bw[j] = w[i + j]; }
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(bw), tanh256(_mm256_loadu_ps(bk)), acc);
    }
    return hsum256(acc);
}

static AVX2 int all_abs_le_avx2(const float *x, ac_index n, float limit) {
    const __m256 vl = _mm256_set1_ps(limit);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int bad = 0;
    ac_index i = 0;
    for (; i + 8 <= n; i += 8)
        bad |= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), vl,
                                                _CMP_NLE_UQ));
    for (; i < n; i++) bad |= !(fabsf(x[i]) <= limit);
    return bad == 0;
}

static AVX2 void exp2x_avx2(const float *x, float *y, ac_index n, float scale) {
    const __m256 vs = _mm256_set1_ps(scale);
    ac_index i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(exp256(_mm256_add_ps(v, v)), vs));
    }
    if (i < n) {
        float b[8] = {0};
        for (ac_index j = 0; j < n - i; j++) b[j] = x[i + j];
        __m256 v = _mm256_loadu_ps(b);
        _mm256_storeu_ps(b, _mm256_mul_ps(exp256(_mm256_add_ps(v, v)), vs));
        for (ac_index j = 0; j < n - i; j++) y[i + j] = b[j];
    }
}

/* t = 1 - 1/d, d = ea_half * eb + 1/2 (see tanh_split_term512), the reciprocal from vrcpps
 * (12 bits) plus one Newton step: relative error ~1.4e-7 (2^-12 squared, plus rounding), within
 * a float32 ulp or two of the division it replaces, which ran at one vector per ~4 cycles and
 * bounded the whole single-query step (bench/RESULTS.md, session 9). d lies in [1/2, 1.5e36]
 * (e^84 / 2) under the split's limit, so 1/d is a normal float and vrcpps never sees 0 or inf. */
static inline AVX2 __m256 tanh_split_term256(__m256 ea_half, __m256 eb) {
    const __m256 one = _mm256_set1_ps(1.f);
    const __m256 d = _mm256_fmadd_ps(ea_half, eb, _mm256_set1_ps(0.5f));
    __m256 r = _mm256_rcp_ps(d);
    r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, one), r);
    return _mm256_sub_ps(one, r);
}

/* the n % 8 tail of one key, in scalar code but with the vector lanes' arithmetic (a buffer
 * of 8 padded with d = 1/2 lanes whose w is 0), so a score does not depend on the blocking */
static inline AVX2 float tanh_split_tail256(const float *ea_half, const float *ej, const float *w,
                                            ac_index h0, ac_index n) {
    float a[8] = {0}, e[8] = {0}, wv[8] = {0};
    for (ac_index h = h0; h < n; h++) {
        a[h - h0] = ea_half[h];
        e[h - h0] = ej[h];
        wv[h - h0] = w[h];
    }
    return hsum256(_mm256_mul_ps(_mm256_loadu_ps(wv),
                                 tanh_split_term256(_mm256_loadu_ps(a), _mm256_loadu_ps(e))));
}

/* Four keys per pass, so each vector of ea_half and w is loaded once for four scores; one key
 * at a time for the rest, with the same per-key arithmetic. */
static AVX2 void tanh_split_scores_avx2(const float *ea_half, const float *eb, ac_index n_keys,
                                        const float *w, ac_index n, float *out,
                                        const void *prefetch, ac_index prefetch_bytes) {
    const ac_index n8 = n - n % 8;
    ac_index j = 0;
    /* two lines of the caller's next operand per 8 terms of four keys: its values, in L1 by the
     * time the weighted sum reads them (the key factors just read are what they evict) */
    const char *pf = (const char *)prefetch;
    ac_index pf_done = pf ? 0 : prefetch_bytes; /* bytes asked for so far */
    for (; j + 4 <= n_keys; j += 4) {
        const float *e0 = eb + j * n, *e1 = e0 + n, *e2 = e1 + n, *e3 = e2 + n;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
        for (ac_index h = 0; h < n8; h += 8) {
            if (pf_done < prefetch_bytes) {
                _mm_prefetch(pf + pf_done, _MM_HINT_T0);
                if (pf_done + 64 < prefetch_bytes) _mm_prefetch(pf + pf_done + 64, _MM_HINT_T0);
                pf_done += 128;
            }
            const __m256 a = _mm256_loadu_ps(ea_half + h);
            const __m256 wv = _mm256_loadu_ps(w + h);
            acc0 = _mm256_fmadd_ps(wv, tanh_split_term256(a, _mm256_loadu_ps(e0 + h)), acc0);
            acc1 = _mm256_fmadd_ps(wv, tanh_split_term256(a, _mm256_loadu_ps(e1 + h)), acc1);
            acc2 = _mm256_fmadd_ps(wv, tanh_split_term256(a, _mm256_loadu_ps(e2 + h)), acc2);
            acc3 = _mm256_fmadd_ps(wv, tanh_split_term256(a, _mm256_loadu_ps(e3 + h)), acc3);
        }
        out[j] = hsum256(acc0);
        out[j + 1] = hsum256(acc1);
        out[j + 2] = hsum256(acc2);
        out[j + 3] = hsum256(acc3);
        if (n8 < n) {
            out[j] += tanh_split_tail256(ea_half, e0, w, n8, n);
            out[j + 1] += tanh_split_tail256(ea_half, e1, w, n8, n);
            out[j + 2] += tanh_split_tail256(ea_half, e2, w, n8, n);
            out[j + 3] += tanh_split_tail256(ea_half, e3, w, n8, n);
        }
    }
    for (; j < n_keys; j++) {
        const float *ej = eb + j * n;
        __m256 acc = _mm256_setzero_ps();
        for (ac_index h = 0; h < n8; h += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + h),
                                  tanh_split_term256(_mm256_loadu_ps(ea_half + h),
                                                     _mm256_loadu_ps(ej + h)), acc);
        out[j] = hsum256(acc);
        if (n8 < n) out[j] += tanh_split_tail256(ea_half, ej, w, n8, n);
    }
}

static AVX2 void tanh_avx2(const float *x, float *y, ac_index n) {
    ac_index i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, tanh256(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float b[8] = {0};
        for (ac_index j = 0; j < n - i; j++) b[j] = x[i + j];
        _mm256_storeu_ps(b, tanh256(_mm256_loadu_ps(b)));
        for (ac_index j = 0; j < n - i; j++) y[i + j] = b[j];
    }
}

/* 1 / (1 + exp(-x)); 0 where exp(-x) overflows float32 (x < AC_SIGMOID_ZERO_BELOW), as the
 * scalar tail and the reference give (exp256 saturates there, which left ~4e-39, and made
 * swish(-inf) = -inf * 4e-39 = -inf in the vector body but NaN in the tail). */
#define AC_SIGMOID_ZERO_BELOW -88.7228f
static inline AVX2 __m256 sigmoid256(__m256 v) {
    const __m256 one = _mm256_set1_ps(1.f);
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), v));
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 below = _mm256_cmp_ps(v, _mm256_set1_ps(AC_SIGMOID_ZERO_BELOW), _CMP_LT_OQ);
    return _mm256_andnot_ps(below, s);
}

/* Numerical Recipes' erfcc: erfc(z) ~ t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0, with
 * P(t) = ERFCC_P0 + t (ERFCC_P1 + ... + t ERFCC_P9) (1.2e-7 relative everywhere): the GELUs
 * gelu256 here and gelu512 (simd_avx512.h). */
#define ERFCC_P9 0.17087277f
#define ERFCC_P8 -0.82215223f
#define ERFCC_P7 1.48851587f
#define ERFCC_P6 -1.13520398f
#define ERFCC_P5 0.27886807f
#define ERFCC_P4 -0.18628806f
#define ERFCC_P3 0.09678418f
#define ERFCC_P2 0.37409196f
#define ERFCC_P1 1.00002368f
#define ERFCC_P0 -1.26551223f

/* v 2^n for an integral float n in [-300, 63] and |v| < 2^40 where n >= -190, with one
 * rounding, as vscalefps (AVX-512) gives: 2^(n + 64) is a normal float, the first product is
 * exact, the second rounds once (gradually underflowing). Below -190 the result is a signed
 * zero (|v 2^n| < 2^-150 for the |v| < 2^60 GELU passes there; a huge |x| gives a huge v). */
static inline AVX2 __m256 scale_pow2_256(__m256 v, __m256 n) {
    const __m256 far = _mm256_cmp_ps(n, _mm256_set1_ps(-190.0f), _CMP_LT_OQ);
    const __m256i k = _mm256_cvtps_epi32(_mm256_max_ps(n, _mm256_set1_ps(-190.0f)));
    const __m256 up = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127 + 64)), 23));
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(v, up), _mm256_set1_ps(5.421010862427522e-20f));
    return _mm256_blendv_ps(y, _mm256_mul_ps(v, _mm256_setzero_ps()), far);  /* 2^-64 above */
}

/* GELU (erf form), x Phi(x), in float lanes: Phi(-|x|) = 0.5 erfc(|z|), z = x / sqrt 2, from
 * Numerical Recipes' erfcc, 0.5 t exp(-z^2 + P(t)), t = 1 / (1 + |z| / 2), P of degree 9
 * (1.2e-7 relative everywhere), and Phi = 1 minus that for x >= 0. No 1 + erf(z): it cancels for
 * negative x (a rational erf's 6.5e-8 was 2% of the output at x = -4.7 and 200% at -5.55, a
 * review found, session 11). Float lanes keep the relative accuracy (5e-7 measured) because
 *  - z^2 = x^2 / 2 enters the exponent exactly: x^2 = hi + lo by an fma, and the range
 *    reduction subtracts n ln2_hi from -hi / 2 exactly (Cody-Waite), so the exponent's error
 *    is that of P and r, not 87 * 2^-24 (1e-5 relative at x = -13);
 *  - 2^n is applied last, to x * 0.5 t exp(r) on the negative side, with one rounding
 *    (gradually underflowing), so the tail is accurate down to the smallest normal float;
 *    |x| is clamped to 20 (beyond it the result is x or 0 either way).
 * t: vrcpps and two Newton steps. GELU(-inf) = NaN (-inf * 0), as the scalar loop and the
 * reference; NaN propagates. gelu512 (simd_avx512.h) is the same on 16 lanes. Session 14:
 * about 5x the speed of the double lanes this replaced. */
static inline AVX2 __m256 gelu256(__m256 x) {
    const __m256 ax = _mm256_min_ps(_mm256_set1_ps(20.0f),   /* (bound, |x|): NaN stays NaN */
                                    _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
    const __m256 d = _mm256_fmadd_ps(_mm256_set1_ps(0.35355339059327373f), ax,  /* 1 + |z|/2 */
                                     _mm256_set1_ps(1.0f));
    __m256 t = _mm256_rcp_ps(d);
    t = _mm256_mul_ps(t, _mm256_fnmadd_ps(d, t, _mm256_set1_ps(2.0f)));
    t = _mm256_mul_ps(t, _mm256_fnmadd_ps(d, t, _mm256_set1_ps(2.0f)));
    __m256 c = _mm256_set1_ps(ERFCC_P9);
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P8));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P7));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P6));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P5));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P4));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P3));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P2));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P1));
    c = _mm256_fmadd_ps(c, t, _mm256_set1_ps(ERFCC_P0));          /* P(t) */
    const __m256 hi = _mm256_mul_ps(ax, ax);
    const __m256 lo = _mm256_fmsub_ps(ax, ax, hi);                      /* x^2 = hi + lo */
    const __m256 half_hi = _mm256_mul_ps(_mm256_set1_ps(-0.5f), hi);   /* exact */
    const __m256 n = _mm256_round_ps(
        _mm256_mul_ps(_mm256_add_ps(half_hi, c), _mm256_set1_ps(EXP_LOG2E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), half_hi);  /* exact */
    r = _mm256_add_ps(r, c);
    r = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), lo, r);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);           /* |r| <= ~0.35 */
    const __m256 p = exp_reduced256(r);
    const __m256 half_t_p = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), t), p);
    /* x >= 0 (and NaN): x (1 - e); x < 0: 2^n (x 0.5 t exp(r)) */
    const __m256 e = scale_pow2_256(half_t_p, n);
    const __m256 pos = _mm256_mul_ps(x, _mm256_sub_ps(_mm256_set1_ps(1.0f), e));
    const __m256 neg = scale_pow2_256(_mm256_mul_ps(x, half_t_p), n);
    const __m256 y = _mm256_blendv_ps(pos, neg, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_blendv_ps(y, _mm256_set1_ps(NAN),
                            _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
}

/* GELU with the tanh approximation, 0.5 x (1 + tanh u), u = sqrt(2 / pi) (x + 0.044715 x^3),
 * written x sigmoid(2u) = x / (1 + exp(-2u)): the same value without 1 + tanh cancelling for
 * negative x. Exactly 0 past exp256's range (2u below -88, x below about -10), where the
 * value in double is under 1e-37 (and the reference's 1 + tanh gives 0 too). */
static inline AVX2 __m256 gelu_tanh256(__m256 x) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f),   /* -2 sqrt(2/pi) */
                                    _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    const __m256 e = exp256(u2);
    const __m256 y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
    /* exp256 saturates (~3e38) rather than giving inf: make the far negative side exactly 0 */
    const __m256 far = _mm256_cmp_ps(u2, _mm256_set1_ps(88.0f), _CMP_GT_OQ);
    return _mm256_blendv_ps(y, _mm256_mul_ps(x, _mm256_setzero_ps()), far);
}

/* Layer-norm row (simd.h): the 16 chains as four 4-lane vectors per sum. */
static AVX2 void layer_norm_row_avx2(const float *x, float *y, const float *gamma,
                                     const float *beta, ac_index D, float eps, int center_stats,
                                     int center_output) {
    const double k = center_stats ? (double)x[0] : 0.0;
    const ac_index d16 = D - D % LN_CHAINS;
    const __m256d kv = _mm256_set1_pd(k);
    __m256d s1[4], s2[4];
    for (int v = 0; v < 4; v++) s1[v] = s2[v] = _mm256_setzero_pd();
    for (ac_index d = 0; d < d16; d += LN_CHAINS)
        for (int v = 0; v < 4; v++) {
            const __m256d t = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + d + 4 * v)), kv);
            s1[v] = _mm256_add_pd(s1[v], t);
            s2[v] = _mm256_add_pd(s2[v], _mm256_mul_pd(t, t));
        }
    double a1[LN_CHAINS], a2[LN_CHAINS];
    for (int v = 0; v < 4; v++) {
        _mm256_storeu_pd(a1 + 4 * v, s1[v]);
        _mm256_storeu_pd(a2 + 4 * v, s2[v]);
    }
    ln_stats st;
    if (!ln_finish(x, y, gamma, beta, d16, D, k, a1, a2, eps, center_stats, center_output, &st))
        return;
    const __m256 hi = _mm256_set1_ps(st.c_hi), lo = _mm256_set1_ps(st.c_lo);
    const __m256 inv = _mm256_set1_ps(st.inv_f);
    const ac_index d8 = D - D % 8;
    for (ac_index d = 0; d < d8; d += 8) {
        __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + d), hi), lo), inv);
        if (gamma) t = _mm256_mul_ps(t, _mm256_loadu_ps(gamma + d));
        if (beta) t = _mm256_add_ps(t, _mm256_loadu_ps(beta + d));
        _mm256_storeu_ps(y + d, t);
    }
    ln_output(x, y, gamma, beta, d8, D, &st);
}

/* y = GELU(x) (tanh_form: the tanh approximation) 8 floats at a time, the tail padded into the
 * same lanes (an element's bits must not depend on where the array ends) */
static AVX2 void gelu_avx2(const float *x, float *y, ac_index n, int tanh_form) {
    for (ac_index i = 0; i < n; i += 8) {
        float b[8] = {0};
        const ac_index m = AC_MIN(8, n - i);
        const float *src = x + i;
        if (m < 8) {
            for (ac_index j = 0; j < m; j++) b[j] = x[i + j];
            src = b;
        }
        const __m256 v = _mm256_loadu_ps(src);
        const __m256 r = tanh_form ? gelu_tanh256(v) : gelu256(v);
        if (m == 8) {
            _mm256_storeu_ps(y + i, r);
        } else {
            _mm256_storeu_ps(b, r);
            for (ac_index j = 0; j < m; j++) y[i + j] = b[j];
        }
    }
}

static AVX2 void sigmoid_avx2(const float *x, float *y, ac_index n) {
    ac_index i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, sigmoid256(_mm256_loadu_ps(x + i)));
    if (i < n) { /* the tail in the same lanes (padded), not expf: an element's bits must not
                  * depend on where the array ends (a document alone vs inside a batch) */
        float b[8] = {0};
        for (ac_index j = 0; j < n - i; j++) b[j] = x[i + j];
        _mm256_storeu_ps(b, sigmoid256(_mm256_loadu_ps(b)));
        for (ac_index j = 0; j < n - i; j++) y[i + j] = b[j];
    }
}

/* Lanes [0, n) of an 8-lane maskload / maskstore mask, n in [0, 8]. */
static inline AVX2 __m256i mask8(ac_index n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* ac_gru_cell_f32 / ac_lstm_cell_f32 (simd.h) on 8 lanes; the last partial vector through
 * masked loads and stores (masked-off lanes compute on zeros and are not stored). */
static AVX2 void gru_cell_avx2(const float *gx, const float *gh, float *h, ac_index H) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (ac_index j = 0; j < H; j += 8) {
        const __m256i m = mask8(H - j);
        const __m256 r = sigmoid256(_mm256_add_ps(_mm256_maskload_ps(gx + j, m),
                                                  _mm256_maskload_ps(gh + j, m)));
        const __m256 z = sigmoid256(_mm256_add_ps(_mm256_maskload_ps(gx + H + j, m),
                                                  _mm256_maskload_ps(gh + H + j, m)));
        const __m256 n = tanh256(_mm256_add_ps(_mm256_maskload_ps(gx + 2 * H + j, m),
                                               _mm256_mul_ps(r, _mm256_maskload_ps(gh + 2 * H + j, m))));
        const __m256 hv = _mm256_maskload_ps(h + j, m);
        _mm256_maskstore_ps(h + j, m, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(one, z), n),
                                                    _mm256_mul_ps(z, hv)));
    }
}

static AVX2 void lstm_cell_avx2(const float *gx, const float *gh, float *h, float *c, ac_index H) {
    for (ac_index j = 0; j < H; j += 8) {
        const __m256i m = mask8(H - j);
#define GATE(k) _mm256_add_ps(_mm256_maskload_ps(gx + (k) * H + j, m), \
                              _mm256_maskload_ps(gh + (k) * H + j, m))
        const __m256 i = sigmoid256(GATE(0)), f = sigmoid256(GATE(1));
        const __m256 g = tanh256(GATE(2)), o = sigmoid256(GATE(3));
#undef GATE
        const __m256 cv = _mm256_add_ps(_mm256_mul_ps(f, _mm256_maskload_ps(c + j, m)),
                                        _mm256_mul_ps(i, g));
        _mm256_maskstore_ps(c + j, m, cv);
        _mm256_maskstore_ps(h + j, m, _mm256_mul_ps(o, tanh256(cv)));
    }
}

/* Four keys at a time: four FMA chains over D, then one transposing reduction (hadd) gives the
 * four dot products in one vector. The D % 8 tail is added in scalar, in a fixed order. */
/* out[i, j] = x_i . w_j (+ bias_j) for every row i < M and weight row j in [j0, j1).
 * Weight rows are read once each, from memory, and reused from L1 for 4 rows of x at a time:
 * the shape of a decoding step (M = a few rows), where GEMM libraries spend as long packing
 * the weights as multiplying them. Every element is accumulated by the same sequence of
 * 8-lane FMAs, then one horizontal sum, then the K % 8 tail, whether its row falls in a block
 * of 4 or in the remainder: a row gives the same bits whatever M is. */
static AVX2 void small_gemm_avx2(const float *x, ac_index ldx, ac_index M, ac_index K,
                                 const float *w, ac_index j0, ac_index j1, const float *bias,
                                 float *out, ac_index ldo) {
    const ac_index k8 = K - K % 8;
    for (ac_index j = j0; j < j1; j++) {
        const float *wj = w + j * K;
        const float b = bias ? bias[j] : 0.0f;
        ac_index i = 0;
        for (; i + 4 <= M; i += 4) {
            const float *x0 = x + i * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (ac_index k = 0; k < k8; k += 8) {
                const __m256 wv = _mm256_loadu_ps(wj + k);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), wv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), wv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k), wv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k), wv, a3);
            }
            float s0 = hsum256(a0), s1 = hsum256(a1), s2 = hsum256(a2), s3 = hsum256(a3);
            for (ac_index k = k8; k < K; k++) {
                s0 += x0[k] * wj[k]; s1 += x1[k] * wj[k];
                s2 += x2[k] * wj[k]; s3 += x3[k] * wj[k];
            }
            out[i * ldo + j] = s0 + b;
            out[(i + 1) * ldo + j] = s1 + b;
            out[(i + 2) * ldo + j] = s2 + b;
            out[(i + 3) * ldo + j] = s3 + b;
        }
        for (; i < M; i++) {
            const float *xi = x + i * ldx;
            __m256 a = _mm256_setzero_ps();
            for (ac_index k = 0; k < k8; k += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(xi + k), _mm256_loadu_ps(wj + k), a);
            float si = hsum256(a);
            for (ac_index k = k8; k < K; k++) si += xi[k] * wj[k];
            out[i * ldo + j] = si + b;
        }
    }
}

static AVX2 void scores_avx2(const float *q, const float *k, ac_index n_keys, ac_index D,
                             float scale, float *out) {
    const ac_index d8 = D - D % 8;
    ac_index j = 0;
    for (; j + 4 <= n_keys; j += 4) {
        const float *k0 = k + j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (ac_index d = 0; d < d8; d += 8) {
            __m256 qd = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k1 + d), a1);
            a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k2 + d), a2);
            a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k3 + d), a3);
        }
        __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        float r[4];
        _mm_storeu_ps(r, s);
        for (ac_index d = d8; d < D; d++) {
            r[0] += q[d] * k0[d]; r[1] += q[d] * k1[d]; r[2] += q[d] * k2[d]; r[3] += q[d] * k3[d];
        }
        out[j] = r[0] * scale; out[j + 1] = r[1] * scale;
        out[j + 2] = r[2] * scale; out[j + 3] = r[3] * scale;
    }
    for (; j < n_keys; j++) out[j] = dot_avx2(q, k + j * D, D) * scale;
}

/* o += sum_j p[j] v[j, :], 64 output columns at a time held in eight registers. */
static AVX2 void weighted_sum_avx2(const float *p, const float *v, ac_index n, ac_index D, float *o) {
    ac_index d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
        for (ac_index j = 0; j < n; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *vj = v + j * D + d0;
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), acc[i]);
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
    }
    for (; d0 + 8 <= D; d0 += 8) {
        __m256 acc = _mm256_loadu_ps(o + d0);
        for (ac_index j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * D + d0), acc);
        _mm256_storeu_ps(o + d0, acc);
    }
    for (; d0 < D; d0++) {
        float acc = o[d0];
        for (ac_index j = 0; j < n; j++) acc += p[j] * v[j * D + d0];
        o[d0] = acc;
    }
}

/* 2^x for 8 floats x <= 0: x = n + f with n an integer and |f| <= 1/2, 2^f from a degree-5
 * polynomial fitted for relative error (<= 2e-7 in float32, 1 exactly at f = 0), 2^n added to
 * the exponent bits. About two thirds of exp256's instructions: no two-part reduction by ln 2,
 * no overflow side. x < -126 (including -inf) gives 0. The softmax below takes exp(d) as
 * 2^(d log2(e)) for d = score - max, the difference taken first: it is exact for close scores
 * however large they are (logits of 1e4 keep float32 accuracy), where scaling the scores by
 * log2(e) beforehand would round them at their own magnitude. */
static inline AVX2 __m256 exp2_256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-126.0f);
    const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x);   /* (bound, x): a NaN x stays NaN */
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.326472615e-03f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.671512991e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550733581e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402224243e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931470037e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p),
                                          _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
    return _mm256_andnot_ps(underflow, _mm256_castsi256_ps(bits));
}

/* see ac_softmax_cols_update_f32: 8 columns per vector, the rows walked twice (max, then exp) */
static AVX2 void softmax_cols_update_avx2(float *s, ac_index rows, ac_index cols, ac_index lds,
                                          float *col_max, float *col_sum, float *correction) {
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    const __m256 log2e = _mm256_set1_ps(EXP_LOG2E);
    ac_index c = 0;
    for (; c + 8 <= cols; c += 8) {
        const __m256 old_max = _mm256_loadu_ps(col_max + c);
        __m256 m = old_max;
        for (ac_index r = 0; r < rows; r++) m = _mm256_max_ps(m, _mm256_loadu_ps(s + r * lds + c));
        /* a column with nothing valid yet shifts by 0: exp(-inf) = 0, never exp(-inf + inf) */
        const __m256 shift = _mm256_andnot_ps(_mm256_cmp_ps(m, minus_inf, _CMP_EQ_OQ), m);
        __m256 total = _mm256_setzero_ps();
        for (ac_index r = 0; r < rows; r++) {
            const __m256 e = exp2_256(
                _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + r * lds + c), shift), log2e));
            _mm256_storeu_ps(s + r * lds + c, e);
            total = _mm256_add_ps(total, e);
        }
        const __m256 corr = exp2_256(_mm256_mul_ps(_mm256_sub_ps(old_max, shift), log2e));
        _mm256_storeu_ps(correction + c, corr);
        _mm256_storeu_ps(col_sum + c, _mm256_fmadd_ps(_mm256_loadu_ps(col_sum + c), corr, total));
        _mm256_storeu_ps(col_max + c, m);
    }
    if (c < cols)
        softmax_cols_update_scalar(s + c, rows, cols - c, lds, col_max + c, col_sum + c,
                                   correction + c);
}
#endif

/* ---------------------------------------------------------------- AVX-512 ----------- */
#ifdef AC_X86
#include "simd_avx512.h"
#endif

/* ---------------------------------------------------------------- public ------------ */
#ifdef AC_X86
#define DISPATCH(name, ...)                                                                   \
    (ac_simd_level() == 2 ? name##_avx512(__VA_ARGS__)                                        \
     : ac_simd_level() == 1 ? name##_avx2(__VA_ARGS__) : name##_scalar(__VA_ARGS__))
#else
#define DISPATCH(name, ...) name##_scalar(__VA_ARGS__)
#endif

float ac_max_f32(const float *x, ac_index n) { return DISPATCH(max, x, n); }
/* The span function of the SIMD level (AVX-512 machines run the AVX2 one). */
static ac_index argmax_span(const float *x, ac_index lo, ac_index hi) {
#ifdef AC_X86
    if (ac_simd_level() >= 1) return argmax_span_avx2(x, lo, hi);
#endif
    return argmax_span_scalar(x, lo, hi);
}
ac_index ac_argmax_f32(const float *x, ac_index n, ac_index skip) {
    if (skip < 0 || skip >= n) return argmax_span(x, 0, n);
    /* x[skip] counts as -inf: the answer is the first NaN of either side, else the larger
     * maximum (the left one on a tie); if every other entry is -inf too, index 0 */
    const ac_index a = skip > 0 ? argmax_span(x, 0, skip) : -1;
    const ac_index b = skip + 1 < n ? argmax_span(x, skip + 1, n) : -1;
    if (a >= 0 && x[a] != x[a]) return a;
    if (b >= 0 && x[b] != x[b]) return b;
    const ac_index best = (a < 0 || (b >= 0 && x[b] > x[a])) ? b : a;
    return (best < 0 || x[best] == -INFINITY) ? 0 : best;
}
float ac_exp_shift_sum_f32(float *x, ac_index n, float shift) { return DISPATCH(exp_shift_sum, x, x, n, shift); }
float ac_exp_shift_sum_to_f32(const float *x, float *y, ac_index n, float shift) {
    return DISPATCH(exp_shift_sum, x, y, n, shift);
}
void ac_scale_f32(float *x, ac_index n, float a) { DISPATCH(scale, x, n, a); }
float ac_dot_f32(const float *a, const float *b, ac_index n) { return DISPATCH(dot, a, b, n); }
void ac_axpy_f32(float *y, float a, const float *x, ac_index n) { DISPATCH(axpy, y, a, x, n); }
float ac_tanh_score_f32(const float *k, const float *q, const float *w, ac_index n) {
    return DISPATCH(tanh_score, k, q, w, n);
}
void ac_tanh_f32(const float *x, float *y, ac_index n) { DISPATCH(tanh, x, y, n); }
int ac_all_abs_le_f32(const float *x, ac_index n, float limit) {
    return DISPATCH(all_abs_le, x, n, limit);
}
void ac_exp2x_f32(const float *x, float *y, ac_index n, float scale) {
    DISPATCH(exp2x, x, y, n, scale);
}
void ac_tanh_split_scores_f32(const float *ea_half, const float *eb, ac_index n_keys,
                              const float *w, ac_index n, float *out, const void *prefetch,
                              ac_index prefetch_bytes) {
#ifdef AC_X86
    if (ac_simd_level() == 2) {
        tanh_split_scores_avx512(ea_half, eb, n_keys, w, n, out);
        return;
    }
    if (ac_simd_level() == 1) {
        tanh_split_scores_avx2(ea_half, eb, n_keys, w, n, out, prefetch, prefetch_bytes);
        return;
    }
#endif
    (void)prefetch;
    (void)prefetch_bytes;
    tanh_split_scores_scalar(ea_half, eb, n_keys, w, n, out);
}
void ac_sigmoid_f32(const float *x, float *y, ac_index n) { DISPATCH(sigmoid, x, y, n); }
void ac_gru_cell_f32(const float *gx, const float *gh, float *h, ac_index H) {
    DISPATCH(gru_cell, gx, gh, h, H);
}
void ac_lstm_cell_f32(const float *gx, const float *gh, float *h, float *c, ac_index H) {
    DISPATCH(lstm_cell, gx, gh, h, c, H);
}
/* float32 GELU (erf) and GELU (tanh) on the vector kernels; 0 when the caller must take its
 * scalar loop (no AVX2). */
int ac_gelu_f32(const float *x, float *y, ac_index n, int tanh_form) {
#ifdef AC_X86
    if (ac_simd_level() == 2) {
        gelu_avx512(x, y, n, tanh_form);
        return 1;
    }
    if (ac_simd_level() == 1) {
        gelu_avx2(x, y, n, tanh_form);
        return 1;
    }
#endif
    (void)x; (void)y; (void)n; (void)tanh_form;
    return 0;
}
void ac_layer_norm_row_f32(const float *x, float *y, const float *gamma, const float *beta,
                           ac_index D, float eps, int center_stats, int center_output) {
    DISPATCH(layer_norm_row, x, y, gamma, beta, D, eps, center_stats, center_output);
}
void ac_exp_f32(float *x, ac_index n) { DISPATCH(exp, x, n); }
void ac_softmax_cols_update_f32(float *s, ac_index rows, ac_index cols, ac_index lds,
                                float *col_max, float *col_sum, float *correction) {
#ifdef AC_X86
    if (ac_simd_level() == 2) { /* the same bits as the AVX2 version, twice the lanes */
        softmax_cols_update_avx512(s, rows, cols, lds, col_max, col_sum, correction);
        return;
    }
    if (ac_simd_level() == 1) {
        softmax_cols_update_avx2(s, rows, cols, lds, col_max, col_sum, correction);
        return;
    }
#endif
    softmax_cols_update_scalar(s, rows, cols, lds, col_max, col_sum, correction);
}
void ac_scores_f32(const float *q, const float *k, ac_index n_keys, ac_index D, float scale,
                   float *out) {
    DISPATCH(scores, q, k, n_keys, D, scale, out);
}
void ac_weighted_sum_f32(const float *p, const float *v, ac_index n, ac_index D, float *o) {
    DISPATCH(weighted_sum, p, v, n, D, o);
}
void ac_small_gemm_f32(const float *x, ac_index ldx, ac_index M, ac_index K, const float *w,
                       ac_index j0, ac_index j1, const float *bias, float *out, ac_index ldo) {
    DISPATCH(small_gemm, x, ldx, M, K, w, j0, j1, bias, out, ldo);
}
