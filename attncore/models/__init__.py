# SPDX-License-Identifier: Apache-2.0
"""Engine models (``docs/ENGINE.md``): :func:`load` picks the class from ``config.json``.

The architecture modules are imported lazily, on first use, so a model family whose module
is missing or broken never stops the others from loading.
"""
from __future__ import annotations

import importlib

from .base import EncoderDecoderModel, GenerationResult, Model

__all__ = ["load", "from_config", "model_class", "Model", "EncoderDecoderModel",
           "GenerationResult", "Seq2SeqAttention", "Transformer", "RAN"]

# config["architecture"] -> (module under attncore.models, class name)
_REGISTRY = {
    "seq2seq_attention": ("seq2seq", "Seq2SeqAttention"),
    "transformer": ("transformer", "Transformer"),
    "ran": ("ran", "RAN"),
}
_CLASS_NAMES = {name: (module, name) for module, name in _REGISTRY.values()}


def model_class(architecture):
    """The engine class for ``architecture`` (a ``config["architecture"]`` value).

    Raises ValueError for an unknown architecture.
    """
    if not isinstance(architecture, str) or architecture not in _REGISTRY:
        raise ValueError(f"unknown architecture {architecture!r}; the engine runs "
                         f"{sorted(_REGISTRY)}")
    module, name = _REGISTRY[architecture]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def load(path, *, weight_dtype: str = "float32") -> Model:
    """Load the model directory ``path`` as the engine class its architecture names.

    ``weight_dtype="bfloat16"`` rounds the weight matrices to bfloat16 and streams them at half
    the bytes in decoding steps; ``"int8"`` runs the products on int8 weights and per-row
    quantized inputs, a quarter of the bytes (see :class:`~attncore.models.base.Model`)."""
    return Model.load(path, weight_dtype=weight_dtype)


def from_config(config, seed: int = 0, tokenizer=None, *, weight_dtype: str = "float32") -> Model:
    """A random model of the class ``config["architecture"]`` names (trainer initialisation)."""
    return Model.from_config(config, seed=seed, tokenizer=tokenizer, weight_dtype=weight_dtype)


def __getattr__(name):
    # Lazy: ``attncore.models.Transformer`` imports its module on first access.
    if name in _CLASS_NAMES:
        module, cls = _CLASS_NAMES[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
