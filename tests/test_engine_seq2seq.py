# SPDX-License-Identifier: Apache-2.0
"""The Seq2SeqAttention engine against the trainer's forward pass (its NumPy oracle).

Tolerance: engine float32 log-probabilities agree with the trainer's within 1e-4 relative
(+ 1e-5 absolute for values near 0): float32 GEMMs and SIMD tanh/exp in different
summation orders, compounded over a few recurrent steps.
"""
import concurrent.futures
import copy
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import rows_independent

import attncore
import attncore.models as models
from attncore.models import Seq2SeqAttention
from attncore.train import autograd as ag
from attncore.train.export import load_model, model_from_config
from attncore.train.seq2seq import Seq2SeqConfig

DATES = Path(attncore.__file__).parent / "assets" / "dates"
RTOL, ATOL = 1e-4, 1e-5

VARIANTS = {
    "gru-bahdanau": dict(rnn_type="gru", attention="bahdanau"),
    "lstm-bahdanau-2layer-bidir": dict(rnn_type="lstm", attention="bahdanau", num_layers=2,
                                       bidirectional=True, attention_dim=6),
    "gru-bahdanau-unpacked": dict(rnn_type="gru", attention="bahdanau", packed_source=False),
    "gru-luong-dot-feeding": dict(rnn_type="gru", attention="luong_dot", input_feeding=True),
    "lstm-luong-dot-unpacked-bidir": dict(rnn_type="lstm", attention="luong_dot",
                                          bidirectional=True, packed_source=False),
    "lstm-luong-general-2layer": dict(rnn_type="lstm", attention="luong_general", num_layers=2),
    "gru-luong-general-feeding-bidir": dict(rnn_type="gru", attention="luong_general",
                                            input_feeding=True, bidirectional=True),
    "gru-luong-concat-3layer": dict(rnn_type="gru", attention="luong_concat", num_layers=3,
                                    attention_dim=12),
    "lstm-luong-concat-feeding-bidir": dict(rnn_type="lstm", attention="luong_concat",
                                            input_feeding=True, bidirectional=True),
}


def _config(**overrides):
    return Seq2SeqConfig(src_vocab_size=13, tgt_vocab_size=11, embed_dim=6, hidden_size=8,
                         **overrides).to_dict()


def _pair(name, seed=3):
    """(engine, trainer) with the same random weights."""
    config = _config(**VARIANTS[name])
    trainer = model_from_config(config, seed)
    trainer.eval()
    return Seq2SeqAttention.from_config(config, seed=seed), trainer


def _padded(sequences, pad=0):
    lengths = np.array([len(s) for s in sequences])
    out = np.full((len(sequences), lengths.max()), pad, dtype=np.int64)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = s
    return out, lengths


def _random_batch(rng, vocab, lengths):
    return [rng.integers(4, vocab, n) for n in lengths]


def _engine_teacher_forced(engine, sources, tgt_in):
    """Engine log-probs (B, T, V) and attention (B, T, S) for tokens tgt_in (B, T)."""
    state = engine._start([np.asarray(s, dtype=np.int64) for s in sources])
    log_probs, attention = [], []
    for t in range(tgt_in.shape[1]):
        lp, att = engine._step(state, np.ascontiguousarray(tgt_in[:, t]))
        log_probs.append(lp)
        attention.append(att[:, 0])
    return np.stack(log_probs, axis=1), np.stack(attention, axis=1)


def _trainer_teacher_forced(trainer, sources, tgt_in):
    src, lengths = _padded(sources, trainer.config.pad_id)
    with ag.no_grad():
        logits, attention = trainer.forward(src, lengths, tgt_in, return_attention=True)
        return ag.log_softmax(logits, axis=-1).data, attention.data


def _assert_log_probs_close(actual, expected):
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


# -- engine == trainer --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_teacher_forced_log_probs_match_the_trainer(name):
    engine, trainer = _pair(name)
    rng = np.random.default_rng(0)
    sources = _random_batch(rng, 13, [5, 1, 7, 3])          # ragged
    tgt_in = np.concatenate([np.full((4, 1), 1), rng.integers(3, 11, (4, 5))], axis=1)
    lp, att = _engine_teacher_forced(engine, sources, tgt_in)
    ref_lp, ref_att = _trainer_teacher_forced(trainer, sources, tgt_in)
    _assert_log_probs_close(lp, ref_lp)
    np.testing.assert_allclose(att, ref_att, rtol=RTOL, atol=ATOL)
    # the trainer's padding positions get exactly zero attention; so must the engine's
    for row, source in enumerate(sources):
        assert np.all(att[row, :, len(source):] == 0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_folded_embeddings_equal_the_unfolded_model(name, monkeypatch):
    # EMBEDDING_FOLD_MAX_BYTES: the first layers' embedding products looked up from tables
    # made at load (every model here folds) or multiplied at each step (cap 0); both match
    # the trainer, and each other to float32 rounding
    import attncore.models.seq2seq as seq2seq
    folded, trainer = _pair(name)
    monkeypatch.setattr(seq2seq, "EMBEDDING_FOLD_MAX_BYTES", 0)
    unfolded, _ = _pair(name)
    assert folded._decoder_step.folds_embedding and folded.src_input_tables is not None
    assert not unfolded._decoder_step.folds_embedding and unfolded.src_input_tables is None
    rng = np.random.default_rng(4)
    sources = _random_batch(rng, 13, [5, 1, 7, 3])
    tgt_in = np.concatenate([np.full((4, 1), 1), rng.integers(3, 11, (4, 5))], axis=1)
    ref_lp, ref_att = _trainer_teacher_forced(trainer, sources, tgt_in)
    results = []
    for engine in (folded, unfolded):
        lp, att = _engine_teacher_forced(engine, sources, tgt_in)
        _assert_log_probs_close(lp, ref_lp)
        np.testing.assert_allclose(att, ref_att, rtol=RTOL, atol=ATOL)
        results.append((lp, att))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert ([r.tokens for r in folded.generate(sources, max_length=12)] ==
            [r.tokens for r in unfolded.generate(sources, max_length=12)])


def test_embedding_tables_past_the_cap_are_not_made(monkeypatch):
    # the cap counts a table's bytes: vocab x G*H float32 per table (GRU, H = 8: 13 x 24 x 4
    # = 1248 bytes for the source side, 11 x 24 x 4 = 1056 for the target side)
    import attncore.models.seq2seq as seq2seq
    monkeypatch.setattr(seq2seq, "EMBEDDING_FOLD_MAX_BYTES", 1056)
    engine, _ = _pair("gru-bahdanau")
    assert engine.src_input_tables is None and engine._decoder_step.folds_embedding
    monkeypatch.setattr(seq2seq, "EMBEDDING_FOLD_MAX_BYTES", 1248)
    engine, _ = _pair("gru-bahdanau")
    assert engine.src_input_tables[0].shape == (13, 24)
    assert not engine.src_input_tables[0].flags.writeable


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_tokens_match_the_trainer_on_a_ragged_batch(name):
    engine, trainer = _pair(name, seed=5)
    sources = _random_batch(np.random.default_rng(1), 13, [6, 2, 9, 4, 1])
    src, lengths = _padded(sources)
    expected = trainer.greedy_decode(src, lengths, 12)
    results = engine.generate(sources, max_length=12)
    for row, result in zip(expected, results):
        row = row.tolist()
        ended = 2 in row
        assert result.tokens == (row[:row.index(2)] if ended else row)


@pytest.mark.parametrize("name", [n for n in sorted(VARIANTS) if "unpacked" not in n])
def test_a_sentence_alone_equals_the_sentence_in_a_batch(name):
    # (without packed_source the trainer's encoder runs over the batch's padding, so a
    # source's encoding depends on its batch by definition; those variants are excluded).
    # 24 ragged sources (3 beams each: up to 72 rows per step, past the 16-row block of the
    # packed panel kernel)
    engine, _ = _pair(name, seed=7)
    lengths = [3, 8, 1, 5] + [1 + i % 9 for i in range(20)]
    sources = _random_batch(np.random.default_rng(2), 13, lengths)
    for options in (dict(), dict(beam_size=3, num_hypotheses=2, return_attention=True)):
        batch = engine.generate(sources, max_length=10, **options)
        for source, in_batch in zip(sources, batch):
            alone = engine.generate([source], max_length=10, **options)[0]
            assert alone.hypotheses == in_batch.hypotheses
            np.testing.assert_allclose(alone.log_probs, in_batch.log_probs, rtol=1e-6)
            if options:
                for a, b in zip(alone.attention, in_batch.attention):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["gru-bahdanau", "lstm-bahdanau-2layer-bidir",
                                  "gru-luong-general-feeding-bidir", "gru-bahdanau-unpacked"])
def test_a_ragged_batch_is_encoded_in_length_groups(name, monkeypatch):
    # packed sources: each length group padded to its own longest (one 30-token source made
    # every row scan 30 steps); the state, keys and split-tanh factors included, has the bits
    # of the rows encoded alone. Unpacked: one padded batch, the model's own semantics.
    engine, _ = _pair(name, seed=8)
    sources = _random_batch(np.random.default_rng(4), 13, [3, 30, 2, 4, 3, 29, 1, 4, 2, 3])
    shapes = []
    plain = engine._encode_padded
    monkeypatch.setattr(engine, "_encode_padded", lambda group: shapes.append(
        (len(group), max(len(s) for s in group))) or plain(group))
    state = engine._start(sources)
    if "unpacked" in name:
        assert shapes == [(10, 30)]
        return
    assert shapes == [(2, 30), (8, 4)]
    # (bit for bit on AVX2 and AVX-512 machines; a scalar build's BLAS rounds by the shape)
    same = (np.testing.assert_array_equal if rows_independent() else
            lambda a, b, err_msg="": np.testing.assert_allclose(a, b, rtol=0, atol=1e-6,
                                                                err_msg=err_msg))
    for row, source in enumerate(sources):
        alone = engine._start([source])
        n = len(source)
        for name_, whole, single in (("memory", state.memory, alone.memory),
                                     ("keys", state.keys, alone.keys),
                                     ("key_factors", state.key_factors, alone.key_factors)):
            if whole is not None:
                same(whole[row, :n], single[0, :n], err_msg=name_)
        if state.key_in_limit is not None:
            np.testing.assert_array_equal(state.key_in_limit[row, :n], alone.key_in_limit[0])
        same(state.hidden[:, row], alone.hidden[:, 0])
        same(state.cells[:, row], alone.cells[:, 0])
        assert not state.memory[row, n:].any()   # (padded positions: zero rows, as before)
    tokens = np.full(len(sources), engine.bos_id)
    grouped, _ = engine._step(state, tokens)
    monkeypatch.setattr("attncore.models.seq2seq.length_groups",
                        lambda lengths: [np.arange(len(lengths))])   # one padded batch
    padded, _ = engine._step(engine._start(sources), tokens)
    same(grouped, padded)


def _stepwise_greedy(engine, sources, max_length, min_length=0, length_penalty=1.0,
                     return_attention=False, attention_heads="mean"):
    """generation's step-by-step search (_step / select per step), the compiled one's oracle."""
    from attncore import generation
    return generation._one_row_search(
        engine, sources, generation._argmax, bos_id=engine.bos_id, eos_id=engine.eos_id,
        max_length=max_length, min_length=min_length, length_penalty=length_penalty,
        return_attention=return_attention, attention_heads=attention_heads)


def _ending_at_various_steps(engine, sources, max_length=12):
    """The engine with its EOS logit made to swing (its output row x30) and shifted so that
    EOS wins some steps of some rows (the share tried in turn until the greedy lengths of the
    batch differ): random weights alone never end a sentence."""
    eos = engine.eos_id
    weights = dict(engine.weights)
    out_weight = weights["decoder.output.weight"].copy()
    out_weight[eos] *= 30
    weights["decoder.output.weight"] = out_weight
    probe = Seq2SeqAttention(engine.config, weights)
    state, tokens, margins = probe._start(sources), np.full(len(sources), probe.bos_id), []
    rng = np.random.default_rng(0)
    for _ in range(8):
        log_probs, _ = probe._step(state, tokens)
        margins.append(log_probs[:, eos] - np.delete(log_probs, eos, axis=1).max(axis=1))
        tokens = rng.integers(3, log_probs.shape[1], len(sources))
    for share in (0.1, 0.2, 0.3, 0.5):
        bias = weights["decoder.output.bias"].copy()
        bias[eos] -= np.quantile(np.concatenate(margins), 1 - share)
        candidate = Seq2SeqAttention(engine.config, dict(weights, **{"decoder.output.bias": bias}))
        lengths = {len(r.tokens) for r in _stepwise_greedy(candidate, sources, max_length)}
        if len(lengths) > 1:
            return candidate
    raise AssertionError("no EOS shift ends the batch's sentences at various steps")


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("options", [
    dict(max_length=12),
    dict(max_length=12, min_length=3, length_penalty=0.6, return_attention=True),
    dict(max_length=3, return_attention=True, attention_heads="all"),
], ids=["plain", "min-length-attention", "short-all-heads"])
def test_compiled_greedy_equals_the_step_by_step_search(name, options):
    # DecoderStep.greedy runs the whole search in one call, moving finished rows out of the
    # batch in place (and cutting the source width to the longest row left); the reference is
    # generation's loop over _step and select. Rows end at various steps (some at the first).
    from attncore.models.base import check_sources

    engine, _ = _pair(name, seed=13)
    sources = check_sources(_random_batch(np.random.default_rng(14), 13,
                                          [6, 2, 9, 4, 1, 7, 3, 8, 5, 9, 2, 6]), 13)
    engine = _ending_at_various_steps(engine, sources)
    compiled = engine.generate(sources, **options)
    stepwise = _stepwise_greedy(engine, sources, **options)
    for got, want in zip(compiled, stepwise):
        assert got.hypotheses == want.hypotheses
        assert got.scores == want.scores and got.log_probs == want.log_probs
        if options.get("return_attention"):
            assert got.attention[0].shape == want.attention[0].shape
            np.testing.assert_array_equal(got.attention[0], want.attention[0])
        else:
            assert got.attention is None


def test_a_generous_max_length_costs_the_steps_taken():
    # the compiled search allocates its outputs for max_length steps up front (64 sources of
    # 300 tokens with attention and max_length 2**20: 75 GiB, a MemoryError); past
    # COMPILED_GREEDY_MAX_BYTES the step-by-step search runs, with the same results
    import tracemalloc
    engine, _ = _pair("gru-bahdanau")
    bias = engine.weights["decoder.output.bias"].copy()
    bias[engine.eos_id] = 1e3                          # EOS wins once min_length allows it
    engine = Seq2SeqAttention(engine.config, dict(engine.weights, **{"decoder.output.bias": bias}))
    sources = _random_batch(np.random.default_rng(15), 13, [300] * 63 + [17])
    options = dict(min_length=4, return_attention=True)
    short = engine.generate(sources, max_length=6, **options)      # the compiled search
    tracemalloc.start()
    try:
        long = engine.generate(sources, max_length=2 ** 20, **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    for got, want in zip(long, short):
        assert got.tokens == want.tokens and len(got.tokens) == 4
        assert got.scores == want.scores
        np.testing.assert_array_equal(got.attention[0], want.attention[0])


def test_ctrl_c_stops_the_compiled_greedy_search():
    # the whole search runs in one nogil call: a Ctrl-C (or the CLI's SIGTERM handler) waited
    # for its end, minutes at max_length 2**20; now it stops within SIGNAL_CHECK_SECONDS of CPU
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("needs the main thread and Python's default SIGINT handler")
    engine, _ = _pair("gru-bahdanau")
    steps = 2 ** 20

    class Spy:   # the compiled step, noting the outputs the search writes
        def __init__(self, real):
            self.real, self.args = real, None

        def greedy(self, *args):
            self.args = args
            return self.real.greedy(*args)

    spy = engine._decoder_step = Spy(engine._decoder_step)
    timer = threading.Timer(0.2, signal.raise_signal, (signal.SIGINT,))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.generate([[4, 5, 6]], max_length=steps, min_length=steps)
    finally:
        timer.cancel()
    counts = spy.args[13]
    assert 0 < counts[0] < steps   # stopped inside the search, the steps done written


def test_compiled_greedy_rejects_inconsistent_calls():
    engine, _ = _pair("gru-bahdanau")
    state = engine._start([np.array([4, 5, 6])])
    with pytest.raises(ValueError, match="max_length"):
        engine._greedy(state, np.array([1]), max_length=0, min_length=0, eos_id=2,
                       return_attention=False)
    with pytest.raises(ValueError, match="eos_id"):
        engine._greedy(state, np.array([1]), max_length=3, min_length=0, eos_id=99,
                       return_attention=False)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        engine._greedy(state, np.array([1, 1]), max_length=3, min_length=0, eos_id=2,
                       return_attention=False)


def test_a_float64_model_runs_in_float32_close_to_the_trainer():
    config = _config(rnn_type="lstm", attention="luong_general", dtype="float64")
    trainer = model_from_config(config, 1)
    engine = Seq2SeqAttention.from_config(config, seed=1)
    assert all(w.dtype == np.float32 for w in engine.weights.values())
    sources = _random_batch(np.random.default_rng(3), 13, [4, 6])
    tgt_in = np.array([[1, 5, 6, 7], [1, 8, 9, 4]])
    lp, _ = _engine_teacher_forced(engine, sources, tgt_in)
    ref, _ = _trainer_teacher_forced(trainer, sources, tgt_in)
    _assert_log_probs_close(lp, ref)


# -- the bundled dates model --------------------------------------------------------------------

DATE_TEXTS = ["Tuesday, 3 March 1998", "12/05/2001", "the 1st of May 1885", "2310-04-15",
              "Sat 9 Dec 2034", "July 4, 1776"]


@pytest.fixture(scope="module")
def dates():
    return models.load(DATES)


def test_load_picks_the_class_and_the_tokenizer(dates):
    assert type(dates) is Seq2SeqAttention
    assert dates.tokenizer is not None
    assert dates.config["hidden_size"] == 128
    assert all(w.dtype == np.float32 and w.flags.c_contiguous and not w.flags.writeable
               for w in dates.weights.values())


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_model_weights_cannot_be_edited_in_place(dates, weight_dtype):
    """model.weights is what the model runs and save() writes: a read-only mapping of arrays
    that cannot be made writeable again. (A replaced entry had no effect on the model in
    memory but went into save() and copies; an array made writeable and edited changed the
    biases and norms the steps read in place but not the packed matrices.)"""
    model = Seq2SeqAttention(dates.config, dict(dates.weights), dates.tokenizer,
                             weight_dtype=weight_dtype)
    with pytest.raises(TypeError):
        model.weights["decoder.output.bias"] = np.zeros_like(model.weights["decoder.output.bias"])
    for name, array in model.weights.items():
        with pytest.raises(ValueError, match="WRITEABLE"):
            array.flags.writeable = True
    # the documented way to change a weight: a new model
    bias = model.weights["decoder.output.bias"]
    edited = Seq2SeqAttention(model.config, {**model.weights,
                                             "decoder.output.bias": bias + 1.0},
                              model.tokenizer)
    np.testing.assert_array_equal(edited.weights["decoder.output.bias"], bias + 1.0)
    assert copy.deepcopy(model).translate(["3 March 1998"]) == ["1998-03-03"]
    # a copy or a pickle of the weights is a plain dict, the caller's to edit
    for copied in (copy.copy(model.weights), copy.deepcopy(model.weights),
                   pickle.loads(pickle.dumps(model.weights))):
        assert type(copied) is dict and copied.keys() == model.weights.keys()
        np.testing.assert_array_equal(copied["decoder.output.bias"], bias)
    assert copy.deepcopy(model.weights)["decoder.output.bias"].flags.writeable


def test_model_config_cannot_be_edited(dates, tmp_path):
    """model.config is read-only like the weights: the model read most entries when it was
    built and a few (special ids, vocabulary sizes) at every call, so an edit took effect in
    part (eos_id changed where decoding stops; hidden_size changed nothing) and went into
    save() and copies."""
    config = dates.config
    labelled = Seq2SeqAttention({**config, "notes": ["a", ["b"]]}, dates.weights,
                                dates.tokenizer)
    edits = [lambda c: c.__setitem__("eos_id", 5), lambda c: c.__delitem__("eos_id"),
             lambda c: c.update(eos_id=5), lambda c: c.setdefault("new", 1),
             lambda c: c.pop("eos_id"), lambda c: c.popitem(), lambda c: c.clear(),
             lambda c: c.__ior__({"eos_id": 5}),
             lambda c: c["tokenizer"].__setitem__("src", "other.json"),
             lambda c: labelled.config["notes"].append("c"),
             lambda c: labelled.config["notes"].__setitem__(0, "z"),
             lambda c: labelled.config["notes"][1].clear(),
             lambda c: labelled.config["notes"].sort()]
    for edit in edits:
        with pytest.raises(TypeError, match=r"model.config is read-only.*to_dict\(\) is a plain"
                                            r".*weight_dtype=model.weight_dtype"):
            edit(config)
    assert dates.config["eos_id"] == 2 and dates.config["tokenizer"]["src"] == "src_vocab.json"
    assert labelled.config["notes"] == ["a", ["b"]]
    # still a dict to read, compare and write as JSON
    assert isinstance(config, dict) and config == json.loads(json.dumps(config))
    assert labelled.save(tmp_path / "m").joinpath("config.json").read_text().count('"b"') == 1
    # copies are plain, the caller's to edit; the documented way to change an entry
    for copied in (dict(config), config.copy(), copy.deepcopy(config),
                   pickle.loads(pickle.dumps(config)), config | {}):
        assert type(copied) is dict and copied == config
        copied["eos_id"] = 5
    for deep in (copy.deepcopy(labelled.config), labelled.config.to_dict()):
        assert type(deep) is dict and deep == labelled.config
        assert type(deep["tokenizer"]) is dict and type(deep["notes"][1]) is list
        deep["notes"][1].append("c")
        deep["tokenizer"]["src"] = "other.json"
    assert labelled.config["notes"] == ["a", ["b"]]
    edited = Seq2SeqAttention({**config, "eos_id": 3}, dates.weights, dates.tokenizer)
    assert edited.eos_id == 3 and dates.eos_id == 2
    # the recipe of the message keeps a quantized model's weight dtype
    int8 = Seq2SeqAttention(config, dates.weights, dates.tokenizer, weight_dtype="int8")
    edited = type(int8)({**int8.config, "eos_id": 2}, int8.weights, int8.tokenizer,
                        weight_dtype=int8.weight_dtype)
    assert edited.weight_dtype == "int8"
    assert edited.translate(["3 March 1998"]) == int8.translate(["3 March 1998"])
    assert copy.deepcopy(dates).translate(["3 March 1998"]) == ["1998-03-03"]


def test_dates_translate(dates):
    assert dates.translate(["Tuesday, 3 March 1998"]) == ["1998-03-03"]
    assert dates.translate(["Friday, April 10, 1885", "12/05/2001"]) == ["1885-04-10",
                                                                         "2001-12-05"]
    assert dates.translate(["Tuesday, 3 March 1998"], beam_size=4) == ["1998-03-03"]


def test_translate_names_the_text_that_is_not_unicode(dates):
    with pytest.raises(ValueError, match=r"texts\[1\]: text holds a lone surrogate"):
        dates.translate(["3 March 1998", "3 March \ud8001998"])


def test_dates_matches_the_trainer(dates):
    trainer = load_model(DATES)
    sources = [dates.tokenizer.encode_source(t) for t in DATE_TEXTS]
    targets = ["1998-03-03", "2001-12-05", "1885-05-01", "2310-04-15", "2034-12-09",
               "1776-07-04"]
    tgt_in = np.stack([np.concatenate([[1], dates.tokenizer.encode_target(t)])
                       for t in targets])
    lp, att = _engine_teacher_forced(dates, sources, tgt_in)
    ref_lp, ref_att = _trainer_teacher_forced(trainer, sources, tgt_in)
    _assert_log_probs_close(lp, ref_lp)
    np.testing.assert_allclose(att, ref_att, rtol=RTOL, atol=ATOL)
    src, lengths = _padded(sources)
    expected = trainer.greedy_decode(src, lengths, 12)
    for row, result in zip(expected, dates.generate(sources, max_length=12)):
        row = row.tolist()
        assert result.tokens == row[:row.index(2)]


def test_dates_results_do_not_depend_on_the_thread_count(dates):
    sources = [dates.tokenizer.encode_source(t) for t in DATE_TEXTS]
    runs = []
    for threads in (1, 2):
        with attncore.num_threads(threads):
            runs.append(dates.generate(sources, max_length=12, beam_size=3, num_hypotheses=3,
                                       return_attention=True))
    for a, b in zip(*runs):
        assert a.hypotheses == b.hypotheses
        assert a.log_probs == b.log_probs          # bit-identical
        for x, y in zip(a.attention, b.attention):
            assert np.array_equal(x, y)


def test_python_threads_decoding_at_once_equal_sequential(dates):
    batches = [[dates.tokenizer.encode_source(t) for t in DATE_TEXTS[i:] + DATE_TEXTS[:i]]
               for i in range(6)]
    options = [dict(max_length=12), dict(max_length=12, beam_size=3, num_hypotheses=2)]

    def run(i):
        return dates.generate(batches[i], **options[i % 2])

    sequential = [run(i) for i in range(len(batches))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, range(len(batches))))
    for seq, par in zip(sequential, parallel):
        assert [r.hypotheses for r in seq] == [r.hypotheses for r in par]
        assert [r.log_probs for r in seq] == [r.log_probs for r in par]


def test_dates_attention_shapes(dates):
    sources = [dates.tokenizer.encode_source(t) for t in DATE_TEXTS[:2]]
    results = dates.generate(sources, max_length=12, return_attention=True)
    for source, result in zip(sources, results):
        attention = result.attention[0]
        assert attention.shape == (len(result.tokens) + 1, len(source))  # EOS scored
        np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-5)
    heads = dates.generate(sources[:1], max_length=12, return_attention=True,
                           attention_heads="all")[0].attention[0]
    assert heads.shape == (len(results[0].tokens) + 1, 1, len(sources[0]))


# -- save / load ----------------------------------------------------------------------------------

def test_save_load_round_trip(dates, tmp_path):
    directory = dates.save(tmp_path / "copy")
    again = models.load(directory)
    assert again.config == dates.config
    assert again.weights.keys() == dates.weights.keys()
    assert all(np.array_equal(again.weights[k], dates.weights[k]) for k in dates.weights)
    assert again.translate(DATE_TEXTS) == dates.translate(DATE_TEXTS)
    original = json.loads((DATES / "config.json").read_text())
    assert json.loads((directory / "config.json").read_text()) == original
    assert Seq2SeqAttention.load(directory).translate(["3 March 1998"]) == ["1998-03-03"]
    # a model whose config names a tokenizer it does not carry saves without one
    bare = Seq2SeqAttention(dates.config, dates.weights)
    assert models.load(bare.save(tmp_path / "bare")).tokenizer is None


def test_random_model_save_load_round_trip(tmp_path):
    engine, _ = _pair("lstm-luong-concat-feeding-bidir")
    assert engine.tokenizer is None
    again = Seq2SeqAttention.load(engine.save(tmp_path / "m"))
    assert again.tokenizer is None and again.config["tokenizer"] is None
    sources = _random_batch(np.random.default_rng(4), 13, [4, 2])
    a = engine.generate(sources, max_length=6, beam_size=2)
    b = again.generate(sources, max_length=6, beam_size=2)
    assert [r.hypotheses for r in a] == [r.hypotheses for r in b]
    assert [r.log_probs for r in a] == [r.log_probs for r in b]


def test_from_config_is_the_trainers_initialisation():
    config = _config(**VARIANTS["gru-bahdanau"])
    engine = models.from_config(config, seed=9)
    trainer = model_from_config(config, 9).state_dict()
    assert type(engine) is Seq2SeqAttention
    assert all(np.array_equal(engine.weights[k], trainer[k]) for k in trainer)
    other = models.from_config(config, seed=10)
    assert not np.array_equal(other.weights["decoder.output.weight"],
                              engine.weights["decoder.output.weight"])


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sources, options, error, match", [
    ([], dict(max_length=5), ValueError, "sources is an empty batch"),
    ([[4, 5], []], dict(max_length=5), ValueError, r"sources\[1\] is empty"),
    ([[4, 63]], dict(max_length=5), ValueError, r"token id 63 outside \[0, 63\)"),
    ([[4, -1]], dict(max_length=5), ValueError, "token id -1"),
    ([np.array([4.0, 5.0])], dict(max_length=5), TypeError, "integer"),
    ("Tuesday", dict(max_length=5), TypeError, "sources"),
    (["Tuesday"], dict(max_length=5), TypeError, "translate"),
    ([[4, 5]], dict(max_length=0), ValueError, "max_length"),
    ([[4, 5]], dict(max_length=-3), ValueError, "max_length"),
    ([[4, 5]], dict(), TypeError, "max_length"),
    ([[4, 5]], dict(max_length=5, beam_size=0), ValueError, "beam_size"),
    ([[4, 5]], dict(max_length=5, beam_size=2, num_hypotheses=3), ValueError,
     "num_hypotheses"),
    ([[4, 5]], dict(max_length=5, do_sample=True, beam_size=2), ValueError, "beam_size"),
    ([[4, 5]], dict(max_length=5, top_p=0.0), ValueError, "top_p"),
])
def test_bad_generate_input_is_named(dates, sources, options, error, match):
    with pytest.raises(error, match=match):
        dates.generate(sources, **options)


def test_bad_steps_and_rows_are_named(dates):
    # the decoder protocol (docs/ENGINE.md) is public to custom searches: a token past the
    # embedding read other memory (NaN, garbage, or a segfault at 10**6), float rows were
    # truncated
    state = dates._start([np.array(dates.tokenizer.encode_source("3 March 1998"))])
    vocab = dates.target_vocab_size
    for bad, error, match in [(np.array([vocab]), ValueError, rf"tokens has an id outside \[0, {vocab}\)"),
                              (np.array([10**6]), ValueError, "tokens has an id outside"),
                              (np.array([-1]), ValueError, "tokens has an id outside"),
                              (np.array([1.0]), TypeError, "tokens must be integer ids"),
                              (np.array([1, 1]), ValueError, r"tokens must have shape \(1,\)")]:
        with pytest.raises(error, match=match):
            dates._step(state, bad)
    with pytest.raises(ValueError, match="rows must be a 1-d integer array"):
        state.select([0.9])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 1\), got 1"):
        state.select([0, 1])
    log_probs, _ = dates._step(state.select([0, 0]), np.array([dates.bos_id] * 2))
    assert np.isfinite(log_probs).all() and np.array_equal(log_probs[0], log_probs[1])


def test_bad_translate_input_is_named(dates):
    with pytest.raises(TypeError, match="texts"):
        dates.translate("Tuesday, 3 March 1998")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        dates.translate(["3 March 1998", ""])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        dates.translate([b"3 March 1998"])
    engine, _ = _pair("gru-bahdanau")
    with pytest.raises(ValueError, match="tokenizer"):
        engine.translate(["x"])


def test_unknown_characters_map_to_unk_or_raise_when_strict(dates):
    ids = dates.tokenizer.encode_source("3 March 1998 ~")
    assert ids[-2] == 3 and ids[-1] == 2            # '~' -> <unk>, then the source <eos>
    with pytest.raises(ValueError, match="'~'"):
        dates.tokenizer.encode_source("3 March 1998 ~", strict=True)


def test_bad_weights_are_rejected():
    config = _config(**VARIANTS["gru-bahdanau"])
    weights = dict(model_from_config(config, 0).state_dict())
    good = Seq2SeqAttention(config, weights)
    assert good.config == config
    bad = dict(weights, **{"decoder.output.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="decoder.output.bias.*shape"):
        Seq2SeqAttention(config, bad)
    missing = {k: v for k, v in weights.items() if k != "decoder.output.bias"}
    with pytest.raises(ValueError, match="missing tensor 'decoder.output.bias'"):
        Seq2SeqAttention(config, missing)
    nan = dict(weights, **{"decoder.output.bias": np.full(11, np.nan, np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        Seq2SeqAttention(config, nan)
    ints = dict(weights, **{"decoder.output.bias": np.zeros(11, np.int64)})
    with pytest.raises(ValueError, match="dtype"):
        Seq2SeqAttention(config, ints)
    with pytest.raises(ValueError, match="architecture"):
        Seq2SeqAttention(dict(config, architecture="transformer"), weights)
    with pytest.raises(TypeError, match="config"):
        Seq2SeqAttention([("architecture", "seq2seq_attention")], weights)


def test_default_special_ids_outside_a_tiny_vocabulary_are_refused(monkeypatch):
    # a config without bos_id / eos_id decodes from the defaults 1 / 2: with fewer target
    # tokens they used to index past the embedding table (the stated ids are checked at load).
    # The built-in architectures require the ids; one registered without them gets defaults.
    config = _config(**VARIANTS["gru-bahdanau"])
    config.update(tgt_vocab_size=2, bos_id=0, eos_id=0)
    engine = Seq2SeqAttention.from_config(config, seed=0)
    config = {key: value for key, value in engine.config.items()
              if key not in ("bos_id", "eos_id")}
    with pytest.raises(ValueError, match="config lacks hyper-parameters 'bos_id', 'eos_id'"):
        Seq2SeqAttention(config, engine.weights)
    required = attncore.io._REQUIRED_KEYS["seq2seq_attention"]
    monkeypatch.setitem(attncore.io._REQUIRED_KEYS, "seq2seq_attention",
                        tuple(key for key in required if key not in ("bos_id", "eos_id")))
    engine = Seq2SeqAttention(config, engine.weights)
    with pytest.raises(ValueError, match=r"eos_id 2 \(the default: config.json has none\) "
                                         r"lies outside the target vocabulary \[0, 2\)"):
        engine.generate([[3, 4]], max_length=2, beam_size=2)
    engine = Seq2SeqAttention({**config, "eos_id": 1}, engine.weights)
    assert len(engine.generate([[3, 4]], max_length=2)[0].tokens) <= 2


def test_weights_that_overflow_give_an_error_not_tokens(dates):
    # finite weights of magnitude 3e38 load, then overflow to NaN logits: greedy returned pad
    # tokens with a NaN score, beam search an empty n-best list (IndexError further on)
    weights = dict(dates.weights)
    output = np.array(weights["decoder.output.weight"])
    output[5], output[6] = 3e38, -3e38
    weights["decoder.output.weight"] = output
    broken = type(dates)(dates.config, weights, tokenizer=dates.tokenizer)
    source = [[5, 9, 12, 2]]
    for options in ({}, {"beam_size": 3}, {"do_sample": True, "seed": 1},
                    {"return_attention": True}):
        with pytest.raises(ValueError, match="log-probabilities are NaN"):
            broken.generate(source, max_length=6, **options)
    assert len(dates.generate(source, max_length=6)[0].tokens) > 0


def test_weights_are_private_copies():
    config = _config(**VARIANTS["gru-bahdanau"])
    weights = dict(model_from_config(config, 0).state_dict())
    engine = Seq2SeqAttention(config, weights)
    before = engine.weights["decoder.output.bias"].copy()
    weights["decoder.output.bias"][:] = 7.0
    assert np.array_equal(engine.weights["decoder.output.bias"], before)
    with pytest.raises(ValueError):
        engine.weights["decoder.output.bias"][0] = 1.0


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        models.load(tmp_path / "nothing")
    shutil.copytree(DATES, tmp_path / "broken")
    config = json.loads((tmp_path / "broken" / "config.json").read_text())
    config["tokenizer"]["src"] = "../src_vocab.json"
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="file name inside the model directory"):
        models.load(tmp_path / "broken")
    config["tokenizer"]["src"] = "absent.json"
    (tmp_path / "broken" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing file"):
        models.load(tmp_path / "broken")
    with pytest.raises(ValueError, match="unknown architecture"):
        models.model_class("lstm_lm")


# -- tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_source_eos_follows_the_sides_and_the_override(tmp_path):
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer, load_tokenizer

    vocab = Vocab("abc", level="char")
    both = Tokenizer(vocab, vocab)
    assert both.encode_source("ab").tolist() == [4, 5, 2]      # encoder-decoder: + <eos>
    assert both.config() == {"type": "attncore.data.vocab", "src": "src_vocab.json",
                             "tgt": "tgt_vocab.json"}
    one = Tokenizer(tgt=vocab)
    assert one.encode_source("ab").tolist() == [4, 5]          # prompt / document: no <eos>
    assert one.decode_target([4, 6, 2, 5]) == "ac"
    off = Tokenizer(vocab, vocab, source_eos=False)
    assert off.encode_source("ab").tolist() == [4, 5]
    entry = off.config()
    assert entry["source_eos"] is False
    for name, text in off.files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    again = load_tokenizer(tmp_path, {"tokenizer": entry})
    assert again.encode_source("ab").tolist() == [4, 5] and again.config() == entry
    with pytest.raises(ValueError, match="unsupported type"):
        load_tokenizer(tmp_path, {"tokenizer": {"type": "sentencepiece", "src": "x.model"}})
    with pytest.raises(ValueError, match="source_eos"):
        load_tokenizer(tmp_path, {"tokenizer": dict(entry, source_eos="no")})
    with pytest.raises(ValueError, match="more than src_vocab_size=5"):
        load_tokenizer(tmp_path, {"tokenizer": entry, "src_vocab_size": 5})
    # a RAN's one vocab_size bounds both sides (it was not read: the mismatch came out as a
    # failure of the first document with a token past the table)
    with pytest.raises(ValueError, match="more than vocab_size=5"):
        load_tokenizer(tmp_path, {"tokenizer": entry, "vocab_size": 5})
    # smaller vocabularies load (output layers padded past the tokenizer are common); an id
    # without a text is a ValueError naming it (a bare IndexError before)
    padded = load_tokenizer(tmp_path, {"tokenizer": entry, "src_vocab_size": 9,
                                       "tgt_vocab_size": 9})
    assert padded.decode_target([4, 5]) == "ab"
    for bad in (8, -1):
        with pytest.raises(ValueError, match=rf"cannot decode token id {bad}: the target "
                                             r"vocabulary has 7 tokens"):
            padded.decode_target([4, bad])


@pytest.mark.parametrize("text, detail", [
    ("[1, 2]", "holds a JSON list"),
    ('{"format": "attncore.vocab", "version": 1, "level": "char"}', "'tokens' must be a list"),
    ('{"format": "attncore.vocab", "version": 1, "level": "char", "tokens": 5}',
     "'tokens' must be a list"),
    ("{ not json", "Expecting property name"),
    ("[" * 100000 + "]" * 100000, "not a readable vocabulary"),
])
def test_unreadable_vocabulary_files_are_named(tmp_path, text, detail):
    # (an AttributeError, a KeyError, a TypeError and bare JSON errors before)
    from attncore.tokenizer import load_tokenizer
    (tmp_path / "tgt_vocab.json").write_text(text, encoding="utf-8")
    entry = {"type": "attncore.data.vocab", "tgt": "tgt_vocab.json"}
    with pytest.raises(ValueError, match=r"config\['tokenizer'\]\['tgt'\]: '.*tgt_vocab.json' "
                                         r"is not a readable vocabulary") as error:
        load_tokenizer(tmp_path, {"tokenizer": entry})
    assert detail in str(error.value)


def _saved_and_loaded(tmp_path, tokenizer, vocab_size):
    """A random seq2seq model with ``tokenizer``, and the model saved and loaded again."""
    config = Seq2SeqConfig(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, embed_dim=6,
                           hidden_size=8).to_dict()
    model = models.from_config(config, seed=2, tokenizer=tokenizer)
    return model, models.load(model.save(tmp_path / "m"))


def test_a_saved_tokenizers_source_cut_reads_back(tmp_path):
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer
    vocab = Vocab("abcdef", level="char")
    model, loaded = _saved_and_loaded(tmp_path, Tokenizer(vocab, vocab, max_source_tokens=3), 13)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tokenizer"][
        "max_source_tokens"] == 3
    assert loaded.tokenizer.max_source_tokens == 3
    assert loaded.tokenizer.encode_source("abcdef").tolist() == [4, 5, 6, 2]   # cut, then <eos>
    assert loaded.tokenizer.config() == model.tokenizer.config()
    texts = ["abcdef", "abcfed", "fa"]   # (the first two read alike once cut)
    assert loaded.translate(texts, max_length=5) == model.translate(texts, max_length=5)
    assert loaded.translate(texts[:1], max_length=5) == loaded.translate(texts[1:2], max_length=5)


def test_a_saved_bpe_tokenizer_reads_back(tmp_path):
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab
    from attncore.tokenizer import Tokenizer
    vocab = BPEVocab.train(["in the beginning god created the heaven and the earth.",
                            "and the earth was without form, and void."] * 5, vocab_size=60)
    model, loaded = _saved_and_loaded(tmp_path, Tokenizer(vocab, vocab), len(vocab))
    assert isinstance(loaded.tokenizer.src, BPEVocab) and loaded.tokenizer.src == vocab
    for text in ("and the earth", "the heaven was void", "unseen words, too"):
        ids = model.tokenizer.encode_source(text)
        assert loaded.tokenizer.encode_source(text).tolist() == ids.tolist()
        assert loaded.tokenizer.decode_target(ids.tolist()) == \
            model.tokenizer.decode_target(ids.tolist())
    assert loaded.tokenizer.decode_target(vocab.encode("and the earth")) == "and the earth"
    assert loaded.translate(["and the earth"], max_length=6) == \
        model.translate(["and the earth"], max_length=6)


@pytest.mark.parametrize("attention", ["bahdanau", "luong_dot", "luong_general", "luong_concat"])
def test_a_step_alone_is_bit_identical_to_the_step_in_a_batch(attention):
    # BLAS calls sized by the batch's padded source width round differently from calls sized
    # by one source, so a longer neighbour must not change a single bit of a source's scores.
    config = Seq2SeqConfig(src_vocab_size=90, tgt_vocab_size=80, embed_dim=24, hidden_size=40,
                           attention=attention).to_dict()
    engine = Seq2SeqAttention.from_config(config, seed=5)
    rng = np.random.default_rng(4)
    short, long_ = rng.integers(4, 90, 7), rng.integers(4, 90, 61)
    alone, _ = engine._step(engine._start([short]), np.array([1]))
    batch, _ = engine._step(engine._start([short, long_]), np.array([1, 1]))
    np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(batch)[0])



@pytest.mark.parametrize("ids, match", [([5.9, 6.2], r"got 5\.9 \(float\)"), ("56", "got a string"),
                                        ([True, 5], r"got True \(bool\)"),
                                        (np.array([5.0]), r"got 5\.0 \(float64\)")])
def test_decode_refuses_ids_that_are_not_integers(dates, ids, match):
    # int() truncated 5.9, read True as BOS and iterated "56" digit by digit: other text
    with pytest.raises(TypeError, match=match):
        dates.tokenizer.decode_target(ids)
    assert dates.tokenizer.decode_target(np.array([5, 6])) == dates.tokenizer.decode_target([5, 6])


@pytest.mark.parametrize("weight_dtype", ["float32", "int8"])
def test_a_discarded_model_is_freed_without_the_cyclic_collector(weight_dtype):
    # DecoderStep's closures over its list of weights formed a reference cycle: a service
    # reloading a model held dozens of discarded copies until a full collection ran
    import gc
    import weakref
    gc.disable()
    try:
        model = attncore.load(DATES, weight_dtype=weight_dtype)
        model.translate(["3 March 1998"])
        weight = weakref.ref(model.out_weight)   # (the step keeps it, as given)
        del model
        assert weight() is None
    finally:
        gc.enable()


def test_a_min_length_above_the_default_limit_leaves_a_step_for_eos(dates):
    # the floor became the limit itself: every such output was cut at exactly min_length
    # tokens, never finished
    source = dates.tokenizer.encode_source("3 March 1998")
    floor = dates.default_max_length(len(source)) + 4
    got = dates.generate_default_lengths([source], min_length=floor)[0]
    expected = dates.generate([source], max_length=floor + 1, min_length=floor)[0]
    assert got.hypotheses == expected.hypotheses and got.log_probs == expected.log_probs
    assert floor <= len(got.tokens) <= floor + 1
    # under the default limit nothing changes
    below = dates.generate_default_lengths([source], min_length=3)[0]
    limit = dates.default_max_length(len(source))
    assert below.hypotheses == dates.generate([source], min_length=3, max_length=limit)[0].hypotheses


def test_a_min_length_equal_to_the_default_limit_leaves_a_step_for_eos(dates):
    # (floor == limit: the "at or above" case of docs/ENGINE.md; > limit kept the limit and cut
    # every output at exactly min_length tokens, never finished)
    source = dates.tokenizer.encode_source("3 March 1998")
    floor = dates.default_max_length(len(source))
    got = dates.generate_default_lengths([source], min_length=floor)[0]
    expected = dates.generate([source], max_length=floor + 1, min_length=floor)[0]
    assert got.hypotheses == expected.hypotheses and got.log_probs == expected.log_probs


@pytest.mark.parametrize("name", ["gru-bahdanau", "lstm-luong-dot-unpacked-bidir"])
def test_select_that_swaps_sources_takes_their_memory_along(name):
    # rows that change source at the same batch size (a permutation) must not share the memory
    engine, _ = _pair(name)
    rng = np.random.default_rng(5)
    sources = _random_batch(rng, 13, [3, 6])
    state = engine._start(sources)
    engine._step(state, np.full(2, engine.bos_id, dtype=np.int64))
    swapped = state.select(np.array([1, 0]))
    fresh = engine._start(sources[::-1])
    engine._step(fresh, np.full(2, engine.bos_id, dtype=np.int64))
    tokens = np.array([5, 6], dtype=np.int64)
    got, got_attention = engine._step(swapped, tokens)
    expected, expected_attention = engine._step(fresh, tokens)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_attention, expected_attention, rtol=0, atol=1e-6)


def test_tokenizer_cuts_a_source_before_its_eos_and_checks_the_vocabulary_size(tmp_path):
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer, load_tokenizer

    vocab = Vocab("abc", level="char")                            # 7 ids
    cut = Tokenizer(vocab, vocab, max_source_tokens=2)
    assert cut.encode_source("abc").tolist() == [4, 5, 2]         # cut to 2, then <eos>
    entry = Tokenizer(vocab, vocab).config()
    for name, text in Tokenizer(vocab, vocab).files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert load_tokenizer(tmp_path, {"tokenizer": entry, "src_vocab_size": 7}) is not None
    with pytest.raises(ValueError, match="more than src_vocab_size=6"):
        load_tokenizer(tmp_path, {"tokenizer": entry, "src_vocab_size": 6})
