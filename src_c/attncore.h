/* SPDX-License-Identifier: Apache-2.0
 *
 * attncore C kernels: shared conventions.
 *
 *  - Plain C99, no Python, no allocation inside hot loops (scratch is passed in by the caller).
 *  - Signature style: const inputs first, then outputs, then sizes; lengths instead of masks.
 *  - Inputs are validated by the Cython layer before any kernel runs (`with nogil`), so kernels
 *    may assume valid shapes, contiguous row-major arrays and in-range lengths.
 *  - BLAS comes from SciPy's `cython_blas` as function pointers (Fortran, column-major): SciPy's
 *    wrappers are Cython-level symbols, so C cannot link them directly.
 *  - float32 is the production dtype; every kernel also has a float64 twin, produced from one
 *    template body included twice with REAL/SUFFIX macros (see sdpa_impl.h).
 */
#ifndef ATTNCORE_H
#define ATTNCORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

typedef ptrdiff_t ac_index;   /* signed index type for sizes and strides */

/* Fortran BLAS gemm, as exported by scipy.linalg.cython_blas (LP64 ints). */
typedef void (*ac_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k, float *alpha,
                            float *a, int *lda, float *b, int *ldb, float *beta, float *c, int *ldc);
typedef void (*ac_dgemm_fn)(char *transa, char *transb, int *m, int *n, int *k, double *alpha,
                            double *a, int *lda, double *b, int *ldb, double *beta, double *c,
                            int *ldc);

/* Status codes returned by kernels that can fail (e.g. scratch allocation). */
enum { AC_OK = 0, AC_ERR_NOMEM = 1 };

static inline int ac_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Threads for a parallel region over `work` scalar operations: below AC_PARALLEL_MIN_WORK one
 * thread, since waking a team costs more than it saves and, when other processes share the
 * cores, a barrier may wait a whole time slice for a descheduled thread. Chosen from the shapes
 * only; the work split of every kernel is fixed by its shapes, so results never depend on it. */
#define AC_PARALLEL_MIN_WORK ((ac_index)1 << 16)
/* (a count below 1 from a direct call of a private module runs one thread: libgomp read a
 * negative one as a huge unsigned team and aborted the process; one past AC_MAX_THREADS,
 * attncore.kernels.threads.MAX_THREADS, runs that many: 100000 crashed it, 2**31 - 1 made
 * libgomp abort) */
#define AC_MAX_THREADS 1024
#define AC_TEAM(n) ((n) > AC_MAX_THREADS ? AC_MAX_THREADS : (n) > 1 ? (n) : 1)
#define AC_THREADS(work, n) ((ac_index)(work) >= AC_PARALLEL_MIN_WORK ? AC_TEAM(n) : 1)

/* for (ac_index i = 0; i < count; i++) call;  split statically over `team` threads (e.g.
 * AC_THREADS(work, n)). A team of one runs the plain loop: an OpenMP region costs ~0.35 us
 * even for a team of one (libgomp builds it all the same, `if` clause or not), a third of the
 * C time of a small kernel call. The items and their order within a thread are the same
 * either way, so the results are too. */
#define AC_PARALLEL_FOR(i, count, team, call)                                                    \
    do {                                                                                         \
        const int ac_team_ = (team);                                                             \
        const ac_index ac_count_ = (count);                                                      \
        if (ac_team_ <= 1) {                                                                     \
            for (ac_index i = 0; i < ac_count_; i++) call;                                       \
        } else {                                                                                 \
            _Pragma("omp parallel for schedule(static) num_threads(ac_team_)")                   \
            for (ac_index i = 0; i < ac_count_; i++) call;                                       \
        }                                                                                        \
    } while (0)

#define AC_MIN(a, b) ((a) < (b) ? (a) : (b))
#define AC_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
