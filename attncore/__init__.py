# SPDX-License-Identifier: Apache-2.0
"""attncore: a CPU inference engine for attention models.

Kernels (Cython + C + OpenMP, BLAS through SciPy): softmax, fused scaled-dot-product attention,
additive / Luong / Nadaraya-Watson attention, linear, norms, activations, positions.
The NumPy oracle of every kernel is :mod:`attncore.reference`; the trainer is :mod:`attncore.train`.
Models (:func:`load`, :mod:`attncore.models`) run on the kernels: ``attncore.load(path).generate``.
"""
from .kernels import (AdditiveKeys, additive_attention, attention, embedding, gelu, gelu_tanh,
                      get_num_threads, layer_norm, linear, log_softmax, luong_attention, matmul,
                      nadaraya_watson, num_threads, project_keys, relu, rotary, set_num_threads,
                      sigmoid, sinusoidal_positions, softmax, swish, tanh)

from .models import GenerationResult, from_config, load

__version__ = "0.1.0"

__all__ = [
    "attention", "additive_attention", "project_keys", "AdditiveKeys", "luong_attention",
    "nadaraya_watson",
    "softmax", "log_softmax", "linear", "matmul", "layer_norm", "relu", "gelu", "gelu_tanh",
    "swish", "tanh", "sigmoid", "embedding", "sinusoidal_positions", "rotary",
    "set_num_threads", "get_num_threads", "num_threads", "info", "__version__",
    "load", "from_config", "GenerationResult", "Seq2SeqAttention", "Transformer", "RAN",
]


# the engine classes, imported with their modules on first use
_ENGINE_CLASSES = ("Seq2SeqAttention", "Transformer", "RAN")
# submodules reachable as attncore.NAME after a plain ``import attncore`` (the README's
# ``attncore.convert.from_pytorch_transformer``), imported on first use: they bring their own
# dependencies (safetensors readers, dask) that ``import attncore`` should not pay for
_LAZY_SUBMODULES = ("convert", "distributed", "batch", "generation", "heatmap", "io", "tokenizer",
                    "train", "reference", "models", "kernels")


def __getattr__(name):
    # the engine classes import their modules on first use (attncore.models does the same)
    if name in _ENGINE_CLASSES:
        from . import models
        return getattr(models, name)
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    # tab completion lists what __getattr__ provides too
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | set(_ENGINE_CLASSES))


def info():
    """Build and runtime facts: version, OpenMP, thread count, the CPUs this process may use,
    BLAS, SIMD level, whether int8 products run on AVX-512 VNNI and AMX (a dict). Finding out
    about AMX asks Linux, once per process, for leave to use the AMX tile state
    (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), as the first int8 product would: afterwards the
    process's threads save a larger state on each context switch (8 KiB more, only in threads
    that used the tiles)."""
    import numpy as np
    import scipy

    from .kernels import _blas, _threads, threads
    return {
        "version": __version__,
        "openmp": _threads.openmp_enabled(),
        "num_threads": get_num_threads(),
        "cpus": threads.available_cpus(),  # affinity capped by a cgroup CPU quota
        "simd": _threads.simd_name(),
        "int8_vnni": _blas.int8_vnni(),
        "int8_amx": _blas.int8_amx(),
        "blas": threads.BLAS_INFO,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
