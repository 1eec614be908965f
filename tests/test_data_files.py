"""The tasks of your own files (attncore.data.files): tab files in, splits, vocabularies at each
level, and models trained on them that serve raw text."""
import json
import subprocess
import sys

import numpy as np
import pytest

import attncore
from attncore.data import get_task
from attncore.data.files import LabelledTask, PairsTask, read_tab_file
from conftest import subprocess_env

WORDS = "the cat dog sat ran on mat log big small red blue".split()


def write_pairs(path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(2, 6), replace=False))
        lines.append(" ".join(words) + "\t" + " ".join(reversed(words)).title() + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_labelled(path, n=120, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(3, 8), replace=False))
        lines.append(("pos" if "cat" in words else "neg") + "\t" + " ".join(words))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tab_files_name_the_line_that_is_not_two_fields(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("a b\tc\n\n  \nd\te\n", encoding="utf-8")
    assert read_tab_file(path) == [("a b", "c"), ("d", "e")]     # blank lines skipped
    path.write_bytes("\ufeffa b\tc\r\nd\te\r\n".encode("utf-8"))   # a BOM, CRLF ends
    assert read_tab_file(path) == [("a b", "c"), ("d", "e")]
    for text, found in [("a\tb\nno tab\n", "0 tabs"), ("a\tb\nx\ty\tz\n", "2 tabs"),
                        ("a\tb\n \ty\n", "an empty field")]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=rf"train '.*data.tsv' line 2: .*found {found}"):
            read_tab_file(path, "train")
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no examples"):
        read_tab_file(path)
    with pytest.raises(FileNotFoundError, match="valid: no file"):
        read_tab_file(tmp_path / "absent.tsv", "valid")
    # a directory or a device was "no file" too
    with pytest.raises(FileNotFoundError, match="train: '.*' is a directory"):
        read_tab_file(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="train: '/dev/null' is not a regular file"):
        read_tab_file("/dev/null", "train")


def test_pairs_splits_and_vocabularies(tmp_path):
    train = write_pairs(tmp_path / "train.tsv")
    task = get_task("pairs", seed=3, train=str(train))
    sizes = {split: task.num_examples(split) for split in ("train", "valid", "test")}
    assert sizes == {"train": 190, "valid": 10, "test": 10}
    assert task.examples("test") == task.examples("valid")       # no test file: the valid split
    assert get_task("pairs", seed=3, train=str(train)).examples("valid") == task.examples("valid")
    assert get_task("pairs", seed=4, train=str(train)).examples("valid") != task.examples("valid")
    held = set(task.examples("valid"))
    assert not held & set(task.examples("train"))
    # targets as the "words" vocabulary writes them back: lower-cased, the period split off
    source, target = task.examples("train")[0]
    assert target == target.lower() and target.endswith(" .")
    assert task.tgt_vocab.decode(task.encode_tgt(target)) == target
    assert task.src_vocab.tokens != task.tgt_vocab.tokens        # (the "." is the target's)
    shared = PairsTask(train=str(train), shared_vocab=True)
    assert shared.src_vocab is shared.tgt_vocab
    valid = write_pairs(tmp_path / "valid.tsv", n=7, seed=1)
    given = PairsTask(train=str(train), valid=str(valid), test=str(valid))
    assert given.num_examples("train") == 200 and given.num_examples("valid") == 7
    for level in ("char", "word"):
        task = PairsTask(train=str(train), level=level)
        assert task.src_vocab.level == level


def test_pairs_bpe_vocabularies_lower_case_served_text(tmp_path):
    pytest.importorskip("tokenizers")
    task = PairsTask(train=str(write_pairs(tmp_path / "train.tsv")), level="bpe", vocab_size=80,
                     lowercase=True)
    assert task.src_vocab.encode("The BIG Cat") == task.src_vocab.encode("the big cat")
    assert all(t == t.lower() for _, t in task.examples("train"))
    with pytest.raises(ValueError, match="lowercase applies to the 'words' and 'bpe' levels"):
        PairsTask(train=str(tmp_path / "train.tsv"), level="char", lowercase=True)


def test_character_level_pairs_score_bleu_on_characters(tmp_path):
    # (sacrebleu's 13a read each space-less output as one word: BLEU 0.00 beside 100% exact)
    pytest.importorskip("sacrebleu")
    path = tmp_path / "train.tsv"
    path.write_text("".join(f"{w}\t{w[::-1]}\n" for w in ("abcdef", "ghijkl", "mnopqr") * 20))
    task = PairsTask(train=str(path), level="char", holdout=0.3)
    targets = [t for _, t in task.examples("test")]
    assert task.bleu_tokenize == "char" and task.bleu(targets) == pytest.approx(100.0)
    assert PairsTask(train=str(path), level="word", holdout=0.3).bleu_tokenize == "13a"


def test_pairs_bpe_vocabularies_read_tabs_and_no_break_spaces_as_spaces(tmp_path):
    # (the saved normalizer was Lowercase or nothing: Metaspace splits on " " only, so a tab
    # or a no-break space in served text was <unk> and the next word lost its word start)
    pytest.importorskip("tokenizers")
    task = PairsTask(train=str(write_pairs(tmp_path / "train.tsv")), level="bpe", vocab_size=80)
    plain = task.src_vocab.encode("the cat sat")
    for spaced in ("the\tcat sat", "the\u00a0cat  sat", " the cat\u2009sat "):
        assert task.src_vocab.encode(spaced) == plain


@pytest.mark.parametrize("options, error, match", [
    ({}, ValueError, "needs a training file"),
    ({"level": "bytes"}, ValueError, "level must be one of"),
    ({"holdout": 1.0}, ValueError, "holdout must be a fraction"),
    ({"min_freq": 0}, ValueError, "min_freq must be a positive integer"),
    ({"train": 3}, TypeError, "train must be a file path"),
])
def test_pairs_options_are_checked(tmp_path, options, error, match):
    if options and "train" not in options:
        options = dict(options, train=str(write_pairs(tmp_path / "train.tsv")))
    with pytest.raises(error, match=match):
        PairsTask(**options)


def test_labelled_task(tmp_path):
    train = write_labelled(tmp_path / "train.tsv")
    task = get_task("labelled", train=str(train), max_len=4)
    assert task.labels == ["neg", "pos"] and task.num_classes == 2
    ids, lengths, labels = next(task.batches("train", 8))
    assert ids.shape[1] <= 4 and set(labels) <= {0, 1}
    bad = tmp_path / "valid.tsv"
    bad.write_text("neutral\tthe cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"valid: labels the training file does not have: "
                                         r"\['neutral'\]"):
        LabelledTask(train=str(train), valid=str(bad))
    one = tmp_path / "one.tsv"
    one.write_text("".join(f"pos\tthe cat {i}\n" for i in range(30)), encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2 labels"):
        LabelledTask(train=str(one))


def test_models_trained_on_your_files_serve_raw_text(tmp_path):
    from attncore.train.loop import train
    pairs = write_pairs(tmp_path / "pairs.tsv", n=300)
    options = {"train": str(pairs)}
    train("pairs", "transformer", tmp_path / "t", steps=300, batch_size=32, lr=3e-3,
          progress=False, task_options=options, d_model=32, num_heads=4, dim_feedforward=64,
          num_encoder_layers=1, num_decoder_layers=1)
    model = attncore.load(tmp_path / "t")
    task = PairsTask(train=str(pairs))
    sources, targets = zip(*task.examples("valid"))
    # raw, capitalised text in: the vocabulary lower-cases it as training did
    got = model.translate([s.upper() for s in sources])
    assert np.mean([g == t for g, t in zip(got, targets)]) >= 0.6, list(zip(got, targets))
    labelled = write_labelled(tmp_path / "lab.tsv")
    train("labelled", "transformer-classifier", tmp_path / "c", steps=40, batch_size=16,
          progress=False, task_options={"train": str(labelled)}, d_model=16, num_heads=2,
          dim_feedforward=32, num_encoder_layers=1)
    classifier = attncore.load(tmp_path / "c")
    assert classifier.config["labels"] == ["neg", "pos"]
    # evaluate --beam on a classifier was ignored silently
    from attncore.train.evaluate import main as evaluate_main
    with pytest.raises(SystemExit) as info:
        evaluate_main([str(tmp_path / "c"), "--beam", "4"])
    assert info.value.code == 2


def test_cli_trains_on_a_file_and_names_a_bad_line(tmp_path):
    write_pairs(tmp_path / "pairs.tsv", n=60)
    command = [sys.executable, "-m", "attncore", "train", "pairs", "--arch", "seq2seq-bahdanau",
               "--out", "m", "--steps", "3", "--no-progress", "--task-option",
               "train=pairs.tsv"]
    proc = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 3 and (tmp_path / "m" / "config.json").exists()
    (tmp_path / "pairs.tsv").write_text("a b\tc\nno tab\n", encoding="utf-8")
    proc = subprocess.run(command[:-1] + ["train=pairs.tsv", "--overwrite"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("attncore train: error: train 'pairs.tsv' line 2: expected "
                                   "two non-empty fields separated by one tab, found 0 tabs")


def test_tab_files_read_lines_as_the_command_line_does(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_bytes(b"a\tb\r\nc\rx\td\n\xef\xbb\xbfe\tf\n")   # a CR inside, a BOM mid-file
    assert read_tab_file(path) == [("a", "b"), ("c\rx", "d"), ("e", "f")]
    path.write_bytes(b"a\tb\nd\xfcr\tc\n")                       # latin-1
    with pytest.raises(ValueError, match=r"line 2: not valid UTF-8 .*save the file as UTF-8"):
        read_tab_file(path, "train")


@pytest.mark.parametrize("option", ["shared_vocab", "lowercase"])
def test_flag_options_must_be_booleans(tmp_path, option):
    # (--task-option shared_vocab=no reached the task as the string "no": true)
    train = write_pairs(tmp_path / "train.tsv")
    with pytest.raises(TypeError, match=f"{option} must be true or false, got 'no'"):
        PairsTask(train=str(train), **{option: "no"})


def test_holdouts_keep_duplicates_and_labels_whole(tmp_path):
    # a duplicated line was held out with its twin in training (34 of 38 held-out examples
    # seen in training); a label's only example could be held out, "missing" from training
    twice = tmp_path / "twice.tsv"
    twice.write_text(write_pairs(tmp_path / "train.tsv").read_text() * 2, encoding="utf-8")
    task = PairsTask(train=str(twice))
    train_sources = {s for s, _ in task.examples("train")}
    assert task.num_examples("valid") and \
        not {s for s, _ in task.examples("valid")} & train_sources
    labelled = write_labelled(tmp_path / "lab.tsv", n=60)
    with open(labelled, "a", encoding="utf-8") as f:
        f.write("rare label ✓\tthe one text of its label\n")
    for seed in range(20):
        task = LabelledTask(seed, train=str(labelled), holdout=0.3)
        assert "rare label ✓" in task.labels
        assert not {t for t, _ in task.examples("valid")} & {t for t, _ in task.examples("train")}
    one = tmp_path / "one.tsv"
    one.write_text("a\tb\na\tc\n", encoding="utf-8")              # one distinct source
    with pytest.raises(ValueError, match="holds none out for validation: give a valid file"):
        PairsTask(train=str(one))


def test_targets_as_the_vocabulary_writes_them_train_on_the_file_text(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("".join(f"x{i % 7}\thallo welt {i % 7} !\n" for i in range(40))
                    + "x9\tRare words here !\n", encoding="utf-8")
    task = PairsTask(train=str(path), valid=str(path), min_freq=2)
    assert ("x9", "<unk> <unk> <unk> !") in task.examples("valid")
    # batches encode the file's text: <unk> ids, not the pieces of the written "<unk>"
    src, _, tgt, _ = next(task.batches("valid", 64))
    row = [list(task.examples("valid")).index(("x9", "<unk> <unk> <unk> !"))][0]
    assert list(tgt[row][:6]) == [1, 3, 3, 3, task.tgt_vocab.token_to_id("!"), 2]


def test_a_long_example_is_refused_before_the_first_step(tmp_path):
    from attncore.train.loop import train
    path = write_pairs(tmp_path / "train.tsv", n=50)
    with open(path, "a", encoding="utf-8") as f:
        f.write(" ".join(["cat"] * 300) + "\tdog\n")
    # (numbered within its split, and said so: "train example 2" read as the file's line 2)
    with pytest.raises(ValueError, match=r"(train|valid)-split example \d+ \('cat cat .*'\.\.\.\) "
                                         r"has 301 tokens "
                                         r"\(source or <bos> \+ target\), more than "
                                         r"max_positions=256: raise --max-positions"):
        train("pairs", "transformer", tmp_path / "m", steps=5, progress=False,
              task_options={"train": str(path), "holdout": 0.5}, d_model=16, num_heads=2,
              dim_feedforward=16, num_encoder_layers=1, num_decoder_layers=1)
    assert not (tmp_path / "m" / "checkpoint").exists()


def test_resuming_after_the_training_file_changed_is_refused(tmp_path):
    # the options were the same, the file edited: the checkpoint's embedding rows then meant
    # other words, and the run went on with exit 0
    from attncore.train.loop import train
    path = write_pairs(tmp_path / "train.tsv", n=80)
    options = dict(task_options={"train": str(path)}, progress=False, hidden_size=16,
                   embed_dim=8, checkpoint_every=2)
    train("pairs", "seq2seq-bahdanau", tmp_path / "m", steps=2, **options)
    train("pairs", "seq2seq-bahdanau", tmp_path / "m", steps=3, resume=True, **options)
    path.write_text(path.read_text().replace("cat", "lion"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"trained with other data \(its training examples or "
                                         r"vocabularies changed\)"):
        train("pairs", "seq2seq-bahdanau", tmp_path / "m", steps=4, resume=True, **options)


def test_classifiers_cut_served_documents_as_training_did(tmp_path):
    from attncore.train.loop import train
    labelled = write_labelled(tmp_path / "lab.tsv")
    train("labelled", "transformer-classifier", tmp_path / "c", steps=2, progress=False,
          task_options={"train": str(labelled), "max_len": 3}, d_model=16, num_heads=2,
          dim_feedforward=16, num_encoder_layers=1, max_positions=4)
    model = attncore.load(tmp_path / "c")
    assert model.tokenizer.max_source_tokens == 3
    long = " ".join(["cat"] * 50)                        # past the 4 positions: cut, as trained
    assert list(model.tokenizer.encode_source("  " + long)) == [model.tokenizer.src.token_to_id(
        "cat")] * 3
    assert model.classify([model.tokenizer.encode_source(long)]).shape == (1, 2)


def test_evaluate_refuses_vocabularies_the_model_was_not_trained_with(tmp_path, capsys):
    from attncore.train.evaluate import main as evaluate_main
    from attncore.train.loop import train
    path = write_pairs(tmp_path / "train.tsv", n=120)
    train("pairs", "seq2seq-bahdanau", tmp_path / "m", steps=2, seed=5, progress=False,
          task_options={"train": str(path)}, hidden_size=16, embed_dim=8)
    assert evaluate_main([str(tmp_path / "m"), "--task", "pairs", "--seed", "5",
                          "--task-option", f"train={path}"]) == 0
    # by default the task, options and seed of the run (training.json)
    training = json.loads((tmp_path / "m" / "training.json").read_text())
    assert (training["task"], training["seed"], training["task_options"]) == \
        ("pairs", 5, {"train": str(path)})
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "m")]) == 0
    assert "pairs/test examples" in capsys.readouterr().out
    for argv, words in [(["--seed", "0", "--task-option", f"train={path}"],
                         "vocabulary is not the task's"),
                        (["--task-option", f"train={tmp_path / 'absent.tsv'}"], "no file"),
                        (["--seed", "5", "--task-option", f"train={path}", "--n", "0"],
                         "--n must be at least 1")]:
        with pytest.raises(SystemExit) as exited:
            evaluate_main([str(tmp_path / "m"), "--task", "pairs", *argv])
        assert exited.value.code == 2
        assert words in capsys.readouterr().err


def test_the_holdout_is_its_share_of_all_texts_spread_over_the_labels(tmp_path):
    # a share rounded per label gave small labels none: 20 labels of 9 texts held out 1 text,
    # and 400 + 10 x 9 texts held out only the big label's
    path = tmp_path / "lab.tsv"
    path.write_text("".join(f"L{label}\tdoc {label} {i}\n" for label in range(20)
                            for i in range(9)), encoding="utf-8")
    assert LabelledTask(train=str(path)).num_examples("valid") == 9
    path.write_text("".join(f"big\tbig {i}\n" for i in range(400))
                    + "".join(f"small{label}\tsmall {label} {i}\n" for label in range(10)
                              for i in range(9)), encoding="utf-8")
    held = [label for _, label in LabelledTask(train=str(path)).examples("valid")]
    assert len(held) == 24 and 0 < sum(label != "big" for label in held) <= 10
    # a label whose only text is shared with another label keeps it in training
    path.write_text("".join(f"A\ta {i}\nC\tc {i}\n" for i in range(20))
                    + "A\tshared text\nB\tshared text\n", encoding="utf-8")
    for seed in range(10):
        task = LabelledTask(seed, train=str(path), holdout=0.2)
        assert task.labels == ["A", "B", "C"] and ("shared text", "B") in task.examples("train")
    # a text filed under two labels stays on one side
    path.write_text("".join(f"A\ttext {i}\nB\ttext {i}\n" for i in range(200)), encoding="utf-8")
    task = LabelledTask(train=str(path), holdout=0.1)
    assert task.num_examples("valid") == 40
    assert not {t for t, _ in task.examples("valid")} & {t for t, _ in task.examples("train")}


def test_a_ran_language_model_keeps_a_prompts_trailing_space(tmp_path):
    # "the " asks for the next word: stripped, the model re-emitted the space
    from attncore.train.loop import train
    path = write_pairs(tmp_path / "train.tsv", n=40)
    train("pairs", "ran-lm", tmp_path / "lm", steps=1, progress=False,
          task_options={"train": str(path), "level": "char"}, d_model=16, num_heads=2,
          head_size=8, window_size=8, min_window_size=2)
    tokenizer = attncore.load(tmp_path / "lm").tokenizer
    space = tokenizer.src.token_to_id(" ")
    assert list(tokenizer.encode_source("  the ")) == [tokenizer.src.token_to_id(c)
                                                       for c in "the"] + [space]
    train("pairs", "seq2seq-bahdanau", tmp_path / "s2s", steps=1, progress=False,
          task_options={"train": str(path), "level": "char"}, hidden_size=8, embed_dim=4)
    assert space not in list(attncore.load(tmp_path / "s2s").tokenizer.encode_source(" the "))


def test_a_file_named_another_way_resumes_and_evaluates_from_elsewhere(tmp_path, monkeypatch,
                                                                       capsys):
    from attncore.train.evaluate import main as evaluate_main
    from attncore.train.loop import train
    write_pairs(tmp_path / "train.tsv", n=60)
    monkeypatch.chdir(tmp_path)
    options = dict(progress=False, hidden_size=8, embed_dim=4, checkpoint_every=1)
    train("pairs", "seq2seq-bahdanau", "m", steps=1, task_options={"train": "train.tsv"},
          **options)
    train("pairs", "seq2seq-bahdanau", "m", steps=2, resume=True,
          task_options={"train": "./train.tsv"}, **options)
    training = json.loads((tmp_path / "m" / "training.json").read_text())
    assert training["task_options"]["train"] == str(tmp_path / "train.tsv")
    from attncore.train.loop import _absolute_paths
    (tmp_path / "char").mkdir()               # (a value beside a directory of its name)
    assert _absolute_paths({"level": "char", "valid": "v.tsv"}) == \
        {"level": "char", "valid": str(tmp_path / "v.tsv")}
    monkeypatch.chdir(tmp_path.parent)
    assert evaluate_main([str(tmp_path / "m")]) == 0
    assert "pairs/test examples" in capsys.readouterr().out


def test_evaluate_n_limits_a_classifier_too(tmp_path):
    from attncore.train.evaluate import classification_accuracy
    from attncore.train.loop import train
    path = write_labelled(tmp_path / "lab.tsv", n=200)
    model, _ = train("labelled", "transformer-classifier", tmp_path / "c", steps=1,
                     progress=False, task_options={"train": str(path), "holdout": 0.2},
                     d_model=16, num_heads=2, dim_feedforward=16, num_encoder_layers=1)
    task = LabelledTask(train=str(path), holdout=0.2)
    assert classification_accuracy(model, task, "test", batch_size=16, n=21)["n_evaluated"] == 21
    assert classification_accuracy(model, task, "test")["n_evaluated"] == task.num_examples("test")


def test_a_language_model_on_two_vocabularies_names_the_option_that_shares_one(tmp_path):
    from attncore.train.loop import train
    path = write_pairs(tmp_path / "train.tsv", n=40)
    with pytest.raises(ValueError, match=r"share one vocabulary \(pairs: --task-option "
                                         r"shared_vocab=true\)"):
        train("pairs", "transformer-lm", tmp_path / "m", steps=1, progress=False,
              task_options={"train": str(path)}, d_model=16, num_heads=2, dim_feedforward=16)


def test_labelled_documents_are_cut_to_their_first_max_len_tokens(tmp_path):
    train = write_labelled(tmp_path / "train.tsv")
    cut = get_task("labelled", train=str(train), max_len=4)
    whole = get_task("labelled", train=str(train))
    text = "the cat " * 5
    assert len(whole.encode(text)) == 10
    assert cut.encode(text) == whole.encode(text)[:4]
    ids, lengths, _ = next(cut.batches("train", 120))
    assert lengths.max() == 4 and ids.shape[1] == 4
