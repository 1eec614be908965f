# SPDX-License-Identifier: Apache-2.0
"""bfloat16 weights: the rounding, the packed product, and models loaded with
``weight_dtype="bfloat16"``.

The contract is exact, so most checks here are bit for bit: a bfloat16 weight is the float32
weight rounded to nearest (ties to even), products convert it back exactly and run the float32
arithmetic, so a bfloat16 model is the float32 model of the rounded weights. Only the last test
measures what the rounding costs in accuracy, on the bundled trained model.
"""
import numpy as np
import pytest

import attncore
from attncore import reference as ref
from attncore.kernels import PackedLinearWeight, _blas, round_bfloat16
from attncore.kernels.threads import BLAS_SMALL_GEMM_MACS
from attncore.models import Seq2SeqAttention
from attncore.train.seq2seq import Seq2SeqConfig
from attncore.train.transformer import TransformerConfig

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


@pytest.mark.parametrize("value,error,match", [
    ("float16", ValueError, "weight_dtype"), ("int8", ValueError, "weight_dtype"),
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
