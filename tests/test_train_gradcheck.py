"""Finite-difference gradient checks (float64) for every op of attncore.train.autograd."""

import numpy as np
import pytest

from attncore.train import autograd as ag
from attncore.train.gradcheck import gradcheck


def _rng(seed=0):
    return np.random.default_rng(seed)


def _positive(shape, seed=0):
    return _rng(seed).uniform(0.5, 2.0, size=shape)


def _normal(shape, seed=0):
    return _rng(seed).standard_normal(shape)


def _away_from_zero(shape, seed=0):
    # relu / max are not differentiable at kinks: keep finite differences off them.
    values = _rng(seed).uniform(0.2, 1.5, size=shape)
    return values * _rng(seed + 1).choice([-1.0, 1.0], size=shape)


VALID = np.array([[True, True, False, True], [False, False, False, False], [True, False, False, False]])

# name -> (function of tensors, list of input arrays). Every op in autograd.__all__ (except the
# infrastructure names) must appear here; test_every_op_is_checked enforces it.
CASES = {
    "add": (lambda a, b: ag.add(a, b), [_normal((3, 4)), _normal((4,), 1)]),
    "add_broadcast_middle": (lambda a, b: a + b, [_normal((2, 3, 4)), _normal((2, 1, 4), 1)]),
    "sub": (lambda a, b: ag.sub(a, b), [_normal((3, 1)), _normal((1, 4), 1)]),
    "mul": (lambda a, b: ag.mul(a, b), [_normal((3, 4)), _normal((3, 4), 1)]),
    "div": (lambda a, b: ag.div(a, b), [_normal((3, 4)), _positive((4,), 1)]),
    "neg": (lambda a: ag.neg(a), [_normal((3, 4))]),
    "power": (lambda a: ag.power(a, 1.5), [_positive((3, 4))]),
    "sqrt": (lambda a: ag.sqrt(a), [_positive((3, 4))]),
    "square": (lambda a: ag.square(a), [_normal((3, 4))]),
    "matmul": (lambda a, b: ag.matmul(a, b), [_normal((3, 4)), _normal((4, 2), 1)]),
    "matmul_batched_broadcast": (lambda a, b: a @ b, [_normal((2, 3, 4)), _normal((4, 5), 1)]),
    "matmul_batched": (lambda a, b: a @ b, [_normal((2, 2, 3, 4)), _normal((2, 1, 4, 5), 1)]),
    "sum": (lambda a: ag.sum(a, axis=1), [_normal((3, 4, 2))]),
    "sum_keepdims_all": (lambda a: ag.sum(a, axis=(0, 2), keepdims=True), [_normal((3, 4, 2))]),
    "mean": (lambda a: ag.mean(a, axis=-1), [_normal((3, 4))]),
    "max": (lambda a: ag.max(a, axis=0), [_rng(3).permutation(12).reshape(3, 4) * 0.37]),
    "max_keepdims": (lambda a: ag.max(a, axis=1, keepdims=True), [_rng(4).permutation(12).reshape(3, 4) * 0.37]),
    "reshape": (lambda a: ag.reshape(a, (4, 3)) * np.arange(12.0).reshape(4, 3), [_normal((3, 4))]),
    "transpose": (lambda a: ag.transpose(a, (2, 0, 1)), [_normal((2, 3, 4))]),
    "swapaxes": (lambda a: ag.swapaxes(a, 0, 2), [_normal((2, 3, 4))]),
    "getitem_slice": (lambda a: ag.getitem(a, (slice(None), slice(1, 3))), [_normal((3, 4))]),
    "getitem_repeated_indices": (lambda a: ag.getitem(a, np.array([0, 2, 0, 0])), [_normal((3, 4))]),
    "concat": (lambda a, b: ag.concat([a, b], axis=1), [_normal((2, 3)), _normal((2, 2), 1)]),
    "stack": (lambda a, b: ag.stack([a, b], axis=1), [_normal((2, 3)), _normal((2, 3), 1)]),
    "split": (lambda a: ag.concat([p * (i + 1.0) for i, p in enumerate(ag.split(a, [1, 3], axis=1))], axis=1),
              [_normal((2, 5))]),
    "exp": (lambda a: ag.exp(a), [_normal((3, 4))]),
    "log": (lambda a: ag.log(a), [_positive((3, 4))]),
    "tanh": (lambda a: ag.tanh(a), [_normal((3, 4))]),
    "sigmoid": (lambda a: ag.sigmoid(a), [_normal((3, 4)) * 4]),
    "relu": (lambda a: ag.relu(a), [_away_from_zero((3, 4))]),
    "gelu": (lambda a: ag.gelu(a), [_normal((3, 4)) * 2]),
    "swish": (lambda a: ag.swish(a), [_normal((3, 4)) * 2]),
    "softmax": (lambda a: ag.softmax(a, axis=-1), [_normal((3, 4))]),
    "softmax_axis0": (lambda a: ag.softmax(a, axis=0), [_normal((3, 4))]),
    "softmax_masked": (lambda a: ag.softmax(a, valid=VALID), [_normal((3, 4))]),
    "log_softmax": (lambda a: ag.log_softmax(a), [_normal((3, 4))]),
    "log_softmax_masked": (lambda a: ag.log_softmax(a, valid=VALID), [_normal((3, 4))]),
    "layer_norm": (lambda x, w, b: ag.layer_norm(x, w, b, eps=1e-5),
                   [_normal((3, 5)), _normal((5,), 1), _normal((5,), 2)]),
    "layer_norm_no_affine": (lambda x: ag.layer_norm(x, eps=1e-3), [_normal((2, 3, 4))]),
    "uncentred_layer_norm": (lambda x, w, b: ag.uncentred_layer_norm(x, w, b, eps=1e-7),
                             [_normal((3, 5)) + 0.3, _normal((5,), 1), _normal((5,), 2)]),
    "rotary_interleaved": (lambda x: ag.rotary_interleaved(x, np.cos(_normal((3, 2), 5)), np.sin(_normal((3, 2), 5))),
                           [_normal((2, 3, 4))]),
    "embedding": (lambda w: ag.embedding(w, np.array([[1, 0, 1], [3, 3, 2]])), [_normal((4, 3))]),
    "dropout": (lambda a: ag.dropout(a, 0.4, np.random.default_rng(7)), [_normal((4, 5))]),
    "where": (lambda a, b: ag.where(VALID, a, b), [_normal((3, 4)), _normal((4,), 1)]),
    "masked_fill": (lambda a: ag.masked_fill(a, ~VALID, -3.0), [_normal((3, 4))]),
    "cross_entropy": (lambda z: ag.cross_entropy(z, np.array([[1, 0, 2], [3, 0, 0]]), ignore_index=0),
                      [_normal((2, 3, 5))]),
    "cross_entropy_smoothed_sum": (lambda z: ag.cross_entropy(z, np.array([1, 4, 2]), label_smoothing=0.2,
                                                              reduction="sum"), [_normal((3, 5))]),
}

INFRASTRUCTURE = {"Tensor", "as_tensor", "make_op", "no_grad", "is_grad_enabled", "unbroadcast"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_gradient_matches_finite_differences(name):
    fn, arrays = CASES[name]
    gradcheck(fn, arrays)


def _case_op(case, ops):
    """The op a case checks: the longest op name that is the case's name or its prefix before
    a "_" (``log_softmax_masked`` checks log_softmax, not log)."""
    matches = [op for op in ops if case == op or case.startswith(op + "_")]
    return max(matches, key=len) if matches else None


def test_every_op_is_checked():
    ops = set(ag.__all__) - INFRASTRUCTURE
    covered = {_case_op(case, ops) for case in CASES}
    missing = ops - covered
    assert not missing, f"ops without a gradient check: {sorted(missing)}"
    assert _case_op("log_softmax_masked", ops) == "log_softmax" and _case_op("log", ops) == "log"


def test_gradcheck_detects_a_wrong_backward():
    def wrong_square(x):
        return ag.make_op(x.data ** 2, (x,), lambda g: (g * x.data,))  # missing factor 2

    with pytest.raises(AssertionError, match="disagree"):
        gradcheck(wrong_square, [_normal((3,))])


def test_unbroadcast_sums_added_and_stretched_axes():
    grad = np.ones((2, 3, 4))
    assert ag.unbroadcast(grad, (3, 1)).tolist() == [[8.0]] * 3
    assert ag.unbroadcast(grad, (4,)).tolist() == [6.0] * 4


def test_gradients_accumulate_over_shared_use():
    x = ag.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    ((x * x) + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)


def test_no_grad_records_nothing():
    x = ag.Tensor(np.ones(3), requires_grad=True)
    with ag.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y._backward is None
    assert ag.is_grad_enabled()


def test_fully_masked_rows_are_zero_not_nan():
    scores = ag.Tensor(_normal((3, 4)), requires_grad=True)
    probs = ag.softmax(scores, valid=VALID)
    logp = ag.log_softmax(scores, valid=VALID)
    assert np.array_equal(probs.data[1], np.zeros(4)) and np.array_equal(logp.data[1], np.zeros(4))
    assert np.all(probs.data[~VALID] == 0.0)
    np.testing.assert_allclose(probs.data[[0, 2]].sum(axis=-1), 1.0)
    (probs.sum() + logp.sum()).backward()
    assert np.all(np.isfinite(scores.grad)) and np.all(scores.grad[~VALID] == 0.0)


def test_float32_stays_float32():
    x = ag.Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    w = ag.Tensor(np.ones((3,), np.float32), requires_grad=True)
    y = ag.layer_norm(ag.gelu(x * 0.5 + 1.0), w, w)
    y = ag.softmax(y, valid=np.array([True, False, True]))
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


def test_values_match_torch_reference_formulas():
    torch = pytest.importorskip("torch")
    x = _normal((3, 5))
    w, b = _normal((5,), 1), _normal((5,), 2)
    tx = torch.tensor(x)
    np.testing.assert_allclose(ag.gelu(x).data, torch.nn.functional.gelu(tx).numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ag.layer_norm(x, ag.Tensor(w), ag.Tensor(b), eps=1e-5).data,
                               torch.nn.functional.layer_norm(tx, (5,), torch.tensor(w), torch.tensor(b), 1e-5).numpy(),
                               rtol=1e-10, atol=1e-12)
    targets = np.array([1, 0, 4])
    ours = ag.cross_entropy(x, targets, ignore_index=0, label_smoothing=0.1).item()
    theirs = torch.nn.functional.cross_entropy(tx, torch.tensor(targets), ignore_index=0, label_smoothing=0.1).item()
    assert abs(ours - theirs) < 1e-12


def test_cross_entropy_with_every_target_ignored_is_zero():
    loss = ag.cross_entropy(ag.Tensor(_normal((2, 3)), requires_grad=True), np.array([0, 0]), ignore_index=0)
    assert loss.item() == 0.0


def test_second_backward_through_a_freed_graph_raises():
    x = ag.Tensor(np.ones(3), requires_grad=True)
    loss = (ag.tanh(x) * 2.0).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_max_shares_the_gradient_between_tied_maxima():
    # (not differentiable there: finite differences cannot see it; the documented rule)
    x = ag.Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]]), requires_grad=True)
    ag.max(x, axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
