"""The RAN engine (attncore.models.ran) against the trainer's forward pass and the official
rannet outputs: ragged batches, causal chunked continuation, heads, threads, errors, and the
linear memory of a 100k-token document."""
import dataclasses
import json
import re
import os
import time
import tracemalloc

import numpy as np
import pytest

import attncore
from conftest import rows_independent
from attncore.models import RAN, load
from attncore.models.ran import RANState
from attncore.train import autograd as ag
from attncore.train.ran import RAN as TrainerRAN
from attncore.train.ran import RANConfig, from_rannet_variables

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures",
                       "ran_official_small.npz")
if not os.path.exists(FIXTURE):
    FIXTURE = "/work/shared/fixtures/ran_official_small.npz"
OFFICIAL_LENGTHS = (4, 6, 13, 14, 31)

# float32 engine vs float64 trainer on the same weights: outputs are stdnorm'ed / LN'ed (unit
# scale), so 1e-4 relative with a 1e-5 floor for entries near zero.
RTOL, ATOL = 1e-4, 1e-5
# A long document fed in chunks vs one call, where a row's bits may depend on the rows
# around it (scalar builds: BLAS past 16 rows); on AVX2 and AVX-512 machines exactly.
CHUNK_ATOL = 1e-5
# The official outputs (TF float32): within 2e-5 (issue #4's target; the AVX2 and AVX-512
# kernels are 1.4e-5 off at most). A scalar build rounds differently (BLAS products, libm exp):
# on the 31-token document it is 2.5e-5 from float64 where the AVX kernels are 1.0e-5 and the
# fixture itself 1.2e-5, so there two float32 results are up to 2e-5 + 2.5e-5 apart.
OFFICIAL_ATOL = 2e-5 if attncore.info()["simd"] != "scalar" else 4.5e-5


def make_config(**overrides):
    options = dict(vocab_size=40, embedding_size=12, ran_layers=2, head_num=2, head_size=4,
                   window_size=4, min_window_size=2, num_classes=3, dtype="float32")
    options.update(overrides)
    return RANConfig(**options).to_dict()


def make_pair(seed=0, **overrides):
    """(engine float32, trainer float64) models on the same random weights."""
    config = make_config(**overrides)
    trainer = TrainerRAN(RANConfig.from_dict({**config, "dtype": "float64"}), seed=seed)
    engine = RAN(config, {k: np.asarray(v) for k, v in trainer.state_dict().items()})
    return engine, trainer


def trainer_alone(trainer, doc, history=None, **window):
    with ag.no_grad():
        return trainer.encode(np.asarray(doc)[None], np.array([len(doc)]), history, **window)


def documents(lengths, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n) for n in lengths]


# ------------------------------------------------------------------------------------------
# Parity with the trainer
# ------------------------------------------------------------------------------------------

RAGGED = (1, 3, 4, 5, 9, 13, 17)  # W=4, m=2: one window, merged tails (5, 9, 13, 17), full


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("memory_review", [True, False])
def test_ragged_batch_matches_trainer(causal, pooling, memory_review):
    engine, trainer = make_pair(seed=3, causal=causal, cell_pooling=pooling,
                                memory_review=memory_review, ran_layers=3)
    docs = documents(RAGGED, seed=1)
    encoding, _ = engine.encode(docs)
    logits, _ = engine.classify(docs)
    for i, doc in enumerate(docs):
        ref = trainer_alone(trainer, doc)
        assert encoding.sequence[i].shape == (len(doc), 12)
        assert encoding.sequence[i].dtype == np.float32
        np.testing.assert_allclose(encoding.sequence[i], ref.sequence.data[0], RTOL, ATOL)
        np.testing.assert_allclose(encoding.pooled[i], ref.pooled.data[0], RTOL, ATOL)
        np.testing.assert_allclose(encoding.history[i], ref.history.data[0], RTOL, ATOL)
        ref_logits = ref.pooled.data[0] @ trainer.classifier.weight.data.T + \
            trainer.classifier.bias.data
        np.testing.assert_allclose(logits[i], ref_logits, RTOL, ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_trainer_batch_equals_engine_batch(causal):
    # The trainer's own padded batch (per-document windows and masks) is the same oracle.
    engine, trainer = make_pair(seed=4, causal=causal, cell_pooling="mean")
    docs = documents((7, 2, 12, 4), vocab=39, seed=2)
    docs = [d + 1 for d in docs]  # no pad id inside: the trainer infers nothing, we pass lengths
    ids = np.zeros((len(docs), 12), dtype=np.int64)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = d
    with ag.no_grad():
        ref = trainer.encode(ids, np.array([len(d) for d in docs]))
    encoding, _ = engine.encode(docs)
    for i, d in enumerate(docs):
        np.testing.assert_allclose(encoding.sequence[i], ref.sequence.data[i, :len(d)], RTOL, ATOL)
    np.testing.assert_allclose(encoding.pooled, ref.pooled.data, RTOL, ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_document_alone_equals_inside_a_batch(causal):
    engine, _ = make_pair(seed=5, causal=causal, cell_pooling="max")
    docs = documents((11, 1, 6, 30, 4), seed=3)
    batch, _ = engine.encode(docs)
    # On AVX2 and AVX-512 machines bit for bit: every product on packed weights (one FMA chain per output
    # row at any row count), window attention on the flash path whatever the block's widest
    # window, vector tails of the activations in the same lanes (a review found 6e-7: plain
    # linear's kernel followed the row count, sigmoid's tail took expf). Elsewhere to rounding.
    same = (np.testing.assert_array_equal if rows_independent() else
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6))
    for i, doc in enumerate(docs):
        alone, _ = engine.encode([doc])
        same(batch.sequence[i], alone.sequence[0])
        same(batch.pooled[i], alone.pooled[0])
        same(batch.history[i], alone.history[0])


@pytest.mark.parametrize("causal", [False, True])
def test_window_size_override_matches_trainer(causal):
    engine, trainer = make_pair(seed=6, causal=causal, window_size=3, min_window_size=2)
    docs = documents((10, 17), seed=4)
    encoding, _ = engine.encode(docs, window_size=5, min_window_size=3)
    for i, doc in enumerate(docs):
        ref = trainer_alone(trainer, doc, window_size=5, min_window_size=3)
        np.testing.assert_allclose(encoding.sequence[i], ref.sequence.data[0], RTOL, ATOL)
        np.testing.assert_allclose(encoding.pooled[i], ref.pooled.data[0], RTOL, ATOL)


def test_wide_heads_and_uneven_head_width():
    # H*d != D, several heads, windows wider than the flash tile of a decode call.
    engine, trainer = make_pair(seed=7, embedding_size=10, head_num=3, head_size=6,
                                window_size=20, min_window_size=5)
    docs = documents((45, 23, 64), seed=5)
    encoding, _ = engine.encode(docs)
    for i, doc in enumerate(docs):
        ref = trainer_alone(trainer, doc)
        np.testing.assert_allclose(encoding.sequence[i], ref.sequence.data[0], RTOL, ATOL)


@pytest.mark.parametrize("head", ["lm", "tag"])
@pytest.mark.parametrize("causal", [False, True])
def test_token_heads_match_trainer(head, causal):
    engine, trainer = make_pair(seed=8, causal=causal, token_head=head,
                                num_token_classes=5 if head == "tag" else 0)
    docs = documents((6, 9), seed=6)
    logits, _ = engine.token_logits(docs)
    for i, doc in enumerate(docs):
        with ag.no_grad():
            ref = trainer.token_logits(doc[None], np.array([len(doc)])).data[0]
        assert logits[i].shape == ref.shape
        np.testing.assert_allclose(logits[i], ref, RTOL, 1e-4)


# ------------------------------------------------------------------------------------------
# Official rannet outputs
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    if not os.path.exists(FIXTURE):
        pytest.skip("ran_official_small.npz fixture not found")
    data = np.load(FIXTURE)
    fc = json.loads(bytes(data["config"]).decode())
    config = RANConfig(vocab_size=fc["vocab_size"], embedding_size=fc["embedding_size"],
                       ran_layers=fc["ran_layers"], head_num=fc["head_num"],
                       head_size=fc["head_size"], window_size=fc["window_size"],
                       min_window_size=fc["min_window_size"], cell_pooling=fc["cell_pooling"],
                       dtype="float32")
    variables = {k: data[k] for k in data.files if k.startswith("weight::")}
    # Official variables -> trainer weights -> trainer state_dict -> engine (the documented path).
    trainer = TrainerRAN(config)
    trainer.load_state_dict(from_rannet_variables(variables, config))
    engine = RAN(config.to_dict(), trainer.state_dict())
    return data, engine


@pytest.mark.parametrize("length", OFFICIAL_LENGTHS)
def test_official_rannet_outputs(official, length):
    data, engine = official
    encoding, state = engine.encode([data[f"len{length}::ids"][0]])
    for name, got in (("sequence", encoding.sequence[0]), ("cell", encoding.pooled[0]),
                      ("history", encoding.history[0])):
        np.testing.assert_allclose(got, data[f"len{length}::{name}"][0], rtol=0,
                                   atol=OFFICIAL_ATOL, err_msg=name)
    np.testing.assert_array_equal(state.history, encoding.history)


def test_official_rannet_outputs_as_one_batch(official):
    data, engine = official
    encoding, _ = engine.encode([data[f"len{n}::ids"][0] for n in OFFICIAL_LENGTHS])
    for i, n in enumerate(OFFICIAL_LENGTHS):
        for name, got in (("sequence", encoding.sequence[i]), ("cell", encoding.pooled[i]),
                          ("history", encoding.history[i])):
            np.testing.assert_allclose(got, data[f"len{n}::{name}"][0], rtol=0,
                                       atol=OFFICIAL_ATOL, err_msg=f"{name} of len{n}")


# ------------------------------------------------------------------------------------------
# State across calls
# ------------------------------------------------------------------------------------------

def feed_in_chunks(engine, docs, cuts, method="encode"):
    """Feed docs[i] cut at cuts[i] (same number of pieces per document); returns the
    concatenated per-document outputs, the last call's extra result and the final state."""
    state, pieces, last = None, [[] for _ in docs], None
    for j in range(len(cuts[0]) - 1):
        chunk = [d[c[j]:c[j + 1]] for d, c in zip(docs, cuts)]
        if method == "encode":
            last, state = engine.encode(chunk, state)
            outputs = last.sequence
        else:
            outputs, state = engine.token_logits(chunk, state)
        for i, out in enumerate(outputs):
            pieces[i].append(out)
    return [np.concatenate(p) for p in pieces], last, state


CUTS = [[0, 1, 4, 6, 11, 12, 16, 23], [0, 3, 4, 8, 9, 10, 13, 17], [0, 1, 2, 3, 4, 5, 8, 9]]


def assert_same_as_one_call(chunked, whole, atol=CHUNK_ATOL):
    """Chunked feeding gives one call's bits on AVX2 and AVX-512 machines (every kernel's
    result for a row depends on its own inputs only: packed products, flash attention at every
    query count); elsewhere up to rounding."""
    if rows_independent():
        np.testing.assert_array_equal(chunked, whole)
    else:
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=atol)


def step_random_tokens(engine, state, sequences, rng, vocab=40):
    """One decoding step of a random token per row, each appended to its row's sequence;
    the step's log-probs (B, V)."""
    tokens = rng.integers(0, vocab, len(sequences))
    for sequence, token in zip(sequences, tokens):
        sequence.append(int(token))
    return engine._step(state, tokens)[0]


def assert_steps_equal_one_call(engine, log_probs, sequences):
    """A decoding step's log-probs (B, V) are, row by row, those of one ``token_logits`` call
    over that row's whole sequence (its last token's)."""
    for row, sequence in enumerate(sequences):
        whole, _ = engine.token_logits([np.asarray(sequence)])
        assert_same_as_one_call(log_probs[row], attncore.log_softmax(whole[0][-1]),
                                atol=5 * CHUNK_ATOL)


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("memory_review", [True, False])
def test_causal_chunks_equal_one_call(pooling, memory_review):
    engine, _ = make_pair(seed=9, causal=True, cell_pooling=pooling,
                          memory_review=memory_review, ran_layers=3)
    docs = documents((23, 17, 9), seed=7)
    whole, _ = engine.encode(docs)
    sequences, last, state = feed_in_chunks(engine, docs, CUTS)
    for i in range(len(docs)):
        assert_same_as_one_call(sequences[i], whole.sequence[i])
    assert_same_as_one_call(last.pooled, whole.pooled)
    assert_same_as_one_call(last.history, whole.history)
    assert state.tokens == (23, 17, 9)
    assert state.windows == (5, 4, 2)                          # finished windows of W=4
    assert [len(p) for p in state.pending] == [3, 1, 1]


def test_causal_chunks_long_document_and_lm_logits():
    # Many windows, chunks crossing window borders at every offset, the LM head on top.
    engine, _ = make_pair(seed=10, causal=True, token_head="lm", window_size=5,
                          cell_pooling="mean")
    doc = documents((200,), seed=8)[0]
    whole, _ = engine.token_logits([doc])
    rng = np.random.default_rng(0)
    cuts = np.unique(np.concatenate([[0, 200], rng.integers(1, 200, 40)]))
    pieces, _, state = feed_in_chunks(engine, [doc], [list(cuts)], method="token_logits")
    assert_same_as_one_call(pieces[0], whole[0], atol=5 * CHUNK_ATOL)  # logits ~ 10x
    assert state.tokens == (200,) and state.windows == (40,) and len(state.pending[0]) == 0


@pytest.mark.parametrize("memory_review", [True, False])
def test_causal_chunks_ending_inside_a_wide_window(memory_review):
    # Windows wider than a decode step's few queries: a chunk that ends inside a window leaves
    # it with a few rows, which one call sees whole (the memory review once took split-KV for
    # up to 8 rows and flash past that: 8e-7 apart on rows 16..19 of a cut at 20)
    engine, _ = make_pair(seed=14, vocab_size=90, embedding_size=32, head_num=4, head_size=8,
                          window_size=16, min_window_size=4, causal=True, token_head="lm",
                          memory_review=memory_review)
    doc = documents((40,), vocab=90, seed=1)[0]
    whole, _ = engine.token_logits([doc])
    for cuts in ([0, 20, 40], [0, 3, 19, 21, 40], [0, 33, 36, 40]):
        pieces, _, state = feed_in_chunks(engine, [doc], [cuts], method="token_logits")
        assert_same_as_one_call(pieces[0], whole[0], atol=5 * CHUNK_ATOL)
    assert state.windows == (2,) and len(state.pending[0]) == 8


def test_a_causal_state_continues_in_a_reloaded_copy_but_not_in_another_weight_dtype(tmp_path):
    # a saved and reloaded copy (its config gains format_version) refused the state; an int8
    # model (model.weights kept in float32) continued a float32 model's state, 0.1 off
    engine, _ = make_pair(seed=15, causal=True, token_head="lm")
    doc = documents((13,), seed=12)[0]
    _, state = engine.token_logits([doc[:6]])
    engine.save(tmp_path / "ran")
    reloaded = load(tmp_path / "ran")
    continued, _ = reloaded.token_logits([doc[6:]], state)
    np.testing.assert_array_equal(continued[0], engine.token_logits([doc[6:]], state)[0][0])
    for weight_dtype in ("int8", "bfloat16"):
        other = load(tmp_path / "ran", weight_dtype=weight_dtype)
        with pytest.raises(ValueError, match="state was made by another RAN model"):
            other.token_logits([doc[6:]], state)


def test_a_copied_or_unpickled_causal_state_stays_read_only():
    import copy
    import pickle
    engine, _ = make_pair(seed=16, causal=True)
    _, state = engine.encode(documents((6, 3), seed=13))
    for twin in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state)):
        arrays = [twin.history, *twin.pending] + [
            a for layers in twin.layers for carry in layers
            for a in (carry.cell, carry.g_prev, carry.memory_keys, carry.memory_values,
                      carry.g_sum, carry.g_max) if a is not None]
        assert len(arrays) > 10 and not any(a.flags.writeable for a in arrays)
        doc = documents((4, 4), seed=14)
        np.testing.assert_array_equal(engine.encode(doc, twin)[0].history,
                                      engine.encode(doc, state)[0].history)


def test_a_chunk_inside_a_window_shares_the_carried_memory():
    # the memory review's carried keys / values (1 + windows, D) were copied three times and
    # scanned once a call: a token at a time, that cost more than the review itself
    engine, _ = make_pair(seed=17, causal=True, window_size=4)
    doc = documents((11,), seed=15)[0]
    _, state = engine.encode([doc[:9]])                    # 2 windows done, 1 token pending
    _, inside = engine.encode([doc[9:10]], state)         # still inside window 3
    _, crossing = engine.encode([doc[10:11]], inside)     # one more, the window not yet full
    for before, after in zip(state.layers[0], inside.layers[0]):
        assert after.memory_keys is before.memory_keys
        assert after.memory_values is before.memory_values
    whole, _ = engine.encode([doc])
    np.testing.assert_array_equal(engine.encode([doc[:9]])[0].history, state.history)
    assert_same_as_one_call(crossing.history, whole.history)
    # a carried array edited after all (made writeable) is checked again, not trusted
    carry = inside.layers[0][0]
    keys = carry.memory_keys
    keys.flags.writeable = True
    keys[0, 0] = np.nan
    with pytest.raises(ValueError, match="memory_keys holds NaN"):
        engine.encode([doc[10:11]], inside)


def test_a_state_rebuilt_from_the_callers_arrays_leaves_them_theirs():
    # a continuation that finishes no window carries the memory review's arrays on: one the
    # caller made (a state rebuilt from its own storage) was frozen and adopted, not copied
    engine, _ = make_pair(seed=5, causal=True, window_size=4)
    _, state = engine.encode([[3, 4, 5, 6, 7]])             # one window done, one token pending
    carry = state.layers[0][0]
    mine = np.array(carry.memory_keys)
    rebuilt = dataclasses.replace(state, layers=((dataclasses.replace(carry, memory_keys=mine),)
                                                 + state.layers[0][1:],) + state.layers[1:])
    _, after = engine.encode([[8]], rebuilt)
    assert mine.flags.writeable
    assert after.layers[0][0].memory_keys is not mine
    np.testing.assert_array_equal(after.layers[0][0].memory_keys, carry.memory_keys)
    assert not after.layers[0][0].memory_keys.flags.writeable


def test_causal_state_is_not_changed_by_continuing():
    engine, _ = make_pair(seed=11, causal=True, cell_pooling="max")
    docs = documents((6, 3), seed=9)
    _, state = engine.encode(docs)
    snapshot = (state.history.copy(), [c.memory_keys.copy() for c in state.layers[0]])
    first, _ = engine.encode([docs[0][:2], docs[1]], state)
    engine.encode([docs[1], docs[0]], state)                   # another continuation
    again, _ = engine.encode([docs[0][:2], docs[1]], state)
    for a, b in zip(first.sequence, again.sequence):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(state.history, snapshot[0])
    for carry, keys in zip(state.layers[0], snapshot[1]):
        np.testing.assert_array_equal(carry.memory_keys, keys)
    with pytest.raises(ValueError):
        state.history[0, 0] = 1.0                              # read-only


def test_bidirectional_state_is_the_official_history():
    engine, trainer = make_pair(seed=12, cell_pooling="last")
    first, second = documents((9, 7), seed=10)
    _, state = engine.encode([first])
    encoding, _ = engine.encode([second], state)
    ref = trainer_alone(trainer, second, history=state.history.astype(np.float64))
    np.testing.assert_allclose(encoding.sequence[0], ref.sequence.data[0], RTOL, ATOL)
    np.testing.assert_allclose(encoding.history[0], ref.history.data[0], RTOL, ATOL)
    # An all-zero history row means none (V3), per document.
    zero = RANState.from_history(np.zeros((1, 12)))
    np.testing.assert_allclose(engine.encode([second], zero)[0].sequence[0],
                               engine.encode([second])[0].sequence[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Threads, loading, errors
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_identical_at_one_and_two_threads(causal):
    engine, _ = make_pair(seed=13, causal=causal, cell_pooling="mean", embedding_size=16,
                          head_num=2, head_size=8, window_size=8, min_window_size=3)
    docs = documents((70, 5, 33), seed=11)
    results = []
    for threads in (1, 2):
        with attncore.num_threads(threads):
            results.append(engine.encode(docs)[0])
    for a, b in zip(results[0].sequence, results[1].sequence):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0].pooled, results[1].pooled)
    np.testing.assert_array_equal(results[0].history, results[1].history)


def test_from_config_save_and_load(tmp_path):
    config = make_config(causal=True, token_head="lm")
    engine = RAN.from_config(config, seed=14)
    trainer = TrainerRAN(RANConfig.from_dict(config), seed=14)
    for name, value in trainer.state_dict().items():
        np.testing.assert_array_equal(engine.weights[name], value)
    engine.save(tmp_path / "ran")
    loaded = load(tmp_path / "ran")
    assert isinstance(loaded, RAN)
    doc = documents((9,), seed=12)
    np.testing.assert_array_equal(loaded.encode(doc)[0].sequence[0],
                                  engine.encode(doc)[0].sequence[0])


def test_a_causal_continuation_checks_min_window_size_against_its_own_window():
    # (the check used the config's W=4 where the continuation runs the state's W=16)
    engine, _ = make_pair(seed=15, causal=True, window_size=4, min_window_size=2)
    doc = [np.arange(4, 24) % 40]
    _, state = engine.encode(doc, window_size=16)
    engine.encode(doc, state, min_window_size=8)          # 8 <= 16: accepted
    _, narrow = engine.encode(doc, window_size=2, min_window_size=1)
    with pytest.raises(ValueError, match=r"min_window_size \(3\) must be <= window_size \(2\)"):
        engine.encode(doc, narrow, min_window_size=3)


def test_trainer_refuses_a_zero_window_override():
    # (window_size=0 fell back to the configured W through "or")
    _, trainer = make_pair(seed=15)
    for options in ({"window_size": 0}, {"min_window_size": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            trainer.encode(np.array([[4, 5, 6]]), **options)


def test_bad_arguments():
    engine, _ = make_pair(seed=15, num_classes=0)
    causal, _ = make_pair(seed=15, causal=True)
    good = [np.array([1, 2, 3])]
    cases = [
        (lambda: engine.encode([]), ValueError, "documents"),
        (lambda: engine.encode([np.array([], dtype=np.int64)]), ValueError, "documents"),
        (lambda: engine.encode([np.array([1, 40])]), ValueError, "documents"),
        (lambda: engine.encode([np.array([1, -1])]), ValueError, "documents"),
        (lambda: engine.encode([np.array([1.0, 2.0])]), TypeError, "documents"),
        (lambda: engine.encode([np.ones((2, 2), np.int64)]), ValueError, "documents"),
        (lambda: engine.encode("abc"), TypeError, "documents"),
        (lambda: engine.encode(good, window_size=0), ValueError, "window_size"),
        (lambda: engine.encode(good, min_window_size=True), TypeError, "min_window_size"),
        # (the config's bounds: these ran, a causal document staying pending whole)
        (lambda: causal.encode(good, window_size=2 ** 40), ValueError, "window_size must be <="),
        (lambda: engine.encode(good, window_size=2, min_window_size=5), ValueError,
         r"min_window_size \(5\) must be <= window_size \(2\)"),
        (lambda: engine.encode(good, state=np.zeros((1, 12))), TypeError, "state"),
        (lambda: engine.encode(good, RANState.from_history(np.full((1, 12), np.nan))), ValueError,
         "NaN"),
        (lambda: engine.encode(good, RANState.from_history(np.ones((1, 5)))), ValueError,
         "history"),
        (lambda: RANState.from_history(np.ones(12)), ValueError, "history"),
        (lambda: engine.encode(good + good, state=engine.encode(good)[1]), ValueError, "state"),
        (lambda: engine.encode(good, state=causal.encode(good)[1]), ValueError, "state"),
        (lambda: causal.encode(good, causal.encode(good)[1], window_size=3), ValueError,
         "window_size"),
        (lambda: engine.classify(good), ValueError, "classifier"),
        (lambda: engine.token_logits(good), ValueError, "token head"),
    ]
    for call, error, word in cases:
        with pytest.raises(error, match=word):
            call()


def test_config_and_weight_errors():
    config = make_config()
    _, trainer = make_pair()
    weights = {k: np.asarray(v) for k, v in trainer.state_dict().items()}
    with pytest.raises(ValueError, match="architecture"):
        RAN({**config, "architecture": "transformer"}, weights)
    broken = dict(weights)
    broken["layers.0.concat_norm.weight"] = np.full(12, np.nan)
    with pytest.raises(ValueError, match="NaN"):
        RAN(config, broken)
    del broken["layers.0.concat_norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        RAN(config, broken)


# ------------------------------------------------------------------------------------------
# Cost: a 100k-token document
# ------------------------------------------------------------------------------------------

def peak_bytes(engine, doc):
    tracemalloc.start()
    try:
        started = time.perf_counter()
        encoding, _ = engine.encode([doc])
        seconds = time.perf_counter() - started
        return tracemalloc.get_traced_memory()[1], seconds, encoding
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("causal", [False, True])
def test_100k_tokens_linear_memory(causal):
    D, W, T = 32, 256, 100_000
    config = dict(architecture="ran", vocab_size=500, embedding_size=D, ran_layers=2,
                  head_num=2, head_size=16, window_size=W, min_window_size=16, causal=causal,
                  cell_pooling="mean", num_classes=2, dtype="float32")
    engine = RAN.from_config(config, seed=0)
    doc = np.random.default_rng(0).integers(0, 500, T)
    # One thread: this is about scaling in T, not threads (the CI box is shared).
    with attncore.num_threads(1):
        small, _, _ = peak_bytes(engine, doc[:T // 4])
        big, seconds, encoding = peak_bytes(engine, doc)
    assert encoding.sequence[0].shape == (T, D)
    assert np.isfinite(encoding.sequence[0]).all() and np.isfinite(encoding.pooled).all()
    # NumPy reports its buffers to tracemalloc. Linear growth: 4x the tokens, at most ~4x
    # the memory (a T x n score matrix alone would be T^2/W x 4 B = 156 MB and grow 16x).
    assert big / small < 4.5, (small, big)
    assert big < 16 * T * D * 4, big                           # a few (T, D) float32 arrays
    assert seconds < 120, seconds


# ------------------------------------------------------------------------------------------
# Generation with a causal LM
# ------------------------------------------------------------------------------------------

def test_greedy_generation_matches_full_recomputation():
    engine, _ = make_pair(seed=16, causal=True, token_head="lm", window_size=3, eos_id=39)
    prompts = documents((5, 1, 8), vocab=30, seed=13)
    results = engine.generate(prompts, max_length=9)
    for prompt, result in zip(prompts, results):
        # Re-run the whole sequence at every step: the argmax of the last token's logits.
        sequence, total = list(prompt), 0.0
        for _ in range(9):
            logits = engine.token_logits([np.array(sequence)])[0][0][-1]
            log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            token = int(np.argmax(log_probs))
            total += float(log_probs[token])
            if token == 39:
                break
            sequence.append(token)
        assert result.tokens == sequence[len(prompt):]
        np.testing.assert_allclose(result.log_probs[0], total, rtol=0, atol=1e-4)


@pytest.mark.parametrize("memory_review", [True, False])
@pytest.mark.parametrize("weight_dtype", ["float32", "int8"])
def test_every_decoding_step_equals_one_call_over_the_sequence(memory_review, weight_dtype):
    # A step is one row through the layers against the window's cached keys and values; a
    # step that completes a window then commits it from them. Prompts of lengths
    # around the window, rows completing windows at different steps, finished rows leaving and
    # rows repeated (select): each step's log-probs are those of one call over the sequence.
    engine, _ = make_pair(seed=19, causal=True, token_head="lm", window_size=4,
                          memory_review=memory_review)
    engine = RAN(engine.config, engine.weights, weight_dtype=weight_dtype)
    prompts = documents((1, 3, 4, 6, 9), vocab=40, seed=20)
    state = engine._start(prompts)
    sequences = [list(p) for p in prompts]
    log_probs, _ = engine._step(state, None)
    rng = np.random.default_rng(21)
    for step in range(14):
        assert_steps_equal_one_call(engine, log_probs, sequences)
        if step == 6:   # finished rows leave, a row is repeated (beams)
            keep = np.array([4, 1, 1, 3])
            state = state.select(keep)
            sequences = [list(sequences[r]) for r in keep]
        log_probs = step_random_tokens(engine, state, sequences, rng)
    assert state.state.tokens == tuple(len(s) - len(f) for s, f in zip(sequences, state.fed))
    assert all(len(p) + len(f) < 4 for p, f in zip(state.state.pending, state.fed))


def assert_same_carried_state(got, want):
    """Two causal states of one document hold the same carried values (one call's bits on
    AVX2 and AVX-512 machines, see assert_same_as_one_call)."""
    assert (got.tokens, got.windows, got.model) == (want.tokens, want.windows, want.model)
    np.testing.assert_array_equal(got.pending[0], want.pending[0])
    assert_same_as_one_call(got.history, want.history)
    for mine, theirs in zip(got.layers[0], want.layers[0], strict=True):
        for name in ("cell", "g_prev", "memory_keys", "memory_values", "g_sum", "g_max"):
            a, b = getattr(mine, name), getattr(theirs, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.dtype == b.dtype and not a.flags.writeable, name
                assert_same_as_one_call(a, b)


@pytest.mark.parametrize("memory_review", [True, False])
def test_a_committed_window_carries_what_one_call_carries(memory_review):
    # A step completing its window commits it from the window's cache (the summary slot's
    # query and the cell recurrence, per layer): each row's carried cells, g, memory review
    # and pooled sums are then those of one encode call over the row's sequence.
    engine, _ = make_pair(seed=31, causal=True, token_head="lm", window_size=4, ran_layers=3,
                          cell_pooling="mean", memory_review=memory_review)
    prompts = documents((3, 1, 4, 7), vocab=40, seed=32)
    state = engine._start(prompts)
    engine._step(state, None)
    sequences = [list(p) for p in prompts]
    rng = np.random.default_rng(33)
    for _ in range(9):
        step_random_tokens(engine, state, sequences, rng)
        for row, sequence in enumerate(sequences):
            committed = state.state.select([row])
            _, want = engine.encode([np.asarray(sequence[:committed.tokens[0]])])
            assert_same_carried_state(committed, want)
    assert state.state.windows == (3, 2, 3, 4)
    # and the pooled document vector of the whole sequence, through the carried sums
    encoding, _ = engine.encode([np.asarray(s) for s in sequences])
    continued = [row for row in range(len(sequences)) if len(state.fed[row])]
    assert continued == [1, 2]
    for row in continued:
        rest, _ = engine.encode([state.fed[row]], state.state.select([row]))
        assert_same_as_one_call(rest.pooled[0], encoding.pooled[row])


def test_decoding_steps_in_a_wide_window_equal_one_call():
    # Windows past the flash kernel's key tile (96 on AVX-512; 192 causal, 96 not, on AVX2):
    # the cached step's attention ran with the non-causal tiles, so on AVX2 its keys were
    # grouped otherwise than the window's own call (4.8e-7 apart past ~96 keys).
    engine, _ = make_pair(seed=23, causal=True, token_head="lm", window_size=210,
                          embedding_size=16, head_num=2, head_size=8, vocab_size=30)
    prompts = documents((120, 205, 3), vocab=30, seed=24)
    state = engine._start(prompts)
    sequences = [list(p) for p in prompts]
    log_probs, _ = engine._step(state, None)
    for step in range(8):   # the second prompt's window completes at step 4
        tokens = np.argmax(log_probs, axis=1)
        for sequence, token in zip(sequences, tokens):
            sequence.append(int(token))
        log_probs, _ = engine._step(state, tokens)
    whole, _ = engine.token_logits([np.array(s) for s in sequences])
    for row, logits in enumerate(whole):
        assert_same_as_one_call(log_probs[row], attncore.log_softmax(logits[-1]),
                                atol=5 * CHUNK_ATOL)
    assert state.state.windows == (0, 1, 0)


def test_the_window_cache_holds_the_rows_in_use_not_the_window():
    # sized (B, H, 1 + W, d) a layer, 8 beams at W = 16384 held 1 GiB, copied by every select
    engine, _ = make_pair(seed=25, causal=True, token_head="lm", window_size=16384)
    state = engine._start(documents((10, 3), seed=26))
    engine._step(state, None)
    for _ in range(30):
        engine._step(state, np.array([5, 6]))
        state = state.select([0, 1])    # (as a search does at every step)
    assert state.tokens_held().tolist() == [40, 33]
    assert 41 < state.cache.capacity <= 64
    assert state.select([1]).cache.capacity <= 64


@pytest.mark.parametrize("where", ["_start_windows", "_commit_windows", "_next_log_probs"])
def test_an_interrupted_step_can_be_retried(monkeypatch, where):
    # steps mixing cached rows, a window's commit and a window's first token, each interrupted
    # once: an exception in the commit left the cached rows one token ahead of the tokens fed,
    # and the retried step read the wrong keys
    engine, _ = make_pair(seed=27, causal=True, token_head="lm", window_size=4)
    prompts = documents((3, 2), seed=28)
    state = engine._start(prompts)
    engine._step(state, None)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    fed, interruptions = [list(prompt) for prompt in prompts], 0
    # row 0 commits; row 1 commits while row 0 starts a window; row 1 starts one
    for tokens in ([7, 8], [9, 10], [11, 12]):
        with monkeypatch.context() as patch:
            patch.setattr(engine, where, interrupted)
            try:
                log_probs, _ = engine._step(state, np.array(tokens))
            except KeyboardInterrupt:
                interruptions += 1
                log_probs = None
        if log_probs is None:   # (taken again)
            log_probs, _ = engine._step(state, np.array(tokens))
        for row, token in zip(fed, tokens):
            row.append(token)
        assert_steps_equal_one_call(engine, log_probs, fed)
    assert interruptions == (2 if where == "_commit_windows" else 3)
    assert state.state.windows == (1, 1)


def test_a_step_interrupted_while_the_cache_grows_can_be_retried(monkeypatch):
    # the keys were grown and set before the values: an interrupt between left them at two
    # capacities, and every retried step failed with an IndexError
    from attncore.models import ran
    engine, _ = make_pair(seed=29, causal=True, token_head="lm", window_size=64)
    prompt = documents((6,), seed=30)[0]
    state = engine._start([prompt])
    engine._step(state, None)
    sequence = list(prompt)
    real, calls = ran.grow_cache, []

    def interrupted_once_keys_grew(cache, capacity, filled):
        calls.append(1)
        if len(calls) == engine.num_layers + 1:   # (the first of the values)
            raise KeyboardInterrupt
        return real(cache, capacity, filled)

    monkeypatch.setattr(ran, "grow_cache", interrupted_once_keys_grew)
    for token in range(4, 12):
        try:
            log_probs, _ = engine._step(state, np.array([token]))
        except KeyboardInterrupt:
            log_probs, _ = engine._step(state, np.array([token]))
        sequence.append(token)
    assert len(calls) > engine.num_layers   # (the cache grew, interrupted once)
    assert_steps_equal_one_call(engine, log_probs, [sequence])


def test_beam_search_and_sampling_run():
    engine, _ = make_pair(seed=17, causal=True, token_head="lm", window_size=3)
    prompts = documents((4, 6), vocab=30, seed=14)
    beams = engine.generate(prompts, max_length=6, beam_size=3, num_hypotheses=2)
    greedy = engine.generate(prompts, max_length=6)
    assert all(len(r.hypotheses) == 2 for r in beams)
    assert all(r.scores[0] >= r.scores[1] for r in beams)
    assert [r.tokens for r in engine.generate(prompts, max_length=6, beam_size=1)] == \
        [r.tokens for r in greedy]
    samples = engine.generate(prompts, max_length=6, do_sample=True, seed=3, top_k=5)
    again = engine.generate(prompts, max_length=6, do_sample=True, seed=3, top_k=5)
    assert [r.tokens for r in samples] == [r.tokens for r in again]


def test_translate_continues_text_prompts(tmp_path):
    # text in, text out, as for a decoder-only Transformer: what follows each prompt, as
    # `attncore generate` writes it (the prompt's trailing space kept: it asks for a word)
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer
    vocab = Vocab("abcdefgh ", level="char")
    engine, _ = make_pair(seed=27, causal=True, token_head="lm", window_size=4,
                          vocab_size=len(vocab))
    RAN(engine.config, engine.weights, tokenizer=Tokenizer(src=vocab)).save(tmp_path / "lm")
    model = load(tmp_path / "lm")
    prompts = ["abc ", "hag", "  fed cab "]
    texts = model.translate(prompts, max_length=7, min_length=7)
    ids = [model.tokenizer.encode_source(p) for p in prompts]
    assert [len(i) for i in ids] == [4, 3, 8]
    results = model.generate(ids, max_length=7, min_length=7)
    assert texts == [vocab.decode(r.tokens) for r in results]
    assert all(len(t) == 7 for t in texts)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        model.translate(["ab", "   "])
    with pytest.raises(ValueError, match="translate needs a tokenizer"):
        engine.translate(["abc"])


def test_generation_needs_a_causal_lm():
    engine, _ = make_pair(seed=18, token_head="lm")
    with pytest.raises(ValueError, match="causal"):
        engine.generate([np.array([1, 2])], max_length=3)
    causal, _ = make_pair(seed=18, causal=True, token_head="lm")
    with pytest.raises(ValueError, match="max_length"):
        causal.generate([np.array([1, 2])], max_length=0)
    with pytest.raises(ValueError, match="rows"):
        causal._start([np.array([1, 2])]).select(np.array([1]))


def test_a_causal_state_is_continued_only_by_the_model_that_made_it():
    # a state of another model with the same shapes was continued silently (outputs off by
    # ~1); malformed fields failed with IndexError / AttributeError / NumPy errors
    import dataclasses
    a, _ = make_pair(seed=1, causal=True)
    b, _ = make_pair(seed=2, causal=True)
    first, second = documents((9,), seed=1), documents((5,), seed=2)
    state = a.encode(first)[1]
    with pytest.raises(ValueError, match="made by another RAN model"):
        b.encode(second, state)
    a.encode(second, state)                                   # its own model continues it
    same, _ = make_pair(seed=1, causal=True)                  # and so does an identical one
    same.encode(second, state)
    for change, message in [(dict(layers=()), "state.layers must be a tuple of 1"),
                            (dict(windows=(-3,)), "state.windows must hold counts >= 0"),
                            (dict(pending=(np.arange(30),)), "state.pending must hold 1-d"),
                            (dict(pending=([1, 2],)), "state.pending must hold 1-d")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            a.encode(second, dataclasses.replace(state, **change))
    # edited counts and carried arrays were read as given: a wrong continuation, a NaN one,
    # or NumPy's errors (found by an audit)
    assert state.windows[0] >= 1, "the carried arrays of a finished window are checked"
    carry, rest = state.layers[0][0], state.layers[0][1:]

    def with_carry(**fields):
        return dict(layers=((dataclasses.replace(carry, **fields),) + rest,))
    d = a.embedding_size
    # uint64 pending ids (a valid integer array) met int64 ones as float64: "ids must be an
    # integer array, got dtype float64"
    unsigned = dataclasses.replace(state, pending=(state.pending[0].astype(np.uint64),))
    np.testing.assert_array_equal(a.encode(second, unsigned)[0].history,
                                  a.encode(second, state)[0].history)
    for change, message in [
            (dict(tokens=(99,)), "state.tokens (99) must be state.windows x window_size"),
            (dict(windows=(state.windows[0] + 1,)), "state.tokens (9) must be state.windows"),
            (with_carry(cell=np.full(d, np.nan, np.float32)), "cell holds NaN or infinity"),
            (with_carry(cell=np.ones(5, np.float32)), f"cell must be an array of shape ({d},)"),
            (with_carry(memory_keys=None), "memory_keys must be an array of shape"),
            (with_carry(memory_keys=carry.memory_keys[:1]), "memory_keys must be an array"),
            (with_carry(memory_keys=np.full_like(carry.memory_keys, np.nan)),
             "memory_keys holds NaN"),
            # these failed as NumPy / kernel errors naming other things
            (with_carry(memory_keys=carry.memory_keys.astype(np.int64)),
             "memory_keys must be float32, got int64"),
            (dict(pending=(np.array([999] * len(state.pending[0])),)),
             "state.pending must hold ids in [0, 40)"),
            (dict(history=state.history.tolist()), "state.history must be a float array"),
            (with_carry(g_prev=None), "g_prev must be an array")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            a.encode(second, dataclasses.replace(state, **change))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_rows", [1, 9, 40])
def test_window_blocks_of_any_size_give_the_same_bits(monkeypatch, causal, block_rows):
    # blocks of windows (ending inside a step when the step is large) padded to their own
    # widest window: the results of one block of everything, bit for bit on AVX2 machines
    # (the windows of a step are independent; flash attention does not depend on the padding)
    import attncore.models.ran as ran_module
    engine, _ = make_pair(seed=8, causal=causal, window_size=6, min_window_size=2)
    docs = documents((1, 1, 23, 2, 1, 9, 1), seed=8)
    whole, _ = engine.encode(docs)
    monkeypatch.setattr(ran_module, "BLOCK_ROWS", block_rows)
    blocks = ran_module._window_blocks(
        ran_module._make_plan([len(d) for d in docs], [0] * 7, [0] * 7, 6, 2, causal=causal),
        causal)
    assert len(blocks) > 1
    split, _ = engine.encode(docs)
    same = (np.testing.assert_array_equal if rows_independent() else
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6))
    for a, b in zip(whole.sequence + [whole.pooled, whole.history],
                    split.sequence + [split.pooled, split.history]):
        same(a, b)


def test_short_documents_beside_a_long_one_hold_rows_for_their_own_windows():
    # 400 one-token documents beside one 256-token one padded every window of a step to 258
    # rows (memory grew with documents x window); now blocks pad to their own widest window
    import attncore.models.ran as ran_module
    plan = ran_module._make_plan([1] * 400 + [256], [0] * 401, [0] * 401, 256, 64, causal=False)
    blocks = ran_module._window_blocks(plan, False)
    padded = sum((hi - lo) * (1 + int(plan.win_width[lo:hi].max())) for lo, hi in blocks)
    assert padded <= 2 * (401 + 256) + ran_module.BLOCK_ROWS // 8


def test_every_step_after_a_select_equals_one_call_over_the_sequence():
    # select copies each row's unfinished window from the cache: all of its held rows (the
    # incoming cell's, then every token's), at every step, in any order
    engine, _ = make_pair(seed=31, causal=True, token_head="lm", window_size=8)
    prompts = documents((1, 3, 5), seed=32)
    state = engine._start(prompts)
    sequences = [list(p) for p in prompts]
    engine._step(state, None)
    rng = np.random.default_rng(33)
    for _ in range(10):
        order = rng.permutation(len(sequences))
        state = state.select(order)
        sequences = [list(sequences[r]) for r in order]
        log_probs = step_random_tokens(engine, state, sequences, rng)
        assert_steps_equal_one_call(engine, log_probs, sequences)


def test_a_selected_bidirectional_state_continues_its_own_documents():
    engine, _ = make_pair(seed=34)
    _, state = engine.classify(documents((5, 9, 3), seed=35))
    chunk = documents((4, 6, 2), seed=36)
    order = [2, 0, 1]
    np.testing.assert_array_equal(state.select(order).history, state.history[order])
    logits, _ = engine.classify(chunk, state)
    reordered, _ = engine.classify([chunk[i] for i in order], state.select(order))
    np.testing.assert_allclose(reordered, logits[order], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Mutation-testing round 2: state bookkeeping and checks
# ------------------------------------------------------------------------------------------

def test_a_history_row_with_some_zero_entries_is_used_as_given():
    # only an all-zero row means "no history" (V3, per row): a row with zeros among non-zero
    # entries is a cell, as in the trainer
    engine, trainer = make_pair(seed=40)
    first, second = documents((9, 7), seed=41)
    history = np.array(engine.encode([first])[1].history)
    history[:, ::2] = 0.0
    encoding, _ = engine.encode([second], RANState.from_history(history))
    ref = trainer_alone(trainer, second, history=history.astype(np.float64))
    np.testing.assert_allclose(encoding.sequence[0], ref.sequence.data[0], RTOL, ATOL)
    assert np.abs(encoding.sequence[0] - engine.encode([second])[0].sequence[0]).max() > 1e-3


def test_a_bidirectional_state_counts_every_token_seen():
    engine, _ = make_pair(seed=42)
    docs = documents((9, 3), seed=43)
    _, state = engine.encode(docs)
    assert state.tokens == (9, 3)
    _, state = engine.encode(documents((7, 2), seed=44), state)
    assert state.tokens == (16, 5)


def test_a_causal_state_with_a_full_pending_window_or_no_running_max_is_refused():
    import dataclasses
    engine, _ = make_pair(seed=45, causal=True, cell_pooling="max")   # W = 4
    state = engine.encode(documents((9,), seed=46))[1]
    assert state.windows == (2,) and len(state.pending[0]) == 1
    more = documents((3,), seed=47)
    # a pending window of W ids is a finished one that was never committed
    full = dataclasses.replace(state, pending=(np.arange(4, 8),), tokens=(12,))
    with pytest.raises(ValueError, match=re.escape("state.pending must hold 1-d integer arrays "
                                                   "of fewer than 4 ids")):
        engine.encode(more, full)
    # g_max may be -inf only before the first window
    carry = state.layers[0][0]
    no_max = dataclasses.replace(carry, g_max=np.full_like(carry.g_max, -np.inf))
    edited = dataclasses.replace(state, layers=((no_max,) + state.layers[0][1:],))
    with pytest.raises(ValueError, match="g_max holds NaN or infinity"):
        engine.encode(more, edited)


def test_the_window_cache_never_holds_more_than_one_window():
    engine, _ = make_pair(seed=48, causal=True, token_head="lm", window_size=4)
    state = engine._start(documents((2, 1), seed=49))
    assert state.cache.capacity == 5   # 1 + W (the power of two would be 8)


def test_a_selected_state_is_read_only_too():
    for causal in (False, True):
        engine, _ = make_pair(seed=50, causal=causal)
        _, state = engine.encode(documents((5, 6), seed=51))
        picked = state.select([1, 0, 1])
        assert not picked.history.flags.writeable
        with pytest.raises(ValueError):
            picked.history[0, 0] = 1.0
