# SPDX-License-Identifier: Apache-2.0
"""The compiled recurrent kernels (attncore.kernels._recurrent) against the trainer's NumPy
forward pass (attncore.train.seq2seq / layers.RNN) on random float32 weights.

Tolerance: 1e-5 absolute on log-probabilities and states of order 1, a few float32 roundings
through 2-3 small GEMMs per step (the trainer's float32 forward is the reference)."""
import numpy as np
import pytest

from attncore.kernels import AdditiveKeys, PackedLinearWeight, _recurrent
from attncore.train import autograd as ag
from attncore.train.layers import RNN
from attncore.train.seq2seq import Seq2SeqAttention, Seq2SeqConfig

ATOL = 1e-5


def _decoder_step(model, small_gemm_macs=0):
    """A DecoderStep from a trainer model's weights."""
    c, d = model.config, model.decoder
    rnn = d.rnn
    per = lambda name: [getattr(rnn, f"{name}_l{k}").data for k in range(c.num_layers)]  # noqa
    att = d.attention
    get = lambda mod, name: getattr(mod, name).weight.data if hasattr(mod, name) else None  # noqa
    return _recurrent.DecoderStep(
        c.attention, c.rnn_type == "lstm", c.input_feeding, d.embedding.weight.data,
        per("weight_ih"), per("weight_hh"), per("bias_ih"), per("bias_hh"),
        get(att, "query"), get(att, "score"), get(att, "linear_in"), get(att, "output"),
        d.output.weight.data, d.output.bias.data, small_gemm_macs)


@pytest.mark.parametrize("rnn_type", ["gru", "lstm"])
@pytest.mark.parametrize("attention,input_feeding", [
    ("bahdanau", False), ("luong_dot", False), ("luong_dot", True), ("luong_general", True),
    ("luong_concat", False), ("luong_concat", True)])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("repeat", [1, 5], ids=["4rows", "20rows"])  # 20: BLAS on the panels
def test_decoder_step_matches_trainer(rnn_type, attention, input_feeding, num_layers, repeat):
    config = Seq2SeqConfig(src_vocab_size=23, tgt_vocab_size=19, embed_dim=6, hidden_size=10,
                           num_layers=num_layers, rnn_type=rnn_type, attention=attention,
                           attention_dim=7 if attention in ("bahdanau", "luong_concat") else 0,
                           input_feeding=input_feeding)
    model = Seq2SeqAttention(config, seed=3)
    model.eval()
    rng = np.random.default_rng(1)
    lengths = np.tile([5, 1, 0, 3], repeat)
    B, S, H, L = len(lengths), 5, 10, num_layers
    src = rng.integers(4, 23, size=(B, 5))
    src[np.arange(5)[None] >= lengths[:, None]] = 0
    # with 20 rows, BLAS products under the small-matrix size limit (K in accumulated chunks)
    step = _decoder_step(model, small_gemm_macs=10 ** 6 if repeat > 1 else 0)
    with ag.no_grad():
        state = model.encode(src, lengths)
        memory = np.ascontiguousarray(state.memory.data, dtype=np.float32)
        keys = (np.ascontiguousarray(state.projected_keys.data) if state.projected_keys is not None
                else np.zeros((B, S, 0), np.float32))
        # additive scores: the key factors as the engine keeps them (every step takes the split)
        factors, in_limit = None, None
        if keys.shape[2]:
            cached = AdditiveKeys(keys)
            factors, in_limit = cached.factors, cached.in_limit.view(np.uint8)
        tops = [RNN.top(e).data for e in state.rnn_state]
        h = np.ascontiguousarray(np.stack(tops), dtype=np.float32)
        cell = (np.ascontiguousarray(np.stack([e[1].data for e in state.rnn_state]))
                if rnn_type == "lstm" else np.zeros((L, B, H), np.float32))
        feed = np.zeros((B, H), np.float32)
        log_probs = np.empty((B, 19), np.float32)
        weights = np.empty((B, S), np.float32)
        scratch = np.empty(B * step.scratch_width, np.float32)
        tokens = np.ones(B, dtype=np.int64)
        for t in range(4):
            logits, state, want_w = model.decode_step(state, tokens)
            step.step(tokens, h, cell, feed, memory, keys, factors, in_limit, lengths, log_probs,
                      weights, scratch, 2)
            shifted = logits.data - logits.data.max(-1, keepdims=True)
            want = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            np.testing.assert_allclose(log_probs, want, atol=ATOL, err_msg=f"step {t}")
            np.testing.assert_allclose(weights, want_w.data, atol=ATOL, err_msg=f"step {t}")
            np.testing.assert_allclose(h, np.stack([RNN.top(e).data for e in state.rnn_state]),
                                       atol=ATOL)
            tokens = rng.integers(0, 19, size=B)


@pytest.mark.parametrize("rnn_type", ["gru", "lstm"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_scan_matches_trainer_rnn(rnn_type, packed, bidirectional):
    rng = np.random.default_rng(0)
    rnn = RNN(rnn_type, 5, 8, 2, rng, bidirectional=bidirectional, dtype=np.float32)
    x = rng.standard_normal((3, 6, 5)).astype(np.float32)
    lengths = np.array([6, 2, 0])
    with ag.no_grad():
        want_out, want_final = rnn(ag.Tensor(x), lengths, packed=packed)
    dirs = 2 if bidirectional else 1
    layer_in = x
    finals = []
    for layer in range(2):
        outs = []
        for d, suffix in enumerate([f"_l{layer}", f"_l{layer}_reverse"][:dirs]):
            w_ih = getattr(rnn, "weight_ih" + suffix).data
            b_ih = getattr(rnn, "bias_ih" + suffix).data
            x_proj = np.ascontiguousarray(layer_in @ w_ih.T + b_ih, dtype=np.float32)
            h = np.zeros((3, 8), np.float32)
            c = np.zeros((3, 8), np.float32)
            out = np.empty((3, 6, 8), np.float32)
            w_hh = PackedLinearWeight(getattr(rnn, "weight_hh" + suffix).data).panels
            _recurrent.rnn_scan(x_proj, w_hh, getattr(rnn, "bias_hh" + suffix).data, lengths,
                                packed, d == 1, rnn_type == "lstm", h, c, out, 0, 2)
            outs.append(out)
            finals.append((h, c) if rnn_type == "lstm" else h)
        layer_in = np.concatenate(outs, axis=-1)
    np.testing.assert_allclose(layer_in, want_out.data, atol=ATOL)
    for got, want in zip(finals, want_final):
        if rnn_type == "lstm":
            np.testing.assert_allclose(got[0], want[0].data, atol=ATOL)
            np.testing.assert_allclose(got[1], want[1].data, atol=ATOL)
        else:
            np.testing.assert_allclose(got, want.data, atol=ATOL)


def test_decoder_step_rejects_inconsistent_shapes():
    config = Seq2SeqConfig(src_vocab_size=9, tgt_vocab_size=7, embed_dim=4, hidden_size=6)
    step = _decoder_step(Seq2SeqAttention(config, seed=0))
    z = np.zeros
    with pytest.raises(ValueError, match="inconsistent shapes"):
        step.step(z(2, np.int64), z((2, 2, 6), np.float32), z((1, 2, 6), np.float32),
                  z((2, 6), np.float32), z((2, 3, 6), np.float32), z((2, 3, 6), np.float32),
                  None, None, z(2, np.int64), z((2, 7), np.float32), z((2, 3), np.float32),
                  z(2 * step.scratch_width, np.float32), 1)  # h: 2 layers for a 1-layer model
    good = (z(2, np.int64), z((1, 2, 6), np.float32), z((1, 2, 6), np.float32),
            z((2, 6), np.float32), z((2, 3, 6), np.float32), z((2, 3, 6), np.float32))
    rest = (z(2, np.int64), z((2, 7), np.float32), z((2, 3), np.float32),
            z(2 * step.scratch_width, np.float32), 1)
    with pytest.raises(ValueError, match="inconsistent shapes"):  # factors of other keys
        step.step(*good, z((2, 2, 6), np.float32), z((2, 2), np.uint8), *rest)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        step.step(*good, z((2, 3, 6), np.float32), z((2, 4), np.uint8), *rest)
    with pytest.raises(ValueError, match="att_query"):
        _recurrent.DecoderStep("bahdanau", False, False, z((7, 4)), [z((18, 10))], [z((18, 6))],
                               [z(18)], [z(18)], None, None, None, None, z((7, 6)), z(7))


def _argmax_cases(rng):
    """Arrays that probe the vector argmax: every length around the 8-lane and 16-element
    boundaries, ties across and within lanes, -inf, NaN first / last / in the tail, and a long
    vocabulary row."""
    for n in list(range(1, 40)) + [4000]:
        yield rng.standard_normal(n).astype(np.float32)
        yield rng.integers(0, 3, n).astype(np.float32)            # many ties
        yield np.full(n, -np.inf, dtype=np.float32)
        ties = np.zeros(n, dtype=np.float32)
        ties[n // 2:] = 1                                           # the first 1 must win
        yield ties
        # the AVX2 loop keeps two sets of lanes (vectors at even and odd multiples of 8): the
        # first maximum may sit in the second set with an equal one later in the first
        crossed = np.zeros(n, dtype=np.float32)
        crossed[[i for i in (9, 16, 33) if i < n]] = 1
        yield crossed
        for at in {0, n // 3, n - 1}:
            x = rng.standard_normal(n).astype(np.float32)
            x[at] = np.nan
            yield x
            x = np.full(n, -np.inf, dtype=np.float32)
            x[at] = 5
            yield x


def test_greedy_argmax_equals_numpy():
    # the compiled greedy search's argmax (ac_argmax_f32): numpy.argmax, with entry `skip`
    # (EOS before min_length) taken as -inf
    rng = np.random.default_rng(0)
    checked = 0
    for x in _argmax_cases(rng):
        assert _recurrent.argmax(x) == np.argmax(x), x
        for skip in {0, len(x) // 2, len(x) - 1}:
            y = x.copy()
            y[skip] = -np.inf
            assert _recurrent.argmax(x, skip) == np.argmax(y), (x, skip)
            checked += 1
    assert checked > 1000
    with pytest.raises(ValueError, match="empty"):
        _recurrent.argmax(np.zeros(0, dtype=np.float32))
