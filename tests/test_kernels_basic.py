# SPDX-License-Identifier: Apache-2.0
"""Row / matrix / element-wise kernels against the NumPy oracle (attncore.reference):
softmax and log-softmax, linear and matmul (BLAS, 256-wide tiles), norms, activations,
embedding, position tables and rotary embeddings."""
import sys

import numpy as np
import pytest

import attncore
from attncore import reference
from attncore.kernels import _blas, _sdpa

from conftest import FLOAT_DTYPES, as64, assert_close

# ------------------------------------------------------------------ softmax / log_softmax

SOFTMAX_CASES = [
    pytest.param((1,), -1, id="n1"),
    pytest.param((7,), 0, id="n7"),
    pytest.param((3, 97), -1, id="3x97"),
    pytest.param((3, 97), 0, id="3x97-axis0"),
    pytest.param((2, 5, 257), 1, id="axis1"),
    pytest.param((2, 5, 257), -2, id="axis-2"),
    pytest.param((4, 1000), -1, id="4x1000"),
    # axes after the softmax axis spanning >= 256 elements: moved by the blocked transpose,
    # edges of its 32 x 32 blocks included
    pytest.param((45, 300), 0, id="45x300-axis0"),
    pytest.param((3, 33, 2, 130), 1, id="axis1-of-4d"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,axis", SOFTMAX_CASES)
def test_softmax_matches_reference(rng, shape, axis, log, dtype):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    kernel, oracle = ((attncore.log_softmax, reference.log_softmax) if log
                      else (attncore.softmax, reference.softmax))
    out = kernel(x, axis=axis)
    assert_close(out, oracle(as64(x), axis=axis), dtype)
    if not log:
        np.testing.assert_allclose(out.sum(axis=axis), 1, rtol=1e-5)


def _lengths_for(rng, x, axis):
    """Lengths for every row along ``axis``: 0, full and random values."""
    rows = np.delete(np.array(x.shape), axis % x.ndim)
    n = x.shape[axis]
    lengths = rng.integers(0, n + 1, size=tuple(rows))
    flat = lengths.reshape(-1)
    flat[0] = 0
    flat[-1] = n
    return lengths


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["nolen", "lengths"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape,axis", SOFTMAX_CASES[2:])
def test_masked_softmax_matches_reference(rng, shape, axis, with_mask, with_lengths, log, dtype):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    kw = {}
    if with_lengths:
        kw["lengths"] = _lengths_for(rng, x, axis)
    if with_mask:
        moved = rng.random(np.moveaxis(x, axis, -1).shape) < 0.6
        moved.reshape(-1, shape[axis])[1] = False  # one fully masked row
        kw["mask"] = np.moveaxis(moved, -1, axis)
    kernel, oracle = ((attncore.log_softmax, reference.log_softmax) if log
                      else (attncore.softmax, reference.softmax))
    out = kernel(x, axis=axis, **kw)
    expected = oracle(as64(x), axis=axis, **kw)
    assert_close(out, expected, dtype)
    keep = reference.valid_mask(shape, axis, kw.get("lengths"), kw.get("mask"))
    empty_rows = ~keep.any(axis=axis, keepdims=True)
    if kw:
        assert empty_rows.any(), "the case must contain a row with nothing valid"
    # rows with nothing valid are all zeros, never NaN, in both softmax and log_softmax
    empty_entries = np.broadcast_to(empty_rows, shape)
    assert np.array_equal(out[empty_entries], np.zeros(empty_entries.sum(), dtype))
    if log:
        assert np.isneginf(out[~keep & ~empty_entries]).all()
    else:
        assert np.array_equal(out[~keep], np.zeros((~keep).sum(), dtype))
        sums = out.astype(np.float64).sum(axis=axis)
        np.testing.assert_allclose(sums[~np.squeeze(empty_rows, axis)], 1, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_fully_masked_rows_are_zero(log, dtype):
    x = np.arange(12, dtype=dtype).reshape(3, 4)
    kernel = attncore.log_softmax if log else attncore.softmax
    for kw in ({"lengths": np.zeros(3, np.int64)}, {"mask": np.zeros((3, 4), bool)},
               {"mask": np.zeros((1, 4), bool)}):
        out = kernel(x, **kw)
        assert out.dtype == dtype
        assert np.array_equal(out, np.zeros((3, 4), dtype)), kw


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_rows_of_minus_inf_are_zero_like_the_reference(log, dtype):
    # an additive -inf mask over a whole row (or over all its valid entries) leaves nothing
    # valid: zeros as the reference gives, not NaN (exp(-inf - -inf)); 20 wide: the vector max
    x = np.full((4, 20), -np.inf, dtype=dtype)
    x[1, 3], x[2, 15] = 0.5, 2.0
    kernel = attncore.log_softmax if log else attncore.softmax
    oracle = reference.log_softmax if log else reference.softmax
    for kw in ({}, {"lengths": np.array([20, 20, 12, 5])},
               {"mask": np.arange(20) != 3}):
        out = kernel(x, **kw)
        np.testing.assert_array_equal(out, oracle(x, **kw).astype(dtype), err_msg=str(kw))
        assert not np.isnan(out).any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_nan_and_inf_rows_are_nan_in_the_reference_too(log, dtype):
    # a NaN among a row's valid entries, or +inf (inf - inf), makes its valid entries NaN in
    # the kernels (never a silent 0); the reference gave the NaN row zeros and the +inf row
    # [NaN, 0, ...], so a test against it could not see a kernel hide a NaN
    x = np.array([[1, np.nan, 2, 0], [np.inf, 1, 2, 0], [-np.inf, 1, np.inf, 0],
                  [1, 2, 3, 4], [1, 2, np.nan, 4]], dtype=dtype)
    kernel = attncore.log_softmax if log else attncore.softmax
    oracle = reference.log_softmax if log else reference.softmax
    for kw in ({}, {"mask": np.array([True, True, True, False])}, {"lengths": [4, 4, 4, 4, 2]}):
        out, want = kernel(x, **kw), oracle(x, **kw).astype(dtype)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want), err_msg=str(kw))
        assert np.isnan(want[:3, :3]).all(), kw    # the rows with NaN / +inf among the valid
        assert_close(np.where(np.isnan(out), 0, out), np.where(np.isnan(want), 0, want), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
def test_softmax_huge_magnitudes(rng, masked, log, dtype):
    """Entries of magnitude 1e4 (and, for softmax, rows that are all ~+-1e4): no overflow, no
    NaN. log_softmax of rows sitting at +-1e4 is checked in its own test below."""
    x = (1e4 * rng.standard_normal((6, 300))).astype(dtype)
    if not log:
        x[2] = -1e4 + rng.standard_normal(300).astype(dtype)  # all very negative, close together
        x[3] = 1e4 + rng.standard_normal(300).astype(dtype)   # all very positive, close together
    kw = {"mask": rng.random((6, 300)) < 0.9} if masked else {}
    kernel, oracle = ((attncore.log_softmax, reference.log_softmax) if log
                      else (attncore.softmax, reference.softmax))
    out = kernel(x, **kw)
    expected = oracle(as64(x), **kw)
    assert not np.isnan(out).any()
    assert_close(out, expected, dtype)
    if not log:
        np.testing.assert_allclose(out.sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
@pytest.mark.parametrize("dtype", [
    np.float32, np.float64])
def test_log_softmax_rows_far_from_zero(rng, dtype, masked):
    """log_softmax is shift invariant: rows around +-1e4 must be as accurate as rows around 0
    (relative to the O(1..10) outputs), as a loss over large logits needs."""
    x = rng.standard_normal((4, 300)).astype(dtype)
    x[0] -= dtype(1e4)
    x[1] += dtype(1e4)
    x[2] += dtype(3e3)
    kw = {"mask": rng.random((4, 300)) < 0.9} if masked else {}
    out = attncore.log_softmax(x, **kw)
    assert_close(out, reference.log_softmax(as64(x), **kw), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_non_contiguous_and_read_only(rng, log, dtype):
    base = rng.standard_normal((40, 70)).astype(dtype)
    x = base.T[::2]            # (35, 40), neither C- nor F-contiguous
    lengths = rng.integers(0, 41, size=35)
    mask = (rng.random((40, 35)) < 0.7).T
    assert not x.flags.c_contiguous and not mask.flags.c_contiguous
    base.flags.writeable = False
    kernel, oracle = ((attncore.log_softmax, reference.log_softmax) if log
                      else (attncore.softmax, reference.softmax))
    for axis, kw in ((-1, {"lengths": lengths, "mask": mask}), (0, {"mask": mask})):
        assert_close(kernel(x, axis=axis, **kw), oracle(as64(x), axis=axis, **kw), dtype)


def test_softmax_does_not_modify_input(rng):
    x = rng.standard_normal((4, 33))
    before = x.copy()
    attncore.softmax(x, lengths=[1, 2, 33, 0])
    attncore.log_softmax(x, mask=x > 0)
    assert np.array_equal(x, before)


# ------------------------------------------------------------------ linear / matmul

def gemm_atol(dtype, k, alpha=1.0):
    """float32 loosening for sums of k O(1) products: the partial sums grow like sqrt(j) and
    each addition rounds by eps times that, so the error random-walks to ~eps*k/sqrt(2); an
    entry that happens to be near 0 cannot meet rtol alone. 2*eps*k*|alpha| is a ~3-sigma
    bound. float64 keeps the table (None)."""
    if np.dtype(dtype) != np.float32:
        return None
    return max(1e-6, 2 * float(np.finfo(np.float32).eps) * k * alpha)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("x_shape,out_features", [
    pytest.param((97,), 101, id="1d"),
    pytest.param((5, 97), 101, id="5x97->101"),
    pytest.param((2, 3, 300), 257, id="3d-N257"),
    pytest.param((300, 101), 97, id="M300"),
    pytest.param((513, 7), 600, id="M513-N600"),
    pytest.param((1, 1), 1, id="1x1"),
])
def test_linear_matches_reference(rng, x_shape, out_features, bias, dtype):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((out_features, x_shape[-1])).astype(dtype)
    b = rng.standard_normal(out_features).astype(dtype) if bias else None
    out = attncore.linear(x, w, b)
    assert out.shape == x_shape[:-1] + (out_features,)
    atol = gemm_atol(dtype, x_shape[-1])
    assert_close(out, reference.linear(*as64(x, w, b)), dtype, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_non_contiguous_and_read_only(rng, dtype):
    x = rng.standard_normal((64, 30)).astype(dtype).T      # (30, 64) F-ordered
    w = rng.standard_normal((64, 40)).astype(dtype).T      # (40, 64)
    b = rng.standard_normal(80).astype(dtype)[::2]         # strided
    for a in (x, w):
        a.flags.writeable = False
    assert_close(attncore.linear(x, w, b), reference.linear(*as64(x, w, b)), dtype,
                 atol=gemm_atol(dtype, 64))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_zero_in_features(bias):
    """K = 0: the empty sum is 0, so the output is the bias (or zeros)."""
    x = np.zeros((3, 0))
    w = np.zeros((4, 0))
    b = np.arange(4.0) if bias else None
    out = attncore.linear(x, w, b)
    expected = np.broadcast_to(b if bias else np.zeros(4), (3, 4))
    assert out.shape == (3, 4)
    assert np.array_equal(out, expected)


def test_linear_zero_rows_and_zero_out_features(rng):
    w = rng.standard_normal((4, 5))
    assert attncore.linear(np.zeros((0, 5)), w).shape == (0, 4)
    assert attncore.linear(np.zeros((2, 0, 5)), w, np.ones(4)).shape == (2, 0, 4)
    assert attncore.linear(rng.standard_normal((3, 5)), np.zeros((0, 5))).shape == (3, 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("transpose_b", [False, True], ids=["ab", "abT"])
@pytest.mark.parametrize("alpha", [1.0, -0.5, 3.0])
@pytest.mark.parametrize("a_shape,n", [
    pytest.param((7, 13), 5, id="2d"),
    pytest.param((3, 9, 33), 17, id="3d"),
    pytest.param((2, 300, 101), 97, id="3d-M300"),
    pytest.param((1, 1), 1, id="1x1"),
    pytest.param((40, 70), 300, id="2d-column-strips"),      # 4 strips of 80, the last 60
    pytest.param((2, 20, 30), 200, id="3d-column-strips"),   # 64, 64, 64, 8
    pytest.param((5, 1100), 40, id="K1100"),                 # past the tile kernel's K: BLAS
])
def test_matmul_matches_reference(rng, a_shape, n, alpha, transpose_b, dtype):
    a = rng.standard_normal(a_shape).astype(dtype)
    k = a_shape[-1]
    b_shape = a_shape[:-2] + ((n, k) if transpose_b else (k, n))
    b = rng.standard_normal(b_shape).astype(dtype)
    out = attncore.matmul(a, b, transpose_b=transpose_b, alpha=alpha)
    expected = reference.matmul(*as64(a, b), transpose_b=transpose_b, alpha=alpha)
    atol = gemm_atol(dtype, k, abs(alpha))
    assert_close(out, expected, dtype, atol=atol)


@pytest.mark.skipif(not _blas.tile_matmul_used(64), reason="BLAS products on this machine")
@pytest.mark.parametrize("transpose_b", [False, True], ids=["ab", "abT"])
@pytest.mark.parametrize("M,K,N", [(40, 64, 200), (300, 33, 37), (24, 256, 256), (9, 70, 600),
                                   (20, 5, 40)])
def test_float32_tile_products_are_row_and_thread_independent(rng, M, K, N, transpose_b):
    """float32 matmul / linear on the tile kernel (AVX2 machines): each output is one FMA chain
    over k, so a row's bits do not depend on the other rows or on how threads cut the columns
    (in place for B rows up to 256 floats apart, copied into panels past that and for B^T)."""
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if transpose_b else (K, N)).astype(np.float32)
    with attncore.num_threads(1):
        one = attncore.matmul(a, b, transpose_b=transpose_b, alpha=0.5)
    with attncore.num_threads(2):
        two = attncore.matmul(a, b, transpose_b=transpose_b, alpha=0.5)
    np.testing.assert_array_equal(one, two)
    for i in (0, M // 2, M - 1):
        np.testing.assert_array_equal(
            attncore.matmul(a[i:i + 1], b, transpose_b=transpose_b, alpha=0.5), one[i:i + 1])
    assert_close(one, reference.matmul(*as64(a, b), transpose_b=transpose_b, alpha=0.5),
                 np.float32, atol=gemm_atol(np.float32, K, 0.5))
    if transpose_b and M > 17:  # linear's layout, past the few-row kernel's 16 rows
        bias = rng.standard_normal(N).astype(np.float32)
        lin = attncore.linear(a, b, bias)
        assert_close(lin, reference.linear(*as64(a, b, bias)), np.float32,
                     atol=gemm_atol(np.float32, K))
        np.testing.assert_array_equal(attncore.linear(a[1:], b, bias), lin[1:])


def test_products_refuse_rows_past_blas_int_range(tmp_path):
    # BLAS takes int dimensions: a row of 2^31 elements wrapped its stride. Sparse files hold
    # the 8 GiB operands without writing them; the refusal comes before any read.
    K = 2 ** 31
    try:
        x = np.memmap(tmp_path / "x", dtype=np.float32, mode="w+", shape=(1, K))
        w = np.memmap(tmp_path / "w", dtype=np.float32, mode="w+", shape=(1, K))
    except OSError as exc:   # (a file system without sparse files)
        pytest.skip(f"no 8 GiB sparse file here: {exc}")
    out = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="linear: rows of 2147483648 elements"):
        _blas.linear(x, w, None, out, 1)
    with pytest.raises(ValueError, match="matmul: rows of 2147483648 elements"):
        _blas.matmul(x.reshape(1, 1, K), w.reshape(1, 1, K), out.reshape(1, 1, 1), True, 1.0, 1)


def test_matmul_empty_inner_dimension_is_zero():
    out = attncore.matmul(np.ones((2, 0)), np.ones((0, 3)), alpha=2.0)
    assert np.array_equal(out, np.zeros((2, 3)))
    out = attncore.matmul(np.ones((4, 2, 0)), np.ones((4, 3, 0)), transpose_b=True)
    assert np.array_equal(out, np.zeros((4, 2, 3)))


def test_matmul_non_contiguous(rng):
    a = rng.standard_normal((3, 20, 10)).transpose(0, 2, 1)   # (3, 10, 20)
    b = rng.standard_normal((3, 30, 20))[:, ::2]              # (3, 15, 20)
    assert_close(attncore.matmul(a, b, transpose_b=True),
                 reference.matmul(a, b, transpose_b=True), np.float64)


# ------------------------------------------------------------------ layer_norm

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["standard", "uncentred", "rms"])
@pytest.mark.parametrize("affine", ["none", "gamma", "beta", "both"])
@pytest.mark.parametrize("shape", [(1,), (4, 7), (2, 3, 97), (300, 64)], ids=str)
def test_layer_norm_matches_reference(rng, shape, affine, mode, dtype):
    x = (2 + 3 * rng.standard_normal(shape)).astype(dtype)
    dim = shape[-1]
    gamma = rng.standard_normal(dim).astype(dtype) if affine in ("gamma", "both") else None
    beta = rng.standard_normal(dim).astype(dtype) if affine in ("beta", "both") else None
    out = attncore.layer_norm(x, gamma, beta, eps=1e-5, mode=mode)
    expected = reference.layer_norm(*as64(x, gamma, beta), eps=1e-5, mode=mode)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("mode", ["standard", "uncentred", "rms"])
def test_layer_norm_statistics(rng, mode):
    """The defining property, independent of the oracle: standard -> mean 0, variance 1;
    rms -> mean square 1; uncentred -> (x - mean) / sqrt(mean(x^2))."""
    x = 1.5 + rng.standard_normal((5, 50))
    y = attncore.layer_norm(x, eps=0.0, mode=mode)
    if mode == "standard":
        np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
        np.testing.assert_allclose(y.var(-1), 1, rtol=1e-10)
    elif mode == "rms":
        np.testing.assert_allclose((y ** 2).mean(-1), 1, rtol=1e-10)
    else:
        want = (x - x.mean(-1, keepdims=True)) / np.sqrt((x ** 2).mean(-1, keepdims=True))
        np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["standard", "uncentred", "rms"])
@pytest.mark.parametrize("offset, spread", [(1e4, 1.0), (-3e5, 20.0), (1e6, 0.2)])
def test_layer_norm_float32_rows_far_from_zero(rng, offset, spread, mode):
    """float32 rows sitting far from 0 keep their digits: the statistics come from the row
    shifted by its first element (one pass in float64, so m2 is not the difference of two
    sums of squares ~offset^2) and the centre is subtracted as two floats (the float32 mean
    alone is off by half an ulp of the offset, 5e-4 at 1e4, a shift of every output)."""
    x = (offset + spread * rng.standard_normal((6, 300))).astype(np.float32)
    out = attncore.layer_norm(x, eps=0.0, mode=mode)
    expected = reference.layer_norm(x.astype(np.float64), eps=0.0, mode=mode)
    # unit-scale outputs (standard) or outputs near +-1 / near 0: an absolute bound of a few
    # float32 roundings of values <= 17 in magnitude
    np.testing.assert_allclose(out, expected, rtol=0, atol=4e-6)


@pytest.mark.parametrize("mode", ["standard", "uncentred", "rms"])
@pytest.mark.parametrize("row, eps", [
    ([3e38, -3e38, -3e38, -3e38, 1e38], 1e-5),       # x - mean past FLT_MAX in float32
    ([0, 1e-40, 0, 1e-40, 5e-41], 0.0),             # a denormal spread, eps 0: 1/std past it
    ([1e-39, 1.5e-39, 1e-39, 1.2e-39, 1.1e-39], 0.0),
    ([2e-36, 3e-36, 2.5e-36, 2e-36, 2.2e-36], 0.0),
    ([1e-40, 1e-40, 1e-40, 1e-40 + 2.0 ** -149, 1e-40], 1e-30),   # the mean's low half
    ([1e-37, 1e-37 + 2.0 ** -148, 1e-37, 1e-37 + 2.0 ** -149, 1e-37], 1e-30)],
    ids=["huge", "denormal", "denormal2", "tiny", "denormal-eps", "tiny-steps-eps"])
def test_layer_norm_float32_extreme_rows(row, eps, mode):
    """Rows where float32 arithmetic would overflow or run out of digits (the float64 output
    takes them) give the reference's finite values, not inf or NaN."""
    x = np.array([row], dtype=np.float32)
    out = attncore.layer_norm(x, eps=eps, mode=mode)
    expected = reference.layer_norm(x.astype(np.float64), eps=eps, mode=mode)
    # (relative to the row's scale: with eps 1e-30 the outputs are ~1e-30)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-7 * np.abs(expected).max())


def test_layer_norm_eps_matters(rng):
    x = rng.standard_normal((3, 8)) * 1e-3
    assert not np.allclose(attncore.layer_norm(x, eps=1e-5), attncore.layer_norm(x, eps=0.0))
    assert_close(attncore.layer_norm(x, eps=1e-5), reference.layer_norm(x, eps=1e-5), np.float64)


# ------------------------------------------------------------------ activations

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "swish", "tanh", "sigmoid"]
EXTREMES = [-1e4, -1e3, -100.0, -88.5, -87.0, -30.0, -20.0, -5.0, -1e-3, -1e-30, 0.0, 1e-30,
            1e-3, 5.0, 20.0, 30.0, 87.0, 88.5, 100.0, 1e3, 1e4]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("n", [1, 7, 8, 33, 40000], ids=lambda n: f"n{n}")
def test_activation_matches_reference(rng, n, name, dtype):
    """Random inputs (n crossing the 8-lane SIMD width and the 16384-element parallel chunk)
    plus extremes, against the float64 oracle."""
    x = (4 * rng.standard_normal(n)).astype(dtype)
    x[: min(n, len(EXTREMES))] = np.array(EXTREMES, dtype=dtype)[: min(n, len(EXTREMES))]
    out = getattr(attncore, name)(x)
    with np.errstate(over="ignore"):  # the oracle's exp(1e4) overflows to inf on purpose
        expected = getattr(reference, name)(as64(x))
    assert not np.isnan(out).any()
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_float32_gelu_on_a_dense_grid(name):
    # float32 GELUs run vector code (erf form: 1 - erfc for x >= 0, erfc for x < 0, in float
    # lanes with x^2 kept exact in the exponent; the tanh form as x sigmoid(2u)): every value
    # of a dense grid to float32's relative accuracy -- the negative tail too, where 1 + erf
    # cancels (a first version was 2% off at x = -4.7 and 200% at -5.55, inside the absolute
    # tolerance) --, and an element's bits independent of where it sits in the array (padded
    # tails)
    from scipy.special import ndtr
    x = np.linspace(-14, 14, 280001).astype(np.float32)
    out = getattr(attncore, name)(x)
    assert_close(out, getattr(reference, name)(as64(x)), np.float32)
    # relative accuracy against forms without cancellation (the reference's 1 + erf / 1 + tanh
    # in double leaves ~1e-16 of noise in the far tail): x Phi(x), x / (1 + exp(-2u))
    x64 = as64(x)
    u = np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)
    with np.errstate(over="ignore"):
        exact = x64 * ndtr(x64) if name == "gelu" else x64 / (1 + np.exp(-2 * u))
    if name == "gelu":   # 2^n applied last: relative accuracy down to the smallest normal
        kept, rtol = np.abs(exact) > np.finfo(np.float32).tiny, 2e-6
    else:   # float lanes: exp(-2u) of |2u| up to 88 carries |2u| ulps; 0 past it (|out| < 1e-37)
        kept, rtol = np.abs(exact) > 1e-30, 2e-5
    np.testing.assert_allclose(out[kept], exact[kept], rtol=rtol, atol=0)
    assert (out[x < 0] <= 0).all() and (out[x > 0] > 0).all()
    if name == "gelu":   # -inf * Phi(-inf) = -inf * 0 is NaN, as the reference; huge |x|: x or 0
        special = np.array([-np.inf, np.inf, np.nan, -1e30, 1e30, -3e38, 3e38], np.float32)
        np.testing.assert_array_equal(attncore.gelu(special),
                                      [np.nan, np.inf, np.nan, -0.0, special[4], -0.0, special[6]])
        # (assert_array_equal takes -0.0 for 0.0): the sign of the vanishing tail and of zero
        signs = np.signbit(attncore.gelu(np.array([-1e30, -3e38, -0.0, 0.0], np.float32)))
        assert signs.tolist() == [True, True, True, False]
    for start in (0, 3, 5, 7):
        np.testing.assert_array_equal(getattr(attncore, name)(x[start:start + 13]),
                                      out[start:start + 13])


def test_float32_tanh_keeps_relative_accuracy_near_zero():
    # the vector tanh was 1 - 2 / (exp(2x) + 1), which cancels for small |x| (166% off at
    # 4e-8, 9e-4 at 1e-3, inside the absolute tolerance); it is now -m / (2 + m) with
    # m = expm1(-2|x|) and the sign put back: ~2 ulp from the smallest float to saturation,
    # and an element's bits independent of where it sits in the array (padded tails)
    x = np.logspace(-44, 1.7, 200001).astype(np.float32)
    x = np.concatenate([x, -x, np.linspace(-20, 20, 40001, dtype=np.float32)])
    out = attncore.tanh(x)
    np.testing.assert_allclose(out, np.tanh(as64(x)), rtol=5e-7, atol=0)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-45], np.float32)
    np.testing.assert_array_equal(attncore.tanh(edges), [0, 0, 1, -1, np.nan, 1, -1, edges[7]])
    assert np.signbit(attncore.tanh(edges[:2])).tolist() == [False, True]
    for start in (0, 3, 5, 7, 11):
        np.testing.assert_array_equal(attncore.tanh(x[start:start + 21]), out[start:start + 21])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_activation_saturation(dtype):
    """Large |x|: the exact limits, finite, no NaN."""
    big = np.array([-1e4, -1e3, -200.0, 200.0, 1e3, 1e4], dtype=dtype)
    neg, pos = big < 0, big > 0
    out = {name: getattr(attncore, name)(big) for name in ACTIVATIONS}
    for name, y in out.items():
        assert np.isfinite(y).all(), name
    assert np.array_equal(out["tanh"], np.sign(big))
    assert np.array_equal(out["sigmoid"][pos], np.ones(pos.sum(), dtype))
    assert np.abs(out["sigmoid"][neg]).max() < 1e-30
    for name in ("relu", "gelu", "gelu_tanh", "swish"):
        assert np.array_equal(out[name][pos], big[pos]), name
        assert np.abs(out[name][neg]).max() < 1e-30, name


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_keeps_shape_and_accepts_views(rng, name):
    x = rng.standard_normal((6, 10)).astype(np.float32).T[::2]   # (5, 6), non-contiguous
    out = getattr(attncore, name)(x)
    assert out.shape == x.shape
    assert_close(out, getattr(reference, name)(as64(x)), np.float32)


def test_activation_of_a_scalar_keeps_its_shape():
    x = np.float64(0.75)
    for name in ACTIVATIONS:
        out = getattr(attncore, name)(x)
        assert np.shape(out) == (), name
        assert_close(out, getattr(reference, name)(np.asarray(x)), np.float64)


def test_gelu_is_exact_not_tanh_approximation():
    x = np.array([-3.0, -1.0, 0.5, 2.0])
    assert not np.allclose(attncore.gelu(x), attncore.gelu_tanh(x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ embedding

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("ids_shape", [
    (5,), (3, 4), (2, 0),
    (),
], ids=str)
def test_embedding_gathers_rows(rng, ids_shape, dtype):
    table = rng.standard_normal((11, 9)).astype(dtype)
    ids = rng.integers(0, 11, size=ids_shape)
    out = attncore.embedding(table, ids)
    assert out.shape == ids_shape + (9,)
    assert out.dtype == dtype
    assert np.array_equal(out, reference.embedding(table, ids))


def test_embedding_edges_of_the_vocabulary(rng):
    table = rng.standard_normal((6, 3))
    ids = np.array([[0, 5], [5, 0]], dtype=np.int32)
    assert np.array_equal(attncore.embedding(table, ids), table[ids])


# ------------------------------------------------------------------ positions

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("length,dim", [(1, 2), (50, 16), (7, 9), (100, 512)])
def test_sinusoidal_positions(length, dim, dtype):
    table = attncore.sinusoidal_positions(length, dim, dtype=dtype)
    assert table.shape == (length, dim) and table.dtype == dtype
    p = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(dim)[None, :]
    angle = p / 10000.0 ** ((i - i % 2) / dim)          # pair (2i, 2i+1) shares a frequency
    expected = np.where(i % 2 == 0, np.sin(angle), np.cos(angle))
    assert_close(table, expected, dtype)
    # positions start at 0: sin 0 = 0 on even, cos 0 = 1 on odd dimensions
    assert np.array_equal(table[0, 0::2], np.zeros((dim + 1) // 2, dtype))
    assert np.array_equal(table[0, 1::2], np.ones(dim // 2, dtype))
    assert_close(table, reference.sinusoidal_positions(length, dim, dtype=np.float64), dtype)


def test_sinusoidal_positions_in_blocks_equal_one_table():
    # made a block of rows at a time (a whole float64 table was 3x the result's memory): the
    # same bits as the reference's single table, across block edges
    for length, dim in ((3000, 512), (5, 1 << 20)):
        np.testing.assert_array_equal(attncore.sinusoidal_positions(length, dim),
                                      reference.sinusoidal_positions(length, dim))


def test_sinusoidal_positions_base(rng):
    # against the closed form (attncore's table is built from the reference's blocks, so a
    # comparison with the reference alone compares the code with itself)
    t = attncore.sinusoidal_positions(20, 8, dtype=np.float64, base=100.0)
    p, i = np.arange(20.0)[:, None], np.arange(8)[None, :]
    angle = p / 100.0 ** ((i - i % 2) / 8)
    assert_close(t, np.where(i % 2 == 0, np.sin(angle), np.cos(angle)), np.float64)
    assert not np.allclose(t, attncore.sinusoidal_positions(20, 8, dtype=np.float64))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 8), (3, 17, 6), (2, 4, 33, 64),
                                   (3, 7, 5, 12), (2, 3, 1026)], ids=str)
@pytest.mark.parametrize("custom_positions", [False, True], ids=["default", "positions"])
def test_rotary_matches_reference(rng, shape, custom_positions, dtype):
    # (3, 7, 5, 12): 21 rows a position, two of the kernel's blocks of 16 rows sharing one
    # position's angles; (2, 3, 1026): 513 pairs, past its angle scratch (the per-element loop)
    x = rng.standard_normal(shape).astype(dtype)
    positions = rng.integers(0, 5000, size=shape[-2]) if custom_positions else None
    out = attncore.rotary(x, positions)
    assert_close(out, reference.rotary(as64(x), positions), dtype)
    # rotations preserve the norm of every pair
    pairs = lambda a: np.hypot(as64(a)[..., 0::2], as64(a)[..., 1::2])  # noqa: E731
    np.testing.assert_allclose(pairs(out), pairs(x), rtol=1e-5)


def test_rotary_leaves_input_alone_and_accepts_views(rng):
    x = rng.standard_normal((8, 12, 3)).transpose(2, 0, 1)   # (3, 8, 12) non-contiguous
    before = x.copy()
    out = attncore.rotary(x, base=500.0)
    assert np.array_equal(x, before)
    assert_close(out, reference.rotary(before, base=500.0), np.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rotary_scores_depend_only_on_relative_offset(rng, dtype):
    """<rot(q, m), rot(k, n)> is a function of m - n: shifting both positions changes nothing."""
    length, dim = 24, 16
    q = np.repeat(rng.standard_normal((1, dim)), length, axis=0).astype(dtype)
    k = np.repeat(rng.standard_normal((1, dim)), length, axis=0).astype(dtype)
    positions = np.arange(length)
    scores = as64(attncore.rotary(q, positions)) @ as64(attncore.rotary(k, positions)).T
    # Toeplitz: S[m, n] == S[m + 1, n + 1]
    # scores are sums of `dim` O(1) products computed from float32 rotations: judged at that scale
    tol = {"rtol": 1e-5, "atol": 2e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}
    np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], **tol)
    shifted = (as64(attncore.rotary(q, positions + 1000))
               @ as64(attncore.rotary(k, positions + 1000)).T)
    np.testing.assert_allclose(shifted, scores, **tol)
    # and it really depends on the offset (not a constant)
    assert np.ptp(scores[0]) > 1e-2


@pytest.mark.parametrize("small_gemm_macs", [0, 10 ** 6], ids=["packed-blas", "small-blas"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("K,N", [(512, 200), (37, 64), (50, 129), (1, 1), (3, 5)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 13, 16, 17, 40, 256, 300])
def test_packed_linear_matches_reference(monkeypatch, M, K, N, bias, small_gemm_macs):
    # PackedLinearWeight: the panel kernel up to _blas.packed_panel_max_rows() rows (groups of
    # 16 rows, in blocks of 6 and their remainders; the last panel partly padded), BLAS on the
    # panels beyond: whole-K tiles, or (for a BLAS with a small-matrix kernel) calls under its
    # size limit, K=512 in two accumulated chunks
    monkeypatch.setattr(sys.modules["attncore.kernels.basic"], "BLAS_SMALL_GEMM_MACS",
                        small_gemm_macs)
    rng = np.random.default_rng(M * 1000 + K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    packed = attncore.kernels.PackedLinearWeight(w)
    assert packed.shape == (N, K)
    np.testing.assert_array_equal(packed.unpack(), w)
    expected = reference.linear(x.astype(np.float64), w.astype(np.float64),
                                None if b is None else b.astype(np.float64))
    with attncore.num_threads(2):
        got = attncore.linear(x, packed, b)
    assert got.dtype == np.float32 and got.shape == (M, N)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(K))


@pytest.mark.parametrize("K,N", [(512, 130), (37, 9), (8, 64)])
def test_packed_linear_rows_do_not_depend_on_the_batch(K, N):
    # every output is one FMA chain over k in order: a row gives the same bits alone, in any
    # block of rows, and for any thread count
    # (the panel kernel's whole range: every remainder of the 6-row blocks, several 16-row groups;
    # a scalar build's panel kernel takes 16 rows, BLAS past them rounds by the call's shape)
    panel_rows = _blas.packed_panel_max_rows()
    rng = np.random.default_rng(K + N)
    x = rng.standard_normal((40, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    packed = attncore.kernels.PackedLinearWeight(w)
    alone = np.stack([attncore.linear(x[i:i + 1], packed, b)[0] for i in range(40)])
    for M in range(1, 41):
        with attncore.num_threads(2):
            got = attncore.linear(x[:M], packed, b)
        if M <= panel_rows:
            np.testing.assert_array_equal(got, alone[:M], err_msg=f"M={M}")
        else:
            np.testing.assert_allclose(got, alone[:M], rtol=1e-5, atol=1e-5 * np.sqrt(K),
                                       err_msg=f"M={M}")


@pytest.mark.skipif(not _sdpa.tile_products(), reason="the tile kernel needs AVX2 or AVX-512")
@pytest.mark.parametrize("small_gemm_macs", [0, 10 ** 6], ids=["whole-K", "K-chunks"])
def test_packed_linear_rows_past_the_panel_kernel_on_the_tile_kernel(monkeypatch,
                                                                    small_gemm_macs):
    # on the AVX2 and AVX-512 kernels, rows past the panel kernel's range run on the tile kernel
    # (src_c/tile_gemm.h), whose outputs are the same FMA chains: a row gives the same bits alone
    # as in a batch of any size, float32 and bfloat16 panels, K whole or in accumulated chunks
    monkeypatch.setattr(sys.modules["attncore.kernels.basic"], "BLAS_SMALL_GEMM_MACS",
                        small_gemm_macs)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((531, 300)).astype(np.float32)
    w = rng.standard_normal((130, 300)).astype(np.float32)
    b = rng.standard_normal(130).astype(np.float32)
    for dtype in ("float32", "bfloat16"):
        packed = attncore.kernels.PackedLinearWeight(w, dtype)
        alone = np.stack([attncore.linear(x[i:i + 1], packed, b)[0] for i in (0, 255, 256, 530)])
        for M in (257, 300, 531):
            with attncore.num_threads(2):
                got = attncore.linear(x[:M], packed, b)
            rows = [i for i in (0, 255, 256, 530) if i < M]
            np.testing.assert_array_equal(got[rows], alone[:len(rows)], err_msg=f"{dtype} M={M}")
    # many row tiles run row-tile-major (x read once per tile, not once per panel): the same bits
    # at 1 and 2 threads, and a row's bits as alone
    big = np.concatenate([x] * 10)                               # 5310 rows: 21 row tiles
    packed = attncore.kernels.PackedLinearWeight(w)
    alone = attncore.linear(big[5000:5001], packed, b)[0]
    for threads in (1, 2):
        with attncore.num_threads(threads):
            got = attncore.linear(big, packed, b)
        np.testing.assert_array_equal(got[5000], alone)
        np.testing.assert_array_equal(got[:531], got[531:1062])


@pytest.mark.parametrize("small_gemm_macs", [0, 10 ** 6], ids=["whole-K", "small-matrix"])
@pytest.mark.parametrize("M", [17, 64, 300, 530])
def test_packed_linear_blas_rows_bit_identical_across_thread_counts(monkeypatch, M,
                                                                   small_gemm_macs):
    # past the panel kernel's range: equal row tiles x panels, threads splitting the panels;
    # the tiles depend on the shape only (17 and 64 rows: the panel kernel, with threads
    # splitting the panels)
    monkeypatch.setattr(sys.modules["attncore.kernels.basic"], "BLAS_SMALL_GEMM_MACS",
                        small_gemm_macs)
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, 300)).astype(np.float32)
    packed = attncore.kernels.PackedLinearWeight(rng.standard_normal((330, 300)).astype(np.float32))
    results = []
    for threads in (1, 2, 3):
        with attncore.num_threads(threads):
            results.append(attncore.linear(x, packed))
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


def test_packed_panels_get_memory_of_their_own():
    """Packed panels come from huge-page chunks (attncore.kernels._memory): each array is
    C-contiguous, page-aligned when large, zeroed, writable until packed, and no two arrays
    overlap; a packed weight's panels are read-only and unpack to the weight."""
    from attncore.kernels._memory import MIN_BYTES, empty_for_streaming

    requests = [((300, 256, 64), np.float32), ((3, 5), np.float32), ((70, 512, 64), np.uint16),
                ((2, 1500, 1000), np.float32), ((128, 64), np.float32)]
    arrays = [empty_for_streaming(shape, dtype) for shape, dtype in requests]
    for (shape, dtype), a in zip(requests, arrays):
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.flags.writeable
        if a.nbytes >= MIN_BYTES:
            assert a.ctypes.data % 4096 == 0
            assert not a.any()  # new anonymous memory
    for i, a in enumerate(arrays):
        assert not any(np.shares_memory(a, b) for b in arrays[i + 1:])
    w = np.random.default_rng(0).standard_normal((700, 300)).astype(np.float32)
    packed = attncore.kernels.PackedLinearWeight(w)
    assert not packed.panels.flags.writeable and np.array_equal(packed.unpack(), w)


@pytest.mark.parametrize("in_features", [1, 2, 65])
def test_unpack_gives_a_new_array(in_features):
    # with one in_feature the float32 unpack was a read-only view of the panels
    w = np.random.default_rng(1).standard_normal((3, in_features)).astype(np.float32)
    for weight_dtype in ("float32", "bfloat16", "int8"):
        packed = attncore.kernels.PackedLinearWeight(w, weight_dtype=weight_dtype)
        got = packed.unpack()
        assert not np.shares_memory(got, packed.panels) and got.flags.writeable
        got *= 2   # (raised "output array is read-only" on the view)
        np.testing.assert_array_equal(packed.unpack() * 2, got)


def test_packed_linear_rejects_bad_input():
    w = np.ones((5, 3), np.float32)
    packed = attncore.kernels.PackedLinearWeight(w)
    with pytest.raises(TypeError, match="x must be float32"):
        attncore.linear(np.ones((2, 3)), packed)
    with pytest.raises(ValueError, match="weight must have shape"):
        attncore.linear(np.ones((2, 4), np.float32), packed)
    with pytest.raises(ValueError, match="bias must have shape"):
        attncore.linear(np.ones((2, 3), np.float32), packed, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="weight"):
        attncore.kernels.PackedLinearWeight(np.ones((0, 3), np.float32))
    with pytest.raises(ValueError, match="weight"):
        attncore.kernels.PackedLinearWeight(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="read-only"):
        packed.panels[0, 0, 0] = 1


@pytest.mark.parametrize("K,N", [(512, 70), (37, 9), (50, 20), (8, 1), (3, 5)])
def test_small_float32_linear_rows_do_not_depend_on_the_batch(K, N):
    # Decoding steps (<= 16 rows) take attncore's own small-M product, blocked over rows and
    # columns; each row must come out bit-identical whatever rows surround it (a sentence alone or
    # inside a batch), and within float32 rounding of the reference.
    rng = np.random.default_rng(K * 100 + N)
    x = rng.standard_normal((16, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    alone = np.stack([attncore.linear(x[i:i + 1], w, b)[0] for i in range(16)])
    for M in range(1, 17):
        with attncore.num_threads(2):
            np.testing.assert_array_equal(attncore.linear(x[:M], w, b), alone[:M], err_msg=f"M={M}")
    expected = reference.linear(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(alone, expected, rtol=1e-4, atol=1e-4 * np.sqrt(K))


def test_an_edited_packed_weight_is_refused_not_read_past():
    # PackedLinearWeight's attributes are plain Python ones: a shape or panels that no longer
    # agree must stop at the kernel's front, not make it read past the panels (it segfaulted)
    import attncore
    from attncore.kernels import PackedLinearWeight
    x = np.ones((2, 4), np.float32)
    packed = PackedLinearWeight(np.ones((8, 4), np.float32))
    packed.shape = (1 << 22, 4)
    with pytest.raises(ValueError, match="do not hold a"):
        attncore.linear(x, packed)
    packed = PackedLinearWeight(np.ones((8, 4), np.float32))
    packed.panels = np.zeros((1, 3, 64), np.float32)
    with pytest.raises(ValueError):
        attncore.linear(x, packed)
    packed.panels = np.zeros((1, 4, 64), np.float64)
    with pytest.raises(ValueError):
        attncore.linear(x, packed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_activations_keep_the_reference_answer_on_non_finite_input(dtype):
    # relu(NaN) was 0 (a NaN hidden); float32 swish(-inf) was -inf in the 8-lane body and NaN
    # in the scalar tail (sigmoid saturated at ~4e-39 instead of 0): every length and position
    # now gives the reference's answer
    for n in (1, 8, 9, 17):
        for at in {0, n - 1}:
            x = np.linspace(-3, 3, n).astype(dtype)
            for special in (np.nan, -np.inf, np.inf, -100.0):
                x[at] = special
                for name in ("relu", "sigmoid", "swish", "tanh", "gelu", "gelu_tanh"):
                    with np.errstate(invalid="ignore", over="ignore"):
                        want = getattr(reference, name)(x.astype(np.float64)).astype(dtype)
                    np.testing.assert_allclose(getattr(attncore, name)(x), want, rtol=1e-5,
                                               atol=1e-6, err_msg=f"{name} n={n} x[{at}]={special}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nadaraya_watson_stays_finite_at_extreme_bandwidths_and_distances(dtype):
    # float32 overflowed 1 / (2 h^2) for h < ~1e-19 and squared distances past ~1e38: NaN
    keys = np.array([[0.0], [1.0], [3.0]], dtype)
    values = np.array([[1.0], [2.0], [3.0]], dtype)
    out = attncore.nadaraya_watson(np.array([[0.9]], dtype), keys, values, bandwidth=1e-20)
    np.testing.assert_array_equal(out, [[2.0]])                 # the nearest key's value
    far = attncore.nadaraya_watson(np.array([[1e20]], dtype), keys, values)
    np.testing.assert_array_equal(far, [[2.0]])   # every key 1e40 away (in double): the mean
    tie = attncore.nadaraya_watson(np.array([[0.5]], dtype), keys, values, bandwidth=1e-20)
    np.testing.assert_allclose(tie, [[1.5]])                    # two nearest keys share it


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_a_masked_out_nan_is_out_like_any_masked_entry(log, dtype):
    # valid entries all -inf, a NaN only where the mask excludes it: nothing valid (zeros,
    # as the reference), never a NaN row
    x = np.array([[-np.inf, np.nan, -np.inf, 3.0], [0.5, np.nan, -np.inf, 3.0]], dtype)
    mask = np.array([[True, False, True, False], [True, False, True, False]])
    kernel = attncore.log_softmax if log else attncore.softmax
    oracle = reference.log_softmax if log else reference.softmax
    out = kernel(x, mask=mask)
    np.testing.assert_array_equal(out, oracle(x, mask=mask).astype(dtype))
    assert not np.isnan(out).any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 31, 33), (3, 64, 96), (2, 100, 7), (1, 0, 5)])
def test_swap_last_axes_is_a_transpose(rng, shape, dtype):
    from attncore.kernels import _layers
    x = rng.standard_normal(shape).astype(dtype)
    out = np.full((shape[0], shape[2], shape[1]), np.nan, dtype)
    for threads in (1, 2):
        _layers.swap_last_axes(x, out, threads)
        np.testing.assert_array_equal(out, x.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="swap_last_axes: out must have shape"):
        _layers.swap_last_axes(x, np.empty(shape, dtype) if shape[1] != shape[2] else
                               np.empty((shape[0] + 1,) + shape[1:], dtype), 1)


def test_softmax_over_a_moved_axis_is_contiguous_in_the_input_layout(rng):
    x = rng.standard_normal((40, 300)).astype(np.float32)
    out = attncore.softmax(x, axis=0)
    assert out.shape == x.shape and out.flags.c_contiguous
    np.testing.assert_allclose(out, reference.softmax(x.astype(np.float64), axis=0), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, axis", [((50, 64), 0), ((3, 70, 67), 1), ((2, 33, 300), 1),
                                         ((4096, 70), 0), ((5, 9, 2, 260), 1)], ids=str)
def test_float32_softmax_down_the_columns(rng, shape, axis, log):
    # float32, nothing excluded, 64 or more elements after the axis: the column kernel
    # (blocks of 256 columns, the last one short), no transposes; special columns: a NaN, a
    # +inf (NaN columns, as the row kernel gives), -inf entries, a column of -inf (all 0)
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    moved = np.moveaxis(x, axis, 0)           # (a view: the columns are moved[:, ...])
    flat = moved.reshape(shape[axis], -1)
    flat[4, 1] = np.nan
    flat[2, 3] = np.inf
    flat[:, 5] = -np.inf
    flat[::3, 7] = -np.inf
    x = np.moveaxis(flat.reshape(moved.shape), 0, axis).copy()
    kernel = attncore.log_softmax if log else attncore.softmax
    oracle = reference.log_softmax if log else reference.softmax
    out = kernel(x, axis=axis)
    want = oracle(x.astype(np.float64), axis=axis)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(out[finite], want[finite], rtol=2e-6, atol=1e-6 if log else 1e-7)
    assert np.isnan(np.moveaxis(out, axis, 0).reshape(shape[axis], -1)[:, 1:4:2]).all()
    assert (np.moveaxis(out, axis, 0).reshape(shape[axis], -1)[:, 5] == 0).all()
    with attncore.num_threads(1):
        one = kernel(x, axis=axis)
    with attncore.num_threads(2):
        np.testing.assert_array_equal(kernel(x, axis=axis), one)


@pytest.mark.parametrize("offset", [1e4, 3e5, -1e6])
def test_float32_log_softmax_down_the_columns_far_from_zero(rng, offset):
    # found by review: max + log(sum) rounded to float32 before x was taken from it, an error
    # of |x|'s ulp (0.03 at 3e5) in results near -1; now (x - max) - log(sum)
    x = (offset + rng.standard_normal((40, 16, 5))).astype(np.float32)
    out = attncore.log_softmax(x, axis=0)
    want = reference.log_softmax(x.astype(np.float64), axis=0)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_float32_softmax_of_a_long_row_keeps_its_sum(rng, log):
    # 2^20 entries: the vector exponentials' sum is added up in float64 block by block (one
    # float32 vector accumulator had lost 2e-5 of it on the AVX2 kernels)
    x = rng.standard_normal((2, 1 << 20)).astype(np.float32)
    kernel = attncore.log_softmax if log else attncore.softmax
    oracle = reference.log_softmax if log else reference.softmax
    np.testing.assert_allclose(kernel(x), oracle(x.astype(np.float64)), rtol=1e-6,
                               atol=1e-6 if log else 0)
