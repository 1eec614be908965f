"""Optimisers, learning-rate schedules and gradient clipping for the NumPy trainer.

* :class:`Adam` — Adam (Kingma & Ba) with bias correction; ``weight_decay`` is either the L2
  term added to the gradient (``decoupled=False``, ``torch.optim.Adam``) or decoupled weight
  decay (``decoupled=True``, AdamW, ``torch.optim.AdamW``). :func:`AdamW` builds the latter.
* :func:`make_schedule` — linear warm-up then constant, inverse square root, cosine or linear decay.
* :func:`clip_grad_norm` — scale all gradients so their global L2 norm is at most ``max_norm``.

Optimiser state is plain arrays + JSON-able numbers (:meth:`Adam.state_arrays`,
:meth:`Adam.state_meta`) so checkpoints use safetensors + JSON, never pickle.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Tuple

import numpy as np

from .autograd import Tensor

__all__ = ["Adam", "AdamW", "make_schedule", "SCHEDULES", "clip_grad_norm"]

SCHEDULES = ("constant", "inverse_sqrt", "cosine", "linear")


class Adam:
    """Adam / AdamW over named parameters.

    Parameters
    ----------
    params : mapping name -> Tensor
        Usually ``model.named_parameters()``; names key the saved state.
    lr : float
        Default learning rate (a schedule may pass another one to :meth:`step`).
    betas : (float, float)
    eps : float
    weight_decay : float
    decoupled : bool
        AdamW-style decay ``p -= lr * weight_decay * p`` instead of adding ``weight_decay * p``
        to the gradient.

    Update at step t (1-based), with g the gradient::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params: Mapping[str, Tensor], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False):
        self.params = dict(params)
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay, self.decoupled = float(weight_decay), bool(decoupled)
        self.step_count = 0
        self.exp_avg = {name: np.zeros_like(p.data) for name, p in self.params.items()}
        self.exp_avg_sq = {name: np.zeros_like(p.data) for name, p in self.params.items()}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def step(self, lr: float | None = None) -> None:
        """Apply one update with ``lr`` (default ``self.lr``); parameters without grad are skipped."""
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        beta1, beta2 = self.betas
        correction1 = 1.0 - beta1 ** self.step_count
        correction2 = 1.0 - beta2 ** self.step_count
        for name, p in self.params.items():
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay and not self.decoupled:
                grad = grad + self.weight_decay * p.data
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m *= beta1
            m += (1.0 - beta1) * grad
            v *= beta2
            v += (1.0 - beta2) * grad * grad
            if self.weight_decay and self.decoupled:
                p.data *= (1.0 - lr * self.weight_decay)
            update = (m / correction1) / (np.sqrt(v / correction2) + self.eps)
            p.data -= (lr * update).astype(p.data.dtype, copy=False)

    # -- state for checkpoints ----------------------------------------------------------------
    def state_arrays(self) -> Dict[str, np.ndarray]:
        """Moment estimates, keyed ``exp_avg/<name>`` and ``exp_avg_sq/<name>``."""
        arrays = {f"exp_avg/{n}": a for n, a in self.exp_avg.items()}
        arrays.update({f"exp_avg_sq/{n}": a for n, a in self.exp_avg_sq.items()})
        return arrays

    def state_meta(self) -> dict:
        """JSON-able scalars: step count and hyper-parameters."""
        return {"type": "adamw" if self.decoupled else "adam", "step_count": self.step_count, "lr": self.lr,
                "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def load_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
        """Restore what :meth:`state_arrays` and :meth:`state_meta` returned."""
        missing = [n for n in self.params if f"exp_avg/{n}" not in arrays or f"exp_avg_sq/{n}" not in arrays]
        if missing:
            raise ValueError(f"optimizer state lacks moments for {missing}")
        for name, param in self.params.items():
            for moment in ("exp_avg", "exp_avg_sq"):
                array = arrays[f"{moment}/{name}"]
                if array.shape != param.data.shape or array.dtype != param.data.dtype:
                    raise ValueError(f"optimizer state: {moment}/{name} is {array.dtype} "
                                     f"{list(array.shape)}, the parameter {param.data.dtype} "
                                     f"{list(param.data.shape)}")
        for name in self.params:
            self.exp_avg[name] = np.array(arrays[f"exp_avg/{name}"], copy=True)
            self.exp_avg_sq[name] = np.array(arrays[f"exp_avg_sq/{name}"], copy=True)
        self.step_count = int(meta["step_count"])


def AdamW(params: Mapping[str, Tensor], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01) -> Adam:
    """Adam with decoupled weight decay (Loshchilov & Hutter), ``torch.optim.AdamW`` defaults."""
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True)


def make_schedule(name: str, base_lr: float, warmup_steps: int = 0, total_steps: int = 0,
                  min_lr: float = 0.0) -> Callable[[int], float]:
    """Learning rate as a function of the 1-based step about to be taken.

    All schedules warm up linearly over ``warmup_steps`` (``lr = base_lr * step / warmup``), then:

    * ``constant``: ``base_lr``
    * ``inverse_sqrt``: ``base_lr * sqrt(warmup / step)`` (Vaswani et al.; continuous at the end
      of warm-up)
    * ``cosine``: from ``base_lr`` to ``min_lr`` along a half cosine ending at ``total_steps``
    * ``linear``: straight line from ``base_lr`` to ``min_lr`` at ``total_steps``
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if name in ("cosine", "linear") and total_steps <= warmup_steps:
        raise ValueError(f"{name} schedule needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}")
    warmup = max(int(warmup_steps), 0)

    def schedule(step: int) -> float:
        step = max(int(step), 1)
        if step <= warmup:
            return base_lr * step / warmup
        if name == "constant":
            return base_lr
        if name == "inverse_sqrt":
            return base_lr * math.sqrt(max(warmup, 1) / step)
        progress = min((step - warmup) / (total_steps - warmup), 1.0)
        if name == "cosine":
            return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
        return base_lr + (min_lr - base_lr) * progress

    return schedule


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``.

    Parameters
    ----------
    params : iterable of Tensor (or a mapping name -> Tensor)
    max_norm : float
        ``<= 0`` or ``inf`` disables clipping (the norm is still returned).

    Returns
    -------
    float
        The global norm before clipping.
    """
    if isinstance(params, Mapping):
        params = params.values()
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(float(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads)))
    if 0 < max_norm < math.inf and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g *= scale
    return total
