"""Between trainer models and model directories (:mod:`attncore.io`).

:func:`export` writes a trained model (weights checked against the architecture's spec) with its
vocabularies; :func:`load_model` rebuilds the trainer model from a directory, e.g. to compare
the inference engine with the NumPy reference forward pass on the very same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

# TRAINING_FILE: what the trainer writes beside the model about the run (task, its options,
# seed...), read by ``python -m attncore.train.evaluate MODEL_DIR`` when it is given no --task;
# the engine ignores it (``attncore.io.save_model_dir`` writes it with the model, or removes a
# stale one)
from attncore.io import TRAINING_FILE

__all__ = ["export", "load_model", "model_from_config", "TRAINING_FILE"]


def export(model, out_dir, src_vocab=None, tgt_vocab=None, labels=None,
           max_source_tokens=None, training=None) -> Path:
    """Write ``model`` as an attncore model directory.

    ``labels`` (class names of a classifier, in logit order) go to ``config["labels"]``, so
    ``attncore classify`` prints names. ``max_source_tokens`` (a classification task's
    ``max_len``) makes the served tokenizer cut documents as training did. ``training`` (a
    JSON-ready dict: task, task options, seed...) is written as :data:`TRAINING_FILE`.
    Vocabularies (objects with ``save(path)``, e.g. :class:`attncore.data.Vocab`) are saved as
    ``src_vocab.json`` / ``tgt_vocab.json`` and referenced from ``config["tokenizer"]`` as
    ``{"type": "attncore.data.vocab", "src": "src_vocab.json", "tgt": "tgt_vocab.json"}``.
    """
    from attncore import io

    config = model.config.to_dict()
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != int(config.get("num_classes", 0)):
            raise ValueError(f"labels has {len(labels)} names for a model with "
                             f"{config.get('num_classes', 0)} classes")
        config["labels"] = labels
    files = {}
    if src_vocab is not None:
        files["src"] = src_vocab
    if tgt_vocab is not None:
        files["tgt"] = tgt_vocab
    if files:
        config["tokenizer"] = {"type": "attncore.data.vocab", **{side: f"{side}_vocab.json" for side in files}}
        if max_source_tokens is not None:
            config["tokenizer"]["max_source_tokens"] = int(max_source_tokens)
    # each vocabulary's JSON as the vocabulary itself writes it, handed to save_model_dir
    # (which refuses a tokenizer entry naming files it does not get)
    texts = {f"{side}_vocab.json": vocab.to_json() for side, vocab in files.items()}
    return io.save_model_dir(Path(out_dir), config, model.state_dict(), tokenizer_files=texts,
                             training=None if training is None
                             else json.dumps(training, indent=1) + "\n")


def model_from_config(config: dict, seed: int = 0):
    """An untrained trainer model for a ``config.json`` dict (seq2seq_attention, transformer, ran)."""
    architecture = config.get("architecture")
    if architecture == "seq2seq_attention":
        from .seq2seq import Seq2SeqAttention, Seq2SeqConfig
        return Seq2SeqAttention(Seq2SeqConfig.from_dict(config), seed=seed)
    if architecture == "transformer":
        from .transformer import Transformer, TransformerConfig
        return Transformer(TransformerConfig.from_dict(config), seed=seed)
    if architecture == "ran":
        from .ran import RAN, RANConfig
        return RAN(RANConfig.from_dict(config), seed=seed)
    raise ValueError(f"no trainer model for architecture {architecture!r}")


def load_model(path):
    """The trainer model stored in the model directory ``path`` (validated by :func:`attncore.io.load_model_dir`)."""
    from attncore import io

    config, weights = io.load_model_dir(path)
    # (the engine refuses these when it builds a model; the trainer's decoder took NaN logits'
    # argmax, and evaluate scored a broken model instead of saying so)
    bad = io.first_nonfinite(weights)
    if bad is not None:
        raise ValueError(f"{str(path)!r}: tensor {bad!r} holds NaN or infinity")
    model = model_from_config(config)
    model.load_state_dict(weights)
    model.eval()
    return model
