# SPDX-License-Identifier: Apache-2.0
"""The one module that owns threads.

* One thread budget for everything: ``set_num_threads(n)`` / ``get_num_threads()`` and the
  ``num_threads(n)`` context manager (per Python thread and per asyncio task, so concurrent
  threads and tasks can each pick their own intra-op budget). The default is ``OMP_NUM_THREADS`` when set, else the CPUs this
  process may run on (``os.sched_getaffinity``, which follows cpusets and taskset), capped by a
  cgroup CPU quota (``docker --cpus``, a Kubernetes CPU limit), rounded up; always 1 when the
  extensions were built without OpenMP. A quota does not show in the affinity mask: 64 threads
  under a 2-CPU quota spend most of each period throttled, waiting at barriers.
* No oversubscription: every kernel parallelises with OpenMP and calls BLAS from inside its
  parallel region, so SciPy's BLAS (the one ``scipy.linalg.cython_blas`` uses) is limited to a
  single thread, once, when attncore is imported. threadpoolctl limits are process-wide, so this
  is done once and only for SciPy's own BLAS library: NumPy's BLAS (a separate library) is left
  as the user configured it.
* Results never depend on the thread count: kernels split work by shape, never by threads.
* Forks: GNU OpenMP's thread pool does not survive ``fork()`` (a multiprocessing "fork" pool, a
  pre-forking server). A process forked after attncore handed a kernel two or more threads runs
  its kernels on one thread, with a ``RuntimeWarning`` once, instead of hanging in its first
  parallel region. Processes started by "spawn" or "forkserver" keep the full budget.
"""
import contextlib
import contextvars
import math
import os
import warnings

from . import _threads

_state = {"default": None}


#: This context's ``num_threads(n)`` override (None: the process-wide count). A context
#: variable rather than a thread-local: every Python thread starts with an empty context (its
#: own budget, as before), and each asyncio task runs in a copy of its creator's, so tasks that
#: interleave on one event-loop thread keep their own budgets (a thread-local, saved and
#: restored by each ``with`` block, left the loop thread with whichever task exited last's
#: saved value, and ran one task's kernels on the other's budget while both were open).
_budget = contextvars.ContextVar("attncore_num_threads", default=None)


def _default_num_threads():
    if not _threads.openmp_enabled():
        return 1
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), MAX_THREADS)
    return min(available_cpus(), MAX_THREADS)


def available_cpus():
    """The CPUs this process may run on, capped by its cgroup CPU quota rounded up (>= 1)."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cpus = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    return cpus if quota is None else min(cpus, max(1, math.ceil(quota)))


def cgroup_cpu_limit(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The CPUs this process's cgroup CPU quota allows (a float, the tightest of its cgroup and
    the cgroups above it), or None without a quota or where it cannot be read.

    cgroup v2 states the quota as ``cpu.max`` ("<quota> <period>" or "max <period>"), v1 as
    ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``, in the cpu controller's
    hierarchy. Inside a container the controller's mount is the container's own cgroup while
    ``/proc/self/cgroup`` may still name the host's path: then the mount's root is read.
    """
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2 (unified)
            base = root if os.path.exists(os.path.join(root, "cgroup.controllers")) else None
            read = _read_cpu_max
        elif "cpu" in controllers.split(","):
            base = next((os.path.join(root, name) for name in ("cpu,cpuacct", "cpuacct,cpu", "cpu")
                         if os.path.isdir(os.path.join(root, name))), None)
            read = _read_cfs_quota
        else:
            continue
        if base is not None:
            limits += [limit for limit in map(read, _cgroup_dirs(base, path)) if limit]
    return min(limits) if limits else None


def _cgroup_dirs(base, path):
    """``base/path`` and the directories above it up to ``base`` (just ``base`` when the path is
    not under it, as in a container whose mount is its own cgroup)."""
    here = os.path.normpath(os.path.join(base, path.lstrip("/")))
    if not os.path.isdir(here) or os.path.commonpath([here, base]) != os.path.normpath(base):
        return [base]
    dirs = [here]
    while os.path.normpath(here) != os.path.normpath(base):
        here = os.path.dirname(here)
        dirs.append(here)
    return dirs


def _read_number_pair(path_a, path_b=None):
    try:
        with open(path_a, encoding="ascii") as f:
            words = f.read().split()
        if path_b is not None:
            with open(path_b, encoding="ascii") as f:
                words += f.read().split()
    except (OSError, ValueError):
        return None
    return words if len(words) == 2 else None


def _quota_over_period(words):
    try:
        quota, period = int(words[0]), int(words[1])
    except (TypeError, ValueError):  # "max", or no file
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_cpu_max(directory):
    return _quota_over_period(_read_number_pair(os.path.join(directory, "cpu.max")))


def _read_cfs_quota(directory):
    return _quota_over_period(_read_number_pair(os.path.join(directory, "cpu.cfs_quota_us"),
                                                os.path.join(directory, "cpu.cfs_period_us")))


#: The most threads a kernel may be asked for: the C kernels take an int, and asking OpenMP
#: for millions of threads aborts the process when it cannot create them.
MAX_THREADS = 1024


def _check_count(n, name="n"):
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"{name} must be a positive integer, got {type(n).__name__}")
    n = int(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name} must lie in [1, {MAX_THREADS}], got {n}")
    return n


def set_num_threads(n):
    """Set the process-wide number of threads attncore kernels use (``None``: the default)."""
    if n is None:
        _state["default"] = None
        return
    n = _check_count(n)
    _state["default"] = n if _threads.openmp_enabled() else 1
    _limit_scipy_blas()  # cheap; undoes a process-wide threadpoolctl limit set since import


def get_num_threads():
    """The number of threads the next kernel call in this Python thread will use."""
    n = _budget.get()
    if n is None:
        if _state["default"] is None:
            _state["default"] = _default_num_threads()
        n = _state["default"]
    if n > 1 and _threads.forked_after_team():
        _warn_forked_once(n)
        return 1
    return n


def kernel_threads():
    """The thread count to hand a kernel: ``get_num_threads()``, remembering that OpenMP may
    now have started its pool (which a forked child cannot use)."""
    n = get_num_threads()
    if n > 1:
        _threads.note_team()
    return n


def _warn_forked_once(n):
    if _state.get("warned_fork"):
        return
    _state["warned_fork"] = True
    warnings.warn(
        f"attncore runs on 1 thread instead of {n} in this process: it was forked after attncore "
        "had started OpenMP threads, and GNU OpenMP's threads do not survive a fork. Start "
        "worker processes with multiprocessing's 'spawn' or 'forkserver' method to use more "
        "threads, or call attncore.set_num_threads(1) in them to silence this warning.",
        RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def num_threads(n):
    """Context manager: use ``n`` threads for kernels called from this Python thread (or
    asyncio task: each task keeps its own budget, see ``_budget``).

    >>> with attncore.num_threads(1):
    ...     out = attncore.attention(q, k, v)
    """
    n = _check_count(n)
    previous = _budget.get()
    token = _budget.set(n if _threads.openmp_enabled() else 1)
    try:
        yield _budget.get()
    finally:
        try:
            _budget.reset(token)
        except ValueError:   # left in another context than the one it was entered in
            _budget.set(previous)


def _limit_scipy_blas():
    """Limit SciPy's BLAS (used by our kernels) to one thread; return its description."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return None
    from . import _blas  # noqa: F401  (its module init loaded SciPy's BLAS library)
    controller = ThreadpoolController()
    blas = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
    # SciPy wheels bundle their own OpenBLAS under scipy.libs/; elsewhere (distro builds) SciPy
    # and NumPy may share one BLAS, which then has to be limited for both.
    own = [lib for lib in blas if "scipy.libs" in lib.filepath] or blas
    for lib in own:
        lib.set_num_threads(1)
    return [{"library": lib.internal_api, "filepath": lib.filepath,
             "version": getattr(lib, "version", None),
             "architecture": getattr(lib, "architecture", None)} for lib in own]


BLAS_INFO = _limit_scipy_blas()

# OpenBLAS cores whose sgemm runs products of at most 100^3 multiply-adds (non-transposed first
# operand) on a "small-matrix" kernel that reads the operands where they lie, skipping the copy
# into packed buffers every larger product pays (kernel/x86_64/sgemm_small_kernel_*_skylakex.c;
# other cores' small-matrix path is plain C). The flash-attention tiles are sized for it.
_SMALL_MATRIX_CORES = {"skylakex", "cooperlake", "sapphirerapids"}
BLAS_SMALL_MATRIX_KERNEL = bool(BLAS_INFO) and all(
    lib["library"] == "openblas" and str(lib["architecture"]).lower() in _SMALL_MATRIX_CORES
    for lib in BLAS_INFO)
# that kernel's size limit in multiply-adds, and the limit as the C kernels take it (0: no kernel)
SMALL_MATRIX_MACS = 100 ** 3
BLAS_SMALL_GEMM_MACS = SMALL_MATRIX_MACS if BLAS_SMALL_MATRIX_KERNEL else 0
