# SPDX-License-Identifier: Apache-2.0
"""bfloat16 and int8 weights: the rounding / quantization, the packed product, and models
loaded with ``weight_dtype="bfloat16"`` or ``"int8"``.

The contract is exact, so most checks here are bit for bit: a bfloat16 weight is the float32
weight rounded to nearest (ties to even), products convert it back exactly and run the float32
arithmetic, so a bfloat16 model is the float32 model of the rounded weights. Only the last test
measures what the rounding costs in accuracy, on the bundled trained model. int8 products are
exact integer sums and one fused multiply-add per output, so they too are checked bit for bit,
against ``reference.linear_int8``; what quantizing costs is measured on the trained model.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attncore
from attncore import reference as ref
from attncore.kernels import PackedLinearWeight, _blas, round_bfloat16
from attncore.kernels.threads import BLAS_SMALL_GEMM_MACS
from attncore.models import Seq2SeqAttention
from attncore.train.seq2seq import Seq2SeqConfig
from attncore.train.transformer import TransformerConfig
from conftest import subprocess_env

F32 = np.float32


def _bits(x):
    return np.asarray(x, dtype=F32).view(np.uint32)


# ------------------------------------------------------------------------------ rounding
def test_round_bfloat16_matches_the_reference(rng):
    # every magnitude from subnormals to the largest floats, both signs, and the specials
    x = rng.standard_normal(20000) * np.exp2(rng.uniform(-140, 127, 20000))
    x = np.clip(x, -3e38, 3e38).astype(F32)
    x = np.concatenate([x, np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45,
                                     np.finfo(F32).max, -np.finfo(F32).max,
                                     np.finfo(F32).tiny], dtype=F32)])
    got, want = round_bfloat16(x), ref.round_bfloat16(x)
    assert got.dtype == F32 and got.shape == x.shape
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(_bits(got)[~nan], _bits(want)[~nan])


def test_round_bfloat16_is_nearest_with_ties_to_even(rng):
    x = rng.standard_normal(5000).astype(F32) * F32(1000)
    r = round_bfloat16(x)
    assert np.all(_bits(r) & 0xFFFF == 0)                     # a bfloat16 value
    # within half a bfloat16 ulp (2^-8 relative to the power of two below |x|)
    half_ulp = np.exp2(np.floor(np.log2(np.abs(x.astype(np.float64)))) - 8)
    assert np.all(np.abs(r.astype(np.float64) - x) <= half_ulp)
    # exact ties go to the even significand: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], dtype=F32)
    assert round_bfloat16(ties).tolist() == [1.0, 1 + 2 ** -6, -1.0]
    assert np.isinf(round_bfloat16(np.finfo(F32).max))        # past the largest bfloat16
    # shape, float64 input, idempotence
    x64 = rng.standard_normal((3, 4))
    assert round_bfloat16(x64).shape == (3, 4)
    assert np.array_equal(round_bfloat16(round_bfloat16(x64)), round_bfloat16(x64))


# ---------------------------------------------------------------------- packed products
SHAPES = [(1, 1), (5, 3), (64, 7), (100, 33), (130, 257), (300, 600)]


@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_bfloat16_panels_unpack_to_the_rounded_weight(rng, n_out, n_in):
    w = rng.standard_normal((n_out, n_in)).astype(F32)
    packed = PackedLinearWeight(w, "bfloat16")
    assert packed.weight_dtype == "bfloat16" and packed.dtype == F32
    assert packed.panels.dtype == np.uint16 and not packed.panels.flags.writeable
    assert packed.panels.nbytes * 2 == PackedLinearWeight(w).panels.nbytes
    assert np.array_equal(packed.unpack(), round_bfloat16(w))
    assert "bfloat16" in repr(packed)


@pytest.mark.parametrize("n_out,n_in", SHAPES)
def test_bfloat16_product_is_the_float32_product_of_the_rounded_weight(rng, n_out, n_in):
    """Every path: the panel kernel (up to 256 rows with AVX2: row blocks of 6 and each
    remainder, 16-row groups), and past it BLAS on a float32 copy of each panel, in K chunks
    under the small-matrix limit or over the whole K; 1, 2 and 3 threads."""
    w = rng.standard_normal((n_out, n_in)).astype(F32)
    bias = rng.standard_normal(n_out).astype(F32)
    half, rounded = PackedLinearWeight(w, "bfloat16"), PackedLinearWeight(round_bfloat16(w))
    for rows in (1, 2, 3, 4, 5, 7, 16, 17, 40, 70, 300):
        x = rng.standard_normal((rows, n_in)).astype(F32)
        want = ref.linear(x.astype(np.float64), round_bfloat16(w).astype(np.float64), bias)
        for macs in (BLAS_SMALL_GEMM_MACS, 0, 1 << 20):
            for threads in (1, 2, 3):
                got = np.empty((rows, n_out), dtype=F32)
                same = np.empty((rows, n_out), dtype=F32)
                _blas.linear_packed(x, half.panels, n_out, bias, got, macs, threads)
                _blas.linear_packed(x, rounded.panels, n_out, bias, same, macs, threads)
                assert np.array_equal(got, same), (rows, macs, threads)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(n_in))


def test_linear_front_takes_bfloat16_weights(rng):
    w = rng.standard_normal((70, 24)).astype(F32)
    x = rng.standard_normal((2, 3, 24)).astype(F32)
    out = attncore.linear(x, PackedLinearWeight(w, "bfloat16"))
    assert out.shape == (2, 3, 70)
    assert np.array_equal(out, attncore.linear(x, PackedLinearWeight(round_bfloat16(w))))


# ----------------------------------------------------------------------------- models
def _seq2seq_config(**overrides):
    return Seq2SeqConfig(src_vocab_size=40, tgt_vocab_size=30, embed_dim=12, hidden_size=20,
                         **overrides).to_dict()


def _transformer_config(**overrides):
    base = dict(kind="encoder_decoder", src_vocab_size=40, tgt_vocab_size=30, d_model=16,
                num_heads=4, dim_feedforward=72, num_encoder_layers=2, num_decoder_layers=2,
                max_positions=40)
    base.update(overrides)
    return TransformerConfig(**base).to_dict()


CONFIGS = {
    "gru-bahdanau-2layer-bidir": _seq2seq_config(num_layers=2, bidirectional=True),
    "lstm-luong-general-feeding": _seq2seq_config(rnn_type="lstm", attention="luong_general",
                                                  input_feeding=True),
    "gru-luong-concat": _seq2seq_config(attention="luong_concat", attention_dim=10),
    "transformer-post-norm": _transformer_config(),
    "transformer-pre-norm-gelu-tied": _transformer_config(norm_first=True, final_norm=True,
                                                          activation="gelu",
                                                          tie_embeddings=True),
    "decoder-only-learned-positions": _transformer_config(kind="decoder_only",
                                                          positions="learned"),
}


def _rounded_twin(model):
    """The float32 model of ``model``'s weights rounded the way weight_dtype does."""
    weights = {name: round_bfloat16(w) if w.ndim >= 2 else w for name, w in model.weights.items()}
    return type(model)(model.config, weights)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bfloat16_model_is_the_float32_model_of_the_rounded_weights(rng, name):
    config = CONFIGS[name]
    full = attncore.from_config(config, seed=2)
    half = attncore.from_config(config, seed=2, weight_dtype="bfloat16")
    twin = _rounded_twin(full)
    assert half.weight_dtype == "bfloat16" and full.weight_dtype == "float32"
    for key, w in half.weights.items():  # matrices rounded, vectors as they were
        assert w.dtype == F32 and not w.flags.writeable
        expected = round_bfloat16(full.weights[key]) if w.ndim >= 2 else full.weights[key]
        assert np.array_equal(w, expected), key
    vocab = min(config["src_vocab_size"], config["tgt_vocab_size"])  # sources or prompts
    sources = [rng.integers(4, vocab, n).tolist() for n in (6, 1, 11, 3, 17, 9, 2, 14)]
    attention = config.get("kind") != "decoder_only"  # cross-attention maps where there are
    for options in (dict(), dict(beam_size=3, num_hypotheses=2), dict(do_sample=True, seed=5)):
        got = half.generate(sources, max_length=9, return_attention=attention, **options)
        want = twin.generate(sources, max_length=9, return_attention=attention, **options)
        for a, b in zip(got, want):
            assert a.hypotheses == b.hypotheses and a.scores == b.scores
            if attention:
                assert all(np.array_equal(x, y) for x, y in zip(a.attention, b.attention))
    # a sentence alone gives what it gives inside the batch
    alone = half.generate(sources[4:5], max_length=9)[0]
    assert alone.hypotheses == half.generate(sources, max_length=9)[4].hypotheses


def test_bfloat16_steps_hold_half_the_packed_bytes():
    config = CONFIGS["transformer-post-norm"]
    full, half = (attncore.from_config(config, weight_dtype=d) for d in ("float32", "bfloat16"))
    assert half.output_step.panels.nbytes * 2 == full.output_step.panels.nbytes
    assert all(layer.packed.linear1.weight_dtype == "bfloat16" for layer in half.decoder_layers)
    seq2seq = attncore.from_config(CONFIGS["gru-bahdanau-2layer-bidir"], weight_dtype="bfloat16")
    assert seq2seq._decoder_step.weight_dtype == "bfloat16"
    assert all(direction[0].weight_dtype == "bfloat16" for layer in seq2seq.encoder_layers
               for direction in layer)


def test_bfloat16_load_and_save(tmp_path):
    config = CONFIGS["gru-luong-concat"]
    attncore.from_config(config, seed=1).save(tmp_path / "m")
    half = attncore.load(tmp_path / "m", weight_dtype="bfloat16")
    assert type(half) is Seq2SeqAttention and "bfloat16" in repr(half)
    # what it saves are the rounded values it computes with
    half.save(tmp_path / "rounded")
    again = attncore.load(tmp_path / "rounded")
    assert all(np.array_equal(again.weights[k], w) for k, w in half.weights.items())


def test_weight_dtype_may_be_a_str_subclass():
    # (numpy.str_ passed the check, then a Cython argument typed str refused it)
    for name in ("gru-luong-concat", "transformer-post-norm"):
        for dtype in ("int8", "bfloat16"):
            model = attncore.from_config(CONFIGS[name], weight_dtype=np.str_(dtype))
            assert type(model.weight_dtype) is str and model.weight_dtype == dtype


def test_int8_width_limit_names_the_tensor():
    # the packer's error named no tensor; the float32 and bfloat16 models of it run
    config = _transformer_config(num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=32800)
    with pytest.raises(ValueError, match=r"tensor 'decoder.layers.0.linear2.weight' has 32800 "
                                         r"in_features; int8 weights take at most 32768"):
        attncore.from_config(config, weight_dtype="int8")
    attncore.from_config(config, weight_dtype="bfloat16")


@pytest.mark.parametrize("value,error,match", [
    ("float16", ValueError, "weight_dtype"), ("int4", ValueError, "weight_dtype"),
    (16, TypeError, "weight_dtype"), (None, TypeError, "weight_dtype"),
])
def test_bad_weight_dtype_is_named(tmp_path, value, error, match):
    config = CONFIGS["gru-luong-concat"]
    with pytest.raises(error, match=match):
        attncore.from_config(config, weight_dtype=value)
    attncore.from_config(config).save(tmp_path / "m")
    with pytest.raises(error, match=match):
        attncore.load(tmp_path / "m", weight_dtype=value)
    with pytest.raises(error, match=match):
        PackedLinearWeight(np.ones((3, 2), dtype=F32), value)


def test_weights_beyond_bfloat16_range_are_refused():
    model = attncore.from_config(CONFIGS["gru-luong-concat"])
    weights = dict(model.weights)
    big = weights["decoder.output.weight"].copy()
    big[0, 0] = np.finfo(F32).max
    weights["decoder.output.weight"] = big
    Seq2SeqAttention(model.config, weights)  # fine in float32
    with pytest.raises(ValueError, match="decoder.output.weight.*bfloat16"):
        Seq2SeqAttention(model.config, weights, weight_dtype="bfloat16")


def test_bfloat16_dates_model_keeps_its_accuracy():
    """The bundled date model (trained in float32) with its weights rounded: the same outputs
    on 300 held-out dates (measured: 1000 of 1000 the same, accuracy 0.999 either way)."""
    from attncore.data.dates import DatesTask

    examples = DatesTask(seed=0, num_train=1, num_valid=1, num_test=300).examples("test")
    sources = [source for source, _ in examples]
    path = attncore.__path__[0] + "/assets/dates"
    full = attncore.load(path).translate(sources)
    half = attncore.load(path, weight_dtype="bfloat16").translate(sources)
    assert half == full
    assert np.mean([out == target for out, (_, target) in zip(half, examples)]) >= 0.99


# ------------------------------------------------------------------------------- int8
# (40, 4100): 15 rows fill the kernel's buffer, so short AMX blocks there run on VNNI instead
INT8_SHAPES = SHAPES + [(4000, 256), (70, 1030), (40, 4100)]


@pytest.mark.parametrize("n_out,n_in", INT8_SHAPES)
def test_int8_panels_hold_the_quantized_weight(rng, n_out, n_in):
    w = rng.standard_normal((n_out, n_in)).astype(F32) * rng.uniform(0.01, 10, (n_out, 1))
    w[0] = 0.0                                   # a row of zeros: scale 0, values 0
    packed = PackedLinearWeight(w, "int8")
    assert packed.weight_dtype == "int8" and packed.dtype == F32
    assert packed.panels.dtype == np.int8 and not packed.panels.flags.writeable
    assert packed.panels.shape == (-(-n_out // 64), -(-n_in // 64) * 64 + 9, 64)
    # each panel's last row starts with the in_features it was packed for
    assert (packed.panels[:, -1, :4].copy().view(np.int32) == n_in).all()
    values, scales = packed.int8_parts()
    want_values, want_scales = ref.quantize_int8(w)
    assert np.array_equal(values, want_values) and np.array_equal(scales, want_scales)
    assert scales[0] == 0 and not values[0].any()
    # the largest weight of each other row maps to +-127
    assert np.all(np.abs(values[1:].astype(np.int32)).max(axis=1, initial=0) == 127)
    np.testing.assert_array_equal(packed.unpack(), values * scales[:, None])
    # the quantization error of each weight is at most half a step
    assert np.all(np.abs(packed.unpack() - w) <= scales[:, None] * 0.5 * (1 + 1e-6))
    assert "int8" in repr(packed)


@pytest.mark.parametrize("n_out,n_in", INT8_SHAPES)
def test_int8_product_is_the_reference_bit_for_bit(rng, n_out, n_in):
    """Integer sums are exact: every row count (the VNNI kernel's blocks of 6 and each
    remainder, AMX's blocks of 16 and short blocks; rows quantized in chunks of the kernel's
    64 KiB buffer past it), thread count and bias give the bits of ``reference.linear_int8``."""
    w = rng.standard_normal((n_out, n_in)).astype(F32)
    bias = rng.standard_normal(n_out).astype(F32)
    packed = PackedLinearWeight(w, "int8")
    values, scales = packed.int8_parts()
    for rows in (1, 2, 3, 5, 6, 7, 13, 15, 16, 17, 40, 300):
        x = (rng.standard_normal((rows, n_in)) * rng.uniform(0.1, 100, (rows, 1))).astype(F32)
        for b in (bias, None):
            want = ref.linear_int8(x, values, scales, b)
            for threads in (1, 2, 3):
                got = np.empty((rows, n_out), dtype=F32)
                _blas.linear_packed(x, packed.panels, n_out, b, got, BLAS_SMALL_GEMM_MACS,
                                    threads)
                assert np.array_equal(_bits(got), _bits(want)), (rows, threads, b is None)
        # and close to the float32 product: per-row and per-output scales, ~1% of the outputs
        full = ref.linear(x.astype(np.float64), w.astype(np.float64), bias)
        assert np.abs(want - full).max() <= 0.03 * np.abs(full).max(), rows


def test_int8_reference_rounds_once_as_a_fused_multiply_add():
    """``reference.linear_int8``'s last step is one rounding of sum * scale + bias, as the
    kernels' fma: where float64 would round the exact value onto a float32 midpoint, and float32
    then round that to even, the reference rounds the exact value."""
    p = np.array([1 + 2.0 ** -24, 1 + 2.0 ** -24, -(1 + 2.0 ** -24), 3.0, np.nan])
    b = np.array([2.0 ** -80, -2.0 ** -80, -2.0 ** -80, 0.0, 1.0])
    one, next_up = np.float32(1).view(np.uint32), np.nextafter(F32(1), F32(2)).view(np.uint32)
    got = ref._fma_float32(p, b)
    assert np.float32(p[0] + b[0]).view(np.uint32) == one          # twice-rounded: to even
    assert _bits(got[:4]).tolist() == [next_up, one, next_up | 0x80000000,
                                       np.float32(3).view(np.uint32)]
    assert np.isnan(got[4])


def test_int8_rows_with_zeros_nan_or_infinity(rng):
    w = rng.standard_normal((10, 33)).astype(F32)
    bias = np.arange(10, dtype=F32)
    x = rng.standard_normal((5, 33)).astype(F32)
    x[0] = 0.0                  # zero row: the bias
    x[1, 4] = np.nan            # NaN or infinity anywhere: NaN outputs, as float32 would give
    x[2, 0] = -np.inf
    x[3] = 1e-39                # subnormal row: 127 / max overflows, counted as zero
    out = attncore.linear(x, PackedLinearWeight(w, "int8"), bias)
    assert np.array_equal(out[0], bias) and np.array_equal(out[3], bias)
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    assert np.isfinite(out[4]).all()
    values, scales = PackedLinearWeight(w, "int8").int8_parts()
    want = ref.linear_int8(x, values, scales, bias)
    assert np.array_equal(np.isnan(want), np.isnan(out))
    assert np.array_equal(out[~np.isnan(out)], want[~np.isnan(want)])


@pytest.mark.parametrize("n_out, big, tiny", [(40, 3, 5), (200, 131, 197)])
def test_int8_scales_whose_product_leaves_float32s_normal_range(rng, n_out, big, tiny):
    """The float step multiplied the row and weight scales in float32 first: x near 1e30 by w
    near 1e13 made an inf scale that turned a 0 sum into NaN (float32 gives the bias there),
    and x 2e-20 by w 2e-21 a subnormal one, 13% off though every value quantizes exactly.
    Such outputs are now computed from the scales' product in double."""
    K = 4096
    w = rng.standard_normal((n_out, K)).astype(F32)
    w[big, :K // 2] = 0
    w[big, K // 2:] *= 1e13
    w[tiny] = 2e-21
    bias = rng.standard_normal(n_out).astype(F32)
    bias[tiny] = 0
    x = rng.standard_normal((6, K)).astype(F32)
    x[1, :K // 2] *= 1e30
    x[1, K // 2:] = 0                  # orthogonal to w[big]: a sum of 0
    x[2] *= 1e30                       # overflows float32 however computed: inf
    x[3] = 2e-20
    packed = PackedLinearWeight(w, "int8")
    values, scales = packed.int8_parts()
    want = ref.linear_int8(x, values, scales, bias)
    assert want[1, big] == bias[big]
    assert want[3, tiny] == pytest.approx(K * 2e-20 * 2e-21, rel=1e-6)
    for rows in (slice(0, 6), slice(1, 2), slice(3, 4), slice(1, 5)):
        for threads in (1, 2):
            got = np.empty((x[rows].shape[0], n_out), dtype=F32)
            _blas.linear_packed(x[rows], packed.panels, n_out, bias, got, BLAS_SMALL_GEMM_MACS,
                                threads)
            assert np.array_equal(_bits(got), _bits(want[rows])), (rows, threads)
    assert np.isinf(want[2, big]) and np.isfinite(np.delete(want, 2, axis=0)).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS")
def test_int8_product_without_memory_for_its_buffer_is_still_right(tmp_path):
    """At its address-space limit a process could not malloc the product's 68 KiB of quantized
    rows, and the outputs were NaN, silently (an encoder's outputs, a classifier's logits). Now
    the rows go one at a time through a buffer on the stack: the same bits."""
    script = textwrap.dedent("""
        import resource, numpy as np, attncore
        from attncore.kernels import PackedLinearWeight
        attncore.set_num_threads(1)
        rng = np.random.default_rng(0)
        w = rng.standard_normal((64, 256)).astype(np.float32)
        x = rng.standard_normal((3, 256)).astype(np.float32)
        packed = PackedLinearWeight(w, "int8")
        good = attncore.linear(x, packed)
        out = np.empty_like(good)
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size, resource.getrlimit(resource.RLIMIT_AS)[1]))
        ballast = []
        try:
            while True:
                ballast.append(bytes(69632 + 64))
        except MemoryError:
            pass
        try:
            bytes(69632)
            pressed = False
        except MemoryError:
            pressed = True
        from attncore.kernels import _blas
        _blas.linear_packed(x, packed.panels, 64, None, out, 0, 1)
        del ballast
        print(pressed, np.array_equal(out.view(np.uint32), good.view(np.uint32)))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=subprocess_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pressed, same = proc.stdout.split()
    if pressed != "True":
        pytest.skip("could not exhaust the heap under the limit here")
    assert same == "True"


def test_int8_packing_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="weight.*NaN"):
        PackedLinearWeight(np.array([[1.0, np.nan]], dtype=F32), "int8")
    with pytest.raises(ValueError, match="weight.*32768"):
        PackedLinearWeight(np.ones((1, 32769), dtype=F32), "int8")
    w = PackedLinearWeight(np.ones((3, 4), dtype=F32), "int8")
    with pytest.raises(ValueError, match="panels"):   # more in_features than the panels hold
        _blas.linear_packed(np.ones((1, 65), dtype=F32), w.panels, 3, None,
                            np.empty((1, 3), dtype=F32), 0, 1)
    with pytest.raises(ValueError, match="weight must have shape"):
        attncore.linear(np.ones((1, 5), dtype=F32), w)
    with pytest.raises(ValueError, match="not int8"):
        PackedLinearWeight(np.ones((3, 4), dtype=F32)).int8_parts()
    # panels of 4 in_features have the shape of 1 to 64: the K they store refuses the others
    for k in (3, 5, 64):
        with pytest.raises(ValueError, match="panels"):
            _blas.linear_packed(np.ones((2, k), dtype=F32), w.panels, 3, None,
                                np.empty((2, 3), dtype=F32), 0, 1)
    # the private packer too: past 32768 in_features (a quantized row would overflow the
    # kernel's buffer), and non-finite weights
    with pytest.raises(ValueError, match="32768"):
        _blas.int8_panels_shape(3, 32769)
    with pytest.raises(ValueError, match="NaN"):
        _blas.pack_panels_i8(np.array([[np.inf, 1.0]], dtype=F32),
                             np.empty(_blas.int8_panels_shape(1, 2), dtype=np.int8))
    huge = np.zeros((1, 1, 64), dtype=np.int8)       # not the shape of any weight of 65536 in
    with pytest.raises(ValueError, match="panels"):
        _blas.linear_packed(np.ones((1, 65536), dtype=F32), huge, 1, None,
                            np.empty((1, 1), dtype=F32), 0, 1)


@pytest.mark.parametrize("isa", ["scalar", "avx512"])
def test_int8_kernels_give_the_same_bits(rng, tmp_path, isa):
    """The same products in a fresh process with ATTNCORE_FORCE_ISA=scalar (the portable loop)
    or avx512 (VNNI without AMX): the bits of this process's kernels (AMX and VNNI where the
    CPU has them)."""
    import subprocess
    import sys

    if isa == "avx512" and not _blas.int8_amx():   # (it would compare this kernel with itself)
        pytest.skip("without AMX this process already runs the AVX-512 VNNI kernel")
    w = rng.standard_normal((130, 257)).astype(F32)
    x = rng.standard_normal((23, 257)).astype(F32)
    x[5, 7] = np.nan                                 # a NaN row among them: NaN outputs
    x[6] *= 1e-20                                    # scales whose float32 product is
    w[4] *= 1e-20                                    # subnormal (the float step in double)
    bias = rng.standard_normal(130).astype(F32)
    np.savez(tmp_path / "io.npz", w=w, x=x, bias=bias)
    script = ("import numpy as np, attncore, sys\n"
              "from attncore.kernels import PackedLinearWeight, _blas\n"
              f"d = np.load({str(tmp_path / 'io.npz')!r})\n"
              "assert not _blas.int8_amx()\n"
              f"assert {isa!r} != 'scalar' or not _blas.int8_vnni()\n"
              "y = attncore.linear(d['x'], PackedLinearWeight(d['w'], 'int8'), d['bias'])\n"
              f"np.save({str(tmp_path / 'y.npy')!r}, y)\n")
    # from an empty directory, importing the attncore this process imported (conftest)
    subprocess.run([sys.executable, "-c", script], env=subprocess_env(ATTNCORE_FORCE_ISA=isa),
                   cwd=tmp_path, check=True, timeout=120)
    here = attncore.linear(x, PackedLinearWeight(w, "int8"), bias)
    assert np.isnan(here[5]).all() and np.isfinite(np.delete(here, 5, axis=0)).all()
    assert np.array_equal(_bits(np.load(tmp_path / "y.npy")), _bits(here))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_int8_model_decodes_deterministically_near_float32(rng, name):
    """An int8 model: a sentence alone gives its bits inside a batch and at any thread count
    (integer sums), and its scores stay near the float32 model's."""
    config = CONFIGS[name]
    full = attncore.from_config(config, seed=2)
    quant = attncore.from_config(config, seed=2, weight_dtype="int8")
    assert quant.weight_dtype == "int8"
    # the weights it keeps (and saves) are the float32 ones; only the packed copies are int8
    assert all(np.array_equal(quant.weights[k], w) for k, w in full.weights.items())
    vocab = min(config["src_vocab_size"], config["tgt_vocab_size"])
    sources = [rng.integers(4, vocab, n).tolist() for n in (6, 1, 11, 3, 17, 9, 2, 14)]
    attention = config.get("kind") != "decoder_only"
    batch = quant.generate(sources, max_length=9, return_attention=attention)
    with attncore.num_threads(1):
        alone = quant.generate(sources[4:5], max_length=9, return_attention=attention)[0]
    assert alone.hypotheses == batch[4].hypotheses and alone.scores == batch[4].scores
    if attention:
        assert all(np.array_equal(a, b) for a, b in zip(alone.attention, batch[4].attention))
    # near float32: most greedy outputs the same (measured: 5 to 8 of 8 on these random
    # models), with scores within 2% (measured: at most 0.4%)
    reference = full.generate(sources, max_length=9)
    same = [got.hypotheses[0] == want.hypotheses[0] for got, want in zip(batch, reference)]
    assert sum(same) >= 4, same
    for got, want, agree in zip(batch, reference, same):
        if agree:
            assert abs(got.scores[0] - want.scores[0]) <= 0.02 * abs(want.scores[0])


def test_int8_steps_hold_a_quarter_of_the_packed_bytes():
    config = CONFIGS["transformer-post-norm"]
    full, quant = (attncore.from_config(config, weight_dtype=d) for d in ("float32", "int8"))
    # one byte a weight (in_features padded to 64), plus 576 a panel for its scales, sums and K
    panels = full.output_step.panels
    assert quant.output_step.panels.nbytes == panels.shape[0] * (64 * 64 + 576)
    # so a quarter of the float32 bytes where in_features is a multiple of 64
    w = PackedLinearWeight(np.ones((4000, 256), dtype=F32))
    q = PackedLinearWeight(np.ones((4000, 256), dtype=F32), "int8")
    assert q.panels.nbytes == w.panels.nbytes // 4 + 576 * w.panels.shape[0]
    assert all(layer.packed.linear1.weight_dtype == "int8" for layer in quant.decoder_layers)
    seq2seq = attncore.from_config(CONFIGS["gru-bahdanau-2layer-bidir"], weight_dtype="int8")
    assert seq2seq._decoder_step.weight_dtype == "int8"


def test_int8_dates_model_keeps_its_accuracy():
    """The bundled date model (trained in float32) with int8 products (measured: 300 of 300
    outputs the float32 model's, accuracy 1.0)."""
    from attncore.data.dates import DatesTask

    examples = DatesTask(seed=0, num_train=1, num_valid=1, num_test=300).examples("test")
    sources = [source for source, _ in examples]
    path = attncore.__path__[0] + "/assets/dates"
    full = attncore.load(path).translate(sources)
    quant = attncore.load(path, weight_dtype="int8").translate(sources)
    assert np.mean([a == b for a, b in zip(quant, full)]) >= 0.98
    assert np.mean([out == target for out, (_, target) in zip(quant, examples)]) >= 0.98


def test_int8_python_threads_decoding_at_once_equal_sequential(rng):
    """Several Python threads decode with one int8 model at once (each its own AMX tile state
    where AMX runs): the results of running them one after another."""
    import concurrent.futures

    model = attncore.from_config(CONFIGS["transformer-pre-norm-gelu-tied"], seed=3,
                                 weight_dtype="int8")
    jobs = [[rng.integers(4, 30, n).tolist() for n in rng.integers(1, 15, 7)] for _ in range(6)]
    options = [dict(max_length=10), dict(max_length=10, beam_size=3, num_hypotheses=2)]

    def run(i):
        return model.generate(jobs[i], **options[i % 2])

    sequential = [run(i) for i in range(len(jobs))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, range(len(jobs))))
    for seq, par in zip(sequential, parallel):
        assert [r.hypotheses for r in seq] == [r.hypotheses for r in par]
        assert [r.scores for r in seq] == [r.scores for r in par]


def test_reference_round_bfloat16_rounds_exact_ties_to_even(rng):
    # random float32s almost never sit on a tie (low 16 bits 0x8000), so the comparison with
    # the kernel above does not reach the oracle's tie rule: ties of both parities, both signs
    high = rng.integers(0, 0x7F7F, 4000, dtype=np.uint32)
    sign = rng.integers(0, 2, 4000, dtype=np.uint32) << 31
    ties = ((high << 16) | 0x8000 | sign).view(F32)
    assert np.array_equal(_bits(ref.round_bfloat16(ties)), _bits(round_bfloat16(ties)))
    assert ref.round_bfloat16(np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)],
                                       F32)).tolist() == [1.0, 1 + 2 ** -6, -1.0]
