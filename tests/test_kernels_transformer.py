# SPDX-License-Identifier: Apache-2.0
"""The compiled Transformer decoding step (attncore.kernels._transformer.DecoderStep).

Its reference here is the same step composed from the public kernels in Python (packed
``linear``, decode ``attention`` on the cache, ``layer_norm``, ``relu``/``gelu``,
``log_softmax``): the compiled step runs those very C kernels in the same order, so the two must
agree bit for bit. (The engine's agreement with the trainer and with PyTorch, its thread-count
independence and concurrent use are in test_engine_transformer.py.) Also: the step's own guards
turn inconsistent arguments into ValueError before any C code runs."""
import math

import numpy as np
import pytest

from attncore import kernels
from attncore.models.transformer import Transformer
from attncore.train.transformer import Transformer as Trainer
from attncore.train.transformer import TransformerConfig

SRC_VOCAB, TGT_VOCAB = 17, 19


def _engine(**overrides) -> Transformer:
    base = dict(kind="encoder_decoder", src_vocab_size=SRC_VOCAB, tgt_vocab_size=TGT_VOCAB,
                d_model=32, num_heads=4, dim_feedforward=48, num_encoder_layers=1,
                num_decoder_layers=2, max_positions=40, dtype="float32")
    base.update(overrides)
    config = TransformerConfig(**base)
    return Transformer(config.to_dict(), Trainer(config, seed=3).state_dict())


def _composed_step(model: Transformer, state, tokens: np.ndarray):
    """One decoding step from the public kernels, in place on state's caches."""
    positions = state.lengths
    batch, rows = len(tokens), np.arange(len(tokens))
    x = kernels.embedding(model.tgt_embedding, tokens)
    if model.embed_scale is not None:
        x *= np.float32(model.embed_scale)
    x += model.tgt_positions[positions]
    kv_lengths = positions + 1
    heads, head_dim, weights = model.num_heads, model.head_dim, None

    def sublayer(x, norm, fn):
        if model.norm_first:
            return x + fn(kernels.layer_norm(x, norm[0], norm[1], model.eps))
        return kernels.layer_norm(x + fn(x), norm[0], norm[1], model.eps)

    for index, layer in enumerate(model.decoder_layers):
        step, norms = layer.packed, layer.norms

        def self_attention(h):
            qkv = kernels.linear(h, step.self_qkv, layer.self_attn.qkv_bias)
            qkv = qkv.reshape(batch, 3, heads, head_dim)
            state.self_k[index][rows, :, positions] = qkv[:, 1]
            state.self_v[index][rows, :, positions] = qkv[:, 2]
            q = np.ascontiguousarray(qkv[:, 0]).reshape(batch, heads, 1, head_dim)
            out = kernels.attention(q, state.self_k[index], state.self_v[index],
                                    kv_lengths=kv_lengths)
            return kernels.linear(out.reshape(batch, -1), step.self_out, layer.self_attn.out_bias)

        def cross_attention(h):
            # the last layer's weights are returned: that layer runs the weights kernel
            nonlocal weights
            q = kernels.linear(h, step.cross_q, layer.cross.q_bias).reshape(batch, heads, 1, head_dim)
            out = kernels.attention(q, state.cross_k[index], state.cross_v[index],
                                    kv_lengths=state.src_lengths,
                                    return_weights=index == len(model.decoder_layers) - 1)
            if isinstance(out, tuple):
                out, weights = out
            return kernels.linear(out.reshape(batch, -1), step.cross_out, layer.cross.out_bias)

        def feedforward(h):
            hidden = kernels.linear(h, step.linear1, layer.linear1_bias)
            hidden = kernels.gelu(hidden) if model.gelu else kernels.relu(hidden)
            return kernels.linear(hidden, step.linear2, layer.linear2_bias)

        x = sublayer(x, norms[0], self_attention)
        if layer.cross is not None:
            x = sublayer(x, norms[1], cross_attention)
        x = sublayer(x, norms[-1], feedforward)
    state.lengths = kv_lengths
    if model.decoder_norm is not None:
        x = kernels.layer_norm(x, model.decoder_norm[0], model.decoder_norm[1], model.eps)
    log_probs = kernels.log_softmax(kernels.linear(x, model.output_step, model.output_bias))
    return log_probs, None if weights is None else weights[:, :, 0]


@pytest.mark.parametrize("overrides", [
    dict(norm_first=False),
    dict(norm_first=True, activation="gelu", final_norm=True),
    dict(norm_first=False, scale_embedding=False, tie_embeddings=True),
    dict(kind="decoder_only", norm_first=True),
], ids=["post-norm", "pre-norm-gelu", "unscaled-tied", "decoder-only"])
@pytest.mark.parametrize("batch", [1, 3, 20])   # 20 rows: the products leave the panel kernel
def test_compiled_step_equals_the_kernel_composition_bit_for_bit(overrides, batch):
    model = _engine(**overrides)
    rng = np.random.default_rng(batch)
    vocab = SRC_VOCAB if model.kind == "encoder_decoder" else TGT_VOCAB
    sources = [rng.integers(3, vocab, n) for n in rng.integers(1, 9, batch)]
    compiled, composed = model._start(sources, 6), model._start(sources, 6)
    if model.kind == "decoder_only":
        model._step(compiled, None)
        model._step(composed, None)
    for _ in range(5):  # ragged positions for decoder-only prompts, lockstep otherwise
        tokens = rng.integers(0, TGT_VOCAB, batch).astype(np.int64)
        got, got_weights = model._step(compiled, tokens)
        want, want_weights = _composed_step(model, composed, tokens)
        np.testing.assert_array_equal(got, want)
        if want_weights is None:
            assert got_weights is None
        else:
            np.testing.assert_array_equal(got_weights, want_weights)
    np.testing.assert_array_equal(compiled.lengths, composed.lengths)
    for a, b in zip(compiled.self_k, composed.self_k):
        for row, length in enumerate(compiled.lengths):
            np.testing.assert_array_equal(a[row, :, :length], b[row, :, :length])


def _step_arguments(model, batch=2, capacity=8):
    state = model._start([np.array([3, 4, 5])] * batch, capacity)
    return dict(tokens=np.zeros(batch, np.int64), positions=np.zeros(batch, np.int64),
                k_caches=state.self_k, v_caches=state.self_v, cross_k=state.cross_k,
                cross_v=state.cross_v, src_lengths=state.src_lengths,
                log_probs=np.empty((batch, TGT_VOCAB), np.float32),
                weights=None, num_threads=1)


@pytest.mark.parametrize("change,message", [
    (dict(tokens=np.array([0, TGT_VOCAB])), r"tokens\[1\] = 19 is outside \[0, 19\)"),
    (dict(tokens=np.array([-1, 0])), r"tokens\[0\] = -1"),
    (dict(positions=np.array([0, 8])), r"positions\[1\] = 8 is outside \[0, 8\)"),
    (dict(positions=np.array([0])), "disagree"),
    (dict(log_probs=np.empty((2, 5), np.float32)), "disagree"),
    (dict(k_caches=[]), "one array per layer"),
    (dict(cross_k=None), "required with cross-attention"),
    (dict(src_lengths=np.array([3, 4])), r"src_lengths\[1\] is outside \[0, 3\]"),
    (dict(weights=np.empty((2, 4, 2), np.float32)), r"weights must have shape \(2, 4, 3\)"),
])
def test_step_rejects_inconsistent_arguments(change, message):
    model = _engine()
    arguments = _step_arguments(model)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        model._decoder_step.step(*arguments.values())


def test_step_rejects_caches_of_the_wrong_shape():
    model = _engine()
    arguments = _step_arguments(model)
    arguments["v_caches"] = [arguments["v_caches"][0], arguments["v_caches"][1][:, :, :4].copy()]
    with pytest.raises(ValueError, match=r"every KV cache must have shape \(2, 4, 8, 8\)"):
        model._decoder_step.step(*arguments.values())
    arguments = _step_arguments(model)
    arguments["cross_v"] = [arguments["cross_v"][0], arguments["cross_v"][1][:1].copy()]
    with pytest.raises(ValueError, match=r"every cross K/V array must have shape"):
        model._decoder_step.step(*arguments.values())


def test_constructor_rejects_weights_that_do_not_fit():
    from attncore.kernels._transformer import DecoderStep
    model = _engine()
    layer = model.decoder_layers[0]
    step = layer.packed
    good = dict(norms=layer.norms, self_qkv=(step.self_qkv, None), self_out=(step.self_out, None),
                cross_q=(step.cross_q, None), cross_out=(step.cross_out, None),
                linear1=(step.linear1, None), linear2=(step.linear2, None))
    common = dict(d_model=32, num_heads=4, dim_feedforward=48, norm_first=False, gelu=False,
                  eps=1e-5, embed_scale=None, attention_scale=1 / math.sqrt(8), decode_chunk=256,
                  small_gemm_macs=0,
                  embedding=model.tgt_embedding, positions=model.tgt_positions, final_norm=None,
                  output=model.output_step, output_bias=model.output_bias)
    DecoderStep(**common, layers=[good])                               # consistent: builds
    with pytest.raises(ValueError, match=r"layers\[0\].linear1 must have shape \(64, 32\)"):
        DecoderStep(**{**common, "dim_feedforward": 64}, layers=[good])
    with pytest.raises(ValueError, match="every layer has cross-attention or none"):
        DecoderStep(**common, layers=[good, {**good, "cross_q": None, "cross_out": None}])
    with pytest.raises(ValueError, match="multiple of num_heads"):
        DecoderStep(**{**common, "num_heads": 5}, layers=[good])
    with pytest.raises(ValueError, match=r"layers\[0\].self_out bias must be a C-contiguous float32"):
        DecoderStep(**common, layers=[{**good, "self_out": (step.self_out, np.zeros(32))}])
    with pytest.raises(ValueError, match="at least one decoder layer"):
        DecoderStep(**common, layers=[])
    # (built without bounds checks, these read past a short tuple or a 0-d shape: a crash)
    for change in (dict(embedding=None), dict(positions=np.float32(1)),
                   dict(final_norm=("gamma",))):
        with pytest.raises(ValueError, match="DecoderStep: "):
            DecoderStep(**{**common, **change}, layers=[good])
    with pytest.raises(ValueError, match=r"DecoderStep: layers\[0\].linear1 must be a pair"):
        DecoderStep(**common, layers=[{**good, "linear1": (step.linear1,)}])


# -- the KV cache gather of beam search -----------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("filled", [0, 1, 37, 40])
def test_gather_cache_prefix_copies_the_rows_prefix(threads, filled):
    from attncore.kernels import _transformer
    rng = np.random.default_rng(filled)
    # 64 x 8 x 40 x 64 floats: past the 1 MiB at which the second thread joins
    cache = rng.standard_normal((16, 8, 40, 64)).astype(np.float32)
    rows = rng.integers(0, 16, size=64)          # repeats, drops and reorders rows
    out = np.full((64, 8, 40, 64), np.nan, np.float32)
    _transformer.gather_cache_prefix(cache, rows, filled, out, threads)
    np.testing.assert_array_equal(out[:, :, :filled], cache[rows, :, :filled])
    assert np.isnan(out[:, :, filled:]).all(), "positions past filled are left alone"


def test_gather_cache_prefix_rejects_what_would_touch_foreign_memory():
    from attncore.kernels import _transformer
    cache = np.zeros((3, 2, 5, 4), np.float32)
    out = np.zeros((2, 2, 5, 4), np.float32)
    gather = _transformer.gather_cache_prefix
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\), got 3"):
        gather(cache, np.array([0, 3]), 5, out, 1)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\), got -1"):
        gather(cache, np.array([-1, 0]), 5, out, 1)
    with pytest.raises(ValueError, match=r"filled must lie in \[0, 5\], got 6"):
        gather(cache, np.array([0, 1]), 6, out, 1)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 2, 5, 4\)"):
        gather(cache, np.array([0, 1]), 5, np.zeros((2, 2, 4, 4), np.float32), 1)
    with pytest.raises(ValueError, match="out must not overlap cache"):
        gather(cache, np.array([0, 1, 2]), 5, cache, 1)
    with pytest.raises(ValueError, match="out must not overlap cache"):
        gather(cache, np.array([0, 1]), 5, cache[1:], 1)
