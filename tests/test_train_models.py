"""Trainer models: gradients, step API vs teacher forcing, and parity with PyTorch formulations.

The PyTorch versions below are written independently from the equations of d2l.ai
(Bahdanau decoder), OpenNMT-py (Luong input-feed decoder) and ``torch.nn.Transformer``.
"""

import math

import numpy as np
import pytest

from attncore.train import autograd as ag
from attncore.train.gradcheck import gradcheck_module
from attncore.train.seq2seq import Seq2SeqAttention, Seq2SeqConfig
from attncore.train.transformer import Transformer, TransformerConfig, sinusoidal_positions

SRC = np.array([[4, 5, 6, 7, 2], [6, 4, 2, 0, 0], [5, 2, 0, 0, 0]])
SRC_LENGTHS = np.array([5, 3, 2])
TGT_IN = np.array([[1, 4, 5, 6], [1, 6, 4, 0], [1, 5, 0, 0]])
LABELS = np.array([[4, 5, 6, 2], [6, 4, 2, 0], [5, 2, 0, 0]])


def _seq2seq(dtype="float64", seed=3, **overrides):
    fields = dict(src_vocab_size=8, tgt_vocab_size=7, embed_dim=3, hidden_size=4, dtype=dtype)
    fields.update(overrides)
    return Seq2SeqAttention(Seq2SeqConfig(**fields), seed=seed)


def _transformer(kind="encoder_decoder", dtype="float64", seed=3, **overrides):
    fields = dict(kind=kind, src_vocab_size=8, tgt_vocab_size=7, d_model=4, num_heads=2, num_encoder_layers=1,
                  num_decoder_layers=2, dim_feedforward=6, num_classes=3, dtype=dtype)
    fields.update(overrides)
    model = Transformer(TransformerConfig(**fields), seed=seed)
    for name, p in model.named_parameters().items():  # zero-initialised biases would hide gradient errors
        if name.endswith("bias"):
            p.data += np.random.default_rng(len(name)).standard_normal(p.shape) * 0.1
    return model


SEQ2SEQ_VARIANTS = [
    dict(rnn_type="gru", attention="bahdanau"),
    dict(rnn_type="lstm", attention="bahdanau", num_layers=2),
    dict(rnn_type="lstm", attention="luong_general", input_feeding=True, bidirectional=True),
    dict(rnn_type="gru", attention="luong_dot"),
    dict(rnn_type="gru", attention="luong_concat", input_feeding=True, num_layers=2, attention_dim=3),
]

TRANSFORMER_VARIANTS = [
    dict(kind="encoder_decoder", norm_first=False),
    dict(kind="encoder_decoder", norm_first=True, activation="gelu", fused_qkv=False, tie_embeddings=True),
    dict(kind="decoder_only", norm_first=True, positions="learned", max_positions=8),
    dict(kind="encoder_only", pooling="mean"),
    dict(kind="encoder_only", pooling="first", norm_first=True, attention_bias=False),
]


def _name(variant):
    return "-".join(f"{k}={v}" for k, v in variant.items())


def _transformer_loss(model):
    kind = model.config.kind
    if kind == "encoder_only":
        return ag.cross_entropy(model(SRC, SRC_LENGTHS), np.array([0, 2, 1]))
    if kind == "decoder_only":
        return ag.cross_entropy(model(TGT_IN, np.array([4, 3, 2])), LABELS, ignore_index=0)
    return ag.cross_entropy(model(SRC, SRC_LENGTHS, TGT_IN), LABELS, ignore_index=0, label_smoothing=0.1)


# -- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", SEQ2SEQ_VARIANTS, ids=_name)
def test_seq2seq_parameter_gradients(variant):
    model = _seq2seq(**variant)
    checked = gradcheck_module(
        model, lambda m: ag.cross_entropy(m(SRC, SRC_LENGTHS, TGT_IN), LABELS, ignore_index=0, label_smoothing=0.1),
        entries_per_parameter=2)
    assert checked >= 2 * len(model.parameters())


@pytest.mark.parametrize("variant", TRANSFORMER_VARIANTS, ids=_name)
def test_transformer_parameter_gradients(variant):
    model = _transformer(**variant)
    gradcheck_module(model, _transformer_loss, entries_per_parameter=2)


# -- step API ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", SEQ2SEQ_VARIANTS, ids=_name)
def test_seq2seq_decode_steps_equal_teacher_forcing(variant):
    model = _seq2seq(**variant)
    logits, attention = model.forward(SRC, SRC_LENGTHS, TGT_IN, return_attention=True)
    state = model.encode(SRC, SRC_LENGTHS)
    for t in range(TGT_IN.shape[1]):
        step_logits, state, weights = model.decode_step(state, TGT_IN[:, t])
        np.testing.assert_array_equal(step_logits.data, logits.data[:, t])
        np.testing.assert_array_equal(weights.data, attention.data[:, t])
    # Attention never lands on padding and sums to one over the real source positions.
    valid = np.arange(SRC.shape[1])[None, None, :] < SRC_LENGTHS[:, None, None]
    assert np.all(attention.data[~np.broadcast_to(valid, attention.shape)] == 0)
    np.testing.assert_allclose(attention.data.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("variant", [v for v in TRANSFORMER_VARIANTS if v["kind"] == "encoder_decoder"], ids=_name)
def test_transformer_decode_steps_equal_teacher_forcing(variant):
    model = _transformer(**variant)
    logits = model(SRC, SRC_LENGTHS, TGT_IN)
    state = model.encode(SRC, SRC_LENGTHS)
    for t in range(TGT_IN.shape[1]):
        step_logits, state, weights = model.decode_step(state, TGT_IN[:, t])
        np.testing.assert_allclose(step_logits.data, logits.data[:, t], rtol=1e-12, atol=1e-12)
        assert weights.shape == (3, 2, SRC.shape[1])
        assert np.all(weights.data[2, :, 2:] == 0)  # padded source positions of row 2


def test_decoder_only_generate_continues_the_prompt_like_teacher_forcing():
    model = _transformer(kind="decoder_only", norm_first=True)
    prompt = np.array([[1, 4, 5], [1, 6, 6]])
    generated = model.generate(prompt, max_new_tokens=4)
    assert generated.shape[0] == 2 and 1 <= generated.shape[1] <= 4
    # every generated token is the teacher-forced argmax after the prompt and the tokens before
    # it (until the row's EOS; pad after it)
    for step in range(generated.shape[1]):
        sequence = np.concatenate([prompt, generated[:, :step]], axis=1)
        with ag.no_grad():
            logits = model(sequence)
        running = ~np.any(generated[:, :step] == model.config.eos_id, axis=1)
        np.testing.assert_array_equal(logits.data[running, -1].argmax(-1),
                                      generated[running, step])


@pytest.mark.parametrize("make", [lambda: _seq2seq(attention="luong_general", input_feeding=True),
                                  lambda: _transformer()], ids=["seq2seq", "transformer"])
def test_greedy_decode_matches_stepwise_argmax(make):
    model = make()
    tokens = model.greedy_decode(SRC, SRC_LENGTHS, max_len=6)
    assert tokens.dtype == np.int64 and tokens.shape[0] == 3 and tokens.shape[1] <= 6
    with ag.no_grad():
        logits = model(SRC, SRC_LENGTHS, np.concatenate([np.ones((3, 1), np.int64), tokens[:, :-1]], axis=1))
    first_eos = [list(row).index(2) if 2 in row else len(row) - 1 for row in tokens]
    for row, stop in enumerate(first_eos):
        np.testing.assert_array_equal(logits.data[row, : stop + 1].argmax(-1), tokens[row, : stop + 1])
        assert np.all(tokens[row, stop + 1:] == 0)


def test_empty_source_gives_finite_outputs():
    for model in (_seq2seq(), _transformer()):
        logits = model(SRC, np.array([5, 0, 2]), TGT_IN)
        assert np.all(np.isfinite(logits.data))


@pytest.mark.parametrize("make", [lambda: _seq2seq(dtype="float32"), lambda: _transformer(dtype="float32")],
                         ids=["seq2seq", "transformer"])
def test_float32_models_compute_in_float32(make):
    model = make()
    loss = ag.cross_entropy(model(SRC, SRC_LENGTHS, TGT_IN), LABELS, ignore_index=0)
    assert loss.dtype == np.float32
    loss.backward()
    assert all(p.grad.dtype == np.float32 for p in model.parameters())


def test_dropout_is_seeded_and_off_in_eval():
    model = _seq2seq(dropout=0.3)
    first = model(SRC, SRC_LENGTHS, TGT_IN).data
    second = model(SRC, SRC_LENGTHS, TGT_IN).data
    assert not np.array_equal(first, second)  # masks differ between steps
    again = _seq2seq(dropout=0.3)
    np.testing.assert_array_equal(again(SRC, SRC_LENGTHS, TGT_IN).data, first)  # same seed, same masks
    model.eval()
    np.testing.assert_array_equal(model(SRC, SRC_LENGTHS, TGT_IN).data, model(SRC, SRC_LENGTHS, TGT_IN).data)


# -- parity with independent PyTorch formulations -------------------------------------------------

def _torch_weights(torch, model):
    return {k: torch.tensor(v) for k, v in model.state_dict().items()}


def test_bahdanau_matches_d2l_decoder_in_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    model = _seq2seq(rnn_type="gru", attention="bahdanau", num_layers=2, packed_source=False)
    w = _torch_weights(torch, model)

    def gru(prefix, input_size):
        layer = torch.nn.GRU(input_size, 4, 2, batch_first=True).double()
        layer.load_state_dict({k[len(prefix) + 1:]: v for k, v in w.items() if k.startswith(prefix + ".")})
        return layer

    encoder, decoder = gru("encoder.rnn", 3), gru("decoder.rnn", 3 + 4)
    with torch.no_grad():
        memory, state = encoder(F.embedding(torch.tensor(SRC), w["encoder.embedding.weight"]))
        keys = memory @ w["decoder.attention.key.weight"].T
        outputs = []
        for t in range(TGT_IN.shape[1]):
            query = state[-1]                                           # previous top hidden state
            features = torch.tanh((query @ w["decoder.attention.query.weight"].T)[:, None] + keys)
            scores = (features @ w["decoder.attention.score.weight"].T)[..., 0]
            scores[torch.arange(5)[None] >= torch.tensor(SRC_LENGTHS)[:, None]] = -1e6  # d2l masked_softmax
            context = (F.softmax(scores, -1)[:, None] @ memory)[:, 0]
            x = torch.cat([context, F.embedding(torch.tensor(TGT_IN[:, t]), w["decoder.embedding.weight"])], -1)
            output, state = decoder(x[:, None], state)
            outputs.append(output[:, 0] @ w["decoder.output.weight"].T + w["decoder.output.bias"])
    np.testing.assert_allclose(model(SRC, SRC_LENGTHS, TGT_IN).data, torch.stack(outputs, 1).numpy(),
                               rtol=1e-10, atol=1e-12)


def test_luong_input_feeding_matches_opennmt_decoder_in_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    model = _seq2seq(rnn_type="lstm", attention="luong_general", input_feeding=True, bidirectional=True)
    w = _torch_weights(torch, model)
    encoder = torch.nn.LSTM(3, 2, 1, batch_first=True, bidirectional=True).double()
    encoder.load_state_dict({k[12:]: v for k, v in w.items() if k.startswith("encoder.rnn.")})
    decoder = torch.nn.LSTM(3 + 4, 4, 1, batch_first=True).double()
    decoder.load_state_dict({k[12:]: v for k, v in w.items() if k.startswith("decoder.rnn.")})
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            F.embedding(torch.tensor(SRC), w["encoder.embedding.weight"]), torch.tensor(SRC_LENGTHS),
            batch_first=True, enforce_sorted=False)
        memory, (h, c) = encoder(packed)
        memory, _ = torch.nn.utils.rnn.pad_packed_sequence(memory, batch_first=True, total_length=5)
        # OpenNMT brnn: concatenate the two directions' final states -> (layers, B, H)
        state = (torch.cat([h[0::2], h[1::2]], -1), torch.cat([c[0::2], c[1::2]], -1))
        feed = torch.zeros(3, 4, dtype=torch.float64)
        pad = torch.arange(5)[None] >= torch.tensor(SRC_LENGTHS)[:, None]
        outputs = []
        for t in range(TGT_IN.shape[1]):
            x = torch.cat([F.embedding(torch.tensor(TGT_IN[:, t]), w["decoder.embedding.weight"]), feed], -1)
            output, state = decoder(x[:, None], state)
            h_t = output[:, 0]                                          # current top hidden state
            scores = (memory @ (h_t @ w["decoder.attention.linear_in.weight"].T)[:, :, None])[..., 0]
            scores = scores.masked_fill(pad, -math.inf)
            context = (F.softmax(scores, -1)[:, None] @ memory)[:, 0]
            feed = torch.tanh(torch.cat([context, h_t], -1) @ w["decoder.attention.output.weight"].T)
            outputs.append(feed @ w["decoder.output.weight"].T + w["decoder.output.bias"])
    np.testing.assert_allclose(model(SRC, SRC_LENGTHS, TGT_IN).data, torch.stack(outputs, 1).numpy(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch nested-tensor notices
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_matches_torch_nn_transformer(norm_first, activation):
    torch = pytest.importorskip("torch")
    model = _transformer(norm_first=norm_first, activation=activation, final_norm=True, num_encoder_layers=2)
    reference = torch.nn.Transformer(d_model=4, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                                     dim_feedforward=6, dropout=0.0, activation=activation, batch_first=True,
                                     norm_first=norm_first).double().eval()
    w = _torch_weights(torch, model)
    reference.load_state_dict({k: v for k, v in w.items() if k.startswith(("encoder.", "decoder."))})

    def embed(ids, table):  # Vaswani input: sqrt(d) * E[ids] + sinusoid
        positions = np.arange(ids.shape[1])[:, None] / 10000 ** (2 * (np.arange(4) // 2) / 4)
        sinusoid = np.where(np.arange(4) % 2 == 0, np.sin(positions), np.cos(positions))
        return table[torch.tensor(ids)] * 2.0 + torch.tensor(sinusoid)

    pad = torch.tensor(np.arange(5)[None] >= SRC_LENGTHS[:, None])
    with torch.no_grad():
        out = reference(embed(SRC, w["src_embedding.weight"]), embed(TGT_IN, w["tgt_embedding.weight"]),
                        tgt_mask=reference.generate_square_subsequent_mask(4, dtype=torch.float64),
                        src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
        expected = out @ w["output.weight"].T + w["output.bias"]
    np.testing.assert_allclose(model(SRC, SRC_LENGTHS, TGT_IN).data, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_decoder_only_matches_torch_causal_encoder_stack():
    torch = pytest.importorskip("torch")
    model = _transformer(kind="decoder_only", norm_first=True, final_norm=True, positions="learned", max_positions=8,
                         scale_embedding=False, tie_embeddings=True)
    layer = torch.nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True, norm_first=True)
    stack = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(4), enable_nested_tensor=False)
    stack = stack.double().eval()
    w = _torch_weights(torch, model)
    stack.load_state_dict({"layers" + k[len("decoder.layers"):] if k.startswith("decoder.layers") else k[8:]: v
                           for k, v in w.items() if k.startswith("decoder.")})
    ids = torch.tensor(TGT_IN)
    with torch.no_grad():
        x = w["tgt_embedding.weight"][ids] + w["tgt_position.weight"][:4]
        hidden = stack(x, mask=torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64),
                       is_causal=True)
        expected = hidden @ w["tgt_embedding.weight"].T + w["output.bias"]
    np.testing.assert_allclose(model(TGT_IN).data, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_encoder_only_pooling():
    model = _transformer(kind="encoder_only", pooling="mean")
    memory, valid = model.encode_memory(SRC, SRC_LENGTHS)
    pooled = np.stack([memory.data[b, : SRC_LENGTHS[b]].mean(0) for b in range(3)])
    expected = pooled @ model.classifier.weight.data.T + model.classifier.bias.data
    np.testing.assert_allclose(model(SRC, SRC_LENGTHS).data, expected, rtol=1e-12)
    model.config.pooling = "first"
    expected = memory.data[:, 0] @ model.classifier.weight.data.T + model.classifier.bias.data
    np.testing.assert_allclose(model(SRC, SRC_LENGTHS).data, expected, rtol=1e-12)


def test_sinusoidal_positions_follow_vaswani():
    table = sinusoidal_positions(6, 8)
    assert np.array_equal(table[0], np.tile([0.0, 1.0], 4))
    np.testing.assert_allclose(table[3, 2], math.sin(3 / 10000 ** (2 / 8)))
    np.testing.assert_allclose(table[3, 3], math.cos(3 / 10000 ** (2 / 8)))


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="attention"):
        Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=5, attention="cosine")
    with pytest.raises(ValueError, match="even hidden_size"):
        Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=5, hidden_size=5, bidirectional=True)
    with pytest.raises(ValueError, match="not divisible"):
        TransformerConfig(src_vocab_size=5, tgt_vocab_size=5, d_model=6, num_heads=4)


# -- `attncore train` true/false model options -------------------------------------------------

TINY_CLI = {"seq2seq": ["--embed-dim", "4", "--hidden-size", "4"],
            "transformer": ["--d-model", "8", "--num-heads", "2", "--dim-feedforward", "8",
                            "--num-encoder-layers", "1", "--num-decoder-layers", "1"],
            "ran": ["--d-model", "8", "--num-heads", "2", "--head-size", "4", "--window-size", "4",
                    "--min-window-size", "2", "--num-layers", "1"]}


@pytest.mark.parametrize("arch, option, value, key, expected", [
    ("seq2seq-bahdanau", "--bidirectional", "true", "bidirectional", True),
    ("seq2seq-luong", "--input-feeding", "no", "input_feeding", False),   # (luong's default: on)
    ("transformer-prenorm", "--norm-first", "OFF", "norm_first", False),
    ("transformer", "--tie-embeddings", "1", "tie_embeddings", True),
    ("ran-lm", "--memory-review", "False", "memory_review", False),
])
def test_train_cli_true_false_options_reach_the_config(tmp_path, capsys, arch, option, value, key,
                                                       expected):
    import json

    from attncore.train.cli import main as train_main
    args = ["copy", "--arch", arch, "--steps", "1", "--batch-size", "4", "--no-progress",
            "--task-option", "num_train=16", *TINY_CLI[arch.split("-")[0]]]
    assert train_main([*args, "--out", str(tmp_path / "m"), option, value]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())[key] is expected
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    with pytest.raises(SystemExit) as info:
        train_main([*args, "--out", str(tmp_path / "n"), option, "maybe"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"argument {option}: expected true/false, got 'maybe'" in err
    assert not (tmp_path / "n").exists()
