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
    one.write_text("pos\tthe cat\npos\ta dog\n", encoding="utf-8")
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
