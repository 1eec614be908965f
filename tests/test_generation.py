# SPDX-License-Identifier: Apache-2.0
"""attncore.generation on a tiny fake model whose every sequence can be enumerated.

The fake model's next-token log-probabilities are a fixed pseudo-random function of (source,
prefix), so brute force over all sequences gives the exact best hypotheses to compare with.
"""
import itertools
import zlib

import numpy as np
import pytest

from attncore import generation
from conftest import rows_independent
from attncore.models.base import check_generation_options, check_sources, length_groups

V, BOS, EOS, HEADS = 5, 1, 2, 2


def _log_probs(source, prefix):
    """float32 (V,) log-softmax of pseudo-random logits seeded by (source, prefix)."""
    key = zlib.crc32(np.asarray(list(source) + [-1] + list(prefix), dtype=np.int64).tobytes())
    logits = np.random.default_rng(key).normal(0.0, 1.5, V)
    logits = logits - logits.max()
    return (logits - np.log(np.exp(logits).sum())).astype(np.float32)


def _attention(source, prefix):
    """(HEADS, len(source)) rows that sum to 1, a function of (source, prefix)."""
    key = zlib.crc32(np.asarray(list(source) + [-2] + list(prefix), dtype=np.int64).tobytes())
    w = np.random.default_rng(key).random((HEADS, len(source))).astype(np.float32) + 0.1
    return w / w.sum(axis=1, keepdims=True)


class FakeState:
    def __init__(self, sources, prefixes):
        self.sources, self.prefixes = sources, prefixes

    @property
    def batch_size(self):
        return len(self.sources)

    def select(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        state = FakeState([self.sources[r] for r in rows], [list(self.prefixes[r]) for r in rows])
        state.started = self.started
        return state


class FakeModel:
    """The decoder protocol of docs/ENGINE.md; counts steps and rows for the tests."""

    def __init__(self):
        self.rows_per_step = []

    def _start(self, sources):
        state = FakeState([tuple(int(t) for t in s) for s in sources], [[] for _ in sources])
        state.started = False
        return state

    def _step(self, state, tokens):
        assert tokens.dtype == np.int64 and tokens.shape == (state.batch_size,)
        self.rows_per_step.append(state.batch_size)
        width = max(len(s) for s in state.sources)
        log_probs = np.empty((state.batch_size, V), dtype=np.float32)
        attention = np.zeros((state.batch_size, HEADS, width), dtype=np.float32)
        first = not state.started
        state.started = True
        for row, (source, prefix, token) in enumerate(zip(state.sources, state.prefixes, tokens)):
            if first:
                assert token == BOS
            else:
                prefix.append(int(token))
            log_probs[row] = _log_probs(source, prefix)
            attention[row, :, :len(source)] = _attention(source, prefix)
        return log_probs, attention


def _sequence_log_prob(source, tokens, ended):
    total, prefix = 0.0, []
    for token in tokens + ([EOS] if ended else []):
        total += float(_log_probs(source, prefix)[token])
        prefix.append(token)
    return total


def _brute_force(source, max_length, length_penalty=0.0, min_length=0):
    """Every complete hypothesis: (score, log_prob, tokens) sorted best first."""
    found = []
    for n in range(1, max_length + 1):
        for body in itertools.product([t for t in range(V) if t != EOS], repeat=n - 1):
            body = list(body)
            if n - 1 >= min_length:  # ends with EOS at position n
                lp = _sequence_log_prob(source, body, True)
                found.append((lp / n ** length_penalty, lp, body))
    for body in itertools.product([t for t in range(V) if t != EOS], repeat=max_length):
        lp = _sequence_log_prob(source, list(body), False)  # runs into max_length
        found.append((lp / max_length ** length_penalty, lp, list(body)))
    found.sort(key=lambda item: -item[0])
    return found


def _generate(sources, **options):
    base = dict(bos_id=BOS, eos_id=EOS, max_length=4)
    base.update(options)
    return generation.generate(FakeModel(), [np.asarray(s, dtype=np.int64) for s in sources],
                               **base)


SOURCES = [[3, 4, 0], [7], [1, 1, 2, 5, 9], [8, 8]]


# -- beam search against brute force ------------------------------------------------------------

@pytest.mark.parametrize("max_length", [1, 2, 3])
def test_exhaustive_beam_finds_the_brute_force_n_best(max_length):
    # beam_size >= every live prefix: the search is exhaustive, and with length_penalty=0
    # (log-probs only decrease) stopping early is exact.
    beam = (V - 1) ** max_length
    results = _generate(SOURCES, max_length=max_length, beam_size=beam, num_hypotheses=4,
                        length_penalty=0.0)
    for source, result in zip(SOURCES, results):
        expected = _brute_force(source, max_length)[:4]
        assert result.hypotheses == [tokens for _, _, tokens in expected]
        np.testing.assert_allclose(result.scores, [s for s, _, _ in expected], rtol=0, atol=1e-9)


def test_beam_search_finds_a_better_sequence_than_greedy_somewhere():
    # guards the test above against a fake model on which greedy is already optimal
    better = 0
    for source in [[i, j] for i in range(6) for j in range(6)]:
        greedy = _generate([source], length_penalty=0.0)[0]
        best = _brute_force(source, 4)[0]
        better += best[1] > greedy.log_probs[0] + 1e-9
    assert better > 0


def test_n_best_is_sorted_and_scores_are_penalised_sums_of_log_probs():
    for penalty in (0.0, 0.6, 1.0):
        for source, result in zip(SOURCES, _generate(SOURCES, beam_size=4, num_hypotheses=4,
                                                     length_penalty=penalty)):
            assert len(result.hypotheses) == 4
            assert result.scores == sorted(result.scores, reverse=True)
            assert result.tokens == result.hypotheses[0] and result.score == result.scores[0]
            for tokens, score, log_prob in zip(result.hypotheses, result.scores,
                                               result.log_probs):
                assert EOS not in tokens
                ended = len(tokens) < 4
                expected = _sequence_log_prob(source, tokens, ended)
                assert log_prob == pytest.approx(expected, abs=1e-9)
                n = len(tokens) + ended
                assert score == pytest.approx(log_prob / n ** penalty, abs=1e-12)



@pytest.mark.parametrize("options", [{}, {"beam_size": 3}, {"do_sample": True, "seed": 0},
                                     {"length_penalty": 0.0}])
def test_scores_and_log_probs_are_python_floats_for_every_search(options):
    # greedy's and sampling's were np.float64 (repr "np.float64(-1.2)"), beam search's floats
    for result in _generate(SOURCES, **options):
        assert all(type(x) is float for x in result.scores + result.log_probs), options

def test_hypotheses_are_distinct():
    for result in _generate(SOURCES, beam_size=6, num_hypotheses=6):
        assert len({tuple(h) for h in result.hypotheses}) == 6


@pytest.mark.parametrize("penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("min_length", [0, 2])
def test_beam_size_one_is_greedy(penalty, min_length):
    greedy = _generate(SOURCES, length_penalty=penalty, min_length=min_length)
    beam = generation.beam_search(FakeModel(), [np.asarray(s) for s in SOURCES], bos_id=BOS,
                                  eos_id=EOS, max_length=4, beam_size=1,
                                  length_penalty=penalty, min_length=min_length)
    assert [r.hypotheses for r in beam] == [r.hypotheses for r in greedy]
    np.testing.assert_allclose([r.log_probs for r in beam], [r.log_probs for r in greedy],
                               rtol=0, atol=1e-12)


def test_greedy_follows_the_argmax():
    for source, result in zip(SOURCES, _generate(SOURCES, max_length=6)):
        prefix = []
        while len(prefix) < 6:
            token = int(np.argmax(_log_probs(source, prefix)))
            if token == EOS:
                break
            prefix.append(token)
        assert result.tokens == prefix


@pytest.mark.parametrize("options", [dict(), dict(beam_size=3, num_hypotheses=2),
                                     dict(beam_size=5, length_penalty=1.0)])
def test_a_source_alone_equals_the_same_source_in_a_batch(options):
    batch = _generate(SOURCES, **options)
    for i, source in enumerate(SOURCES):
        alone = _generate([source], **options)[0]
        assert alone.hypotheses == batch[i].hypotheses
        assert alone.scores == batch[i].scores


def test_finished_rows_leave_the_batch():
    model = FakeModel()
    results = generation.generate(model, [np.asarray(s) for s in SOURCES], bos_id=BOS,
                                  eos_id=EOS, max_length=8)
    lengths = [len(r.tokens) + (len(r.tokens) < 8) for r in results]
    # step t runs exactly the sources still unfinished
    assert model.rows_per_step == [sum(n > t for n in lengths) for t in range(max(lengths))]


# -- length limits -----------------------------------------------------------------------------

def test_min_length_forbids_early_eos():
    for min_length in (1, 3):
        for result in _generate(SOURCES, max_length=5, min_length=min_length, beam_size=3,
                                num_hypotheses=3):
            assert all(len(h) >= min_length for h in result.hypotheses)
        best = _brute_force(SOURCES[0], 4, min_length=min_length)[0]
        exhaustive = _generate([SOURCES[0]], min_length=min_length, beam_size=64,
                               length_penalty=0.0)[0]
        assert exhaustive.tokens == best[2]


# -- no_repeat_ngram_size ------------------------------------------------------------------------

def _repeats_an_ngram(sequence, size, first=0):
    """Whether an n-gram of ``size`` tokens ending at index ``first`` or later occurs earlier
    in ``sequence``."""
    sequence = [int(t) for t in sequence]
    for end in range(max(first, size - 1), len(sequence)):
        gram = sequence[end - size + 1:end + 1]
        if any(sequence[i:i + size] == gram for i in range(end - size + 1)):
            return True
    return False


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_beam_finds_the_brute_force_n_best_without_repeats(size):
    # exhaustive beam: the n-best of the sequences whose decoder sequence (BOS, then the
    # generated tokens; a final EOS is never forbidden) repeats no n-gram of `size` tokens
    max_length = 4
    results = _generate(SOURCES, max_length=max_length, beam_size=(V - 1) ** max_length,
                        num_hypotheses=4, length_penalty=0.0, no_repeat_ngram_size=size)
    for source, result in zip(SOURCES, results):
        allowed = [item for item in _brute_force(source, max_length)
                   if not _repeats_an_ngram([BOS] + item[2], size)]
        assert result.hypotheses == [tokens for _, _, tokens in allowed[:4]]
        np.testing.assert_allclose(result.scores, [s for s, _, _ in allowed[:4]], rtol=0,
                                   atol=1e-9)
    # and the constraint bites: without it some source's n-best holds a repeat (of 2-grams
    # and shorter; a repeated 3-gram needs 5 tokens of a 5-token sequence, x y x y x)
    if size < 3:
        plain = _generate(SOURCES, max_length=max_length, beam_size=256, num_hypotheses=4,
                          length_penalty=0.0)
        assert any(_repeats_an_ngram([BOS] + h, size) for r in plain for h in r.hypotheses)


@pytest.mark.parametrize("size", [1, 2])
def test_no_repeat_ngram_greedy_takes_the_best_token_left(size):
    for source, result in zip(SOURCES, _generate(SOURCES, max_length=6, min_length=2,
                                                  no_repeat_ngram_size=size)):
        prefix = []
        while len(prefix) < 6:
            log_probs = _log_probs(source, prefix).astype(np.float64)
            if len(prefix) < 2:
                log_probs[EOS] = -np.inf
            for token in range(V):
                if token != EOS and _repeats_an_ngram([BOS] + prefix + [token], size):
                    log_probs[token] = -np.inf
            token = int(np.argmax(log_probs))
            if token == EOS:
                break
            prefix.append(token)
        assert result.tokens == prefix


@pytest.mark.parametrize("options", [dict(), dict(beam_size=3, num_hypotheses=2),
                                     dict(do_sample=True, seed=[4, 5, 6, 7])])
def test_no_repeat_ngram_alone_equals_in_a_batch(options):
    options = dict(options, max_length=6, no_repeat_ngram_size=2)
    batch = _generate(SOURCES, **options)
    for i, source in enumerate(SOURCES):
        alone = _generate([source], **dict(options, seed=[options["seed"][i]])
                          if "seed" in options else options)[0]
        assert alone.hypotheses == batch[i].hypotheses and alone.scores == batch[i].scores
        assert not any(_repeats_an_ngram([BOS] + h, 2) for h in alone.hypotheses)


def test_no_repeat_ngram_dead_end_names_the_caller_s_source(streaming_models):
    # the message starts with the source, so a caller running sub-batches (translate's
    # length groups) names its own index; a stream names "source" (both said sources[0])
    from attncore.models.base import generate_with_default_lengths
    model = streaming_models["decoder_only"]
    prompts = [np.array([5]), np.arange(3, 13)]           # limits 21 / 30: two sub-batches
    with pytest.raises(ValueError, match=r"^prompts\[1\]: no_repeat_ngram_size=1"):
        generate_with_default_lengths(model, prompts, name="prompts", min_length=20,
                                      no_repeat_ngram_size=1)
    with pytest.raises(ValueError, match=r"^source: no_repeat_ngram_size=1 forbids"):
        list(streaming_models["transformer"].generate_tokens(
            np.array([5, 6, 7]), max_length=45, min_length=31, no_repeat_ngram_size=1))


def test_no_repeat_ngram_with_every_token_used_and_eos_forbidden_is_an_error():
    # size 1 bans each generated token: V - 1 = 4 non-EOS tokens (BOS among them) last three
    # steps after BOS, and min_length forbids the EOS that would end the hypothesis
    for options in (dict(), dict(beam_size=2), dict(do_sample=True, seed=0)):
        with pytest.raises(ValueError, match=r"^sources\[0\]: no_repeat_ngram_size=1 forbids "
                                             r"every token but EOS at step 3"):
            _generate(SOURCES[:1], max_length=6, min_length=5, no_repeat_ngram_size=1,
                      **options)
    assert len(_generate(SOURCES[:1], max_length=6, min_length=3,
                         no_repeat_ngram_size=1)[0].tokens) == 3   # (EOS allowed in time)


def test_max_length_caps_the_output():
    for result in _generate(SOURCES, max_length=2, beam_size=3, num_hypotheses=3):
        assert all(len(h) <= 2 for h in result.hypotheses)
    for result in _generate(SOURCES, max_length=1):
        assert len(result.tokens) <= 1


# -- sampling ----------------------------------------------------------------------------------

def test_sampling_is_reproducible_with_a_seed():
    a = _generate(SOURCES * 3, do_sample=True, seed=7, max_length=6)
    b = _generate(SOURCES * 3, do_sample=True, seed=7, max_length=6)
    c = _generate(SOURCES * 3, do_sample=True, seed=8, max_length=6)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_each_source_samples_from_its_own_stream():
    """An int seed: a source's tokens depend on its index only, not on the other sources
    (what they are, when they end). One seed per source: the same tokens alone or in a batch."""
    batch = SOURCES * 3
    base = _generate(batch, do_sample=True, seed=7, max_length=6)
    others = [[9, 9, 9, 9]] + batch[1:-1] + [[5]]      # first and last sources replaced
    changed = _generate(others, do_sample=True, seed=7, max_length=6)
    assert [r.tokens for r in base[1:-1]] == [r.tokens for r in changed[1:-1]]
    # copies of a source at other indices draw other numbers (not one stream for all)
    n = len(SOURCES)
    assert any(base[i].tokens != base[i + n].tokens for i in range(2 * n))
    seeds = [11, 12, 13, 14]
    together = _generate(SOURCES, do_sample=True, seed=seeds, max_length=6)
    for source, seed, result in zip(SOURCES, seeds, together):
        alone = _generate([source], do_sample=True, seed=[seed], max_length=6)[0]
        assert alone.tokens == result.tokens and alone.scores == result.scores
    with pytest.raises(ValueError, match="seed has 2 entries for 4 sources"):
        _generate(SOURCES, do_sample=True, seed=[1, 2], max_length=6)


def test_sampling_a_real_model_alone_equals_in_a_batch():
    """Per-source seeds on an engine model (padding, finished rows leaving the batch), and
    translate-style per-length groups: an int seed gives a source its stream by its index
    in the call, whichever group it runs in."""
    import attncore
    from attncore.models.base import generate_with_default_lengths

    from attncore.train.transformer import TransformerConfig

    config = TransformerConfig(kind="encoder_decoder", src_vocab_size=40, tgt_vocab_size=40,
                               d_model=16, num_heads=2, dim_feedforward=32, num_encoder_layers=1,
                               num_decoder_layers=1, max_positions=64).to_dict()
    model = attncore.from_config(config, seed=1)
    rng = np.random.default_rng(0)
    sources = [rng.integers(4, 40, n).tolist() for n in (3, 9, 1, 6, 12)]
    seeds = [5, 6, 7, 8, 9]
    batch = model.generate(sources, max_length=8, do_sample=True, seed=seeds)
    for i, source in enumerate(sources):
        alone = model.generate([source], max_length=8, do_sample=True, seed=[seeds[i]])[0]
        assert alone.tokens == batch[i].tokens
        if rows_independent():   # the same bits (scalar builds: BLAS past 16 rows rounds by shape)
            assert alone.scores == batch[i].scores
        else:
            np.testing.assert_allclose(alone.scores, batch[i].scores, rtol=1e-6)
    grouped = generate_with_default_lengths(model, sources, do_sample=True, seed=3)
    for i, source in enumerate(sources):
        one = model.generate([source], max_length=model.default_max_length(len(source)),
                             do_sample=True,
                             seed=[np.random.SeedSequence(3, spawn_key=(i,))])[0]
        assert one.tokens == grouped[i].tokens


def test_degenerate_sampling_is_greedy():
    greedy = [r.tokens for r in _generate(SOURCES, max_length=6)]
    # (temperature 1e-320: every logit / T was -inf, the row NaN, and token 0 came out)
    for options in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4),
                    dict(temperature=1e-320)):
        sampled = _generate(SOURCES, do_sample=True, seed=0, max_length=6, **options)
        assert [r.tokens for r in sampled] == greedy, options


def _first_token_counts(n, **options):
    results = _generate([[3, 4, 0]] * n, do_sample=True, seed=123, max_length=1, **options)
    counts = np.zeros(V)
    for r in results:
        counts[r.tokens[0] if r.tokens else EOS] += 1
    return counts


def test_sampling_frequencies_match_the_distribution():
    n = 4000
    probs = np.exp(_log_probs((3, 4, 0), []).astype(np.float64))
    counts = _first_token_counts(n)
    # 5 standard deviations of a binomial count
    assert np.all(np.abs(counts - n * probs) <= 5 * np.sqrt(n * probs * (1 - probs)) + 1)


def test_temperature_top_k_and_top_p_restrict_the_distribution():
    n = 3000
    logp = _log_probs((3, 4, 0), []).astype(np.float64)
    order = np.argsort(-logp)
    counts = _first_token_counts(n, top_k=2)
    assert counts[order[2:]].sum() == 0
    kept = np.exp(logp[order[:2]]) / np.exp(logp[order[:2]]).sum()
    assert np.all(np.abs(counts[order[:2]] - n * kept) <= 5 * np.sqrt(n * kept * (1 - kept)) + 1)
    # the nucleus: the smallest prefix of the ranking whose mass reaches top_p
    probs = np.exp(logp)
    cumulative = np.cumsum(probs[order])
    top_p = float(cumulative[1]) - 1e-3     # needs exactly the best two tokens
    counts = _first_token_counts(n, top_p=top_p)
    assert counts[order[2:]].sum() == 0 and counts[order[1]] > 0
    hot = np.exp(2 * logp) / np.exp(2 * logp).sum()   # temperature 0.5 sharpens
    counts = _first_token_counts(n, temperature=0.5)
    assert np.all(np.abs(counts - n * hot) <= 5 * np.sqrt(n * hot * (1 - hot)) + 1)


def test_top_p_equal_to_the_best_tokens_mass_keeps_exactly_them():
    # the mass ahead of a token was cumsum - p, which can round below the running sum: at a
    # top_p equal to the best two tokens' mass the third survived
    probs = np.exp(np.log([0.7, 0.2, 0.1]).astype(np.float32).astype(np.float64))
    probs /= probs.sum()
    kept = generation._nucleus(probs, float(probs[0] + probs[1]))
    assert np.flatnonzero(kept).tolist() == [0, 1]
    rng = np.random.default_rng(5)
    for _ in range(300):
        probs = rng.dirichlet(np.ones(7))
        order = np.argsort(-probs, kind="stable")
        j = int(rng.integers(1, 7))
        kept = generation._nucleus(probs, float(np.cumsum(probs[order])[j - 1]))
        assert sorted(np.flatnonzero(kept).tolist()) == sorted(order[:j].tolist())


def test_a_large_nucleus_is_the_stable_ranking_prefix():
    # a flat distribution's nucleus passes the first 64 (and 512) ranked tokens: the longer
    # rankings are partitions, not sorts of the vocabulary; the same tokens either way
    rng = np.random.default_rng(7)
    for vocab, top_p in ((8000, 0.9), (8000, 0.5), (3000, 0.999), (300, 0.95), (8000, 1e-9)):
        for flat in (rng.random(vocab) + 1.0, np.round(rng.random(vocab) * 4) + 1.0):
            probs = flat / flat.sum()
            order = np.lexsort((np.arange(vocab), -probs))
            before = np.concatenate(([0.0], np.cumsum(probs[order])[:-1]))
            keep = before < top_p
            keep[0] = True
            kept = generation._nucleus(probs, top_p)
            assert sorted(np.flatnonzero(kept).tolist()) == sorted(order[keep].tolist())
            np.testing.assert_array_equal(kept[order[keep]], probs[order[keep]])


def _nucleus_reference(probs, top_p):
    order = np.lexsort((np.arange(probs.size), -probs))   # the stable ranking
    before = np.concatenate(([0.0], np.cumsum(probs[order])[:-1]))
    keep = before < top_p
    keep[0] = True
    kept = np.zeros_like(probs)
    kept[order[keep]] = probs[order[keep]]
    return kept, int(keep.sum())


def test_compiled_nucleus_is_the_stable_ranking_prefix():
    from attncore.kernels import _softmax
    rng = np.random.default_rng(11)
    rows = [rng.dirichlet(np.ones(5000)), rng.dirichlet(np.full(3000, 0.05)),
            np.round(rng.random(4000) * 6) / 7,                      # many ties
            np.concatenate((np.zeros(50), rng.random(50) * 1e-310)),   # zeros, subnormals
            np.array([0.5]), np.array([-0.0, 0.0, 1.0, 1.0])]
    for probs in rows:
        order = np.lexsort((np.arange(probs.size), -probs))
        sums = np.cumsum(probs[order])
        # top_p exactly at running sums (the boundary), between them, and past the total
        for top_p in [1e-12, 0.3, 0.9, 1.0, 2.0 * sums[-1] + 1.0] + list(
                sums[:: max(1, sums.size // 7)]):
            want, want_size = _nucleus_reference(probs, top_p)
            got = np.empty_like(probs)
            assert _softmax.nucleus(probs, top_p, got) == want_size
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="out must have 3"):
        _softmax.nucleus(np.ones(3), 0.5, np.empty(2))
    with pytest.raises(ValueError, match="top_p must be > 0"):
        _softmax.nucleus(np.ones(3), 0.0, np.empty(3))


def test_sampled_log_probs_are_the_models():
    for source, r in zip(SOURCES, _generate(SOURCES, do_sample=True, seed=3, max_length=5,
                                            temperature=0.7)):
        ended = len(r.tokens) < 5
        assert r.log_probs[0] == pytest.approx(_sequence_log_prob(source, r.tokens, ended),
                                               abs=1e-9)


# -- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(beam_size=3, num_hypotheses=3)])
def test_attention_is_collected_per_scored_token(options):
    for heads in ("mean", "all"):
        results = _generate(SOURCES, return_attention=True, attention_heads=heads, **options)
        for source, result in zip(SOURCES, results):
            for tokens, attention in zip(result.hypotheses, result.attention):
                steps = len(tokens) + (len(tokens) < 4)
                prefixes = [tokens[:i] for i in range(steps)]
                expected = np.stack([_attention(source, p) for p in prefixes])
                if heads == "mean":
                    expected = expected.mean(axis=1)
                assert attention.dtype == np.float32
                assert attention.shape == expected.shape
                np.testing.assert_allclose(attention, expected, rtol=1e-6, atol=1e-7)


def test_no_attention_unless_asked():
    assert all(r.attention is None for r in _generate(SOURCES, beam_size=2))


# -- argument checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, error, match", [
    (dict(max_length=0), ValueError, "max_length"),
    (dict(max_length=2.0), TypeError, "max_length"),
    (dict(max_length=True), TypeError, "max_length"),
    (dict(max_length=3, min_length=4), ValueError, "min_length"),
    (dict(max_length=3, beam_size=0), ValueError, "beam_size"),
    (dict(max_length=3, beam_size=2, num_hypotheses=3), ValueError, "num_hypotheses"),
    (dict(max_length=3, do_sample=True, beam_size=2), ValueError, "beam_size"),
    (dict(max_length=3, temperature=0.0), ValueError, "temperature"),
    (dict(max_length=3, temperature=float("nan")), ValueError, "temperature"),
    (dict(max_length=3, top_k=-1), ValueError, "top_k"),
    (dict(max_length=3, top_p=0.0), ValueError, "top_p"),
    (dict(max_length=3, top_p=1.5), ValueError, "top_p"),
    # sampling options without do_sample: a search would ignore them (they were, silently)
    (dict(max_length=3, temperature=0.7), ValueError, "temperature=0.7 only applies to samp"),
    (dict(max_length=3, top_k=5, beam_size=2), ValueError, "top_k=5 only applies to sampling"),
    (dict(max_length=3, top_p=0.9), ValueError, "do_sample=True"),
    (dict(max_length=3, temperature=1.0000001), ValueError, r"temperature=1\.0000001 only"),
    (dict(max_length=3, length_penalty=float("inf")), ValueError, "length_penalty"),
    # n ** 400 overflowed in the scoring (OverflowError)
    (dict(max_length=3, length_penalty=400.0), ValueError, r"length_penalty must lie in \[-10, 10\]"),
    (dict(max_length=3, length_penalty=-11), ValueError, "length_penalty"),
    (dict(max_length=3, seed=-1), ValueError, "seed"),
    (dict(max_length=3, seed=[1, -2]), ValueError, r"seed\[1\]"),
    (dict(max_length=3, seed=[1, "a"]), TypeError, r"seed\[1\]"),
    (dict(max_length=3, seed=1.5), TypeError, "seed"),
    (dict(max_length=3, do_sample="yes"), TypeError, "do_sample"),
    (dict(max_length=3, attention_heads="max"), ValueError, "attention_heads"),
    (dict(max_length=3, no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size"),
    (dict(max_length=3, no_repeat_ngram_size=2.0), TypeError, "no_repeat_ngram_size"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        check_generation_options(**options)


@pytest.mark.parametrize("sources, error, match", [
    ([], ValueError, "empty batch"),
    ("abc", TypeError, "sources"),
    ([[1, 2], []], ValueError, r"sources\[1\] is empty"),
    ([[1, 10]], ValueError, r"sources\[0\] has token id 10 outside \[0, 10\)"),
    ([[-1, 2]], ValueError, "token id -1"),
    ([[1.0, 2.0]], TypeError, "integer"),
    ([[[1, 2]]], ValueError, "1-d"),
    ([[1, 2, 3, 4]], ValueError, "position table"),
])
def test_bad_sources_are_named(sources, error, match):
    with pytest.raises(error, match=match):
        check_sources(sources, 10, max_source_length=3)


# -- the ranking of beam candidates ---------------------------------------------------------------

def test_top_k_ranks_by_value_then_index():
    # kernels._softmax.top_k (what beam search ranks a source's candidates with) against a
    # stable sort: value descending, equal values by lower index, NaN never ranked
    from attncore.kernels import _softmax

    rng = np.random.default_rng(0)
    for n, k in [(1, 1), (7, 3), (50, 8), (50, 50), (50, 80), (4000, 8), (16000, 16)]:
        x = rng.integers(-5, 5, n).astype(np.float64)     # many ties
        x[rng.random(n) < 0.1] = -np.inf
        x[rng.random(n) < 0.05] = np.nan
        valid = np.flatnonzero(~np.isnan(x))
        want = valid[np.lexsort((valid, -x[valid]))][:k]
        got = _softmax.top_k(x, k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want, err_msg=f"n={n} k={k}")
    assert _softmax.top_k(np.ones(3), 0).size == 0
    # generation._ranked: the top-k for a few, a partition and a sort of the kept past 256:
    # one ranking, ties (at the cut too) by lower index
    for x in (rng.integers(-5, 5, 5000).astype(np.float64), rng.random(5000),
              np.where(rng.random(5000) < 0.9, -np.inf, rng.integers(-2, 2, 5000))):
        for k in (1, 256, 257, 600, 4097, 4999, 5000, 6000):
            np.testing.assert_array_equal(generation._ranked(x, k),
                                          np.lexsort((np.arange(x.size), -x))[:k])
    with pytest.raises(ValueError, match="k must be"):
        _softmax.top_k(np.ones(3), -1)


def test_beam_top_k_ranks_each_source_as_its_flattened_candidates():
    # _softmax.beam_top_k ranks base[r] + scores[r, t] per group of rows without forming the
    # float64 sums: the same ranking as top_k of the group's flattened (rows, V) candidates
    from attncore.kernels import _softmax

    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        for rows, vocab, k in [(1, 1, 1), (5, 7, 4), (12, 50, 8), (9, 300, 200), (4, 3, 30)]:
            scores = (rng.integers(-4, 1, (rows, vocab)) / 2).astype(dtype)   # many ties
            scores[rng.random((rows, vocab)) < 0.1] = -np.inf
            base = rng.integers(-3, 1, rows).astype(np.float64) / 4
            cuts = np.sort(rng.choice(np.arange(1, rows), size=min(2, rows - 1), replace=False))
            bounds = np.concatenate([[0], cuts, [rows]]).astype(np.int64)
            index, value, count = _softmax.beam_top_k(scores, base, bounds, k)
            for g in range(len(bounds) - 1):
                block = (scores[bounds[g]:bounds[g + 1]] + base[bounds[g]:bounds[g + 1], None])
                flat = np.ascontiguousarray(block, dtype=np.float64).ravel()
                want = _softmax.top_k(flat, k)
                assert count[g] == want.size
                np.testing.assert_array_equal(index[g, :count[g]], want)
                np.testing.assert_array_equal(value[g, :count[g]], flat[want])
    # vocabularies of many 256-score blocks, skipped whole when their max cannot enter (float32
    # rows): ties with the k-th exactly (dyadic scores and bases), NaN and -inf blocks, a row
    # whose base is -inf, values near float32's largest, log-probabilities
    for rows, vocab, k in [(4, 257, 8), (6, 1000, 8), (8, 8000, 16), (3, 5000, 300)]:
        tied = (rng.integers(-40, 1, (rows, vocab)) / 8).astype(np.float32)
        real = np.log(rng.dirichlet(np.full(vocab, 0.1), size=rows)).astype(np.float32)
        huge = np.where(rng.random((rows, vocab)) < 0.5, np.float32(3e38), np.float32(-3e38))
        for scores in (tied, real, huge):
            scores = scores.copy()
            scores[:, 256:512] = np.nan
            scores[:, 600:900] = -np.inf
            scores[rng.random((rows, vocab)) < 0.01] = np.nan
            base = rng.integers(-8, 1, rows).astype(np.float64) / 4
            base[-1] = -np.inf
            bounds = np.array([0, 1, rows - 1, rows], dtype=np.int64)
            index, value, count = _softmax.beam_top_k(scores, base, bounds, k)
            for g in range(len(bounds) - 1):
                block = (scores[bounds[g]:bounds[g + 1]].astype(np.float64)
                         + base[bounds[g]:bounds[g + 1], None])
                want = _softmax.top_k(block.ravel(), k)
                assert count[g] == want.size
                np.testing.assert_array_equal(index[g, :count[g]], want)
                np.testing.assert_array_equal(value[g, :count[g]], block.ravel()[want])
    # k past the candidates: the arrays are as wide as the largest group's candidates
    index, value, count = _softmax.beam_top_k(np.zeros((3, 4), np.float32), np.zeros(3),
                                              np.array([0, 1, 3]), 10 ** 9)
    assert index.shape == (2, 8) and count.tolist() == [4, 8]
    # NaN never ranks; an empty group ranks nothing
    scores = np.array([[0.0, np.nan, -1.0]], np.float32)
    index, value, count = _softmax.beam_top_k(scores, np.zeros(1), np.array([0, 0, 1]), 3)
    assert count.tolist() == [0, 2] and index[1, :2].tolist() == [0, 2]
    for bad, match in [(dict(k=0), "k must be"), (dict(base=np.zeros(2)), "base must"),
                       (dict(bounds=np.array([0, 2])), "bounds must run"),
                       (dict(bounds=np.array([0, 1, 0, 1])), "non-decreasing")]:
        args = dict(scores=scores, base=np.zeros(1), bounds=np.array([0, 1]), k=2)
        args.update(bad)
        with pytest.raises(ValueError, match=match):
            _softmax.beam_top_k(args["scores"], args["base"], args["bounds"].astype(np.int64),
                                args["k"])


class TiedModel(FakeModel):
    """Every token but EOS equally likely at every step: the ranking must fall back to the
    (beam, token) order."""

    def _step(self, state, tokens):
        log_probs, attention = super()._step(state, tokens)
        log_probs[:] = np.float32(np.log(1.0 / V))
        return log_probs, attention


def test_beam_search_breaks_ties_towards_the_earlier_beam_and_lower_token():
    results = generation.generate(TiedModel(), [np.array([3, 4], dtype=np.int64)], bos_id=BOS,
                                  eos_id=EOS, max_length=3, beam_size=3, num_hypotheses=3,
                                  min_length=3, length_penalty=0.0)
    # all hypotheses score the same; the first live beams are tokens 0, 1, 3 (EOS forbidden),
    # and at each later step the earliest beam's lowest tokens win
    assert results[0].hypotheses == [[0, 0, 0], [0, 0, 1], [0, 0, 3]]


def _sample_rows_by_sorting(scores, rng, temperature, top_k, top_p):
    """The sampling filters written with full stable sorts of the vocabulary: the oracle of
    generation._sample_rows, which ranks with a one-pass top-k."""
    logits = scores.astype(np.float64) / temperature
    vocab = logits.shape[1]
    if 0 < top_k < vocab:
        order = np.argsort(-logits, axis=1, kind="stable")
        np.put_along_axis(logits, order[:, top_k:], -np.inf, axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=1)
        before = np.concatenate([np.zeros((len(sorted_probs), 1)),
                                 np.cumsum(sorted_probs, axis=1)[:, :-1]], axis=1)
        drop = before >= top_p
        drop[:, 0] = False
        sorted_probs[drop] = 0.0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_probs, axis=1)
        probs /= probs.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    draws = rng.random(probs.shape[0]) * cdf[:, -1]
    picked = np.minimum((cdf <= draws[:, None]).sum(axis=1), vocab - 1)
    zero = probs[np.arange(len(picked)), picked] == 0.0
    if zero.any():
        picked[zero] = probs[zero].argmax(axis=1)
    return picked


@pytest.mark.parametrize("vocab", [5, 300, 4000])
def test_sampling_filters_pick_what_full_sorts_pick(vocab):
    # the same draws token for token: flat and peaked rows, many ties (logits on a grid), EOS
    # forbidden (-inf), top-k and nuclei that fit in the first 64 ranked tokens or need more
    rng = np.random.default_rng(vocab)
    for case in range(40):
        scale = [0.05, 1.0, 8.0][case % 3]
        scores = (np.round(rng.normal(0, scale, (6, vocab)) * 4) / 4).astype(np.float32)
        scores[:, 2] = -np.inf
        options = dict(temperature=[1.0, 0.7, 1.5][case % 3],
                       top_k=[0, 1, 3, 50, vocab - 1, 2 * vocab][case % 6],
                       top_p=[1.0, 0.9, 0.5, 0.999, 0.01][case % 5])
        # one stream for every row: its draws one by one are rng.random(6)'s
        got = generation._sample_rows(scores, [np.random.default_rng(case)] * 6, **options)
        want = _sample_rows_by_sorting(scores, np.random.default_rng(case), **options)
        np.testing.assert_array_equal(got, want, err_msg=f"case {case}: {options}")


# -- streaming: generate_tokens ------------------------------------------------------------------
def _streaming_models():
    from attncore import models
    from attncore.train.ran import RANConfig
    from attncore.train.seq2seq import Seq2SeqConfig
    from attncore.train.transformer import TransformerConfig
    common = dict(d_model=16, num_heads=2, dim_feedforward=24, max_positions=64)
    configs = {
        "seq2seq": Seq2SeqConfig(src_vocab_size=30, tgt_vocab_size=30, embed_dim=8,
                                 hidden_size=12).to_dict(),
        "transformer": TransformerConfig(src_vocab_size=30, tgt_vocab_size=30,
                                         num_encoder_layers=1, num_decoder_layers=2,
                                         **common).to_dict(),
        "decoder_only": TransformerConfig(kind="decoder_only", src_vocab_size=30,
                                          tgt_vocab_size=30, num_encoder_layers=0,
                                          num_decoder_layers=2, **common).to_dict(),
        "ran_lm": RANConfig(vocab_size=30, embedding_size=12, ran_layers=1, head_num=2,
                            head_size=4, window_size=4, min_window_size=2, num_classes=0,
                            causal=True, token_head="lm", dtype="float32").to_dict(),
    }
    return {name: models.from_config(config, seed=5) for name, config in configs.items()}


@pytest.mark.parametrize("name", ["seq2seq", "transformer", "decoder_only", "ran_lm"])
def test_a_state_with_no_rows_left_steps_to_no_rows(name):
    # (select may drop every row; stepping that state failed with a NumPy reduction error
    # in the Transformer and, for a while, the RAN LM)
    model = _streaming_models()[name]
    state = model._start([np.array([5, 6, 2]), np.array([7, 2])])
    if name in ("decoder_only", "ran_lm"):
        model._step(state, None)
    log_probs, _ = model._step(state.select(np.array([], dtype=np.int64)),
                               np.array([], dtype=np.int64))
    assert log_probs.shape == (0, 30) and log_probs.dtype == np.float32


@pytest.fixture(scope="module")
def streaming_models():
    return _streaming_models()


@pytest.mark.parametrize("name", ["seq2seq", "transformer", "decoder_only", "ran_lm"])
@pytest.mark.parametrize("options", [{}, {"min_length": 6},
                                     {"do_sample": True, "seed": 7, "top_p": 0.8},
                                     {"do_sample": True, "seed": [11], "temperature": 0.5},
                                     {"no_repeat_ngram_size": 1},
                                     {"do_sample": True, "seed": 3, "no_repeat_ngram_size": 2}])
def test_generate_tokens_streams_what_generate_returns(streaming_models, name, options):
    model = streaming_models[name]
    rng = np.random.default_rng(3)
    for _ in range(4):
        source = rng.integers(3, 30, int(rng.integers(1, 9)))
        result = model.generate([source], max_length=12, **options)[0]
        streamed = list(model.generate_tokens(source, max_length=12, **options))
        assert [token for token, _ in streamed] == result.tokens
        # the same float32 step log-probabilities; the result also counts a generated EOS
        total = sum(log_prob for _, log_prob in streamed)
        if len(result.tokens) == 12:
            assert total == pytest.approx(result.log_probs[0], abs=1e-9)
        else:
            assert total > result.log_probs[0]


@pytest.mark.parametrize("name", ["seq2seq", "transformer", "decoder_only", "ran_lm"])
@pytest.mark.parametrize("options", [dict(), dict(beam_size=3), dict(do_sample=True, seed=1)])
def test_real_models_repeat_no_ngram_of_their_decoder_sequence(streaming_models, name, options):
    # a language model's prompt is part of its decoder sequence (as in transformers); an
    # encoder-decoder's starts at BOS. Greedy runs step by step (the compiled seq2seq search
    # has no n-gram ban) and is still the argmax of what is left.
    model = streaming_models[name]
    language_model = name in ("decoder_only", "ran_lm")
    rng = np.random.default_rng(5)
    sources = [rng.integers(3, 30, int(n)) for n in (3, 7, 12)]
    for size in (1, 2, 3):
        results = model.generate(sources, max_length=14, no_repeat_ngram_size=size, **options)
        for source, result in zip(sources, results):
            start = list(source) if language_model else [model.bos_id]
            for tokens in result.hypotheses:
                assert not _repeats_an_ngram(start + tokens, size, first=len(start))
            if not options:   # greedy = the step-by-step argmax over the allowed tokens
                state = model._start([source])
                first = None if language_model else np.array([model.bos_id])
                log_probs, _ = model._step(state, first)
                sequence = list(start)
                for token in result.tokens:
                    allowed = log_probs[0].astype(np.float64)
                    for banned in range(len(allowed)):
                        if banned != model.eos_id and _repeats_an_ngram(
                                sequence + [banned], size, first=len(sequence)):
                            allowed[banned] = -np.inf
                    assert token == int(np.argmax(allowed))
                    sequence.append(token)
                    log_probs, _ = model._step(state, np.array([token]))


@pytest.mark.parametrize("name", ["seq2seq", "transformer", "decoder_only", "ran_lm"])
def test_generate_tokens_decodes_the_source_given_at_the_call(streaming_models, name):
    # the stream starts at its first next(): it read the caller's int64 array then, so a
    # buffer reused in between (a service's next request) was decoded instead, unchecked
    model = streaming_models[name]
    source = np.array([4, 5, 6, 7], dtype=np.int64)
    expected = list(model.generate_tokens(source.copy(), max_length=8, do_sample=True, seed=1))
    stream = model.generate_tokens(source, max_length=8, do_sample=True, seed=1)
    source[:] = 10_000
    assert list(stream) == expected


def test_generate_tokens_names_its_source(streaming_models):
    # (its errors named "sources[0]" or "prompts[0]", a list the caller never passed)
    for name in ("transformer", "decoder_only", "ran_lm"):
        model = streaming_models[name]
        with pytest.raises(ValueError, match=r"^source has token id 99 outside"):
            model.generate_tokens([4, 99], max_length=3)
        with pytest.raises(ValueError, match=r"^source must be 1-d, got shape \(1, 3\)"):
            model.generate_tokens([[5, 6, 2]], max_length=3)


def test_return_attention_is_refused_at_the_call_without_cross_attention(streaming_models):
    # (accepted by the option checks, refused at step 0 after the prompts were encoded)
    for name in ("decoder_only", "ran_lm"):
        model = streaming_models[name]
        real_start = model._start
        model._start = lambda *a: pytest.fail("_start ran before the refusal")
        try:
            with pytest.raises(ValueError, match="return_attention: a .* has no cross-attention"):
                model.generate([[4, 5]], max_length=3, return_attention=True)
        finally:
            model._start = real_start


def test_generate_tokens_checks_first_and_stops_when_the_caller_does(streaming_models):
    model = streaming_models["transformer"]
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        model.generate_tokens([4, 5], max_length=0)   # (at the call, not at the first next())
    with pytest.raises(ValueError, match="source has token id 99"):
        model.generate_tokens([4, 99], max_length=3)
    with pytest.raises(TypeError):
        model.generate_tokens([4, 5], max_length=3, beam_size=2)   # (beam search cannot stream)
    with pytest.raises(ValueError, match="seed has 2 entries for one source"):   # (at next())
        model.generate_tokens([4, 5], max_length=3, do_sample=True, seed=[1, 2])
    steps = []
    real_step = model._step

    def counting(state, tokens):
        steps.append(1)
        return real_step(state, tokens)
    model._step = counting
    try:
        stream = model.generate_tokens([4, 5, 6], max_length=30, min_length=30)
        first = [next(stream) for _ in range(2)]
        stream.close()
    finally:
        del model._step
    assert len(first) == 2 and len(steps) == 2


def test_a_model_refuses_a_tokenizer_that_is_not_one(streaming_models):
    # (a path was accepted, and translate / save failed later with AttributeErrors)
    from attncore import models
    config = streaming_models["transformer"].config
    with pytest.raises(TypeError, match="tokenizer must be an attncore.tokenizer.Tokenizer or "
                                        "None, got str"):
        models.from_config(config, seed=1, tokenizer="src_vocab.json")


# -- length groups of a ragged batch ---------------------------------------------------------

def _group_cost(lengths, groups, overhead):
    return sum(overhead + len(rows) * int(max(lengths[r] for r in rows)) for rows in groups)


def _best_cost_by_brute_force(lengths, overhead):
    """The cheapest split of the distinct lengths (longest first) into consecutive runs."""
    distinct = sorted(set(lengths), reverse=True)
    count = {n: lengths.count(n) for n in distinct}
    best = None
    for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
        cost, start = 0, 0
        for end in range(1, len(distinct) + 1):
            if end == len(distinct) or cuts[end - 1]:
                cost += overhead + sum(count[n] for n in distinct[start:end]) * distinct[start]
                start = end
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_length_groups_split_a_ragged_batch_at_the_least_cost(seed):
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(1, 60, int(rng.integers(1, 13)))]   # (2^11 splits)
    for overhead in (0, 5, 32, 1000):
        groups = length_groups(lengths, overhead)
        rows = np.concatenate(groups)
        assert sorted(rows.tolist()) == list(range(len(lengths)))    # every row once
        assert all(g.dtype == np.int64 for g in groups)
        longest = [max(lengths[r] for r in g) for g in groups]
        assert longest == sorted(longest, reverse=True)              # longest group first
        for a, b in zip(groups, groups[1:]):                         # equal lengths together
            assert min(lengths[r] for r in a) > max(lengths[r] for r in b)
        assert _group_cost(lengths, groups, overhead) == _best_cost_by_brute_force(lengths,
                                                                                   overhead)
    assert len(length_groups(lengths, 10 ** 9)) == 1


def test_one_long_source_gets_a_group_of_its_own():
    groups = length_groups([10] * 63 + [400])
    assert [g.tolist() for g in groups] == [[63], list(range(63))]
    assert len(length_groups([7, 7, 7])) == 1
