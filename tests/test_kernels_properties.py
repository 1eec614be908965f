# SPDX-License-Identifier: Apache-2.0
"""Property tests (hypothesis) of the kernels: invariants that hold for every shape, not just the
ones picked in test_kernels_*.py.

* softmax rows sum to 1, or to 0 when nothing in the row is valid;
* attention is equivariant to permuting keys and values together (non-causal);
* causal attention ignores the future: changing keys/values a query cannot see changes nothing;
* results are bit-identical (np.array_equal) for 1, 2 and 3 threads: kernels split work by
  shape, never by thread count.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncore

from conftest import FLOAT_DTYPES, assert_close

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from(FLOAT_DTYPES)
seeds = st.integers(0, 2 ** 32 - 1)


def _gen(seed):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ softmax

@PROPERTY_SETTINGS
@given(rows=st.integers(1, 6), n=st.integers(1, 300), dtype=dtypes, seed=seeds,
       use_lengths=st.booleans(), use_mask=st.booleans(), magnitude=st.sampled_from([1.0, 1e4]))
def test_softmax_rows_sum_to_one_or_zero(rows, n, dtype, seed, use_lengths, use_mask, magnitude):
    g = _gen(seed)
    x = (magnitude * g.standard_normal((rows, n))).astype(dtype)
    kw = {}
    valid = np.ones((rows, n), dtype=bool)
    if use_lengths:
        kw["lengths"] = g.integers(0, n + 1, size=rows)
        valid &= np.arange(n) < kw["lengths"][:, None]
    if use_mask:
        kw["mask"] = g.random((rows, n)) < g.random()
        valid &= kw["mask"]
    p = attncore.softmax(x, **kw)
    assert not np.isnan(p).any()
    assert (p >= 0).all() and (p <= 1).all()
    assert np.array_equal(p[~valid], np.zeros((~valid).sum(), dtype))
    sums = p.astype(np.float64).sum(-1)
    has_valid = valid.any(-1)
    np.testing.assert_allclose(sums[has_valid], 1, rtol=0, atol=1e-5 if dtype == np.float32
                               else 1e-12)
    assert np.array_equal(sums[~has_valid], np.zeros((~has_valid).sum()))
    # the log version agrees with log(softmax) where an entry is valid
    logp = attncore.log_softmax(x, **kw)
    assert np.isneginf(logp[~valid & has_valid[:, None]]).all()
    assert np.array_equal(logp[~has_valid], np.zeros(((~has_valid).sum(), n), dtype))
    seen = valid & (p > 1e-30)   # (where p underflows, log p has no float to compare with)
    np.testing.assert_allclose(logp[seen], np.log(p[seen].astype(np.float64)),
                               rtol=1e-5 if dtype == np.float32 else 1e-10,
                               atol=2e-5 if dtype == np.float32 else 1e-10)


# ------------------------------------------------------------------ attention invariants

def _qkv(g, dtype, batch, heads, kv_heads, q_len, kv_len, d):
    q = g.standard_normal((batch, heads, q_len, d)).astype(dtype)
    k = g.standard_normal((batch, kv_heads, kv_len, d)).astype(dtype)
    v = g.standard_normal((batch, kv_heads, kv_len, d)).astype(dtype)
    return q, k, v


attention_shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "groups": st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1)]),   # (heads, kv_heads)
    # decode (split-KV) range and flash range, including the 64-row tile edge
    "q_len": st.one_of(st.integers(1, 8), st.integers(9, 80)),
    "kv_len": st.integers(1, 300),
    "d": st.integers(1, 40),
})

# the three ways attention is computed: fused (split-KV or flash), weights kernel, dense mask
paths = st.sampled_from(["fused", "weights", "mask"])


def _attend(path, q, k, v, **kw):
    if path == "weights":
        return attncore.attention(q, k, v, return_weights=True, **kw)[0]
    if path == "mask" and kw.get("mask") is None:
        kw["mask"] = np.ones((q.shape[2], k.shape[2]), dtype=bool)
    return attncore.attention(q, k, v, **kw)


@PROPERTY_SETTINGS
@given(shape=attention_shapes, dtype=dtypes, seed=seeds, path=paths, ragged=st.booleans())
def test_attention_equivariant_to_permuting_keys_and_values(shape, dtype, seed, path, ragged):
    g = _gen(seed)
    heads, kv_heads = shape["groups"]
    q, k, v = _qkv(g, dtype, shape["batch"], heads, kv_heads, shape["q_len"], shape["kv_len"],
                   shape["d"])
    kv_len = shape["kv_len"]
    perm = g.permutation(kv_len)
    # padding has to follow the keys: express ragged lengths as a dense mask that is permuted
    mask = None
    if ragged:
        lengths = g.integers(0, kv_len + 1, size=shape["batch"])
        mask = np.broadcast_to((np.arange(kv_len) < lengths[:, None])[:, None, None, :],
                               (shape["batch"], 1, shape["q_len"], kv_len))
        path = "mask"
    out = _attend(path, q, k, v, mask=mask)
    out_perm = _attend(path, q, k[:, :, perm], v[:, :, perm],
                       mask=None if mask is None else mask[..., perm])
    # summation order changes with the permutation: equal up to rounding
    assert_close(out_perm, out.astype(np.float64), dtype)


@PROPERTY_SETTINGS
@given(shape=attention_shapes, dtype=dtypes, seed=seeds, path=paths, data=st.data())
def test_causal_attention_ignores_the_future(shape, dtype, seed, path, data):
    """Query i sees keys j <= i + kv_len - q_len. Changing keys/values from position `cut` on
    must leave every query with i + kv_len - q_len < cut bit-identical."""
    g = _gen(seed)
    heads, kv_heads = shape["groups"]
    q_len, kv_len = shape["q_len"], shape["kv_len"]
    q, k, v = _qkv(g, dtype, shape["batch"], heads, kv_heads, q_len, kv_len, shape["d"])
    offset = kv_len - q_len
    cut = data.draw(st.integers(max(1, offset + 1), kv_len), label="cut")
    unaffected = min(q_len, cut - offset)    # rows i < unaffected never see key `cut`
    k2, v2 = k.copy(), v.copy()
    k2[:, :, cut:] = 100 * g.standard_normal(k2[:, :, cut:].shape)
    v2[:, :, cut:] = 100 * g.standard_normal(v2[:, :, cut:].shape)
    out = _attend(path, q, k, v, causal=True)
    out2 = _attend(path, q, k2, v2, causal=True)
    if unaffected > 0:
        assert np.array_equal(out[:, :, :unaffected], out2[:, :, :unaffected])
    if cut < kv_len and unaffected < q_len:
        # and the last query, which sees everything, does change
        assert not np.array_equal(out[:, :, -1], out2[:, :, -1])


# ------------------------------------------------------------------ thread-count agnosticism

THREADS = (1, 2, 3)


def _same_for_every_thread_count(fn):
    results = []
    for n in THREADS:
        with attncore.num_threads(n) as used:
            # (a build without OpenMP runs every count as 1: the same bits, trivially)
            assert attncore.get_num_threads() == used == (n if attncore.info()["openmp"] else 1)
            r = fn()
        results.append(r if isinstance(r, tuple) else (r,))
    for n, r in zip(THREADS[1:], results[1:]):
        for a, b in zip(results[0], r):
            assert np.array_equal(a, b, equal_nan=True), f"{n} threads differ from 1 thread"


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(dtype=dtypes, seed=seeds, path=st.sampled_from(["flash", "decode", "weights", "mask"]),
       batch=st.integers(1, 3), groups=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
       long_q=st.integers(9, 150), short_q=st.integers(1, 8), kv_len=st.integers(1, 600),
       d=st.integers(1, 33), causal=st.booleans(), ragged=st.booleans())
def test_attention_bit_identical_across_thread_counts(dtype, seed, path, batch, groups, long_q,
                                                      short_q, kv_len, d, causal, ragged):
    g = _gen(seed)
    q_len = short_q if path == "decode" else long_q
    q, k, v = _qkv(g, dtype, batch, groups[0], groups[1], q_len, kv_len, d)
    kw = {"causal": causal}
    if ragged:
        kw["kv_lengths"] = g.integers(0, kv_len + 1, size=batch)
    if path == "weights":
        kw["return_weights"] = True
    if path == "mask":
        kw["mask"] = g.random((q_len, kv_len)) < 0.7
        kw["return_weights"] = True
    _same_for_every_thread_count(lambda: attncore.attention(q, k, v, **kw))


@pytest.mark.parametrize("path,q_len,kv_len", [("flash", 200, 700), ("decode", 4, 1100),
                                               ("weights", 130, 300)])
def test_attention_bit_identical_across_thread_counts_many_items(rng, path, q_len, kv_len):
    """Fixed shapes large enough for every thread to get several tiles / chunks."""
    q, k, v = _qkv(rng, np.float32, 2, 4, 2, q_len, kv_len, 32)
    kw = {"causal": True, "kv_lengths": [kv_len, kv_len // 3]}
    if path == "weights":
        kw["return_weights"] = True
    _same_for_every_thread_count(lambda: attncore.attention(q, k, v, **kw))


@PROPERTY_SETTINGS
@given(dtype=dtypes, seed=seeds, rows=st.integers(1, 700), n=st.integers(1, 300),
       log=st.booleans(), use_lengths=st.booleans(), use_mask=st.booleans())
def test_softmax_bit_identical_across_thread_counts(dtype, seed, rows, n, log, use_lengths,
                                                    use_mask):
    g = _gen(seed)
    x = g.standard_normal((rows, n)).astype(dtype)
    kw = {}
    if use_lengths:
        kw["lengths"] = g.integers(0, n + 1, size=rows)
    if use_mask:
        kw["mask"] = g.random((rows, n)) < 0.7
    fn = attncore.log_softmax if log else attncore.softmax
    _same_for_every_thread_count(lambda: fn(x, **kw))


@PROPERTY_SETTINGS
@given(dtype=dtypes, seed=seeds, m=st.integers(1, 600), k=st.integers(1, 300),
       n=st.integers(1, 600), bias=st.booleans())
def test_linear_bit_identical_across_thread_counts(dtype, seed, m, k, n, bias):
    g = _gen(seed)
    x = g.standard_normal((m, k)).astype(dtype)
    w = g.standard_normal((n, k)).astype(dtype)
    b = g.standard_normal(n).astype(dtype) if bias else None
    _same_for_every_thread_count(lambda: attncore.linear(x, w, b))


@PROPERTY_SETTINGS
@given(dtype=dtypes, seed=seeds, batch=st.integers(1, 5), m=st.integers(1, 600),
       k=st.integers(1, 200), n=st.integers(1, 500), transpose_b=st.booleans())
def test_matmul_bit_identical_across_thread_counts(dtype, seed, batch, m, k, n, transpose_b):
    """Includes products cut into column strips (fewer than 4 row tiles of 256)."""
    g = _gen(seed)
    a = g.standard_normal((batch, m, k)).astype(dtype)
    b = g.standard_normal((batch, n, k) if transpose_b else (batch, k, n)).astype(dtype)
    _same_for_every_thread_count(lambda: attncore.matmul(a, b, transpose_b=transpose_b))


@PROPERTY_SETTINGS
@given(dtype=dtypes, seed=seeds, rows=st.integers(1, 800), dim=st.integers(1, 200),
       mode=st.sampled_from(["standard", "uncentred", "rms"]), affine=st.booleans())
def test_layer_norm_bit_identical_across_thread_counts(dtype, seed, rows, dim, mode, affine):
    g = _gen(seed)
    x = g.standard_normal((rows, dim)).astype(dtype)
    gamma = g.standard_normal(dim).astype(dtype) if affine else None
    beta = g.standard_normal(dim).astype(dtype) if affine else None
    _same_for_every_thread_count(lambda: attncore.layer_norm(x, gamma, beta, mode=mode))


@pytest.mark.parametrize("mode", ["standard", "uncentred", "rms"])
def test_layer_norm_past_the_parallel_threshold_is_thread_independent(rng, mode):
    # (kernels run one thread below 2^16 operations: few drawn examples above reach two)
    x = rng.standard_normal((1000, 300)).astype(np.float32)
    gamma, beta = (rng.standard_normal(300).astype(np.float32) for _ in range(2))
    assert x.size >= 1 << 16
    _same_for_every_thread_count(lambda: attncore.layer_norm(x, gamma, beta, mode=mode))


@PROPERTY_SETTINGS
@given(dtype=dtypes, seed=seeds, batch=st.integers(1, 4), q_len=st.integers(1, 40),
       kv_len=st.integers(1, 200), hidden=st.integers(1, 40), ragged=st.booleans(),
       weights=st.booleans())
def test_additive_attention_bit_identical_across_thread_counts(dtype, seed, batch, q_len, kv_len,
                                                               hidden, ragged, weights):
    g = _gen(seed)
    queries = g.standard_normal((batch, q_len, 5)).astype(dtype)
    keys = g.standard_normal((batch, kv_len, 6)).astype(dtype)
    values = g.standard_normal((batch, kv_len, 3)).astype(dtype)
    w_q = g.standard_normal((5, hidden)).astype(dtype)
    w_k = g.standard_normal((6, hidden)).astype(dtype)
    w_v = g.standard_normal(hidden).astype(dtype)
    kw = {"return_weights": weights}
    if ragged:
        kw["kv_lengths"] = g.integers(0, kv_len + 1, size=batch)
    _same_for_every_thread_count(
        lambda: attncore.additive_attention(queries, keys, values, w_q, w_k, w_v, **kw))


@pytest.mark.parametrize("name", ["gelu", "swish", "tanh", "sigmoid"])
def test_activations_bit_identical_across_thread_counts(rng, name):
    """Several 16384-element chunks, float32 SIMD path."""
    x = (5 * rng.standard_normal(70001)).astype(np.float32)
    _same_for_every_thread_count(lambda: getattr(attncore, name)(x))
