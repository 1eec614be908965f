"""Greedy decoding over the step protocol shared by the trainer's encoder-decoder models.

A model implements ``encode(src, src_lengths) -> state`` and
``decode_step(state, token) -> (logits (B, V), new_state, attention_weights)`` and has a
``config`` with ``bos_id``, ``eos_id`` and ``pad_id``.
"""

from __future__ import annotations

import numpy as np

from ..models.base import check_finite
from . import autograd as ag

__all__ = ["greedy_decode"]


def greedy_decode(model, src: np.ndarray, src_lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Greedy decoding from ``bos_id`` for at most ``max_len`` steps, without gradients.

    Stops early once every row has emitted ``eos_id``.

    Parameters
    ----------
    model : an encoder-decoder with the step protocol above
    src : int (B, S); src_lengths : int (B,)
    max_len : int

    Returns
    -------
    tokens : int64 (B, n) with n <= max_len: the predictions, ``eos_id`` included, then ``pad_id``
    """
    config = model.config
    batch = np.asarray(src).shape[0]
    was_training = model.training
    model.eval()
    try:
        with ag.no_grad():
            state = model.encode(src, src_lengths)
            token = np.full(batch, config.bos_id, dtype=np.int64)
            finished = np.zeros(batch, dtype=bool)
            outputs = []
            for _ in range(max_len):
                logits, state, _ = model.decode_step(state, token)
                # (an argmax of NaN names a token all the same: a broken model was scored as
                # one that decodes badly)
                check_finite(logits.data, "logits")
                token = np.where(finished, config.pad_id, logits.data.argmax(axis=-1)).astype(np.int64)
                outputs.append(token)
                finished |= token == config.eos_id
                if finished.all():
                    break
    finally:
        model.train(was_training)
    return np.stack(outputs, axis=1) if outputs else np.zeros((batch, 0), dtype=np.int64)
