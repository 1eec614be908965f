"""Build attncore's Cython/C extensions.

* OpenMP: probed by compiling and running a tiny program with ``-fopenmp``. Without it the build
  still succeeds (single-threaded) and ``attncore.info()`` says so; ``ATTNCORE_FAIL_NO_OPENMP=1``
  makes a missing OpenMP fatal.
* Flags: portable ``-O3`` by default. SIMD (AVX2/FMA) is used through ``target`` attributes with
  run-time dispatch inside the C kernels, never a global ``-march=native``; ``ATTNCORE_NATIVE=1``
  opts into a native build. No global ``-ffast-math``: masked softmax relies on ``-inf`` semantics.
* ``ATTNCORE_DEBUG=1`` turns Cython bounds/wraparound checks on.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_C = "src_c"


def _probe_openmp(compiler_exe="cc"):
    """Return True when ``compiler_exe -fopenmp`` compiles, links and runs an OpenMP program."""
    code = textwrap.dedent("""
        #include <omp.h>
        #include <stdio.h>
        int main(void) { int n = 0;
        #pragma omp parallel reduction(+:n)
          n += 1;
          printf("%d", n > 0); return 0; }
    """)
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(code)
        result = subprocess.run([compiler_exe, "-fopenmp", src, "-o", exe],
                                capture_output=True)
        if result.returncode != 0:
            return False
        return subprocess.run([exe], capture_output=True).stdout.strip() == b"1"
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        compiler_exe = self.compiler.compiler_so[0] if hasattr(self.compiler, "compiler_so") else "cc"
        has_openmp = _probe_openmp(compiler_exe)
        if not has_openmp:
            msg = "attncore: the compiler has no working OpenMP; building single-threaded kernels."
            if os.environ.get("ATTNCORE_FAIL_NO_OPENMP") == "1":
                raise RuntimeError(msg)
            print("WARNING: " + msg, file=sys.stderr)
        native = os.environ.get("ATTNCORE_NATIVE") == "1"
        for ext in self.extensions:
            ext.extra_compile_args = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function",
                                      "-fno-math-errno"]
            if native:
                ext.extra_compile_args.append("-march=native")
                ext.define_macros.append(("ATTNCORE_NATIVE", "1"))
            if has_openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args = ["-fopenmp"]
        super().build_extensions()


def kernel_extension(name, c_sources=()):
    return Extension(
        f"attncore.kernels.{name}",
        sources=[f"attncore/kernels/{name}.pyx"] + [os.path.join(SRC_C, s) for s in c_sources],
        include_dirs=[SRC_C, np.get_include()],
        # every header (templates included twice, SIMD helpers): an edit rebuilds what uses it
        depends=sorted(glob.glob(os.path.join(SRC_C, "*.h"))),
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        language="c",
    )


debug = os.environ.get("ATTNCORE_DEBUG") == "1"
extensions = [
    kernel_extension("_threads", ["simd.c"]),
    kernel_extension("_blas", ["simd.c", "packed_linear.c", "packed_int8.c", "tile_gemm.c"]),
    kernel_extension("_softmax", ["softmax.c", "simd.c"]),
    kernel_extension("_sdpa", ["sdpa.c", "tile_gemm.c", "simd.c"]),
    kernel_extension("_additive", ["additive.c", "simd.c"]),
    kernel_extension("_layers", ["layers.c", "simd.c"]),
    kernel_extension("_recurrent", ["additive.c", "packed_linear.c", "packed_int8.c", "tile_gemm.c", "softmax.c",
                                    "simd.c"]),
    kernel_extension("_transformer", ["packed_linear.c", "packed_int8.c", "layers.c", "sdpa.c", "tile_gemm.c",
                                      "softmax.c", "simd.c"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": debug,
            "initializedcheck": debug,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
