"""Trainable building blocks over :mod:`attncore.train.autograd`.

:class:`Module` collects parameters by attribute name, so a model's parameter names are the
dotted attribute paths (``decoder.rnn.weight_ih_l0``) — exactly the tensor names of the model
format (:func:`attncore.io.weight_spec`). Weight layouts follow PyTorch so that state dicts
import without reshaping: ``Linear.weight`` is (out, in) and ``y = x W^T + b``; GRU/LSTM
parameters are ``weight_ih_l{k}[_reverse]`` (gates*H, in), ``weight_hh_l{k}`` (gates*H, H),
``bias_ih_l{k}``, ``bias_hh_l{k}`` with gate order (r, z, n) for GRU and (i, f, g, o) for LSTM.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import autograd as ag
from .autograd import Tensor

__all__ = ["Module", "ModuleList", "Linear", "Embedding", "LayerNorm", "RNN", "gru_cell", "lstm_cell"]


class Module:
    """Base class: attributes that are parameter Tensors or Modules are registered by name.

    A parameter is a :class:`Tensor` with ``requires_grad=True`` assigned as an attribute.
    ``training`` (set by :meth:`train` / :meth:`eval`) switches dropout on and off.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if isinstance(value, Tensor) and value.requires_grad:
            self._parameters[name] = value
            self._modules.pop(name, None)
        elif isinstance(value, Module):
            self._modules[name] = value
            self._parameters.pop(name, None)
        object.__setattr__(self, name, value)

    def named_parameters(self, prefix: str = "") -> Dict[str, Tensor]:
        """All parameters, keyed by dotted path, in registration order (deterministic)."""
        named = {prefix + name: tensor for name, tensor in self._parameters.items()}
        for name, module in self._modules.items():
            named.update(module.named_parameters(prefix + name + "."))
        return named

    def parameters(self) -> List[Tensor]:
        return list(self.named_parameters().values())

    def modules(self) -> Iterator["Module"]:
        yield self
        for module in self._modules.values():
            yield from module.modules()

    def train(self, mode: bool = True) -> "Module":
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for tensor in self.parameters():
            tensor.grad = None

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of every parameter, keyed by name (the model format's tensor names)."""
        return {name: tensor.data.copy() for name, tensor in self.named_parameters().items()}

    def load_state_dict(self, weights: Dict[str, np.ndarray]) -> None:
        """Copy ``weights`` into the parameters; names, shapes and dtypes must match exactly."""
        params = self.named_parameters()
        problems = [f"missing: {n}" for n in params if n not in weights]
        problems += [f"unexpected: {n}" for n in weights if n not in params]
        for name in params.keys() & weights.keys():
            have, want = np.asarray(weights[name]), params[name].data
            if have.shape != want.shape or have.dtype != want.dtype:
                problems.append(f"{name}: got {have.shape} {have.dtype}, expected {want.shape} {want.dtype}")
        if problems:
            raise ValueError("cannot load weights:\n  " + "\n  ".join(sorted(problems)))
        for name, tensor in params.items():
            tensor.data = np.array(weights[name], copy=True)
            tensor.grad = None


class ModuleList(Module):
    """An indexable list of modules named ``0``, ``1``, ... (``layers.0.norm1.weight``)."""

    def __init__(self, modules: Sequence[Module]):
        super().__init__()
        for index, module in enumerate(modules):
            setattr(self, str(index), module)

    def __getitem__(self, index: int) -> Module:
        return self._modules[str(index % len(self._modules))]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


def _uniform(rng: np.random.Generator, shape, bound: float, dtype) -> Tensor:
    return Tensor(rng.uniform(-bound, bound, size=shape).astype(dtype), requires_grad=True)


class Linear(Module):
    """``y = x W^T + b`` with ``weight`` (out_features, in_features) as in ``torch.nn.Linear``.

    Initialised like PyTorch: uniform in ±1/sqrt(in_features).
    """

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator, bias: bool = True,
                 dtype=np.float32):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _uniform(rng, (out_features, in_features), bound, dtype)
        self.bias = _uniform(rng, (out_features,), bound, dtype) if bias else None

    def __call__(self, x: Tensor) -> Tensor:
        """x : (..., in_features) -> (..., out_features)."""
        return linear(x, self.weight, self.bias)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x W^T + b`` for ``weight`` in (out, in) layout; x : (..., in) -> (..., out)."""
    x = ag.as_tensor(x)
    lead = x.shape[:-1]
    flat = ag.reshape(x, (-1, x.shape[-1])) if x.ndim != 2 else x
    out = flat @ ag.transpose(weight)
    if bias is not None:
        out = out + bias
    return ag.reshape(out, lead + (weight.shape[0],)) if x.ndim != 2 else out


class Embedding(Module):
    """Token embedding table ``weight`` (num_embeddings, dim), initialised N(0, std^2)."""

    def __init__(self, num_embeddings: int, dim: int, rng: np.random.Generator, std: float = 1.0,
                 dtype=np.float32):
        super().__init__()
        self.weight = Tensor((rng.standard_normal((num_embeddings, dim)) * std).astype(dtype), requires_grad=True)

    def __call__(self, ids: np.ndarray) -> Tensor:
        """ids : int (...) -> (..., dim)."""
        return ag.embedding(self.weight, ids)


class LayerNorm(Module):
    """``torch.nn.LayerNorm(dim, eps)``: ``weight`` ones and ``bias`` zeros at initialisation."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.weight = Tensor(np.ones(dim, dtype=dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(dim, dtype=dtype), requires_grad=True)

    def __call__(self, x: Tensor) -> Tensor:
        return ag.layer_norm(x, self.weight, self.bias, self.eps)


# ------------------------------------------------------------------------------------------
# Recurrent cells and the stacked RNN
# ------------------------------------------------------------------------------------------

def gru_cell(x_proj: Tensor, h: Tensor, weight_hh: Tensor, bias_hh: Tensor) -> Tensor:
    """One PyTorch GRU step given the input projection.

    ``r = σ(x_r + h_r)``, ``z = σ(x_z + h_z)``, ``n = tanh(x_n + r * h_n)``,
    ``h' = (1 - z) * n + z * h`` where ``x_* = x W_i*^T + b_i*`` and ``h_* = h W_h*^T + b_h*``.

    Parameters
    ----------
    x_proj : (B, 3H)  ``x W_ih^T + b_ih``
    h : (B, H)
    weight_hh : (3H, H); bias_hh : (3H,)
    """
    x_r, x_z, x_n = ag.split(x_proj, 3, axis=-1)
    h_r, h_z, h_n = ag.split(linear(h, weight_hh, bias_hh), 3, axis=-1)
    reset = ag.sigmoid(x_r + h_r)
    update = ag.sigmoid(x_z + h_z)
    candidate = ag.tanh(x_n + reset * h_n)
    return (1.0 - update) * candidate + update * h


def lstm_cell(x_proj: Tensor, state: Tuple[Tensor, Tensor], weight_hh: Tensor, bias_hh: Tensor):
    """One PyTorch LSTM step: gates (i, f, g, o), ``c' = f c + i g``, ``h' = o tanh(c')``.

    Parameters
    ----------
    x_proj : (B, 4H)  ``x W_ih^T + b_ih``
    state : (h, c), each (B, H)

    Returns
    -------
    (h', c')
    """
    h, c = state
    gates = x_proj + linear(h, weight_hh, bias_hh)
    i, f, g, o = ag.split(gates, 4, axis=-1)
    c_new = ag.sigmoid(f) * c + ag.sigmoid(i) * ag.tanh(g)
    h_new = ag.sigmoid(o) * ag.tanh(c_new)
    return h_new, c_new


class RNN(Module):
    """Stacked, optionally bidirectional GRU or LSTM with PyTorch parameter names and layout.

    Parameters
    ----------
    cell : {"gru", "lstm"}
    input_size, hidden_size, num_layers : int
    bidirectional : bool
        Layer k > 0 then reads the concatenation [forward; backward] (2H).
    rng : np.random.Generator
        Initialisation: uniform in ±1/sqrt(hidden_size), as PyTorch.

    A state is a list with one entry per layer and direction (index ``layer * dirs + d``),
    each entry ``h`` (B, H) for GRU or ``(h, c)`` for LSTM.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int,
                 rng: np.random.Generator, bidirectional: bool = False, dtype=np.float32):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        self.cell, self.hidden_size, self.num_layers = cell, hidden_size, num_layers
        self.num_directions = 2 if bidirectional else 1
        gates = 3 if cell == "gru" else 4
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes(layer):
                setattr(self, "weight_ih" + suffix, _uniform(rng, (gates * hidden_size, layer_input), bound, dtype))
                setattr(self, "weight_hh" + suffix, _uniform(rng, (gates * hidden_size, hidden_size), bound, dtype))
                setattr(self, "bias_ih" + suffix, _uniform(rng, (gates * hidden_size,), bound, dtype))
                setattr(self, "bias_hh" + suffix, _uniform(rng, (gates * hidden_size,), bound, dtype))

    def _suffixes(self, layer: int) -> List[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def zero_state(self, batch: int, dtype) -> list:
        zeros = lambda: Tensor(np.zeros((batch, self.hidden_size), dtype=dtype))  # noqa: E731
        count = self.num_layers * self.num_directions
        return [zeros() if self.cell == "gru" else (zeros(), zeros()) for _ in range(count)]

    def _cell(self, x_proj, state, suffix):
        weight_hh, bias_hh = getattr(self, "weight_hh" + suffix), getattr(self, "bias_hh" + suffix)
        if self.cell == "gru":
            return gru_cell(x_proj, state, weight_hh, bias_hh)
        return lstm_cell(x_proj, state, weight_hh, bias_hh)

    @staticmethod
    def top(state_entry) -> Tensor:
        """The hidden vector ``h`` of a state entry (GRU: itself; LSTM: the first of (h, c))."""
        return state_entry[0] if isinstance(state_entry, tuple) else state_entry

    def step(self, x: Tensor, state: list) -> Tuple[Tensor, list]:
        """Advance a unidirectional stack by one time step.

        x : (B, input_size) -> output of the top layer (B, H) and the new state list.
        """
        if self.num_directions != 1:
            raise ValueError("step() is for unidirectional RNNs")
        new_state = []
        layer_input = x
        for layer in range(self.num_layers):
            suffix = f"_l{layer}"
            x_proj = linear(layer_input, getattr(self, "weight_ih" + suffix), getattr(self, "bias_ih" + suffix))
            entry = self._cell(x_proj, state[layer], suffix)
            new_state.append(entry)
            layer_input = self.top(entry)
        return layer_input, new_state

    def __call__(self, x: Tensor, lengths: Optional[np.ndarray] = None, initial_state: Optional[list] = None,
                 packed: bool = True):
        """Run the whole sequence.

        Parameters
        ----------
        x : (B, T, input_size)
        lengths : int (B,), optional
            Valid lengths. With ``packed`` (the semantics of ``pack_padded_sequence``) a state
            does not change on padded steps, so the forward direction's final state is the one
            at ``length - 1`` and the backward direction starts at ``length - 1``; outputs at
            padded steps are zero. With ``packed=False`` the RNN runs over the padding.
        initial_state : list, optional
            Default zeros.

        Returns
        -------
        outputs : (B, T, H * directions)
        final_state : list (see the class docstring)
        """
        batch, steps = x.shape[0], x.shape[1]
        state = initial_state if initial_state is not None else self.zero_state(batch, x.dtype)
        use_mask = packed and lengths is not None
        valid_steps = (np.arange(steps)[None, :] < np.asarray(lengths)[:, None]) if use_mask else None
        final_state = []
        layer_input = x
        for layer in range(self.num_layers):
            direction_outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                entry = state[layer * self.num_directions + direction]
                # One GEMM for the input projection of all steps, then the recurrence.
                x_proj = linear(layer_input, getattr(self, "weight_ih" + suffix), getattr(self, "bias_ih" + suffix))
                outputs = [None] * steps
                order = range(steps) if direction == 0 else range(steps - 1, -1, -1)
                for t in order:
                    new_entry = self._cell(x_proj[:, t], entry, suffix)
                    if use_mask:
                        keep = valid_steps[:, t : t + 1]
                        new_entry = _where_state(keep, new_entry, entry)
                        outputs[t] = ag.where(keep, self.top(new_entry), 0.0)
                    else:
                        outputs[t] = self.top(new_entry)
                    entry = new_entry
                final_state.append(entry)
                direction_outputs.append(ag.stack(outputs, axis=1))
            layer_input = direction_outputs[0] if len(direction_outputs) == 1 else ag.concat(direction_outputs, axis=-1)
        return layer_input, final_state


def _where_state(keep: np.ndarray, new, old):
    if isinstance(new, tuple):
        return tuple(ag.where(keep, n, o) for n, o in zip(new, old))
    return ag.where(keep, new, old)
