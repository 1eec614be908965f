# SPDX-License-Identifier: Apache-2.0
"""attncore.convert.from_rannet: official rannet variables -> a ``ran`` model directory, checked by
running the trainer model loaded from that directory against the outputs the authors' code
(TensorFlow) recorded in shared/fixtures/ran_official_small.npz."""
import json
import os
import re

import numpy as np
import pytest

from attncore import io
from attncore.convert import from_rannet
from attncore.train import autograd as ag
from attncore.train.export import load_model

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "ran_official_small.npz")
if not os.path.exists(FIXTURE):
    FIXTURE = "/work/shared/fixtures/ran_official_small.npz"
LENGTHS = (4, 6, 13, 14, 31)


@pytest.fixture(scope="module")
def official():
    if not os.path.exists(FIXTURE):
        pytest.skip("ran_official_small.npz fixture not found")
    data = np.load(FIXTURE, allow_pickle=False)
    variables = {k: data[k] for k in data.files if k.startswith("weight::")}
    return data, json.loads(bytes(data["config"]).decode()), variables


def ran_config(fixture_config, **overrides):
    """Only what the weights cannot show; sizes and layers are inferred."""
    config = {key: fixture_config[key] for key in ("head_num", "head_size", "window_size", "min_window_size",
                                                   "cell_pooling")}
    config.update(overrides)
    return config


def assert_ran_matches(data, path):
    model = load_model(path)
    for length in LENGTHS:
        with ag.no_grad():
            out = model.encode(data[f"len{length}::ids"])
        # Official outputs are TF float32: 2e-5 absolute (as in tests/test_train_ran.py).
        np.testing.assert_allclose(out.sequence.data, data[f"len{length}::sequence"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(out.pooled.data, data[f"len{length}::cell"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(out.history.data, data[f"len{length}::history"], rtol=0, atol=2e-5)


def test_rannet_mapping(tmp_path, official):
    data, fixture_config, variables = official
    out = from_rannet(variables, tmp_path / "ran", ran_config(fixture_config))
    config = io.read_config(out)
    for key in ("vocab_size", "embedding_size", "ran_layers", "head_num", "head_size"):
        assert config[key] == fixture_config[key], key
    assert (config["architecture"], config["token_head"]) == ("ran", "none")
    assert_ran_matches(data, out)


def test_rannet_npz(tmp_path, official):
    data, fixture_config, variables = official
    np.savez(tmp_path / "variables.npz", **variables)
    out = from_rannet(tmp_path / "variables.npz", tmp_path / "ran", ran_config(fixture_config))
    assert_ran_matches(data, out)


def test_rannet_config_object(tmp_path, official):
    from attncore.train.ran import RANConfig
    data, fc, variables = official
    config = RANConfig(vocab_size=fc["vocab_size"], embedding_size=fc["embedding_size"], ran_layers=fc["ran_layers"],
                       **ran_config(fc), dtype="float64")
    out = from_rannet(variables, tmp_path / "ran", config)
    assert io.load_model_dir(out)[1]["embedding.weight"].dtype == np.float64
    assert_ran_matches(data, out)


def test_rannet_pickled_npz_is_refused(tmp_path, official):
    _, fixture_config, _ = official
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"variables: cannot read .*allow_pickle"):
        from_rannet(tmp_path / "evil.npz", tmp_path / "ran", ran_config(fixture_config))


def test_rannet_bad_config(tmp_path, official):
    _, fixture_config, variables = official
    config = ran_config(fixture_config)
    del config["head_size"]
    with pytest.raises(ValueError, match=r"config: missing \['head_size'\]"):
        from_rannet(variables, tmp_path / "ran", config)
    with pytest.raises(ValueError, match=r"config: unknown fields \['heads'\]"):
        from_rannet(variables, tmp_path / "ran", ran_config(fixture_config, heads=3))
    # head_num x head_size must match the projections' width (18 = 3 x 6)
    with pytest.raises(ValueError, match=r"layers.0.window_attn.query.weight: shape \[18, 24\], expected \[12, 24\]"):
        from_rannet(variables, tmp_path / "ran", ran_config(fixture_config, head_num=2))
    with pytest.raises(ValueError, match=r"config: .*head_size must be even"):
        from_rannet(variables, tmp_path / "ran", ran_config(fixture_config, head_num=6, head_size=3))
    with pytest.raises(ValueError, match=r"config: .*min_window_size \(9\) must be <= window_size"):
        from_rannet(variables, tmp_path / "ran", ran_config(fixture_config, window_size=8,
                                                            min_window_size=9))
    assert not (tmp_path / "ran").exists()


def test_rannet_unknown_and_missing_variables(tmp_path, official):
    data, fixture_config, variables = official
    extra = dict(variables, **{"Output-Cell-Dense/kernel:0": np.zeros((24, 24), np.float32)})
    with pytest.raises(ValueError, match=r"unknown variable 'Output-Cell-Dense/kernel:0'"):
        from_rannet(extra, tmp_path / "ran", ran_config(fixture_config))
    assert_ran_matches(data, from_rannet(extra, tmp_path / "ran", ran_config(fixture_config), strict=False))
    missing = {k: v for k, v in variables.items() if "RAN-2/concat-layernorm/gamma" not in k}
    with pytest.raises(ValueError, match=r"missing weight 'layers.2.concat_norm.weight'"):
        from_rannet(missing, tmp_path / "ran2", ran_config(fixture_config))


def test_rannet_variables_of_a_wrong_kind_or_twice_are_named(tmp_path, official):
    # an int kernel was cast silently, a complex one lost its imaginary part, and a weight
    # given under two names took the later one silently
    _, fixture_config, variables = official
    name = next(k for k in variables if k.endswith("RAN-0/encode-attn/dense-q/kernel:0"))
    for value, message in ((variables[name].astype(np.int64), "has dtype int64"),
                           (variables[name].astype(np.complex64), "has dtype complex64"),
                           (np.array(["abc"]), "has dtype <U3")):
        with pytest.raises(ValueError, match=re.escape(message)):
            from_rannet(dict(variables, **{name: value}), tmp_path / "ran", ran_config(fixture_config))
    twice = dict(variables, **{"ran-0/encode-attn/dense-q/kernel:0": variables[name] * 2})
    with pytest.raises(ValueError, match="both map to 'layers.0.window_attn.query.weight'"):
        from_rannet(twice, tmp_path / "ran", ran_config(fixture_config))
    assert not (tmp_path / "ran").exists()


def test_rannet_bad_arguments(tmp_path, official):
    _, fixture_config, variables = official
    with pytest.raises(ValueError, match=r"variables: .* is not a \.npz file"):
        from_rannet(tmp_path / "x.safetensors", tmp_path / "ran", ran_config(fixture_config))
    with pytest.raises(ValueError, match=r"config must be a RANConfig or a mapping"):
        from_rannet(variables, tmp_path / "ran", "small")
    with pytest.raises(ValueError, match=r"strict must be a bool"):
        from_rannet(variables, tmp_path / "ran", ran_config(fixture_config), strict="no")
    nan = dict(variables)
    key = next(k for k in nan if k.endswith("Embedding-LayerNorm/gamma:0"))
    nan[key] = np.full_like(nan[key], np.nan)
    with pytest.raises(ValueError, match=r"variables: weights \['embedding_norm.weight'\] contain NaN"):
        from_rannet(nan, tmp_path / "ran", ran_config(fixture_config))


def test_rannet_mlm_head_variables_make_an_lm_token_head(tmp_path, official):
    # token_head defaults to "lm" when the MLM head's variables are there
    data, fixture_config, variables = official
    d = fixture_config["embedding_size"]
    rng = np.random.default_rng(0)
    head = {"MLM-Hidden/Dense/kernel:0": rng.standard_normal((d, d)).astype(np.float32),
            "MLM-Hidden/Dense/bias:0": np.zeros(d, np.float32),
            "MLM-Hidden/LayerNorm/gamma:0": np.ones(d, np.float32),
            "MLM-Hidden/LayerNorm/beta:0": np.zeros(d, np.float32),
            "MLM-Matching/bias:0": np.zeros(fixture_config["vocab_size"], np.float32)}
    out = from_rannet(dict(variables, **head), tmp_path / "ran", ran_config(fixture_config))
    config, weights = io.load_model_dir(out)
    assert config["token_head"] == "lm"
    np.testing.assert_array_equal(weights["lm_head.dense.weight"],
                                  head["MLM-Hidden/Dense/kernel:0"].T)
    assert_ran_matches(data, out)
