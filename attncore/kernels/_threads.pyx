# SPDX-License-Identifier: Apache-2.0
"""Build facts about OpenMP and SIMD, read by ``attncore.kernels.threads`` and ``attncore.info()``.

The only place that asks the OpenMP runtime anything; kernels receive their thread count as an
argument from the Python layer (``attncore.kernels.threads.effective_num_threads``).
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
    """
    int ac_openmp_enabled() nogil
    int ac_omp_max_threads() nogil

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
