"""A RAN model directory rebuilds through the trainer's generic loader (export.load_model)."""
import numpy as np
import pytest

from attncore import io
from attncore.train import autograd as ag
from attncore.train import export
from attncore.train.ran import RAN, RANConfig


def test_load_model_rebuilds_ran(tmp_path):
    config = RANConfig(vocab_size=30, embedding_size=16, ran_layers=2, head_num=2, head_size=8,
                       window_size=5, min_window_size=2, num_classes=3)
    model = RAN(config, seed=3)
    io.save_model_dir(tmp_path / "ran", config.to_dict(), model.state_dict())
    loaded = export.load_model(tmp_path / "ran")
    assert isinstance(loaded, RAN)
    ids = np.random.default_rng(0).integers(4, 30, size=(2, 13))
    with ag.no_grad():
        np.testing.assert_array_equal(model.classify(ids).data, loaded.classify(ids).data)


def test_load_model_returns_a_model_in_eval_mode(tmp_path):
    # a model trained with dropout must not drop anything once loaded for evaluation
    config = RANConfig(vocab_size=30, embedding_size=16, ran_layers=1, head_num=2, head_size=8,
                       window_size=5, min_window_size=2, num_classes=3, dropout=0.5)
    model = RAN(config, seed=3)
    io.save_model_dir(tmp_path / "ran", config.to_dict(), model.state_dict())
    loaded = export.load_model(tmp_path / "ran")
    assert not loaded.training
    ids = np.random.default_rng(0).integers(4, 30, size=(2, 13))
    model.eval()
    with ag.no_grad():
        np.testing.assert_array_equal(loaded.classify(ids).data, model.classify(ids).data)


def test_export_refuses_labels_that_are_not_one_per_class(tmp_path):
    config = RANConfig(vocab_size=30, embedding_size=16, ran_layers=1, head_num=2, head_size=8,
                       window_size=5, min_window_size=2, num_classes=3)
    model = RAN(config, seed=3)
    with pytest.raises(ValueError, match="labels has 2 names for a model with 3 classes"):
        export.export(model, tmp_path / "ran", labels=["a", "b"])
    assert not (tmp_path / "ran").exists()
    out = export.export(model, tmp_path / "ran", labels=["a", "b", 7])
    assert io.read_config(out)["labels"] == ["a", "b", "7"]
