# SPDX-License-Identifier: Apache-2.0
"""Streaming batch inference (attncore.batch): reading, length bucketing under budgets, input
order restored, errors pinned to the right line with an exact output prefix, jobs.

A tiny fake model (reverses its source; refuses id 13) stands in for the engine, so these tests
check the batching logic alone; the real model runs in tests/test_cli.py.
"""
import io
import itertools

import numpy as np
import pytest

from attncore import batch
from attncore.batch import Batching, InputError, Item


class ReverseModel:
    """generate: the source reversed; a source holding id 13 is refused (ValueError)."""

    config = {"architecture": "fake", "src_vocab_size": 50, "tgt_vocab_size": 50}
    tokenizer = None

    def __init__(self):
        self.calls = []

    def generate(self, sources, *, max_length, **options):
        self.calls.append([len(s) for s in sources])
        if any(13 in s.tolist() for s in sources):
            raise ValueError("sources has token id 13 that the fake model refuses")

        class Result:
            def __init__(self, tokens):
                self.tokens = tokens
        return [Result(list(s[::-1][:max_length])) for s in sources]


def items_of(lengths, first=1):
    return [Item(first + i, np.arange(1, n + 1, dtype=np.int64)) for i, n in enumerate(lengths)]


def identity(rows):
    """An ``infer`` for run_batches: each item's source back, as results."""
    return [item.source.copy() for item in rows]


# ------------------------------------------------------------------------------------ reading
def test_read_lines_strips_only_line_endings_and_numbers_from_one():
    stream = io.BytesIO(b"a b\r\n  two spaces  \n\nlast without newline")
    assert list(batch.read_lines(stream)) == [
        (1, "a b"), (2, "  two spaces  "), (3, ""), (4, "last without newline")]
    # a CRLF file's last line without its "\n" kept the "\r" (an unknown token '\r')
    assert list(batch.read_lines(io.BytesIO(b"a\r\nb\r"))) == [(1, "a"), (2, "b")]


def test_read_lines_drops_a_byte_order_mark_at_the_start_of_any_line():
    # (only the stream's first: "cat a.txt b.txt" of two Windows files refused b's first line
    # with "missing ['\ufeff']", where training had read it)
    stream = io.BytesIO(b"\xef\xbb\xbfone\n\xef\xbb\xbftwo\nthree \xef\xbb\xbf\n")
    assert list(batch.read_lines(stream)) == [(1, "one"), (2, "two"), (3, "three \ufeff")]


def test_read_lines_names_the_line_that_is_not_utf8():
    stream = io.BytesIO(b"ok\nbad \xff byte\nnever read\n")
    lines = batch.read_lines(stream)
    assert next(lines) == (1, "ok")
    with pytest.raises(InputError, match=r"^line 2: not valid UTF-8"):
        next(lines)


def test_read_lines_is_lazy():
    class Endless:
        def __iter__(self):
            return (b"x\n" for _ in itertools.count())
    assert list(itertools.islice(batch.read_lines(Endless()), 3)) == [(1, "x"), (2, "x"), (3, "x")]


@pytest.mark.parametrize("content, expected", [
    (b"", 0), (b"a", 1), (b"a\n", 1), (b"a\nb", 2), (b"\n\n\n", 3)])
def test_count_lines(tmp_path, content, expected):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    assert batch.count_lines(path, chunk_size=2) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty line"), ("1 x 3", "'x' is not an integer"), ("1 -2", "token id -2 outside"),
    ("5 50", r"token id 50 outside \[0, 50\)"),
    # int() took these: "4_0" as 40, Arabic-Indic digits, a sign
    ("4_0", "'4_0' is not an integer"), ("\u0664", "is not an integer"),
    ("+4", "'\\+4' is not an integer"), ("--4", "'--4' is not an integer")])
def test_parse_ids_refuses_malformed_lines(text, message):
    with pytest.raises(ValueError, match=message):
        batch.parse_ids(text, vocab_size=50)


def test_parse_ids_without_a_vocabulary_refuses_ids_past_int64():
    # (an OverflowError, which a batch job does not report as a bad line, ended the run)
    assert batch.parse_ids("9223372036854775807").tolist() == [2 ** 63 - 1]
    with pytest.raises(ValueError, match=r"token id 9223372036854775808 outside \[0, 2\*\*63\)"):
        batch.parse_ids("3 9223372036854775808")


def test_check_token_ids_without_a_vocabulary_refuses_uint64_ids_past_int64():
    from attncore.models.base import check_token_ids
    assert check_token_ids(np.array([7], np.uint64), "source", None).tolist() == [7]
    with pytest.raises(ValueError, match="source has token id 18446744073709551615, past int64"):
        check_token_ids(np.array([2 ** 64 - 1], np.uint64), "source", None)


def test_parse_ids():
    ids = batch.parse_ids(" 4  7 49 ", vocab_size=50)
    assert ids.dtype == np.int64 and ids.tolist() == [4, 7, 49]


# ----------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_batching_refuses_bad_sizes(value):
    with pytest.raises(ValueError, match="batch_size"):
        Batching(batch_size=value)
    with pytest.raises(ValueError, match="max_tokens"):
        Batching(max_tokens=value)


def test_default_window_is_a_hundred_batches():
    assert Batching(batch_size=8).window == 800


def test_batches_respect_rows_and_padded_token_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=500).tolist()
    plan = Batching(batch_size=16, max_tokens=200, window=120)
    batches = list(batch.plan_batches(items_of(lengths), plan))
    seen = sorted(item.line for b in batches for item in b)
    assert seen == list(range(1, 501)), "every line exactly once"
    for b in batches:
        longest = max(len(item.source) for item in b)
        assert len(b) <= 16
        assert len(b) * longest <= 200 or len(b) == 1
    # length bucketing: batches within a window hold similar lengths (sorted longest first)
    spread = [max(len(i.source) for i in b) - min(len(i.source) for i in b) for b in batches]
    assert np.mean(spread) < 5, spread


def test_a_source_longer_than_the_budget_runs_alone():
    batches = list(batch.plan_batches(items_of([3, 50, 2]), Batching(batch_size=8, max_tokens=10)))
    assert [[i.line for i in b] for b in batches] == [[2], [1, 3]]


def test_sorting_never_crosses_a_window():
    # window of 4: lines 1-4 and 5-8 are batched separately even though 5-8 are longer
    lengths = [1, 2, 3, 4, 10, 11, 12, 13]
    batches = list(batch.plan_batches(items_of(lengths), Batching(batch_size=2, window=4)))
    assert [[i.line for i in b] for b in batches] == [[4, 3], [2, 1], [8, 7], [6, 5]]


# ------------------------------------------------------------------------------------ running
@pytest.mark.parametrize("batch_size, max_tokens, window", [
    (1, None, 1), (3, None, 7), (16, 40, 50), (64, None, None)])
def test_run_batches_restores_input_order(batch_size, max_tokens, window):
    rng = np.random.default_rng(batch_size)
    lengths = rng.integers(1, 20, size=203).tolist()
    items = items_of(lengths, first=1)
    plan = Batching(batch_size=batch_size, max_tokens=max_tokens, window=window)
    throughput = batch.Throughput()
    out = list(batch.run_batches(iter(items), identity, plan, throughput=throughput))
    assert [item.line for item, _ in out] == list(range(1, 204))
    for item, result in out:
        np.testing.assert_array_equal(result, item.source)
    assert throughput.lines == 203 and throughput.source_tokens == sum(lengths)
    assert "203 lines in" in throughput.summary()


@pytest.mark.parametrize("numbers", [[1, 3, 4, 9, 10, 11, 30], [5, 5, 6, 2, 2, 7, 1]],
                         ids=["gaps", "repeats-and-disorder"])
def test_run_batches_takes_any_line_numbering(numbers):
    # results come back in reading order whatever the numbers (blank lines skipped but kept
    # numbered): a gap made the run wait for the missing line and end without error, a repeat
    # was swallowed as a refused batch and the line dropped
    rng = np.random.default_rng(0)
    items = [Item(n, np.arange(1, int(rng.integers(1, 9)) + 1, dtype=np.int64)) for n in numbers]
    for plan in (Batching(batch_size=2, window=3), Batching(batch_size=64)):
        out = list(batch.run_batches(iter(items), identity, plan))
        assert [item for item, _ in out] == items
        for item, result in out:
            np.testing.assert_array_equal(result, item.source)
    # and a refused line among them is still named, after exactly the lines read before it
    model, job = ReverseModel(), batch.GenerateJob(ids=True)
    lines = [(n, "4 5" if i != 4 else "5 13") for i, n in enumerate(numbers)]
    frontend = batch.Frontend.from_model(model)
    done = []
    with pytest.raises(InputError, match=f"^line {numbers[4]}: .*token id 13"):
        for item, _ in batch.run_batches(job.items(lines, frontend),
                                         lambda rows: job.run_items(model, rows),
                                         Batching(batch_size=2, window=3)):
            done.append(item.line)
    assert done == numbers[:4]


def test_a_token_budget_bounds_the_window_too():
    # --batch-size 1000000 --max-tokens 2048 (the usual way to let the budget cut batches) read
    # the whole input into one window: memory grew with the file, nothing came out until the end
    read = []

    def lines():
        for i in itertools.count(1):
            read.append(i)
            yield Item(i, np.arange(1, 11, dtype=np.int64))       # 10 tokens a line
    plan = Batching(batch_size=10 ** 6, max_tokens=20)             # window: 100 x 20 tokens
    out = batch.run_batches(lines(), identity, plan)
    assert [item.line for item, _ in itertools.islice(out, 3)] == [1, 2, 3]
    assert len(read) <= 201, "one window of 2000 tokens (and one look-ahead) read"
    windows = [len(w) for w, _ in itertools.islice(batch._windows(lines(), plan), 3)]
    assert windows == [200, 200, 200]


def test_run_batches_reads_lazily_one_window_at_a_time():
    read = []

    def lines():
        for i in itertools.count(1):
            read.append(i)
            yield Item(i, np.array([1, 2], dtype=np.int64))
    out = batch.run_batches(lines(), identity, Batching(batch_size=2, window=10))
    first = list(itertools.islice(out, 3))
    assert [item.line for item, _ in first] == [1, 2, 3]
    assert len(read) <= 11, "no more than one window (and one look-ahead) read"


def test_on_batch_reports_every_line_and_token():
    seen = []
    items = items_of([3, 1, 4, 1, 5])
    list(batch.run_batches(items, identity, Batching(batch_size=2),
                           on_batch=lambda n, t: seen.append((n, t))))
    assert sum(n for n, _ in seen) == 5 and sum(t for _, t in seen) == 14


def test_a_malformed_line_stops_after_every_earlier_line_is_done():
    def items():
        for i in range(1, 30):
            if i == 17:
                raise InputError(17, "unknown token 'ß'")
            yield Item(i, np.arange(1, 1 + (i * 7) % 11 + 1, dtype=np.int64))
    out = []
    with pytest.raises(InputError, match="^line 17: unknown token"):
        for item, _ in batch.run_batches(items(), identity, Batching(batch_size=4, window=10)):
            out.append(item.line)
    assert out == list(range(1, 17)), "exactly the lines before the bad one"


def test_a_line_the_model_refuses_is_named_and_output_is_an_exact_prefix():
    model = ReverseModel()
    job = batch.GenerateJob(ids=True)
    lines = [(i, " ".join(str(t) for t in range(1, 2 + i % 9))) for i in range(1, 61)]
    lines[40] = (41, "5 13 7")  # refused by the model (not by parsing)
    frontend = batch.Frontend.from_model(model)
    out = []
    with pytest.raises(InputError, match="^line 41: .*token id 13"):
        for item, result in batch.run_batches(job.items(lines, frontend),
                                              lambda rows: job.run_items(model, rows),
                                              Batching(batch_size=8, window=25)):
            out.append((item.line, job.format(result, frontend)))
    assert [line for line, _ in out] == list(range(1, 41))
    assert out[2] == (3, " ".join(str(t) for t in range(4, 0, -1)))


def test_a_batch_out_of_memory_is_rerun_by_line_and_the_line_named():
    # a 42 MB line padded its whole batch past memory: a traceback, and the good lines lost
    items = items_of([3] * 30)
    items[20] = Item(21, np.arange(1, 1001, dtype=np.int64))      # the one too big alone

    def infer(batch):
        if max(len(item.source) for item in batch) > 100:
            raise MemoryError("Unable to allocate 182. GiB")
        return [item.source[::-1] for item in batch]

    out = []
    with pytest.raises(InputError, match=r"^line 21: not enough memory for this line "
                                         r"\(Unable to allocate 182. GiB\)"):
        for item, result in batch.run_batches(iter(items), infer,
                                              Batching(batch_size=8, window=16)):
            out.append(item.line)
    assert out == list(range(1, 21))


def test_default_generation_limits_stay_within_the_longest_generation():
    from attncore.models.base import MAX_GENERATION_LENGTH, _default_limit
    assert _default_limit(5) == 20
    assert _default_limit(600_000) == MAX_GENERATION_LENGTH   # (1.2M was max_length's error)


def test_reorderer():
    reorder = batch.Reorderer(first=5)
    assert reorder.push(6, "b") == []
    assert reorder.pending == 1
    assert reorder.push(5, "a") == [(5, "a"), (6, "b")]
    with pytest.raises(ValueError, match="already delivered"):
        reorder.push(5, "again")


# ---------------------------------------------------------------------------------------- jobs
class CharTokenizer:
    """The tokenizer interface jobs use (attncore.tokenizer.Tokenizer), over a fixed alphabet."""

    alphabet = "<pad> <bos> <eos> <unk> a b c".split()

    def encode_source(self, text, *, strict=False):
        ids = [self.alphabet.index(c) if c in self.alphabet else 3 for c in text]
        if strict and 3 in ids:
            raise ValueError(f"text has tokens missing from the source vocabulary: "
                             f"{sorted({c for c in text if c not in self.alphabet})}")
        return np.asarray(ids, dtype=np.int64)

    def decode_target(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def test_generate_job_text_round_trip_and_unknown_tokens():
    model = ReverseModel()
    frontend = batch.Frontend(model.config, CharTokenizer())
    job = batch.GenerateJob()
    item = job.parse(1, "abc", frontend)
    assert item.source.tolist() == [4, 5, 6]
    assert job.format(job.run(model, [item.source])[0], frontend) == "cba"
    with pytest.raises(InputError, match=r"^line 2: .*missing from the source vocabulary: \['x'\]"):
        job.parse(2, "axb", frontend)
    lenient = batch.GenerateJob(allow_unknown=True)
    assert lenient.parse(2, "axb", frontend).source.tolist() == [4, 3, 5]
    with pytest.raises(InputError, match="^line 3: empty line"):
        job.parse(3, "   ", frontend)


def test_job_subclasses_with_the_older_run_signature_still_run():
    # run(model, sources) without lines: GenerateJob and other jobs alike
    class Old(batch.GenerateJob):
        def run(self, model, sources):
            return [[len(s)] for s in sources]
    items = [Item(1, np.array([3, 4])), Item(2, np.array([5]))]
    assert Old().run_items(None, items) == [[2], [1]]


def test_a_generated_newline_does_not_break_one_line_per_input():
    class Lines:
        def decode_target(self, ids):
            return "a\nb\rc"
    frontend = batch.Frontend(ReverseModel.config, Lines())
    assert batch.GenerateJob().format([4, 5], frontend) == "a\\nb\\rc"


def test_generated_text_is_one_line_for_any_reader_and_reads_back():
    # (U+2028, \x85, \v... went out raw: str.splitlines found 8 lines for 3 inputs; and a
    # generated backslash before "n" read as an escaped newline)
    import ast
    text = "a\\nb\nc\u2028d\x85e\x1cf\vg\fh\u2029i\\"

    class Lines:
        def decode_target(self, ids):
            return text
    line = batch.GenerateJob().format([4, 5], batch.Frontend(ReverseModel.config, Lines()))
    assert line.splitlines() == [line]
    assert ast.literal_eval('"' + line.replace('"', '\\"') + '"') == text


def test_blank_lines_get_empty_results_without_a_model_call():
    model = ReverseModel()
    job = batch.GenerateJob(ids=True, max_length=10, blank_lines=True)
    frontend = batch.Frontend(ReverseModel.config)
    items = [job.parse(n, text, frontend) for n, text in enumerate(["4 5", "", " \t", "6"], 1)]
    assert job.run_items(model, items) == [[5, 4], [], [], [6]]
    assert model.calls == [[2, 1]]
    assert job.run_items(model, items[1:3]) == [[], []] and len(model.calls) == 1
    assert job.format([], frontend) == ""
    with pytest.raises(InputError, match="^line 2: empty line"):
        batch.GenerateJob(ids=True).parse(2, " ", frontend)


def test_text_jobs_need_a_tokenizer():
    frontend = batch.Frontend(ReverseModel.config, None)
    with pytest.raises(InputError, match="needs a tokenizer.*--ids"):
        batch.GenerateJob().parse(1, "abc", frontend)


def test_job_refuses_a_model_without_the_method():
    with pytest.raises(ValueError, match=r"this model \(fake\) cannot classify"):
        batch.ClassifyJob().check_model(ReverseModel())


def test_an_explicit_max_length_caps_every_line():
    # (the default limit, per line, is test_cli::test_a_lines_default_length_does_not_depend_on_its_batch)
    model = ReverseModel()
    job = batch.GenerateJob(ids=True, max_length=2)
    assert job.run(model, [np.array([1, 2, 3, 4])]) == [[4, 3]]


def test_classify_and_encode_jobs_format():
    class Encoder:
        config = {"architecture": "fake"}

        def classify(self, sources):
            return np.array([[0.0, 2.0, 1.0]] * len(sources))

        def encode(self, sources):
            return [np.full((len(s), 2), len(s), dtype=np.float32) for s in sources]
    frontend = batch.Frontend(Encoder.config)
    sources = [np.array([1, 2]), np.array([3])]
    assert [batch.ClassifyJob().format(r, frontend)
            for r in batch.ClassifyJob().run(Encoder(), sources)] == ["1", "1"]
    label, scores = batch.ClassifyJob(scores=True).format(
        batch.ClassifyJob().run(Encoder(), sources)[0], frontend).split("\t")
    np.testing.assert_allclose(np.exp(np.array(eval(scores))).sum(), 1.0, rtol=1e-6)
    assert batch.EncodeJob(pool="mean").format(batch.EncodeJob(pool="mean").run(
        Encoder(), sources)[0], frontend) == "[2.0,2.0]"
    per_token = batch.EncodeJob(pool="none")
    assert per_token.format(per_token.run(Encoder(), sources)[1], frontend) == "[[1.0,1.0]]"
    with pytest.raises(ValueError, match="pool must be one of"):
        batch.EncodeJob(pool="max")


@pytest.mark.parametrize("architecture", ["transformer", "ran"])
def test_encode_pool_first_writes_each_lines_first_encoder_output(architecture):
    # `attncore encode --pool first` on a real model: line i's model.encode(...)[i][0]
    import json

    from attncore import models
    if architecture == "ran":
        from attncore.train.ran import RANConfig
        config = RANConfig(vocab_size=30, embedding_size=8, ran_layers=1, head_num=2,
                           head_size=4, window_size=4, min_window_size=2, num_classes=2).to_dict()
    else:
        from attncore.train.transformer import TransformerConfig
        config = TransformerConfig(kind="encoder_only", src_vocab_size=30, tgt_vocab_size=0,
                                   d_model=8, num_heads=2, dim_feedforward=12,
                                   num_encoder_layers=1, num_decoder_layers=0,
                                   num_classes=2).to_dict()
    model = models.from_config(config, seed=1)
    frontend = batch.Frontend.from_model(model)
    job = batch.EncodeJob(pool="first", ids=True)
    job.check_model(model)
    items = [job.parse(n, text, frontend) for n, text in enumerate(["4 5 6 7", "9", "8 4"], 1)]
    lines = [job.format_item(item, result, frontend)
             for item, result in zip(items, job.run_items(model, items))]
    encoded = model.encode([item.source for item in items])
    sequences = encoded[0].sequence if architecture == "ran" else encoded
    for line, sequence in zip(lines, sequences):
        np.testing.assert_array_equal(np.asarray(json.loads(line), dtype=np.float32),
                                      np.asarray(sequence, dtype=np.float32)[0])
    mean = batch.EncodeJob(pool="mean", ids=True).run_items(model, items)
    assert np.abs(np.asarray(json.loads(lines[0])) - mean[0]).max() > 1e-3   # (not the mean)


def test_json_array_round_trips_float32():
    values = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    import json
    back = np.asarray(json.loads(batch.json_array(values)), dtype=np.float32)
    np.testing.assert_array_equal(back, values)
    with pytest.raises(ValueError, match="cannot write nan"):
        batch.json_array([np.nan])


def test_map_batches_may_finish_in_any_order_and_is_closed_on_failure():
    """The hook attncore.distributed uses: batches complete out of order (here: reversed)."""
    closed = []

    def refuse_13(rows):
        if any(13 in item.source.tolist() for item in rows):
            raise ValueError("token id 13 refused")
        return identity(rows)

    def reversed_map(batches):
        try:
            for index in reversed(range(len(batches))):
                yield index, refuse_13(batches[index])
        finally:
            closed.append(True)
    lengths = [(i * 5) % 9 + 1 for i in range(50)]
    items = items_of(lengths)
    out = list(batch.run_batches(items, identity, Batching(batch_size=3, window=20),
                                 map_batches=reversed_map))
    assert [item.line for item, _ in out] == list(range(1, 51))
    assert len(closed) == 3, "one map per window, each closed"
    items[29] = Item(30, np.array([4, 13], dtype=np.int64))
    lines = []
    with pytest.raises(InputError, match="^line 30: token id 13 refused"):
        for item, _ in batch.run_batches(items, refuse_13, Batching(batch_size=3, window=20),
                                         map_batches=reversed_map):
            lines.append(item.line)
    assert lines == list(range(1, 30))


@pytest.mark.parametrize("level", ["bpe", "words", "char"])
def test_a_decoder_only_model_writes_what_follows_its_prompt(level):
    # (decoded alone, a BPE continuation lost its word start: "unto" after "and god said"
    # and "id" after "and god sa" both read as words; prompt + output is now the whole text)
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer

    texts = ["and god said unto moses, let there be light."] * 30
    if level == "bpe":
        pytest.importorskip("tokenizers")
        from attncore.data.bpe import BPEVocab   # (no normalizer: "said " keeps its space)
        vocab = BPEVocab.train(texts, vocab_size=90)
    else:
        vocab = Vocab.build(texts, level=level)
    tokenizer = Tokenizer(src=vocab, keep_trailing_space=True)
    frontend = batch.Frontend({"architecture": "ran", "vocab_size": len(vocab), "causal": True,
                               "token_head": "lm"}, tokenizer)
    job = batch.GenerateJob()
    whole = vocab.encode("and god said unto moses")
    for prompt_text, cut in (("and god said", "and god said"), ("and god said ", "and god said ")):
        item = job.parse(1, prompt_text, frontend)
        if level != "char":   # (a BPE prompt's trailing space was a lone "▁" piece)
            assert item.source.tolist() == vocab.encode("and god said")
        result = whole[len(item.source):]
        line = job.format_item(item, result, frontend)
        assert tokenizer.decode_source(item.source.tolist()) + line == \
            vocab.decode(item.source.tolist() + result)
        assert line.startswith(" unto") or (level == "char" and line.startswith("unto")), line
    # an encoder-decoder's output is its own text; so is a pairs-trained language model's,
    # whose prompts end with EOS (two-sided tokenizer: "source <eos>", then the target; the
    # whole decoded stopped at that EOS, and every output line was empty)
    for kind in ("encoder_decoder", "decoder_only"):
        paired = batch.Frontend({"architecture": "transformer", "kind": kind},
                                Tokenizer(vocab, vocab))
        item = job.parse(1, "and god said", paired)
        assert item.source[-1] == vocab.eos
        assert job.format_item(item, vocab.encode("unto moses"), paired) == "unto moses"


# ------------------------------------------------------- mutation-testing round 2: small gaps
def test_every_character_str_splitlines_breaks_on_is_escaped():
    # LINE_ESCAPES must hold every line boundary of str.splitlines (\x1d and \x1e included)
    breaks = [chr(c) for c in range(0x10000) if len(f"a{chr(c)}b".splitlines()) > 1]
    assert "\x1d" in breaks and "\x1e" in breaks

    class Lines:
        def decode_target(self, ids):
            return "x".join(breaks)
    line = batch.GenerateJob().format([4], batch.Frontend(ReverseModel.config, Lines()))
    assert line.splitlines() == [line] and not set(breaks) & set(line)


def test_sources_of_the_same_length_are_batched_in_reading_order():
    batches = list(batch.plan_batches(items_of([3, 3, 3, 3, 3]), Batching(batch_size=2)))
    assert [[i.line for i in b] for b in batches] == [[1, 2], [3, 4], [5]]


def test_a_decoder_only_models_ids_are_checked_against_its_target_vocabulary():
    frontend = batch.Frontend({"architecture": "transformer", "kind": "decoder_only",
                               "src_vocab_size": 0, "tgt_vocab_size": 30})
    assert frontend.source_vocab_size == 30
    job = batch.GenerateJob(ids=True)
    assert job.parse(1, "4 29", frontend).source.tolist() == [4, 29]
    with pytest.raises(InputError, match=r"line 2: token id 30 outside \[0, 30\)"):
        job.parse(2, "4 30", frontend)


def test_encode_document_pooling_of_a_first_token_transformer_is_its_first_output():
    # --pool document (the default) writes what the model's classifier reads: with
    # config pooling="first" that is the first token's output, not the mean
    from attncore import models
    from attncore.train.transformer import TransformerConfig
    config = TransformerConfig(kind="encoder_only", src_vocab_size=30, tgt_vocab_size=0,
                               d_model=8, num_heads=2, dim_feedforward=12, num_encoder_layers=1,
                               num_decoder_layers=0, num_classes=2, pooling="first").to_dict()
    model = models.from_config(config, seed=1)
    sources = [np.array([4, 5, 6, 7]), np.array([9, 8])]
    document = batch.EncodeJob().run(model, sources)
    for vector, sequence in zip(document, model.encode(sources)):
        np.testing.assert_array_equal(vector, np.asarray(sequence, dtype=np.float32)[0])
