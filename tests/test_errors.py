# SPDX-License-Identifier: Apache-2.0
"""The bad-input matrix: every kernel front rejects malformed input with a ValueError or
TypeError whose message names the offending argument -- before any nogil code runs, so nothing
crashes. And the opposite edge: empty inputs are valid and give zeros of the right shape."""
import re

import numpy as np
import pytest

import attncore
from attncore.kernels.attention import sequence_attention

F32, F64 = np.float32, np.float64


def _z(*shape, dtype=F64):
    return np.zeros(shape, dtype=dtype)


def _o(*shape, dtype=F64):
    return np.ones(shape, dtype=dtype)


# q (2, 4, 3, 8), k/v (2, 2, 5, 8): a valid grouped-query call, perturbed one argument at a time
Q, K, V = _o(2, 4, 3, 8), _o(2, 2, 5, 8), _o(2, 2, 5, 8)


def _huge(shape):
    """A float64 array of ``shape`` that holds one number (a broadcast view: no memory)."""
    return np.broadcast_to(np.zeros(1), shape)


def attention(**changes):
    args = {"q": Q, "k": K, "v": V}
    args.update(changes)
    return lambda: attncore.attention(**args)


# additive: queries (2, 3, 4), keys (2, 5, 6), values (2, 5, 7), w_q (4, 9), w_k (6, 9), w_v (9,)
ADD = dict(queries=_o(2, 3, 4), keys=_o(2, 5, 6), values=_o(2, 5, 7), w_q=_o(4, 9),
           w_k=_o(6, 9), w_v=_o(9))


def additive(**changes):
    args = dict(ADD)
    args.update(changes)
    return lambda: attncore.additive_attention(**args)


def luong(**changes):
    args = dict(queries=_o(2, 3, 6), keys=_o(2, 5, 6), values=_o(2, 5, 6))
    args.update(changes)
    return lambda: attncore.luong_attention(**args)


def nw(**changes):
    args = dict(queries=_o(4, 2), keys=_o(6, 2), values=_o(6))
    args.update(changes)
    return lambda: attncore.nadaraya_watson(**args)


class Unconvertible:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("no")


# (id, callable, exception type, regex the message must match: it names the argument)
BAD = [
    # ---- attention: ranks, shapes, heads
    ("attn-q-3d", attention(q=_o(4, 3, 8)), ValueError, r"\bq\b.*4-D"),
    ("attn-k-5d", attention(k=_o(1, 2, 2, 5, 8)), ValueError, r"\bk\b.*4-D"),
    ("attn-v-2d", attention(v=_o(5, 8)), ValueError, r"\bv\b.*4-D"),
    ("attn-batch", attention(k=_o(3, 2, 5, 8), v=_o(3, 2, 5, 8)), ValueError, "batch"),
    ("attn-kv-shape", attention(v=_o(2, 2, 6, 8)), ValueError, r"\bk\b and \bv\b"),
    ("attn-head-dim", attention(k=_o(2, 2, 5, 7), v=_o(2, 2, 5, 7)), ValueError, "head_dim"),
    ("attn-v-dim", attention(v=_o(2, 2, 5, 9)), ValueError, r"\bv\b"),
    ("attn-gqa", attention(k=_o(2, 3, 5, 8), v=_o(2, 3, 5, 8)), ValueError, "kv_heads"),
    ("attn-zero-kv-heads", attention(k=_o(2, 0, 5, 8), v=_o(2, 0, 5, 8)), ValueError,
     "kv_heads"),
    ("attn-head-dim-0", attention(q=_o(2, 4, 3, 0), k=_o(2, 2, 5, 0), v=_o(2, 2, 5, 0)),
     ValueError, "head_dim"),
    # ---- attention: sizes past BLAS's int dimensions (2^31 keys wrapped negative: BLAS
    # refused the product and the weights came back uniform; broadcast views, never copied)
    ("attn-kv-len-int", attention(k=_huge((2, 2, 2 ** 31, 8)), v=_huge((2, 2, 2 ** 31, 8))),
     ValueError, r"\bk\b: kv_len of 2147483648"),
    ("attn-kv-len-wrap", attention(k=_huge((2, 2, 2 ** 32 + 4, 8)),
                                   v=_huge((2, 2, 2 ** 32 + 4, 8))), ValueError, r"kv_len"),
    ("attn-q-len-int", attention(q=_huge((2, 4, 2 ** 31, 8))), ValueError, r"\bq\b: q_len"),
    ("attn-head-dim-int", attention(q=_huge((2, 4, 3, 2 ** 31)), k=_huge((2, 2, 5, 2 ** 31)),
                                    v=_huge((2, 2, 5, 2 ** 31))), ValueError, r"head_dim"),
    ("attn-k-head-dim-int", attention(k=_huge((2, 2, 5, 2 ** 31)), v=_huge((2, 2, 5, 2 ** 31))),
     ValueError, r"\bk\b: head_dim of 2147483648"),
    ("seq-attn-kv-len-int", lambda: sequence_attention(
        Q, _huge((2, 2, 2 ** 31, 8)), _huge((2, 2, 2 ** 31, 8)), kv_lengths=None,
        causal=False), ValueError, r"kv_len"),
    # ---- attention: dtypes
    ("attn-int", attention(q=np.ones((2, 4, 3, 8), dtype=np.int64)), TypeError, r"\bq\b"),
    ("attn-f16", attention(k=K.astype(np.float16)), TypeError, r"\bk\b"),
    ("attn-mixed", attention(q=Q.astype(F32)), TypeError, r"\bk\b.*float32"),
    ("attn-mixed-v", attention(v=V.astype(F32)), TypeError, r"\bv\b"),
    ("attn-complex", attention(q=Q.astype(np.complex128)), TypeError, r"\bq\b"),
    ("attn-object", attention(q=np.array([[["a"]]], dtype=object)), TypeError, r"\bq\b"),
    ("attn-str", attention(q="not an array"), TypeError, r"\bq\b"),
    ("attn-ragged-list", attention(q=[[1.0], [1.0, 2.0]]), TypeError, r"\bq\b"),
    ("attn-unconvertible", attention(q=Unconvertible()), TypeError, r"\bq\b"),
    # ---- attention: kv_lengths
    ("lengths-negative", attention(kv_lengths=[5, -1]), ValueError, "kv_lengths"),
    ("lengths-too-long", attention(kv_lengths=[5, 6]), ValueError, "kv_lengths"),
    ("lengths-shape", attention(kv_lengths=[5, 5, 5]), ValueError, "kv_lengths"),
    ("lengths-2d", attention(kv_lengths=[[5], [5]]), ValueError, "kv_lengths"),
    ("lengths-float", attention(kv_lengths=[5.0, 3.0]), TypeError, "kv_lengths"),
    ("lengths-bool", attention(kv_lengths=[True, True]), TypeError, "kv_lengths"),
    ("lengths-str", attention(kv_lengths="5"), TypeError, "kv_lengths"),
    # ---- attention: scale
    ("scale-nan", attention(scale=float("nan")), ValueError, "scale"),
    ("scale-inf", attention(scale=np.inf), ValueError, "scale"),
    ("scale-str", attention(scale="0.5"), TypeError, "scale"),
    ("scale-none-like", attention(scale=[0.5]), TypeError, "scale"),
    ("scale-bool", attention(scale=True), TypeError, "scale"),
    ("scale-complex", attention(scale=1j), TypeError, "scale"),
    # ---- attention: mask
    ("mask-float", attention(mask=np.ones((3, 5))), TypeError, r"mask.*`mask == 0`"),
    ("mask-int", attention(mask=np.ones((3, 5), dtype=int)), TypeError, "mask"),
    ("mask-shape", attention(mask=np.ones((3, 4), dtype=bool)), ValueError, "mask"),
    ("mask-batch", attention(mask=np.ones((3, 4, 3, 5), dtype=bool)), ValueError, "mask"),
    # ---- additive / project_keys
    ("add-queries-2d", additive(queries=_o(3, 4)), ValueError, "queries"),
    ("add-batch", additive(keys=_o(3, 5, 6)), ValueError, "batch"),
    ("add-kv-len", additive(values=_o(2, 4, 7)), ValueError, "kv_len"),
    ("add-w_q", additive(w_q=_o(5, 9)), ValueError, "w_q"),
    ("add-w_k", additive(w_k=_o(6, 8)), ValueError, "w_k"),
    ("add-w_v", additive(w_v=_o(8)), ValueError, "w_v"),
    ("add-w_v-2d", additive(w_v=_o(9, 1)), ValueError, "w_v"),
    ("add-unprojected-keys", additive(w_k=None), ValueError, "keys"),
    ("add-dtype", additive(w_q=_o(4, 9, dtype=F32)), TypeError, "w_q"),
    ("add-int-values", additive(values=np.ones((2, 5, 7), dtype=int)), TypeError, "values"),
    ("add-lengths", additive(kv_lengths=[6, 1]), ValueError, "kv_lengths"),
    ("add-lengths-float", additive(kv_lengths=[1.5, 1]), TypeError, "kv_lengths"),
    ("project-keys-w_k", lambda: attncore.project_keys(_o(2, 5, 6), _o(5, 9)), ValueError, "w_k"),
    ("project-keys-ndim", lambda: attncore.project_keys(_o(5, 6), _o(6, 9)), ValueError, "keys"),
    ("add-keys-object-w_k", additive(keys=attncore.AdditiveKeys(_o(2, 5, 9)), w_k=_o(6, 9)),
     ValueError, "w_k"),
    ("add-keys-object-dtype", additive(keys=attncore.AdditiveKeys(_o(2, 5, 9, dtype=F32)),
                                       w_k=None), TypeError, "keys"),
    ("add-keys-object-hidden", additive(keys=attncore.AdditiveKeys(_o(2, 5, 8)), w_k=None),
     ValueError, "keys"),
    ("add-keys-object-ndim", lambda: attncore.AdditiveKeys(_o(5, 9)), ValueError, "projected"),
    # ---- luong
    ("luong-method", luong(method="cosine"), ValueError, "method"),
    ("luong-general-no-w", luong(method="general"), ValueError, r"\bw\b"),
    ("luong-general-w-shape", luong(method="general", w=_o(6, 5)), ValueError, r"\bw\b"),
    ("luong-concat-no-w_q", luong(method="concat", w_k=_o(6, 4), v=_o(4)), ValueError, "w_q"),
    ("luong-concat-no-v", luong(method="concat", w_q=_o(6, 4), w_k=_o(6, 4)), ValueError,
     r"\bv\b"),
    ("luong-dot-width", luong(queries=_o(2, 3, 5)), ValueError, "queries and keys"),
    ("luong-values", luong(values=_o(2, 4, 6)), ValueError, "values"),
    # other batches: the scores + softmax path (values wider than keys) read past the keys
    ("luong-batch", luong(queries=_o(4000, 3, 6), values=_o(2, 5, 7)), ValueError, "queries"),
    ("luong-batch-general", luong(queries=_o(8, 3, 4), values=_o(2, 5, 7), method="general",
                                  w=_o(4, 6)), ValueError, "queries"),
    ("luong-dtype", luong(keys=_o(2, 5, 6, dtype=F32)), TypeError, "keys"),
    ("luong-lengths", luong(kv_lengths=[-1, 2]), ValueError, "kv_lengths"),
    ("luong-lengths-vdim", luong(values=_o(2, 5, 3), kv_lengths=[9, 2]), ValueError,
     "kv_lengths"),
    # ---- nadaraya_watson
    ("nw-bandwidth-0", nw(bandwidth=0.0), ValueError, "bandwidth"),
    ("nw-bandwidth-neg", nw(bandwidth=-1.0), ValueError, "bandwidth"),
    ("nw-bandwidth-inf", nw(bandwidth=np.inf), ValueError, "bandwidth"),
    ("nw-bandwidth-nan", nw(bandwidth=np.nan), ValueError, "bandwidth"),
    ("nw-bandwidth-str", nw(bandwidth="1"), TypeError, "bandwidth"),
    ("nw-3d", nw(queries=_o(4, 2, 1)), ValueError, "queries"),
    ("nw-features", nw(keys=_o(6, 3)), ValueError, "feature"),
    ("nw-values-rows", nw(values=_o(5)), ValueError, "values"),
    ("nw-dtype", nw(values=_o(6, dtype=F32)), TypeError, "values"),
    # ---- softmax / log_softmax
    ("softmax-int", lambda: attncore.softmax(np.ones((2, 3), dtype=int)), TypeError, r"\bx\b"),
    ("softmax-f16", lambda: attncore.softmax(_o(2, 3).astype(np.float16)), TypeError, r"\bx\b"),
    ("softmax-axis", lambda: attncore.softmax(_o(2, 3), axis=2), ValueError, "axis"),
    ("softmax-axis-neg", lambda: attncore.softmax(_o(2, 3), axis=-3), ValueError, "axis"),
    ("softmax-axis-float", lambda: attncore.softmax(_o(2, 3), axis=1.0), TypeError, "axis"),
    ("softmax-axis-none", lambda: attncore.softmax(_o(2, 3), axis=None), TypeError, "axis"),
    ("softmax-lengths-neg", lambda: attncore.softmax(_o(2, 3), lengths=[1, -1]), ValueError,
     "lengths"),
    ("softmax-lengths-big", lambda: attncore.softmax(_o(2, 3), lengths=[1, 4]), ValueError,
     "lengths"),
    ("softmax-lengths-shape", lambda: attncore.softmax(_o(2, 3), lengths=[1, 2, 3]), ValueError,
     "lengths"),
    ("softmax-lengths-float", lambda: attncore.softmax(_o(2, 3), lengths=[1.0, 2.0]), TypeError,
     "lengths"),
    ("softmax-mask-dtype", lambda: attncore.softmax(_o(2, 3), mask=_o(2, 3)), TypeError, "mask"),
    ("softmax-mask-shape", lambda: attncore.softmax(_o(2, 3), mask=_o(3, 2, dtype=bool)),
     ValueError, "mask"),
    ("log-softmax-axis", lambda: attncore.log_softmax(_o(2, 3), axis=5), ValueError, "axis"),
    ("log-softmax-mask", lambda: attncore.log_softmax(_o(2, 3), mask=[[1, 0, 1]]), TypeError,
     "mask"),
    # ---- linear / matmul
    ("linear-in", lambda: attncore.linear(_o(3, 4), _o(5, 3)), ValueError, "weight"),
    ("linear-weight-1d", lambda: attncore.linear(_o(3, 4), _o(4)), ValueError, "weight"),
    ("linear-bias", lambda: attncore.linear(_o(3, 4), _o(5, 4), _o(4)), ValueError, "bias"),
    ("packed-weight-1d", lambda: attncore.kernels.PackedLinearWeight(_o(4)), ValueError, "weight"),
    ("packed-weight-empty", lambda: attncore.kernels.PackedLinearWeight(_z(0, 4)), ValueError,
     "weight"),
    ("packed-weight-str", lambda: attncore.kernels.PackedLinearWeight("w"), TypeError, "weight"),
    ("packed-x-f64", lambda: attncore.linear(_o(3, 4), attncore.kernels.PackedLinearWeight(_o(5, 4))),
     TypeError, r"\bx\b"),
    ("packed-in", lambda: attncore.linear(_o(3, 3, dtype=F32),
                                          attncore.kernels.PackedLinearWeight(_o(5, 4))),
     ValueError, "weight"),
    ("packed-in-bf16", lambda: attncore.linear(
        _o(3, 3, dtype=F32), attncore.kernels.PackedLinearWeight(_o(5, 4), "bfloat16")),
     ValueError, "weight"),
    ("packed-weight-dtype", lambda: attncore.kernels.PackedLinearWeight(_o(5, 4), "float16"),
     ValueError, "weight_dtype"),
    ("packed-weight-dtype-type", lambda: attncore.kernels.PackedLinearWeight(_o(5, 4), np.float32),
     TypeError, "weight_dtype"),
    ("round-bf16-int", lambda: attncore.kernels.round_bfloat16(np.ones(3, dtype=np.int64)),
     TypeError, r"\bx\b"),
    ("round-bf16-str", lambda: attncore.kernels.round_bfloat16("x"), TypeError, r"\bx\b"),
    ("linear-bias-2d", lambda: attncore.linear(_o(3, 4), _o(5, 4), _o(1, 5)), ValueError, "bias"),
    ("linear-mixed", lambda: attncore.linear(_o(3, 4), _o(5, 4, dtype=F32)), TypeError, "weight"),
    ("linear-bias-dtype", lambda: attncore.linear(_o(3, 4), _o(5, 4), _o(5, dtype=F32)),
     TypeError, "bias"),
    ("linear-x-int", lambda: attncore.linear(np.ones((3, 4), int), _o(5, 4)), TypeError, r"\bx\b"),
    ("linear-x-0d", lambda: attncore.linear(np.float64(1.0), _o(5, 4)), ValueError, r"\bx\b"),
    ("matmul-inner", lambda: attncore.matmul(_o(3, 4), _o(5, 2)), ValueError, "inner"),
    ("matmul-inner-T", lambda: attncore.matmul(_o(3, 4), _o(2, 5), transpose_b=True), ValueError,
     "inner"),
    ("matmul-rank", lambda: attncore.matmul(_o(3, 4), _o(1, 4, 2)), ValueError, r"\ba\b and \bb\b"),
    ("matmul-4d", lambda: attncore.matmul(_o(1, 1, 3, 4), _o(1, 1, 4, 2)), ValueError, "3-D"),
    ("matmul-batch", lambda: attncore.matmul(_o(2, 3, 4), _o(3, 4, 2)), ValueError, "batch"),
    ("matmul-alpha", lambda: attncore.matmul(_o(3, 4), _o(4, 2), alpha=np.nan), ValueError,
     "alpha"),
    ("matmul-alpha-str", lambda: attncore.matmul(_o(3, 4), _o(4, 2), alpha="2"), TypeError,
     "alpha"),
    ("matmul-dtype", lambda: attncore.matmul(_o(3, 4), _o(4, 2, dtype=F32)), TypeError, r"\bb\b"),
    # ---- layer_norm
    ("ln-gamma", lambda: attncore.layer_norm(_o(3, 4), _o(5)), ValueError, "gamma"),
    ("ln-beta", lambda: attncore.layer_norm(_o(3, 4), None, _o(3)), ValueError, "beta"),
    ("ln-gamma-dtype", lambda: attncore.layer_norm(_o(3, 4), _o(4, dtype=F32)), TypeError,
     "gamma"),
    ("ln-mode", lambda: attncore.layer_norm(_o(3, 4), mode="batch"), ValueError, "mode"),
    ("ln-eps-neg", lambda: attncore.layer_norm(_o(3, 4), eps=-1e-5), ValueError, "eps"),
    ("ln-eps-nan", lambda: attncore.layer_norm(_o(3, 4), eps=np.nan), ValueError, "eps"),
    ("ln-eps-str", lambda: attncore.layer_norm(_o(3, 4), eps="1e-5"), TypeError, "eps"),
    # ---- activations
    ("relu-int", lambda: attncore.relu(np.arange(3)), TypeError, r"\bx\b"),
    ("gelu-f16", lambda: attncore.gelu(_o(3).astype(np.float16)), TypeError, r"\bx\b"),
    ("sigmoid-bool", lambda: attncore.sigmoid(np.ones(3, bool)), TypeError, r"\bx\b"),
    # ---- embedding
    ("emb-id-high", lambda: attncore.embedding(_o(5, 3), [0, 5]), ValueError, "ids"),
    ("emb-id-neg", lambda: attncore.embedding(_o(5, 3), [[0, -1]]), ValueError, "ids"),
    ("emb-id-float", lambda: attncore.embedding(_o(5, 3), [0.0, 1.0]), TypeError, "ids"),
    ("emb-table-1d", lambda: attncore.embedding(_o(5), [0]), ValueError, "table"),
    ("emb-table-int", lambda: attncore.embedding(np.ones((5, 3), int), [0]), TypeError, "table"),
    ("emb-empty-vocab", lambda: attncore.embedding(_o(0, 3), [0]), ValueError, "ids"),
    # ---- positions
    ("sin-length", lambda: attncore.sinusoidal_positions(-1, 4), ValueError, "length"),
    ("sin-dim", lambda: attncore.sinusoidal_positions(4, 0), ValueError, "dim"),
    ("rotary-odd", lambda: attncore.rotary(_o(3, 5)), ValueError, r"\bx\b.*even"),
    ("rotary-1d", lambda: attncore.rotary(_o(4)), ValueError, r"\bx\b"),
    ("rotary-positions-shape", lambda: attncore.rotary(_o(3, 4), [0, 1]), ValueError, "positions"),
    ("rotary-positions-float", lambda: attncore.rotary(_o(3, 4), [0.0, 1.0, 2.0]), TypeError,
     "positions"),
    ("rotary-base", lambda: attncore.rotary(_o(3, 4), base=np.inf), ValueError, "base"),
    ("rotary-positions-uint64", lambda: attncore.rotary(_o(3, 4), np.array(
        [0, 1, 2 ** 64 - 1], np.uint64)), ValueError, "positions must fit int64"),   # wrapped
    ("rotary-int", lambda: attncore.rotary(np.ones((3, 4), int)), TypeError, r"\bx\b"),
    # ---- threads
    ("threads-0", lambda: attncore.set_num_threads(0), ValueError, r"\bn\b.*\[1, 1024\]"),
    ("threads-neg", lambda: attncore.set_num_threads(-1), ValueError, r"\bn\b.*\[1, 1024\]"),
    # accepted, then every kernel call raised a bare OverflowError
    ("threads-huge", lambda: attncore.set_num_threads(2 ** 31), ValueError, r"\bn\b.*\[1, 1024\]"),
    ("threads-ctx-huge", lambda: attncore.num_threads(2 ** 40).__enter__(), ValueError, r"\bn\b"),
    ("threads-str", lambda: attncore.set_num_threads("2"), TypeError, r"\bn\b.*integer"),
    ("threads-float", lambda: attncore.set_num_threads(2.0), TypeError, r"\bn\b.*integer"),
    ("threads-bool", lambda: attncore.set_num_threads(True), TypeError, r"\bn\b.*integer"),
    ("threads-ctx-0", lambda: attncore.num_threads(0).__enter__(), ValueError, r"\bn\b"),
    ("threads-ctx-str", lambda: attncore.num_threads("1").__enter__(), TypeError, r"\bn\b"),
    # ---- flags (a truthy string applied the mask / the transpose) and float parameters past
    # float32's range on float32 inputs (scale 1e39 gave NaN, -1e39 zeros, eps 1e-50 NaN)
    ("attn-causal-str", attention(causal="False"), TypeError, "causal must be a bool"),
    ("attn-weights-str", attention(return_weights="no"), TypeError, "return_weights"),
    ("seqattn-causal-int", lambda: sequence_attention(Q, K, V, kv_lengths=None, causal=1),
     TypeError, "causal must be a bool"),
    ("additive-weights-str", additive(return_weights="yes"), TypeError, "return_weights"),
    ("luong-weights-str", luong(return_weights="yes"), TypeError, "return_weights"),
    ("nw-weights-str", nw(return_weights="yes"), TypeError, "return_weights"),
    ("matmul-transpose-str", lambda: attncore.matmul(_o(2, 2), _o(2, 2), transpose_b="False"),
     TypeError, "transpose_b must be a bool"),
    ("attn-scale-f32-range", attention(q=Q.astype(F32), k=K.astype(F32), v=V.astype(F32),
                                       scale=1e39), ValueError, "scale must be within float32"),
    ("attn-scale-f32-range-neg", attention(q=Q.astype(F32), k=K.astype(F32), v=V.astype(F32),
                                           scale=-1e39), ValueError, "scale must be within"),
    ("matmul-alpha-f32-range", lambda: attncore.matmul(_o(2, 2, dtype=F32), _o(2, 2, dtype=F32),
                                                       alpha=1e39),
     ValueError, "alpha must be within float32"),
    ("ln-eps-f32-zero", lambda: attncore.layer_norm(_o(2, 4, dtype=F32), eps=1e-50), ValueError,
     r"eps \(1e-50\) rounds to 0 in float32"),
    ("ln-mode-list", lambda: attncore.layer_norm(_o(2, 4), mode=["rms"]), ValueError,
     "mode must be one of"),
    # ragged lists gave NumPy's "inhomogeneous shape", naming nothing
    ("attn-kv-lengths-ragged", attention(kv_lengths=[[1, 2], [3]]), ValueError,
     "kv_lengths must be an array"),
    ("emb-ids-ragged", lambda: attncore.embedding(_o(5, 3), [[0, 1], [2]]), ValueError,
     "ids must be an array"),
    # a masked array's mask was dropped: the masked entry got weight 1.0
    ("softmax-masked-array", lambda: attncore.softmax(np.ma.array([1.0, 100.0, 2.0],
                                                                  mask=[0, 1, 0])),
     TypeError, r"\bx is a masked array"),
]


@pytest.mark.parametrize("call,exc,match", [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_bad_input_raises_named_error(call, exc, match):
    threads_before = attncore.get_num_threads()
    with pytest.raises(exc, match=match):
        call()
    assert attncore.get_num_threads() == threads_before  # a rejected setting changes nothing


def test_every_public_kernel_is_in_the_bad_input_matrix():
    """A new kernel front without a bad-input case fails here."""
    covered = {"attention": "attn-", "additive_attention": "add-", "project_keys": "project-keys",
               "AdditiveKeys": "add-keys-object",
               "luong_attention": "luong-", "nadaraya_watson": "nw-", "softmax": "softmax-",
               "log_softmax": "log-softmax", "linear": "linear-", "matmul": "matmul-",
               "PackedLinearWeight": "packed-", "round_bfloat16": "round-bf16-",
               "layer_norm": "ln-", "relu": "relu-", "gelu": "gelu-", "sigmoid": "sigmoid-",
               "embedding": "emb-", "sinusoidal_positions": "sin-", "rotary": "rotary-",
               "set_num_threads": "threads-", "num_threads": "threads-ctx"}
    shared_front = {"gelu_tanh", "swish", "tanh", "get_num_threads",  # same validator as a
                    "WEIGHT_DTYPES"}  # covered twin (element-wise _activation), nothing to
    # validate, or a constant
    public = set(attncore.kernels.__all__)
    assert public - set(covered) - shared_front == set()
    # a case belongs to the longest prefix its id starts with ("add-keys-object-..." is
    # AdditiveKeys', not additive_attention's; "log-softmax-..." is not softmax's)
    prefixes = set(covered.values())
    owners = {max((p for p in prefixes if case[0].startswith(p)), key=len, default=None)
              for case in BAD}
    for name, prefix in covered.items():
        assert prefix in owners, f"{name}: no bad-input case of its own ({prefix}...)"


@pytest.mark.parametrize("fn", [attncore.softmax, attncore.log_softmax])
def test_softmax_of_a_scalar_raises(fn):
    with pytest.raises(ValueError, match=r"\bx\b"):
        fn(np.float64(2.0))


def test_errors_happen_before_any_kernel_runs(monkeypatch):
    """A call rejected for one argument is rejected by the front, naming it, before any
    compiled kernel runs (the private kernels' own checks would raise too, unnamed)."""
    from attncore.kernels import _sdpa
    ran = []
    for name in ("flash", "split_kv", "weights_only"):
        monkeypatch.setattr(_sdpa, name, lambda *args, name=name: ran.append(name))
    q = Q.copy()
    for q_len in (1, Q.shape[2]):   # (the decode and the flash path)
        with pytest.raises(ValueError, match="kv_lengths"):
            attncore.attention(q[:, :, :q_len], K, V, kv_lengths=[9, 9])
    assert ran == [] and np.array_equal(q, Q)
    attncore.attention(q, K, V)   # (the spies are in place: a valid call reaches them)
    assert ran


# ------------------------------------------------------------------ empty inputs

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"kv_lengths": "zeros"},
                                {"return_weights": True}, {"mask": True}],
                         ids=["plain", "causal", "lengths", "weights", "mask"])
@pytest.mark.parametrize("b,q_len,kv_len", [(0, 3, 5), (2, 0, 5), (2, 3, 0), (2, 9, 0),
                                            (0, 0, 0), (2, 70, 0)])
def test_attention_empty_inputs_give_zeros(b, q_len, kv_len, kw, dtype):
    q, k, v = _z(b, 4, q_len, 8, dtype=dtype), _o(b, 2, kv_len, 8, dtype=dtype), \
        _o(b, 2, kv_len, 8, dtype=dtype)
    kw = dict(kw)
    if kw.get("kv_lengths") == "zeros":
        kw["kv_lengths"] = np.zeros(b, dtype=np.int64)
    if kw.get("mask"):
        kw["mask"] = np.ones((q_len, kv_len), dtype=bool)
        kw["return_weights"] = True
    result = attncore.attention(q, k, v, **kw)
    out, weights = result if kw.get("return_weights") else (result, None)
    assert out.shape == (b, 4, q_len, 8) and out.dtype == dtype
    assert np.array_equal(out, np.zeros_like(out))
    if weights is not None:
        assert weights.shape == (b, 4, q_len, kv_len) and weights.dtype == dtype
        assert np.array_equal(weights, np.zeros_like(weights))


@pytest.mark.parametrize("b,q_len,kv_len", [(0, 3, 5), (2, 0, 5), (2, 3, 0)])
def test_additive_and_luong_empty_inputs_give_zeros(b, q_len, kv_len):
    a = dict(queries=_o(b, q_len, 4), keys=_o(b, kv_len, 6), values=_o(b, kv_len, 7),
             w_q=_o(4, 9), w_k=_o(6, 9), w_v=_o(9))
    out, w = attncore.additive_attention(**a, return_weights=True)
    assert out.shape == (b, q_len, 7) and w.shape == (b, q_len, kv_len)
    assert not out.any() and not w.any()
    out = attncore.luong_attention(_o(b, q_len, 6), _o(b, kv_len, 6), _o(b, kv_len, 6))
    assert out.shape == (b, q_len, 6) and not out.any()


def test_luong_v_dim_empty_keys_gives_zeros():
    out = attncore.luong_attention(_o(2, 3, 6), _o(2, 0, 6), _o(2, 0, 4))
    assert out.shape == (2, 3, 4) and not out.any()



def test_luong_zero_width_queries_keys_and_values():
    # every width 0: the fused kernel's "q: head_dim must be > 0" named an argument the caller
    # never passed; now as with values of non-zero width: uniform weights, an empty output
    out, w = attncore.luong_attention(_o(2, 3, 0), _o(2, 4, 0), _o(2, 4, 0), return_weights=True)
    assert out.shape == (2, 3, 0) and w.shape == (2, 3, 4)
    np.testing.assert_allclose(w, 0.25)

@pytest.mark.parametrize("fn", [attncore.softmax, attncore.log_softmax])
def test_softmax_over_an_empty_axis(fn):
    out = fn(_o(3, 0))
    assert out.shape == (3, 0)


@pytest.mark.parametrize("queries,keys,values,shape", [
    (_o(0, 2), _o(3, 2), _o(3, 4), (0, 4)),
    (_o(0), _o(3), _o(3), (0,)),
    (_o(2, 2), _o(0, 2), _o(0, 4), (2, 4)),
], ids=["no-queries-2d", "no-queries-1d", "no-keys"])
def test_nadaraya_watson_empty_inputs(queries, keys, values, shape):
    out = attncore.nadaraya_watson(queries, keys, values)
    assert out.shape == shape and not out.any()


def test_rotary_empty_length():
    assert attncore.rotary(_o(2, 0, 4)).shape == (2, 0, 4)


def test_other_kernels_accept_empty_inputs():
    assert attncore.softmax(_o(0, 4)).shape == (0, 4)
    assert attncore.log_softmax(_o(2, 0, 4), lengths=np.zeros((2, 0), int)).shape == (2, 0, 4)
    assert attncore.linear(_o(0, 4), _o(3, 4)).shape == (0, 3)
    assert attncore.matmul(_o(0, 4), _o(4, 3)).shape == (0, 3)
    assert attncore.layer_norm(_o(0, 5)).shape == (0, 5)
    assert attncore.relu(_o(0)).shape == (0,)
    assert attncore.gelu(_o(2, 0)).shape == (2, 0)
    assert attncore.embedding(_o(5, 3), np.zeros((0, 2), int)).shape == (0, 2, 3)
    assert attncore.rotary(_o(0, 3, 4)).shape == (0, 3, 4)
    assert attncore.sinusoidal_positions(0, 4).shape == (0, 4)


# ---- sizes and parameters found by a review's probes (each once gave NaN, a truncation, a
# MemoryError or a reshape error naming nothing)
@pytest.mark.parametrize("call, error, match", [
    (lambda: attncore.sinusoidal_positions(2.7, 8), TypeError, "length must be an integer"),
    (lambda: attncore.sinusoidal_positions("3", 8), TypeError, "length must be an integer"),
    (lambda: attncore.sinusoidal_positions(True, 8), TypeError, "length must be an integer"),
    (lambda: attncore.sinusoidal_positions(2 ** 40, 512), ValueError, "length must lie in"),
    (lambda: attncore.sinusoidal_positions(2 ** 22, 2 ** 10), ValueError, "length \\* dim"),
    (lambda: attncore.sinusoidal_positions(4, 8, base=0.0), ValueError, "base must be finite and > 0"),
    (lambda: attncore.sinusoidal_positions(4, 8, dtype=np.int64), TypeError, "float dtype"),
    (lambda: attncore.rotary(np.ones((3, 4)), base=-1.0), ValueError, "base must be finite and > 0"),
])
def test_bad_table_and_rotary_parameters_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_and_zero_width_inputs_are_valid():
    assert attncore.embedding(np.ones((5, 2), np.float32), []).shape == (0, 2)
    keys = attncore.project_keys(np.ones((2, 3, 0)), np.ones((0, 4)))
    np.testing.assert_array_equal(keys, np.zeros((2, 3, 4)))
    out = attncore.additive_attention(np.ones((2, 1, 0)), np.ones((2, 3, 5)), np.ones((2, 3, 7)),
                                      np.ones((0, 4)), np.ones((5, 4)), np.ones(4))
    np.testing.assert_allclose(out, np.ones((2, 1, 7)))


def test_a_huge_max_length_is_named_not_a_memory_error():
    from attncore.models import Seq2SeqAttention
    from attncore.models.base import MAX_GENERATION_LENGTH
    from attncore.train.seq2seq import Seq2SeqConfig
    model = Seq2SeqAttention.from_config(Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=11,
                                                       embed_dim=6, hidden_size=8).to_dict())
    for options in (dict(max_length=2 ** 62), dict(max_length=2 ** 40, return_attention=True)):
        with pytest.raises(ValueError, match=f"max_length must be at most {MAX_GENERATION_LENGTH}"):
            model.generate([[4, 5]], **options)


def test_a_huge_beam_or_min_length_is_named():
    # a beam of 10^9 ran for minutes (candidates grow as beams x vocabulary a step) and 2**62
    # gave an OverflowError naming nothing; translate's min_length past the longest generation
    # was reported as max_length, and a numpy integer min_length was ignored there
    from attncore.models import Seq2SeqAttention
    from attncore.models.base import MAX_BEAM_SIZE, MAX_GENERATION_LENGTH
    from attncore.train.seq2seq import Seq2SeqConfig
    model = Seq2SeqAttention.from_config(Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=11,
                                                       embed_dim=6, hidden_size=8).to_dict())
    for beam in (MAX_BEAM_SIZE + 1, 10 ** 9, 2 ** 62):
        with pytest.raises(ValueError, match=f"beam_size must be at most {MAX_BEAM_SIZE}"):
            model.generate([[4, 5]], max_length=6, beam_size=beam)
    from attncore.models.base import generate_with_default_lengths
    with pytest.raises(ValueError, match=f"min_length must be at most {MAX_GENERATION_LENGTH}"):
        generate_with_default_lengths(model, [[4, 5]], min_length=10 ** 7)
    numpy_floor = generate_with_default_lengths(model, [[4, 5]], min_length=np.int64(30))
    assert len(numpy_floor[0].tokens) >= 30
    assert numpy_floor[0].tokens == generate_with_default_lengths(model, [[4, 5]],
                                                                   min_length=30)[0].tokens


def test_float64_weights_past_float32_range_are_named():
    # they were finite as given, turned inf in the float32 copy: all-NaN outputs, a warning only
    from attncore.models import Seq2SeqAttention
    from attncore.train.seq2seq import Seq2SeqConfig
    model = Seq2SeqAttention.from_config(Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=11,
                                                       embed_dim=6, hidden_size=8).to_dict())
    weights = {name: value.astype(np.float64) for name, value in model.weights.items()}
    weights["decoder.output.weight"] = weights["decoder.output.weight"] * 1e300
    with pytest.raises(ValueError, match="'decoder.output.weight' holds values beyond float32"):
        Seq2SeqAttention(model.config, weights)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_big_endian_and_matrix_inputs_give_the_native_results():
    # they raised Cython's "Big-endian buffer not supported" / "No matching signature found"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    for dtype in (F32, F64):
        swapped = np.dtype(dtype).newbyteorder(">")
        np.testing.assert_array_equal(attncore.softmax(x.astype(swapped)),
                                      attncore.softmax(x.astype(dtype)))
        np.testing.assert_array_equal(attncore.linear(x.astype(swapped), x.astype(dtype)),
                                      attncore.linear(x.astype(dtype), x.astype(dtype)))
        np.testing.assert_array_equal(
            attncore.attention(q.astype(swapped), k.astype(dtype), v.astype(swapped)),
            attncore.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype)))
    np.testing.assert_array_equal(attncore.relu(np.matrix(x)), attncore.relu(x))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_fast_array_check_passes_only_arrays_the_kernels_read_as_they_are():
    """check_float_array returns an array unchanged when _arrays.plain_float_array (its C fast
    path) says so: it must say False for everything the Python checks convert or refuse."""
    from attncore.kernels._arrays import plain_float_array
    from attncore.kernels._validation import check_float_array
    x = np.arange(24, dtype=F32).reshape(2, 3, 4)
    raw = bytearray(x.nbytes + 1)
    unaligned = np.frombuffer(raw, dtype=F32, count=x.size, offset=1).reshape(x.shape)
    plain = [(x, None, None, None), (x, 3, None, None), (x, None, 3, None),
             (x.astype(F64), 3, 1, np.dtype(F64)), (x, 3, 2, x.dtype), (x[0], 2, None, None)]
    others = [(x.astype(np.float16), None, None, None), (x.astype(np.int32), None, None, None),
              (x.astype(np.dtype(F32).newbyteorder(">")), None, None, None),
              (x.transpose(0, 2, 1), None, None, None), (x[:, :, ::2], None, None, None),
              (unaligned, None, None, None), (np.ma.masked_array(x), None, None, None),
              (np.matrix(x[0]), None, None, None), (x.tolist(), None, None, None),
              (x, 2, None, None), (x, None, 4, None), (x, None, None, np.dtype(F64)),
              (np.float32(1.0), None, None, None)]
    for array, ndim, min_ndim, dtype in plain:
        assert plain_float_array(array, ndim, min_ndim, dtype)
        assert check_float_array(array, "x", ndim, min_ndim, dtype) is array
    for array, ndim, min_ndim, dtype in others:
        assert not plain_float_array(array, ndim, min_ndim, dtype)


def test_fast_qkv_check_passes_only_what_the_python_checks_pass_unchanged(monkeypatch):
    """attention's _check_qkv returns q, k, v at once when _arrays.plain_qkv (its C fast path)
    says so: it must say False for every combination the Python checks convert or refuse,
    and the errors stay theirs."""
    import importlib
    from attncore.kernels._arrays import plain_qkv
    front = importlib.import_module("attncore.kernels.attention")   # (the module, not the function)
    q, k = np.zeros((2, 4, 3, 8), F32), np.zeros((2, 2, 5, 8), F32)
    plain = [(q, k, k), (q, k, k.copy()), (q.astype(F64), k.astype(F64), k.astype(F64)),
             (q[:, :, :0], k, k), (q, k[:, :, :0], k[:, :, :0]), (q[:1], k[:1], k[:1])]
    others = [(q, k.astype(F64), k), (q, k, k.astype(F64)), (q.astype(F64), k, k),
              (q, k[:, :, :4], k), (q, k, k[:, :1]), (q, k[:1], k[:1]),
              (q, k[..., :4].copy(), k[..., :4].copy()), (q[..., :0], k[..., :0], k[..., :0]),
              (q, np.zeros((2, 3, 5, 8), F32), np.zeros((2, 3, 5, 8), F32)),
              (q, k[:, :0], k[:, :0]), (q[0], k[0], k[0]), (q, k.transpose(0, 1, 3, 2), k),
              (q, k[:, :, ::2], k[:, :, ::2]), (q.tolist(), k, k), (np.ma.masked_array(q), k, k),
              (q.astype(np.float16), k, k), (q, k.astype(np.dtype(F32).newbyteorder(">")), k)]
    for args in plain:
        assert plain_qkv(*args)
        assert all(a is b for a, b in zip(front._check_qkv(*args), args))
    for i, args in enumerate(others):
        assert not plain_qkv(*args), i
    # the Python checks agree that the plain ones pass as they are
    monkeypatch.setattr(front, "plain_qkv", lambda *args: False)
    for args in plain:
        assert all(a is b for a, b in zip(front._check_qkv(*args), args))


def test_fast_range_check_of_ids_and_lengths():
    """_arrays.int64_first_outside (check_ids' and check_lengths' C pass) finds the first value
    outside [low, high] of a plain int64 array, and answers None for the arrays NumPy checks."""
    from attncore.kernels._arrays import int64_first_outside
    ids = np.array([[3, 0, 9], [4, 10, -1]], dtype=np.int64)
    assert int64_first_outside(ids, 0, 10) == 5
    assert int64_first_outside(ids, 0, 9) == 4
    assert int64_first_outside(ids, -1, 10) == -1
    assert int64_first_outside(ids[:0], 0, 0) == -1
    assert int64_first_outside(np.array([0], dtype=np.int64), 0, -1) == 0   # (vocab 0)
    assert int64_first_outside(ids.astype(np.longlong), 0, 10) == 5   # (int64's twin type)
    for other in (ids.astype(np.int32), ids.astype(np.uint64), ids.T, ids[:, ::2],
                  ids.astype(np.dtype(np.int64).newbyteorder(">")), ids.tolist()):
        assert int64_first_outside(other, 0, 10) is None
    # the fronts name the value either way
    table = np.zeros((10, 2), np.float32)
    for bad in (ids, ids.astype(np.int32), ids.T, ids[:, ::2] - 1, ids.astype(np.longlong)):
        with pytest.raises(ValueError, match=r"ids values must lie in \[0, 10\), got "):
            attncore.embedding(table, bad)
    # np.longlong ids (NPY_LONGLONG, not NPY_INT64's NPY_LONG) gather as int64 ones
    good, rows = np.array([[3, 0], [9, 4]]), np.arange(20, dtype=F32).reshape(10, 2)
    np.testing.assert_array_equal(attncore.embedding(rows, good.astype(np.longlong)),
                                  rows[good])
    with pytest.raises(ValueError, match=r"kv_lengths values must lie in \[0, 5\], got 6"):
        attncore.attention(Q, K, V, kv_lengths=np.array([2, 6]))


def test_reference_agrees_with_the_kernels_on_an_empty_axis():
    # the oracle raised ValueError ("zero-size array to reduction operation maximum") where
    # the kernels return an empty or all-zero result
    from attncore import reference
    for name in ("softmax", "log_softmax"):
        for shape, axis in (((3, 0), -1), ((0, 4), 0), ((2, 0, 3), 1)):
            x = _z(*shape)
            want = getattr(attncore, name)(x, axis)
            got = getattr(reference, name)(x, axis)
            assert got.shape == want.shape and got.dtype == want.dtype
    q, kv = _o(1, 2, 3, 4), _z(1, 2, 0, 4)
    for got, want in zip(reference.attention(q, kv, kv, return_weights=True),
                         attncore.attention(q, kv, kv, return_weights=True)):
        np.testing.assert_array_equal(got, want)
        assert got.shape == want.shape


# --------------------------------------------- private kernel modules called directly
# The fronts check arguments for users; the private Cython modules check again what their C
# code indexes by, so a direct call cannot corrupt memory (each of these crashed the process:
# a division by zero, a NULL or out-of-bounds write, or libgomp aborting).

def _z32(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def _private_calls():
    from attncore.kernels import _additive, _layers, _sdpa, _softmax
    q0, k4, o0 = _z32(1, 1, 0, 8), _z32(1, 1, 4, 8), _z32(1, 1, 0, 8)
    q1, o1 = _z32(1, 1, 1, 8), _z32(1, 1, 1, 8)
    return {
        "flash q_len 0": lambda: _sdpa.flash(q0, k4, k4, o0, None, False, 0.3, 64, 64, False, 1),
        "flash out None": lambda: _sdpa.flash(q1, k4, k4, None, None, False, 0.3, 64, 64, False, 1),
        "split_kv chunk 0": lambda: _sdpa.split_kv(q1, k4, k4, o1, None, False, 0.3, 0, 1),
        "softmax short out": lambda: _softmax.softmax_rows(_z32(8, 4), _z32(1, 4), None, None, False, 1),
        "softmax length past n": lambda: _softmax.softmax_rows(
            _z32(1, 4), _z32(1, 4), np.array([9]), None, False, 1),
        "embedding id past table": lambda: _layers.embedding(_z32(3, 4), np.array([1 << 40]), 1),
        "embedding negative id": lambda: _layers.embedding(_z32(3, 4), np.array([[0], [-1]]), 1),
        "embedding int32 ids": lambda: _layers.embedding(_z32(3, 4), np.array([0], np.int32), 1),
        "embedding strided ids": lambda: _layers.embedding(_z32(3, 4), np.zeros(4, np.int64)[::2],
                                                           1),
        "embedding 1-D table": lambda: _layers.embedding(_z32(3), np.array([0]), 1),
        "embedding empty table": lambda: _layers.embedding(_z32(0, 4), np.array([0]), 1),
        "layer_norm short gamma": lambda: _layers.layer_norm(_z32(2, 8), _z32(1), None, 1e-5, 0, 1),
        "layer_norm float64 beta": lambda: _layers.layer_norm(_z32(2, 8), None,
                                                              _z32(8, dtype=np.float64), 1e-5, 0, 1),
        "layer_norm scalar": lambda: _layers.layer_norm(_z32(), None, None, 1e-5, 0, 1),
        "activation strided x": lambda: _layers.activation(_z32(4, 8)[:, ::2], 0, 1),
        "activation int x": lambda: _layers.activation(np.zeros(4, np.int32), 0, 1),
        "activation list x": lambda: _layers.activation([1.0], 0, 1),
        "rotary short positions": lambda: _layers.rotary(_z32(1, 8, 4), np.array([0]), 1e4, 1),
        "additive length past keys": lambda: _additive.additive(
            _z32(1, 1, 8), _z32(1, 4, 8), np.ones(8, np.float32), _z32(1, 4, 8), _z32(1, 1, 8), None,
            np.array([5]), 1),
        "nadaraya short values": lambda: _additive.nadaraya_watson(
            _z32(1, 2), _z32(64, 2), _z32(1, 1), _z32(1, 1), None, 1.0, 1),
    }


@pytest.mark.parametrize("case", sorted(_private_calls()))
def test_private_kernel_modules_refuse_what_would_corrupt_memory(case):
    with pytest.raises(ValueError):
        _private_calls()[case]()


def test_private_kernels_take_a_negative_thread_count_as_one():
    from attncore.kernels import _blas, _layers
    x = np.linspace(-2, 2, 1 << 17, dtype=np.float32)
    out = _layers.activation(x, 0, -1)   # (libgomp read -1 as a huge team and aborted)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    a = np.ones((1, 64, 64), np.float32)
    product = np.empty_like(a)
    _blas.matmul(a, a, product, False, 1.0, -1)
    np.testing.assert_array_equal(product, np.full_like(a, 64.0))


def test_int8_panels_of_no_output_feature_are_not_read():
    # panels_fit read the stored in-feature count from an empty int8 panel array
    from attncore.kernels import _blas
    panels = np.zeros((0, _blas.int8_panels_shape(1, 64)[1], 64), np.int8)
    out = _z32(3, 0)
    _blas.linear_packed(_z32(3, 64), panels, 0, None, out, 0, 1)
    assert out.shape == (3, 0)


def test_decoder_steps_are_built_once_and_check_their_tokens_and_lengths():
    from attncore.kernels import _recurrent
    E, H, V, A, G = 4, 8, 5, 6, 3
    args = lambda emb: ("bahdanau", False, False, emb, [_z32(G * H, E + H)], [_z32(G * H, H)],  # noqa: E731
                        [_z32(G * H)], [_z32(G * H)], _z32(A, H), _z32(A), None, None, _z32(V, H), _z32(V),
                        0, "float32", False)
    with pytest.raises(ValueError, match="embedding must have 5 rows"):
        _recurrent.DecoderStep(*args(_z32(1, E)))   # (greedy's argmax tokens index it)
    step = _recurrent.DecoderStep(*args(_z32(V, E)))
    with pytest.raises(RuntimeError, match="already built"):
        step.__init__(*args(_z32(V, E)))
    B, S = 1, 3
    state = dict(h=_z32(1, B, H), c=_z32(1, B, H), feed=_z32(B, H), memory=_z32(B, S, H),
                 keys=_z32(B, S, A))

    def run(tokens, lengths):
        step.step(np.array(tokens), state["h"], state["c"], state["feed"], state["memory"],
                  state["keys"], None, None, np.array(lengths), _z32(B, V), _z32(B, S),
                  _z32(B * step.scratch_width), 1)
    with pytest.raises(ValueError, match=r"tokens\[0\] = 5 is outside \[0, 5\)"):
        run([5], [S])
    with pytest.raises(ValueError, match=r"lengths\[0\] = 4 is outside \[0, 3\]"):
        run([1], [S + 1])
    run([1], [S])
    assert np.isfinite(state["h"]).all()


@pytest.mark.parametrize("architecture, key, value, message", [
    # the trainer's arithmetic on them came first: ZeroDivisionError, or NumPy's own message
    ("transformer", "num_heads", 0, "config: num_heads must lie in [1, "),
    ("transformer", "d_model", 0, "config: d_model must lie in [1, "),
    ("transformer", "dim_feedforward", 0, "config: dim_feedforward must lie in [1, "),
    ("transformer", "tgt_vocab_size", 0, "tgt_vocab_size must be > 0"),
    ("transformer", "layer_norm_eps", 0.0, "layer_norm_eps must be a finite number > 0"),
    ("seq2seq", "hidden_size", 0, "config: hidden_size must lie in [1, "),
    ("seq2seq", "attention_dim", -1, "config: attention_dim must lie in [0, "),
    ("seq2seq", "tgt_vocab_size", 0, "tgt_vocab_size must be >= 1 for a model with a decoder"),
])
def test_from_config_names_a_bad_size(architecture, key, value, message):
    from attncore.models import Seq2SeqAttention, Transformer
    from attncore.train.seq2seq import Seq2SeqConfig
    from attncore.train.transformer import TransformerConfig
    if architecture == "transformer":
        model_class = Transformer
        config = TransformerConfig(kind="encoder_decoder", src_vocab_size=9, tgt_vocab_size=9,
                                   d_model=6, num_heads=2, dim_feedforward=5,
                                   max_positions=6).to_dict()
    else:
        model_class = Seq2SeqAttention
        config = Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=10, embed_dim=4,
                               hidden_size=6).to_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        model_class.from_config(dict(config, **{key: value}))


def _encoder_only(weights_changed=()):
    from attncore.data.vocab import Vocab
    from attncore.models import Transformer
    from attncore.tokenizer import Tokenizer
    from attncore.train.transformer import TransformerConfig
    config = TransformerConfig(kind="encoder_only", src_vocab_size=10, tgt_vocab_size=0,
                               d_model=8, num_heads=2, dim_feedforward=12, num_encoder_layers=1,
                               num_decoder_layers=0, max_positions=16, num_classes=3).to_dict()
    config["architecture"] = "transformer"
    model = Transformer.from_config(config, seed=3, tokenizer=Tokenizer(src=Vocab("abcdef")))
    weights = dict(model.weights)
    for name, value in dict(weights_changed).items():
        weights[name] = np.full_like(weights[name], value)
    return Transformer(model.config, weights, tokenizer=model.tokenizer)


def test_outputs_that_overflow_are_an_error_not_nan():
    # classify and encode handed back NaN / inf, where generation already raised
    sources = [np.array([4, 5, 6])]
    assert np.isfinite(_encoder_only().classify(sources)).all()
    with pytest.raises(ValueError, match="class logits are not finite"):
        _encoder_only({"encoder.layers.0.norm2.bias": 10.0,   # (pooled features of 10)
                       "classifier.weight": 1e38}).classify(sources)
    with pytest.raises(ValueError, match="encoder outputs are not finite"), \
            np.errstate(over="ignore"):
        _encoder_only({"src_embedding.weight": 3e38}).encode(sources)
    from attncore.models import RAN
    from attncore.train.ran import RANConfig
    config = RANConfig(vocab_size=9, embedding_size=8, head_num=2, head_size=4,
                       num_classes=3).to_dict()
    config["architecture"] = "ran"
    ran = RAN.from_config(config, seed=1)
    weights = dict(ran.weights, **{"embedding_norm.weight": np.full(
        ran.weights["embedding_norm.weight"].shape, 3e38, np.float32)})
    with pytest.raises(ValueError, match="encoder outputs are not finite"):
        RAN(ran.config, weights).encode([np.array([4, 5, 6])])


def test_an_encoder_without_classes_cannot_classify():
    # logits of shape (1, 0), and argmax of an empty sequence in the caller
    from attncore.models import Transformer
    model = _encoder_only()
    empty = dict(model.weights, **{"classifier.weight": np.zeros((0, 8), np.float32),
                                   "classifier.bias": np.zeros((0,), np.float32)})
    with pytest.raises(ValueError, match=re.escape("no classifier (num_classes = 0)")):
        Transformer(dict(model.config, num_classes=0), empty).classify([np.array([4, 5])])


def test_special_ids_must_be_the_tokenizers(tmp_path):
    # eos_id 4 stopped generation on a real token while the tokenizer ended sources with 2
    import json
    from attncore import io, models
    model = _encoder_only()
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / io.CONFIG_FILE).read_text())
    (tmp_path / "m" / io.CONFIG_FILE).write_text(json.dumps(dict(config, unk_id=5)))
    with pytest.raises(ValueError, match=re.escape("config: unk_id 5 is not the tokenizer's 3")):
        models.load(tmp_path / "m")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs a named pipe")
def test_a_vocabulary_that_is_not_a_file_is_named_as_such(tmp_path):
    # a FIFO (or a directory) was reported as a "missing file"
    import json
    import os
    from attncore import io, models
    _encoder_only().save(tmp_path / "m")
    name = json.loads((tmp_path / "m" / io.CONFIG_FILE).read_text())["tokenizer"]["src"]
    os.remove(tmp_path / "m" / name)
    os.mkfifo(tmp_path / "m" / name)
    with pytest.raises(ValueError, match=re.escape(f"{name}' is not a regular file")):
        models.load(tmp_path / "m")
