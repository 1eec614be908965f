/* SPDX-License-Identifier: Apache-2.0 -- see packed_linear.h */
#include "packed_linear.h"
#include "simd.h"
#include "tile_gemm.h"
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define AC_X86 1
#include <immintrin.h>
#endif

#define W AC_PANEL_WIDTH

void ac_pack_panels_f32(const float *w, ac_index N, ac_index K, float *panels) {
    const ac_index nb = ac_panel_count(N);
    memset(panels, 0, sizeof(float) * nb * K * W);
    for (ac_index j = 0; j < N; j++) {
        float *dst = panels + (j / W) * K * W + j % W;
        const float *src = w + j * K;
        for (ac_index k = 0; k < K; k++) dst[k * W] = src[k];
    }
}

void ac_round_bf16_f32(const float *x, float *y, ac_index n) {
    for (ac_index i = 0; i < n; i++) {
        union { uint32_t u; float f; } v = {(uint32_t)ac_bf16_from_f32(x[i]) << 16};
        y[i] = v.f;
    }
}

/* Where column c of a panel sits in a bfloat16 panel row (see ac_pack_panels_bf16). */
static inline int bf16_slot(int c) { return 32 * (c / 32) + 2 * (c % 16) + (c / 16) % 2; }

void ac_pack_panels_bf16(const float *w, ac_index N, ac_index K, uint16_t *panels) {
    const ac_index nb = ac_panel_count(N);
    memset(panels, 0, sizeof(uint16_t) * nb * K * W);
    for (ac_index j = 0; j < N; j++) {
        uint16_t *dst = panels + (j / W) * K * W + bf16_slot((int)(j % W));
        const float *src = w + j * K;
        for (ac_index k = 0; k < K; k++) dst[k * W] = ac_bf16_from_f32(src[k]);
    }
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* dst (k1 - k0, 64) float32 <- rows [k0, k1) of one bfloat16 panel, in column order. */
static void unpack_bf16_rows_scalar(const uint16_t *p, ac_index k0, ac_index k1, float *dst) {
    for (ac_index k = k0; k < k1; k++) {
        const uint16_t *row = p + k * W;
        float *d = dst + (k - k0) * W;
        for (int half = 0; half < 2; half++)
            for (int c = 0; c < 16; c++) {
                d[32 * half + c] = bf16_to_f32(row[32 * half + 2 * c]);
                d[32 * half + 16 + c] = bf16_to_f32(row[32 * half + 2 * c + 1]);
            }
    }
}

/* ---------------------------------------------------------------- scalar ------------ */
/* acc (M x 64) += x (M rows) . panel, one chain per output over k in order. */
static void panel_group_scalar(const float *x, ac_index ldx, ac_index M, ac_index K,
                               const void *panel, int bf16, float *acc) {
    float wk[W];
    for (ac_index i = 0; i < M; i++) {
        const float *xi = x + i * ldx;
        float *ai = acc + i * W;
        for (ac_index k = 0; k < K; k++) {
            const float xk = xi[k];
            const float *pk = (const float *)panel + k * W;
            if (bf16) {
                unpack_bf16_rows_scalar((const uint16_t *)panel, k, k + 1, wk);
                pk = wk;
            }
            for (int c = 0; c < W; c++) ai[c] += xk * pk[c];
        }
    }
}

/* The vector versions walk K in chunks of K_CHUNK (a 16 KiB slice of the panel, L1-resident)
 * and run every row over a chunk before moving on, so the panel streams from memory once per
 * call whatever M is, while the accumulators of the rows wait in `acc` (ROW_GROUP x 64 floats).
 * Continuing a chain from memory does not change its arithmetic. */
#define K_CHUNK 64
/* Software prefetch two chunks ahead into L2, so the stream keeps going while the FMAs of many
 * rows keep the core busy. On the noisy bench machine runs with it were never slower and at 16
 * rows up to 1.5x faster, but single runs there vary as much; it is kept as a cheap hint. */
#define PF_HINT _MM_HINT_T1
#define PF_CHUNKS 2
/* ... in the 6-row blocks only for float32 panels. With fewer rows per k the loop is bound by
 * its loads, and the four prefetches per k cost 12-20% at one row on the Zen 4 machine (1.76 vs
 * 2.15 us at 192 x 256, 7.5 vs 8.4 us at 768 x 256, 42 vs 49 us at 4032 x 256, one process
 * alternating the two versions): batch-1 decoding is all one-row products. bfloat16 panels
 * (two prefetches per k, and a shift or mask per vector) prefetch at every row count: the
 * batch-1 seq2seq step of bench/models.py took 88-98 us with it, 94-110 without (alternating
 * runs; 64 rows ahead instead of 128: 91-96 us, 256: 84-88). */
#define PF_MIN_ROWS 6
#define ROW_GROUP 16

#ifdef AC_X86
/* ---------------------------------------------------------------- AVX-512 ----------- */
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))

/* The 64 float32 weights of panel row k as four vectors of 16 (columns 0-15, ..., 48-63). A
 * bfloat16 row is two vectors of 32-bit words holding (column c, column c + 16): the low half
 * shifted up is column c, the high half masked is column c + 16, each exactly the float32 the
 * weight was rounded to. */
static inline __attribute__((always_inline)) AVX512 void
panel_row_avx512(const void *panel, const int bf16, ac_index k, __m512 w[4]) {
    if (bf16) {
        const uint16_t *pk = (const uint16_t *)panel + k * W;
        const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
        const __m512i a = _mm512_loadu_si512(pk), b = _mm512_loadu_si512(pk + 32);
        w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
        w[1] = _mm512_castsi512_ps(_mm512_and_si512(a, high));
        w[2] = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
        w[3] = _mm512_castsi512_ps(_mm512_and_si512(b, high));
    } else {
        const float *pk = (const float *)panel + k * W;
        w[0] = _mm512_loadu_ps(pk); w[1] = _mm512_loadu_ps(pk + 16);
        w[2] = _mm512_loadu_ps(pk + 32); w[3] = _mm512_loadu_ps(pk + 48);
    }
}

/* R rows (a compile-time constant after inlining) x one panel, k in [k0, k1): 4R accumulators
 * of 16 lanes, loaded from and stored back to acc (R x 64). */
static inline __attribute__((always_inline)) AVX512 void
panel_rows_avx512(const float *x, ac_index ldx, const int R, ac_index k0, ac_index k1,
                  const void *panel, const int bf16, float *acc_io) {
    __m512 acc[6][4];
    const ac_index row_bytes = bf16 ? W * 2 : W * 4;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(acc_io + r * W + 16 * c);
    for (ac_index k = k0; k < k1; k++) {
        if (R >= PF_MIN_ROWS || bf16) { /* the same row PF_CHUNKS chunks on (past the
                                         * panel's end it is only a hint) */
            const char *ahead = (const char *)panel + (k + PF_CHUNKS * K_CHUNK) * row_bytes;
            for (ac_index line = 0; line < row_bytes; line += 64)
                _mm_prefetch(ahead + line, PF_HINT);
        }
        __m512 w[4];
        panel_row_avx512(panel, bf16, k, w);
        for (int r = 0; r < R; r++) {
            const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
            acc[r][0] = _mm512_fmadd_ps(xb, w[0], acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xb, w[1], acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(xb, w[2], acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(xb, w[3], acc[r][3]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc_io + r * W + 16 * c, acc[r][c]);
}

static inline __attribute__((always_inline)) AVX512 void
panel_group_avx512_t(const float *x, ac_index ldx, ac_index M, ac_index K, const void *panel,
                     const int bf16, float *acc) {
    for (ac_index k0 = 0; k0 < K; k0 += K_CHUNK) {
        const ac_index k1 = AC_MIN(K, k0 + K_CHUNK);
        ac_index i = 0;
        for (; i + 6 <= M; i += 6)
            panel_rows_avx512(x + i * ldx, ldx, 6, k0, k1, panel, bf16, acc + i * W);
        const float *xr = x + i * ldx;
        float *ar = acc + i * W;
        switch (M - i) {
            case 5: panel_rows_avx512(xr, ldx, 5, k0, k1, panel, bf16, ar); break;
            case 4: panel_rows_avx512(xr, ldx, 4, k0, k1, panel, bf16, ar); break;
            case 3: panel_rows_avx512(xr, ldx, 3, k0, k1, panel, bf16, ar); break;
            case 2: panel_rows_avx512(xr, ldx, 2, k0, k1, panel, bf16, ar); break;
            case 1: panel_rows_avx512(xr, ldx, 1, k0, k1, panel, bf16, ar); break;
            default: break;
        }
    }
}

static AVX512 void panel_group_avx512(const float *x, ac_index ldx, ac_index M, ac_index K,
                                      const void *panel, int bf16, float *acc) {
    if (bf16) panel_group_avx512_t(x, ldx, M, K, panel, 1, acc);
    else panel_group_avx512_t(x, ldx, M, K, panel, 0, acc);
}

static AVX512 void unpack_bf16_rows_avx512(const uint16_t *p, ac_index k0, ac_index k1,
                                           float *dst) {
    for (ac_index k = k0; k < k1; k++) {
        __m512 w[4];
        panel_row_avx512(p, 1, k, w);
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(dst + (k - k0) * W + 16 * c, w[c]);
    }
}

/* ---------------------------------------------------------------- AVX2 -------------- */
#define AVX2 __attribute__((target("avx2,fma")))

/* Quarter q of panel row k as two vectors of 8: columns 32h + 8s + (0..7) and 32h + 16 + 8s +
 * (0..7), h = q / 2, s = q % 2 (the columns one vector of bfloat16 words holds). */
static inline __attribute__((always_inline)) AVX2 void
quarter_panel_row_avx2(const void *panel, const int bf16, ac_index k, int q, __m256 w[2]) {
    const int h = q / 2, s = q % 2;
    if (bf16) {
        const __m256i a = _mm256_loadu_si256(
            (const __m256i *)((const uint16_t *)panel + k * W + 32 * h + 16 * s));
        w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
        w[1] = _mm256_castsi256_ps(_mm256_and_si256(a, _mm256_set1_epi32((int)0xffff0000u)));
    } else {
        const float *pk = (const float *)panel + k * W + 32 * h + 8 * s;
        w[0] = _mm256_loadu_ps(pk);
        w[1] = _mm256_loadu_ps(pk + 16);
    }
}

/* Columns [32 * half, 32 * half + 32) of panel row k as four vectors of 8, in column order.
 * bfloat16: the quarters (half, 0) and (half, 1) interleaved; float32 reads the 32 columns in
 * address order (through the quarters, two rows ran 3-6% slower). */
static inline __attribute__((always_inline)) AVX2 void
half_panel_row_avx2(const void *panel, const int bf16, ac_index k, int half, __m256 w[4]) {
    if (bf16) {
        __m256 even[2], odd[2];
        quarter_panel_row_avx2(panel, 1, k, 2 * half, even);     /* columns 0-7, 16-23 */
        quarter_panel_row_avx2(panel, 1, k, 2 * half + 1, odd);  /* columns 8-15, 24-31 */
        w[0] = even[0]; w[1] = odd[0]; w[2] = even[1]; w[3] = odd[1];
    } else {
        const float *pk = (const float *)panel + k * W + 32 * half;
        w[0] = _mm256_loadu_ps(pk); w[1] = _mm256_loadu_ps(pk + 8);
        w[2] = _mm256_loadu_ps(pk + 16); w[3] = _mm256_loadu_ps(pk + 24);
    }
}

/* R rows x half a panel (32 columns at `half` * 32), k in [k0, k1): 4R accumulators of 8
 * lanes. R <= 3: at two rows accumulators, panel vectors and the broadcast fit in the 16 ymm
 * registers; three (float32 only) need one register more, and still beat a pair and a single
 * row (the step's products at three rows: 29-35 against 23 GMAC/s). Float32 rows prefetch
 * this half's two lines PF_CHUNKS chunks ahead (9% at two rows, alternating runs). */
static inline __attribute__((always_inline)) AVX2 void
half_panel_rows_avx2(const float *x, ac_index ldx, const int R, ac_index k0, ac_index k1,
                     const void *panel, const int bf16, int half, float *acc_io) {
    __m256 acc[3][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm256_loadu_ps(acc_io + r * W + 32 * half + 8 * c);
    for (ac_index k = k0; k < k1; k++) {
        if (!bf16) {
            const char *ahead = (const char *)panel + (k + PF_CHUNKS * K_CHUNK) * W * 4 + 128 * half;
            _mm_prefetch(ahead, PF_HINT);
            _mm_prefetch(ahead + 64, PF_HINT);
        }
        __m256 w[4];
        half_panel_row_avx2(panel, bf16, k, half, w);
        for (int r = 0; r < R; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(xb, w[0], acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xb, w[1], acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(xb, w[2], acc[r][2]);
            acc[r][3] = _mm256_fmadd_ps(xb, w[3], acc[r][3]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(acc_io + r * W + 32 * half + 8 * c, acc[r][c]);
}

/* Six rows x a quarter of a panel, k in [k0, k1): twelve accumulators of 8 lanes (with the two
 * weight vectors and the broadcast, 15 of the 16 ymm registers), so each k runs 12 FMAs for
 * 2 weight loads and 6 broadcasts. Each pass prefetches one 64-byte line of the row
 * PF_CHUNKS chunks ahead (the four quarters of a row cover its lines once). */
static inline __attribute__((always_inline)) AVX2 void
quarter_panel_rows_avx2(const float *x, ac_index ldx, const int R, ac_index k0, ac_index k1,
                        const void *panel, const int bf16, int q, float *acc_io) {
    __m256 acc[6][2];
    const ac_index row_bytes = bf16 ? W * 2 : W * 4;
    const int h = q / 2, s = q % 2;
    const int line = bf16 ? (s ? -1 : h) : q;
    float *a0 = acc_io + 32 * h + 8 * s;
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_loadu_ps(a0 + r * W);
        acc[r][1] = _mm256_loadu_ps(a0 + r * W + 16);
    }
    for (ac_index k = k0; k < k1; k++) {
        if (line >= 0)
            _mm_prefetch((const char *)panel + (k + PF_CHUNKS * K_CHUNK) * row_bytes + 64 * line,
                         PF_HINT);
        __m256 w[2];
        quarter_panel_row_avx2(panel, bf16, k, q, w);
        for (int r = 0; r < R; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(xb, w[0], acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xb, w[1], acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(a0 + r * W, acc[r][0]);
        _mm256_storeu_ps(a0 + r * W + 16, acc[r][1]);
    }
}

/* One row x a whole panel, k in [k0, k1): eight accumulators of 8 lanes. Half a panel at a
 * time gives one row only four chains, and four chains with the FMA's 4-cycle latency run one
 * FMA per cycle where the core has two: batch-1 decoding is all one-row products (4000 x 256
 * at one row on the AVX2 Zen machine: 72 -> 57 us; the same loop from L3 is bound by its
 * loads either way). */
static inline __attribute__((always_inline)) AVX2 void
panel_row1_avx2(const float *x, ac_index k0, ac_index k1, const void *panel, const int bf16,
                float *acc_io) {
    __m256 acc[8];
    const ac_index row_bytes = bf16 ? W * 2 : W * 4;
    for (int c = 0; c < 8; c++) acc[c] = _mm256_loadu_ps(acc_io + 8 * c);
    for (ac_index k = k0; k < k1; k++) {
        if (bf16) { /* as panel_rows_avx512: bfloat16 rows prefetch at every row count */
            const char *ahead = (const char *)panel + (k + PF_CHUNKS * K_CHUNK) * row_bytes;
            for (ac_index line = 0; line < row_bytes; line += 64)
                _mm_prefetch(ahead + line, PF_HINT);
        }
        __m256 w[8];
        half_panel_row_avx2(panel, bf16, k, 0, w);
        half_panel_row_avx2(panel, bf16, k, 1, w + 4);
        const __m256 xb = _mm256_broadcast_ss(x + k);
        for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(xb, w[c], acc[c]);
    }
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(acc_io + 8 * c, acc[c]);
}

/* Rows in blocks of six over quarters of the panel (12 chains per block); the last M % 6 rows
 * as blocks that still keep 8 or more chains busy: one row over the whole panel, two or three
 * over halves, four or five over quarters (bfloat16 takes three rows as two and one: its
 * three-row half block spills registers). */
static inline __attribute__((always_inline)) AVX2 void
panel_group_avx2_t(const float *x, ac_index ldx, ac_index M, ac_index K, const void *panel,
                   const int bf16, float *acc) {
#define QUARTERS(R) for (int q = 0; q < 4; q++) \
        quarter_panel_rows_avx2(xr, ldx, R, k0, k1, panel, bf16, q, ar)
#define HALVES(R) for (int h = 0; h < 2; h++) \
        half_panel_rows_avx2(xr, ldx, R, k0, k1, panel, bf16, h, ar)
    const ac_index sixes = M / 6 * 6;
    const float *xr = x + sixes * ldx;
    float *ar = acc + sixes * W;
    for (ac_index k0 = 0; k0 < K; k0 += K_CHUNK) {
        const ac_index k1 = AC_MIN(K, k0 + K_CHUNK);
        for (int q = 0; q < 4; q++)
            for (ac_index i = 0; i < sixes; i += 6)
                quarter_panel_rows_avx2(x + i * ldx, ldx, 6, k0, k1, panel, bf16, q, acc + i * W);
        switch (M - sixes) {
            case 5: QUARTERS(5); break;
            case 4: QUARTERS(4); break;
            case 3:
                if (bf16) { HALVES(2); panel_row1_avx2(xr + 2 * ldx, k0, k1, panel, 1, ar + 2 * W); }
                else HALVES(3);
                break;
            case 2: HALVES(2); break;
            case 1: panel_row1_avx2(xr, k0, k1, panel, bf16, ar); break;
            default: break;
        }
    }
#undef QUARTERS
#undef HALVES
}

static AVX2 void panel_group_avx2(const float *x, ac_index ldx, ac_index M, ac_index K,
                                  const void *panel, int bf16, float *acc) {
    if (bf16) panel_group_avx2_t(x, ldx, M, K, panel, 1, acc);
    else panel_group_avx2_t(x, ldx, M, K, panel, 0, acc);
}

static AVX2 void unpack_bf16_rows_avx2(const uint16_t *p, ac_index k0, ac_index k1, float *dst) {
    for (ac_index k = k0; k < k1; k++)
        for (int half = 0; half < 2; half++) {
            __m256 w[4];
            half_panel_row_avx2(p, 1, k, half, w);
            for (int c = 0; c < 4; c++)
                _mm256_storeu_ps(dst + (k - k0) * W + 32 * half + 8 * c, w[c]);
        }
}
#endif

/* dst (k1 - k0, 64) float32 <- rows [k0, k1) of one bfloat16 panel, in column order. */
static void unpack_bf16_rows(const uint16_t *p, ac_index k0, ac_index k1, float *dst) {
#ifdef AC_X86
    const int level = ac_simd_level();
    if (level == 2) { unpack_bf16_rows_avx512(p, k0, k1, dst); return; }
    if (level == 1) { unpack_bf16_rows_avx2(p, k0, k1, dst); return; }
#endif
    unpack_bf16_rows_scalar(p, k0, k1, dst);
}

/* out[i * ldo + j] = x[i * ldx : +K] . W[j] (+ bias[j]) for i < M and j in panel b (j < N). */
static void packed_linear_panel(const float *x, ac_index ldx, ac_index M, ac_index K,
                                const void *panels, int bf16, ac_index N, ac_index b,
                                const float *bias, float *out, ac_index ldo) {
#ifdef AC_X86
    const int level = ac_simd_level();
#endif
    float acc[ROW_GROUP * W];
    const void *p = bf16 ? (const void *)((const uint16_t *)panels + b * K * W)
                         : (const void *)((const float *)panels + b * K * W);
    const ac_index j0 = b * W, ncols = AC_MIN(W, N - j0);
    for (ac_index g = 0; g < M; g += ROW_GROUP) {
        const ac_index rows = AC_MIN(ROW_GROUP, M - g);
        memset(acc, 0, sizeof(float) * rows * W);
#ifdef AC_X86
        if (level == 2) panel_group_avx512(x + g * ldx, ldx, rows, K, p, bf16, acc);
        else if (level == 1) panel_group_avx2(x + g * ldx, ldx, rows, K, p, bf16, acc);
        else
#endif
            panel_group_scalar(x + g * ldx, ldx, rows, K, p, bf16, acc);
        for (ac_index r = 0; r < rows; r++) {
            float *o = out + (g + r) * ldo + j0;
            for (ac_index c = 0; c < ncols; c++)
                o[c] = acc[r * W + c] + (bias ? bias[j0 + c] : 0.0f);
        }
    }
}

ac_index ac_packed_panel_max_rows(void) {
#ifdef AC_X86
    if (ac_simd_level() > 0) return AC_PACKED_PANEL_MAX_M;
#endif
    return AC_PACKED_SCALAR_MAX_M;
}

void ac_packed_linear_rows(const float *x, ac_index ldx, ac_index M, ac_index K,
                           const void *panels, int panel_type, ac_index N, const float *bias,
                           float *out, ac_index ldo, ac_sgemm_fn sgemm,
                           ac_index small_gemm_macs, int num_threads) {
    const ac_index n_panels = ac_panel_count(N);
    const int bf16 = panel_type == AC_PANELS_BF16;
    const int tile_kernel = ac_tile_gemm_available();
    if (M <= 0 || N <= 0) return;
    if (panel_type == AC_PANELS_I8) {
        ac_packed_linear_i8(x, ldx, M, K, (const int8_t *)panels, N, bias, out, ldo, num_threads);
        return;
    }
    if (M <= ac_packed_panel_max_rows() || K == 0) {
        AC_PARALLEL_FOR(b, n_panels, AC_THREADS(M * N * K, num_threads),
                        packed_linear_panel(x, ldx, M, K, panels, bf16, N, b, bias, out, ldo));
        return;
    }
    /* BLAS: products of tile_m rows x one panel x k_chunk, accumulated over the K chunks. With a
     * small-matrix kernel, each product stays under its size limit so that BLAS reads the panel
     * and x in place; otherwise one product per (row tile, panel), which BLAS packs. */
    ac_index k_chunk = K, tile_m = AC_PACKED_TILE_M;
    if (small_gemm_macs > 0 && !tile_kernel) {
        k_chunk = AC_MIN(K, 256);
        tile_m = AC_MAX(1, AC_MIN(AC_PACKED_TILE_M, small_gemm_macs / (W * k_chunk)));
    }
    /* Rows in equal tiles (64 rows: 32 + 32, not 61 + 3), and the tiles of one panel next to
     * each other: the static schedule then hands each thread a share of the panels with all
     * their rows (with row tiles outermost, one thread got every large tile: at 64 rows and 2
     * threads, a seq2seq step ran 1.3x faster than on 1 thread, now 2x). */
    ac_index row_tiles = (M + tile_m - 1) / tile_m;
    tile_m = (M + row_tiles - 1) / row_tiles;
    row_tiles = (M + tile_m - 1) / tile_m; /* the same count (ceil(M / ceil(M / r)) = r) */
    /* bfloat16: BLAS reads a float32 copy of the panel's K chunk (the same products, the same
     * bits as a float32 panel of the rounded weight), made once for all the row tiles of the
     * panel when there are panels enough for every thread, else once per tile. */
    const ac_index group = (bf16 && n_panels >= num_threads) ? row_tiles : 1;
    const ac_index groups = row_tiles / group;   /* tasks per panel */
    /* Many row tiles (a long document's projection: 32768 rows are 128 tiles): row tiles
     * outermost, so that a thread reads each tile of x once and runs it against every panel
     * (from cache) -- panel-major, x (64 MiB at 32768 x 512) streamed from memory once per
     * panel and float32 products fell from 39 to 28-30 GMAC/s past 4096 rows. Each output is
     * still computed by one task, whole, so the order changes no bit. */
    const int rows_outer = tile_kernel && !bf16 && row_tiles >= 4 * AC_MAX(1, num_threads);
#pragma omp parallel num_threads(AC_THREADS(M * N * K, num_threads))
    {
        /* Each thread's copy. If it cannot be had, that thread's tiles run on the panel kernel
         * (the same values, other roundings) rather than fail. */
        float *copy = bf16 ? (float *)malloc(sizeof(float) * k_chunk * W) : NULL;
#pragma omp for schedule(static)
        for (ac_index t = 0; t < n_panels * groups; t++) {
            const ac_index b = rows_outer ? t % n_panels : t / groups;
            const ac_index r0 = (rows_outer ? t / n_panels : t % groups) * group, j0 = b * W;
            int n = (int)AC_MIN(W, N - j0), ldp = W, lx = (int)ldx, lo = (int)ldo;
            float one = 1.0f, zero = 0.0f;
            char no = 'N';
            if (bf16 && !copy) {
                const ac_index i0 = r0 * tile_m, m = AC_MIN(group * tile_m, M - i0);
                packed_linear_panel(x + i0 * ldx, ldx, m, K, panels, 1, N, b, bias,
                                    out + i0 * ldo, ldo);
                continue;
            }
            for (ac_index k0 = 0; k0 < K; k0 += k_chunk) {
                int k = (int)AC_MIN(k_chunk, K - k0);
                const float *panel = (const float *)panels + (b * K + k0) * W;
                if (bf16) {
                    unpack_bf16_rows((const uint16_t *)panels + b * K * W, k0, k0 + k, copy);
                    panel = copy;
                }
                for (ac_index r = r0; r < r0 + group; r++) {
                    const ac_index i0 = r * tile_m;
                    int m = (int)AC_MIN(tile_m, M - i0);
                    if (tile_kernel) { /* the panel read in place as 4 groups of 16 columns */
                        ac_tile_gemm_f32(m, n, k, x + i0 * ldx + k0, ldx, 1, panel, W,
                                         AC_TILE_GROUP, out + i0 * ldo + j0, ldo, k0 != 0);
                        continue;
                    }
                    /* row-major out[i0:, j0:] (m, n) (+)= x[i0:, k0:] (m, k) . panel[k0:] (k, n)
                     * is the column-major out^T = panel^T . x^T: BLAS sees the panel as (n, k)
                     * with stride 64, x as (k, m) with stride ldx */
                    sgemm(&no, &no, &n, &m, &k, &one, (float *)panel, &ldp,
                          (float *)(x + i0 * ldx + k0), &lx, k0 ? &one : &zero,
                          out + i0 * ldo + j0, &lo);
                }
            }
            if (bias)
                for (ac_index i = r0 * tile_m; i < AC_MIN(M, (r0 + group) * tile_m); i++)
                    for (ac_index c = 0; c < n; c++) out[i * ldo + j0 + c] += bias[j0 + c];
        }
        free(copy);
    }
}
