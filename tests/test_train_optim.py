"""Optimisers, schedules and clipping."""

import math

import numpy as np
import pytest

from attncore.train.autograd import Tensor
from attncore.train.optim import Adam, AdamW, clip_grad_norm, make_schedule


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 4)), rng.standard_normal((4,)), rng.standard_normal((5, 3))


def _loss_grads(weight, bias, x):
    # loss = sum(tanh(x W + b)^2): returns gradients for W and b.
    pre = x @ weight + bias
    grad_pre = 2 * np.tanh(pre) * (1 - np.tanh(pre) ** 2)
    return x.T @ grad_pre, grad_pre.sum(0)


@pytest.mark.parametrize("decoupled,weight_decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_adam_matches_torch(decoupled, weight_decay):
    torch = pytest.importorskip("torch")
    w0, b0, x = _problem()
    params = {"w": Tensor(w0.copy(), requires_grad=True), "b": Tensor(b0.copy(), requires_grad=True)}
    ours = Adam(params, lr=0.05, weight_decay=weight_decay, decoupled=decoupled)
    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    theirs = (torch.optim.AdamW if decoupled else torch.optim.Adam)([tw, tb], lr=0.05, weight_decay=weight_decay)
    for _ in range(6):
        params["w"].grad, params["b"].grad = _loss_grads(params["w"].data, params["b"].data, x)
        ours.step()
        theirs.zero_grad()
        (torch.tanh(torch.tensor(x) @ tw + tb) ** 2).sum().backward()
        theirs.step()
    np.testing.assert_allclose(params["w"].data, tw.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params["b"].data, tb.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adamw_factory_is_decoupled_with_torch_default_decay():
    optimizer = AdamW({"p": Tensor(np.ones(2), requires_grad=True)})
    assert optimizer.decoupled and optimizer.weight_decay == 0.01


def test_optimizer_state_round_trip_continues_identically():
    w0, b0, x = _problem(1)

    def run(steps, restore_after=None):
        params = {"w": Tensor(w0.copy(), requires_grad=True), "b": Tensor(b0.copy(), requires_grad=True)}
        optimizer = Adam(params, lr=0.01)
        for step in range(steps):
            if step == restore_after:
                arrays = {k: v.copy() for k, v in optimizer.state_arrays().items()}
                meta = optimizer.state_meta()
                optimizer = Adam(params, lr=0.01)
                optimizer.load_state(arrays, meta)
            params["w"].grad, params["b"].grad = _loss_grads(params["w"].data, params["b"].data, x)
            optimizer.step()
        return params["w"].data

    np.testing.assert_array_equal(run(8), run(8, restore_after=4))
    assert not np.array_equal(run(8), run(7))


def test_schedules():
    inverse_sqrt = make_schedule("inverse_sqrt", 1.0, warmup_steps=4)
    assert [inverse_sqrt(s) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert inverse_sqrt(16) == pytest.approx(0.5)
    cosine = make_schedule("cosine", 1.0, warmup_steps=2, total_steps=12, min_lr=0.1)
    assert cosine(2) == 1.0 and cosine(7) == pytest.approx(0.55) and cosine(12) == pytest.approx(0.1)
    assert cosine(50) == pytest.approx(0.1)
    linear = make_schedule("linear", 2.0, warmup_steps=0, total_steps=10)
    assert linear(5) == pytest.approx(1.0) and linear(10) == pytest.approx(0.0)
    constant = make_schedule("constant", 0.3, warmup_steps=3)
    assert constant(1) == pytest.approx(0.1) and constant(100) == 0.3
    with pytest.raises(ValueError):
        make_schedule("cosine", 1.0, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError):
        make_schedule("step", 1.0)


def test_clip_grad_norm_scales_to_the_limit():
    a, b = Tensor(np.zeros(2), requires_grad=True), Tensor(np.zeros(1), requires_grad=True)
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])
    assert clip_grad_norm([a, b], 10.0) == 5.0
    assert np.array_equal(a.grad, [3.0, 0.0])  # under the limit: untouched
    assert clip_grad_norm({"a": a, "b": b}, 1.0) == 5.0
    total = math.sqrt(float((a.grad ** 2).sum() + (b.grad ** 2).sum()))
    assert total == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(a.grad / b.grad[0], [0.75, 0.0])  # direction kept
