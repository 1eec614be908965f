"""A small reverse-mode automatic differentiation over NumPy arrays.

This is the one gradient mechanism used by every model of the bundled trainer (seq2seq with
attention, Transformer, RAN). It favours plain code over speed: the models are tiny and the
forward pass doubles as the numerical reference the inference engine is tested against.

How it works
------------
A :class:`Tensor` wraps an ``np.ndarray`` (``.data``) and, once ``backward()`` ran, its gradient
(``.grad``, same shape and dtype). Every op computes its result eagerly with NumPy and, when one
of its inputs requires a gradient, records on the result a *backward function* and the list of
its parents. ``loss.backward()`` orders the recorded graph topologically (the "tape") and calls
each backward function once, from the loss back to the leaves::

    x = Tensor(np.random.randn(4, 3), requires_grad=True)
    w = Tensor(np.random.randn(3, 2), requires_grad=True)
    loss = (x @ w).tanh().sum()
    loss.backward()          # fills x.grad (4, 3) and w.grad (3, 2)

Broadcasting: a backward function may return a gradient with the *broadcast* shape of the
op's output; the engine sums it back to the parent's shape (:func:`unbroadcast`), so every
binary op supports NumPy broadcasting without writing that reduction by hand.

Defining a new op (the extension point, used e.g. by ``attncore/train/ran_ops.py``)
---------------------------------------------------------------------------------
Compute the forward value with NumPy, then call :func:`make_op` with the parents and a
closure that maps the output gradient to one gradient per parent (``None`` where a parent
needs none)::

    def cube(x):
        x = as_tensor(x)
        out = x.data ** 3
        def backward(grad):                      # grad: d loss / d out, shape of out
            return (grad * 3.0 * x.data ** 2,)   # one entry per parent, in order
        return make_op(out, (x,), backward)

Then add a finite-difference test with :func:`attncore.train.gradcheck.gradcheck` (float64).
Composite functions built only from existing ops (like :func:`uncentred_layer_norm`) need no
backward at all.

Conventions
-----------
* Shapes are batch-first. Dtype follows NumPy promotion; Python scalars adopt the tensor's dtype.
* Masks named ``valid`` are boolean arrays where ``True`` marks entries that take part and
  ``False`` entries that are excluded. Masks are constants (no gradient).
* Integer index arrays (token ids, targets) are plain ``np.ndarray``, never Tensors.
* ``with no_grad():`` disables recording (evaluation, decoding).
* GELU is the exact erf form ``x * Phi(x)`` (``torch.nn.functional.gelu`` default), not the tanh
  approximation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.special import erf as _erf

__all__ = [
    "Tensor", "as_tensor", "make_op", "no_grad", "is_grad_enabled", "unbroadcast",
    # elementwise arithmetic
    "add", "sub", "mul", "div", "neg", "power", "sqrt", "square",
    # linear algebra and reductions
    "matmul", "sum", "mean", "max",
    # shape
    "reshape", "transpose", "swapaxes", "getitem", "concat", "stack", "split",
    # activations
    "exp", "log", "tanh", "sigmoid", "relu", "gelu", "swish",
    # attention and normalisation
    "softmax", "log_softmax", "layer_norm", "uncentred_layer_norm", "rotary_interleaved",
    # selection and regularisation
    "embedding", "dropout", "where", "masked_fill",
    # losses
    "cross_entropy",
]

ArrayLike = Union["Tensor", np.ndarray, float, int]

_GRAD_ENABLED = True


@contextlib.contextmanager
def no_grad():
    """Context manager in which ops record nothing (no backward graph, less memory)."""
    global _GRAD_ENABLED
    previous = _GRAD_ENABLED
    _GRAD_ENABLED = False
    try:
        yield
    finally:
        _GRAD_ENABLED = previous


def is_grad_enabled() -> bool:
    """Whether ops currently record their backward function."""
    return _GRAD_ENABLED


class Tensor:
    """An ``np.ndarray`` with an optional gradient and the op that produced it.

    Parameters
    ----------
    data : array_like
        The value. Converted with ``np.asarray``; float data keeps its dtype, other data is
        converted to ``dtype`` (default float64) when ``requires_grad`` is set.
    requires_grad : bool
        Whether ``backward()`` should compute ``.grad`` for this tensor (leaves: parameters).
    name : str, optional
        A label used in error messages and by optimisers/checkpoints.

    Attributes
    ----------
    data : np.ndarray
    grad : np.ndarray or None
        Filled by :meth:`backward`, accumulated (``+=``) over calls until :meth:`zero_grad`.
    """

    __slots__ = ("data", "grad", "requires_grad", "name", "_parents", "_backward")
    __array_priority__ = 100  # make ``ndarray <op> Tensor`` defer to Tensor's reflected ops

    def __init__(self, data, requires_grad: bool = False, name: Optional[str] = None, dtype=None):
        array = np.asarray(data, dtype=dtype)
        if requires_grad and not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float64)
        self.data = array
        self.grad: Optional[np.ndarray] = None
        self.requires_grad = bool(requires_grad)
        self.name = name
        self._parents: Tuple["Tensor", ...] = ()
        self._backward: Optional[Callable] = None

    # -- basic properties ---------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def T(self) -> "Tensor":
        return transpose(self)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        label = f", name={self.name!r}" if self.name else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad}{label})"

    def numpy(self) -> np.ndarray:
        """The underlying array (not a copy)."""
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    # -- backward -------------------------------------------------------------------------
    def backward(self, grad: Optional[np.ndarray] = None) -> None:
        """Accumulate ``d self / d leaf`` into ``.grad`` of every tensor that requires grad.

        Parameters
        ----------
        grad : np.ndarray, optional
            The gradient of the final objective with respect to ``self``; defaults to 1 for a
            scalar (size-1) tensor.
        """
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without grad needs a scalar tensor, got shape {self.shape}")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.data.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"grad has shape {grad.shape}, expected {self.shape}")

        order = _topological_order(self)
        pending = {id(self): grad}
        for node in order:
            node_grad = pending.pop(id(node), None)
            if node_grad is None:
                continue
            if node._backward is None:  # a leaf
                if node.requires_grad:
                    node.grad = node_grad.copy() if node.grad is None else node.grad + node_grad
                continue
            parent_grads = node._backward(node_grad)
            if len(parent_grads) != len(node._parents):
                raise RuntimeError(f"backward of an op returned {len(parent_grads)} gradients "
                                   f"for {len(node._parents)} parents")
            for parent, parent_grad in zip(node._parents, parent_grads):
                if parent_grad is None or not parent.requires_grad:
                    continue
                parent_grad = unbroadcast(np.asarray(parent_grad), parent.shape).astype(parent.dtype, copy=False)
                key = id(parent)
                pending[key] = parent_grad if key not in pending else pending[key] + parent_grad
            # Free the graph behind us; a second backward through it raises instead of
            # silently treating the freed node as a leaf.
            node._backward = _graph_already_freed
            node._parents = ()

    # -- operators ------------------------------------------------------------------------
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __neg__(self): return neg(self)
    def __pow__(self, exponent): return power(self, exponent)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __getitem__(self, index): return getitem(self, index)

    # -- method forms of the ops ------------------------------------------------------------
    def sum(self, axis=None, keepdims=False): return sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return max(self, axis, keepdims)
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)
    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return transpose(self, axes or None)
    def swapaxes(self, a, b): return swapaxes(self, a, b)
    def exp(self): return exp(self)
    def log(self): return log(self)
    def tanh(self): return tanh(self)
    def sigmoid(self): return sigmoid(self)
    def relu(self): return relu(self)
    def sqrt(self): return sqrt(self)


def _graph_already_freed(grad):
    raise RuntimeError("backward() through a graph a second time: the first backward freed it; "
                       "recompute the forward pass")


def _topological_order(root: Tensor):
    """Nodes reachable from ``root``, each after every node that depends on it (iterative DFS)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


def as_tensor(value: ArrayLike, like: Optional[Tensor] = None) -> Tensor:
    """Wrap ``value`` as a constant Tensor (Tensors pass through unchanged).

    Python scalars take ``like``'s dtype so that ``x * 0.5`` keeps float32 float32.
    """
    if isinstance(value, Tensor):
        return value
    if like is not None and np.isscalar(value):
        return Tensor(np.asarray(value, dtype=like.dtype))
    return Tensor(value)


def make_op(out: np.ndarray, parents: Sequence[Tensor], backward: Callable) -> Tensor:
    """Wrap an op's forward value and record how to differentiate it.

    Parameters
    ----------
    out : np.ndarray
        The forward value.
    parents : sequence of Tensor
        The op's differentiable inputs, in the order ``backward`` returns their gradients.
    backward : callable
        ``backward(grad) -> tuple`` mapping ``d loss / d out`` (shape of ``out``) to one gradient
        per parent (``None`` for "no gradient"). A gradient may have the broadcast shape of
        ``out``; it is summed back to the parent's shape automatically.

    Returns
    -------
    Tensor
        Requires grad (and records ``backward``) iff grad mode is on and a parent requires grad.
    """
    result = Tensor(out)
    if _GRAD_ENABLED and any(p.requires_grad for p in parents):
        result.requires_grad = True
        result._parents = tuple(parents)
        result._backward = backward
    return result


def unbroadcast(grad: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes NumPy broadcasting added or stretched to reach ``grad.shape``.

    Parameters
    ----------
    grad : np.ndarray
        Gradient with the broadcast shape.
    shape : tuple of int
        The original operand's shape.
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def _binary(a: ArrayLike, b: ArrayLike) -> Tuple[Tensor, Tensor]:
    if isinstance(a, Tensor):
        return a, as_tensor(b, like=a)
    b = as_tensor(b)
    return as_tensor(a, like=b), b


def _normalise_axes(axis, ndim: int) -> Tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim for a in axis)


# ------------------------------------------------------------------------------------------
# Elementwise arithmetic
# ------------------------------------------------------------------------------------------

def add(a: ArrayLike, b: ArrayLike) -> Tensor:
    """``a + b`` with broadcasting."""
    a, b = _binary(a, b)
    return make_op(a.data + b.data, (a, b), lambda g: (g, g))


def sub(a: ArrayLike, b: ArrayLike) -> Tensor:
    """``a - b`` with broadcasting."""
    a, b = _binary(a, b)
    return make_op(a.data - b.data, (a, b), lambda g: (g, -g))


def mul(a: ArrayLike, b: ArrayLike) -> Tensor:
    """``a * b`` (elementwise) with broadcasting."""
    a, b = _binary(a, b)
    return make_op(a.data * b.data, (a, b), lambda g: (g * b.data, g * a.data))


def div(a: ArrayLike, b: ArrayLike) -> Tensor:
    """``a / b`` (elementwise) with broadcasting."""
    a, b = _binary(a, b)
    out = a.data / b.data
    return make_op(out, (a, b), lambda g: (g / b.data, -g * out / b.data))


def neg(a: ArrayLike) -> Tensor:
    """``-a``."""
    a = as_tensor(a)
    return make_op(-a.data, (a,), lambda g: (-g,))


def power(a: ArrayLike, exponent: float) -> Tensor:
    """``a ** exponent`` for a constant real exponent."""
    a = as_tensor(a)
    exponent = float(exponent)
    out = a.data ** exponent
    return make_op(out, (a,), lambda g: (g * exponent * a.data ** (exponent - 1.0),))


def square(a: ArrayLike) -> Tensor:
    """``a * a``."""
    a = as_tensor(a)
    return make_op(a.data * a.data, (a,), lambda g: (2.0 * g * a.data,))


def sqrt(a: ArrayLike) -> Tensor:
    """``sqrt(a)``."""
    a = as_tensor(a)
    out = np.sqrt(a.data)
    return make_op(out, (a,), lambda g: (g * 0.5 / out,))


# ------------------------------------------------------------------------------------------
# Linear algebra and reductions
# ------------------------------------------------------------------------------------------

def matmul(a: ArrayLike, b: ArrayLike) -> Tensor:
    """Batched matrix product ``a @ b`` with NumPy broadcasting of the batch dimensions.

    Parameters
    ----------
    a : (..., n, k)
    b : (..., k, m)
        Both operands need at least 2 dimensions (write ``x[None]`` for a vector).

    Returns
    -------
    Tensor (..., n, m)
    """
    a, b = _binary(a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs operands with >= 2 dims, got shapes {a.shape} and {b.shape}")

    def backward(g):
        return (g @ np.swapaxes(b.data, -1, -2), np.swapaxes(a.data, -1, -2) @ g)

    return make_op(a.data @ b.data, (a, b), backward)


def sum(a: ArrayLike, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors numpy
    """Sum over ``axis`` (int, tuple or None for all)."""
    a = as_tensor(a)
    axes = _normalise_axes(axis, a.ndim)
    out = a.data.sum(axis=axes, keepdims=keepdims)

    def backward(g):
        if not keepdims:
            g = np.expand_dims(g, axes)
        return (np.broadcast_to(g, a.shape),)

    return make_op(np.asarray(out), (a,), backward)


def mean(a: ArrayLike, axis=None, keepdims: bool = False) -> Tensor:
    """Arithmetic mean over ``axis`` (int, tuple or None for all)."""
    a = as_tensor(a)
    axes = _normalise_axes(axis, a.ndim)
    count = int(np.prod([a.shape[i] for i in axes])) if axes else 1
    return sum(a, axes, keepdims) * (1.0 / count)


def max(a: ArrayLike, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors numpy
    """Maximum over ``axis``; the gradient is shared equally between tied maxima."""
    a = as_tensor(a)
    axes = _normalise_axes(axis, a.ndim)
    out_keep = a.data.max(axis=axes, keepdims=True)
    out = out_keep if keepdims else np.squeeze(out_keep, axis=axes)

    def backward(g):
        if not keepdims:
            g = np.expand_dims(g, axes)
        is_max = (a.data == out_keep)
        share = is_max / is_max.sum(axis=axes, keepdims=True)
        return (g * share,)

    return make_op(np.asarray(out), (a,), backward)


# ------------------------------------------------------------------------------------------
# Shape
# ------------------------------------------------------------------------------------------

def reshape(a: ArrayLike, shape) -> Tensor:
    """``a.reshape(shape)``."""
    a = as_tensor(a)
    return make_op(a.data.reshape(shape), (a,), lambda g: (g.reshape(a.shape),))


def transpose(a: ArrayLike, axes=None) -> Tensor:
    """Permute axes (reverse them when ``axes`` is None), like ``np.transpose``."""
    a = as_tensor(a)
    if axes is None:
        axes = tuple(reversed(range(a.ndim)))
    axes = tuple(ax % a.ndim for ax in axes)
    inverse = tuple(np.argsort(axes))
    return make_op(np.transpose(a.data, axes), (a,), lambda g: (np.transpose(g, inverse),))


def swapaxes(a: ArrayLike, axis1: int, axis2: int) -> Tensor:
    """Exchange two axes."""
    a = as_tensor(a)
    axes = list(range(a.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(a, axes)


def getitem(a: ArrayLike, index) -> Tensor:
    """``a[index]`` for basic and advanced (integer-array) indices.

    Repeated integer indices accumulate their gradients (``np.add.at``).
    """
    a = as_tensor(a)
    if isinstance(index, Tensor):
        raise TypeError("index with a NumPy array, not a Tensor")
    out = a.data[index]

    def backward(g):
        full = np.zeros(a.shape, dtype=g.dtype)
        np.add.at(full, index, g)
        return (full,)

    return make_op(np.array(out, copy=True), (a,), backward)


def concat(tensors: Sequence[ArrayLike], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis (``np.concatenate``)."""
    tensors = [as_tensor(t) for t in tensors]
    out = np.concatenate([t.data for t in tensors], axis=axis)
    boundaries = np.cumsum([t.shape[axis] for t in tensors])[:-1]

    def backward(g):
        return tuple(np.split(g, boundaries, axis=axis))

    return make_op(out, tensors, backward)


def stack(tensors: Sequence[ArrayLike], axis: int = 0) -> Tensor:
    """Join same-shaped tensors along a new axis (``np.stack``)."""
    tensors = [as_tensor(t) for t in tensors]
    out = np.stack([t.data for t in tensors], axis=axis)

    def backward(g):
        return tuple(np.moveaxis(g, axis, 0))

    return make_op(out, tensors, backward)


def split(a: ArrayLike, sections, axis: int = 0):
    """Split like ``np.split``: ``sections`` is a count of equal parts or a list of cut indices.

    Returns
    -------
    list of Tensor
    """
    a = as_tensor(a)
    axis = axis % a.ndim
    length = a.shape[axis]
    if isinstance(sections, int):
        if length % sections:
            raise ValueError(f"axis {axis} of length {length} does not split into {sections} equal parts")
        cuts = list(range(0, length, length // sections)) + [length]
    else:
        cuts = [0] + list(sections) + [length]
    parts = []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, stop)
        parts.append(getitem(a, tuple(index)))
    return parts


# ------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------

def exp(a: ArrayLike) -> Tensor:
    """``exp(a)``."""
    a = as_tensor(a)
    out = np.exp(a.data)
    return make_op(out, (a,), lambda g: (g * out,))


def log(a: ArrayLike) -> Tensor:
    """Natural logarithm."""
    a = as_tensor(a)
    return make_op(np.log(a.data), (a,), lambda g: (g / a.data,))


def tanh(a: ArrayLike) -> Tensor:
    """Hyperbolic tangent."""
    a = as_tensor(a)
    out = np.tanh(a.data)
    return make_op(out, (a,), lambda g: (g * (1.0 - out * out),))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Two branches so that exp never overflows (exp of a non-positive number only).
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    exp_x = np.exp(x[~positive])
    out[~positive] = exp_x / (1.0 + exp_x)
    return out


def sigmoid(a: ArrayLike) -> Tensor:
    """Logistic function ``1 / (1 + exp(-a))``."""
    a = as_tensor(a)
    out = _sigmoid(a.data)
    return make_op(out, (a,), lambda g: (g * out * (1.0 - out),))


def relu(a: ArrayLike) -> Tensor:
    """``max(a, 0)``; the gradient at exactly 0 is taken as 0. NaN stays NaN (as torch's and the
    engine's relu: a NaN activation must not be hidden as 0)."""
    a = as_tensor(a)
    positive = a.data > 0
    kept = positive | np.isnan(a.data)
    return make_op(np.where(kept, a.data, 0).astype(a.dtype), (a,), lambda g: (g * positive,))


def gelu(a: ArrayLike) -> Tensor:
    """Exact GELU ``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`` (PyTorch's default, not tanh)."""
    a = as_tensor(a)
    x = a.data
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return make_op((x * cdf).astype(x.dtype), (a,), lambda g: (g * (cdf + x * pdf),))


def swish(a: ArrayLike) -> Tensor:
    """Swish / SiLU ``x * sigmoid(x)``."""
    a = as_tensor(a)
    s = _sigmoid(a.data)
    return make_op(a.data * s, (a,), lambda g: (g * (s + a.data * s * (1.0 - s)),))


# ------------------------------------------------------------------------------------------
# Softmax family and normalisation
# ------------------------------------------------------------------------------------------

def _masked_shifted(x: np.ndarray, axis: int, valid: Optional[np.ndarray]):
    """``x - max(x)`` over the valid entries, and the broadcast ``valid`` mask (or None)."""
    if valid is None:
        return x - x.max(axis=axis, keepdims=True), None
    valid = np.broadcast_to(np.asarray(valid, dtype=bool), x.shape)
    row_max = np.where(valid, x, -np.inf).max(axis=axis, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # fully excluded rows
    # Excluded entries are set to -inf so exp gives exactly 0 whatever their value was.
    return np.where(valid, x - row_max, -np.inf), valid


def softmax(x: ArrayLike, axis: int = -1, valid: Optional[np.ndarray] = None) -> Tensor:
    """Softmax over ``axis``, optionally restricted to the ``valid`` entries.

    Parameters
    ----------
    x : Tensor
        Scores, any shape.
    axis : int
    valid : bool array broadcastable to ``x``, optional
        ``False`` entries are excluded: their weight is exactly 0 and they get no gradient.
        A row with no valid entry yields all zeros (never NaN).
    """
    x = as_tensor(x)
    shifted, valid = _masked_shifted(x.data, axis, valid)
    e = np.exp(shifted)
    total = e.sum(axis=axis, keepdims=True)
    out = e / np.where(total > 0, total, 1.0)

    def backward(g):
        return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)

    return make_op(out.astype(x.dtype, copy=False), (x,), backward)


def log_softmax(x: ArrayLike, axis: int = -1, valid: Optional[np.ndarray] = None) -> Tensor:
    """Log-softmax over ``axis``, optionally restricted to the ``valid`` entries.

    Excluded entries (``valid`` False) hold **0**, not ``-inf``, and get no gradient, so that
    sums of ``mask * log_softmax`` stay finite; do not read them as log-probabilities. A row
    with no valid entry yields all zeros (never NaN).
    """
    x = as_tensor(x)
    shifted, valid = _masked_shifted(x.data, axis, valid)
    total = np.exp(shifted).sum(axis=axis, keepdims=True)
    log_total = np.log(np.where(total > 0, total, 1.0))
    out = shifted - log_total
    probs = np.exp(out)
    if valid is not None:
        out = np.where(valid, out, 0.0)
        probs = np.where(valid, probs, 0.0)

    def backward(g):
        if valid is not None:
            g = np.where(valid, g, 0.0)
        return (g - probs * g.sum(axis=axis, keepdims=True),)

    return make_op(out.astype(x.dtype, copy=False), (x,), backward)


def layer_norm(x: ArrayLike, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Standard layer normalisation over the last axis (``torch.nn.LayerNorm``).

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` with the biased variance.

    Parameters
    ----------
    x : (..., d)
    weight, bias : (d,), optional
        Affine parameters; omitted means 1 and 0.
    eps : float
    """
    x = as_tensor(x)
    mu = x.data.mean(axis=-1, keepdims=True)
    centred = x.data - mu
    inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    normalised = centred * inv_std

    def backward(g):
        # d/dx of (x - mu) * inv_std, written with the normalised value xhat:
        # dx = inv_std * (g - mean(g) - xhat * mean(g * xhat))
        dx = inv_std * (g - g.mean(axis=-1, keepdims=True)
                        - normalised * (g * normalised).mean(axis=-1, keepdims=True))
        return (dx,)

    out = make_op(normalised.astype(x.dtype, copy=False), (x,), backward)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def uncentred_layer_norm(x: ArrayLike, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         eps: float = 1e-7) -> Tensor:
    """The RAN / langml layer norm: ``(x - mean(x)) / sqrt(mean(x**2) + eps) * weight + bias``.

    The denominator uses the *uncentred* second moment E[x^2], not the variance (see
    ``RAN.md`` section 2.3). Built from primitive ops, so its gradient needs no extra code.
    Without ``weight`` and ``bias`` it is RAN's ``stdnorm``.
    """
    x = as_tensor(x)
    centred = x - mean(x, axis=-1, keepdims=True)
    out = centred / sqrt(mean(square(x), axis=-1, keepdims=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def rotary_interleaved(x: ArrayLike, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """Rotary position embedding on interleaved pairs ``(x[2i], x[2i+1])``.

    ``y[2i] = x[2i] cos - x[2i+1] sin``, ``y[2i+1] = x[2i+1] cos + x[2i] sin``.

    Parameters
    ----------
    x : (..., d), d even
    cos, sin : np.ndarray broadcastable to (..., d/2)
        Constant angle tables, e.g. ``cos(p / base**(2i/d))`` for position p and pair i.
    """
    x = as_tensor(x)
    if x.shape[-1] % 2:
        raise ValueError(f"rotary needs an even last dimension, got {x.shape[-1]}")
    even, odd = x.data[..., 0::2], x.data[..., 1::2]
    out = np.empty_like(x.data)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin

    def backward(g):
        g_even, g_odd = g[..., 0::2], g[..., 1::2]
        dx = np.empty_like(g)
        dx[..., 0::2] = g_even * cos + g_odd * sin      # rotation by -theta: the transpose
        dx[..., 1::2] = g_odd * cos - g_even * sin
        return (dx,)

    return make_op(out, (x,), backward)


# ------------------------------------------------------------------------------------------
# Selection and regularisation
# ------------------------------------------------------------------------------------------

def embedding(weight: Tensor, ids: np.ndarray) -> Tensor:
    """Gather rows of ``weight``: ``out[..., :] = weight[ids[...], :]``.

    Parameters
    ----------
    weight : (vocab, dim)
    ids : int array, any shape, values in [0, vocab)

    Returns
    -------
    Tensor (*ids.shape, dim)
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    return getitem(weight, ids)


def dropout(x: ArrayLike, p: float, rng: Optional[np.random.Generator], training: bool = True) -> Tensor:
    """Inverted dropout: zero each entry with probability ``p`` and scale survivors by 1/(1-p).

    Identity when not ``training`` or ``p == 0`` (then ``rng`` is not used and may be None).
    """
    x = as_tensor(x)
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        raise ValueError(f"dropout probability must be < 1, got {p}")
    keep = (rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
    return make_op(x.data * keep, (x,), lambda g: (g * keep,))


def where(condition: np.ndarray, a: ArrayLike, b: ArrayLike) -> Tensor:
    """Elementwise ``a if condition else b`` (``condition`` is a constant boolean array)."""
    a, b = _binary(a, b)
    condition = np.asarray(condition, dtype=bool)
    out = np.where(condition, a.data, b.data)
    return make_op(out, (a, b), lambda g: (np.where(condition, g, 0.0), np.where(condition, 0.0, g)))


def masked_fill(x: ArrayLike, mask: np.ndarray, value: float) -> Tensor:
    """``x`` with entries where ``mask`` is True replaced by the constant ``value``."""
    x = as_tensor(x)
    return where(mask, as_tensor(value, like=x), x)


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------

def cross_entropy(logits: ArrayLike, targets: np.ndarray, ignore_index: Optional[int] = None,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy with label smoothing and ignored (padding) targets.

    Matches ``torch.nn.functional.cross_entropy``: with smoothing ``eps`` the target
    distribution is ``(1 - eps) * onehot(t) + eps / V`` (uniform over all V classes), and
    ``reduction="mean"`` divides by the number of non-ignored targets.

    Parameters
    ----------
    logits : (..., V)
    targets : int array (...)
    ignore_index : int, optional
        Targets equal to it (padding) contribute nothing to loss, gradient or count.
    label_smoothing : float in [0, 1)
    reduction : {"mean", "sum"}
        With no counted target, "mean" returns 0 (not NaN).

    Returns
    -------
    Tensor, scalar
    """
    logits = as_tensor(logits)
    targets = np.asarray(targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} does not match logits {logits.shape}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    num_classes = logits.shape[-1]
    counted = np.ones(targets.shape, dtype=bool) if ignore_index is None else targets != ignore_index
    safe_targets = np.where(counted, targets, 0)

    shifted = logits.data - logits.data.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    target_distribution = np.zeros_like(log_probs)
    np.put_along_axis(target_distribution, safe_targets[..., None], 1.0, axis=-1)
    if label_smoothing:
        target_distribution = (1.0 - label_smoothing) * target_distribution + label_smoothing / num_classes
    per_token = -(target_distribution * log_probs).sum(axis=-1) * counted
    denominator = float(counted.sum()) if reduction == "mean" else 1.0
    denominator = denominator or 1.0
    loss = np.asarray(per_token.sum() / denominator, dtype=logits.dtype)

    def backward(g):
        # d/dlogits of -sum(q log softmax) is softmax - q (q sums to 1), per counted token.
        grad = (np.exp(log_probs) - target_distribution) * counted[..., None]
        return (grad * (g / denominator),)

    return make_op(loss, (logits,), backward)
