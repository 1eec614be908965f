# SPDX-License-Identifier: Apache-2.0
"""SciPy's BLAS function table without ``scipy.linalg``'s package import.

The Cython modules take sgemm / dgemm from ``scipy.linalg.cython_blas`` (a ``cimport``: their
module init imports it). Importing that module runs ``scipy/linalg/__init__.py`` first, about
150 ms of imports the kernels never use (LAPACK wrappers, f2py, ``numpy.testing``), paid by
every process that imports attncore: each command-line call, each Dask worker.

:func:`preloaded` loads the ``cython_blas`` extension module by itself for the duration of the
kernels' own imports, then takes it out of ``sys.modules`` again, so that a later ``import
scipy.linalg.cython_blas`` imports ``scipy.linalg`` as usual (and gets the same module object
back: a Cython module initialises once per process). Where anything about that fails, or
``scipy.linalg`` is imported already, the kernels import it the plain way.
"""
import contextlib
import importlib.machinery
import importlib.util
import os
import sys

MODULE = "scipy.linalg.cython_blas"


def _load_alone():
    """The extension module loaded from its file into sys.modules, or None."""
    scipy = importlib.util.find_spec("scipy")
    if scipy is None or not scipy.origin:
        return None
    folder = os.path.join(os.path.dirname(scipy.origin), "linalg")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "cython_blas" + suffix)
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(MODULE, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[MODULE] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[MODULE]
                raise
            return module
    return None


@contextlib.contextmanager
def preloaded():
    """Within: ``scipy.linalg.cython_blas`` importable without its package (see the module
    docstring)."""
    module = None
    if MODULE not in sys.modules and "scipy.linalg" not in sys.modules:
        try:
            module = _load_alone()
        except Exception:   # (any surprise: the plain import, in the Cython modules' init)
            module = None
    try:
        yield
    finally:
        if module is not None and sys.modules.get(MODULE) is module:
            package = sys.modules.get("scipy.linalg")
            if package is None:
                del sys.modules[MODULE]
            elif getattr(package, "cython_blas", None) is None:
                # (another thread imported scipy.linalg meanwhile, finding this module in
                # sys.modules: bind it on the package, as its own import would have)
                package.cython_blas = module
