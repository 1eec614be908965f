"""RAN in the trainer: official parity, window partition, padded batches, causal mode, weights,
gradients and a short training run."""
import json
import os

import numpy as np
import pytest

from attncore.train import autograd as ag
from attncore.train.gradcheck import gradcheck, gradcheck_module
from attncore.train.ran import (RAN, RANConfig, from_rannet_variables, ran_weight_spec)
from attncore.train.ran_ops import partition_windows, window_layout

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures",
                       "ran_official_small.npz")
if not os.path.exists(FIXTURE):
    FIXTURE = "/work/shared/fixtures/ran_official_small.npz"
LENGTHS = (4, 6, 13, 14, 31)


def small_config(**overrides):
    options = dict(vocab_size=30, embedding_size=12, ran_layers=2, head_num=2, head_size=4,
                   window_size=4, min_window_size=2, dtype="float64")
    options.update(overrides)
    return RANConfig(**options)


def encode(model, ids, lengths=None, history=None, **kw):
    with ag.no_grad():
        return model.encode(np.asarray(ids), lengths, history, **kw)


# ------------------------------------------------------------------------------------------
# Official parity
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    if not os.path.exists(FIXTURE):
        pytest.skip("ran_official_small.npz fixture not found")
    data = np.load(FIXTURE)
    return data, json.loads(bytes(data["config"]).decode())


def official_model(official, dtype):
    data, fc = official
    config = RANConfig(vocab_size=fc["vocab_size"], embedding_size=fc["embedding_size"],
                       ran_layers=fc["ran_layers"], head_num=fc["head_num"],
                       head_size=fc["head_size"], window_size=fc["window_size"],
                       min_window_size=fc["min_window_size"], cell_pooling=fc["cell_pooling"],
                       dtype=dtype)
    variables = {k: data[k] for k in data.files if k.startswith("weight::")}
    model = RAN(config)
    model.load_state_dict(from_rannet_variables(variables, config))
    return model


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("length", LENGTHS)
def test_parity_with_official_rannet(official, dtype, length):
    data, _ = official
    out = encode(official_model(official, dtype), data[f"len{length}::ids"])
    # Official outputs are TF float32: 2e-5 absolute (RAN.md reports 1.2e-5 for a NumPy port).
    np.testing.assert_allclose(out.sequence.data, data[f"len{length}::sequence"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.pooled.data, data[f"len{length}::cell"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.history.data, data[f"len{length}::history"], rtol=0, atol=2e-5)


def test_official_batch_of_all_lengths(official):
    # The fixture sequences padded into one batch give each sequence's official result.
    data, _ = official
    model = official_model(official, "float64")
    ids = np.zeros((len(LENGTHS), max(LENGTHS)), dtype=np.int64)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = data[f"len{n}::ids"][0]
    out = encode(model, ids)
    for row, n in enumerate(LENGTHS):
        np.testing.assert_allclose(out.sequence.data[row, :n], data[f"len{n}::sequence"][0], atol=2e-5)
        np.testing.assert_allclose(out.pooled.data[row], data[f"len{n}::cell"][0], atol=2e-5)
        np.testing.assert_allclose(out.history.data[row], data[f"len{n}::history"][0], atol=2e-5)


def test_from_rannet_variables_name_forms(official):
    data, fc = official
    config = official_model(official, "float32").config
    fixture_form = {k: data[k] for k in data.files if k.startswith("weight::")}
    reference = from_rannet_variables(fixture_form, config)
    # Checkpoint form: rannet/ran-i/..., lower case, cell-initializer under its layer prefix.
    checkpoint_form = {}
    layer_of_init = {}
    for key, value in fixture_form.items():
        name = key.split("::", 2)[2].removesuffix(":0")
        if name.startswith("cell-initializer"):
            layer = layer_of_init.get(name, 0)
            layer_of_init[name] = layer + 1
            name = f"RAN-{layer}/{name}"
        checkpoint_form["rannet/" + name.lower().replace("/window-loop/", "/")] = value
    converted = from_rannet_variables(checkpoint_form, config)
    assert converted.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(converted[name], reference[name])
    # kernels are transposed to (out, in)
    np.testing.assert_array_equal(reference["layers.0.window_attn.query.weight"],
                                  data["weight::003::RAN-0/encode-attn/dense-q/kernel:0"].T)


def test_from_rannet_variables_errors(official):
    data, _ = official
    config = official_model(official, "float32").config
    variables = {k: data[k] for k in data.files if k.startswith("weight::")}
    extra = dict(variables, **{"Output-Cell-Dense/kernel:0": np.zeros((24, 24))})
    with pytest.raises(ValueError, match="unknown variable"):
        from_rannet_variables(extra, config)
    assert len(from_rannet_variables(extra, config, strict=False)) == len(ran_weight_spec(config))
    missing = {k: v for k, v in variables.items() if "concat-layernorm/beta" not in k}
    with pytest.raises(ValueError, match=r"missing weight 'layers.0.concat_norm.bias'"):
        from_rannet_variables(missing, config)


# ------------------------------------------------------------------------------------------
# Window partition
# ------------------------------------------------------------------------------------------

def test_partition_windows_spec_examples():
    assert partition_windows(256, 256, 16) == [(0, 256)]
    assert partition_windows(257, 256, 16) == [(0, 257)]
    assert partition_windows(272, 256, 16) == [(0, 256), (256, 272)]
    assert partition_windows(520, 256, 16) == [(0, 256), (256, 520)]
    assert partition_windows(13, 6, 2) == [(0, 6), (6, 13)]
    assert partition_windows(14, 6, 2) == [(0, 6), (6, 12), (12, 14)]
    assert partition_windows(13, 6, 2, merge_tail=False) == [(0, 6), (6, 12), (12, 13)]
    with pytest.raises(ValueError):
        partition_windows(0, 4, 2)


def test_window_layout_covers_each_token_once():
    lengths = np.array([13, 3, 9])
    layout = window_layout(lengths, 13, 4, 2)
    assert layout.num_windows.tolist() == [3, 1, 2]
    for b, n in enumerate(lengths):
        seen = np.concatenate([layout.token_index[k][b][layout.token_valid[k][b]]
                               for k in range(layout.num_steps)])
        assert sorted(seen.tolist()) == list(range(n))


def test_single_window_has_no_cell_residual():
    # With T <= W the history is the raw first GPC g_1: the cell GLU/LN never run, so
    # changing their weights changes nothing.
    model = RAN(small_config(ran_layers=1, window_size=8))
    ids = np.array([[5, 6, 7, 8, 9]])
    before = encode(model, ids)
    model.layers[0].cell_norm.bias.data += 1.0
    model.layers[0].cell_glu.gate.weight.data *= 3.0
    after = encode(model, ids)
    np.testing.assert_array_equal(before.history.data, after.history.data)
    np.testing.assert_array_equal(before.sequence.data, after.sequence.data)


def test_initial_cell_is_initializer_beta():
    model = RAN(small_config(ran_layers=1, window_size=8))
    ids = np.array([[5, 6, 7]])
    beta = model.layers[0].cell_init_norm.bias
    beta.data = np.random.default_rng(0).standard_normal(beta.shape)
    none = encode(model, ids)
    explicit = encode(model, ids, history=beta.data[None, :])
    zero = encode(model, ids, history=np.zeros((1, 12)))
    np.testing.assert_array_equal(none.sequence.data, zero.sequence.data)
    np.testing.assert_allclose(none.sequence.data, explicit.sequence.data, atol=1e-14)
    model.layers[0].cell_init.weight.data *= 5.0  # multiplies zeros in V3: no effect
    np.testing.assert_array_equal(none.sequence.data, encode(model, ids).sequence.data)


# ------------------------------------------------------------------------------------------
# Padded batches equal single documents
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_padded_batch_matches_running_alone(causal, pooling):
    config = small_config(causal=causal, cell_pooling=pooling, ran_layers=2, token_head="lm")
    model = RAN(config, seed=3)
    rng = np.random.default_rng(1)
    lengths = [11, 3, 8, 1, 5]
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(4, config.vocab_size, n)
    history = rng.standard_normal((len(lengths), config.embedding_size))
    history[1] = 0.0  # an all-zero row means "no history" for that row only
    batch = encode(model, ids, history=history)
    for row, n in enumerate(lengths):
        alone = encode(model, ids[row:row + 1, :n], history=history[row:row + 1])
        np.testing.assert_allclose(batch.sequence.data[row, :n], alone.sequence.data[0], atol=1e-12)
        np.testing.assert_allclose(batch.pooled.data[row], alone.pooled.data[0], atol=1e-12)
        np.testing.assert_allclose(batch.history.data[row], alone.history.data[0], atol=1e-12)


def test_pad_ids_inside_sequence_need_lengths():
    model = RAN(small_config())
    with pytest.raises(ValueError, match="lengths"):
        encode(model, np.array([[5, 0, 6]]))
    out = encode(model, np.array([[5, 0, 6]]), lengths=np.array([3]))
    assert out.sequence.shape == (1, 3, 12)


def test_window_size_override():
    model = RAN(small_config(window_size=4))
    ids = np.arange(4, 14)[None, :]
    default = encode(model, ids)
    wide = encode(model, ids, window_size=16)
    assert default.layout.num_steps == 3 and wide.layout.num_steps == 1
    assert np.abs(default.sequence.data - wide.sequence.data).max() > 1e-3


# ------------------------------------------------------------------------------------------
# Causal mode
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("embedding_size", [64, 256])
def test_lm_starts_near_uniform_predictions(embedding_size):
    # the tied head multiplies a unit-variance LayerNorm output by the embedding: N(0, 1) rows
    # gave logits of spread sqrt(D) and an initial loss of 29-60 nats where ln V is 6.9
    vocab = 1000
    model = RAN(small_config(vocab_size=vocab, embedding_size=embedding_size, head_num=4,
                             head_size=embedding_size // 4, causal=True, token_head="lm",
                             dtype="float32"), seed=3)
    ids = np.random.default_rng(0).integers(4, vocab, (3, 40))
    with ag.no_grad():
        loss = float(model.lm_loss(ids).data)
    assert abs(loss - np.log(vocab)) < 0.5, loss


def causal_model(**overrides):
    return RAN(small_config(causal=True, token_head="lm", **overrides), seed=7)


@pytest.mark.parametrize("memory_review", [True, False])
def test_causal_information_crosses_windows(memory_review):
    # One layer, W = 4: window 0 is tokens 0-3, window 1 tokens 4-7. Changing token 1 must
    # change the logits of every token of window 1 (through the summary slot -> GPC).
    model = causal_model(ran_layers=1, memory_review=memory_review)
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    changed = ids.copy()
    changed[0, 1] = 20
    with ag.no_grad():
        a, b = model.token_logits(ids).data, model.token_logits(changed).data
    assert np.abs(a[0, 4:] - b[0, 4:]).min(axis=-1).max() > 0
    assert (np.abs(a[0, 4:] - b[0, 4:]).max(axis=-1) > 1e-6).all()
    # ... and not of token 0 of window 0, which comes before the change
    np.testing.assert_array_equal(a[0, 0], b[0, 0])


def test_causal_outputs_ignore_future_tokens():
    model = causal_model(ran_layers=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 30, (1, 15))
    with ag.no_grad():
        full = model.token_logits(ids).data
        for t in range(15):
            changed = ids.copy()
            changed[0, t + 1:] = rng.integers(4, 30, 14 - t)
            np.testing.assert_allclose(model.token_logits(changed).data[0, :t + 1], full[0, :t + 1],
                                       atol=1e-12)
            # a prefix alone gives the same outputs (no tail merging in causal mode)
            np.testing.assert_allclose(model.token_logits(ids[:, :t + 1]).data[0], full[0, :t + 1],
                                       atol=1e-12)


def test_causal_lm_loss_and_config_checks():
    model = causal_model()
    ids = np.array([[5, 6, 7, 8, 9, 0], [5, 6, 7, 0, 0, 0]])
    loss = model.lm_loss(ids)
    assert loss.shape == () and np.isfinite(loss.item())
    with pytest.raises(ValueError, match="causal"):
        RAN(small_config(token_head="lm")).lm_loss(ids)
    with pytest.raises(ValueError, match="cell_pooling"):
        small_config(cell_pooling="sum")


# ------------------------------------------------------------------------------------------
# Weights: spec, io round trip
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {}, {"causal": True, "token_head": "lm"}, {"memory_review": False, "num_classes": 3},
    {"token_head": "tag", "num_token_classes": 5, "head_num": 3, "head_size": 6}])
def test_spec_matches_parameters(overrides):
    config = small_config(**overrides)
    model = RAN(config)
    spec = ran_weight_spec(config.to_dict())
    have = {n: (t.shape, str(t.dtype)) for n, t in model.named_parameters().items()}
    assert have == {n: (tuple(s), d) for n, (s, d) in spec.items()}


def test_model_directory_round_trip(tmp_path):
    from attncore import io

    assert "ran" in io.registered_architectures()
    config = small_config(num_classes=3, causal=True, token_head="lm", dtype="float32")
    model = RAN(config, seed=5)
    io.save_model_dir(tmp_path / "ran", config.to_dict(), model.state_dict())
    loaded_config, weights = io.load_model_dir(tmp_path / "ran")
    again = RAN(RANConfig.from_dict(loaded_config), seed=99)
    again.load_state_dict(weights)
    ids = np.array([[5, 6, 7, 8, 9, 10, 11]])
    with ag.no_grad():
        np.testing.assert_array_equal(model.classify(ids).data, again.classify(ids).data)
        np.testing.assert_array_equal(model.token_logits(ids).data, again.token_logits(ids).data)
    bad = model.state_dict()
    del bad["layers.1.summary"]
    with pytest.raises(ValueError, match="layers.1.summary"):
        io.save_model_dir(tmp_path / "bad", config.to_dict(), bad)


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_finite_differences(causal):
    config = small_config(embedding_size=8, head_num=2, head_size=2, window_size=3,
                          min_window_size=2, num_classes=3, cell_pooling="max" if causal else "mean",
                          causal=causal, token_head="lm" if causal else "none")
    model = RAN(config, seed=2)
    rng = np.random.default_rng(0)
    for name, tensor in model.named_parameters().items():
        if "norm" in name:  # away from the initial ones/zeros, so every path is exercised
            tensor.data = tensor.data + 0.3 * rng.standard_normal(tensor.shape)
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]])
    labels = np.array([0, 2])

    def loss(m):
        total = ag.cross_entropy(m.classify(ids), labels)
        return total + m.lm_loss(ids) if causal else total

    assert gradcheck_module(model, loss, entries_per_parameter=1) > 50


def test_window_step_input_gradients():
    # Gradients reaching the token inputs and the initial cell through windows, recurrence
    # and memory review (the parameter check above does not cover the inputs themselves).
    config = small_config(embedding_size=6, head_num=1, head_size=4, window_size=3, ran_layers=1)
    model = RAN(config, seed=4)
    layer = model.layers[0]
    layout = window_layout(np.array([7, 4]), 7, 3, 2)

    def fn(x, cell):
        return model._layer(layer, x, cell, layout)[0]

    rng = np.random.default_rng(0)
    gradcheck(fn, [rng.standard_normal((2, 7, 6)), rng.standard_normal((2, 6))])


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------

def test_short_training_run_reduces_loss():
    from attncore.train.optim import Adam

    # Toy long-document task: is token 4 anywhere in a 6-20 token document (several windows)?
    rng = np.random.default_rng(0)
    config = RANConfig(vocab_size=12, embedding_size=16, ran_layers=1, head_num=2, head_size=8,
                       window_size=4, min_window_size=2, num_classes=2, cell_pooling="max")
    model = RAN(config, seed=0)
    optimizer = Adam(model.named_parameters(), lr=1e-2)

    def batch(size=16):
        lengths = rng.integers(6, 21, size)
        ids = np.zeros((size, lengths.max()), dtype=np.int64)
        labels = rng.integers(0, 2, size)
        for row, n in enumerate(lengths):
            ids[row, :n] = rng.integers(5, 12, n)
            if labels[row]:
                ids[row, rng.integers(0, n)] = 4
        return ids, lengths, labels

    losses = []
    for _ in range(40):
        ids, lengths, labels = batch()
        optimizer.zero_grad()
        loss = ag.cross_entropy(model(ids, lengths), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8]), losses


def test_heads_shapes():
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 0, 0, 0, 0, 0]])
    tagger = RAN(small_config(token_head="tag", num_token_classes=5))
    lm = RAN(small_config(token_head="lm"))
    classifier = RAN(small_config(num_classes=3))
    with ag.no_grad():
        assert tagger(ids).shape == (2, 7, 5)
        assert lm(ids).shape == (2, 7, 30)
        assert classifier(ids).shape == (2, 3)
    with pytest.raises(ValueError, match="classifier"):
        tagger.classify(ids)
    with pytest.raises(ValueError, match="token head"):
        classifier.token_logits(ids)
