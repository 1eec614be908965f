# SPDX-License-Identifier: Apache-2.0
"""Argument checks shared by every kernel front. Every message names the argument and says what
was expected and what was given; everything here runs before any ``nogil`` code."""
import math
import numbers

import numpy as np

from ._arrays import int64_first_outside, plain_float_array

FLOAT_DTYPES = (np.float32, np.float64)
# float32's largest finite value and smallest subnormal, for parameters of float32 kernels
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_SMALLEST = float(np.finfo(np.float32).smallest_subnormal)


def check_float_array(x, name, ndim=None, min_ndim=None, dtype=None):
    """Return ``x`` as a C-contiguous float32/float64 ndarray (copying only when needed)."""
    if plain_float_array(x, ndim, min_ndim, dtype):
        return x
    if isinstance(x, np.ma.MaskedArray):   # its mask would be silently dropped
        raise TypeError(f"{name} is a masked array: pass its data and give the kernel the "
                        f"exclusions (mask= or lengths=)")
    if type(x) is np.ndarray:
        arr = x
    else:   # (subclasses such as np.matrix as plain arrays)
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be an array of floats: {exc}") from None
    if arr.dtype.type not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}")
    if not arr.dtype.isnative:   # big-endian data: the kernels read native floats
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if min_ndim is not None and arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {arr.shape}")
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} like the other inputs, "
                        f"got {arr.dtype}")
    return as_c_contiguous(arr)


def as_c_contiguous(arr, dtype=None):
    """``arr`` as a C-contiguous array of ``dtype``, keeping its shape: unlike
    ``np.ascontiguousarray`` a 0-d array stays 0-d."""
    # the common case without np.require's generic path (~2 us per argument: a decoder step's
    # fronts check five or six arrays)
    if (type(arr) is np.ndarray and arr.flags.c_contiguous and arr.flags.aligned
            and (dtype is None or arr.dtype == dtype)):
        return arr
    # aligned too: an array viewed at an odd byte offset of a buffer reached the C kernels as
    # a misaligned pointer (undefined behaviour; memoryview refused an int64 one outright)
    return np.require(arr, dtype=dtype, requirements=["C", "A"])


def n_rows(shape):
    """Rows of an array of ``shape`` seen as (rows, shape[-1]): explicit, because NumPy cannot
    infer ``-1`` in ``reshape(-1, 0)`` for a zero-sized array."""
    return math.prod(shape[:-1])


def check_lengths(lengths, name, shape, max_value):
    """int64 C-contiguous array of ``shape`` with values in [0, max_value]."""
    arr = _as_array(lengths, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}") from None
    if _any_outside(arr, 0, max_value):
        bad = arr[(arr < 0) | (arr > max_value)].ravel()[0]
        raise ValueError(f"{name} values must lie in [0, {max_value}], got {int(bad)}")
    return as_c_contiguous(arr, np.int64)


def _any_outside(arr, low, high):
    """Whether an integer array holds a value outside [low, high] (one C pass over an int64
    array, NumPy's min and max for the others)."""
    first = int64_first_outside(arr, low, high)
    if first is not None:
        return first >= 0
    return bool(arr.size) and (arr.min() < low or arr.max() > high)


def check_ids(ids, name, vocab_size):
    """int64 array of token ids in [0, vocab_size)."""
    arr = _as_array(ids, name)
    if arr.size == 0 and arr.dtype.kind in "fb":  # np.asarray([]) is float64: no ids at all
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if _any_outside(arr, 0, vocab_size - 1):
        bad = arr[(arr < 0) | (arr >= vocab_size)].ravel()[0]
        raise ValueError(f"{name} values must lie in [0, {vocab_size}), got {int(bad)}")
    return as_c_contiguous(arr, np.int64)


def check_size(value, name, minimum=0, maximum=1 << 31):
    """An integer (not a bool, not 2.7, not "3") in [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must lie in [{minimum}, {maximum}], got {value}")
    return int(value)


def _as_real(value, name) -> float:
    """``value`` as a Python float when it is a real number (not a bool), else TypeError."""
    if type(value) is not float and (isinstance(value, bool)   # (float: no ABC check)
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive_float(value, name):
    value = _as_real(value, name)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _as_array(value, name):
    """np.asarray(value), its failure named (a ragged list gave NumPy's "inhomogeneous shape")."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be an array: {exc}") from None


def check_bool(value, name):
    """A flag as a Python bool: ``causal="False"`` was truthy, and applied the mask."""
    if value is True or value is False:   # (the common case without isinstance's tuple)
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_finite_float(value, name, dtype=None):
    """A finite real ``value`` as a Python float; with ``dtype`` (the inputs' float dtype, which
    the kernel computes in) also representable there: a float32 kernel turned 1e39 into inf
    and 1e-50 into 0 (NaN or zeros out, silently)."""
    value = _as_real(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if dtype is not None and np.dtype(dtype) == np.float32:
        if abs(value) > _FLOAT32_MAX:
            raise ValueError(f"{name} must be within float32's range (|{name}| <= "
                             f"{_FLOAT32_MAX:.4g}) for float32 inputs, got {value}")
        if value != 0 and abs(value) < _FLOAT32_SMALLEST / 2:
            raise ValueError(f"{name} ({value}) rounds to 0 in float32, the inputs' dtype")
    return value


def check_bool_mask(mask, name, shape):
    arr = _as_array(mask, name)
    if arr.dtype != np.bool_:
        hint = (" (an additive mask of 0 / -inf converts with `mask == 0`)"
                if arr.dtype.kind == "f" else "")
        raise TypeError(f"{name} must be a boolean array (True = keep), got dtype "
                        f"{arr.dtype}{hint}")
    try:
        arr = np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {np.shape(mask)} does not broadcast to {tuple(shape)}") from None
    return arr


def check_axis(axis, ndim, name="axis"):
    if type(axis) is int and -ndim <= axis < ndim:   # (the common case without the ABC check)
        return axis % ndim
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} {axis} is out of range for an array of {ndim} dimensions")
    return int(axis) % ndim
