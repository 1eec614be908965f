/* SPDX-License-Identifier: Apache-2.0 -- see tile_gemm.h */
#include "tile_gemm.h"
#include "simd.h"
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define AC_X86 1
#include <immintrin.h>
#endif

int ac_tile_gemm_available(void) {
#ifdef AC_X86
    return ac_simd_level() >= 1;
#else
    return 0;
#endif
}

#ifdef AC_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* R rows (a constant after inlining) x one group of 16 columns, of which `cols` are real.
 * Full groups load and store whole vectors; a partial one loads B through a lane mask (the
 * masked lanes read nothing and count 0) and moves C through a 16-float buffer. */
static inline __attribute__((always_inline)) AVX2 void
rows_x16(const int R, const int full, ac_index cols, ac_index kk, const float *a, ac_index lda,
         ac_index ak, const float *b, ac_index ldb, float *c, ac_index ldc, int accumulate) {
    __m256 acc[6][2];
    __m256i mask[2];
    if (!full) {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        mask[0] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cols), lane);
        mask[1] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cols - 8), lane);
    }
    for (int r = 0; r < R; r++) {
        if (!accumulate) {
            acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        } else if (full) {
            acc[r][0] = _mm256_loadu_ps(c + r * ldc);
            acc[r][1] = _mm256_loadu_ps(c + r * ldc + 8);
        } else {
            acc[r][0] = _mm256_maskload_ps(c + r * ldc, mask[0]);
            acc[r][1] = _mm256_maskload_ps(c + r * ldc + 8, mask[1]);
        }
    }
    for (ac_index k = 0; k < kk; k++) {
        const float *bk = b + k * ldb;
        __m256 b0, b1;
        if (full) {
            b0 = _mm256_loadu_ps(bk);
            b1 = _mm256_loadu_ps(bk + 8);
        } else {
            b0 = _mm256_maskload_ps(bk, mask[0]);
            b1 = _mm256_maskload_ps(bk + 8, mask[1]);
        }
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_broadcast_ss(a + r * lda + k * ak);
            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        if (full) {
            _mm256_storeu_ps(c + r * ldc, acc[r][0]);
            _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
        } else {
            /* a masked store is slow on AMD cores: go through a buffer */
            float tmp[16];
            _mm256_storeu_ps(tmp, acc[r][0]);
            _mm256_storeu_ps(tmp + 8, acc[r][1]);
            memcpy(c + r * ldc, tmp, sizeof(float) * cols);
        }
    }
}

/* rows [0, m) of one column group: 6-row blocks, then one block of the 1-5 rows left (R is a
 * constant in each call, so every block keeps its accumulators in registers) */
#define ROWS(R, FULL) rows_x16(R, FULL, cols, kk, a + i * lda, lda, ak, b, ldb, c + i * ldc, ldc, \
                               accumulate)
#define GROUP_BODY(FULL)                                                                       \
    ac_index i = 0;                                                                            \
    for (; i + 6 <= m; i += 6) ROWS(6, FULL);                                                  \
    switch (m - i) {                                                                           \
    case 5: ROWS(5, FULL); break;                                                              \
    case 4: ROWS(4, FULL); break;                                                              \
    case 3: ROWS(3, FULL); break;                                                              \
    case 2: ROWS(2, FULL); break;                                                              \
    case 1: ROWS(1, FULL); break;                                                              \
    }

static AVX2 void group_full(ac_index m, ac_index kk, const float *a, ac_index lda, ac_index ak,
                            const float *b, ac_index ldb, float *c, ac_index ldc, int accumulate) {
    const ac_index cols = AC_TILE_GROUP;
    GROUP_BODY(1)
}

static AVX2 void group_part(ac_index m, ac_index cols, ac_index kk, const float *a, ac_index lda,
                            ac_index ak, const float *b, ac_index ldb, float *c, ac_index ldc,
                            int accumulate) {
    GROUP_BODY(0)
}
#undef GROUP_BODY
#undef ROWS

/* ---------------------------------------------------------------- AVX-512 ----------- */
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))

/* R rows (a constant after inlining) x NG column groups of 16 (one vector each), of which the
 * last has its lanes in `last_mask` (all 16 but for a partial last group of the product). The
 * groups are `group` floats apart. The same chains as rows_x16: one FMA per (row, k, column)
 * in k order, from 0 or from C, so the bits equal the AVX2 and scalar kernels'. Up to 8 rows x
 * 2 groups: 16 accumulators, two B loads and eight broadcasts a k for 16 FMAs. */
static inline __attribute__((always_inline)) AVX512 void
rows_x16n_avx512(const int R, const int NG, const __mmask16 last_mask, ac_index kk, const float *a,
                 ac_index lda, ac_index ak, const float *b, ac_index ldb, ac_index group,
                 float *c, ac_index ldc, int accumulate) {
    __m512 acc[8][2];
    __mmask16 mask[2];
    for (int g = 0; g < NG; g++) mask[g] = g == NG - 1 ? last_mask : (__mmask16)0xffff;
    for (int r = 0; r < R; r++)
        for (int g = 0; g < NG; g++)
            acc[r][g] = accumulate ? _mm512_maskz_loadu_ps(mask[g], c + r * ldc + 16 * g)
                                   : _mm512_setzero_ps();
    for (ac_index k = 0; k < kk; k++) {
        __m512 bv[2];
        for (int g = 0; g < NG; g++) /* masked lanes read nothing and count 0 */
            bv[g] = _mm512_maskz_loadu_ps(mask[g], b + g * group + k * ldb);
        for (int r = 0; r < R; r++) {
            const __m512 x = _mm512_set1_ps(a[r * lda + k * ak]);
            for (int g = 0; g < NG; g++) acc[r][g] = _mm512_fmadd_ps(x, bv[g], acc[r][g]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < NG; g++) _mm512_mask_storeu_ps(c + r * ldc + 16 * g, mask[g], acc[r][g]);
}

/* rows [0, m) of NG column groups: 8-row blocks, then one block of the 1-7 rows left */
#define ROWS512(R) rows_x16n_avx512(R, NG, last_mask, kk, a + i * lda, lda, ak, b, ldb, group, \
                                    c + i * ldc, ldc, accumulate)
static inline __attribute__((always_inline)) AVX512 void
groups_avx512(const int NG, const __mmask16 last_mask, ac_index m, ac_index kk, const float *a,
              ac_index lda, ac_index ak, const float *b, ac_index ldb, ac_index group, float *c,
              ac_index ldc, int accumulate) {
    ac_index i = 0;
    for (; i + 8 <= m; i += 8) ROWS512(8);
    switch (m - i) {
    case 7: ROWS512(7); break;
    case 6: ROWS512(6); break;
    case 5: ROWS512(5); break;
    case 4: ROWS512(4); break;
    case 3: ROWS512(3); break;
    case 2: ROWS512(2); break;
    case 1: ROWS512(1); break;
    }
}
#undef ROWS512

static AVX512 void tile_gemm_avx512(ac_index m, ac_index n, ac_index kk, const float *a,
                                    ac_index lda, ac_index ak, const float *b, ac_index ldb,
                                    ac_index group, float *c, ac_index ldc, int accumulate) {
    /* pairs of column groups outside, rows inside: the pair's B slice (kk x 32) is read from
     * L1 by every 8-row block */
    ac_index j0 = 0;
    for (; j0 + 2 * AC_TILE_GROUP <= n; j0 += 2 * AC_TILE_GROUP)
        groups_avx512(2, 0xffff, m, kk, a, lda, ak, b + (j0 / AC_TILE_GROUP) * group, ldb, group,
                      c + j0, ldc, accumulate);
    if (j0 < n) { /* 1 to 31 columns left: one group, or a full group and a partial one */
        const ac_index cols = n - j0, tail = cols % AC_TILE_GROUP;
        const __mmask16 last = tail ? (__mmask16)((1u << tail) - 1) : (__mmask16)0xffff;
        const float *bj = b + (j0 / AC_TILE_GROUP) * group;
        if (cols > AC_TILE_GROUP)
            groups_avx512(2, last, m, kk, a, lda, ak, bj, ldb, group, c + j0, ldc, accumulate);
        else
            groups_avx512(1, last, m, kk, a, lda, ak, bj, ldb, group, c + j0, ldc, accumulate);
    }
}
#endif

/* the same chains in scalar code (callers use BLAS there; this keeps a call correct) */
static void tile_gemm_scalar(ac_index m, ac_index n, ac_index kk, const float *a, ac_index lda,
                             ac_index ak, const float *b, ac_index ldb, ac_index group, float *c,
                             ac_index ldc, int accumulate) {
    for (ac_index i = 0; i < m; i++)
        for (ac_index j = 0; j < n; j++) {
            float s = accumulate ? c[i * ldc + j] : 0.0f;
            const float *bj = b + (j / AC_TILE_GROUP) * group + j % AC_TILE_GROUP;
            for (ac_index k = 0; k < kk; k++) s = fmaf(a[i * lda + k * ak], bj[k * ldb], s);
            c[i * ldc + j] = s;
        }
}

void ac_tile_gemm_f32(ac_index m, ac_index n, ac_index kk, const float *a, ac_index lda,
                      ac_index ak, const float *b, ac_index ldb, ac_index group, float *c,
                      ac_index ldc, int accumulate) {
#ifdef AC_X86
    if (ac_simd_level() == 2) {
        tile_gemm_avx512(m, n, kk, a, lda, ak, b, ldb, group, c, ldc, accumulate);
        return;
    }
    if (ac_simd_level() == 1) {
        /* column groups outside, rows inside: a group's B slice (kk x 16) is read from L1 by
         * every 6-row block */
        for (ac_index j0 = 0; j0 < n; j0 += AC_TILE_GROUP) {
            const float *bj = b + (j0 / AC_TILE_GROUP) * group;
            if (n - j0 >= AC_TILE_GROUP)
                group_full(m, kk, a, lda, ak, bj, ldb, c + j0, ldc, accumulate);
            else
                group_part(m, n - j0, kk, a, lda, ak, bj, ldb, c + j0, ldc, accumulate);
        }
        return;
    }
#endif
    tile_gemm_scalar(m, n, kk, a, lda, ak, b, ldb, group, c, ldc, accumulate);
}

/* rows [0, width) of b (width x kk, row stride ldb) into panels of 16 columns of its transpose:
 * buf[(j / 16) * kk * 16 + k * 16 + j % 16] = b[j * ldb + k] */
static void transpose_scalar(const float *b, ac_index ldb, ac_index j0, ac_index j1,
                             ac_index k0, ac_index kk, float *buf) {
    for (ac_index j = j0; j < j1; j++)
        for (ac_index k = k0; k < kk; k++)
            buf[(j / AC_TILE_GROUP) * kk * AC_TILE_GROUP + k * AC_TILE_GROUP + j % AC_TILE_GROUP] =
                b[j * ldb + k];
}

#ifdef AC_X86
/* 8 x 8 blocks transposed in registers (element by element, the stores to 16-float panel rows
 * ran at ~1 cycle each: a third of a 24 x 256 x 256 product) */
static AVX2 void transpose_avx2(const float *b, ac_index ldb, ac_index width, ac_index kk,
                                float *buf) {
    const ac_index w8 = width - width % 8, k8 = kk - kk % 8;
    for (ac_index j = 0; j < w8; j += 8) {
        float *panel = buf + (j / AC_TILE_GROUP) * kk * AC_TILE_GROUP + j % AC_TILE_GROUP;
        for (ac_index k = 0; k < k8; k += 8) {
            const float *src = b + j * ldb + k;
            __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ldb);
            __m256 r2 = _mm256_loadu_ps(src + 2 * ldb), r3 = _mm256_loadu_ps(src + 3 * ldb);
            __m256 r4 = _mm256_loadu_ps(src + 4 * ldb), r5 = _mm256_loadu_ps(src + 5 * ldb);
            __m256 r6 = _mm256_loadu_ps(src + 6 * ldb), r7 = _mm256_loadu_ps(src + 7 * ldb);
            const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *dst = panel + k * AC_TILE_GROUP;
            _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(dst + AC_TILE_GROUP, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(dst + 2 * AC_TILE_GROUP, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(dst + 3 * AC_TILE_GROUP, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(dst + 4 * AC_TILE_GROUP, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(dst + 5 * AC_TILE_GROUP, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(dst + 6 * AC_TILE_GROUP, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(dst + 7 * AC_TILE_GROUP, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        transpose_scalar(b, ldb, j, j + 8, k8, kk, buf);
    }
    transpose_scalar(b, ldb, w8, width, 0, kk, buf);
}
#endif

static void transpose_into_panels(const float *b, ac_index ldb, ac_index width, ac_index kk,
                                  float *buf) {
#ifdef AC_X86
    if (ac_simd_level() >= 1) {
        transpose_avx2(b, ldb, width, kk, buf);
        return;
    }
#endif
    transpose_scalar(b, ldb, 0, width, 0, kk, buf);
}

/* The calling thread's copy buffer, kept between calls and grown when a call needs more, so a
 * product neither mallocs nor touches fresh pages each time (a free()d block of this size can
 * go back to the system, and a page fault costs ~1.7 us on the VMs of bench/RESULTS.md): at
 * most kk * AC_TILE_MATMUL_COLS floats (256 KiB, kk <= 1024 in the callers), held in a
 * pthread key whose destructor frees it when the thread exits. */
typedef struct {
    size_t floats;
    float data[];
} scratch_block;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;

static void make_scratch_key(void) { scratch_key_ok = pthread_key_create(&scratch_key, free) == 0; }

static float *thread_scratch(size_t floats) {
    pthread_once(&scratch_once, make_scratch_key);
    if (!scratch_key_ok) return NULL;
    scratch_block *block = (scratch_block *)pthread_getspecific(scratch_key);
    if (!block || block->floats < floats) {
        free(block);
        block = (scratch_block *)malloc(sizeof(scratch_block) + sizeof(float) * floats);
        if (block) block->floats = floats;
        if (pthread_setspecific(scratch_key, block) != 0) {
            free(block);
            return NULL;
        }
    }
    return block ? block->data : NULL;
}

/* c[i, j] = alpha * c[i, j] + bias[j] for rows [0, m), columns [j0, j1), after the product
 * and while it is still in cache: matmul's alpha (skipped at 1), linear's bias (NULL: none) */
static void epilogue(float *c, ac_index ldc, ac_index m, ac_index j0, ac_index j1, float alpha,
                     const float *bias) {
    if (alpha != 1.0f)
        for (ac_index i = 0; i < m; i++)
            for (ac_index j = j0; j < j1; j++) c[i * ldc + j] *= alpha;
    if (bias)
        for (ac_index i = 0; i < m; i++)
            for (ac_index j = j0; j < j1; j++) c[i * ldc + j] += bias[j];
}

int ac_tile_matmul_f32(ac_index m, ac_index j0, ac_index j1, ac_index kk, float alpha,
                       const float *a, ac_index lda, const float *b, ac_index ldb, int trans_b,
                       const float *bias, float *c, ac_index ldc) {
    if (!trans_b && ldb <= AC_TILE_INPLACE_MAX_LDB) {
        ac_tile_gemm_f32(m, j1 - j0, kk, a, lda, 1, b + j0, ldb, AC_TILE_GROUP, c + j0, ldc, 0);
        epilogue(c, ldc, m, j0, j1, alpha, bias);
        return AC_OK;
    }
    float *buf = thread_scratch((size_t)kk * AC_TILE_MATMUL_COLS);
    if (!buf) return AC_ERR_NOMEM;
    const ac_index G = AC_TILE_GROUP, group = kk * AC_TILE_GROUP;
    for (ac_index c0 = j0; c0 < j1; c0 += AC_TILE_MATMUL_COLS) {
        const ac_index width = j1 - c0 < AC_TILE_MATMUL_COLS ? j1 - c0 : AC_TILE_MATMUL_COLS;
        /* op(B)'s columns [c0, c0 + width) as panels of 16 (k-major inside a panel), copied in
         * B's own order so the reads are contiguous; lanes past `width` are never read (the
         * kernel masks them) */
        if (trans_b) {
            transpose_into_panels(b + c0 * ldb, ldb, width, kk, buf);
        } else {
            for (ac_index k = 0; k < kk; k++) {
                const float *bk = b + k * ldb + c0;
                ac_index jj = 0;
                for (; jj + G <= width; jj += G) /* a constant size: inlined */
                    memcpy(buf + (jj / G) * group + k * G, bk + jj, sizeof(float) * AC_TILE_GROUP);
                if (jj < width)
                    memcpy(buf + (jj / G) * group + k * G, bk + jj, sizeof(float) * (width - jj));
            }
        }
        ac_tile_gemm_f32(m, width, kk, a, lda, 1, buf, G, group, c + c0, ldc, 0);
        epilogue(c, ldc, m, c0, c0 + width, alpha, bias);
    }
    return AC_OK;
}
