"""A RAN model directory rebuilds through the trainer's generic loader (export.load_model)."""
import numpy as np

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
