# SPDX-License-Identifier: Apache-2.0
"""attncore's attention kernels against the NumPy oracle (attncore.reference).

Shapes are chosen to reach every strategy of ``attncore.attention`` and every edge of its tiles:
decode (split-KV, q_len <= 8, keys cut in chunks of 256), flash (q_len > 8; tiles of 128 x 96
or, causal, 48 x 192 on the AVX2 tile kernel, 64 x 192 or 256 x 512 on BLAS), the
materialised-weights path (``return_weights``) and a dense ``mask`` (on split-KV and the flash
tiles with finite values, else chunks of BLAS scores + masked softmax). float32 flash runs both
ways where the tile kernel is available.
"""
import sys

import numpy as np
import pytest

import attncore
from attncore import reference
from attncore.kernels import _sdpa
from attncore.kernels.attention import (DECODE_CHUNK, DECODE_MAX_Q, flash_plan, flash_tiles,
                                        sequence_attention)

from conftest import FLOAT_DTYPES, as64, assert_close, score_atol

# (batch, heads, kv_heads, q_len, kv_len, head_dim)
SHAPES = [
    pytest.param((1, 1, 1, 1, 1, 7), id="len1"),
    pytest.param((4, 2, 2, 1, 5, 8), id="decode-q1"),
    pytest.param((4, 3, 3, 5, 17, 33), id="decode-d33"),
    pytest.param((4, 2, 2, 8, 300, 7), id="decode-q8-kv300"),
    pytest.param((2, 8, 1, 3, 530, 16), id="decode-mqa-kv530"),
    pytest.param((4, 2, 2, 9, 9, 16), id="flash-q9"),
    pytest.param((4, 2, 1, 65, 257, 33), id="flash-65x257-gqa"),
    pytest.param((1, 2, 2, 300, 300, 12), id="flash-300x300"),
    pytest.param((4, 8, 2, 70, 40, 16), id="flash-gqa-q70-kv40"),
    pytest.param((4, 2, 2, 257, 65, 7), id="flash-257x65"),
    pytest.param((4, 1, 1, 40, 600, 9), id="flash-kv600"),
    pytest.param((2, 2, 1, 70, 2300, 8), id="flash-kv2300"),  # past the widest key tile
    # head_dim at and past one 64-column register block of the vector kernels
    pytest.param((2, 2, 2, 3, 130, 64), id="decode-d64"),
    pytest.param((2, 2, 1, 1, 77, 80), id="decode-d80-gqa"),
    pytest.param((1, 2, 2, 20, 50, 130), id="flash-d130"),
]

# how attention is called: fused kernels (split-KV / flash), the weights kernel, the dense mask
MODES = ["fused", "weights", "mask"]


def _qkv(rng, shape, dtype):
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    q = rng.standard_normal((batch, heads, q_len, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, kv_len, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, kv_len, head_dim)).astype(dtype)
    return q, k, v


def _ragged(rng, batch, kv_len):
    """kv_lengths cycling through full, 0, a random length and 1."""
    pattern = [kv_len, 0, int(rng.integers(1, kv_len + 1)), 1]
    return np.array([pattern[i % len(pattern)] for i in range(batch)], dtype=np.int64)


def _check_weights(weights, expected_w, dtype, atol=None):
    assert_close(weights, expected_w, dtype, atol=atol)
    sums = weights.astype(np.float64).sum(-1)
    ok = np.isclose(sums, 1, rtol=0, atol=1e-5) | (sums == 0)
    assert ok.all(), "attention weight rows must sum to 1 (or to 0 when a row sees no key)"


def _run_and_check(q, k, v, dtype, mode, **kw):
    expected, expected_w = reference.attention(*as64(q, k, v), return_weights=True, **kw)
    if mode == "fused":
        out = attncore.attention(q, k, v, **kw)
        assert_close(out, expected, dtype)
        return out, None
    out, weights = attncore.attention(q, k, v, return_weights=True, **kw)
    assert_close(out, expected, dtype)
    _check_weights(weights, expected_w, dtype)
    # the weights are a pass of their own (or, on the chunked dense-mask path, the same
    # chunks): the output's bits stay
    np.testing.assert_array_equal(out, attncore.attention(q, k, v, **kw))
    return out, weights


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_reference(rng, shape, mode, ragged, causal, dtype):
    q, k, v = _qkv(rng, shape, dtype)
    kw = {"causal": causal}
    if ragged:
        kw["kv_lengths"] = _ragged(rng, shape[0], shape[4])
    if mode == "mask":
        # a random keep-pattern (q_len, kv_len) broadcast over batch and heads
        kw["mask"] = rng.random((shape[3], shape[4])) < 0.7
    _run_and_check(q, k, v, dtype, mode, **kw)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["blas-small-matrix", "blas", "tile"])
def test_shapes_reach_every_strategy(kernel, causal):
    """The parametrisation above really crosses the tile / chunk edges it claims to, with the
    flash tiles of either BLAS (with or without OpenBLAS's small-matrix kernel) and of the tile
    kernel."""
    q_lens = [p.values[0][3] for p in SHAPES]
    kv_lens = [p.values[0][4] for p in SHAPES]
    assert min(q_lens) <= DECODE_MAX_Q < max(q_lens)
    assert any(1 < q <= DECODE_MAX_Q for q in q_lens)
    assert any(kv > 2 * DECODE_CHUNK for kv in kv_lens)
    flash = [p.values[0] for p in SHAPES if p.values[0][3] > DECODE_MAX_Q]
    tiles = [flash_tiles(shape[5], kernel == "blas-small-matrix", kernel == "tile", causal)
             for shape in flash]
    assert any(s[3] > bq and s[3] % bq for s, (bq, _) in zip(flash, tiles))
    assert any(s[4] > bk and s[4] % bk for s, (_, bk) in zip(flash, tiles))
    # the tile kernel's query tiles are padded to 16 and its register blocks are 6 rows
    assert any(s[3] % 16 and s[3] % 6 for s in flash)


FLASH_PATHS = [pytest.param(True, id="tile-kernel", marks=pytest.mark.skipif(
                   not _sdpa.tile_products(), reason="the tile kernel needs AVX2 or AVX-512")),
               pytest.param(False, id="blas")]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tile_kernel", FLASH_PATHS)
@pytest.mark.parametrize("shape", [p for p in SHAPES if p.values[0][3] > DECODE_MAX_Q])
def test_flash_float32_on_both_kernels(monkeypatch, rng, shape, tile_kernel, causal):
    """float32 flash on the tile kernel and on BLAS (whichever a machine would not pick is
    forced here), ragged lengths included, against the oracle; tiny tiles too."""
    front = sys.modules["attncore.kernels.attention"]
    monkeypatch.setattr(front, "USE_TILE_PRODUCTS", tile_kernel)
    q, k, v = _qkv(rng, shape, np.float32)
    kw = {"causal": causal, "kv_lengths": _ragged(rng, shape[0], shape[4])}
    _run_and_check(q, k, v, np.float32, "fused", **kw)
    monkeypatch.setattr(front, "FLASH_TILES", (16, 7) if tile_kernel else (4, 7))
    _run_and_check(q, k, v, np.float32, "fused", **kw)


def test_flash_tile_kernel_is_used_where_available():
    """AVX2 and AVX-512 machines run float32 flash on the tile kernel; others on BLAS."""
    assert _sdpa.tile_products() == (attncore.info()["simd"] in ("avx2+fma", "avx512"))
    front = sys.modules["attncore.kernels.attention"]
    assert front.USE_TILE_PRODUCTS == _sdpa.tile_products()
    assert flash_tiles(64, False, True) == (front.TILE_BLOCK_Q, front.TILE_BLOCK_K)
    causal = ((front.AVX512_CAUSAL_TILE_BLOCK_Q, front.AVX512_CAUSAL_TILE_BLOCK_K)
              if attncore.info()["simd"] == "avx512"
              else (front.CAUSAL_TILE_BLOCK_Q, front.CAUSAL_TILE_BLOCK_K))
    assert flash_tiles(64, False, True, True) == causal
    assert (front.TILE_BLOCK_Q % 16 == 0 and front.CAUSAL_TILE_BLOCK_Q % 16 == 0
            and front.AVX512_CAUSAL_TILE_BLOCK_Q % 16 == 0)


@pytest.mark.parametrize("accumulate", [False, True])
def test_tile_gemm_every_block_edge(rng, accumulate):
    """tile_gemm.h's kernel against float64 products at every row remainder of its register
    blocks (6 rows on AVX2, 8 on AVX-512) and every column remainder of its 16-column groups
    (taken in pairs on AVX-512), A read in place or transposed (P^T), B row-major or in
    16-column panels (the flash path's query panels). Without the vector kernels
    (ATTNCORE_FORCE_ISA=scalar, tests/test_build.py) its scalar fallback."""
    for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 15, 16, 17, 25]:
        for n in [1, 7, 8, 9, 15, 16, 17, 20, 31, 32, 33, 40, 48, 63, 65]:
            kk = int(rng.integers(1, 70))
            a = rng.standard_normal((m, kk)).astype(np.float32)
            b = rng.standard_normal((kk, n)).astype(np.float32)
            c0 = rng.standard_normal((m, n)).astype(np.float32)
            expected = a.astype(np.float64) @ b + (c0 if accumulate else 0)
            panels = np.zeros(((n + 15) // 16, kk, 16), np.float32)
            for j in range(n):
                panels[j // 16, :, j % 16] = b[:, j]
            for a_t in (False, True):
                for b_p in (False, True):
                    c = c0.copy()
                    _sdpa.tile_gemm(np.ascontiguousarray(a.T) if a_t else a,
                                    panels.reshape(-1, kk * 16) if b_p else b, c, accumulate,
                                    a_t, b_p)
                    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5 * kk)
            # every output is one chain over k: the bits of a row do not depend on the others
            c_rows = c0.copy()
            _sdpa.tile_gemm(a[:1], b, c_rows[:1], accumulate)
            c_all = c0.copy()
            _sdpa.tile_gemm(a, b, c_all, accumulate)
            assert np.array_equal(c_rows[0], c_all[0])


def test_kernel_wrappers_check_what_they_index(rng):
    """attention() validates with messages for users; the private wrappers check the shapes
    they index by again, so that a direct call cannot run the C kernels out of bounds."""
    q = np.zeros((2, 4, 20, 8), np.float32)
    k = np.zeros((2, 2, 30, 8), np.float32)
    out = np.zeros_like(q)
    bad = [dict(k=np.zeros((2, 3, 30, 8), np.float32)),
           dict(v=np.zeros((2, 2, 31, 8), np.float32)),
           dict(out=np.zeros((2, 4, 20, 9), np.float32)), dict(lens=np.array([31, 0])),
           dict(lens=np.array([3])), dict(lens=np.array([0, -1])),
           dict(k=np.zeros((3, 2, 30, 8), np.float32), v=np.zeros((3, 2, 30, 8), np.float32)),
           dict(k=np.zeros((2, 2, 30, 9), np.float32), v=np.zeros((2, 2, 30, 9), np.float32)),
           dict(k=np.zeros((2, 2, 0, 8), np.float32), v=np.zeros((2, 2, 0, 8), np.float32))]
    for change in bad:
        a = {**dict(q=q, k=k, v=k, out=out, lens=None), **change}
        with pytest.raises(ValueError):
            _sdpa.flash(a["q"], a["k"], a["v"], a["out"], a["lens"], False, 0.3, 64, 64, False, 1)
        with pytest.raises(ValueError):
            _sdpa.split_kv(a["q"], a["k"], a["v"], a["out"], a["lens"], False, 0.3, 64, 1)
        if "v" not in change and "out" not in change:      # weights_only reads neither
            with pytest.raises(ValueError):
                _sdpa.weights_only(a["q"], a["k"], np.zeros((2, 4, 20, 30), np.float32),
                                   a["lens"], False, 0.3, 1)
    with pytest.raises(ValueError, match="weights"):
        _sdpa.weights_only(q, k, np.zeros((2, 4, 20, 29), np.float32), None, False, 0.3, 1)


def test_flash_rejects_tile_kernel_misuse(rng):
    q = rng.standard_normal((1, 1, 20, 8)).astype(np.float32)
    out = np.zeros_like(q)
    with pytest.raises(ValueError, match="block_q"):
        _sdpa.flash(q, q, q, out, None, False, 0.5, 10, 16, True, 1)
    with pytest.raises(ValueError, match="block_q and block_k"):
        _sdpa.flash(q, q, q, out, None, False, 0.5, 16, 0, False, 1)
    with pytest.raises(ValueError, match="tile_kernel"):
        _sdpa.flash(q.astype(np.float64), q.astype(np.float64), q.astype(np.float64),
                    out.astype(np.float64), None, False, 0.5, 16, 16, True, 1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_len", [1, 5, 9, 23])
def test_tile_and_chunk_size_agnostic(monkeypatch, rng, q_len, causal, dtype):
    """Tiny odd tiles / chunks (many partial tiles, rescaling at every tile, LSE merges of many
    chunks) still match the oracle: the online softmax does not depend on the tiling."""
    front = sys.modules["attncore.kernels.attention"]  # the module (the package attribute is
    # the function of the same name)
    monkeypatch.setattr(front, "FLASH_TILES", (4, 5))
    monkeypatch.setattr(front, "DECODE_CHUNK", 3)
    q, k, v = _qkv(rng, (3, 4, 2, q_len, 29, 8), dtype)
    # increasing keys along the sequence make the running maximum change from tile to tile
    k += np.linspace(0, 3, 29, dtype=dtype)[:, None]
    _run_and_check(q, k, v, dtype, "fused", causal=causal, kv_lengths=[29, 0, 11])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q_len", [1, 6, 70, 300])
def test_mask_and_lengths_combine(rng, q_len, mode, dtype):
    """Dense mask, kv_lengths and causal together: every exclusion applies."""
    shape = (3, 4, 2, q_len, 280, 8)
    q, k, v = _qkv(rng, shape, dtype)
    mask = rng.random((3, 1, q_len, 280)) < 0.5
    _run_and_check(q, k, v, dtype, mode, causal=True, kv_lengths=[280, 0, 100], mask=mask)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q_len,kv_len", [(5, 3), (70, 20), (300, 257)])
def test_causal_rows_that_see_nothing_are_zero(rng, q_len, kv_len, mode, dtype):
    """Causal, bottom-right aligned, q_len > kv_len: the first q_len - kv_len queries see no key
    and must get exact zeros (not NaN); the others attend normally."""
    q, k, v = _qkv(rng, (2, 2, 2, q_len, kv_len, 16), dtype)
    kw = {"causal": True}
    if mode == "mask":
        kw["mask"] = np.ones((q_len, kv_len), dtype=bool)
    out, weights = _run_and_check(q, k, v, dtype, mode, **kw)
    blind = q_len - kv_len
    assert np.array_equal(out[:, :, :blind], np.zeros_like(out[:, :, :blind]))
    assert np.abs(out[:, :, blind:]).sum(-1).min() > 0
    if weights is not None:
        assert np.array_equal(weights[:, :, :blind], np.zeros_like(weights[:, :, :blind]))
        np.testing.assert_allclose(weights[:, :, blind:].sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q_len", [3, 100])
def test_zero_kv_length_rows_are_zero(rng, q_len, mode, dtype):
    q, k, v = _qkv(rng, (3, 2, 2, q_len, 300, 8), dtype)
    kw = {"kv_lengths": np.array([0, 300, 0])}
    if mode == "mask":
        kw["mask"] = np.ones((1, 1, 1, 300), dtype=bool)
    out, weights = _run_and_check(q, k, v, dtype, mode, **kw)
    for b in (0, 2):
        assert np.array_equal(out[b], np.zeros_like(out[b]))
        if weights is not None:
            assert np.array_equal(weights[b], np.zeros_like(weights[b]))


@pytest.mark.parametrize("q_len", [1, 5, 30])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_weights_of_a_padded_row_are_its_own(rng, q_len, dtype):
    # return_weights: a row's products once ran over the padded width (BLAS rounds by the
    # problem's shape), so its weights changed in the last bits with the longest row of its
    # batch (a Transformer's attention map with the batch); now the bits of the row alone
    q = rng.standard_normal((1, 2, q_len, 64)).astype(dtype)
    k, v = (rng.standard_normal((1, 2, 13, 64)).astype(dtype) for _ in range(2))
    alone, alone_weights = attncore.attention(q, k, v, return_weights=True)
    for width in (14, 20, 70):
        pad = ((0, 0), (0, 0), (0, width - 13), (0, 0))
        kp, vp = (np.pad(x, pad, constant_values=7.0) for x in (k, v))
        out, weights = attncore.attention(np.concatenate([q, q]), np.concatenate([kp, kp]),
                                          np.concatenate([vp, vp]), kv_lengths=[13, width],
                                          return_weights=True)
        np.testing.assert_array_equal(weights[0, :, :, :13], alone_weights[0])
        assert not weights[0, :, :, 13:].any()
        np.testing.assert_array_equal(out[0], alone[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q_len", [4, 90])
def test_non_contiguous_inputs(rng, q_len, mode, dtype):
    """Transposed views and Fortran-ordered arrays give the same result as contiguous copies."""
    batch, heads, kv_len, d = 2, 4, 270, 24
    # stored (batch, q_len, heads, d) as a model's projection would produce; viewed as BHLD
    q = np.swapaxes(rng.standard_normal((batch, q_len, heads, d)).astype(dtype), 1, 2)
    k = np.asfortranarray(rng.standard_normal((batch, 2, kv_len, d)).astype(dtype))
    v_store = rng.standard_normal((batch, 2, 2 * kv_len, d)).astype(dtype)
    v = v_store[:, :, ::2]  # strided along kv_len
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    kw = {"causal": True, "kv_lengths": [kv_len, 123]}
    if mode == "mask":
        kw["mask"] = (rng.random((q_len, kv_len)) < 0.8).T.copy().T  # itself non-contiguous
    _run_and_check(q, k, v, dtype, mode, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q_len", [2, 80])
def test_read_only_inputs(rng, q_len, mode):
    """Memory-mapped weights / caches are read-only: the kernels must accept them."""
    q, k, v = _qkv(rng, (2, 4, 2, q_len, 300, 16), np.float32)
    for a in (q, k, v):
        a.flags.writeable = False
    kw = {"causal": True, "kv_lengths": [300, 17]}
    if mode == "mask":
        kw["mask"] = np.ones((q_len, 300), dtype=bool)
        kw["mask"].flags.writeable = False
    _run_and_check(q, k, v, np.float32, mode, **kw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("q_len", [1, 7, 100])
def test_huge_logits_do_not_overflow(rng, q_len, mode, dtype):
    """Logits of magnitude ~1e4..6e4 (and all-very-negative rows) give finite, exact results.

    Integer-valued q, k and a power-of-two scale make every logit exactly representable in
    float32, so float32 can be held to its normal tolerance: a kernel that exponentiates
    without subtracting the row maximum gets inf/NaN or zeros here.
    """
    batch, heads, kv_len, d = 2, 2, 300, 16
    q = rng.integers(-4, 5, size=(batch, heads, q_len, d)).astype(dtype)
    k = rng.integers(-4, 5, size=(batch, heads, kv_len, d)).astype(dtype)
    # in batch 1 every logit carries a -40*256 = -10240 offset: the whole row is very negative
    q[1, :, :, 0] = -40
    k[1, :, :, 0] = 1
    v = rng.standard_normal((batch, heads, kv_len, d)).astype(dtype)
    scale = 256.0
    logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    assert np.abs(logits).max() >= 1e4
    kw = {"scale": scale, "causal": q_len > 1}
    if mode == "mask":
        kw["mask"] = np.ones((q_len, kv_len), dtype=bool)
    out, weights = _run_and_check(q, k, v, dtype, mode, **kw)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [0.0, -0.37, 0.05, 3.0])
@pytest.mark.parametrize("q_len", [2, 70])
def test_custom_scale(rng, q_len, scale, mode, dtype):
    q, k, v = _qkv(rng, (2, 2, 2, q_len, 260, 20), dtype)
    kw = {"scale": scale, "causal": True}
    if mode == "mask":
        kw["mask"] = np.ones((q_len, 260), dtype=bool)
    expected, expected_w = reference.attention(*as64(q, k, v), return_weights=True, **kw)
    # logits reach ~40 at scale 3: float32 is held to the error of rounding them (score_atol)
    logits = np.abs(np.einsum("bhqd,bhkd->bhqk", *as64(q, k))) * abs(scale)
    atol = score_atol(dtype, logits.max())
    if mode == "fused":
        assert_close(attncore.attention(q, k, v, **kw), expected, dtype, atol=atol)
    else:
        out, weights = attncore.attention(q, k, v, return_weights=True, **kw)
        assert_close(out, expected, dtype, atol=atol)
        assert_close(weights, expected_w, dtype, atol=atol)


@pytest.mark.parametrize("q_len", [3, 70])
def test_default_scale_is_inverse_sqrt_head_dim(rng, q_len):
    q, k, v = _qkv(rng, (1, 2, 2, q_len, 50, 33), np.float64)
    default = attncore.attention(q, k, v)
    explicit = attncore.attention(q, k, v, scale=1 / np.sqrt(33))
    assert_close(default, explicit, np.float64)
    other = attncore.attention(q, k, v, scale=1.0)
    assert not np.allclose(default, other)


@pytest.mark.parametrize("q_len", [3, 70])
def test_mask_broadcasts_per_batch_and_head(rng, q_len):
    """A (batch, heads, 1, kv_len) mask applies per batch entry and per head."""
    q, k, v = _qkv(rng, (2, 4, 2, q_len, 30, 8), np.float64)
    mask = rng.random((2, 4, 1, 30)) < 0.5
    mask[..., 0] = True
    out = attncore.attention(q, k, v, mask=mask)
    assert_close(out, reference.attention(q, k, v, mask=mask), np.float64)
    # the same as restricting keys by hand for one (batch, head)
    keep = mask[1, 3, 0]
    single = attncore.attention(q[1:2, 3:4], k[1:2, 1:2, keep], v[1:2, 1:2, keep])
    assert_close(out[1:2, 3:4], single, np.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("q_len", [1, 8, 9, 64, 65])
def test_gqa_equals_repeated_heads(rng, q_len, dtype):
    """Grouped-query attention equals plain attention on keys/values repeated per group."""
    q, k, v = _qkv(rng, (2, 8, 2, q_len, 70, 16), dtype)
    grouped = attncore.attention(q, k, v, causal=True)
    repeated = attncore.attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), causal=True)
    assert_close(grouped, repeated, dtype)


# ------------------------------------------------------------------ additive (Bahdanau)

def _additive_inputs(rng, dtype, batch=3, q_len=4, kv_len=19, q_dim=6, k_dim=5, v_dim=7,
                     hidden=13):
    return dict(
        queries=rng.standard_normal((batch, q_len, q_dim)).astype(dtype),
        keys=rng.standard_normal((batch, kv_len, k_dim)).astype(dtype),
        values=rng.standard_normal((batch, kv_len, v_dim)).astype(dtype),
        w_q=(rng.standard_normal((q_dim, hidden)) / np.sqrt(q_dim)).astype(dtype),
        w_k=(rng.standard_normal((k_dim, hidden)) / np.sqrt(k_dim)).astype(dtype),
        w_v=rng.standard_normal(hidden).astype(dtype),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sizes", [
    dict(),
    dict(batch=1, q_len=1, kv_len=1, hidden=1),
    dict(q_len=1, kv_len=40, hidden=8),
    dict(q_len=9, kv_len=33, hidden=32, v_dim=1),
    dict(batch=2, q_len=17, kv_len=300, hidden=33, q_dim=3, k_dim=40),
], ids=["small", "ones", "decode-h8", "h32-v1", "long-h33"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_additive_attention_matches_reference(rng, sizes, ragged, dtype):
    a = _additive_inputs(rng, dtype, **sizes)
    batch, kv_len = a["keys"].shape[:2]
    kw = {}
    if ragged:
        kw["kv_lengths"] = _ragged(rng, batch, kv_len)
    expected, expected_w = reference.additive_attention(
        *as64(a["queries"], a["keys"], a["values"], a["w_q"], a["w_k"], a["w_v"]),
        return_weights=True, **kw)
    # a score is a sum of `hidden` terms w_v[i] * tanh(.): bounded by sum |w_v| (~26 at 33)
    atol = score_atol(dtype, np.abs(as64(a["w_v"])).sum())
    out = attncore.additive_attention(**a, **kw)
    assert_close(out, expected, dtype, atol=atol)
    out2, weights = attncore.additive_attention(**a, return_weights=True, **kw)
    assert_close(out2, expected, dtype, atol=atol)
    _check_weights(weights, expected_w, dtype, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_additive_attention_with_projected_keys(rng, dtype):
    """project_keys once + w_k=None equals passing w_k every call."""
    a = _additive_inputs(rng, dtype, q_len=2, kv_len=30, hidden=11)
    lengths = [30, 0, 7]
    projected = attncore.project_keys(a["keys"], a["w_k"])
    assert_close(projected, as64(a["keys"]) @ as64(a["w_k"]), dtype)
    full = attncore.additive_attention(**a, kv_lengths=lengths, return_weights=True)
    pre = attncore.additive_attention(a["queries"], projected, a["values"], a["w_q"], None,
                                      a["w_v"], kv_lengths=lengths, return_weights=True)
    expected = reference.additive_attention(
        *as64(a["queries"], projected, a["values"], a["w_q"]), None, as64(a["w_v"]),
        kv_lengths=lengths, return_weights=True)
    for got, want, via_w_k in zip(pre, expected, full):
        assert_close(got, want, dtype)
        assert_close(got, via_w_k, dtype)


def _projected_additive_inputs(rng, q_proj, k_proj, v_dim=5):
    """Arguments whose projections are exactly q_proj and k_proj: w_q is the identity (a product
    with it is exact) and the keys go in already projected."""
    batch, kv_len, hidden = k_proj.shape
    return dict(queries=q_proj.astype(np.float32), keys=k_proj.astype(np.float32),
                values=rng.standard_normal((batch, kv_len, v_dim)).astype(np.float32),
                w_q=np.eye(hidden, dtype=np.float32), w_k=None,
                w_v=rng.standard_normal(hidden).astype(np.float32))


def test_additive_split_tanh_holds_to_its_limit(rng):
    """With two or more queries the float32 kernel evaluates tanh(a + b) from exp(2a) and exp(2b)
    (src_c/simd.h, valid for |a|, |b| <= 21). The hardest inputs for it: both terms near the
    limit with opposite signs (a + b small: the product of a huge and a tiny factor must still
    be ~1), and sums far into saturation."""
    hidden = 40
    a = rng.uniform(-21, 21, (2, 6, hidden))
    b = rng.uniform(-21, 21, (2, 9, hidden))
    b[0, :4] = -a[0, :4] + rng.uniform(-0.5, 0.5, (4, hidden))  # a + b near 0, |a| ~ |b| ~ 21
    args = _projected_additive_inputs(rng, a, b)
    expected = reference.additive_attention(*as64(*args.values()), return_weights=True)
    got = attncore.additive_attention(**args, return_weights=True)
    atol = score_atol(np.float32, np.abs(as64(args["w_v"])).sum())
    assert_close(got[0], expected[0], np.float32, atol=atol)
    _check_weights(got[1], expected[1], np.float32, atol=atol)


def test_additive_beyond_the_split_limit_takes_the_exact_path(rng):
    """A query or a batch element's keys past the limit go through the exact tanh; each row
    decides for itself, and a row's result does not depend on its neighbours' path."""
    hidden = 24
    a = rng.standard_normal((3, 5, hidden))
    b = rng.standard_normal((3, 7, hidden))
    a[0, 2, 3] = 60.0    # one query of batch 0 past the limit
    b[1, 4, 0] = -45.0   # one key of batch 1: the whole batch element
    args = _projected_additive_inputs(rng, a, b)
    expected = reference.additive_attention(*as64(*args.values()))
    got = attncore.additive_attention(**args)
    assert_close(got, expected, np.float32, atol=score_atol(np.float32, np.abs(args["w_v"]).sum()))
    for i in range(3):  # row by row, alone (a single query takes the exact path throughout)
        alone = attncore.additive_attention(**{**args, "queries": args["queries"][:, i:i + 1]})
        assert_close(got[:, i:i + 1], alone, np.float32)


def test_additive_padding_does_not_change_a_source(rng):
    """Only the valid keys decide the path and get exponentiated: a source scores bit for bit
    the same alone and inside a batch whose padding holds huge values."""
    hidden = 16
    a = rng.standard_normal((1, 4, hidden))
    b = rng.standard_normal((1, 6, hidden))
    alone = _projected_additive_inputs(rng, a, b)
    padded = {**alone,
              "queries": np.concatenate([alone["queries"], alone["queries"]]),
              "keys": np.concatenate([alone["keys"], np.full((1, 6, hidden), 0, np.float32)]),
              "values": np.concatenate([alone["values"], alone["values"]])}
    padded["keys"] = np.concatenate([padded["keys"], np.full((2, 3, hidden), 1e6, np.float32)],
                                    axis=1)
    padded["values"] = np.concatenate([padded["values"], np.ones((2, 3, 5), np.float32)], axis=1)
    got = attncore.additive_attention(**padded, kv_lengths=[6, 6])
    np.testing.assert_array_equal(got[:1], attncore.additive_attention(**alone))


@pytest.mark.parametrize("hidden", [40, 21])  # 21: each key's hidden % 8 tail, four keys a pass
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_additive_keys_match_the_reference(rng, q_len, ragged, hidden):
    """AdditiveKeys carries the split tanh's key factors: single-query calls take the split
    too. Against the reference, and with two or more queries bit for bit what the kernel
    computes from the projected keys alone (the factors are the same exp(2 k))."""
    a = _additive_inputs(rng, np.float32, batch=4, q_len=q_len, kv_len=33, hidden=hidden)
    kw = {"kv_lengths": [33, 0, 1, 20]} if ragged else {}
    keys = attncore.AdditiveKeys.project(a["keys"], a["w_k"])
    assert keys.shape == (4, 33, hidden) and keys.dtype == np.float32
    np.testing.assert_array_equal(keys.projected, attncore.project_keys(a["keys"], a["w_k"]))
    assert keys.in_limit.dtype == bool and keys.in_limit.all()
    np.testing.assert_allclose(keys.factors, np.exp(2 * as64(keys.projected)), rtol=1e-5)
    step = {**a, "keys": keys, "w_k": None}
    got, got_w = attncore.additive_attention(**step, return_weights=True, **kw)
    expected = reference.additive_attention(*as64(*a.values()), return_weights=True, **kw)
    atol = score_atol(np.float32, np.abs(as64(a["w_v"])).sum())
    assert_close(got, expected[0], np.float32, atol=atol)
    _check_weights(got_w, expected[1], np.float32, atol=atol)
    plain = attncore.additive_attention(**{**step, "keys": keys.projected}, **kw)
    if q_len >= 2:
        np.testing.assert_array_equal(got, plain)
    else:  # the exact tanh there: same values to float32 rounding
        assert_close(got, plain, np.float32, atol=atol)


def test_additive_keys_beyond_the_limit_and_padding(rng):
    """Key rows past the split's limit (or NaN) are flagged and keep their batch element on the
    exact tanh; flagged rows in the padding change nothing, bit for bit."""
    hidden = 24
    b = rng.standard_normal((3, 7, hidden))
    b[1, 4, 0] = -45.0       # a valid key of batch 1 past the limit
    b[2, 6, :] = np.nan      # padding of batch 2 (kv_lengths 5)
    b[2, 5, 0] = 1e6         # padding too
    a = rng.standard_normal((3, 1, hidden))
    args = _projected_additive_inputs(rng, a, b)
    keys = attncore.AdditiveKeys(args["keys"])
    np.testing.assert_array_equal(keys.in_limit[1], np.arange(7) != 4)
    assert not keys.in_limit[2, 5:].any() and keys.in_limit[2, :5].all()
    assert not keys.factors[1, 4].any() and not keys.factors[2, 6].any()
    lengths = [7, 7, 5]
    got = attncore.additive_attention(**{**args, "keys": keys}, kv_lengths=lengths)
    clean = np.where(np.isfinite(args["keys"]), args["keys"], 0)
    expected = reference.additive_attention(*as64(args["queries"], clean, args["values"],
                                                  args["w_q"]), None, as64(args["w_v"]),
                                            kv_lengths=lengths)
    assert_close(got, expected, np.float32, atol=score_atol(np.float32, np.abs(args["w_v"]).sum()))
    alone = {k: (v[2:3, :, :] if k in ("queries", "values") else v) for k, v in args.items()}
    alone["values"] = alone["values"][:, :5]
    alone_keys = attncore.AdditiveKeys(args["keys"][2:3, :5])
    np.testing.assert_array_equal(
        got[2:3], attncore.additive_attention(**{**alone, "keys": alone_keys}))


def test_additive_keys_copy_and_float64(rng):
    """The constructor keeps a read-only copy; float64 has no split (no factors) and gives
    what the plain projected keys give."""
    projected = rng.standard_normal((2, 5, 8)).astype(np.float32)
    keys = attncore.AdditiveKeys(projected)
    projected[:] = 0
    assert keys.projected.any() and not keys.projected.flags.writeable
    assert not keys.factors.flags.writeable
    # and they stay read-only: factors and in_limit are derived from projected once, so an
    # edit of projected made writeable again had left them stale
    for made in (keys, attncore.AdditiveKeys.project(projected + 1, np.eye(8, dtype=np.float32))):
        for array in (made.projected, made.factors, made.in_limit):
            with pytest.raises(ValueError, match="WRITEABLE"):
                array.flags.writeable = True
    a = _additive_inputs(rng, np.float64, batch=2, q_len=1, kv_len=5, hidden=8)
    keys64 = attncore.AdditiveKeys.project(a["keys"], a["w_k"])
    assert keys64.factors is None and keys64.in_limit is None
    got = attncore.additive_attention(**{**a, "keys": keys64, "w_k": None})
    np.testing.assert_array_equal(got, attncore.additive_attention(
        **{**a, "keys": keys64.projected, "w_k": None}))


# ------------------------------------------------------------------ Luong

def _luong_reference(queries, keys, values, method, kv_lengths=None, **weights):
    scores = reference.luong_scores(queries, keys, method=method, **weights)
    lengths = None
    if kv_lengths is not None:
        lengths = np.broadcast_to(np.asarray(kv_lengths)[:, None], scores.shape[:2])
    w = reference.softmax(scores, lengths=lengths)
    return w @ values, w


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("method", ["dot", "general", "concat"])
@pytest.mark.parametrize("v_dim", [None, 3], ids=["v=k", "v!=k"])
@pytest.mark.parametrize("q_len", [1, 12])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_luong_attention_matches_reference(rng, ragged, q_len, v_dim, method, dtype):
    batch, kv_len, k_dim, hidden = 3, 21, 10, 9
    q_dim = k_dim if method == "dot" else 6
    queries = rng.standard_normal((batch, q_len, q_dim)).astype(dtype)
    keys = rng.standard_normal((batch, kv_len, k_dim)).astype(dtype)
    values = rng.standard_normal((batch, kv_len, v_dim or k_dim)).astype(dtype)
    weights = {}
    if method == "general":
        weights["w"] = (rng.standard_normal((q_dim, k_dim)) / 3).astype(dtype)
    if method == "concat":
        weights["w_q"] = (rng.standard_normal((q_dim, hidden)) / 3).astype(dtype)
        weights["w_k"] = (rng.standard_normal((k_dim, hidden)) / 3).astype(dtype)
        weights["v"] = rng.standard_normal(hidden).astype(dtype)
    kw = {"kv_lengths": _ragged(rng, batch, kv_len)} if ragged else {}
    expected, expected_w = _luong_reference(
        *as64(queries, keys, values), method,
        **{n: as64(w) for n, w in weights.items()}, **kw)
    out, got_w = attncore.luong_attention(queries, keys, values, method=method, **weights,
                                          return_weights=True, **kw)
    assert_close(out, expected, dtype)
    _check_weights(got_w, expected_w, dtype)
    out_only = attncore.luong_attention(queries, keys, values, method=method, **weights, **kw)
    assert_close(out_only, expected, dtype)


# ------------------------------------------------------------------ NaN in, NaN out

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("q_len, kv_len", [(1, 3), (1, 700), (4, 300), (16, 300), (200, 300)],
                         ids=lambda n: str(n))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_a_query_or_key_gives_nan_rows_never_zeros(q_len, kv_len, causal, dtype):
    # every path (split-KV decode, flash on the tile kernel and in C, the weights path) used to
    # take a row whose scores were all NaN for one with no valid key, and return zeros
    q, k, v = (np.ones((2, 2, n, 8), dtype) for n in (q_len, kv_len, kv_len))
    q_bad = q.copy()
    q_bad[0, 1, -1, 3] = np.nan
    out = attncore.attention(q_bad, k, v, causal=causal)
    others = np.ones(out.shape[:3], bool)
    others[0, 1, -1] = False
    assert np.isnan(out[0, 1, -1]).all() and np.isfinite(out[others]).all()
    k_bad = k.copy()
    k_bad[1, 0, 0, 5] = np.nan           # key 0: seen by every query, causal or not
    out = attncore.attention(q, k_bad, v, causal=causal)
    assert np.isnan(out[1, 0]).all() and np.isfinite(out[0]).all() and np.isfinite(out[1, 1]).all()
    out, weights = attncore.attention(q_bad, k, v, causal=causal, return_weights=True)
    assert np.isnan(out[0, 1, -1]).all() and np.isnan(weights[0, 1, -1]).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("q_len, kv_len", [(2, 9), (5, 9), (40, 40), (200, 200), (130, 300)],
                         ids=lambda n: str(n))
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_value_only_reaches_the_queries_that_see_it(rng, q_len, kv_len, bad, dtype):
    # causal: a query tile's product with V on the diagonal ran over keys some of its rows do
    # not see, with weight 0 -- and 0 x NaN (or inf) is NaN: the rows before a non-finite
    # value's key in its tile came out NaN, where the reference (and the query alone) is finite
    q = rng.standard_normal((2, 4, q_len, 16)).astype(dtype)
    k, v = (rng.standard_normal((2, 2, kv_len, 16)).astype(dtype) for _ in range(2))
    offset = kv_len - q_len
    key = offset + q_len // 2               # seen by the queries i >= q_len // 2 only
    v[0, 1, key, 3] = bad
    v[1, 0, kv_len - 1, :] = bad            # the last key: only the last query sees it
    k[1, 1, key, 5] = bad                   # a key: its score is NaN or +-inf from the queries on
    expected = reference.attention(*(as64(a) for a in (q, k, v)), causal=True)
    for options in ({}, {"return_weights": True}, {"kv_lengths": np.array([kv_len, kv_len])}):
        out = attncore.attention(q, k, v, causal=True, **options)
        out = out[0] if isinstance(out, tuple) else out
        np.testing.assert_array_equal(np.isfinite(out), np.isfinite(expected))
        seen = np.isfinite(expected)
        assert_close(np.where(seen, out, 0), np.where(seen, expected, 0), dtype)
    # whatever the rows around it, one query gives the bits it gives alone
    alone = attncore.attention(q[:, :, 1:2], k[:, :, :offset + 2], v[:, :, :offset + 2])
    np.testing.assert_allclose(attncore.attention(q, k, v, causal=True)[:, :, 1:2], alone,
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    # the rows blind to the non-finite values are the rows the call gives with those values
    # finite (they are computed again over exactly their keys): bit for bit on the tile
    # kernel, where a row's bits depend on its own keys only (BLAS may block the shorter
    # product another way)
    clean = np.where(np.isfinite(v), v, 0).astype(dtype)
    kv = np.array([kv_len, kv_len])
    got = sequence_attention(q, np.where(np.isinf(k), 0, k).astype(dtype), v, kv_lengths=kv,
                             causal=True)
    want = sequence_attention(q, np.where(np.isinf(k), 0, k).astype(dtype), clean,
                              kv_lengths=kv, causal=True)
    blind = np.isfinite(got)
    if flash_plan(16, True, dtype)[2]:
        np.testing.assert_array_equal(got[blind], want[blind])
    else:
        assert_close(got[blind], want[blind], dtype)
    assert blind[0, 2:4, :q_len // 2].all() and blind[1, :2, :q_len - 1].all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("length", [64, 300])
@pytest.mark.parametrize("first", [np.nan, np.inf], ids=["nan", "inf"])
def test_several_non_finite_values_each_reach_only_their_columns(rng, length, first, dtype):
    # found by review: the rows that see a bad value at key 10 (NaN in its column 0 only) but
    # not the one at key 11 or 12 (column 1) came out NaN in column 1 too, from the second
    # value times a zero weight; each range of rows is now computed again up to the first bad
    # value past its keys
    q = rng.standard_normal((2, 2, length, 8)).astype(dtype)
    k, v = (rng.standard_normal((2, 1, length, 8)).astype(dtype) for _ in range(2))
    v[0, 0, 10, 0] = first
    v[0, 0, 11, 1] = np.nan
    v[1, 0, 10, 0] = first
    v[1, 0, 12, 1] = np.nan
    v[1, 0, length - 1, 2] = np.nan
    expected = reference.attention(*(as64(a) for a in (q, k, v)), causal=True)
    for kv_lengths in (None, np.array([length, length - 5])):
        out = attncore.attention(q, k, v, causal=True, kv_lengths=kv_lengths)
        want = expected if kv_lengths is None else reference.attention(
            *(as64(a) for a in (q, k, v)), causal=True, kv_lengths=kv_lengths)
        np.testing.assert_array_equal(np.isfinite(out), np.isfinite(want))
        seen = np.isfinite(want)
        assert_close(np.where(seen, out, 0), np.where(seen, want, 0), dtype)
    assert np.isfinite(expected[0, :, 10, 1:]).all() and np.isfinite(expected[1, :, 11, 1:]).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_minus_inf_key_does_not_stop_the_rows_before_a_nan_value(rng, dtype):
    # found by review: a -inf key entry scores -inf (weight 0, finite rows), but it was taken
    # for a NaN of the rows' own and rows 36-39, blind to the NaN value at key 40, stayed NaN
    q = (np.abs(rng.standard_normal((1, 1, 64, 8))) + 0.1).astype(dtype)
    k, v = (rng.standard_normal((1, 1, 64, 8)).astype(dtype) for _ in range(2))
    k[0, 0, 2, 0] = -np.inf
    v[0, 0, 40, 0] = np.nan
    out = attncore.attention(q, k, v, causal=True)
    expected = reference.attention(*(as64(a) for a in (q, k, v)), causal=True)
    np.testing.assert_array_equal(np.isnan(out).any(-1)[0, 0], np.arange(64) >= 40)
    assert_close(out[:, :, :40], expected[:, :, :40], dtype)


def test_luong_and_softmax_propagate_nan_rows():
    q = np.ones((1, 2, 4), np.float32)
    q[0, 0, 0] = np.nan
    for v_dim in (4, 5):   # the fused kernel, and scores + softmax (values wider than keys)
        out = attncore.luong_attention(q, np.ones((1, 3, 4), np.float32),
                                       np.ones((1, 3, v_dim), np.float32))
        assert np.isnan(out[0, 0]).all() and np.array_equal(out[0, 1], np.ones(v_dim))
    for n in (2, 3, 8, 17, 40):
        x = np.full((2, n), np.nan, np.float32)
        x[0, 0] = -np.inf                 # -inf and NaN only: the max comes out -inf
        x[1] = 1
        for out in (attncore.softmax(x), attncore.log_softmax(x),
                    attncore.softmax(x, mask=np.ones((2, n), bool))):
            assert np.isnan(out[0]).all() and np.isfinite(out[1]).all(), n
    nothing_valid = np.full((1, 4), -np.inf, np.float32)
    assert np.array_equal(attncore.softmax(nothing_valid), np.zeros((1, 4)))
    # NaN on the valid entries only: padding stays 0 (-inf for log-softmax), whatever the max
    x = np.array([[-np.inf, np.nan, 5, 5], [1, np.nan, 5, 5]], np.float32)
    for out, fill in ((attncore.softmax(x, lengths=[2, 2]), 0.0),
                      (attncore.log_softmax(x, lengths=[2, 2]), -np.inf),
                      (attncore.softmax(x, mask=np.array([[1, 1, 0, 0]] * 2, bool)), 0.0)):
        assert np.isnan(out[:, :2]).all() and (out[:, 2:] == fill).all()


@pytest.mark.parametrize("q_len", [1, 4, 200])
def test_scores_that_all_overflow_to_minus_inf_give_a_zero_row_on_every_path(q_len):
    # finite q . k past float32's range: every path treats the row as one with no key (the
    # generic flash and split-KV paths gave exp(-inf + inf) = NaN, the tile path zeros)
    q = np.full((1, 1, q_len, 4), 1e20, np.float32)
    k = np.full((1, 1, 300, 4), -1e20, np.float32)
    out = attncore.attention(q, k, np.ones((1, 1, 300, 4), np.float32))
    assert np.array_equal(out, np.zeros_like(out))
    out, weights = attncore.attention(q, k, np.ones((1, 1, 300, 4), np.float32),
                                      return_weights=True)
    assert np.array_equal(out, np.zeros_like(out))
    assert np.array_equal(weights, np.zeros_like(weights))


# ------------------------------------------------------------------ Nadaraya-Watson

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bandwidth", [0.3, 1.0, 4.0])
def test_nadaraya_watson_1d(rng, bandwidth, dtype):
    x_train = np.sort(rng.uniform(0, 5, 50)).astype(dtype)
    y_train = (2 * np.sin(x_train) + x_train ** 0.8).astype(dtype)
    x_test = np.linspace(0, 5, 37).astype(dtype)
    out, w = attncore.nadaraya_watson(x_test, x_train, y_train, bandwidth, return_weights=True)
    expected, expected_w = reference.nadaraya_watson(*as64(x_test, x_train, y_train), bandwidth,
                                                     return_weights=True)
    assert out.shape == (37,)
    assert_close(out, expected, dtype)
    _check_weights(w, expected_w, dtype)
    assert_close(attncore.nadaraya_watson(x_test, x_train, y_train, bandwidth), expected, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d,d_v", [(1, 1), (3, 5), (17, 2), (8, 1), (64, 16)])
def test_nadaraya_watson_2d(rng, d, d_v, dtype):
    queries = rng.standard_normal((23, d)).astype(dtype)
    keys = rng.standard_normal((41, d)).astype(dtype)
    values = rng.standard_normal((41, d_v)).astype(dtype)
    out, w = attncore.nadaraya_watson(queries, keys, values, 0.7, return_weights=True)
    expected, expected_w = reference.nadaraya_watson(*as64(queries, keys, values), 0.7,
                                                     return_weights=True)
    assert_close(out, expected, dtype)
    _check_weights(w, expected_w, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nadaraya_watson_blocks_of_queries_and_threads(rng, dtype):
    # 9000 keys: blocks of 29 queries (2 MiB of distances each), the last one short; the
    # distances from one float64 product, the output from one product with the values
    queries = rng.standard_normal((150, 16)).astype(dtype)
    keys = rng.standard_normal((9000, 16)).astype(dtype)
    values = rng.standard_normal((9000, 3)).astype(dtype)
    with attncore.num_threads(1):
        out, w = attncore.nadaraya_watson(queries, keys, values, 0.8, return_weights=True)
    expected, expected_w = reference.nadaraya_watson(*as64(queries, keys, values), 0.8,
                                                     return_weights=True)
    assert_close(out, expected, dtype)
    _check_weights(w, expected_w, dtype)
    with attncore.num_threads(2):
        np.testing.assert_array_equal(attncore.nadaraya_watson(queries, keys, values, 0.8), out)


def test_nadaraya_watson_many_keys_sum_the_output_in_chunks(rng):
    # 2^20 keys: blocks of one query, the output summed row by row; one float32 chain per
    # output over every key lost 2e-5 of it (found by review), now chunks of 64 keys added up
    # in float64; the weights' normalising sum is added up in float64 past 1024 keys too (the
    # AVX2 kernel's one vector accumulator had lost 2e-5 of it)
    queries = rng.standard_normal((9, 2)).astype(np.float32)
    keys = rng.standard_normal((1 << 20, 2)).astype(np.float32)
    values = (1 + rng.random((1 << 20, 2))).astype(np.float32)
    out = attncore.nadaraya_watson(queries, keys, values, 4.0)
    expected = reference.nadaraya_watson(*as64(queries, keys, values), 4.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("offset", [1e4, -3e5])
def test_nadaraya_watson_large_norms_and_a_narrow_kernel_keep_their_digits(rng, offset, dtype):
    # ||q||^2 + ||k||^2 - 2 q . k loses about 1e-16 of the norms (1e9-1e12 here) to rounding,
    # a score error of that over 2 h^2 (h = 0.05): such queries take the direct distances
    queries = (offset + rng.standard_normal((20, 16))).astype(dtype)
    keys = (offset + rng.standard_normal((300, 16))).astype(dtype)
    values = rng.standard_normal((300, 2)).astype(dtype)
    out, w = attncore.nadaraya_watson(queries, keys, values, 0.05, return_weights=True)
    expected, expected_w = reference.nadaraya_watson(*as64(queries, keys, values), 0.05,
                                                     return_weights=True)
    assert_close(out, expected, dtype)
    _check_weights(w, expected_w, dtype)


def test_nadaraya_watson_far_queries_stay_finite(rng):
    """Queries far from every key (distances ~1e4 bandwidths) still give a convex combination."""
    keys = rng.standard_normal((30, 2))
    values = rng.standard_normal(30)
    queries = np.array([[300.0, -400.0], [1e3, 1e3]])
    out, w = attncore.nadaraya_watson(queries, keys, values, 0.5, return_weights=True)
    expected, expected_w = reference.nadaraya_watson(queries, keys, values, 0.5,
                                                     return_weights=True)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-12)
    assert_close(out, expected, np.float64)



@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nadaraya_watson_infinite_query_is_nan_not_the_mean(dtype):
    # every distance infinite: all scores tied at 0 gave uniform weights, the plain mean of the
    # values, for a query with no nearest key; now NaN, as attention gives an infinite query
    keys = np.array([[0.0], [1.0], [2.0]], dtype=dtype)
    values = np.array([1.0, 2.0, 3.0], dtype=dtype)
    queries = np.array([[np.inf], [-np.inf], [1.2]], dtype=dtype)
    out, w = attncore.nadaraya_watson(queries, keys, values, 1.0, return_weights=True)
    expected, expected_w = reference.nadaraya_watson(queries, keys, values, 1.0, return_weights=True)
    assert np.isnan(out[:2]).all() and np.isnan(w[:2]).all()
    assert np.isnan(expected[:2]).all() and np.isnan(expected_w[:2]).all()
    assert_close(out[2:], expected[2:], dtype)

def _unaligned(array):
    """A C-contiguous copy of ``array`` one byte into a buffer: ``flags.aligned`` is False."""
    raw = bytearray(array.nbytes + 1)
    out = np.frombuffer(raw, dtype=array.dtype, count=array.size, offset=1).reshape(array.shape)
    out[...] = array
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


@pytest.mark.parametrize("q_len", [1, 5, 12])   # split-KV decode up to DECODE_MAX_Q, then flash
def test_unaligned_arrays_give_the_aligned_results(rng, q_len):
    # an int64 kv_lengths at an odd offset raised "NotImplementedError: memoryview: unsupported
    # format =q"; float arrays reached the C kernels as misaligned pointers
    q = rng.standard_normal((2, 2, q_len, 8), dtype=np.float32)
    k = rng.standard_normal((2, 2, 7, 8), dtype=np.float32)
    v = rng.standard_normal((2, 2, 7, 8), dtype=np.float32)
    lengths = np.array([3, 7], dtype=np.int64)
    expected = attncore.attention(q, k, v, kv_lengths=lengths, causal=True)
    got = attncore.attention(_unaligned(q), _unaligned(k), _unaligned(v),
                             kv_lengths=_unaligned(lengths), causal=True)
    np.testing.assert_array_equal(got, expected)
    out, weights = attncore.attention(q, k, v, kv_lengths=_unaligned(lengths), return_weights=True)
    np.testing.assert_array_equal(weights, attncore.attention(q, k, v, kv_lengths=lengths,
                                                              return_weights=True)[1])
    x = rng.standard_normal((3, 5), dtype=np.float32)
    row_lengths = np.array([0, 2, 5], dtype=np.int64)
    np.testing.assert_array_equal(attncore.softmax(_unaligned(x), lengths=_unaligned(row_lengths)),
                                  attncore.softmax(x, lengths=row_lengths))


def test_additive_keys_past_the_limit_in_the_last_valid_position(rng):
    """The flags of every valid key decide the path, the last one's too: a key past the split's
    limit at position kv_length - 1 keeps its batch element on the exact tanh."""
    hidden = 24
    b = rng.standard_normal((2, 6, hidden))
    b[0, 5, 0] = 45.0        # the last key of batch 0
    b[1, 3, 1] = 45.0        # the last valid key of batch 1 (kv_lengths 4)
    a = rng.standard_normal((2, 1, hidden))
    args = _projected_additive_inputs(rng, a, b)
    keys = attncore.AdditiveKeys(args["keys"])
    got = attncore.additive_attention(**{**args, "keys": keys}, kv_lengths=[6, 4])
    expected = reference.additive_attention(*as64(*args.values()), kv_lengths=[6, 4])
    assert_close(got, expected, np.float32, atol=score_atol(np.float32, np.abs(args["w_v"]).sum()))


def test_a_dense_mask_never_makes_the_whole_score_tensor(rng):
    # 1 x 8 x 1024 x 1024 with a (1024, 1024) mask: the scores, the weights and the mask's
    # copy were each a (batch, heads, q_len, kv_len) array (32 + 32 + 8 MB); now chunks of
    # MASKED_CHUNK_BYTES, and the whole tensor only when the weights are asked for
    import importlib
    import tracemalloc
    front = importlib.import_module("attncore.kernels.attention")   # (the module, not the function)
    q, k, v = (rng.standard_normal((1, 8, 1024, 32)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((1024, 1024), bool))
    tracemalloc.start()
    try:
        out = attncore.attention(q, k, v, mask=mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = 8 * 1024 * 1024 * 4                       # one (1, 8, 1024, 1024) float32 tensor
    slice_bytes = max(front.MASKED_CHUNK_BYTES, 1024 * 1024 * 4)   # (at least one head's)
    assert peak < min(whole / 2, 2 * slice_bytes + 2 * out.nbytes), peak
    np.testing.assert_allclose(out, attncore.attention(q, k, v, causal=True), rtol=0, atol=2e-6)
    with_weights, weights = attncore.attention(q, k, v, mask=mask, return_weights=True)
    np.testing.assert_array_equal(with_weights, out)   # (the same chunks either way)
    assert weights.shape == (1, 8, 1024, 1024)


@pytest.mark.parametrize("shape", [(512, 8, 8, 16), (3, 5, 300, 16), (2, 3, 700, 8)])
def test_dense_mask_chunks_read_the_right_slices_and_leave_the_mask_alone(rng, shape):
    # chunks of many small (batch, head) slices, of a few heads of a batch entry, and of one
    # head: each copies its own slices of the mask (per batch entry here), then the causal and
    # length limits; the caller's mask is never written. (The weights come from these chunks;
    # the output from the fused paths, or from the chunks with a non-finite value.)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    length = shape[2]
    per_batch = rng.random((shape[0], 1, length, length)) < 0.7
    full = np.ascontiguousarray(np.broadcast_to(per_batch, shape[:2] + (length, length)))
    before = full.copy()
    kv_lengths = rng.integers(0, length + 1, shape[0])
    out, weights = attncore.attention(q, k, v, mask=full, causal=True, kv_lengths=kv_lengths,
                                      return_weights=True)
    np.testing.assert_array_equal(full, before)
    expected, expected_w = reference.attention(*(a.astype(np.float64) for a in (q, k, v)),
                                               mask=full, causal=True, kv_lengths=kv_lengths,
                                               return_weights=True)
    assert_close(out, expected, np.float32)
    _check_weights(weights, expected_w, np.float32)
    v[-1, -1, -1, -1] = np.nan   # (the output through the chunks: their rows still theirs)
    expected = reference.attention(*(a.astype(np.float64) for a in (q, k, v)), mask=full,
                                   causal=True, kv_lengths=kv_lengths)
    out = attncore.attention(q, k, v, mask=full, causal=True, kv_lengths=kv_lengths)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert_close(np.nan_to_num(out), np.nan_to_num(expected), np.float32)
    np.testing.assert_array_equal(
        attncore.attention(q, k, v, mask=per_batch, causal=True, kv_lengths=kv_lengths), out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("excluded_by", ["kv_lengths", "causal", "mask"])
def test_a_value_no_query_sees_cannot_poison_the_dense_mask_path(rng, dtype, excluded_by):
    # NaN in V at key 8, out of every query's reach: a padded cache's tail. The product with V
    # took it times a weight of 0 (NaN), so adding an all-True mask to a causal or kv_lengths
    # call turned its finite output into NaN. A row that does see a NaN value stays NaN.
    q_len = 9 if excluded_by == "causal" else 5   # (causal: queries 0-7 do not see key 8)
    q = rng.standard_normal((2, 4, q_len, 8)).astype(dtype)
    k, v = (rng.standard_normal((2, 2, 9, 8)).astype(dtype) for _ in range(2))
    v[:, :, 8] = np.nan
    mask = np.ones((q_len, 9), bool)
    options = {"kv_lengths": dict(kv_lengths=np.array([8, 5])), "causal": dict(causal=True),
               "mask": {}}[excluded_by]
    if excluded_by == "mask":
        mask[:, 8] = False
    out = attncore.attention(q, k, v, mask=mask, **options)[:, :, :5]   # (the rows blind to 8)
    assert np.isfinite(out).all()
    expected = reference.attention(*(as64(a) for a in (q, k, v)), mask=mask, **options)
    assert_close(out, expected[:, :, :5], dtype)
    if excluded_by != "mask":   # the same as the call without a mask
        assert_close(out, attncore.attention(q, k, v, **options)[:, :, :5], dtype)
    # one query row that does see key 8 (only it): NaN there, finite elsewhere
    seeing = np.zeros((2, 4, q_len, 9), bool)
    seeing[..., :5] = True
    seeing[1, 2, 3, 8] = True
    out = attncore.attention(q, k, v, mask=seeing)
    assert np.isnan(out[1, 2, 3]).all()
    others = np.ones(out.shape[:3], bool)
    others[1, 2, 3] = False
    assert np.isfinite(out[others]).all()


TILE_KERNEL = pytest.mark.skipif(not _sdpa.tile_products(),
                                 reason="the tile kernel needs AVX2 or AVX-512")


def _fused_mask_cases():
    """(dtype, q_len, tiles) where a dense mask runs on a fused path: split-KV (q_len <= 8) in
    both precisions, flash on the tile kernel (float32) and on BLAS (float32 forced there by
    tiles=False, and float64)."""
    return [pytest.param(np.float32, 5, None, id="split-kv-float32"),
            pytest.param(np.float64, 5, None, id="split-kv-float64"),
            pytest.param(np.float32, 150, True, id="tiles", marks=TILE_KERNEL),
            pytest.param(np.float32, 150, False, id="blas-float32"),
            pytest.param(np.float64, 150, None, id="blas-float64")]


def _flash_kernel(monkeypatch, tiles):
    """Force float32 flash onto the tile kernel (True) or BLAS (False); None: as it is."""
    if tiles is not None:
        monkeypatch.setattr(sys.modules["attncore.kernels.attention"], "USE_TILE_PRODUCTS", tiles)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,q_len,tiles", _fused_mask_cases())
def test_a_mask_on_the_fused_paths_adds_nothing_of_its_own(monkeypatch, rng, dtype, q_len, tiles,
                                                           causal):
    # A mask keeping everything gives the bits of the call without one, and a padding mask
    # those of kv_lengths: a kept key runs exactly as without the mask, a left-out one (or a
    # key block left out whole, skipped) adds exactly nothing
    # (lengths whose last chunk ends off the vector loops' stride: split-KV ends a masked
    # chunk at its last kept key, as kv_lengths does, else the sums split differently)
    _flash_kernel(monkeypatch, tiles)
    lengths = np.array([700, 230, 1, 54, 59, 61, 157 + 256, 178 + 512])
    q = rng.standard_normal((len(lengths), 4, q_len, 64)).astype(dtype)
    k, v = (rng.standard_normal((len(lengths), 2, 700, 64)).astype(dtype) for _ in range(2))
    np.testing.assert_array_equal(
        attncore.attention(q, k, v, mask=np.ones((q_len, 700), bool), causal=causal),
        attncore.attention(q, k, v, causal=causal))
    padding = (np.arange(700) < lengths[:, None])[:, None, None, :]
    by_lengths = attncore.attention(q, k, v, kv_lengths=lengths, causal=causal)
    np.testing.assert_array_equal(attncore.attention(q, k, v, mask=padding, causal=causal),
                                  by_lengths)
    # a padded cache's tail left as allocated (NaN, inf): still kv_lengths' bits
    tail = ~padding[:, 0, 0, :]                                       # (batch, kv_len)
    v[np.nonzero(tail)[0], :, np.nonzero(tail)[1]] = np.nan
    v[1, 1, 650] = np.inf
    np.testing.assert_array_equal(attncore.attention(q, k, v, mask=padding, causal=causal),
                                  by_lengths)
    # left padding (the kept keys last), NaN in the keys no query keeps: the bits of the call
    # with those values finite
    left = padding[:, :, :, ::-1]
    finite = rng.standard_normal(v.shape).astype(dtype)
    np.testing.assert_array_equal(
        attncore.attention(q, k, np.where(left[:, :, 0, :, None], finite, np.nan), mask=left),
        attncore.attention(q, k, finite, mask=left))


@pytest.mark.parametrize("dtype,q_len,tiles", _fused_mask_cases())
def test_left_out_keys_cannot_reach_a_fused_output(monkeypatch, rng, dtype, q_len, tiles):
    # NaN and huge keys where the mask leaves them out (whole key blocks, parts of blocks, a
    # few queries' entries): their scores are never computed or are set to -inf, so the
    # output equals the reference without them, finite; the weights too
    _flash_kernel(monkeypatch, tiles)
    q = rng.standard_normal((2, 2, q_len, 16)).astype(dtype)
    k, v = (rng.standard_normal((2, 2, 600, 16)).astype(dtype) for _ in range(2))
    mask = np.ones((2, 2, q_len, 600), bool)
    mask[..., 100:400] = False          # whole blocks of keys, and the parts around them
    mask[0, 1, :, 450] = False          # one key, for one head
    mask[1, :, ::2, 500:510] = False    # a few keys for every other query
    k[..., 100:400, :] = np.nan
    k[0, 1, 450] = 1e30
    k[1, :, 500:510] = np.nan
    k_clean = np.where(mask.any(axis=2)[..., None], k, 0)
    k_clean[1, :, 500:510] = 1e30          # (seen by the odd queries: kept NaN-free here)
    out, weights = attncore.attention(q, k, v, mask=mask, return_weights=True)
    rows = np.arange(q_len) % 2 == 0    # the even queries, which leave out keys 500-509
    expected, expected_w = reference.attention(*as64(q, k_clean, v), mask=mask,
                                               return_weights=True)
    assert np.isfinite(out[1][:, rows]).all() and np.isfinite(out[0]).all()
    assert_close(out[0], expected[0], dtype)
    assert_close(out[1][:, rows], expected[1][:, rows], dtype)
    assert_close(weights[0], expected_w[0], dtype)
    assert np.isnan(out[1][:, ~rows]).all()   # the odd queries see the NaN keys


@pytest.mark.parametrize("dtype,q_len,tiles", _fused_mask_cases())
@pytest.mark.parametrize("layout", ["per-head", "per-batch", "per-head-only", "keys-only",
                                    "queries-only", "transposed", "reversed", "scalar",
                                    "none-kept"])
def test_a_mask_is_read_in_place_whatever_its_strides(monkeypatch, rng, dtype, q_len, tiles,
                                                      layout):
    # the fused paths read the caller's broadcast view by its strides (0 where it broadcasts,
    # negative where it runs backwards) and classify its key blocks once per batch entry and
    # head it actually has
    _flash_kernel(monkeypatch, tiles)
    batch, heads, kv_len = 3, 4, 333
    q = rng.standard_normal((batch, heads, q_len, 16)).astype(dtype)
    k, v = (rng.standard_normal((batch, 2, kv_len, 16)).astype(dtype) for _ in range(2))
    draw = {"per-head": (batch, heads, q_len, kv_len), "per-batch": (batch, 1, q_len, kv_len),
            "per-head-only": (heads, q_len, kv_len), "keys-only": (batch, 1, 1, kv_len),
            "queries-only": (batch, heads, q_len, 1), "transposed": (kv_len, q_len),
            "reversed": (batch, heads, q_len, kv_len), "scalar": (), "none-kept": ()}[layout]
    mask = rng.random(draw) < (0.0 if layout == "none-kept" else 0.6)
    if mask.ndim >= 3 and layout != "queries-only":
        # key ranges left out whole, and kept whole, by some batch entries or heads only:
        # their blocks' states differ by batch entry and head
        lead = mask.reshape(-1, *mask.shape[-2:])
        for index, entry in enumerate(lead):
            entry[:, 96 * (index % 3):96 * (index % 3 + 1)] = False
            entry[:, 96 * ((index + 1) % 3):96 * ((index + 1) % 3 + 1)] = True
    if layout == "transposed":
        mask = mask.T
    elif layout == "reversed":
        mask = mask[:, ::-1, ::-1, ::-1]
    before = mask.copy()
    out = attncore.attention(q, k, v, mask=mask, causal=True, kv_lengths=[333, 100, 0])
    expected = reference.attention(*as64(q, k, v), mask=mask, causal=True,
                                   kv_lengths=[333, 100, 0])
    assert_close(out, expected, dtype)
    np.testing.assert_array_equal(mask, before)


@pytest.mark.parametrize("dtype,q_len,tiles", _fused_mask_cases())
def test_masked_fused_attention_is_the_same_for_every_thread_count(monkeypatch, rng, dtype, q_len,
                                                                   tiles):
    _flash_kernel(monkeypatch, tiles)
    q = rng.standard_normal((2, 4, q_len, 32)).astype(dtype)
    k, v = (rng.standard_normal((2, 4, 900, 32)).astype(dtype) for _ in range(2))
    mask = rng.random((2, 1, q_len, 900)) < 0.8
    mask[..., 300:600] = False
    with attncore.num_threads(1):
        one = attncore.attention(q, k, v, mask=mask)
    with attncore.num_threads(3):
        np.testing.assert_array_equal(attncore.attention(q, k, v, mask=mask), one)


@TILE_KERNEL
def test_the_dense_mask_kernels_check_their_mask_argument(rng):   # (tile kernel: block_q 32)
    q = rng.standard_normal((1, 2, 20, 16)).astype(np.float32)
    out = np.empty_like(q)
    wrong = np.ones((1, 2, 20, 19), np.uint8)
    with pytest.raises(ValueError, match="mask must be"):
        _sdpa.flash(q, q, q, out, None, False, 0.3, 32, 32, True, 1, wrong)
    with pytest.raises(ValueError, match="mask must be"):
        _sdpa.split_kv(q, q, q, out, None, False, 0.3, 64, 1, wrong)
    with pytest.raises(ValueError, match="mask must be"):
        _sdpa.flash(q, q, q, out, None, False, 0.3, 32, 32, False, 1, wrong)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_split_kv_sums_a_chunk_again_without_a_left_out_nan_value(rng, dtype):
    # decoding with a mask and NaN / inf values at keys it leaves out (a stale cache slot):
    # the chunk holding them is summed again with those values out, giving the bits of the
    # call with them finite; a query that keeps such a key is NaN in that value's column
    q = rng.standard_normal((2, 4, 3, 16)).astype(dtype)
    k, v = (rng.standard_normal((2, 2, 600, 16)).astype(dtype) for _ in range(2))
    mask = np.ones((2, 4, 3, 600), bool)
    mask[..., 300] = False
    mask[0, 1, 2, 300] = True           # the one query that sees key 300
    mask[1, :, :, 10:20] = False
    clean = v.copy()
    v[:, :, 300, 5] = np.nan
    v[1, :, 12] = np.inf
    out = attncore.attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(np.isnan(out[0, 1, 2]), np.arange(16) == 5)
    others = np.ones(out.shape[:3], bool)
    others[0, 1, 2] = False
    expected = attncore.attention(q, k, clean, mask=mask)
    np.testing.assert_array_equal(out[others], expected[others])
    assert_close(out[others], reference.attention(*as64(q, k, clean), mask=mask)[others], dtype)
