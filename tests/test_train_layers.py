"""Trainer layers: gradient checks (float64) and PyTorch parity of GRU / LSTM / Linear."""

import numpy as np
import pytest

from attncore.train import autograd as ag
from attncore.train.gradcheck import gradcheck, gradcheck_module
from attncore.train.layers import RNN, Embedding, LayerNorm, Linear, Module, ModuleList, gru_cell, lstm_cell
from attncore.train.transformer import MultiheadAttention, multi_head_attention


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_gru_cell_gradient():
    gradcheck(lambda x, h, w, b: gru_cell(x, h, w, b),
              [_normal((2, 9)), _normal((2, 3), 1), _normal((9, 3), 2), _normal((9,), 3)])


def test_lstm_cell_gradient():
    def fn(x, h, c, w, b):
        h_new, c_new = lstm_cell(x, (h, c), w, b)
        return ag.concat([h_new, c_new], axis=-1)

    gradcheck(fn, [_normal((2, 12)), _normal((2, 3), 1), _normal((2, 3), 2), _normal((12, 3), 3), _normal((12,), 4)])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_gradient_with_lengths(cell, bidirectional):
    rnn = RNN(cell, 3, 2, 2, np.random.default_rng(0), bidirectional=bidirectional, dtype=np.float64)
    x = ag.Tensor(_normal((3, 4, 3)))
    lengths = np.array([4, 2, 1])
    projection = _normal((3, 4, 2 * (2 if bidirectional else 1)), 5)

    def loss(module):
        outputs, final = module(x, lengths)
        last = sum((RNN.top(entry) * 0.3).sum() for entry in final)
        return (outputs * projection).sum() + last

    assert gradcheck_module(rnn, loss) > 0


def test_multi_head_attention_gradient():
    attention = MultiheadAttention(4, fused=True, bias=True, rng=np.random.default_rng(0), dtype=np.float64)
    for p in attention.parameters():  # biases start at zero: give them values worth checking
        p.data += _normal(p.shape, 9) * 0.1
    query, memory = ag.Tensor(_normal((2, 3, 4))), ag.Tensor(_normal((2, 5, 4), 1))
    key_valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    projection = _normal((2, 3, 4), 2)

    def loss(module):
        return (multi_head_attention(module, query, memory, 2, key_valid, causal=True)[0] * projection).sum()

    gradcheck_module(attention, loss, entries_per_parameter=4)
    gradcheck(lambda q, m: multi_head_attention(attention, q, m, 2, key_valid)[0], [query.data, memory.data])


def test_gradcheck_module_detects_a_wrong_gradient():
    layer = Linear(3, 2, np.random.default_rng(0), dtype=np.float64)
    x = _normal((4, 3))

    def wrong_loss(module):
        # The graph sees only half the weight's effect, the value sees all of it.
        out = ag.make_op((x @ module.weight.data.T).sum() * 1.0, (module.weight,),
                         lambda g: (0.5 * g * np.ones((2, 1)) * x.sum(axis=0),))
        return out

    with pytest.raises(AssertionError, match="disagree"):
        gradcheck_module(layer, wrong_loss)


def test_module_registers_parameters_by_attribute_path():
    class Block(Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.proj = Linear(2, 3, rng)
            self.layers = ModuleList([LayerNorm(3), Embedding(5, 3, rng)])

    block = Block()
    assert list(block.named_parameters()) == ["proj.weight", "proj.bias", "layers.0.weight", "layers.0.bias",
                                              "layers.1.weight"]
    state = block.state_dict()
    state["proj.bias"] = state["proj.bias"] + 1
    block.load_state_dict(state)
    assert np.array_equal(block.proj.bias.data, state["proj.bias"])
    with pytest.raises(ValueError, match="missing: proj.weight"):
        block.load_state_dict({k: v for k, v in state.items() if k != "proj.weight"})


# -- PyTorch parity -------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_matches_torch_packed_sequences(cell, bidirectional):
    torch = pytest.importorskip("torch")
    rnn = RNN(cell, 3, 4, 2, np.random.default_rng(1), bidirectional=bidirectional, dtype=np.float64)
    reference = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(3, 4, 2, batch_first=True,
                                                                    bidirectional=bidirectional).double()
    reference.load_state_dict({k: torch.tensor(v) for k, v in rnn.state_dict().items()})
    x = _normal((3, 5, 3))
    lengths = np.array([5, 2, 3])

    outputs, final = rnn(ag.Tensor(x), lengths)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.tensor(x), torch.tensor(lengths), batch_first=True,
                                                     enforce_sorted=False)
    with torch.no_grad():
        torch_packed, torch_final = reference(packed)
    torch_outputs, _ = torch.nn.utils.rnn.pad_packed_sequence(torch_packed, batch_first=True, total_length=5)
    np.testing.assert_allclose(outputs.data, torch_outputs.numpy(), rtol=1e-12, atol=1e-13)
    torch_h = torch_final if cell == "gru" else torch_final[0]
    for index, entry in enumerate(final):
        np.testing.assert_allclose(RNN.top(entry).data, torch_h[index].numpy(), rtol=1e-12, atol=1e-13)
    if cell == "lstm":
        for index, entry in enumerate(final):
            np.testing.assert_allclose(entry[1].data, torch_final[1][index].numpy(), rtol=1e-12, atol=1e-13)


def test_rnn_unpacked_runs_over_padding_like_torch():
    torch = pytest.importorskip("torch")
    rnn = RNN("gru", 3, 4, 1, np.random.default_rng(1), dtype=np.float64)
    reference = torch.nn.GRU(3, 4, 1, batch_first=True).double()
    reference.load_state_dict({k: torch.tensor(v) for k, v in rnn.state_dict().items()})
    x = _normal((2, 5, 3))
    outputs, final = rnn(ag.Tensor(x), np.array([5, 2]), packed=False)
    with torch.no_grad():
        torch_outputs, torch_h = reference(torch.tensor(x))
    np.testing.assert_allclose(outputs.data, torch_outputs.numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(final[0].data, torch_h[0].numpy(), rtol=1e-12, atol=1e-13)


def test_linear_uses_torch_layout():
    torch = pytest.importorskip("torch")
    layer = Linear(3, 5, np.random.default_rng(0), dtype=np.float64)
    reference = torch.nn.Linear(3, 5).double()
    reference.load_state_dict({k: torch.tensor(v) for k, v in layer.state_dict().items()})
    x = _normal((2, 4, 3))
    np.testing.assert_allclose(layer(ag.Tensor(x)).data, reference(torch.tensor(x)).detach().numpy(), rtol=1e-12)
