# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: a seeded random generator, the tolerance table (one place, keyed by
dtype), ``assert_close``, and ``subprocess_env`` for tests that run attncore in a child process.

Kernels are compared with :mod:`attncore.reference`. For float32 inputs the oracle is evaluated
on the same inputs upcast to float64 (``as64``), so the tolerance measures the kernel's own
float32 error, not the sum of the kernel's and the NumPy float32 oracle's.
"""
import os

import numpy as np
import pytest

#: Tolerances by dtype, stated once. float64 kernels accumulate in float64 and must agree with
#: the NumPy oracle to a few ulps of the values involved; float32 kernels (SIMD exp/tanh with
#: ~2 ulp error, BLAS sgemm, float32 accumulators) to a few float32 ulps of O(1) outputs.
#: Any loosening happens at the call site, with a comment saying why.
TOLERANCE = {
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
    np.dtype(np.float32): {"rtol": 1e-5, "atol": 1e-6},
}

FLOAT_DTYPES = (np.float32, np.float64)


def rows_independent():
    """Whether a model row's bits may be required not to depend on the batch around it: on
    AVX2 and AVX-512 machines every product of a model runs on packed weights (the panel kernel
    up to 256 rows, the tile kernel past that: one FMA chain per output either way) and
    attention on the flash path at every length. Elsewhere (scalar builds: BLAS past 16 rows)
    only to rounding."""
    import attncore
    return attncore.info()["simd"] in ("avx2+fma", "avx512")


def subprocess_env(env=None, **extra):
    """Environment for a child ``python`` that must import the attncore under test.

    The child runs from an empty directory; ``PYTHONPATH`` keeps the caller's entries first (a
    test may shadow a module, e.g. a failing 'matplotlib') and then adds the folder this process
    imported attncore from: the source tree when built in place, site-packages when installed
    (CI), where the checkout's un-built source tree must not be imported.
    """
    import attncore
    environ = dict(os.environ if env is None else env, **extra)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(attncore.__file__)))
    environ["PYTHONPATH"] = os.pathsep.join(
        [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [package_parent])
    return environ


#: Seed of every test's ``rng``; override with ATTNCORE_TEST_SEED to shake out seed-dependence.
SEED = int(os.environ.get("ATTNCORE_TEST_SEED", "0"))


def tolerance(dtype):
    """The ``rtol``/``atol`` dict for ``dtype``."""
    return dict(TOLERANCE[np.dtype(dtype)])


def assert_close(actual, expected, dtype, *, rtol=None, atol=None, err_msg=""):
    """``actual`` has ``dtype``, the shape of ``expected``, no NaN/inf where ``expected`` is
    finite, and agrees with ``expected`` within the tolerance of ``dtype``.

    ``rtol``/``atol`` override the table; callers that pass them say why in a comment.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.dtype(dtype), f"dtype {actual.dtype}, expected {np.dtype(dtype)}"
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    tol = tolerance(dtype)
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    finite = np.isfinite(expected)
    assert np.isfinite(actual[finite]).all(), f"non-finite values where finite expected {err_msg}"
    # -inf entries (log_softmax exclusions) must match exactly; assert_allclose handles inf
    np.testing.assert_allclose(actual, expected.astype(np.float64), err_msg=err_msg, **tol)


def score_atol(dtype, score_bound):
    """``atol`` for softmax-weighted outputs whose scores reach ``score_bound`` in magnitude.

    Loosening for float32 only: a float32 score s is rounded to ~eps*|s|, and a softmax output
    moves by about that much (times the O(1) values it averages). With O(1) scores this is
    below the table's atol; with scores of ~10-50 (large ``scale``, long additive hidden sizes)
    it is not. float64 keeps the table's value (returns None).
    """
    if np.dtype(dtype) != np.float32:
        return None
    return max(TOLERANCE[np.dtype(np.float32)]["atol"],
               2 * float(np.finfo(np.float32).eps) * float(score_bound))


def as64(*arrays):
    """The arrays upcast to float64 (``None`` passes through); one array in, one array out."""
    out = tuple(None if a is None else np.asarray(a, dtype=np.float64) for a in arrays)
    return out[0] if len(out) == 1 else out


@pytest.fixture
def rng(request):
    """A generator seeded from SEED and the test's node id: stable per test, different across
    tests (so parametrised cases do not all see the same numbers)."""
    digest = sum((i + 1) * ord(c) for i, c in enumerate(request.node.nodeid))
    return np.random.default_rng([SEED, digest])
