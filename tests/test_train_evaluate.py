"""attncore.train.evaluate: greedy exact match, ambiguous inputs left out, the CLI."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from attncore.data import Vocab, get_task, metrics, pad_sequences
from attncore.data.task import Seq2SeqTask
from attncore.train import train
from attncore.train.evaluate import exact_match, main as evaluate_main

TOY = dict(num_train=600, num_valid=32, num_test=40, num_symbols=5, min_len=2, max_len=5)


class ListTask(Seq2SeqTask):
    """A char-level task over fixed pairs; sources starting with "?" are ambiguous."""

    name = "list"

    def __init__(self, pairs):
        super().__init__()
        self.pairs = list(pairs)
        self.src_vocab = Vocab(sorted(set("".join(s for s, _ in pairs))), level="char")
        self.tgt_vocab = Vocab(sorted(set("".join(t for _, t in pairs)) | set("0123456789-")), level="char")

    def _make_examples(self, split):
        return self.pairs

    @staticmethod
    def is_ambiguous(src):
        return src.startswith("?")


class ScriptedModel:
    """Greedy 'decoder' that writes a fixed answer per source (looked up by its ids)."""

    def __init__(self, task, answers, raw=None):
        self.config = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2)
        self.task = task
        self.answers = {tuple(task.encode_src(s)): a for s, a in answers.items()}
        self.raw = raw or {}
        self.calls = []

    def greedy_decode(self, src, src_lengths, max_len):
        self.calls.append(len(src))
        rows = []
        for ids, n in zip(src, src_lengths):
            key = tuple(int(i) for i in ids[:n])
            rows.append(self.raw.get(key) or self.task.tgt_vocab.encode(self.answers[key], add_eos=True))
        out, _ = pad_sequences(rows)
        return out[:, :max_len]


def test_exact_match_counts_and_skips_ambiguous():
    pairs = [("a", "1"), ("b", "22"), ("?c", "3"), ("ab", "12"), ("?ba", "21"), ("bb", "2-2")]
    task = ListTask(pairs)
    # right, wrong, (ambiguous), right, (ambiguous, would be wrong), wrong by a prefix
    answers = {"a": "1", "b": "2", "?c": "3", "ab": "12", "?ba": "00", "bb": "2-"}
    model = ScriptedModel(task, answers)
    accuracy, count = exact_match(model, task, split="test", batch_size=2)
    assert count == 4
    assert accuracy == pytest.approx(2 / 4)
    assert model.calls == [2, 2]  # only the four unambiguous sources were decoded, in batches of 2
    assert exact_match(model, task, n=2) == (pytest.approx(0.5), 2)
    assert exact_match(model, task, n=1) == (1.0, 1)


def test_exact_match_counts_stray_specials_as_errors():
    task = ListTask([("a", "12"), ("b", "12")])
    bos = task.tgt_vocab.bos
    one, two = task.tgt_vocab.encode("1")[0], task.tgt_vocab.encode("2")[0]
    # "b" decodes to 1 <bos> 2 <eos>: Vocab.decode would drop the <bos> and read "12".
    model = ScriptedModel(task, {"a": "12"}, raw={tuple(task.encode_src("b")): [one, bos, two, 2]})
    assert exact_match(model, task) == (0.5, 2)


def test_exact_match_dates_ambiguity_rule():
    # A task named "dates" without its own is_ambiguous uses attncore.data.dates.is_ambiguous.
    task = ListTask([("04/10/1885", "1885-04-10"), ("13/10/1885", "1885-10-13"), ("03/03/98", "1998-03-03")])
    task.is_ambiguous = None
    task.name = "dates"
    model = ScriptedModel(task, {"04/10/1885": "1885-10-04", "13/10/1885": "1885-10-13", "03/03/98": "1998-03-03"})
    assert exact_match(model, task) == (1.0, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("copy")
    model, _ = train("copy", "seq2seq-bahdanau", out, steps=30, batch_size=32, lr=1e-2, schedule="constant",
                     warmup_steps=0, progress=False, task_options=TOY, embed_dim=8, hidden_size=16)
    return model, out


def test_exact_match_of_a_trained_model_matches_a_hand_count(trained):
    model, _ = trained
    task = get_task("copy", seed=0, **TOY)
    pairs = task.examples("test")
    src, lengths = pad_sequences([task.encode_src(s) for s, _ in pairs])
    tokens = model.greedy_decode(src, lengths, 12)
    expected = np.mean([task.decode_tgt(row) == t for row, (_, t) in zip(tokens, pairs)])
    for batch_size in (7, 64):
        accuracy, count = exact_match(model, task, "test", batch_size=batch_size)
        assert count == len(pairs) == 40
        assert accuracy == pytest.approx(expected)


def test_cli_prints_exact_match(trained, capsys):
    _, out = trained
    options = [f"--task-option={k}={v}" for k, v in TOY.items()]
    assert evaluate_main([str(out), "--task", "copy", "--n", "10", "--json", *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_evaluated"] == 10
    # the figure of the saved model, as exact_match gives it (not merely a number in [0, 1])
    from attncore.train.export import load_model
    task = get_task("copy", seed=0, **TOY)
    expected, count = exact_match(load_model(out), task, "test", n=10)
    assert count == 10 and result["exact_match"] == pytest.approx(expected)
    assert evaluate_main([str(out), "--task", "copy", *options]) == 0
    assert f"exact match {exact_match(load_model(out), task, 'test')[0]:.4%}" in capsys.readouterr().out


def test_engine_beam_1_decodes_as_the_trainer_greedy(trained):
    # The engine's beam search of width 1 is greedy decoding on the same weights: same texts.
    model, out = trained
    from attncore.train.evaluate import engine_decode_texts
    task = get_task("copy", seed=0, **TOY)
    sources = [s for s, _ in task.examples("test")]
    accuracy, count, details = exact_match(model, task, "test", return_details=True)
    assert engine_decode_texts(out, task, sources, beam_size=1, max_len=12) == [d[2] for d in details]
    beam = exact_match(model, task, "test", decode=lambda s, n: engine_decode_texts(out, task, s, beam_size=3,
                                                                                     max_len=n))
    assert beam[1] == count and 0.0 <= beam[0] <= 1.0


def test_cli_names_a_model_directory_that_is_not_there(tmp_path, capsys):
    # (it asked for --task: "... has no training.json naming the task it was trained on")
    with pytest.raises(SystemExit) as exit_:
        evaluate_main([str(tmp_path / "nosuch")])
    assert exit_.value.code == 2
    assert f"model directory '{tmp_path / 'nosuch'}' does not exist" in capsys.readouterr().err


def test_cli_reports_bleu_for_a_task_with_bleu(trained, capsys, monkeypatch):
    pytest.importorskip("sacrebleu")
    _, out = trained
    from attncore.data import toys
    from attncore.data.metrics import bleu
    monkeypatch.setattr(toys.ToyTask, "bleu", lambda self, hyps, split="test": 0.0, raising=False)
    options = [f"--task-option={k}={v}" for k, v in TOY.items()]
    assert evaluate_main([str(out), "--task", "copy", "--json", "--beam", "2", *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decoder"] == "engine beam 2"
    # corpus BLEU of the same beam-2 decodings (not merely a number in [0, 100])
    from attncore.train.evaluate import engine_decode_texts
    from attncore.train.export import load_model
    task = get_task("copy", seed=0, **TOY)
    accuracy, _, details = exact_match(
        load_model(out), task, "test", return_details=True,
        decode=lambda s, n: engine_decode_texts(out, task, s, beam_size=2, max_len=n))
    expected = bleu([d[2] for d in details], [d[1] for d in details])
    assert 0.0 < expected < 100.0   # (a score that tells a wrong figure from the right one)
    assert result["bleu"] == pytest.approx(expected) and result["exact_match"] == pytest.approx(accuracy)
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


class _Classifier:
    """Predicts label 1 when the document contains id 5, else 0."""
    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, ids, lengths):
        logits = np.zeros((len(ids), 3))
        logits[np.arange(len(ids)), (ids == 5).any(axis=1).astype(int)] = 1.0
        return SimpleNamespace(data=logits)


def test_classification_accuracy_counts_a_confusion_matrix():
    from attncore.train.evaluate import classification_accuracy
    docs = [[5, 6], [6], [7, 5], [6, 6], [5]]
    truth = np.array([1, 0, 1, 2, 0])
    task = SimpleNamespace(labels=["a", "b", "c"],
                           batches=lambda split, n: [(*pad_sequences(docs), truth)])
    result = classification_accuracy(_Classifier(), task, "test")
    assert result["n_evaluated"] == 5
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["majority_baseline"] == pytest.approx(2 / 5)
    assert result["per_class"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_a_decoder_only_models_greedy_decodes_as_the_engine(tmp_path):
    # The trainer's greedy decoder gave a decoder-only model its padded source batch plus
    # <bos> as the prefix (exact match 0.0 where the engine got 0.83 after 300 steps); now each
    # unpadded "source <eos>" is the prompt, as training and the engine's generate read it.
    from attncore.train.evaluate import engine_decode_texts
    model, _ = train("copy", "transformer-lm", tmp_path, steps=40, batch_size=32, lr=3e-3,
                     schedule="constant", warmup_steps=0, progress=False, task_options=TOY,
                     d_model=16, num_heads=2, dim_feedforward=32, num_decoder_layers=1,
                     dtype="float32")
    task = get_task("copy", seed=0, **TOY)
    _, count, details = exact_match(model, task, "test", return_details=True)   # (ragged)
    _, _, engine = exact_match(model, task, "test", return_details=True, decode=lambda s, n:
                               engine_decode_texts(tmp_path, task, s, beam_size=1, max_len=n))
    assert count == len(task.examples("test")) and details == engine


def test_evaluate_refuses_a_model_that_does_not_fit_the_task(trained, capsys):
    # a model of another task or task options came out as AttributeError / IndexError
    _, out = trained
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(out), "--task", "copy", "--task-option=num_symbols=9",
                       *[f"--task-option={k}={v}" for k, v in TOY.items() if k != "num_symbols"]])
    assert exit_info.value.code == 2
    assert "does not fit task 'copy': its src_vocab_size is" in capsys.readouterr().err


def test_engine_decodings_write_a_stray_pad_or_bos_as_the_trainer_greedy_does(monkeypatch):
    # the trainer's decoder writes them out (an error when scored); the engine's path dropped
    # them, so the same output scored right there
    import attncore
    from attncore.train.evaluate import _text, engine_decode_texts
    task = get_task("copy", seed=0, **TOY)
    row = [5, 0, 6, 1, 7]

    class Engine:
        config = {"eos_id": 2}

        def generate(self, sources, **options):
            return [SimpleNamespace(tokens=row) for _ in sources]

    monkeypatch.setattr(attncore, "load", lambda path: Engine())
    got = engine_decode_texts("unused", task, ["a"], max_len=8)
    assert got == [_text(task, row + [2], 2)] and "<pad>" in got[0] and "<bos>" in got[0]


def test_evaluate_errors_are_one_line(trained, tmp_path, capsys):
    # a bad vocabulary file was a 15-line traceback; a load error took two lines
    import shutil
    _, out = trained
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "src_vocab.json").write_text("[1, 2]")
    for args, fragment in (([str(broken)], "src_vocab.json"),
                           ([str(tmp_path / "nowhere"), "--task", "copy"], "does not exist"),
                           ([str(out), "--errors", "-1"], "--errors must be >= 0"),
                           ([str(out), "--seed", "-1"], "--seed must be >= 0")):
        with pytest.raises(SystemExit) as info:
            evaluate_main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err


def _edited_copy(out, tmp_path, name, edit):
    """A copy of model directory ``out`` with ``edit(weights)`` applied to its weights."""
    import shutil
    from safetensors.numpy import load_file, save_file
    copy = tmp_path / name
    shutil.copytree(out, copy)
    weights = load_file(str(copy / "model.safetensors"))
    edit(weights)
    save_file(weights, str(copy / "model.safetensors"))
    return copy


def test_evaluate_refuses_a_broken_model_instead_of_scoring_it(trained, tmp_path, capsys):
    # NaN weights: the trainer's greedy decoder took the argmax of NaN logits and evaluate
    # printed "exact match 0.0%" (a classifier: the majority class's share); finite weights
    # whose logits overflow did the same. The engine path (--beam) already refused them.
    _, out = trained
    nan = _edited_copy(out, tmp_path, "nan", lambda w: w["decoder.output.bias"].__setitem__(3, np.nan))
    huge = _edited_copy(out, tmp_path, "huge",
                        lambda w: w["decoder.output.weight"].__imul__(np.float32(3e38)))
    options = [f"--task-option={k}={v}" for k, v in TOY.items()]
    for model_dir, fragment in ((nan, "tensor 'decoder.output.bias' holds NaN or infinity"),
                                (huge, "logits are not finite")):
        with pytest.raises(SystemExit) as info:
            evaluate_main([str(model_dir), "--task", "copy", *options])
        err = capsys.readouterr().err
        assert info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_refuses_an_empty_split(trained, capsys):
    # (BLEU tasks failed with sacrebleu's IndexError traceback; the others printed 0.0%)
    _, out = trained
    options = [f"--task-option={k}={v}" for k, v in {**TOY, "num_test": 0}.items()]
    with pytest.raises(SystemExit) as info:
        evaluate_main([str(out), "--task", "copy", *options])
    assert info.value.code == 2
    assert "the test split of task 'copy' holds no examples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="BLEU needs at least one sentence"):
        metrics.bleu([], [])


def _labelled_classifier(tmp_path, examples, steps):
    """A tiny transformer classifier trained on the ``labelled`` task's (label, text) lines,
    written to tmp_path / "data.tsv"; returns its model directory, tmp_path / "m"."""
    (tmp_path / "data.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in examples))
    out = tmp_path / "m"
    train("labelled", "transformer-classifier", out, steps=steps, batch_size=8, progress=False,
          task_options={"train": str(tmp_path / "data.tsv")}, d_model=8, num_heads=2,
          dim_feedforward=8, num_encoder_layers=1)
    return out


def test_a_model_whose_vocabulary_reads_text_by_older_rules_is_refused_for_that(tmp_path,
                                                                               capsys):
    # a version-1 vocabulary (attncore before 2026-12-07): the task rebuilds a version-2 one,
    # and evaluate said "does not fit ... (another task, or other --task-option or --seed?)"
    out = _labelled_classifier(tmp_path, [("pos" if i % 2 else "neg", f"word{i} text")
                                          for i in range(40)], steps=1)
    assert evaluate_main([str(out)]) == 0
    capsys.readouterr()
    (vocab_file,) = [p for p in out.iterdir() if p.name.endswith("vocab.json")]
    data = json.loads(vocab_file.read_text())
    vocab_file.write_text(json.dumps(dict(data, version=1)))   # (the same tokens: evaluated)
    assert evaluate_main([str(out)]) == 0
    capsys.readouterr()
    tokens = data["tokens"][:-1] + ["wörd"]   # (tokens the task no longer builds)
    vocab_file.write_text(json.dumps(dict(data, version=1, tokens=tokens)))
    with pytest.raises(SystemExit) as info:
        evaluate_main([str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "its source vocabulary reads text by other rules" in err
    assert "--seed" not in err


_EVALUATE_SIGNALLED = """
import signal, sys
from attncore.train import evaluate
def exact_match(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    raise AssertionError("not stopped")
evaluate.exact_match = exact_match
print(evaluate.main(sys.argv[1:]))
"""


def test_sigterm_stops_evaluate_with_one_line(trained, tmp_path):
    # Ctrl-C printed a traceback, SIGTERM ended it silently
    import subprocess
    import sys

    from conftest import subprocess_env
    _, out = trained
    (tmp_path / "run.py").write_text(_EVALUATE_SIGNALLED)
    options = [f"--task-option={k}={v}" for k, v in TOY.items()]
    proc = subprocess.run([sys.executable, "run.py", str(out), "--task", "copy", *options],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode, proc.stdout.strip()) == (0, "143"), proc.stderr
    assert proc.stderr.splitlines() == ["python -m attncore.train.evaluate: stopped by SIGTERM"]


# -- command-line paths: classifier --json, --errors, the dates task's --n ----------------------

def test_cli_classifier_json_holds_its_accuracy(tmp_path, capsys):
    from attncore.train.evaluate import classification_accuracy
    from attncore.train.export import load_model
    out = _labelled_classifier(tmp_path, [("pos" if i % 3 else "neg", f"word{i % 7} text")
                                          for i in range(60)], steps=2)
    assert evaluate_main([str(out), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    task = get_task("labelled", seed=0, train=str(tmp_path / "data.tsv"))
    expected = classification_accuracy(load_model(out), task, "test")
    assert result["task"] == "labelled" and result["split"] == "test"
    assert expected["n_evaluated"] > 0
    assert {k: result[k] for k in expected} == expected   # (accuracy, baseline, per class...)


def test_cli_errors_lists_the_first_wrong_decodings(trained, capsys):
    _, out = trained
    from attncore.train.export import load_model
    options = [f"--task-option={k}={v}" for k, v in TOY.items()]
    task = get_task("copy", seed=0, **TOY)
    _, _, details = exact_match(load_model(out), task, "test", return_details=True)
    wrong = [d for d in details if d[1] != d[2]]
    assert len(wrong) > 2, "the fixture's model must make errors for this test"
    assert evaluate_main([str(out), "--task", "copy", "--errors", "2", *options]) == 0
    captured = capsys.readouterr()
    assert f"({len(wrong)} wrong)" in captured.out
    assert captured.err.splitlines() == [f"  {s!r}: expected {t}, got {h}" for s, t, h in wrong[:2]]
    assert evaluate_main([str(out), "--task", "copy", *options]) == 0   # (default: none)
    assert capsys.readouterr().err == ""


def test_cli_n_sizes_the_dates_split_it_evaluates(capsys):
    # --n N generates the dates split with num_<split>=N: the train split, which holds
    # ambiguous inputs, gives fewer than N
    from pathlib import Path

    import attncore
    from attncore.train.evaluate import ambiguity_check
    dates = Path(attncore.__file__).parent / "assets" / "dates"   # (the bundled dates model)
    task = get_task("dates", seed=0, num_train=30)
    expected = sum(not ambiguity_check(task)(s) for s, _ in task.examples("train"))
    assert expected < 30
    for split, n, count in (("train", 30, expected), ("test", 7, 7)):
        assert evaluate_main([str(dates), "--task", "dates", "--split", split, "--n", str(n),
                              "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["split"], result["n_evaluated"]) == (split, count)
        assert result["exact_match"] == 1.0   # (the bundled model reads these dates right)
