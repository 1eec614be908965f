/* SPDX-License-Identifier: Apache-2.0
 *
 * bench/packed_harness.py's C side: the seq2seq benchmark's six decoding-step products at M rows,
 * on BLAS reading the panels (g_panel_rows = 16) and on the panel kernel (g_panel_rows past M),
 * float32 and bfloat16 panels; best of `reps` calls each. Linked with a copy of
 * src_c/packed_linear.c whose row limit is g_panel_rows. */
#include "packed_linear.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

extern ac_index g_panel_rows;

/* (N, K) of the step's products: attention query, the two GRU layers' input and hidden
 * weights, the output layer */
static const int SHAPES[6][2] = {{256, 256}, {768, 512}, {768, 256}, {768, 256}, {768, 256},
                                 {4000, 256}};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float uniform(void) { return (float)rand() / RAND_MAX - 0.5f; }

/* Best time of `reps` calls of the six products with panel rows up to `panel_rows`. */
static double best_time(void *const panels[6], int bf16, const float *x, float *out, int M,
                        int threads, ac_sgemm_fn sgemm, long macs_limit, int reps,
                        ac_index panel_rows) {
    double best = 1e9;
    g_panel_rows = panel_rows;
    for (int r = 0; r < reps; r++) {
        const double t = now();
        for (int s = 0; s < 6; s++)
            ac_packed_linear_rows(x, 512, M, SHAPES[s][1], panels[s], bf16, SHAPES[s][0], NULL,
                                  out, 4000, sgemm, macs_limit, threads);
        const double dt = now() - t;
        if (dt < best) best = dt;
    }
    return best;
}

/* One Markdown table row per panel type. */
void run(ac_sgemm_fn sgemm, int M, int threads, long macs_limit, int reps) {
    double macs = 0;
    for (int s = 0; s < 6; s++) macs += (double)SHAPES[s][0] * SHAPES[s][1] * M;
    float *x = malloc(sizeof(float) * M * 512), *out = malloc(sizeof(float) * M * 4000);
    for (int i = 0; i < M * 512; i++) x[i] = uniform();
    for (int bf16 = 0; bf16 < 2; bf16++) {
        void *panels[6];
        for (int s = 0; s < 6; s++) {
            const int N = SHAPES[s][0], K = SHAPES[s][1];
            float *w = malloc(sizeof(float) * N * K);
            for (long i = 0; i < (long)N * K; i++) w[i] = uniform();
            const size_t n = (size_t)ac_panel_count(N) * K * AC_PANEL_WIDTH;
            panels[s] = malloc(bf16 ? n * 2 : n * 4);
            if (bf16) ac_pack_panels_bf16(w, N, K, panels[s]);
            else ac_pack_panels_f32(w, N, K, panels[s]);
            free(w);
        }
        const double blas = best_time(panels, bf16, x, out, M, threads, sgemm, macs_limit, reps,
                                      16);
        const double panel = best_time(panels, bf16, x, out, M, threads, sgemm, macs_limit, reps,
                                       (ac_index)M + 1);
        printf("| %s | %d | %4d | %8.1f | %6.1f | %8.1f | %6.1f | %.2fx |\n",
               bf16 ? "bf16" : "f32", threads, M, blas * 1e6, macs / blas / 1e9, panel * 1e6,
               macs / panel / 1e9, blas / panel);
        fflush(stdout);
        for (int s = 0; s < 6; s++) free(panels[s]);
    }
    free(x);
    free(out);
}
