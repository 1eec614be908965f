/* SPDX-License-Identifier: Apache-2.0
 *
 * int8 panels: y = x . W^T + b with W stored as int8, one scale per output, and each row of x
 * quantized to int8 (one scale per row) on the fly. See packed_linear.h for the contract.
 *
 * Why: a decoding step at a small batch is bound by streaming its weights, and int8 is a
 * quarter of float32's bytes; on the 2 MiB-L2 Xeon of bench/RESULTS.md the seq2seq step's
 * float32 weights (8 MB) come from L3 at 29 GB/s where a quarter of them could stay in L2 at
 * 145 GB/s. AVX-512 VNNI's vpdpbusd multiplies 64 pairs of (uint8, int8) and adds them into
 * 16 int32 lanes in one instruction, so the products keep up with that stream.
 *
 * Arithmetic: integers are exact, so every kernel (VNNI or the portable loop) computes the
 * same int32 sums, whatever the row blocking, the batch or the thread count; only the last
 * step is float, one fused multiply-add per output, the same on every path.
 */
#ifndef _GNU_SOURCE   /* syscall() (the AMX permission request): declared only with it under -std=c99 */
#define _GNU_SOURCE
#endif
#include "packed_linear.h"
#include "simd.h"
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define AC_X86 1
#include <immintrin.h>
#include <cpuid.h>
#endif
/* AMX is a 64-bit mode feature; its intrinsics came with GCC 11 and LLVM 12 (an older
   compiler builds the VNNI and portable paths only). Apple clang numbers its own releases:
   its 12 is LLVM 10, its 13 LLVM 12. */
#if defined(__apple_build_version__)
#define AC_CLANG_HAS_AMX (__clang_major__ >= 13)
#elif defined(__clang__)
#define AC_CLANG_HAS_AMX (__clang_major__ >= 12)
#endif
#if defined(__x86_64__) && ((defined(__clang__) && AC_CLANG_HAS_AMX) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define AC_AMX 1
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define W AC_PANEL_WIDTH
/* Bytes of quantized rows held at once: rows of x are quantized in chunks of this size, each
 * chunk then multiplied by every panel. The buffer is the call's, on the heap: 68 KiB is half a
 * musl thread's stack, and the malloc cost nothing measurable (1-row 768 x 256, 1-row
 * 4000 x 256 and 16-row 768 x 768 products: 7, 15 and 20 us, alike with a per-thread buffer). */
#define QUANT_BYTES (64 * 1024)
/* Rows of a panel's k groups (4 k values a 32-bit word) and the tail holding scales and sums. */
#define GROUP_BYTES (4 * W)
/* K is padded to a multiple of K_STEP: an AMX tile multiplies 64 k values at a time. */
#define K_STEP 64
/* Rows of an AMX tile; products run AMX in blocks of it, and a last block of AMX_MIN_ROWS or
 * more rows too (its tile then also multiplies rows past the block, whose sums are dropped:
 * at 16 rows AMX ran 500-700 GMAC/s on the Xeon of bench/RESULTS.md, VNNI 130-150). */
#define AMX_ROWS 16
#define AMX_MIN_ROWS 2
/* AMX products split across threads only when they are large (the tile multiply-adds they run)
 * or stream weights past a core's L2: on the 2-core Xeon of bench/RESULTS.md smaller ones ran
 * slower on two threads than on one (16 x 2048 x 512: 30 against 38-43 us, 64 x 768 x 768:
 * 68 against 72-92), the team's wake-up costing more than the product; 16 x 8000 x 512 (4 MB
 * of weights) ran 230 against 114-120. */
#define AMX_PARALLEL_MIN_MACS ((ac_index)48 << 20)
#define AMX_PARALLEL_MIN_BYTES ((ac_index)2 << 20)

static inline ac_index padded_k(ac_index K) { return (K + K_STEP - 1) / K_STEP * K_STEP; }
static inline ac_index panel_bytes(ac_index K) { return ac_i8_panel_rows(K) * W; }

/* The int8 nearest to v * inv, clamped to [-127, 127] (round half to even, as the vector
 * conversion under the default rounding mode). NaN (v NaN or infinite in a row whose inv is 0)
 * gives -127, as the vector clamp's max(s, -127) does, and never reaches the int conversion
 * (undefined for NaN); such a row's scale is NaN, its outputs NaN. */
static inline int quantize_one(float v, float inv) {
    float s = v * inv;
    s = s >= -127.0f ? s : -127.0f;
    s = s <= 127.0f ? s : 127.0f;
    return (int)nearbyintf(s);
}

/* The scale of a row whose largest magnitude is amax, and its reciprocal times 127: 0 and 0
 * for a row of zeros (or one so small that 127 / amax overflows: the row then counts as zero,
 * an error below 1e-37 a weight). */
static inline void row_scale(float amax, float *scale, float *inv) {
    *inv = 127.0f / amax;
    *scale = amax / 127.0f;
    if (!(amax > 0.0f) || !isfinite(*inv)) { *inv = 0.0f; *scale = 0.0f; }
}

/* The float step of one output, sum x x_scale x w_scale + bias, is fma(sum, x_scale * w_scale,
 * bias) with the scales' product in float32, unless that product is not a normal float although
 * neither scale is 0: it overflows (x 1e30 by w 1e13: an inf that turned a 0 sum into NaN) or
 * is subnormal (x and w near 1e-20: a few bits of scale, 13% off). Such outputs come from
 * finish_wide: the scales' product in double (exact), times the sum, plus the bias, then float.
 * NaN scales (a row with NaN or inf) stay on the fma: NaN either way. */
static inline int scales_off_range(float x_scale, float w_scale) {
    const float p = fabsf(x_scale * w_scale);
    return p > FLT_MAX || (p < FLT_MIN && x_scale != 0.0f && w_scale != 0.0f);
}

static float finish_wide(float sum, float x_scale, float w_scale, float bias) {
    /* (volatile: the product rounds to double before the add, as reference.linear_int8's) */
    volatile double p = (double)sum * ((double)x_scale * (double)w_scale);
    return (float)(p + (double)bias);
}

/* AMX needs the CPU's AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24 and 25) and, on Linux,
 * the kernel's permission to use the tile data state, asked once per process. */
static int amx_usable(void) {
#if defined(__linux__) && defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

int ac_int8_amx(void) {
    static int cache = -1;   /* as ac_simd_level's: racing threads find the same value */
    int amx = __atomic_load_n(&cache, __ATOMIC_RELAXED);
    if (amx < 0) {
        const char *force = getenv("ATTNCORE_FORCE_ISA");
        /* ATTNCORE_FORCE_ISA=avx512 keeps VNNI and leaves AMX out */
        amx = ac_int8_vnni() && !(force && strcmp(force, "avx512") == 0) && amx_usable();
        __atomic_store_n(&cache, amx, __ATOMIC_RELAXED);
    }
    return amx;
}

int ac_int8_vnni(void) {
    static int cache = -1;
    int vnni = __atomic_load_n(&cache, __ATOMIC_RELAXED);
    if (vnni < 0) {
        int has = 0;
#ifdef AC_X86
        __builtin_cpu_init();
        /* ATTNCORE_FORCE_ISA=avx2 or scalar lowers ac_simd_level below 2: no VNNI then */
        has = ac_simd_level() == 2 && __builtin_cpu_supports("avx512vnni");
#endif
        vnni = has;
        __atomic_store_n(&cache, vnni, __ATOMIC_RELAXED);
    }
    return vnni;
}

/* The K a panel was packed for, stored after its scales and sums. */
static inline int32_t *stored_k(int8_t *panel, ac_index K) {
    return (int32_t *)(panel + padded_k(K) * W + 8 * W);
}

/* The largest and the smallest non-zero weight scale of the whole weight (0 and 0 for zero
 * rows only), stored after K in the first panel's last row: a row's outputs need the float step
 * in double (finish_wide) only if the row's scale times one of them leaves float32's normal
 * range, so a product tests its rows once and its kernels test every 16 outputs only then. */
static inline float *scale_range(int8_t *panels, ac_index K) {
    return (float *)(stored_k(panels, K) + 1);
}

void ac_pack_panels_i8(const float *w, ac_index N, ac_index K, int8_t *panels) {
    const ac_index stride = panel_bytes(K), kp = padded_k(K);
    memset(panels, 0, (size_t)(ac_panel_count(N) * stride));
    if (K > AC_I8_MAX_K) return;   /* refused by the callers: zero panels, which products refuse */
    for (ac_index b = 0; b < ac_panel_count(N); b++) *stored_k(panels + b * stride, K) = (int32_t)K;
    float high = 0.0f, low = 0.0f;   /* the extremes of scale_range */
    for (ac_index j = 0; j < N; j++) {
        int8_t *p = panels + (j / W) * stride;
        const int c = (int)(j % W);
        const float *src = w + j * K;
        float amax = 0.0f, scale, inv;
        for (ac_index k = 0; k < K; k++) {
            const float a = fabsf(src[k]);
            amax = a > amax ? a : amax;   /* (weights are finite: checked by the caller) */
        }
        row_scale(amax, &scale, &inv);
        int32_t sum = 0;
        for (ac_index k = 0; k < K; k++) {
            const int q = quantize_one(src[k], inv);
            p[(k / 4) * GROUP_BYTES + 4 * c + k % 4] = (int8_t)q;
            sum += q;
        }
        float *scales = (float *)(p + kp * W);
        int32_t *sums = (int32_t *)(p + kp * W + 4 * W);
        scales[c] = scale;
        sums[c] = sum;
        high = scale > high ? scale : high;
        if (scale > 0.0f && (low == 0.0f || scale < low)) low = scale;
    }
    scale_range(panels, K)[0] = high;
    scale_range(panels, K)[1] = low;
}

/* ---------------------------------------------------------------- quantize rows ----- */
/* q[i * ldq + k] = round(x[i, k] * 127 / max_k |x[i, k]|) + 128 as uint8 (128 past K up to the
 * padded K), scales[i] = max_k |x[i, k]| / 127. A row holding NaN or infinity gets scale NaN
 * (and zeros), so its outputs are NaN as the float32 product's would be. */
static void quantize_rows_scalar(const float *x, ac_index ldx, ac_index M, ac_index K,
                                 uint8_t *q, ac_index ldq, float *scales) {
    for (ac_index i = 0; i < M; i++) {
        const float *xi = x + i * ldx;
        uint8_t *qi = q + i * ldq;
        float amax = 0.0f, nan_probe = 0.0f, scale, inv;
        for (ac_index k = 0; k < K; k++) {
            const float a = fabsf(xi[k]);
            amax = a > amax ? a : amax;
            nan_probe += xi[k] * 0.0f;   /* NaN iff some x is NaN or infinite */
        }
        row_scale(amax, &scale, &inv);
        if (nan_probe != nan_probe) { scale = NAN; inv = 0.0f; }
        for (ac_index k = 0; k < K; k++) qi[k] = (uint8_t)(quantize_one(xi[k], inv) + 128);
        for (ac_index k = K; k < padded_k(K); k++) qi[k] = 128;
        scales[i] = scale;
    }
}

/* ---------------------------------------------------------------- scalar ------------ */
/* out[i, j0 + c] for M rows and one panel: the int32 sums, then the float step. */
static void panel_i8_scalar(const uint8_t *q, ac_index ldq, const float *xs, ac_index M,
                            ac_index K, const int8_t *panel, ac_index ncols, const float *bias,
                            float *out, ac_index ldo) {
    const ac_index groups = padded_k(K) / 4;
    const float *ws = (const float *)(panel + groups * GROUP_BYTES);
    const int32_t *sums = (const int32_t *)(panel + groups * GROUP_BYTES + 4 * W);
    for (ac_index i = 0; i < M; i++) {
        const uint8_t *qi = q + i * ldq;
        for (ac_index c = 0; c < ncols; c++) {
            int32_t s = 0;
            for (ac_index g = 0; g < groups; g++) {
                const int8_t *pw = panel + g * GROUP_BYTES + 4 * c;
                const uint8_t *pq = qi + 4 * g;
                s += pq[0] * pw[0] + pq[1] * pw[1] + pq[2] * pw[2] + pq[3] * pw[3];
            }
            const float v = (float)(s - 128 * sums[c]), b = bias ? bias[c] : 0.0f;
            out[i * ldo + c] = scales_off_range(xs[i], ws[c]) ? finish_wide(v, xs[i], ws[c], b)
                                                              : fmaf(v, xs[i] * ws[c], b);
        }
    }
}

#ifdef AC_X86
/* ---------------------------------------------------------------- AVX-512 VNNI ------ */
#define VNNI __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma")))

static VNNI void quantize_rows_vnni(const float *x, ac_index ldx, ac_index M, ac_index K,
                                    uint8_t *q, ac_index ldq, float *scales) {
    const __m512 zero = _mm512_setzero_ps(), lo = _mm512_set1_ps(-127.0f),
                 hi = _mm512_set1_ps(127.0f);
    const __m512i offset = _mm512_set1_epi32(128);
    for (ac_index i = 0; i < M; i++) {
        const float *xi = x + i * ldx;
        uint8_t *qi = q + i * ldq;
        __m512 amax = zero, probe = zero;
        ac_index k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m512 v = _mm512_loadu_ps(xi + k);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            probe = _mm512_add_ps(probe, _mm512_mul_ps(v, zero));
        }
        float m = _mm512_reduce_max_ps(amax), nan_probe = _mm512_reduce_add_ps(probe), scale, inv;
        for (; k < K; k++) {
            const float a = fabsf(xi[k]);
            m = a > m ? a : m;
            nan_probe += xi[k] * 0.0f;
        }
        row_scale(m, &scale, &inv);
        if (nan_probe != nan_probe) { scale = NAN; inv = 0.0f; }
        const __m512 vinv = _mm512_set1_ps(inv);
        for (k = 0; k + 16 <= K; k += 16) {
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps(xi + k), vinv);
            s = _mm512_min_ps(_mm512_max_ps(s, lo), hi);
            const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(s), offset);
            _mm_storeu_si128((__m128i *)(qi + k), _mm512_cvtepi32_epi8(v));
        }
        for (; k < K; k++) qi[k] = (uint8_t)(quantize_one(xi[k], inv) + 128);
        for (; k < padded_k(K); k++) qi[k] = 128;
        scales[i] = scale;
    }
}

/* The outputs of a stored group whose scales' product is out of float32's normal range
 * (scales_off_range), again through finish_wide. A compare and a test per group otherwise. */
static __attribute__((noinline)) VNNI void
finish_lanes_wide(__mmask16 off, __m512 v, float x_scale, const float *ws, __m512 b,
                  float *out) {
    float sums[16], biases[16];
    _mm512_storeu_ps(sums, v);
    _mm512_storeu_ps(biases, b);
    for (int c = 0; c < 16; c++)
        if ((off >> c) & 1) out[c] = finish_wide(sums[c], x_scale, ws[c], biases[c]);
}

static inline __attribute__((always_inline)) VNNI void
finish_off_range_vnni(__m512 v, __m512 scale, float x_scale, const float *ws, __m512 b,
                      __mmask16 live, float *out) {
    const __m512 magnitude = _mm512_abs_ps(scale);
    /* (a lane is off range only if its scale is not 0: the zero-weight test runs rarely) */
    __mmask16 off = _mm512_mask_cmp_ps_mask(live, magnitude, _mm512_set1_ps(FLT_MAX),
                                            _CMP_GT_OQ) |
                    _mm512_mask_cmp_ps_mask(live, magnitude, _mm512_set1_ps(FLT_MIN),
                                            _CMP_LT_OQ);
    if (__builtin_expect(off != 0, 0) && x_scale != 0.0f) {
        off &= _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(live, ws), _mm512_setzero_ps(),
                                  _CMP_NEQ_OQ);
        if (off) finish_lanes_wide(off, v, x_scale, ws, b, out);
    }
}

/* The float step of one 16-column group c of a row: (sum - 128 x weight sums) x row scale x
 * weight scale + bias, stored where the panel has columns (a live mask; none past ncols). */
static inline __attribute__((always_inline)) VNNI void
store_group_vnni(__m512i sum, int c, float x_scale, int check, const int8_t *panel,
                 ac_index groups, ac_index ncols, const float *bias, float *out) {
    const float *ws = (const float *)(panel + groups * GROUP_BYTES);
    const int32_t *sums = (const int32_t *)(panel + groups * GROUP_BYTES + 4 * W);
    const ac_index c0 = 16 * c, left = ncols - c0;
    const __mmask16 live = left >= 16 ? (__mmask16)0xffff
                                      : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(sums + c0), 7);  /* 128 sum */
    const __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + c0) : _mm512_setzero_ps();
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, shift));
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(x_scale), _mm512_loadu_ps(ws + c0));
    _mm512_mask_storeu_ps(out + c0, live, _mm512_fmadd_ps(v, scale, b));
    if (check) finish_off_range_vnni(v, scale, x_scale, ws + c0, b, live, out + c0);
}

/* A row's four groups (the off-range test only with checks: see scale_range). */
static inline __attribute__((always_inline)) VNNI void
store_row_vnni(__m512i s0, __m512i s1, __m512i s2, __m512i s3, float x_scale,
               const int8_t *panel, ac_index groups, ac_index ncols, const float *bias,
               float *out, int checks) {
    store_group_vnni(s0, 0, x_scale, checks, panel, groups, ncols, bias, out);
    store_group_vnni(s1, 1, x_scale, checks, panel, groups, ncols, bias, out);
    store_group_vnni(s2, 2, x_scale, checks, panel, groups, ncols, bias, out);
    store_group_vnni(s3, 3, x_scale, checks, panel, groups, ncols, bias, out);
}

/* R rows (R <= 4, a constant after inlining) x one panel: 4R int32 accumulators of 16 lanes,
 * each k group one 32-bit broadcast of the row's 4 quantized values and 4 vpdpbusd. Blocks of
 * 4 rows, not 6: 24 accumulators beside the 4 weight vectors and the broadcast took 29 of the
 * 32 registers, and GCC 12 then stored every accumulator to the stack after each vpdpbusd
 * (`objdump` of the 6-row block); 4-row blocks run the six products of the seq2seq step
 * 1.5-1.75x faster at 16-64 rows on Zen 4, the same sums (bench/RESULTS.md, session 17). */
static inline __attribute__((always_inline)) VNNI void
panel_rows_vnni(const uint8_t *q, ac_index ldq, const float *xs, const int R, ac_index groups,
                const int8_t *panel, ac_index ncols, const float *bias, float *out,
                ac_index ldo, int checks) {
#define ACC_ROW(r) __m512i a##r##0 = _mm512_setzero_si512(), a##r##1 = a##r##0, \
                           a##r##2 = a##r##0, a##r##3 = a##r##0;
    ACC_ROW(0) ACC_ROW(1) ACC_ROW(2) ACC_ROW(3)
#undef ACC_ROW
#define DOT_ROW(r, qrow, g, w0, w1, w2, w3) do {                                           \
        int32_t word_;                                                                     \
        memcpy(&word_, (qrow) + 4 * (g), 4);                                               \
        const __m512i xb_ = _mm512_set1_epi32(word_);                                      \
        a##r##0 = _mm512_dpbusd_epi32(a##r##0, xb_, w0);                                   \
        a##r##1 = _mm512_dpbusd_epi32(a##r##1, xb_, w1);                                   \
        a##r##2 = _mm512_dpbusd_epi32(a##r##2, xb_, w2);                                   \
        a##r##3 = _mm512_dpbusd_epi32(a##r##3, xb_, w3);                                   \
    } while (0)
    if (R == 1) {
        /* one row: even and odd k groups in two sets of accumulators (rows 0 and 1's: 8
         * chains, four wait on vpdpbusd's latency), added at the end -- integer sums, so the
         * same bits */
        for (ac_index g = 0; g < groups; g += 2) {   /* groups is a multiple of 16 */
            const int8_t *p0 = panel + g * GROUP_BYTES, *p1 = p0 + GROUP_BYTES;
            DOT_ROW(0, q, g, _mm512_loadu_si512(p0), _mm512_loadu_si512(p0 + 64),
                    _mm512_loadu_si512(p0 + 128), _mm512_loadu_si512(p0 + 192));
            DOT_ROW(1, q, g + 1, _mm512_loadu_si512(p1), _mm512_loadu_si512(p1 + 64),
                    _mm512_loadu_si512(p1 + 128), _mm512_loadu_si512(p1 + 192));
        }
        store_row_vnni(_mm512_add_epi32(a00, a10), _mm512_add_epi32(a01, a11),
                       _mm512_add_epi32(a02, a12), _mm512_add_epi32(a03, a13), xs[0], panel,
                       groups, ncols, bias, out, checks);
        return;
    }
    for (ac_index g = 0; g < groups; g++) {
        const int8_t *pg = panel + g * GROUP_BYTES;
        const __m512i w0 = _mm512_loadu_si512(pg), w1 = _mm512_loadu_si512(pg + 64),
                      w2 = _mm512_loadu_si512(pg + 128), w3 = _mm512_loadu_si512(pg + 192);
        DOT_ROW(0, q, g, w0, w1, w2, w3);
        if (R > 1) DOT_ROW(1, q + ldq, g, w0, w1, w2, w3);
        if (R > 2) DOT_ROW(2, q + 2 * ldq, g, w0, w1, w2, w3);
        if (R > 3) DOT_ROW(3, q + 3 * ldq, g, w0, w1, w2, w3);
    }
#undef DOT_ROW
    store_row_vnni(a00, a01, a02, a03, xs[0], panel, groups, ncols, bias, out, checks);
    if (R > 1)
        store_row_vnni(a10, a11, a12, a13, xs[1], panel, groups, ncols, bias, out + ldo, checks);
    if (R > 2)
        store_row_vnni(a20, a21, a22, a23, xs[2], panel, groups, ncols, bias, out + 2 * ldo,
                       checks);
    if (R > 3)
        store_row_vnni(a30, a31, a32, a33, xs[3], panel, groups, ncols, bias, out + 3 * ldo,
                       checks);
}

#ifdef AC_AMX
/* ---------------------------------------------------------------- AMX --------------- */
#define AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512dq,avx512bw,avx512vl," \
                                  "avx512vnni,avx2,fma")))

/* The tile configuration of the AMX blocks: tiles 0-3 the int32 sums of 16 rows x 16 columns
 * (four column groups, a panel), tile 4 the 16 rows' 64 quantized values of a k step, tiles 5-7
 * a column group's weights of that step (16 rows of 4 k values x 16 columns). */
struct __attribute__((aligned(64))) tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* A constant in memory: GCC's _tile_loadconfig tells the compiler it reads 8 bytes only, so
 * a configuration built on the stack could lose the stores to its other 56. */
static const struct tile_config AMX_CONFIG = {
    .palette = 1,
    .bytes_per_row = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS, AMX_ROWS},
};

static AMX void amx_configure(void) { _tile_loadconfig(&AMX_CONFIG); }

/* m <= 16 rows x one panel: the int32 sums by AMX (tdpbusd: uint8 rows times int8 weights, the
 * same exact sums as vpdpbusd) over 16 rows of q (all in its buffer), then the float step of
 * panel_rows_vnni for the m rows. */
static AMX void panel_rows_amx(const uint8_t *q, ac_index ldq, const float *xs, int m,
                               ac_index groups, const int8_t *panel, ac_index ncols,
                               const float *bias, float *out, ac_index ldo, int checks) {
    int32_t sums16[AMX_ROWS * W];
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (ac_index g = 0; g < groups; g += K_STEP / 4) {
        const int8_t *pg = panel + g * GROUP_BYTES;
        _tile_loadd(4, q + 4 * g, ldq);
        _tile_loadd(5, pg, GROUP_BYTES);
        _tile_dpbusd(0, 4, 5);
        _tile_loadd(6, pg + 64, GROUP_BYTES);
        _tile_dpbusd(1, 4, 6);
        _tile_loadd(7, pg + 128, GROUP_BYTES);
        _tile_dpbusd(2, 4, 7);
        _tile_loadd(5, pg + 192, GROUP_BYTES);
        _tile_dpbusd(3, 4, 5);
    }
    _tile_stored(0, sums16, 4 * W);
    _tile_stored(1, sums16 + 16, 4 * W);
    _tile_stored(2, sums16 + 32, 4 * W);
    _tile_stored(3, sums16 + 48, 4 * W);
    const float *ws = (const float *)(panel + groups * GROUP_BYTES);
    const int32_t *wsums = (const int32_t *)(panel + groups * GROUP_BYTES + 4 * W);
    for (int c = 0; c < 4; c++) {
        const ac_index c0 = 16 * c;
        if (c0 >= ncols) break;
        const __mmask16 live = ncols - c0 >= 16 ? (__mmask16)0xffff
                                                 : (__mmask16)((1u << (ncols - c0)) - 1);
        const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(wsums + c0), 7);
        const __m512 wsc = _mm512_loadu_ps(ws + c0);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + c0) : _mm512_setzero_ps();
        for (int r = 0; r < m; r++) {
            const __m512i acc = _mm512_loadu_si512(sums16 + r * W + c0);
            const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, shift));
            const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(xs[r]), wsc);
            _mm512_mask_storeu_ps(out + r * ldo + c0, live, _mm512_fmadd_ps(v, scale, b));
            if (checks)
                finish_off_range_vnni(v, scale, xs[r], ws + c0, b, live, out + r * ldo + c0);
        }
    }
}

static AMX void amx_release(void) { _tile_release(); }
#endif  /* AC_AMX */

static VNNI void panel_i8_vnni(const uint8_t *q, ac_index ldq, const float *xs, ac_index M,
                               ac_index K, const int8_t *panel, ac_index ncols,
                               const float *bias, float *out, ac_index ldo, int checks) {
    const ac_index groups = padded_k(K) / 4;
    ac_index i = 0;
    for (; i + 4 <= M; i += 4)
        panel_rows_vnni(q + i * ldq, ldq, xs + i, 4, groups, panel, ncols, bias, out + i * ldo,
                        ldo, checks);
    const uint8_t *qr = q + i * ldq;
    float *o = out + i * ldo;
    switch (M - i) {
        case 3: panel_rows_vnni(qr, ldq, xs + i, 3, groups, panel, ncols, bias, o, ldo, checks);
                break;
        case 2: panel_rows_vnni(qr, ldq, xs + i, 2, groups, panel, ncols, bias, o, ldo, checks);
                break;
        case 1: panel_rows_vnni(qr, ldq, xs + i, 1, groups, panel, ncols, bias, o, ldo, checks);
                break;
        default: break;
    }
}
#endif

void ac_packed_linear_i8(const float *x, ac_index ldx, ac_index M, ac_index K,
                         const int8_t *panels, ac_index N, const float *bias, float *out,
                         ac_index ldo, int num_threads) {
    const ac_index ldq = padded_k(K), stride = panel_bytes(K), n_panels = ac_panel_count(N);
    /* K past AC_I8_MAX_K (a quantized row would not fit q) or panels packed for another K (the
     * Cython fronts refuse both first): NaN outputs, never a wrong answer */
    if (K > AC_I8_MAX_K || *stored_k((int8_t *)panels, K) != (int32_t)K) {
        for (ac_index i = 0; i < M; i++)
            for (ac_index j = 0; j < N; j++) out[i * ldo + j] = NAN;
        return;
    }
    /* quantized rows, then their scales. Without memory for them (a process at its address-
     * space limit: the outputs were NaN, silently), one row at a time in a buffer on this
     * thread's stack: slower, the same bits (rows are quantized and summed independently). */
    uint8_t one_row[AC_I8_MAX_K] __attribute__((aligned(64)));
    float one_scale[1];
    uint8_t *heap = malloc(QUANT_BYTES + QUANT_BYTES / K_STEP * sizeof(float));
    uint8_t *q = heap ? heap : one_row;
    float *scales = heap ? (float *)(heap + QUANT_BYTES) : one_scale;
    const ac_index capacity = heap ? QUANT_BYTES : (ac_index)sizeof(one_row);
    ac_index chunk = heap ? AC_MAX(1, QUANT_BYTES / AC_MAX(K_STEP, ldq)) : 1;
    const float *range = scale_range((int8_t *)panels, K), high = range[0], low = range[1];
    if (chunk > AMX_ROWS) chunk -= chunk % AMX_ROWS;    /* whole AMX blocks */
    const int vnni = ac_int8_vnni();
#ifdef AC_AMX
    const int amx = ac_int8_amx();
#endif
    for (ac_index i0 = 0; i0 < M; i0 += chunk) {
        const ac_index rows = AC_MIN(chunk, M - i0);
        const float *xi = x + i0 * ldx;
        float *oi = out + i0 * ldo;
#ifdef AC_X86
        if (vnni) quantize_rows_vnni(xi, ldx, rows, K, q, ldq, scales);
        else
#endif
            quantize_rows_scalar(xi, ldx, rows, K, q, ldq, scales);
        /* whether any row of the chunk may need the float step in double (scale_range): almost
         * never, and otherwise the kernels skip their test of every 16 outputs */
        int checks = 0;
        for (ac_index i = 0; i < rows && !checks; i++)
            checks = scales_off_range(scales[i], high) || scales_off_range(scales[i], low);
#ifdef AC_AMX
        if (amx && rows >= AMX_MIN_ROWS) {
            const ac_index tile_macs = (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS * N * ldq;
            const int team = tile_macs >= AMX_PARALLEL_MIN_MACS ||
                                     n_panels * stride >= AMX_PARALLEL_MIN_BYTES
                                 ? AC_TEAM(num_threads) : 1;
#pragma omp parallel num_threads(team)
            {
                amx_configure();  /* per thread: the tile state is a thread's */
#pragma omp for schedule(static)
                for (ac_index b = 0; b < n_panels; b++) {
                    const int8_t *panel = panels + b * stride;
                    const ac_index j0 = b * W, ncols = AC_MIN(W, N - j0);
                    const float *bb = bias ? bias + j0 : NULL;
                    ac_index i = 0;
                    for (; i < rows; i += AMX_ROWS) {
                        const ac_index m = AC_MIN(AMX_ROWS, rows - i);
                        /* a short block: its tile reads 16 rows, which must lie in q */
                        if (m < AMX_MIN_ROWS || (i + AMX_ROWS) * ldq > capacity) break;
                        panel_rows_amx(q + i * ldq, ldq, scales + i, (int)m, ldq / 4, panel,
                                       ncols, bb, oi + i * ldo + j0, ldo, checks);
                    }
                    if (i < rows)
                        panel_i8_vnni(q + i * ldq, ldq, scales + i, rows - i, K, panel, ncols,
                                      bb, oi + i * ldo + j0, ldo, checks);
                }
                amx_release();
            }
            continue;
        }
#endif
#pragma omp parallel for schedule(static) num_threads(AC_THREADS(rows * N * K, num_threads))
        for (ac_index b = 0; b < n_panels; b++) {
            const int8_t *panel = panels + b * stride;
            const ac_index j0 = b * W, ncols = AC_MIN(W, N - j0);
            const float *bb = bias ? bias + j0 : NULL;
#ifdef AC_X86
            if (vnni)
                panel_i8_vnni(q, ldq, scales, rows, K, panel, ncols, bb, oi + j0, ldo, checks);
            else
#endif
                panel_i8_scalar(q, ldq, scales, rows, K, panel, ncols, bb, oi + j0, ldo);
        }
    }
    free(heap);
}
