# SPDX-License-Identifier: Apache-2.0
"""Shared benchmark helpers: a min-of-repeats timer, thread setup for every engine in the same
process, and a description of the machine. Benchmarks print tables of ratios measured side by
side in one run (these machines are noisy); nothing here asserts a time."""
import os
import platform
import time

import numpy as np

# (set by ``attncore bench``: the name the script's messages give it, "attncore bench
# kernels", and "1" for a run that only checks its arguments, so that a bad option fails before
# any script runs rather than after the first script's whole benchmark)
from attncore.cli import BENCH_CHECK_VARIABLE, BENCH_PROG_VARIABLE
from attncore.cli import OneLineErrorParser  # noqa: F401  (one-line usage errors, as attncore's)
from attncore.cli import thread_count  # noqa: F401  (the one --threads type, for the scripts)


def bench_prog():
    """The script's name for its parser: ``attncore bench NAME`` when run through it, else
    None (argparse's default, the file's name)."""
    return os.environ.get(BENCH_PROG_VARIABLE) or None


def checking_arguments() -> bool:
    """Whether this run only checks its arguments (``attncore bench``'s first pass)."""
    return os.environ.get(BENCH_CHECK_VARIABLE) == "1"


def run_main(main):
    """Run a bench script's ``main()`` as attncore's commands run: stdout's write errors are one
    line, a closed pipe a quiet 141, Ctrl-C "interrupted" (130) and SIGTERM "stopped by
    SIGTERM" (143), never a traceback. Exits with the status."""
    import sys

    from attncore.cli import Stopped, StopSignals, run_command
    name = bench_prog() or os.path.basename(sys.argv[0])

    def guarded():
        try:
            with StopSignals.watching():
                main()
        except KeyboardInterrupt as exc:
            return Stopped.report_of(exc, name)
        return 0
    sys.exit(run_command(guarded))


def best_time(fn, repeats=5, min_time=0.2, warmup=1):
    """Best wall time of ``fn()`` over at least ``repeats`` calls and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    best, total, n = float("inf"), 0.0, 0
    while n < repeats or total < min_time:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best = min(best, dt)
        total += dt
        n += 1
        if n >= 200:
            break
    return best


def best_times_interleaved(fns, rounds=3, repeats=3, min_time=0.0):
    """Best wall time of each ``fns[name]()`` (a dict), the engines taking turns: ``rounds``
    rounds, each running every function's ``best_time`` block in order. A slow stretch of this
    VM (seconds long, up to 2x) then costs every engine one block instead of one engine its
    whole measurement, so the ratios between them hold. Returns {name: seconds}."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], best_time(fn, repeats=repeats, min_time=min_time))
    return best


def set_threads(n, with_torch=True):
    """Give every engine in the process ``n`` threads (attncore, NumPy's BLAS, and torch unless
    ``with_torch`` is False: ``--no-torch`` runs do not import it)."""
    import attncore
    from threadpoolctl import ThreadpoolController
    attncore.set_num_threads(n)
    # Limit NumPy's BLAS only: SciPy's BLAS (the one attncore's kernels call from inside their
    # OpenMP regions) must stay at one thread, or every kernel thread would fork BLAS threads.
    controller = ThreadpoolController()
    numpy_blas = controller.select(user_api="blas")
    numpy_blas.lib_controllers = [lib for lib in numpy_blas.lib_controllers
                                  if "scipy.libs" not in lib.filepath]
    limits = numpy_blas.limit(limits=n)
    torch = try_import_torch() if with_torch else None
    if torch is not None:
        torch.set_num_threads(n)
    return limits


def try_import_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def machine_description(with_torch=True):
    import attncore
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = attncore.info()
    torch = try_import_torch() if with_torch else None
    torch_text = torch.__version__ if torch else ("absent" if with_torch else "not used")
    return (f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}, attncore {info['version']} (OpenMP {info['openmp']}, "
            f"SIMD {info['simd']}), torch {torch_text}")


def sgemm_gflops(n=1024, repeats=3):
    """GFLOP/s of NumPy's float32 GEMM at size n, under the current BLAS thread limit."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    t = best_time(lambda: a @ b, repeats=repeats, min_time=0.3)
    return 2 * n ** 3 / t / 1e9


def fmt_ratio(x):
    return "   -  " if x is None or not np.isfinite(x) else f"{x:6.2f}"
