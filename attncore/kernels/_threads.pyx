# SPDX-License-Identifier: Apache-2.0
"""Build facts about OpenMP and SIMD, read by ``attncore.kernels.threads`` and ``attncore.info()``.

The only place that asks the OpenMP runtime anything; kernels receive their thread count as an
argument from the Python layer (``attncore.kernels.threads.kernel_threads``).
"""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int ac_openmp_enabled(void) { return 1; }
    static int ac_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int ac_openmp_enabled(void) { return 0; }
    static int ac_omp_max_threads(void) { return 1; }
    #endif

    /* GNU OpenMP keeps its worker threads in a pool owned by the thread that started the team. A
       fork copies the pool's bookkeeping but not its threads, so the child's next team of two
       or more waits for them forever (teams of one never touch the pool). A fork handler marks
       such a child; it only stores an int, as a handler between fork and exec must. */
    static volatile int ac_team_may_exist = 0;
    static volatile int ac_forked_after_team = 0;
    /* (GCC's libgomp only: LLVM's and Intel's runtimes start their threads again in a forked
       child themselves) */
    #if defined(_OPENMP) && !defined(_WIN32) && defined(__GNUC__) && !defined(__clang__)
    #include <pthread.h>
    static void ac_after_fork_in_child(void) {
        if (ac_team_may_exist) ac_forked_after_team = 1;
    }
    static int ac_watch_forks(void) {
        return pthread_atfork(NULL, NULL, ac_after_fork_in_child);
    }
    static int ac_forks_watched(void) { return 1; }
    #else
    static int ac_watch_forks(void) { return 0; }  /* no GNU OpenMP pool, or no fork */
    static int ac_forks_watched(void) { return 0; }
    #endif
    static void ac_note_team(void) { ac_team_may_exist = 1; }
    static int ac_forked_after_team_started(void) { return ac_forked_after_team; }
    """
    int ac_openmp_enabled() nogil
    int ac_omp_max_threads() nogil
    int ac_watch_forks() nogil
    int ac_forks_watched() nogil
    void ac_note_team() nogil
    int ac_forked_after_team_started() nogil

cdef extern from "simd.h":
    int ac_simd_level() nogil
    const char *ac_simd_name() nogil


def openmp_enabled():
    """True when the extensions were compiled with OpenMP."""
    return bool(ac_openmp_enabled())


def omp_max_threads():
    """The OpenMP runtime's default team size (``OMP_NUM_THREADS`` or the core count)."""
    return ac_omp_max_threads()


def simd_name():
    """The SIMD level the float32 kernels dispatched to on this CPU: 'avx512', 'avx2+fma' or 'scalar'
    (``ATTNCORE_FORCE_ISA=avx2|scalar`` caps it)."""
    return ac_simd_name().decode()


def note_team():
    """Record that a kernel was handed more than one thread, so OpenMP may have started a pool."""
    ac_note_team()


def forks_watched():
    """True where a child forked after a team falls back to one thread (GNU OpenMP, whose pool
    does not survive a fork); LLVM's and Intel's runtimes restart their threads themselves."""
    return bool(ac_forks_watched())


def forked_after_team():
    """True in a process forked (by any means) after this one's OpenMP pool may have started."""
    return bool(ac_forked_after_team_started())


if ac_watch_forks() != 0:  # pragma: no cover - pthread_atfork fails only without memory
    raise MemoryError("attncore could not register its fork handler (pthread_atfork)")
