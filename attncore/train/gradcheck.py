"""Finite-difference checks of the analytic gradients of :mod:`attncore.train.autograd`.

Used by the tests: every op, layer and model gets one check in float64 on small shapes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .autograd import Tensor, no_grad

__all__ = ["gradcheck", "gradcheck_module", "numerical_gradient"]


def numerical_gradient(fn: Callable, arrays: Sequence[np.ndarray], index: int,
                       projection: np.ndarray, eps: float) -> np.ndarray:
    """Central-difference gradient of ``sum(fn(*arrays) * projection)`` w.r.t. ``arrays[index]``."""
    base = [np.array(a, dtype=np.float64, copy=True) for a in arrays]
    target = base[index]
    grad = np.zeros_like(target)
    flat_target, flat_grad = target.reshape(-1), grad.reshape(-1)
    for i in range(flat_target.size):
        original = flat_target[i]
        flat_target[i] = original + eps
        plus = float((fn(*[Tensor(a) for a in base]).data * projection).sum())
        flat_target[i] = original - eps
        minus = float((fn(*[Tensor(a) for a in base]).data * projection).sum())
        flat_target[i] = original
        flat_grad[i] = (plus - minus) / (2.0 * eps)
    return grad


def gradcheck(fn: Callable, arrays: Sequence[np.ndarray], eps: float = 1e-6, atol: float = 1e-7,
              rtol: float = 1e-5, seed: int = 0, check: Sequence[bool] | None = None) -> float:
    """Compare the autograd gradient of ``fn`` with central finite differences, in float64.

    The scalar objective is ``sum(fn(*inputs) * R)`` with a fixed random ``R``, so every entry
    of the Jacobian contributes (a plain ``sum`` would hide errors that cancel, e.g. softmax).

    Parameters
    ----------
    fn : callable
        ``fn(*tensors) -> Tensor`` built from autograd ops. Must be deterministic (reseed any
        rng inside ``fn``).
    arrays : sequence of np.ndarray
        Input values; converted to float64 Tensors with ``requires_grad=True``.
    eps, atol, rtol : float
        Step and tolerances: ``|analytic - numeric| <= atol + rtol * |numeric|`` entrywise.
    seed : int
        Seed of the projection ``R``.
    check : sequence of bool, optional
        Which inputs to check (default all).

    Returns
    -------
    float
        The largest absolute difference found.

    Raises
    ------
    AssertionError
        Naming the input and the worst entry when a gradient disagrees, or when the analytic
        gradient is missing.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    check = [True] * len(arrays) if check is None else list(check)
    tensors = [Tensor(a.copy(), requires_grad=c) for a, c in zip(arrays, check)]
    out = fn(*tensors)
    projection = np.random.default_rng(seed).standard_normal(out.shape)
    if out.dtype != np.float64:
        raise AssertionError(f"gradcheck runs in float64 but fn returned {out.dtype}")
    (out * projection).sum().backward()

    worst = 0.0
    for index, (tensor, wanted) in enumerate(zip(tensors, check)):
        if not wanted:
            continue
        numeric = numerical_gradient(fn, arrays, index, projection, eps)
        if tensor.grad is None:
            if np.allclose(numeric, 0.0, atol=atol):
                continue
            raise AssertionError(f"input {index}: no analytic gradient, numeric max {np.abs(numeric).max():.3g}")
        analytic = tensor.grad
        if analytic.shape != numeric.shape:
            raise AssertionError(f"input {index}: gradient shape {analytic.shape} != {numeric.shape}")
        difference = np.abs(analytic - numeric)
        bad = difference > atol + rtol * np.abs(numeric)
        if bad.any():
            where = np.unravel_index(np.argmax(difference - rtol * np.abs(numeric)), numeric.shape)
            raise AssertionError(
                f"input {index}: {int(bad.sum())} of {bad.size} gradient entries disagree; "
                f"worst at {where}: analytic {analytic[where]:.10g} vs numeric {numeric[where]:.10g}")
        worst = max(worst, float(difference.max(initial=0.0)))
    return worst


def gradcheck_module(module, loss_fn: Callable, entries_per_parameter: int = 3, eps: float = 1e-6,
                     atol: float = 1e-7, rtol: float = 1e-5, seed: int = 0) -> int:
    """Finite-difference check of a whole model's parameter gradients (float64 models).

    For every parameter, ``entries_per_parameter`` randomly chosen entries are perturbed by
    ±``eps`` and the central difference of ``loss_fn(module)`` is compared with the analytic
    gradient, which keeps the cost linear in the number of parameters, not their size.

    Parameters
    ----------
    module : attncore.train.layers.Module
    loss_fn : callable ``module -> scalar Tensor`` (deterministic; dropout off)

    Returns
    -------
    int
        Number of entries checked.

    Raises
    ------
    AssertionError
        Listing every disagreeing (parameter, index) pair.
    """
    rng = np.random.default_rng(seed)
    params = module.named_parameters()
    for tensor in params.values():
        if tensor.dtype != np.float64:
            raise AssertionError("gradcheck_module needs a float64 model")
        tensor.grad = None
    loss_fn(module).backward()
    failures, checked = [], 0
    for name, tensor in params.items():
        analytic = np.zeros_like(tensor.data) if tensor.grad is None else tensor.grad
        flat = tensor.data.reshape(-1)
        for index in rng.choice(flat.size, size=min(entries_per_parameter, flat.size), replace=False):
            original = flat[index]
            flat[index] = original + eps
            with no_grad():
                plus = float(loss_fn(module).data)
            flat[index] = original - eps
            with no_grad():
                minus = float(loss_fn(module).data)
            flat[index] = original
            numeric = (plus - minus) / (2.0 * eps)
            value = analytic.reshape(-1)[index]
            if abs(value - numeric) > atol + rtol * abs(numeric):
                failures.append(f"{name}[{index}]: analytic {value:.10g} vs numeric {numeric:.10g}")
            checked += 1
    if failures:
        raise AssertionError(f"{len(failures)} of {checked} gradient entries disagree:\n  " + "\n  ".join(failures))
    return checked
