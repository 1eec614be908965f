# SPDX-License-Identifier: Apache-2.0
"""attncore.convert.from_pytorch_transformer: PyTorch state dicts -> model directories, checked by
running the trainer model loaded from the written directory against torch on the same inputs.
(The rannet converter is tested in test_convert_rannet.py, which needs no torch.)"""
import math
import re

import numpy as np
import pytest

from attncore import io
from attncore.convert import from_pytorch_transformer
from attncore.train import autograd as ag
from attncore.train.export import load_model

# float32 torch vs the float32 NumPy trainer: both O(1e-6) off exact on these tiny models.
LOGIT_ATOL = 1e-4


# ------------------------------------------------------------------------------------------
# PyTorch models
# ------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
nn = torch.nn
# nn.Transformer builds its encoder with enable_nested_tensor=True: it warns that pre-norm
# layers cannot use it, and padded inputs warn about the nested-tensor API; irrelevant here.
pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]

V_SRC, V_TGT, D, HEADS, FFN, MAX_LEN = 11, 13, 16, 4, 24, 20


def vaswani_buffer(length, dim):
    """The nn.Transformer tutorial's PositionalEncoding buffer, shape (length, 1, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, 1, dim)
    table[:, 0, 0::2] = torch.sin(position * div)
    table[:, 0, 1::2] = torch.cos(position * div)
    return table


class TorchSeq2Seq(nn.Module):
    """Embeddings + positions + nn.Transformer + generator, the tutorial's layout."""

    def __init__(self, *, norm_first, activation, learned, scale=True, bias=True):
        super().__init__()
        self.scale = math.sqrt(D) if scale else 1.0
        self.src_tok = nn.Embedding(V_SRC, D)
        self.tgt_tok = nn.Embedding(V_TGT, D)
        if learned:
            self.pos = nn.Embedding(MAX_LEN, D)
        else:
            self.register_buffer("pe", vaswani_buffer(MAX_LEN, D))
        self.transformer = nn.Transformer(D, HEADS, 2, 2, FFN, dropout=0.0, activation=activation,
                                          batch_first=True, norm_first=norm_first, bias=bias)
        self.generator = nn.Linear(D, V_TGT)

    def positions(self, length):
        return self.pos.weight[:length] if hasattr(self, "pos") else self.pe[:length, 0]

    def forward(self, src, tgt, src_pad=None):
        """src (B, S), tgt (B, T) ids; src_pad (B, S) bool, True at padding -> logits (B, T, V)."""
        x = self.src_tok(src) * self.scale + self.positions(src.shape[1])
        y = self.tgt_tok(tgt) * self.scale + self.positions(tgt.shape[1])
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.generator(self.transformer(x, y, tgt_mask=mask, tgt_is_causal=True,
                                               src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad))


class TorchStack(nn.Module):
    """An nn.TransformerEncoder stack as a causal LM (decoder_only) or a classifier (encoder_only)."""

    def __init__(self, *, causal, norm_first=True, activation="gelu", classes=5):
        super().__init__()
        self.causal = causal
        self.tok = nn.Embedding(V_TGT, D)
        self.pos = nn.Embedding(MAX_LEN, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, activation=activation,
                                           batch_first=True, norm_first=norm_first)
        self.blocks = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
        self.head = nn.Linear(D, V_TGT if causal else classes)

    def forward(self, ids):
        x = self.tok(ids) + self.pos.weight[:ids.shape[1]]
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
            return self.head(self.blocks(x, mask=mask, is_causal=True))
        return self.head(self.blocks(x).mean(dim=1))


def randomise(model, seed=0):
    """Perturb every parameter (norms and biases included) so that each one is tested."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def numpy_state(model):
    return {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}


SEQ2SEQ_NAMES = {"src_embedding": "src_tok.weight", "tgt_embedding": "tgt_tok.weight",
                 "output": "generator.weight", "output_bias": "generator.bias"}


def seq2seq_names(learned):
    return dict(SEQ2SEQ_NAMES, positions="pos.weight" if learned else "pe")


def ids(seed, rows, length, vocab):
    return np.random.default_rng(seed).integers(4, vocab, size=(rows, length))


def torch_logits(model, *inputs):
    with torch.no_grad():
        return model(*(torch.as_tensor(x) for x in inputs)).numpy()


def trainer_logits(path, *inputs, **kwargs):
    with ag.no_grad():
        return load_model(path)(*inputs, **kwargs).data


def assert_seq2seq_matches(model, path):
    src, tgt = ids(1, 3, 9, V_SRC), ids(2, 3, 7, V_TGT)
    expected = torch_logits(model, src, tgt)
    actual = trainer_logits(path, src, None, tgt)
    assert actual.shape == expected.shape == (3, 7, V_TGT)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LOGIT_ATOL)


# ------------------------------------------------------------------------------------------
# nn.Transformer parity
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["arrays", "safetensors", "npz"])
@pytest.mark.parametrize("learned", [True, False], ids=["learned", "sinusoid_buffer"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_nn_transformer_logits(tmp_path, norm_first, activation, learned, via):
    model = randomise(TorchSeq2Seq(norm_first=norm_first, activation=activation, learned=learned))
    state = numpy_state(model)
    if via == "safetensors":
        from safetensors.numpy import save_file
        save_file(state, str(tmp_path / "model.safetensors"))
        state = tmp_path / "model.safetensors"
    if via == "npz":   # (the docs said it was read; it was refused)
        np.savez(tmp_path / "model.npz", **state)
        state = tmp_path / "model.npz"
    out = from_pytorch_transformer(state, tmp_path / "converted", names=seq2seq_names(learned),
                                   prefix="transformer", num_heads=HEADS, scale_embedding=True,
                                   norm_first=norm_first, activation=activation)
    config, weights = io.load_model_dir(out)
    assert config["positions"] == "learned" and config["max_positions"] == MAX_LEN
    assert config["final_norm"] is True  # nn.Transformer always ends both stacks with a norm
    assert config["fused_qkv"] and config["attention_bias"]
    assert (config["d_model"], config["num_heads"], config["dim_feedforward"]) == (D, HEADS, FFN)
    assert (config["src_vocab_size"], config["tgt_vocab_size"]) == (V_SRC, V_TGT)
    assert all(w.dtype == np.float32 for w in weights.values())
    assert_seq2seq_matches(model, out)


def test_sinusoidal_table_not_stored(tmp_path):
    # The tutorial's buffer equals attncore's own sinusoid table: ignore it and let the model
    # compute positions; the logits must not change.
    model = randomise(TorchSeq2Seq(norm_first=False, activation="relu", learned=False, scale=False))
    out = from_pytorch_transformer(numpy_state(model), tmp_path / "m", names=SEQ2SEQ_NAMES,
                                   prefix="transformer.", num_heads=HEADS, scale_embedding=False,
                                   ignore=["pe"], max_positions=64)
    config = io.read_config(out)
    assert (config["positions"], config["max_positions"], config["scale_embedding"]) == ("sinusoidal", 64, False)
    assert_seq2seq_matches(model, out)


def test_padded_sources(tmp_path):
    # Padding semantics agree: torch's key-padding masks = the trainer's source lengths.
    model = randomise(TorchSeq2Seq(norm_first=False, activation="relu", learned=True))
    out = from_pytorch_transformer(numpy_state(model), tmp_path / "m", names=seq2seq_names(True),
                                   prefix="transformer", num_heads=HEADS, scale_embedding=True)
    src, tgt, lengths = ids(5, 3, 9, V_SRC), ids(6, 3, 4, V_TGT), np.array([9, 4, 6])
    pad = np.arange(9)[None, :] >= lengths[:, None]
    src[pad] = 0
    expected = torch_logits(model, src, tgt, pad)
    np.testing.assert_allclose(trainer_logits(out, src, lengths, tgt), expected, rtol=0, atol=LOGIT_ATOL)
    # and padding matters: without lengths the answer differs
    assert np.abs(trainer_logits(out, src, None, tgt) - expected).max() > 1e-2


def test_torch_bias_free_transformer(tmp_path):
    # nn.Transformer(bias=False) has no attention, FFN or LayerNorm biases; the trainer keeps
    # FFN and norm biases, which must be zero, and drops the attention ones.
    model = randomise(TorchSeq2Seq(norm_first=True, activation="relu", learned=True, bias=False))
    names = {**seq2seq_names(True), "output_bias": None}
    state = numpy_state(model)
    state.pop("generator.bias")
    with torch.no_grad():
        model.generator.bias.zero_()
    options = dict(names=names, prefix="transformer", num_heads=HEADS, scale_embedding=True,
                   norm_first=True)
    # given, not inferred (a bias-free RMSNorm model converted silently into another model):
    # without bias=False one problem says so
    with pytest.raises(ValueError, match=r"\(1 problems\):\n  .*no in_proj_bias: .*bias=False"):
        from_pytorch_transformer(state, tmp_path / "m", **options)
    with pytest.raises(ValueError, match=r"bias=False, but the attention layers have"):
        from_pytorch_transformer(numpy_state(randomise(TorchSeq2Seq(
            norm_first=True, activation="relu", learned=True))), tmp_path / "m",
            **dict(options, names=seq2seq_names(True)), bias=False)
    out = from_pytorch_transformer(state, tmp_path / "m", bias=False, **options)
    config, weights = io.load_model_dir(out)
    assert config["attention_bias"] is False
    assert not weights["encoder.layers.0.linear1.bias"].any() and not weights["output.bias"].any()
    assert_seq2seq_matches(model, out)


def test_split_qkv_is_packed(tmp_path):
    # torch keeps q/k/v_proj_weight separate when kdim/vdim differ from embed_dim; equal
    # widths give the same computation, packed into in_proj_weight.
    model = randomise(TorchSeq2Seq(norm_first=False, activation="gelu", learned=True))
    state = numpy_state(model)
    for key in [k for k in state if k.endswith("in_proj_weight")]:
        q, k, v = np.split(state.pop(key), 3)
        base = key[: -len("in_proj_weight")]
        state.update({base + "q_proj_weight": q, base + "k_proj_weight": k, base + "v_proj_weight": v})
    out = from_pytorch_transformer(state, tmp_path / "m", names=seq2seq_names(True), prefix="transformer",
                                   num_heads=HEADS, scale_embedding=True, activation="gelu")
    _, weights = io.load_model_dir(out)
    assert "encoder.layers.0.self_attn.q_proj_weight" not in weights
    assert_seq2seq_matches(model, out)


def split_projections(state):
    """``state`` with every ``in_proj_weight`` as separate q/k/v_proj_weight tensors."""
    state = dict(state)
    for key in [k for k in state if k.endswith("in_proj_weight")]:
        base = key[: -len("in_proj_weight")]
        state.update(zip((base + p + "_proj_weight" for p in "qkv"), np.split(state.pop(key), 3)))
    return state


def test_split_qkv_converts_to_the_same_directory_as_fused(tmp_path):
    state = numpy_state(randomise(TorchSeq2Seq(norm_first=True, activation="relu", learned=True)))
    options = dict(names=seq2seq_names(True), prefix="transformer", num_heads=HEADS,
                   scale_embedding=True, norm_first=True)
    fused = io.load_model_dir(from_pytorch_transformer(state, tmp_path / "fused", **options))
    split = io.load_model_dir(from_pytorch_transformer(split_projections(state), tmp_path / "split",
                                                       **options))
    assert split[0] == fused[0] and split[1].keys() == fused[1].keys()
    for name, array in fused[1].items():
        np.testing.assert_array_equal(split[1][name], array, err_msg=name)


def test_split_qkv_of_different_shapes_are_named(tmp_path, torch_state):
    state = split_projections(torch_state)
    base = "transformer.decoder.layers.1.multihead_attn."
    state[base + "k_proj_weight"] = state[base + "k_proj_weight"][:, :12]
    with pytest.raises(ValueError, match=re.escape(
            f"cannot pack {[base + p + '_proj_weight' for p in 'qkv']} into in_proj_weight: "
            f"shapes [[16, 16], [16, 12], [16, 16]] differ")):
        convert(state, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # of one shape but not (d, d): the packed tensor is the one named, with its sources
    state = split_projections(torch_state)
    base = "transformer.encoder.layers.0.self_attn."
    for p in "qkv":
        state[base + p + "_proj_weight"] = np.zeros((D, D + 1), np.float32)
    with pytest.raises(ValueError, match=r"\(1 problems\):\n  tensor '" + re.escape(
            " + ".join(base + p + "_proj_weight" for p in "qkv")) + r"' has shape \[48, 17\], "
            r"expected \[48, 16\]"):
        convert(state, tmp_path / "m")


def test_split_qkv_of_different_shapes_are_one_problem(tmp_path, torch_state):
    # (they were also 3 "unexpected" tensors, with advice to ignore them, and a missing
    # in_proj_weight: 4 more problems for the one cause)
    state = split_projections(torch_state)
    key = "transformer.decoder.layers.1.multihead_attn.k_proj_weight"
    state[key] = state[key][:, :12]
    with pytest.raises(ValueError, match=r"\(1 problems\):\n  cannot pack "):
        convert(state, tmp_path / "m")


def test_tied_output(tmp_path):
    model = randomise(TorchSeq2Seq(norm_first=True, activation="relu", learned=True))
    model.generator.weight = model.tgt_tok.weight  # tie as torch projects do
    state = numpy_state(model)
    state.pop("generator.weight")
    out = from_pytorch_transformer(state, tmp_path / "m", names={**seq2seq_names(True), "output": "tgt_tok.weight"},
                                   prefix="transformer", num_heads=HEADS, scale_embedding=True, norm_first=True)
    config, weights = io.load_model_dir(out)
    assert config["tie_embeddings"] and "output.weight" not in weights
    assert_seq2seq_matches(model, out)


def test_torch_tensors_and_float64(tmp_path):
    model = randomise(TorchSeq2Seq(norm_first=False, activation="relu", learned=True))
    out = from_pytorch_transformer(model.state_dict(), tmp_path / "m", names=seq2seq_names(True),
                                   prefix="transformer", num_heads=HEADS, scale_embedding=True, dtype="float64")
    _, weights = io.load_model_dir(out)
    assert weights["src_embedding.weight"].dtype == np.float64
    assert_seq2seq_matches(model, out)


def test_bfloat16_torch_tensors(tmp_path):
    # NumPy has no bfloat16: the tensors go through float32, every value kept exactly
    model = randomise(TorchSeq2Seq(norm_first=False, activation="relu", learned=True))
    state = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    out = from_pytorch_transformer(state, tmp_path / "m", names=seq2seq_names(True),
                                   prefix="transformer", num_heads=HEADS, scale_embedding=True)
    _, weights = io.load_model_dir(out)
    assert weights["src_embedding.weight"].dtype == np.float32
    for name, key in (("src_embedding.weight", "src_tok.weight"),
                      ("encoder.layers.1.self_attn.in_proj_weight",
                       "transformer.encoder.layers.1.self_attn.in_proj_weight")):
        np.testing.assert_array_equal(weights[name], state[key].float().numpy())
    assert_seq2seq_matches(model.to(torch.bfloat16).float(), out)


def test_decoder_only_stack(tmp_path):
    model = randomise(TorchStack(causal=True))
    names = {"tgt_embedding": "tok.weight", "positions": "pos.weight", "output": "head.weight",
             "output_bias": "head.bias"}
    out = from_pytorch_transformer(numpy_state(model), tmp_path / "m", kind="decoder_only", names=names,
                                   prefix="blocks", num_heads=HEADS, scale_embedding=False,
                                   norm_first=True, activation="gelu")
    config = io.read_config(out)
    assert (config["kind"], config["num_decoder_layers"], config["final_norm"]) == ("decoder_only", 2, True)
    tokens = ids(3, 2, 8, V_TGT)
    np.testing.assert_allclose(trainer_logits(out, tokens), torch_logits(model, tokens), rtol=0, atol=LOGIT_ATOL)


def test_encoder_only_stack(tmp_path):
    model = randomise(TorchStack(causal=False, norm_first=False, activation="relu"))
    names = {"src_embedding": "tok.weight", "src_positions": "pos.weight", "classifier": "head.weight",
             "classifier_bias": "head.bias"}
    out = from_pytorch_transformer(numpy_state(model), tmp_path / "m", kind="encoder_only", names=names,
                                   prefix="blocks.", num_heads=HEADS, scale_embedding=False, pooling="mean")
    assert io.read_config(out)["num_classes"] == 5
    tokens = ids(4, 3, 6, V_TGT)
    np.testing.assert_allclose(trainer_logits(out, tokens), torch_logits(model, tokens), rtol=0, atol=LOGIT_ATOL)


def test_a_final_norm_without_parameters_is_given(tmp_path):
    # LayerNorm(elementwise_affine=False) as the stack's final norm leaves no tensor: the model
    # converted without it (logits 2.5 off); final_norm=True keeps it as ones and zeros
    model = TorchStack(causal=False, norm_first=True, activation="relu")
    model.blocks.norm = nn.LayerNorm(D, elementwise_affine=False)
    model = randomise(model)
    names = {"src_embedding": "tok.weight", "src_positions": "pos.weight",
             "classifier": "head.weight", "classifier_bias": "head.bias"}
    options = dict(kind="encoder_only", names=names, prefix="blocks.", num_heads=HEADS,
                   scale_embedding=False, norm_first=True)
    state = numpy_state(model)
    assert not any(".norm." in key and "layers" not in key for key in state)
    tokens = ids(4, 3, 6, V_TGT)
    out = from_pytorch_transformer(state, tmp_path / "m", final_norm=True, **options)
    assert io.read_config(out)["final_norm"] is True
    np.testing.assert_allclose(trainer_logits(out, tokens), torch_logits(model, tokens), rtol=0,
                               atol=LOGIT_ATOL)
    inferred = from_pytorch_transformer(state, tmp_path / "inferred", **options)
    assert np.abs(trainer_logits(inferred, tokens) - torch_logits(model, tokens)).max() > 1e-2
    # and final_norm=False where the weights have one is a problem
    with pytest.raises(ValueError, match=r"final_norm=False, but .*'blocks.norm.(weight|bias)'"):
        from_pytorch_transformer(numpy_state(randomise(TorchStack(causal=False))),
                                 tmp_path / "x", final_norm=False, **options)
    with pytest.raises(ValueError, match="final_norm must be a bool or None"):
        from_pytorch_transformer(state, tmp_path / "x", final_norm="yes", **options)


# ------------------------------------------------------------------------------------------
# nn.Transformer bad input
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_state():
    return numpy_state(randomise(TorchSeq2Seq(norm_first=False, activation="relu", learned=True)))


def convert(state, out_dir, **overrides):
    options = dict(names=seq2seq_names(True), prefix="transformer", num_heads=HEADS, scale_embedding=True)
    options.update(overrides)
    return from_pytorch_transformer(state, out_dir, **options)


def test_missing_tensor(tmp_path, torch_state):
    state = dict(torch_state)
    del state["transformer.decoder.layers.1.multihead_attn.in_proj_weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'transformer.decoder.layers.1.multihead_attn.in_proj_weight'"):
        convert(state, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing written


def test_missing_named_tensor(tmp_path, torch_state):
    state = {k: v for k, v in torch_state.items() if k != "generator.bias"}
    with pytest.raises(ValueError, match=r"missing tensor 'generator.bias' \(names\['output_bias'\]\)"):
        convert(state, tmp_path / "m")


def test_missing_embedding_is_the_only_problem_named(tmp_path, torch_state):
    # its placeholder vocabulary of 1 also failed the special ids' range check
    for key, name in (("src_tok.weight", "src_embedding"), ("tgt_tok.weight", "tgt_embedding")):
        state = {k: v for k, v in torch_state.items() if k != key}
        with pytest.raises(ValueError, match=rf"\(1 problems\):\n  missing tensor '{key}' "
                                             rf"\(names\['{name}'\]\)$"):
            convert(state, tmp_path / "m")
    # nor is it reported twice, nor the output layer against a made-up vocabulary (4 lines);
    # the same for a misnamed classifier
    model = randomise(TorchStack(causal=False))
    names = {"src_embedding": "tok.weight", "src_positions": "pos.weight",
             "classifier": "cls.weight", "classifier_bias": "head.bias"}
    with pytest.raises(ValueError, match=r"\(2 problems\):\n  missing tensor 'cls.weight' "
                                         r"\(names\['classifier'\]\)\n  unexpected tensor "
                                         r"'head.weight'"):
        from_pytorch_transformer(numpy_state(model), tmp_path / "m", kind="encoder_only",
                                 names=names, prefix="blocks.", num_heads=HEADS,
                                 scale_embedding=False)


def test_an_embedding_of_the_wrong_width_is_one_problem(tmp_path, torch_state):
    # d_model came from the embedding, so every layer tensor was reported instead
    state = dict(torch_state, **{"src_tok.weight": torch_state["src_tok.weight"][:, :12]})
    with pytest.raises(ValueError) as error:
        convert(state, tmp_path / "m")
    lines = [line for line in str(error.value).splitlines() if "has shape" in line]
    assert len(lines) == 1 and "'src_tok.weight' has shape [11, 12], expected [11, 16]" in lines[0]


def test_a_transposed_feed_forward_weight_is_one_problem(tmp_path, torch_state):
    # dim_feedforward came from linear1.weight alone: transposed, it made the correct
    # tensors of the layers the reported mismatches (6 problems, none of them it)
    key = "transformer.encoder.layers.0.linear1.weight"
    state = dict(torch_state, **{key: np.ascontiguousarray(torch_state[key].T)})
    with pytest.raises(ValueError) as error:
        convert(state, tmp_path / "m")
    lines = [line for line in str(error.value).splitlines() if "has shape" in line]
    assert len(lines) == 1 and f"'{key}' has shape [{D}, {FFN}], expected [{FFN}, {D}]" in lines[0]


def test_wrong_shape(tmp_path, torch_state):
    state = dict(torch_state, **{"transformer.encoder.layers.0.linear2.weight": np.zeros((D, FFN + 1), np.float32)})
    with pytest.raises(ValueError, match=r"'transformer.encoder.layers.0.linear2.weight' has shape \[16, 25\], "
                                         r"expected \[16, 24\]"):
        convert(state, tmp_path / "m")


def test_unknown_tensor(tmp_path, torch_state):
    state = dict(torch_state, **{"transformer.encoder.layers.0.self_attn.bias_k": np.zeros((1, 1, D), np.float32),
                                 "extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError) as error:
        convert(state, tmp_path / "m")
    assert "unexpected tensor 'transformer.encoder.layers.0.self_attn.bias_k'" in str(error.value)
    assert "unexpected tensor 'extra.weight'" in str(error.value)
    # ... unless ignored
    convert(state, tmp_path / "m", ignore=["extra.*", "*.bias_k"])


def test_ignore_may_be_one_string(tmp_path, torch_state):
    # one pattern, not its characters (whose "*" would leave out every tensor)
    state = dict(torch_state, **{"extra.weight": np.zeros(3, np.float32)})
    for ignore in ("extra.*", "extra.weight"):
        out = convert(state, tmp_path / ignore, ignore=ignore)
        np.testing.assert_array_equal(io.load_model_dir(out)[1]["src_embedding.weight"],
                                      torch_state["src_tok.weight"])


def test_a_final_norm_in_one_stack_only_is_named(tmp_path, torch_state):
    for present, absent in (("encoder", "decoder"), ("decoder", "encoder")):
        state = {k: v for k, v in torch_state.items()
                 if not k.startswith(f"transformer.{absent}.norm.")}
        with pytest.raises(ValueError, match=r"the encoder and decoder must both have a final "
                                             rf"norm or neither; found only {present}.norm"):
            convert(state, tmp_path / "m")
        assert not (tmp_path / "m").exists()


def test_every_problem_in_one_error(tmp_path, torch_state):
    state = dict(torch_state)
    del state["transformer.encoder.norm.bias"]
    state["transformer.decoder.layers.0.norm2.weight"] = np.ones(D + 2, np.float32)
    state["stray"] = np.ones(2, np.float32)
    state["transformer.encoder.layers.1.linear1.bias"] = np.full(FFN, np.nan, np.float32)
    with pytest.raises(ValueError, match=r"\(4 problems\)") as error:
        convert(state, tmp_path / "m")
    message = str(error.value)
    for fragment in ("missing tensor 'transformer.encoder.norm.bias'",
                     "'transformer.decoder.layers.0.norm2.weight' has shape [18]",
                     "unexpected tensor 'stray'", "'transformer.encoder.layers.1.linear1.bias' contains NaN"):
        assert fragment in message


def test_wrong_prefix_is_explained(tmp_path, torch_state):
    with pytest.raises(ValueError, match=r"no encoder layers found under 'model.encoder.layers.'.*prefix='transformer.'"):
        convert(torch_state, tmp_path / "m", prefix="model")


def test_non_float_tensor(tmp_path, torch_state):
    state = dict(torch_state, **{"src_tok.weight": np.zeros((V_SRC, D), np.int64)})
    with pytest.raises(ValueError, match=r"'src_tok.weight' has dtype int64, expected floating point"):
        convert(state, tmp_path / "m")


@pytest.mark.parametrize("names, pattern", [
    ({**SEQ2SEQ_NAMES, "srcembedding": "x"}, r"names: unknown keys \['srcembedding'\]"),
    ({"src_embedding": "src_tok.weight"}, r"names: .*needs keys \['tgt_embedding', 'output'\]"),
    ({**SEQ2SEQ_NAMES, "classifier": "x"}, r"names: keys \['classifier'\] are not used"),
    ({**SEQ2SEQ_NAMES, "positions": "p", "src_positions": "p"}, r"names: give 'positions'"),
    ({**SEQ2SEQ_NAMES, "src_positions": "pos.weight"}, r"names: .*needs both"),
    ("src_tok.weight", r"names must be a mapping"),
])
def test_bad_names(tmp_path, torch_state, names, pattern):
    with pytest.raises(ValueError, match=pattern):
        convert(torch_state, tmp_path / "m", names=names)


@pytest.mark.parametrize("overrides, pattern", [
    ({"num_heads": 3}, r"d_model 16 not divisible by num_heads 3"),
    ({"num_heads": 0}, r"num_heads must be a positive int"),
    ({"activation": "swish"}, r"activation must be 'relu' or 'gelu'"),
    ({"kind": "decoder"}, r"kind must be one of"),
    ({"scale_embedding": "yes"}, r"scale_embedding must be a bool"),
    ({"bias": "no"}, r"bias must be a bool"),
    ({"layer_norm_eps": -1.0}, r"layer_norm_eps must be a finite positive number"),
    ({"layer_norm_eps": float("inf")}, r"layer_norm_eps must be a finite positive number"),
    ({"max_positions": MAX_LEN + 1}, r"max_positions 21 exceeds the 20 rows"),
    ({"dtype": "float16"}, r"dtype must be"),
    ({"ignore": [3]}, r"ignore must be an iterable of strings"),
])
def test_bad_arguments(tmp_path, torch_state, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        convert(torch_state, tmp_path / "m", **overrides)


def test_a_value_beyond_float32_is_refused_before_anything_is_written(tmp_path, torch_state):
    # finite in float64, inf once cast: the directory was written, then attncore.load refused it
    state = {k: np.asarray(v, dtype=np.float64) for k, v in torch_state.items()}
    state["transformer.decoder.layers.0.linear1.bias"][0] = 1e39
    with pytest.raises(ValueError, match=r"'decoder.layers.0.linear1.bias' holds values beyond"):
        convert(state, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bad_out_dir(tmp_path, torch_state):
    with pytest.raises(ValueError, match=r"out_dir must be a path"):
        convert(torch_state, None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir .* exists and is not a directory"):
        convert(torch_state, tmp_path / "file")


def test_bad_state_dict_argument(tmp_path):
    with pytest.raises(ValueError, match=r"state_dict must be a mapping of arrays or a path"):
        convert([1, 2], tmp_path / "m")
    with pytest.raises(ValueError, match=r"state_dict: no such file"):
        convert(tmp_path / "absent.safetensors", tmp_path / "m")
    with pytest.raises(ValueError, match=r"is not a \.safetensors or \.npz file"):
        convert(tmp_path / "model.pt", tmp_path / "m")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"state_dict: cannot read"):
        convert(tmp_path / "bad.safetensors", tmp_path / "m")


def test_max_positions_truncates_learned_table(tmp_path, torch_state):
    out = convert(torch_state, tmp_path / "m", max_positions=12)
    config, weights = io.load_model_dir(out)
    assert config["max_positions"] == 12 and weights["src_position.weight"].shape == (12, D)
    np.testing.assert_array_equal(weights["tgt_position.weight"], torch_state["pos.weight"][:12])


def test_a_batch_first_position_buffer_is_read_as_a_table(tmp_path):
    # a (1, P, d) buffer (batch-first tutorials) is the same table as the (P, 1, d) one
    model = randomise(TorchSeq2Seq(norm_first=False, activation="relu", learned=False))
    state = numpy_state(model)
    state["pe"] = np.ascontiguousarray(state["pe"].transpose(1, 0, 2))
    assert state["pe"].shape == (1, MAX_LEN, D)
    out = from_pytorch_transformer(state, tmp_path / "m", names=seq2seq_names(False),
                                   prefix="transformer", num_heads=HEADS, scale_embedding=True)
    assert io.read_config(out)["max_positions"] == MAX_LEN
    assert_seq2seq_matches(model, out)


def test_max_positions_past_the_shorter_of_two_tables_is_named(tmp_path, torch_state):
    state = dict(torch_state, src_pos=torch_state["pos.weight"],
                 tgt_pos=torch_state["pos.weight"][:12])
    del state["pos.weight"]
    names = dict(SEQ2SEQ_NAMES, src_positions="src_pos", tgt_positions="tgt_pos")
    with pytest.raises(ValueError, match=r"max_positions 16 exceeds the 12 rows of the position table"):
        convert(state, tmp_path / "m", names=names, max_positions=16)
    config, weights = io.load_model_dir(convert(state, tmp_path / "m", names=names))
    assert config["max_positions"] == 12 and weights["src_position.weight"].shape == (12, D)
