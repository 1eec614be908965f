# SPDX-License-Identifier: Apache-2.0
"""Fronts of the row and matrix kernels: softmax, linear / matmul (BLAS), norms, activations,
embedding gather, position tables. Each validates, picks the dtype path and calls the kernel."""
import numpy as np

from .. import reference
from . import _blas, _layers, _softmax
from ._memory import empty_for_streaming
from ._validation import (as_c_contiguous, check_axis, check_bool, check_bool_mask,
                          check_finite_float, check_float_array, check_ids, check_lengths,
                          check_positive_float, check_size, n_rows)
from .threads import BLAS_SMALL_GEMM_MACS, kernel_threads

__all__ = ["softmax", "log_softmax", "linear", "PackedLinearWeight", "round_bfloat16",
           "WEIGHT_DTYPES", "matmul", "layer_norm", "relu", "gelu", "gelu_tanh", "swish", "tanh",
           "sigmoid", "embedding", "sinusoidal_positions", "rotary"]


def _softmax_front(x, axis, lengths, mask, log_output, name):
    x = check_float_array(x, "x")
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have at least 1 dimension, got a scalar")
    axis = check_axis(axis, x.ndim)
    if lengths is None and mask is None:
        if axis == x.ndim - 1:
            return _softmax.softmax_last(x, log_output, kernel_threads())
        P, A, B = _swap_shape(x.shape, axis)
        if x.dtype == np.float32 and x.size and B >= COLUMN_SOFTMAX_MIN:
            # down the columns where they lie: no transposes there and back
            x3 = np.ascontiguousarray(x).reshape(P, A, B)
            out = np.empty_like(x3)
            _softmax.softmax_cols(x3, out, log_output, kernel_threads())
            return out.reshape(x.shape)
    moved = _axis_last(x, axis)
    rows_shape = moved.shape[:-1]
    n = moved.shape[-1]
    lengths_rows = None
    if lengths is not None:
        lengths_rows = check_lengths(lengths, "lengths", rows_shape, n).reshape(-1)
    mask_rows = None
    if mask is not None:
        m = check_bool_mask(mask, "mask", x.shape)
        mask_rows = np.ascontiguousarray(np.moveaxis(m, axis, -1)).reshape(n_rows(moved.shape), n).view(np.uint8)
    x2 = moved.reshape(n_rows(moved.shape), n)
    out = np.empty_like(x2)
    _softmax.softmax_rows(x2, out, lengths_rows, mask_rows, log_output, kernel_threads())
    return _axis_back(out.reshape(moved.shape), axis, x.shape)


#: float32 softmax over an axis followed by at least this many elements (the columns) runs
#: down the columns where they lie (``_softmax.softmax_cols``) instead of moving the axis
#: last: the two transposes had made it 0.6-0.9x torch. Narrower rows (16-32 columns) are
#: faster through the transposes: the column kernel's per-row work is too short.
COLUMN_SOFTMAX_MIN = 64


def _swap_shape(shape, axis):
    """(P, A, B): ``shape`` as the axes before ``axis``, ``axis`` and the axes after it."""
    return n_rows(shape[:axis] + (1,)), shape[axis], n_rows(shape[axis + 1:] + (1,))


#: The axes after the softmax axis span at least this many elements before the blocked
#: transpose copies it last: below, NumPy's strided copy reads whole cache lines anyway
#: (a (64, 512, 64) softmax over axis 1 ran 1.6x slower through the transpose's blocks).
SWAP_MIN_STRIDE = 256


def _axis_last(x, axis):
    """``np.moveaxis(x, axis, -1)`` as a C-contiguous array, copied by the blocked transpose
    (``_layers.swap_last_axes``) where the axis moves over a long stride."""
    if axis == x.ndim - 1:   # (already last: np.moveaxis alone cost 4 us a call)
        return np.ascontiguousarray(x)
    P, A, B = _swap_shape(x.shape, axis)
    if B < SWAP_MIN_STRIDE or x.size == 0:
        return np.ascontiguousarray(np.moveaxis(x, axis, -1))
    moved = np.empty(x.shape[:axis] + x.shape[axis + 1:] + (A,), dtype=x.dtype)
    _layers.swap_last_axes(np.ascontiguousarray(x).reshape(P, A, B), moved.reshape(P, B, A),
                           kernel_threads())
    return moved


def _axis_back(moved, axis, shape):
    """The inverse of :func:`_axis_last`: an array of ``shape`` (C-contiguous)."""
    if axis == len(shape) - 1:
        return moved
    P, A, B = _swap_shape(shape, axis)
    if B < SWAP_MIN_STRIDE or moved.size == 0:
        return np.moveaxis(moved, -1, axis)
    out = np.empty(shape, dtype=moved.dtype)
    _layers.swap_last_axes(moved.reshape(P, B, A), out.reshape(P, A, B), kernel_threads())
    return out


def softmax(x, axis=-1, *, lengths=None, mask=None):
    """Numerically stable softmax over ``axis``.

    Parameters
    ----------
    x : (..., n, ...) float32 or float64
    lengths : int array of x.shape without ``axis`` (broadcastable), optional
        Entries at index >= lengths along ``axis`` are excluded.
    mask : bool array broadcastable to x.shape, optional
        False entries are excluded.

    Returns an array like x. Excluded entries are 0; a row with nothing valid is all 0 (never NaN).
    """
    return _softmax_front(x, axis, lengths, mask, False, "softmax")


def log_softmax(x, axis=-1, *, lengths=None, mask=None):
    """log(softmax(x)) computed stably: excluded entries are -inf, a row with nothing valid is
    all 0 (so padded rows never put inf/NaN into a loss). Arguments as in :func:`softmax`."""
    return _softmax_front(x, axis, lengths, mask, True, "log_softmax")


WEIGHT_DTYPES = ("float32", "bfloat16", "int8")


def check_weight_dtype(weight_dtype, name="weight_dtype") -> str:
    """``weight_dtype`` if it is one of :data:`WEIGHT_DTYPES`, else TypeError / ValueError."""
    if not isinstance(weight_dtype, str):
        raise TypeError(f"{name} must be a str, got {type(weight_dtype).__name__}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{name} must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    return str(weight_dtype)   # (a numpy.str_ failed where Cython takes an exact str)


def round_bfloat16(x):
    """x rounded to the nearest bfloat16 (ties to even), returned as float32.

    bfloat16 keeps float32's exponent and 8 of its 24 significand bits: a relative error of at
    most 2^-9. These are the values a ``"bfloat16"`` :class:`PackedLinearWeight` (and a model
    loaded with ``weight_dtype="bfloat16"``) computes with. NaN stays NaN; finite values beyond
    the largest bfloat16 (~3.39e38) become infinite.

    x : array of any shape, any float dtype (cast to float32 first).
    """
    x = check_float_array(x, "x")
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty_like(flat)
    if flat.size:
        _blas.round_bf16(flat, out)
    return out.reshape(x.shape)


class PackedLinearWeight:
    """An ``nn.Linear`` weight (out_features, in_features) laid out once for decoding.

    Stored as ``panels`` (ceil(out / PANEL_WIDTH), in, PANEL_WIDTH): panel b holds rows
    ``[b * 64, b * 64 + 64)`` of the weight, transposed, zero-padded past ``out_features`` (see
    ``src_c/packed_linear.h``). :func:`linear` with a packed weight runs products of up to 256
    rows (decoding steps; 16 without AVX2) on attncore's panel kernel, which reads each panel as
    one sequential stream and never re-packs; larger products run the tile kernel (AVX2 /
    AVX-512; BLAS elsewhere) reading the panels in place, and int8 weights their int8 kernel
    at any row count. Models pack
    their decoder weights at load; the packed copy costs as much memory as the weight.

    ``weight_dtype="bfloat16"`` stores the panels in bfloat16 (``panels`` is then uint16, its
    pairs of columns interleaved), each weight rounded to nearest: half the memory, and half the
    bytes a decoding step streams. Products still run in float32 on the rounded values, with
    exactly the bits a float32 packed weight of ``round_bfloat16(weight)`` gives.

    ``weight_dtype="int8"`` quantizes: each output's weights become int8 with one float32 scale
    (``max |w| / 127``), and every product quantizes each row of x the same way on the fly and
    sums in exact int32 arithmetic (AVX-512 VNNI where the CPU has it, a portable loop
    elsewhere), then scales (``src_c/packed_linear.h``; :func:`attncore.reference.linear_int8`
    is the formula in NumPy, with the same bits). A quarter of float32's bytes; results
    differ from float32 by the quantization (about 1% of a typical output), not by rounding
    alone as bfloat16's. ``panels`` is then int8 of shape ``(ceil(out / 64), ceil(in / 64) * 64
    + 9, 64)`` (weights, then scales, sums and in_features); in_features at most 32768.

    weight : (out_features, in_features) array (cast to float32; finite for "int8")
    weight_dtype : "float32" (default), "bfloat16" or "int8"
    """

    __slots__ = ("panels", "shape", "weight_dtype")

    def __init__(self, weight, weight_dtype="float32"):
        weight_dtype = check_weight_dtype(weight_dtype)
        weight = check_float_array(weight, "weight", ndim=2)
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        out_features, in_features = weight.shape
        if out_features == 0 or in_features == 0:
            raise ValueError(f"weight must have non-zero dimensions, got shape {weight.shape}")
        width = _blas.PANEL_WIDTH
        shape = ((out_features + width - 1) // width, in_features, width)
        # on huge pages where the OS has them: a step streams every panel (see _memory)
        if weight_dtype == "int8":
            if in_features > _blas.INT8_MAX_IN_FEATURES:
                raise ValueError(f"weight: int8 packing takes at most "
                                 f"{_blas.INT8_MAX_IN_FEATURES} in_features, got {in_features}")
            if not np.all(np.isfinite(weight)):
                raise ValueError("weight holds NaN or infinity, which int8 cannot quantize")
            self.panels = empty_for_streaming(_blas.int8_panels_shape(*weight.shape), np.int8)
            _blas.pack_panels_i8(weight, self.panels)
        elif weight_dtype == "bfloat16":
            self.panels = empty_for_streaming(shape, np.uint16)
            _blas.pack_panels_bf16(weight, self.panels)
        else:
            self.panels = empty_for_streaming(shape, np.float32)
            _blas.pack_panels(weight, self.panels)
        self.panels.flags.writeable = False
        self.shape = (out_features, in_features)
        self.weight_dtype = weight_dtype

    @property
    def dtype(self):
        """The dtype of the products (float32 inputs and outputs, whatever the storage)."""
        return np.dtype(np.float32)

    def unpack(self) -> np.ndarray:
        """The (out_features, in_features) float32 weight back (rounded to bfloat16 when so
        stored; for int8 the dequantized weight, scale times int8 value), as a new array."""
        out_features, in_features = self.shape
        panels = self.panels
        if self.weight_dtype == "int8":
            quantized, scales = self.int8_parts()
            return quantized.astype(np.float32) * scales[:, None]
        if self.weight_dtype == "bfloat16":
            # a row of 64 holds (column c, column c + 16) pairs per half of 32 columns
            width = panels.shape[2]
            pairs = panels.reshape(panels.shape[:2] + (width // 32, 16, 2))
            columns = pairs.transpose(0, 1, 2, 4, 3).reshape(panels.shape)
            panels = (columns.astype(np.uint32) << 16).view(np.float32)
        weight = panels.transpose(0, 2, 1).reshape(-1, in_features)[:out_features]
        # (a new array already, except with one in_feature: the reshape is then a view of the
        # read-only panels)
        return weight.copy() if np.may_share_memory(weight, self.panels) else \
            np.ascontiguousarray(weight)

    def int8_parts(self):
        """For an int8 weight: its (out_features, in_features) int8 values and (out_features,)
        float32 scales, read back from the panels."""
        if self.weight_dtype != "int8":
            raise ValueError(f"int8_parts: this weight is {self.weight_dtype}, not int8")
        out_features, in_features = self.shape
        panels = self.panels
        groups = (panels.shape[1] - 9) // 4   # then 8 rows of scales and sums, 1 holding K
        width = panels.shape[2]
        # (panel, group, column, 4) -> (panel, column, group * 4)
        body = panels[:, :groups * 4].reshape(panels.shape[0], groups, width, 4)
        quantized = body.transpose(0, 2, 1, 3).reshape(-1, groups * 4)[:out_features, :in_features]
        tail = np.ascontiguousarray(panels[:, groups * 4:]).reshape(panels.shape[0], -1)
        scales = tail[:, :4 * width].copy().view(np.float32).reshape(-1)[:out_features]
        return np.ascontiguousarray(quantized), scales

    def __repr__(self):
        return f"PackedLinearWeight(shape={self.shape}, weight_dtype={self.weight_dtype!r})"


def linear(x, weight, bias=None):
    """y = x . weight^T + bias (torch ``nn.Linear`` layout).

    x : (..., in_features); weight : (out_features, in_features) array, or a
    :class:`PackedLinearWeight` (then x must be float32); bias : (out_features,) or None.
    Returns (..., out_features), dtype of x. Unpacked weights run on BLAS, with products of up
    to 16 float32 rows on attncore's own few-row kernel and, on AVX2 and AVX-512 machines, larger float32
    ones on its tile kernel (see :func:`matmul`).
    """
    x = check_float_array(x, "x", min_ndim=1)
    packed = isinstance(weight, PackedLinearWeight)
    if packed:
        if x.dtype != np.float32:
            raise TypeError(f"x must be float32 to use a PackedLinearWeight, got {x.dtype}")
    else:
        weight = check_float_array(weight, "weight", ndim=2, dtype=x.dtype)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out_features, {x.shape[-1]}) to match x's last "
                         f"dimension, got {weight.shape}")
    if bias is not None:
        bias = check_float_array(bias, "bias", ndim=1, dtype=x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
    x2 = x.reshape(n_rows(x.shape), x.shape[-1])
    out = np.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype)
    if packed:
        _blas.linear_packed(x2, weight.panels, weight.shape[0], bias, out, BLAS_SMALL_GEMM_MACS,
                            kernel_threads())
    else:
        _blas.linear(x2, weight, bias, out, kernel_threads())
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


def matmul(a, b, *, transpose_b=False, alpha=1.0):
    """alpha * a . b (or a . b^T) per batch entry: BLAS, or for float32 on AVX2 and AVX-512 machines
    attncore's tile kernel (``src_c/tile_gemm.h``).

    a : (m, k) or (batch, m, k); b : same rank, (k, n) or, with ``transpose_b``, (n, k).
    """
    a = check_float_array(a, "a")
    b = check_float_array(b, "b", dtype=a.dtype)
    if a.ndim not in (2, 3) or b.ndim != a.ndim:
        raise ValueError(f"a and b must both be 2-D or both 3-D, got shapes {a.shape} and {b.shape}")
    alpha = check_finite_float(alpha, "alpha", a.dtype)
    transpose_b = check_bool(transpose_b, "transpose_b")
    squeeze = a.ndim == 2
    a3, b3 = (a[None], b[None]) if squeeze else (a, b)
    if a3.shape[0] != b3.shape[0]:
        raise ValueError(f"a and b must have the same batch size, got {a3.shape[0]} and {b3.shape[0]}")
    k_b = b3.shape[2] if transpose_b else b3.shape[1]
    if k_b != a3.shape[2]:
        raise ValueError(f"inner dimensions differ: a has {a3.shape[2]} columns, b has {k_b} "
                         f"{'columns (transpose_b=True)' if transpose_b else 'rows'}")
    n = b3.shape[1] if transpose_b else b3.shape[2]
    out = np.empty((a3.shape[0], a3.shape[1], n), dtype=a.dtype)
    _blas.matmul(a3, b3, out, bool(transpose_b), alpha, kernel_threads())
    return out[0] if squeeze else out


_NORM_MODES = {"standard": 0, "uncentred": 1, "rms": 2}


def layer_norm(x, gamma=None, beta=None, eps=1e-5, *, mode="standard"):
    """Normalise the last axis of x (..., dim): gamma * (x - c) / sqrt(m2 + eps) + beta.

    mode "standard": the usual LayerNorm (c = mean, m2 = variance); "uncentred": RAN's (langml)
    LayerNorm (c = mean, m2 = mean(x^2)); "rms": RMSNorm (c = 0, m2 = mean(x^2)).
    gamma, beta : (dim,) or None. Statistics are accumulated in float64 (float32 input: the
    output in float32 arithmetic, a few roundings from the exact value).
    """
    x = check_float_array(x, "x", min_ndim=1)
    if not isinstance(mode, str) or mode not in _NORM_MODES:
        raise ValueError(f"mode must be one of {sorted(_NORM_MODES)}, got {mode!r}")
    eps = check_finite_float(eps, "eps", x.dtype)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    dim = x.shape[-1]
    params = []
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None:
            p = check_float_array(p, name, ndim=1, dtype=x.dtype)
            if p.shape[0] != dim:
                raise ValueError(f"{name} must have shape ({dim},), got {p.shape}")
        params.append(p)
    return _layers.layer_norm(x, params[0], params[1], eps, _NORM_MODES[mode], kernel_threads())


def _activation(x, kind):
    return _layers.activation(check_float_array(x, "x"), kind, kernel_threads())


def relu(x):
    """max(x, 0), element-wise."""
    return _activation(x, 0)


def gelu(x):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt(2))), element-wise."""
    return _activation(x, 1)


def gelu_tanh(x):
    """GELU, tanh approximation, element-wise."""
    return _activation(x, 2)


def swish(x):
    """x * sigmoid(x) (SiLU), element-wise."""
    return _activation(x, 3)


def tanh(x):
    """tanh(x), element-wise."""
    return _activation(x, 4)


def sigmoid(x):
    """1 / (1 + exp(-x)), element-wise."""
    return _activation(x, 5)


def embedding(table, ids):
    """Gather rows: table (vocab, dim)[ids] -> ids.shape + (dim,). ids must lie in [0, vocab)."""
    table = check_float_array(table, "table", ndim=2)
    return _layers.embedding(table, check_ids(ids, "ids", table.shape[0]), kernel_threads())


def sinusoidal_positions(length, dim, dtype=np.float32, base=10000.0):
    """Vaswani et al. position table (length, dim): sin on even, cos on odd dimensions,
    positions from 0. Computed once per model in float64, then cast (a float dtype), a block of
    rows at a time (a whole float64 table and its temporaries were 3x the result's memory).
    length * dim is bounded (2^31 entries), base > 0."""
    length = check_size(length, "length")
    dim = check_size(dim, "dim", minimum=1)
    if length * dim > 1 << 31:
        raise ValueError(f"length * dim must be at most 2^31 entries, got {length} x {dim}")
    base = check_positive_float(base, "base")
    if np.dtype(dtype).kind != "f":
        raise TypeError(f"dtype must be a float dtype, got {np.dtype(dtype)}")
    out = np.empty((length, dim), dtype=dtype)
    rows = max(1, (1 << 20) // dim)          # ~8 MB of float64 a block
    for first in range(0, length, rows):
        count = min(rows, length - first)
        out[first:first + count] = reference.sinusoidal_positions(count, dim, dtype=dtype,
                                                                  base=base, first=first)
    return out


def rotary(x, positions=None, base=10000.0):
    """Interleaved rotary embedding (pairs (2i, 2i+1)) over x (..., length, dim), dim even.

    positions : (length,) int, default 0..length-1. Returns a new array.
    """
    x = check_float_array(x, "x", min_ndim=2)
    length, dim = x.shape[-2], x.shape[-1]
    if dim % 2:
        raise ValueError(f"x's last dimension must be even for rotary pairs, got {dim}")
    base = check_positive_float(base, "base")
    if positions is None:
        positions = np.arange(length, dtype=np.int64)
    else:
        positions = np.asarray(positions)
        if positions.dtype.kind not in "iu":
            raise TypeError(f"positions must be an integer array, got dtype {positions.dtype}")
        if positions.dtype.kind == "u" and positions.size and \
                positions.max() > np.iinfo(np.int64).max:   # (wrapped to negative positions)
            raise ValueError(f"positions must fit int64, got {positions.max()}")
        if positions.shape != (length,):
            raise ValueError(f"positions must have shape ({length},), got {positions.shape}")
        positions = as_c_contiguous(positions, np.int64)
    out = np.array(x, copy=True).reshape(n_rows(x.shape[:-1]), length, dim)
    _layers.rotary(out, positions, base, kernel_threads())
    return out.reshape(x.shape)
