# SPDX-License-Identifier: Apache-2.0
"""attncore's compiled kernels behind validated Python fronts.

Layers: fronts (this package's .py modules) validate and choose a strategy -> Cython wrappers
(``_*.pyx``, typed memoryviews, ``with nogil``) -> plain C kernels (``src_c/``) + BLAS through
``scipy.linalg.cython_blas``. ``threads`` owns the thread budget; ``_blas`` owns BLAS.
"""
from ._scipy_blas import preloaded as _blas_table_preloaded

# every module that takes BLAS from scipy.linalg.cython_blas, imported here at once: see
# _scipy_blas (150 ms of scipy.linalg's own imports saved at each start)
with _blas_table_preloaded():
    from . import _additive, _blas, _ran, _recurrent, _sdpa, _transformer  # noqa: F401
    from .attention import (AdditiveKeys, additive_attention, attention, luong_attention,
                            nadaraya_watson, project_keys)
    from .basic import (WEIGHT_DTYPES, PackedLinearWeight, embedding, gelu, gelu_tanh,
                        layer_norm, linear, log_softmax, matmul, relu, rotary, round_bfloat16,
                        sigmoid, sinusoidal_positions, softmax, swish, tanh)
    from .threads import get_num_threads, num_threads, set_num_threads

__all__ = [
    "attention", "additive_attention", "project_keys", "AdditiveKeys", "luong_attention",
    "nadaraya_watson",
    "softmax", "log_softmax", "linear", "PackedLinearWeight", "round_bfloat16", "WEIGHT_DTYPES",
    "matmul", "layer_norm", "relu", "gelu", "gelu_tanh",
    "swish", "tanh", "sigmoid", "embedding", "sinusoidal_positions", "rotary",
    "set_num_threads", "get_num_threads", "num_threads",
]
