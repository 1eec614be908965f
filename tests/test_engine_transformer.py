# SPDX-License-Identifier: Apache-2.0
"""The Transformer engine (``attncore.models.transformer``) against its oracles.

* The trainer (``attncore.train.transformer``) in float64 on the very same weights (rounded to
  float32 first, so the oracle sees exactly what the engine sees): log-probabilities, encoder
  outputs, cross-attention weights, greedy tokens, class logits, for every kind and option.
* ``torch.nn.Transformer`` (when torch is installed) on the same weights.
* Engine properties: ragged batches == sentences alone, ``select`` for beams and finished rows,
  the in-place KV cache and its growth, thread-count independence, concurrent Python threads,
  and bad input.

Tolerances: the engine computes in float32; against a float64 oracle its log-probabilities
agree to rtol 1e-4 (atol 1e-5 for values near 0), a few float32 ulps accumulated over ~2 layers
of O(1) activations. Cross-attention weights and hidden states: atol 1e-5.
"""
import threading

import numpy as np
import pytest

import attncore
from conftest import rows_independent
from attncore.models import load
from attncore.models.transformer import Transformer, TransformerDecoderState
from attncore.train import autograd as ag
from attncore.train.transformer import Transformer as Trainer
from attncore.train.transformer import TransformerConfig

LOGPROB_TOL = {"rtol": 1e-4, "atol": 1e-5}
HIDDEN_ATOL = 1e-5
SRC_VOCAB, TGT_VOCAB = 11, 13


def _config(**overrides) -> TransformerConfig:
    base = dict(kind="encoder_decoder", src_vocab_size=SRC_VOCAB, tgt_vocab_size=TGT_VOCAB,
                d_model=16, num_heads=4, dim_feedforward=24, num_encoder_layers=2,
                num_decoder_layers=2, max_positions=24, dtype="float64")
    base.update(overrides)
    return TransformerConfig(**base)


def _pair(seed=0, **overrides):
    """(trainer, in float64 unless ``dtype`` says otherwise, and engine) on identical weights
    (the trainer's, rounded to float32)."""
    config = _config(**overrides)
    trainer = Trainer(config, seed=seed)
    weights = {k: v.astype(np.float32).astype(v.dtype) for k, v in trainer.state_dict().items()}
    trainer.load_state_dict(weights)
    trainer.eval()
    return trainer, Transformer(config.to_dict(), weights)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _sources(rng, lengths, vocab=SRC_VOCAB):
    # ids from 4 up: not the special ids, so nothing special-cases them by accident
    return [rng.integers(4, vocab, n) for n in lengths]


def _teacher_forced(engine, sources, targets):
    """Engine log-probs (B, T, V) and cross-attention (B, T, H, S_max) over targets (B, T)."""
    state = engine._start(sources)
    log_probs, attention = [], []
    for t in range(targets.shape[1]):
        lp, weights = engine._step(state, targets[:, t])
        log_probs.append(lp)
        attention.append(weights)
    return np.stack(log_probs, 1), (None if attention[0] is None else np.stack(attention, 1))


def _trainer_teacher_forced(trainer, source, target):
    """Trainer log-probs (T, V) and cross-attention (T, H, S) of one unpadded sentence."""
    with ag.no_grad():
        memory, valid = trainer.encode_memory(source[None])
        logits, weights = trainer.decode(target[None], memory, valid)
    return _log_softmax(logits.data[0]), weights.data[0].transpose(1, 0, 2)


def _greedy(engine, sources, max_len, prefix_step=None):
    """Greedy decoding over the engine protocol; finished rows leave the batch via select."""
    state = engine._start(sources)
    active = np.arange(len(sources))
    outputs = [[] for _ in sources]
    tokens = prefix_step if prefix_step is not None else np.full(len(sources), engine.bos_id)
    for _ in range(max_len):
        log_probs, _ = engine._step(state, tokens)
        tokens = log_probs.argmax(axis=-1)
        for row, b in enumerate(active):
            outputs[b].append(int(tokens[row]))
        keep = tokens != engine.eos_id
        if not keep.any():
            break
        if not keep.all():
            state = state.select(np.flatnonzero(keep))
            active, tokens = active[keep], tokens[keep]
    return outputs


def _strip(row, eos):
    """The trainer's greedy row (eos then pads) as a list ending at eos."""
    row = list(row)
    return row[: row.index(eos) + 1] if eos in row else row


# -- encoder–decoder vs the trainer -------------------------------------------------------------

ENCODER_DECODER_CONFIGS = [
    dict(norm_first=False, activation="relu"),
    dict(norm_first=True, activation="gelu"),
    dict(norm_first=False, activation="gelu", final_norm=True, positions="learned"),
    dict(norm_first=True, final_norm=False, fused_qkv=False, tie_embeddings=True),
    dict(norm_first=False, attention_bias=False, scale_embedding=False, num_heads=2),
    dict(norm_first=True, num_encoder_layers=1, num_decoder_layers=3, layer_norm_eps=1e-3),
    dict(norm_first=True, dtype="float32"),  # a float32 trainer as the oracle: same tolerance
]


@pytest.mark.parametrize("options", ENCODER_DECODER_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_encoder_decoder_log_probs_and_attention_match_trainer(options, rng):
    trainer, engine = _pair(**options)
    # 11 tokens: the encoder takes the kernel's flash path (q_len > 8), the others split-KV
    sources = _sources(rng, [5, 2, 11, 1])
    targets = rng.integers(0, TGT_VOCAB, (4, 6))
    targets[:, 0] = engine.bos_id
    log_probs, attention = _teacher_forced(engine, sources, targets)
    assert log_probs.dtype == np.float32 and log_probs.shape == (4, 6, TGT_VOCAB)
    assert attention.dtype == np.float32 and attention.shape == (4, 6, engine.num_heads, 11)
    for b, source in enumerate(sources):
        expected, expected_attention = _trainer_teacher_forced(trainer, source, targets[b])
        np.testing.assert_allclose(log_probs[b], expected, **LOGPROB_TOL)
        np.testing.assert_allclose(attention[b, :, :, : len(source)], expected_attention, atol=HIDDEN_ATOL)
        assert not attention[b, :, :, len(source):].any(), "weights past the source must be 0"


def test_encoder_output_matches_trainer(rng):
    trainer, engine = _pair(norm_first=True, positions="learned")
    sources = _sources(rng, [3, 9, 1])
    outputs = engine.encode(sources)
    assert [o.shape for o in outputs] == [(3, 16), (9, 16), (1, 16)]
    for source, output in zip(sources, outputs):
        with ag.no_grad():
            expected = trainer.encode_memory(source[None])[0].data[0]
        assert output.dtype == np.float32
        np.testing.assert_allclose(output, expected, atol=HIDDEN_ATOL)


@pytest.mark.parametrize("norm_first", [False, True])
def test_greedy_tokens_match_trainer_greedy_decode(norm_first, rng):
    trainer, engine = _pair(seed=3, norm_first=norm_first)
    sources = _sources(rng, [4, 8, 2, 6, 3])
    padded = np.zeros((5, 8), dtype=np.int64)
    for b, source in enumerate(sources):
        padded[b, : len(source)] = source
    expected = trainer.greedy_decode(padded, np.array([len(s) for s in sources]), 12)
    got = _greedy(engine, sources, 12)
    assert got == [_strip(row, engine.eos_id) for row in expected]


# -- decoder-only and encoder-only vs the trainer -----------------------------------------------

@pytest.mark.parametrize("options", [
    dict(norm_first=False),
    dict(norm_first=True, positions="learned", tie_embeddings=True, activation="gelu"),
    dict(norm_first=True, final_norm=False, fused_qkv=False, scale_embedding=False),
], ids=["post-norm", "pre-norm-learned-tied", "pre-norm-unfused"])
def test_decoder_only_prefill_and_steps_match_trainer(options, rng):
    trainer, engine = _pair(kind="decoder_only", **options)
    prompts = _sources(rng, [3, 1, 12], vocab=TGT_VOCAB)  # 12: a flash-path causal prefill
    continuation = rng.integers(0, TGT_VOCAB, (3, 5))
    state = engine._start(prompts)
    first, attention = engine._step(state, None)
    assert attention is None
    log_probs = [first] + [engine._step(state, continuation[:, t])[0] for t in range(5)]
    log_probs = np.stack(log_probs, 1)
    for b, prompt in enumerate(prompts):
        with ag.no_grad():
            logits, _ = trainer.decode(np.concatenate([prompt, continuation[b]])[None])
        expected = _log_softmax(logits.data[0])[len(prompt) - 1:]
        np.testing.assert_allclose(log_probs[b], expected, **LOGPROB_TOL)


def test_decoder_only_greedy_matches_trainer_generate(rng):
    trainer, engine = _pair(seed=5, kind="decoder_only", norm_first=True)
    prompts = rng.integers(4, TGT_VOCAB, (3, 4))
    prompts[:, 0] = engine.bos_id
    expected = trainer.generate(prompts, 10)
    state = engine._start(list(prompts))
    log_probs, _ = engine._step(state, None)
    got = [log_probs.argmax(-1)]
    for _ in range(expected.shape[1] - 1):
        got.append(engine._step(state, got[-1])[0].argmax(-1))
    got = np.stack(got, 1)
    finished = np.cumsum(got == engine.eos_id, axis=1) - (got == engine.eos_id) > 0
    np.testing.assert_array_equal(np.where(finished, engine.pad_id, got), expected)


@pytest.mark.parametrize("pooling", ["mean", "first"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_only_classify_matches_trainer(pooling, norm_first, rng):
    trainer, engine = _pair(kind="encoder_only", num_classes=3, pooling=pooling, norm_first=norm_first)
    sources = _sources(rng, [5, 2, 7, 1])
    logits = engine.classify(sources)
    assert logits.dtype == np.float32 and logits.shape == (4, 3)
    for b, source in enumerate(sources):
        with ag.no_grad():
            expected = trainer(source[None]).data[0]
        np.testing.assert_allclose(logits[b], expected, atol=HIDDEN_ATOL)
    # and the padded-batch trainer agrees too (its own masking path)
    padded = np.zeros((4, 7), dtype=np.int64)
    for b, source in enumerate(sources):
        padded[b, : len(source)] = source
    with ag.no_grad():
        batched = trainer(padded, np.array([len(s) for s in sources])).data
    np.testing.assert_allclose(logits, batched, atol=HIDDEN_ATOL)


# -- batching, select, cache --------------------------------------------------------------------

def test_sentence_alone_equals_inside_a_ragged_batch(rng):
    _, engine = _pair(seed=1, norm_first=True)
    sources = _sources(rng, [6, 1, 9, 3])
    targets = rng.integers(0, TGT_VOCAB, (4, 5))
    targets[:, 0] = engine.bos_id
    batched, _ = _teacher_forced(engine, sources, targets)
    greedy = _greedy(engine, sources, 10)
    for b, source in enumerate(sources):
        alone, _ = _teacher_forced(engine, [source], targets[b: b + 1])
        np.testing.assert_allclose(batched[b], alone[0], rtol=0, atol=1e-5)
        assert _greedy(engine, [source], 10) == [greedy[b]]


ROWS_INDEPENDENT = rows_independent()


def _same(a, b):
    if ROWS_INDEPENDENT:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_sentence_s_attention_map_is_the_same_alone_and_in_any_batch(rng):
    # the map's weights took their scores' product over the batch's padded width (BLAS rounds
    # by the problem's shape): 7.5e-9 apart padded to 16, 20 or 70, while tokens and log-probs
    # were the same bits
    _, engine = _pair(seed=6, d_model=128, num_heads=2, max_positions=96)
    short = _sources(rng, [13], SRC_VOCAB)[0]
    alone = engine.generate([short], max_length=6, return_attention=True)[0]
    for width in (14, 16, 20, 70):
        inside = engine.generate([_sources(rng, [width], SRC_VOCAB)[0], short], max_length=6,
                                 return_attention=True)[1]
        assert inside.tokens == alone.tokens
        _same(inside.attention[0], alone.attention[0])   # (exact where rows are independent)


@pytest.mark.parametrize("kind, norm_first", [("encoder_decoder", True),
                                              ("encoder_decoder", False),
                                              ("decoder_only", True), ("encoder_only", False)])
def test_a_sentence_gives_the_same_bits_alone_and_in_any_batch(rng, kind, norm_first):
    # a 3-token sentence alone runs 3-row products and 3-query attention (split-KV in the
    # public attention); padded to 40 in a batch of 9 (360 rows, past the panel kernel's 256)
    # or of 2 (80 rows) it runs other kernels' shapes and must give the very same numbers
    _, engine = _pair(seed=5, kind=kind, norm_first=norm_first, max_positions=48,
                      num_classes=3 if kind == "encoder_only" else 0)
    vocab = TGT_VOCAB if kind == "decoder_only" else SRC_VOCAB
    short = _sources(rng, [3], vocab)[0]
    batches = [[short], [short] + _sources(rng, [40], vocab),
               _sources(rng, [40, 7, 1], vocab) + [short] + _sources(rng, [12, 40, 2, 30, 5], vocab)]
    results = []
    for batch in batches:
        row = next(i for i, s in enumerate(batch) if s is short)
        if kind == "encoder_only":
            results.append((engine.encode(batch)[row], engine.classify(batch)[row]))
            continue
        state = engine._start(batch)
        steps = [engine._step(state, None)[0]] if kind == "decoder_only" else []
        for token in (engine.bos_id, 5, 7)[1 if kind == "decoder_only" else 0:]:
            steps.append(engine._step(state, np.full(len(batch), token))[0])
        results.append((np.stack(steps)[:, row],) +
                       ((engine.encode(batch)[row],) if kind == "encoder_decoder" else ()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            _same(a, b)
    if kind == "encoder_only":
        # the classifier head over 40 documents (past the 16-row small product: its dense
        # product changed kernels, and the last bit of the scores changed with the batch size)
        many = _sources(rng, [int(n) for n in rng.integers(1, 12, 40)], vocab)
        together = engine.classify(many)
        for row in (0, 17, 39):
            _same(together[row], engine.classify([many[row]])[0])


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only", "encoder_only"])
def test_a_ragged_batch_runs_in_length_groups(rng, kind, monkeypatch):
    # one 40-token source among short ones no longer pads them all to 40: the encoder (or the
    # prompt's prefill) runs each length group padded to its own longest, with the bits of
    # one padded batch (and of each sentence alone)
    _, engine = _pair(seed=6, kind=kind, max_positions=48,
                      num_classes=3 if kind == "encoder_only" else 0)
    vocab = TGT_VOCAB if kind == "decoder_only" else SRC_VOCAB
    batch = _sources(rng, [3, 40, 2, 4, 3, 39, 1, 4, 2, 3], vocab)
    padded = []
    plain_pad = engine._pad
    monkeypatch.setattr(engine, "_pad", lambda sequences: padded.append(
        plain_pad(sequences)[0].shape) or plain_pad(sequences))
    if kind == "encoder_only":
        outputs, logits = engine.encode(batch), engine.classify(batch)
        for row, source in enumerate(batch):
            _same(outputs[row], engine.encode([source])[0])
            _same(logits[row], engine.classify([source])[0])
    else:
        state = engine._start(batch)
        steps = [engine._step(state, None)[0]] if kind == "decoder_only" else []
        steps.append(engine._step(state, np.full(len(batch), 5))[0])
        padded_in_batch = list(padded)
        for row, source in enumerate(batch):
            alone = engine._start([source])
            alone_steps = [engine._step(alone, None)[0]] if kind == "decoder_only" else []
            alone_steps.append(engine._step(alone, np.array([5]))[0])
            _same(np.stack(steps)[:, row], np.stack(alone_steps)[:, 0])
        padded = padded_in_batch
    assert padded[:2] == [(2, 40), (8, 4)]    # 112 padded rows, not 10 x 40


def test_select_takes_rows_of_any_layout(rng):
    # a strided or broadcast rows array (the compiled gather reads a flat int64 one)
    _, engine = _pair(seed=2)
    state = engine._start(_sources(rng, [4, 2, 5, 3], SRC_VOCAB))
    engine._step(state, np.full(4, engine.bos_id))
    strided = state.select(np.arange(4)[::2])
    broadcast = state.select(np.broadcast_to(np.int64(1), (3,)))
    dense = state.select(np.array([0, 2]))
    for a, b in zip(strided.self_k, dense.self_k):
        np.testing.assert_array_equal(a[:, :, :1], b[:, :, :1])
    assert broadcast.batch_size == 3


def test_an_encoder_only_model_without_classes_still_encodes(rng):
    _, engine = _pair(kind="encoder_only", num_classes=1)
    config = dict(engine.config, num_classes=0)
    weights = dict(engine.weights, **{"classifier.weight": np.zeros((0, engine.d_model),
                                                                    np.float32),
                                      "classifier.bias": np.zeros(0, np.float32)})
    without = Transformer(config, weights)
    sources = _sources(rng, [3, 5], SRC_VOCAB)
    for a, b in zip(without.encode(sources), engine.encode(sources)):
        np.testing.assert_array_equal(a, b)


def test_decoder_only_prompt_alone_equals_inside_a_ragged_batch(rng):
    # rows of a ragged batch sit at different positions (the cache is written per row); alone,
    # a row decodes in lockstep: both must give the same numbers and tokens
    _, engine = _pair(seed=11, kind="decoder_only", norm_first=True)
    prompts = _sources(rng, [2, 9, 5], vocab=TGT_VOCAB)
    steps = rng.integers(0, TGT_VOCAB, (3, 4))
    state = engine._start(prompts)
    batched = [engine._step(state, None)[0]] + [engine._step(state, steps[:, t])[0] for t in range(4)]
    batched = np.stack(batched, 1)
    beam = engine.generate(prompts, max_length=8, beam_size=3, num_hypotheses=2)
    for b, prompt in enumerate(prompts):
        alone_state = engine._start([prompt])
        alone = [engine._step(alone_state, None)[0]]
        alone += [engine._step(alone_state, steps[b: b + 1, t])[0] for t in range(4)]
        np.testing.assert_allclose(batched[b], np.concatenate(alone), rtol=0, atol=1e-5)
        assert engine.generate([prompt], max_length=8, beam_size=3, num_hypotheses=2)[0].hypotheses \
            == beam[b].hypotheses


def test_select_for_beams_equals_a_fresh_repeated_batch(rng):
    _, engine = _pair(seed=2)
    sources = _sources(rng, [4, 7])
    state = engine._start(sources)
    engine._step(state, np.full(2, engine.bos_id))
    engine._step(state, np.array([5, 6]))
    beams = state.select(np.array([0, 0, 0, 1, 1, 1]))
    # the reference: the repeated sources decoded from scratch with the same prefixes
    fresh = engine._start([sources[0]] * 3 + [sources[1]] * 3)
    engine._step(fresh, np.full(6, engine.bos_id))
    engine._step(fresh, np.array([5, 5, 5, 6, 6, 6]))
    step = np.array([7, 8, 9, 10, 11, 12])
    got, got_attention = engine._step(beams, step)
    expected, expected_attention = engine._step(fresh, step)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_attention, expected_attention, rtol=0, atol=1e-6)
    # reordering beams within their sources shares the cross-attention K/V (no copy)
    reordered = beams.select(np.array([2, 0, 0, 5, 3, 4]))
    assert reordered.cross_k[0] is beams.cross_k[0] and reordered.cross_v[1] is beams.cross_v[1]
    assert reordered.self_k[0] is not beams.self_k[0]
    np.testing.assert_array_equal(reordered.lengths, [3] * 6)


def test_select_drops_finished_rows(rng):
    _, engine = _pair(seed=2)
    sources = _sources(rng, [4, 7, 2])
    state = engine._start(sources)
    engine._step(state, np.full(3, engine.bos_id))
    kept = state.select(np.array([2, 0]))
    assert isinstance(kept, TransformerDecoderState) and kept is not state
    assert kept.batch_size == 2 and kept.cross_k[0].shape[0] == 2
    np.testing.assert_array_equal(kept.src_lengths, [2, 4])
    got, attention = engine._step(kept, np.array([5, 6]))
    alone0, _ = _teacher_forced(engine, [sources[2]], np.array([[engine.bos_id, 5]]))
    alone1, _ = _teacher_forced(engine, [sources[0]], np.array([[engine.bos_id, 6]]))
    np.testing.assert_allclose(got, np.stack([alone0[0, 1], alone1[0, 1]]), rtol=0, atol=1e-5)
    assert attention.shape == (2, engine.num_heads, 7)
    assert not attention[0, :, 2:].any() and not attention[1, :, 4:].any()


def test_kv_cache_is_written_in_place_and_grows_by_doubling(rng):
    _, engine = _pair(kind="decoder_only", max_positions=40)
    prompts = _sources(rng, [2, 5], vocab=TGT_VOCAB)
    small = engine._start(prompts, max_length=1)     # capacity 6: must grow while decoding
    large = engine._start(prompts, max_length=30)
    assert small.capacity == 6 and large.capacity == 35
    cache = large.self_k[0]
    steps = rng.integers(0, TGT_VOCAB, (2, 20))
    capacities = []
    a, _ = engine._step(small, None)
    b, _ = engine._step(large, None)
    for t in range(20):
        a, _ = engine._step(small, steps[:, t])
        b, _ = engine._step(large, steps[:, t])
        capacities.append(small.capacity)
        np.testing.assert_array_equal(a, b)  # capacity never changes the numbers
    assert large.self_k[0] is cache, "the cache must be written in place, not reallocated"
    assert sorted(set(capacities)) == [6, 12, 24, 40][: len(set(capacities))]
    np.testing.assert_array_equal(large.lengths, [22, 25])


def test_results_do_not_depend_on_thread_count(rng):
    _, engine = _pair(seed=4, norm_first=True, d_model=32, dim_feedforward=64)
    sources = _sources(rng, [12, 3, 20, 7])
    targets = rng.integers(0, TGT_VOCAB, (4, 6))
    with attncore.num_threads(1):
        one, one_attention = _teacher_forced(engine, sources, targets)
        one_memory = engine.encode(sources)
    with attncore.num_threads(2):
        two, two_attention = _teacher_forced(engine, sources, targets)
        two_memory = engine.encode(sources)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one_attention, two_attention)
    for a, b in zip(one_memory, two_memory):
        np.testing.assert_array_equal(a, b)


def test_concurrent_python_threads_equal_sequential_runs(rng):
    _, engine = _pair(seed=6)
    jobs = []
    for _ in range(6):
        sources = _sources(rng, list(rng.integers(1, 10, 3)))
        targets = rng.integers(0, TGT_VOCAB, (3, 5))
        jobs.append((sources, targets))
    sequential = [_teacher_forced(engine, *job)[0] for job in jobs]
    results = [None] * len(jobs)

    def run(i):
        for _ in range(3):
            results[i] = _teacher_forced(engine, *jobs[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, expected in zip(results, sequential):
        np.testing.assert_array_equal(got, expected)


# -- loading ------------------------------------------------------------------------------------

def test_save_load_round_trip_and_unfused_weights_are_fused(tmp_path, rng):
    trainer, engine = _pair(fused_qkv=False)
    assert engine.decoder_layers[0].self_attn.qkv_weight.shape == (48, 16)
    path = engine.save(tmp_path / "model")
    loaded = load(path)
    assert isinstance(loaded, Transformer)
    sources = _sources(rng, [3, 5])
    targets = np.array([[1, 4, 5], [1, 6, 7]])
    np.testing.assert_array_equal(_teacher_forced(loaded, sources, targets)[0],
                                  _teacher_forced(engine, sources, targets)[0])


def test_from_config_uses_the_trainer_initialisation(rng):
    config = _config(norm_first=True).to_dict()
    engine = Transformer.from_config(config, seed=7)
    trainer = Trainer(_config(norm_first=True), seed=7)
    np.testing.assert_array_equal(engine.weights["output.weight"],
                                  trainer.state_dict()["output.weight"].astype(np.float32))


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sources, error, message", [
    ([], ValueError, "sources is an empty batch"),
    ([np.array([4, 5]), np.array([], dtype=np.int64)], ValueError, r"sources\[1\] is empty"),
    ([np.array([4, SRC_VOCAB])], ValueError, r"sources\[0\] has token id 11 outside \[0, 11\)"),
    ([np.array([-1, 4])], ValueError, r"token id -1"),
    ([np.arange(25) % 5 + 4], ValueError, r"sources\[0\] has 25 tokens, longer than the position table \(24\)"),
    ([np.array([4.0, 5.0])], TypeError, r"sources\[0\] must hold integer token ids"),
    ([np.array([[4, 5]])], ValueError, r"sources\[0\] must be 1-d"),
    ([[4, [5, 6]]], TypeError, r"sources\[0\] must be a flat sequence"),   # NumPy's message
])
def test_bad_sources_raise_naming_the_argument(sources, error, message):
    _, engine = _pair()
    with pytest.raises(error, match=message):
        engine._start(sources)


@pytest.mark.parametrize("key, value", [("activation", "swish"), ("pooling", "max"), ("kind", "decoder")])
def test_bad_config_values_raise_naming_the_key(key, value):
    trainer, _ = _pair(kind="encoder_only", num_classes=2)
    config = dict(trainer.config.to_dict(), **{key: value})
    with pytest.raises(ValueError, match=key):
        Transformer(config, trainer.state_dict())


def test_bad_steps_and_wrong_kind_raise():
    _, engine = _pair(max_positions=3)
    state = engine._start([np.array([4, 5])])
    with pytest.raises(ValueError, match=r"tokens must have shape \(1,\)"):
        engine._step(state, np.array([1, 1]))
    with pytest.raises(ValueError, match=r"tokens has an id outside \[0, 13\)"):
        engine._step(state, np.array([TGT_VOCAB]))
    with pytest.raises(TypeError, match="tokens must be integer ids"):
        engine._step(state, np.array([1.0]))
    with pytest.raises(ValueError, match="tokens=None"):
        engine._step(state, None)
    for token in (1, 4, 5):
        engine._step(state, np.array([token]))
    with pytest.raises(ValueError, match="max_length: decoding past position 2 .*max_positions=3"):
        engine._step(state, np.array([6]))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 1\), got 1"):
        state.select(np.array([0, 1]))
    with pytest.raises(ValueError, match="rows must be a 1-d integer array"):
        state.select(np.array([0.0]))
    with pytest.raises(ValueError, match="classify needs an encoder_only"):
        engine.classify([np.array([4])])
    _, decoder_only = _pair(kind="decoder_only")
    with pytest.raises(ValueError, match="decoder_only Transformer has no encoder"):
        decoder_only.encode([np.array([4])])
    _, encoder_only = _pair(kind="encoder_only", num_classes=2)
    with pytest.raises(ValueError, match="encoder_only Transformer does not decode"):
        encoder_only._start([np.array([4])])
    with pytest.raises(ValueError, match=r"tokens_list\[0\] has token id 11"):
        encoder_only.classify([np.array([SRC_VOCAB])])


# -- torch.nn.Transformer on identical weights ----------------------------------------------------

def _torch_reference(torch, trainer, norm_first, activation):
    reference = torch.nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                     dim_feedforward=24, dropout=0.0, activation=activation,
                                     batch_first=True, norm_first=norm_first).double().eval()
    weights = {k: torch.tensor(v) for k, v in trainer.state_dict().items()}
    reference.load_state_dict({k: v for k, v in weights.items() if k.startswith(("encoder.", "decoder."))})
    return reference, weights


def _torch_embed(torch, ids, table, d_model=16):
    """Vaswani input sqrt(d) * E[ids] + sinusoid, written out independently of attncore."""
    positions = np.arange(ids.shape[1])[:, None] / 10000 ** (2 * (np.arange(d_model) // 2) / d_model)
    sinusoid = np.where(np.arange(d_model) % 2 == 0, np.sin(positions), np.cos(positions))
    return table[torch.tensor(ids)] * d_model ** 0.5 + torch.tensor(sinusoid)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch nested-tensor notices
@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_matches_torch_nn_transformer(norm_first, activation, rng):
    torch = pytest.importorskip("torch")
    # torch.nn.Transformer always has the final encoder/decoder norms
    trainer, engine = _pair(seed=8, norm_first=norm_first, activation=activation, final_norm=True)
    reference, w = _torch_reference(torch, trainer, norm_first, activation)
    sources = _sources(rng, [5, 2, 7])
    padded = np.zeros((3, 7), dtype=np.int64)
    for b, source in enumerate(sources):
        padded[b, : len(source)] = source
    pad = torch.tensor(np.arange(7)[None] >= np.array([len(s) for s in sources])[:, None])
    with torch.no_grad():
        memory = reference.encoder(_torch_embed(torch, padded, w["src_embedding.weight"]),
                                   src_key_padding_mask=pad)
    for b, output in enumerate(engine.encode(sources)):
        np.testing.assert_allclose(output, memory[b, : len(sources[b])].numpy(), atol=HIDDEN_ATOL)

    def torch_log_probs(prefix):
        with torch.no_grad():
            hidden = reference.decoder(
                _torch_embed(torch, prefix, w["tgt_embedding.weight"]), memory,
                tgt_mask=reference.generate_square_subsequent_mask(prefix.shape[1], dtype=torch.float64),
                memory_key_padding_mask=pad, tgt_is_causal=True)
            logits = hidden @ w["output.weight"].T + w["output.bias"]
        return torch.log_softmax(logits, -1).numpy()

    targets = rng.integers(0, TGT_VOCAB, (3, 6))
    targets[:, 0] = engine.bos_id
    np.testing.assert_allclose(_teacher_forced(engine, sources, targets)[0], torch_log_probs(targets),
                               **LOGPROB_TOL)
    # greedy: torch recomputes the whole prefix each step
    prefix = np.full((3, 1), engine.bos_id)
    for _ in range(8):
        prefix = np.concatenate([prefix, torch_log_probs(prefix)[:, -1].argmax(-1)[:, None]], 1)
    expected = [_strip(row, engine.eos_id) for row in prefix[:, 1:].tolist()]
    assert _greedy(engine, sources, 8) == expected


def test_decoder_only_matches_torch_causal_encoder_stack(rng):
    torch = pytest.importorskip("torch")
    trainer, engine = _pair(seed=9, kind="decoder_only", norm_first=True, final_norm=True,
                            positions="learned", scale_embedding=False, tie_embeddings=True)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=True)
    stack = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(16), enable_nested_tensor=False)
    stack = stack.double().eval()
    w = {k: torch.tensor(v) for k, v in trainer.state_dict().items()}
    stack.load_state_dict({"layers" + k[len("decoder.layers"):] if k.startswith("decoder.layers") else k[8:]: v
                           for k, v in w.items() if k.startswith("decoder.")})
    tokens = rng.integers(4, TGT_VOCAB, (2, 7))
    with torch.no_grad():
        x = w["tgt_embedding.weight"][torch.tensor(tokens)] + w["tgt_position.weight"][:7]
        hidden = stack(x, mask=torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64),
                       is_causal=True)
        expected = torch.log_softmax(hidden @ w["tgt_embedding.weight"].T + w["output.bias"], -1).numpy()
    state = engine._start([tokens[0, :3], tokens[1, :5]])  # ragged prompts, then the rest step by step
    got0 = [engine._step(state, None)[0]]
    batch_steps = np.stack([tokens[0, 3:5], tokens[1, 5:7]])
    for t in range(2):
        got0.append(engine._step(state, batch_steps[:, t])[0])
    got = np.stack(got0, 1)
    np.testing.assert_allclose(got[0], expected[0, 2:5], **LOGPROB_TOL)
    np.testing.assert_allclose(got[1], expected[1, 4:7], **LOGPROB_TOL)


# -- generate (attncore.generation over this model) ---------------------------------------------

def test_generate_greedy_and_beam_size_one_match_trainer_greedy(rng):
    trainer, engine = _pair(seed=3, norm_first=True)
    sources = _sources(rng, [4, 8, 2, 6, 3])
    padded = np.zeros((5, 8), dtype=np.int64)
    for b, source in enumerate(sources):
        padded[b, : len(source)] = source
    expected = trainer.greedy_decode(padded, np.array([len(s) for s in sources]), 12)
    expected = [[t for t in _strip(row, engine.eos_id) if t != engine.eos_id]
                for row in expected.tolist()]
    results = engine.generate(sources, max_length=12, return_attention=True)
    assert [r.tokens for r in results] == expected
    for result, source in zip(results, sources):
        n = len(result.tokens) + (len(result.tokens) < 12)  # EOS scored when generated
        assert result.attention[0].shape == (n, len(source))
        np.testing.assert_allclose(result.attention[0].sum(-1), 1.0, rtol=1e-5)
    beam_one = engine.generate(sources, max_length=12, beam_size=1)
    assert [r.tokens for r in beam_one] == expected


def test_generate_beam_search_alone_equals_in_batch(rng):
    _, engine = _pair(seed=10)
    sources = _sources(rng, [5, 1, 8])
    batched = engine.generate(sources, max_length=10, beam_size=4, num_hypotheses=3)
    for source, result in zip(sources, batched):
        alone = engine.generate([source], max_length=10, beam_size=4, num_hypotheses=3)[0]
        assert alone.hypotheses == result.hypotheses
        np.testing.assert_allclose(alone.scores, result.scores, rtol=0, atol=1e-5)
    # the beam's best is at least as likely as greedy (length_penalty=0: plain log-prob sums)
    greedy = engine.generate(sources, max_length=10, length_penalty=0.0)
    beam = engine.generate(sources, max_length=10, beam_size=4, length_penalty=0.0)
    for g, b in zip(greedy, beam):
        assert b.score >= g.score - 1e-6


def test_decoder_only_generate_matches_trainer_generate(rng):
    trainer, engine = _pair(seed=5, kind="decoder_only", norm_first=True)
    prompts = rng.integers(4, TGT_VOCAB, (3, 4))
    prompts[:, 0] = engine.bos_id
    expected = trainer.generate(prompts, 10)
    expected = [[t for t in _strip(row, engine.eos_id) if t != engine.eos_id]
                for row in expected.tolist()]
    results = engine.generate(list(prompts), max_length=10)
    assert [r.tokens for r in results] == expected
    beams = engine.generate([prompts[0], prompts[1][:2]], max_length=6, beam_size=3)
    assert all(len(r.hypotheses) == 1 and len(r.tokens) <= 6 for r in beams)
    with pytest.raises(ValueError, match="return_attention"):
        engine.generate(list(prompts), max_length=3, return_attention=True)


def test_generate_refuses_what_the_position_table_cannot_hold():
    _, engine = _pair(max_positions=8)
    with pytest.raises(ValueError, match=r"max_length: max_length is 9, .*max_positions=8"):
        engine.generate([np.array([4, 5])], max_length=9)
    assert len(engine.generate([np.array([4, 5])], max_length=8)[0].tokens) <= 8
    _, decoder_only = _pair(kind="decoder_only", max_positions=8)
    with pytest.raises(ValueError, match=r"longest prompt plus max_length - 1 is 9"):
        decoder_only.generate([np.array([4, 5, 6])], max_length=7)
    decoder_only.generate([np.array([4, 5, 6])], max_length=6)   # positions 0..7: fits
    _, encoder_only = _pair(kind="encoder_only", num_classes=2)
    with pytest.raises(ValueError, match="encoder_only Transformer has none"):
        encoder_only.generate([np.array([4])], max_length=3)
    with pytest.raises(ValueError, match="beam_size"):
        engine.generate([np.array([4])], max_length=3, beam_size=0)


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only"])
def test_default_lengths_stay_within_the_position_table(rng, kind):
    # no max_length: 2 x length + 10 per source, capped by the positions (a 7-token source of a
    # 16-position model asked for 24 and was refused); each source runs with its own limit
    _, engine = _pair(seed=4, kind=kind, max_positions=16)
    vocab = TGT_VOCAB if kind == "decoder_only" else SRC_VOCAB
    sources = _sources(rng, [7, 2, 12], vocab)
    cap = [16 - (len(s) - 1 if kind == "decoder_only" else 0) for s in sources]
    assert [engine.default_max_length(len(s)) for s in sources] == \
        [min(2 * len(s) + 10, c) for s, c in zip(sources, cap)]
    results = engine.generate_default_lengths(sources)
    for source, result in zip(sources, results):
        alone = engine.generate([source], max_length=engine.default_max_length(len(source)))[0]
        assert result.hypotheses == alone.hypotheses


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only"])
def test_a_min_length_past_the_position_table_is_min_lengths_error(rng, kind):
    # the floor became each source's max_length, and the error blamed max_length
    _, engine = _pair(seed=4, kind=kind, max_positions=16)
    vocab = TGT_VOCAB if kind == "decoder_only" else SRC_VOCAB
    sources = _sources(rng, [2, 7], vocab)
    cap = engine.longest_generation(7)
    assert cap == (16 - 6 if kind == "decoder_only" else 16)
    results = engine.generate_default_lengths(sources, min_length=cap)   # at the cap: fine
    assert all(len(r.tokens) >= cap for r in results)
    first = 1 if kind == "decoder_only" else 0   # (the first source the floor does not fit)
    with pytest.raises(ValueError, match=rf"min_length is {cap + 1}, more tokens than "
                                         rf"sources\[{first}\] can have \(at most {cap}"):
        engine.generate_default_lengths(sources, min_length=cap + 1)


def test_errors_of_a_source_in_a_later_length_group_name_its_own_index(rng):
    # sources run in groups of equal default limits; the error gave the index in the group
    _, engine = _pair(seed=4)
    good, bad = np.array([4, 5]), np.array([4, 5, 6, 7, SRC_VOCAB])
    with pytest.raises(ValueError, match=rf"^sources\[2\] has token id {SRC_VOCAB} outside"):
        engine.generate_default_lengths([good, good, bad])
    with pytest.raises(ValueError, match=r"^sources\[1\] is empty"):
        engine.generate_default_lengths([good, []])


def test_translate_names_a_text_past_the_position_table_by_its_index():
    # generate's "sources[0] ..." of a length group became the text's own index and name
    # (12 characters and the source EOS: 13 tokens)
    from attncore import models
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer
    config = dict(_config(src_vocab_size=10, tgt_vocab_size=10, max_positions=8,
                          dtype="float32").to_dict(), architecture="transformer")
    model = models.from_config(config, seed=3, tokenizer=Tokenizer(Vocab("abcdef"), Vocab("abcdef")))
    with pytest.raises(ValueError, match=r"^texts\[1\] has 13 tokens, longer than the position"):
        model.translate(["ab", "abcdefabcdef"])
    with pytest.raises(ValueError, match=r"^texts\[1\] has 13 tokens, longer than the position"):
        model.translate(["ab", "abcdefabcdef"], max_length=4)


def test_a_decoder_only_models_translate_writes_what_follows_each_prompt():
    # (as `attncore generate` does: decoded alone, a BPE continuation lost its word start)
    pytest.importorskip("tokenizers")
    from attncore import models
    from attncore.data.bpe import BPEVocab
    from attncore.tokenizer import Tokenizer
    from attncore.train.transformer import TransformerConfig
    vocab = BPEVocab.train(["and god said unto moses, let there be light."] * 30, vocab_size=60)
    config = TransformerConfig(kind="decoder_only", src_vocab_size=len(vocab),
                               tgt_vocab_size=len(vocab), d_model=16, num_heads=2,
                               dim_feedforward=24, num_encoder_layers=0, num_decoder_layers=1,
                               max_positions=64).to_dict()
    prompts = ["and god", "and god sa"]
    for tokenizer in (Tokenizer(src=vocab), Tokenizer(vocab, vocab)):   # plain LM; pairs LM
        model = models.from_config(config, seed=2, tokenizer=tokenizer)
        texts = model.translate(prompts, max_length=6, min_length=6)
        ids = [tokenizer.encode_source(p) for p in prompts]
        results = model.generate(ids, max_length=6, min_length=6)
        assert texts == [tokenizer.decode_continuation(i.tolist(), r.tokens)
                         for i, r in zip(ids, results)]
        if tokenizer.tgt is None:   # (a continuation that starts a word shows its space)
            starts = [vocab.id_to_token(r.tokens[0]).startswith("▁") for r in results]
            assert any(starts)
            assert [t.startswith(" ") for t in texts] == starts


def test_select_that_swaps_sources_takes_their_cross_attention_along(rng):
    # a permutation across sources keeps the batch size: the cross K/V (and source lengths)
    # must follow the rows, not be shared as for beams reordered within a source
    _, engine = _pair(seed=2)
    sources = _sources(rng, [4, 7])
    state = engine._start(sources)
    engine._step(state, np.full(2, engine.bos_id))
    swapped = state.select(np.array([1, 0]))
    fresh = engine._start(sources[::-1])
    engine._step(fresh, np.full(2, engine.bos_id))
    step = np.array([5, 6])
    got, got_attention = engine._step(swapped, step)
    expected, expected_attention = engine._step(fresh, step)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_attention, expected_attention, rtol=0, atol=1e-6)
