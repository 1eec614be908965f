"""Build attncore's Cython/C extensions.

* OpenMP: probed by compiling and linking a tiny OpenMP function with ``-fopenmp`` (the build's
  own compiler command, nothing run). Without it the build
  still succeeds (single-threaded) and ``attncore.info()`` says so; ``ATTNCORE_FAIL_NO_OPENMP=1``
  makes a missing OpenMP fatal. ``ATTNCORE_OPENMP_CFLAGS`` / ``ATTNCORE_OPENMP_LDFLAGS`` replace
  ``-fopenmp`` in the compile / link commands, probe included (Apple's clang takes OpenMP only
  as ``-Xpreprocessor -fopenmp`` with a separate libomp, e.g. Homebrew's).
* Flags: portable ``-O3`` by default. SIMD (AVX2/FMA) is used through ``target`` attributes with
  run-time dispatch inside the C kernels, never a global ``-march=native``; ``ATTNCORE_NATIVE=1``
  opts into a native build. No global ``-ffast-math``: masked softmax relies on ``-inf`` semantics.
* ``ATTNCORE_DEBUG=1`` turns Cython bounds/wraparound checks on and keeps debug information
  (``-g0`` otherwise: Python's ``-g`` made the libraries six times larger).
* A change of these switches (or of the compiler command) rebuilds everything: the last build's
  are recorded under ``build/``.
"""
import glob
import json
import os
import sys
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, LinkError

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_C = "src_c"


#: an OpenMP function, compiled and linked as the extensions are (nothing is run)
_OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int attncore_openmp_probe(void) { int n = 0;
    #pragma omp parallel reduction(+:n)
      n += omp_get_num_threads();
      return n; }
""")


def _openmp_flags():
    """(compile flags, link flags) of OpenMP: ``-fopenmp`` each, or the environment's."""
    import shlex
    return (shlex.split(os.environ.get("ATTNCORE_OPENMP_CFLAGS", "-fopenmp")),
            shlex.split(os.environ.get("ATTNCORE_OPENMP_LDFLAGS", "-fopenmp")))


def _probe_openmp(compiler, directory):
    """``(True, "")`` when the build's own compiler command compiles ``-fopenmp`` code and links
    it into a shared object, as the extensions are built; else ``(False, why)``.

    The compiler object's full command is used (``CC="ccache gcc"`` probed ``ccache -fopenmp``)
    and nothing is executed (a ``noexec`` temporary directory read as no OpenMP): linking
    already needs the OpenMP runtime."""
    os.makedirs(directory, exist_ok=True)
    source = os.path.join(directory, "openmp_probe.c")
    with open(source, "w") as f:
        f.write(_OPENMP_PROBE)
    compile_flags, link_flags = _openmp_flags()
    try:
        objects = compiler.compile([source], output_dir=directory, extra_postargs=compile_flags)
        compiler.link_shared_object(objects, os.path.join(directory, "openmp_probe.so"),
                                    extra_postargs=link_flags)
    except CompileError:
        return False, (f"it refused to compile OpenMP code with {' '.join(compile_flags)}: its "
                       f"error is above (ATTNCORE_OPENMP_CFLAGS sets the flags)")
    except LinkError:
        return False, (f"OpenMP code did not link with {' '.join(link_flags)} (no OpenMP "
                       f"runtime?): the error is above (ATTNCORE_OPENMP_LDFLAGS sets the flags)")
    return True, ""


def _flags_changed(path, flags):
    """Whether ``flags`` differ from those the last finished build recorded at ``path``
    (:func:`_record_flags`). Setuptools and Cython rebuild on timestamps only:
    ``ATTNCORE_NATIVE=1`` on a built tree compiled nothing, and a native build packaged later
    kept its ``-march=native``. A changed record is removed, so that an interrupted build
    forces the next one too."""
    try:
        with open(path) as f:
            if json.load(f) == flags:
                return False
        os.remove(path)
    except (OSError, ValueError):
        pass
    return True


def _record_flags(path, flags):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(flags, f)
    except OSError:   # (a read-only tree: every build is a full one)
        pass


def _build_jobs():
    """Extensions built at once: one a CPU this process may run on (its affinity, not the
    machine's count), at most 8 -- a compiler takes ~200 MB on the largest extension, and
    the few large ones bound the build anyway."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # (macOS, Windows)
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


class BuildExt(build_ext):
    def build_extensions(self):
        has_openmp, why = _probe_openmp(self.compiler, os.path.join(self.build_temp,
                                                                     "openmp_probe"))
        if not has_openmp:
            if os.environ.get("ATTNCORE_FAIL_NO_OPENMP") == "1":
                raise RuntimeError(f"attncore: the compiler has no working OpenMP ({why}) and "
                                   f"ATTNCORE_FAIL_NO_OPENMP=1")
            print(f"WARNING: attncore: the compiler has no working OpenMP ({why}); building "
                  f"single-threaded kernels.", file=sys.stderr)
        native = os.environ.get("ATTNCORE_NATIVE") == "1"
        for ext in self.extensions:
            # -ffp-contract=off: a * b + c rounds twice, as written (GCC's default fuses it
            # where the target has FMA -- aarch64 always, x86 in target-attribute functions --
            # and the compiled Transformer step then missed the bits of its kernel-by-kernel
            # composition); the kernels call fmaf or FMA intrinsics where they mean one rounding
            ext.extra_compile_args = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function",
                                      "-fno-math-errno", "-ffp-contract=off"]
            if not debug:   # (Python's CFLAGS carry -g: 19 MB of .so files, 3 MB without)
                ext.extra_compile_args.append("-g0")
            if native:
                ext.extra_compile_args.append("-march=native")
                ext.define_macros.append(("ATTNCORE_NATIVE", "1"))
            if has_openmp:
                ext.extra_compile_args.extend(_openmp_flags()[0])
                ext.extra_link_args = list(_openmp_flags()[1])
            else:   # (the kernels' "#pragma omp" lines: 116 warnings)
                ext.extra_compile_args.append("-Wno-unknown-pragmas")
        flags = {"native": native, "openmp": has_openmp, "debug": debug,
                 "compiler": list(getattr(self.compiler, "compiler_so", [])),
                 "arguments": self.extensions[0].extra_compile_args,
                 "link": self.extensions[0].extra_link_args}
        record = os.path.join(self.build_temp, "attncore-flags.json")
        if _flags_changed(record, flags):
            self.force = True
        if not self.parallel:   # (-j N on the command line wins)
            self.parallel = _build_jobs()
        self._link_shared_c_objects()
        super().build_extensions()
        _record_flags(record, flags)

    def _link_shared_c_objects(self):
        """Compile each C file of ``src_c/`` once, for every extension that links it, and hand
        the extensions its object. (Each extension compiled its own copy -- simd.c eight times,
        a third of a build -- and the copies all wrote one object file, which rules out
        building extensions in parallel.) Compiled only when older than its source or a header,
        as setuptools rebuilds an extension; ``depends`` relinks the extensions that use it."""
        from concurrent.futures import ThreadPoolExecutor

        for ext in self.extensions:
            if not hasattr(ext, "shared_c_sources"):   # (once: build_ext may run twice)
                ext.shared_c_sources = [s for s in ext.sources if os.path.dirname(s) == SRC_C]
                ext.sources = [s for s in ext.sources if s not in ext.shared_c_sources]
                ext.depends = ext.depends + ext.shared_c_sources
        sources = sorted({s for ext in self.extensions for s in ext.shared_c_sources})
        # the same macros, include directories and flags for every extension (kernel_extension)
        first = self.extensions[0]
        objects = dict(zip(sources, self.compiler.object_filenames(
            sources, output_dir=os.path.join(self.build_temp, "shared"))))

        headers = glob.glob(os.path.join(SRC_C, "*.h"))

        def compile_one(source):
            stamp = max(os.path.getmtime(p) for p in [source] + headers)
            if (self.force or not os.path.exists(objects[source])
                    or os.path.getmtime(objects[source]) < stamp):
                self.compiler.compile([source], os.path.join(self.build_temp, "shared"),
                                      macros=first.define_macros, include_dirs=first.include_dirs,
                                      extra_postargs=first.extra_compile_args)

        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            list(pool.map(compile_one, sources))   # (list: raises a compile error here)
        for ext in self.extensions:
            ext.extra_objects = [objects[s] for s in ext.shared_c_sources]


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
    kernel_extension("_arrays"),
    kernel_extension("_blas", ["simd.c", "packed_linear.c", "packed_int8.c", "tile_gemm.c"]),
    kernel_extension("_softmax", ["softmax.c", "simd.c"]),
    kernel_extension("_sdpa", ["sdpa.c", "tile_gemm.c", "simd.c"]),
    kernel_extension("_additive", ["additive.c", "simd.c"]),
    kernel_extension("_layers", ["layers.c", "simd.c"]),
    kernel_extension("_recurrent", ["additive.c", "packed_linear.c", "packed_int8.c", "tile_gemm.c", "softmax.c",
                                    "simd.c"]),
    kernel_extension("_transformer", ["packed_linear.c", "packed_int8.c", "layers.c", "sdpa.c", "tile_gemm.c",
                                      "softmax.c", "simd.c"]),
    kernel_extension("_ran", ["packed_linear.c", "packed_int8.c", "layers.c", "sdpa.c", "tile_gemm.c",
                              "softmax.c", "simd.c"]),
]

# (Cython regenerates the C on timestamps only: a change of ATTNCORE_DEBUG must force it)
CYTHON_RECORD = os.path.join(HERE, "build", "attncore-cython-flags.json")
debug_changed = _flags_changed(CYTHON_RECORD, {"debug": debug})
ext_modules = cythonize(
    extensions,
    force=debug_changed,
    compiler_directives={
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    },
)
_record_flags(CYTHON_RECORD, {"debug": debug})
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
