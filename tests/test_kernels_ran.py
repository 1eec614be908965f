# SPDX-License-Identifier: Apache-2.0
"""The compiled decoding step of a causal RAN language model (attncore.kernels._ran.RANStep).

Its reference here is the same step composed from the public kernels in Python (packed
``linear``, ``swish``/``sigmoid``, ``rotary``, ``sequence_attention`` on the window cache and on
the carried memory, the langml ``layer_norm``, ``log_softmax``): the compiled step runs those
very C kernels in the same order. (That generation's steps equal one ``token_logits`` call over
the whole sequence is in test_engine_ran.py.) Also: thread-count independence, concurrent
use, and the step's own guards turning inconsistent arguments into ValueError before any C
code runs."""
import threading

import numpy as np
import pytest

import attncore
from attncore import kernels as K
from attncore.kernels.attention import flash_plan, sequence_attention
from attncore.models.ran import RAN, LN_EPS, ROTARY_BASE

from conftest import rows_independent

VOCAB = 37


def _engine(weight_dtype="float32", **overrides) -> RAN:
    config = dict(architecture="ran", vocab_size=VOCAB, embedding_size=24, ran_layers=2,
                  head_num=2, head_size=8, window_size=6, min_window_size=2, causal=True,
                  memory_review=True, cell_pooling="last", num_classes=0, token_head="lm",
                  dtype="float32", eos_id=2)
    config.update(overrides)
    return RAN.from_config(config, seed=5, weight_dtype=weight_dtype)


def _ln(x, norm):
    return K.layer_norm(x, norm[0], norm[1], LN_EPS, mode="uncentred")


def _swish_glu(model_input, dense, glu_input, glu):
    h = K.linear(glu_input, glu[0], glu[1])
    half = h.shape[-1] // 2
    return K.swish(K.linear(model_input, dense[0], dense[1])) + \
        h[..., :half] * K.sigmoid(h[..., half:])


def _composed_layers(model: RAN, state, rows, tokens, held):
    """The cached step's layers from the public kernels, in place on state's window cache."""
    H, d = model.head_num, model.head_size
    n = len(rows)
    cache = state.cache
    position = held[rows] + 1
    cache.reserve(int(position.max()) + 1, 1 + int(held.max()))
    model._start_windows(state, rows[held[rows] == 0])   # (row 0 of a window's first step)
    x = _ln(K.embedding(model.weights["embedding.weight"], tokens), model.embedding_norm)
    for index, layer in enumerate(model.layers):
        z = _ln(x, layer.concat_norm)
        p = K.swish(K.linear(z, *layer.qkv)).reshape(n, 3, H, d)
        qk = K.rotary(np.ascontiguousarray(p[:, :2].transpose(1, 2, 0, 3)), position,
                      ROTARY_BASE)
        keys, values = cache.keys[index], cache.values[index]
        keys[rows, :, position] = qk[1].transpose(1, 0, 2)
        values[rows, :, position] = p[:, 2]
        q = np.ascontiguousarray(qk[0].transpose(1, 0, 2)[:, :, None])
        o = sequence_attention(q, keys[rows], values[rows], kv_lengths=position + 1,
                               causal=True)
        h = _swish_glu(o.reshape(n, H * d), layer.attn_out, z, layer.attn_glu)
        y = K.layer_norm(_ln(h, layer.attn_norm), None, None, LN_EPS, mode="uncentred")
        if not model.memory_review:
            x = _ln(y, layer.output_norm)
            continue
        query = K.swish(K.linear(y, *layer.review_query))
        context = np.empty_like(query)
        for i, r in enumerate(rows):
            carry = state.state.layers[r][index]
            context[i] = sequence_attention(
                query[None, None, i:i + 1], carry.memory_keys[None, None],
                carry.memory_values[None, None], kv_lengths=None, causal=False)[0, 0, 0]
        x = _ln(_swish_glu(context, layer.review_out, query, layer.review_glu),
                layer.review_norm)
    return x


def _composed_head(model: RAN, x):
    h = _ln(K.swish(K.linear(x, *model.lm_dense)), model.lm_norm)
    return K.log_softmax(K.linear(h, model.lm_output, model.lm_bias))


def _assert_same(got, want):
    """Bit for bit where a row's result depends on its own inputs only (the window attention
    runs row by row in the compiled step, batched in the composition); elsewhere to
    rounding."""
    if rows_independent():
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _started(model, lengths, seed):
    rng = np.random.default_rng(seed)
    state = model._start([rng.integers(3, VOCAB, n) for n in lengths])
    model._step(state, None)
    return state


@pytest.mark.parametrize("overrides", [
    {}, dict(memory_review=False), dict(head_num=3, head_size=6, embedding_size=20),
    dict(weight_dtype="bfloat16"), dict(weight_dtype="int8"),
], ids=["review", "no-review", "narrow-attention", "bf16", "int8"])
def test_compiled_step_equals_the_kernel_composition(overrides):
    model = _engine(**overrides)
    # rows at several window rows, some completing windows (the composed path only covers
    # the rows inside a window: the others go through encode in both)
    lengths = (1, 4, 7, 11)
    compiled, composed = _started(model, lengths, 1), _started(model, lengths, 1)
    rng = np.random.default_rng(2)
    for _ in range(4):
        held = compiled.tokens_held()
        rows = np.flatnonzero(held + 1 < compiled.state.window_size)
        tokens = rng.integers(0, VOCAB, len(rows))
        got = model._cached_step(compiled, rows, tokens, held)
        want = _composed_layers(model, composed, rows, tokens, held)
        _assert_same(got, want)
        _assert_same(model._next_log_probs(got), _composed_head(model, want))
        # both states move on through the engine's own step (commits included)
        step_tokens = rng.integers(0, VOCAB, compiled.batch_size)
        model._step(compiled, step_tokens)
        model._step(composed, step_tokens)
    for a, b in zip(compiled.cache.keys, composed.cache.keys):
        for row, held in enumerate(compiled.tokens_held()):
            _assert_same(a[row, :, :held + 1], b[row, :, :held + 1])


def test_compiled_head_equals_the_composition_bit_for_bit():
    model = _engine()
    x = np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32)
    np.testing.assert_array_equal(model._next_log_probs(x), _composed_head(model, x))


def test_generation_is_identical_at_one_and_two_threads_and_across_python_threads():
    model = _engine(window_size=5)
    prompts = [np.arange(3, 3 + n) % VOCAB for n in (2, 6, 9)]
    options = dict(max_length=12, min_length=12, beam_size=3)

    def run():
        return [(r.tokens, r.score) for r in model.generate(prompts, **options)]

    with attncore.num_threads(1):
        one = run()
    with attncore.num_threads(2):
        assert run() == one
    results = [None] * 4

    def worker(i):
        with attncore.num_threads(1):
            results[i] = run()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [one] * 4


def _step_arguments(model, n=2):
    state = _started(model, (3,) * n, 4)
    held = state.tokens_held()
    state.cache.reserve(int(held.max()) + 2, 1 + int(held.max()))
    carried = [carry for r in range(n) for carry in state.state.layers[r]]
    return dict(tokens=np.zeros(n, np.int64), rows=np.arange(n, dtype=np.int64),
                positions=(held + 1).astype(np.int64), k_caches=list(state.cache.keys),
                v_caches=list(state.cache.values),
                memory_keys=[c.memory_keys for c in carried],
                memory_values=[c.memory_values for c in carried],
                out=np.empty((n, 24), np.float32),
                window_flash=flash_plan(8, True),
                review_flash=flash_plan(24, False), num_threads=1)


@pytest.mark.parametrize("change,message", [
    (dict(tokens=np.array([0, VOCAB])), r"tokens\[1\] = 37 is outside \[0, 37\)"),
    (dict(tokens=np.array([-1, 0])), r"tokens\[0\] = -1"),
    (dict(rows=np.array([0, 2])), r"rows\[1\] = 2 is outside \[0, 2\)"),
    (dict(rows=np.array([1, 1])), "rows must be distinct"),      # (one cache row written twice)
    (dict(positions=np.array([0, 1 << 40])), r"positions\[1\] = 1099511627776 is outside"),
    (dict(positions=np.array([0])), "disagree"),
    (dict(out=np.empty((2, 5), np.float32)), "disagree"),
    (dict(k_caches=[]), "one array per layer"),
    (dict(memory_keys=None), "required with memory review"),
    (dict(memory_values=[]), r"need 2 x 2 arrays"),
    (dict(window_flash=(0, 96, False)), "window_flash must be"),
    (dict(review_flash=(17, 96, True)), "review_flash must be"),
])
def test_step_rejects_inconsistent_arguments(change, message):
    model = _engine()
    arguments = _step_arguments(model)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        model._decoding_step.step(*arguments.values())


def test_step_rejects_caches_and_memories_of_the_wrong_shape():
    model = _engine()
    arguments = _step_arguments(model)
    arguments["v_caches"] = [arguments["v_caches"][0], arguments["v_caches"][1][:, :1].copy()]
    with pytest.raises(ValueError, match=r"every cache must have shape \(2, 2, \d+, 8\)"):
        model._decoding_step.step(*arguments.values())
    arguments = _step_arguments(model)
    arguments["memory_keys"][3] = np.zeros((1, 23), np.float32)
    with pytest.raises(ValueError, match=r"memory_keys\[3\] must have shape \(m >= 1, 24\)"):
        model._decoding_step.step(*arguments.values())
    arguments = _step_arguments(model)
    arguments["memory_values"][0] = np.zeros((5, 24), np.float32)
    with pytest.raises(ValueError, match=r"memory_values\[0\] must have shape \(1, 24\)"):
        model._decoding_step.step(*arguments.values())
    arguments = _step_arguments(model)
    arguments["memory_keys"][0] = np.zeros((1, 24))          # float64
    with pytest.raises(ValueError, match="Buffer dtype mismatch"):
        model._decoding_step.step(*arguments.values())
    arguments = _step_arguments(model)
    read_only = arguments["k_caches"][1].copy()
    read_only.flags.writeable = False
    arguments["k_caches"][1] = read_only
    with pytest.raises(ValueError, match="read-only"):
        model._decoding_step.step(*arguments.values())


def _constructor_arguments(model):
    """(RANStep keyword arguments but layers, layer 0's table) of the model of _engine()."""
    names = ["concat_norm", "qkv", "attn_out", "attn_glu", "attn_norm", "review_query",
             "review_out", "review_glu", "review_norm"]
    layer = {name: getattr(model.layers[0], name) for name in names}
    common = dict(embedding_size=24, head_num=2, head_size=8, eps=LN_EPS,
                  rotary_base=ROTARY_BASE, memory_review=True, small_gemm_macs=0,
                  embedding=model.weights["embedding.weight"],
                  embedding_norm=model.embedding_norm, lm_dense=model.lm_dense,
                  lm_norm=model.lm_norm, lm_output=model.lm_output, lm_bias=model.lm_bias)
    return common, layer


def test_head_and_constructor_reject_what_does_not_fit():
    from attncore.kernels._ran import RANStep
    model = _engine()
    with pytest.raises(ValueError, match=r"x must be \(3, 24\) and log_probs \(3, 37\)"):
        model._decoding_step.head(np.zeros((3, 24), np.float32),
                                  np.zeros((3, 36), np.float32), 1)
    common, layer = _constructor_arguments(model)
    RANStep(**common, layers=[layer])                                  # consistent: builds
    with pytest.raises(ValueError, match=r"layers\[0\].qkv must have shape \(54, 24\)"):
        RANStep(**{**common, "head_num": 3, "head_size": 6}, layers=[layer])
    with pytest.raises(ValueError, match=r"layers\[1\].review_glu bias must be"):
        RANStep(**common, layers=[layer, {**layer, "review_glu": (layer["review_glu"][0],
                                                                  np.zeros(48))}])
    with pytest.raises(KeyError, match="output_norm"):
        RANStep(**{**common, "memory_review": False}, layers=[layer])
    with pytest.raises(ValueError, match="at least one RAN layer"):
        RANStep(**common, layers=[])
    with pytest.raises(ValueError, match=r"head_size \(7, even\)"):
        RANStep(**{**common, "head_size": 7}, layers=[layer])


@pytest.mark.parametrize("change", [
    dict(embedding=None), dict(embedding=np.float32(1)), dict(embedding_norm=("gamma",)),
    dict(lm_norm=[]), dict(lm_dense=("weight",)), dict(layer_qkv=("weight",)),
])
def test_constructor_refuses_malformed_tables_without_reading_past_them(change):
    # (built without bounds checks: indexing a short tuple, or a 0-d shape, read past it and
    # crashed the interpreter)
    from attncore.kernels._ran import RANStep
    model = _engine()
    common, layer = _constructor_arguments(model)
    if "layer_qkv" in change:
        layer["qkv"] = change.pop("layer_qkv")
    with pytest.raises(ValueError, match="RANStep: "):
        RANStep(**{**common, **change}, layers=[layer])


def test_a_layer_list_growing_during_construction_is_not_read_past_its_table():
    from attncore.kernels._ran import RANStep
    model = _engine()
    common, layer = _constructor_arguments(model)
    layers = [layer]

    class Growing:   # a norm whose conversion appends layers to the caller's list
        def __init__(self, array):
            self.array = array

        def __array__(self, dtype=None, copy=None):
            layers.extend([layer] * 50)
            return self.array
    grown = dict(layer, concat_norm=(Growing(layer["concat_norm"][0]), layer["concat_norm"][1]))
    layers[0] = grown
    step = RANStep(**common, layers=layers)
    assert step.num_layers == 1 and len(layers) == 51


def test_emptying_the_argument_lists_during_a_step_frees_nothing_under_it():
    # the step read raw pointers into the caller's lists' arrays with the GIL released:
    # another thread emptying the lists freed them under it
    model = _engine(embedding_size=64, head_num=2, head_size=32)
    arguments = _step_arguments(model, n=2)
    arguments["out"] = np.empty((2, 64), np.float32)
    arguments["window_flash"] = flash_plan(32, True)
    arguments["review_flash"] = flash_plan(64, False)
    # a long memory review (each row's memory: 400k cells) so the step outlasts the clearing
    rng = np.random.default_rng(0)
    big = [rng.standard_normal((400_000, 64)).astype(np.float32) for _ in range(4)]
    arguments["memory_keys"], arguments["memory_values"] = list(big), list(big)
    expected = np.empty_like(arguments["out"])
    model._decoding_step.step(*{**arguments, "out": expected}.values())
    del big
    started = threading.Event()

    def clear():
        started.wait()
        for name in ("memory_keys", "memory_values", "k_caches", "v_caches"):
            arguments[name].clear()
    thread = threading.Thread(target=clear)
    thread.start()
    values = list(arguments.values())
    started.set()
    try:
        model._decoding_step.step(*values)
    except ValueError:   # (the lists emptied before the step began: refused, as it should)
        thread.join()
        return
    thread.join()
    np.testing.assert_array_equal(arguments["out"], expected)


def test_a_huge_thread_count_runs_at_most_max_threads():
    # (100000 crashed the process; 2**31 - 1 made libgomp abort)
    from attncore.kernels import _sdpa
    model = _engine()
    x = np.random.default_rng(1).standard_normal((600, 24)).astype(np.float32)
    expected = np.empty((600, VOCAB), np.float32)
    model._decoding_step.head(x, expected, 1)
    for threads in (100_000, 2 ** 31 - 1):
        got = np.empty_like(expected)
        model._decoding_step.head(x, got, threads)
        np.testing.assert_array_equal(got, expected)
    q = np.random.default_rng(2).standard_normal((1, 2, 300, 8)).astype(np.float32)
    out, again = np.empty_like(q), np.empty_like(q)
    block_q, block_k, tiles = flash_plan(8, False)
    _sdpa.flash(q, q, q, out, None, False, 0.35, block_q, block_k, tiles, 1)
    _sdpa.flash(q, q, q, again, None, False, 0.35, block_q, block_k, tiles, 100_000)
    np.testing.assert_array_equal(again, out)
