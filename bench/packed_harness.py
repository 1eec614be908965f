# SPDX-License-Identifier: Apache-2.0
"""The packed panel kernel against BLAS on the panels, from C (no Python per call).

    python bench/packed_harness.py [--threads 1 2] [--rows 1 4 16 17 64 256]   # from a checkout

Compiles ``bench/packed_harness.c`` with a copy of ``src_c/packed_linear.c`` whose row limit
(``ac_packed_panel_max_rows()``) is a variable, and times the seq2seq benchmark's six decoding-step
products (2.07M weights, as in ``bench/kernels.py --only packed``) at each row count twice: the
rows on BLAS reading the panels (the rule past 16 rows before session 7) and on the panel
kernel, float32 and bfloat16 panels, best of many calls (up to 16 rows both take the panel
kernel: the columns then measure the same code twice, a check of the noise). Needs gcc and SciPy (its OpenBLAS
``sgemm``, held at one thread as attncore holds it); ``ATTNCORE_FORCE_ISA`` caps the SIMD tier
as it does for attncore. A development tool for the row-limit rule, not a peer comparison.
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src_c")


def build(directory):
    """The harness as a shared library in ``directory``."""
    if not os.path.isfile(os.path.join(SRC, "packed_linear.c")):   # (a FileNotFoundError)
        sys.exit("packed_harness: needs a source checkout of attncore (src_c/ beside bench/); "
                 "an installed package has no C sources")
    source = open(os.path.join(SRC, "packed_linear.c")).read()
    rule = "if (M <= ac_packed_panel_max_rows() || K == 0)"
    if rule not in source:
        sys.exit("packed_harness: src_c/packed_linear.c no longer has the row rule it patches")
    # past the row limit the AVX2 machines now run tile_gemm.h's kernel: held off here, so that
    # the first column stays BLAS on the panels
    tile_rule = "const int tile_kernel = ac_tile_gemm_available();"
    if tile_rule not in source:
        sys.exit("packed_harness: src_c/packed_linear.c no longer has the tile-kernel rule it "
                 "patches")
    patched = os.path.join(directory, "packed_linear_rows.c")
    with open(patched, "w") as f:
        f.write("#include \"packed_linear.h\"\nac_index g_panel_rows = 16;\n")
        f.write(source.replace(rule, "if (M <= g_panel_rows || K == 0)")
                .replace(tile_rule, "const int tile_kernel = 0;"))
    library = os.path.join(directory, "packed_harness.so")
    compiler = c_compiler()
    arguments = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-I" + SRC,
                 os.path.join(HERE, "packed_harness.c"), patched,
                 os.path.join(SRC, "tile_gemm.c"), os.path.join(SRC, "simd.c"),
                 os.path.join(SRC, "packed_int8.c"), "-lm", "-o", library]
    try:   # (after the whole compiler command: CC="ccache gcc" took "ccache -fopenmp gcc")
        subprocess.check_call(compiler + ["-fopenmp"] + arguments, stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError:   # (no OpenMP, e.g. Apple's clang: one thread)
        subprocess.check_call(compiler + arguments)
    return ctypes.CDLL(library)


def c_compiler():
    """The C compiler command: ``$CC``, else the one Python was built with, else ``cc`` (a
    hard-coded gcc is Apple's clang on a Mac, or missing)."""
    import shlex
    import sysconfig
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def scipy_sgemm():
    """The address of SciPy's ``sgemm`` (the one attncore's kernels call)."""
    import scipy.linalg.cython_blas as blas
    capsule = blas.__pyx_capi__["sgemm"]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 17, 64, 256])
    args = parser.parse_args(argv)
    # (importing attncore's threads module also holds SciPy's BLAS at one thread)
    from attncore.kernels.threads import BLAS_SMALL_GEMM_MACS, MAX_THREADS
    # (0 and negative counts printed rows of negative GMAC/s with exit 0)
    if not all(1 <= t <= MAX_THREADS for t in args.threads):
        parser.error(f"--threads: counts lie in [1, {MAX_THREADS}], got {args.threads}")
    if not all(r >= 1 for r in args.rows):
        parser.error(f"--rows: counts must be >= 1, got {args.rows}")
    with tempfile.TemporaryDirectory() as directory:
        lib = build(directory)
        sgemm = scipy_sgemm()
        print(f"# python bench/packed_harness.py --threads {' '.join(map(str, args.threads))} "
              f"--rows {' '.join(map(str, args.rows))}  (small_gemm_macs={BLAS_SMALL_GEMM_MACS})")
        print("| panels | threads | rows | BLAS path us | GMAC/s | panel kernel us | GMAC/s "
              "| panel vs BLAS |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        for threads in args.threads:
            for rows in args.rows:
                lib.run(ctypes.c_void_p(sgemm), rows, threads,
                        ctypes.c_long(BLAS_SMALL_GEMM_MACS), 30 if rows > 64 else 100)


if __name__ == "__main__":
    main()
