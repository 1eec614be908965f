"""End-to-end: tiny trainings per architecture, export/reload, resume, determinism, CLI."""

import json
import re

import numpy as np
import pytest

from attncore import io
from attncore.data import Vocab, pad_sequences
from attncore.train import autograd as ag
from attncore.train import train
from attncore.train.cli import main as cli_main
from attncore.train.export import load_model
from attncore.train.loop import BatchStream, build_model, fit, prefix_lm_batch, seq2seq_loss
from attncore.train.optim import Adam, make_schedule

TOY = dict(num_train=1000, num_valid=64, num_test=16, num_symbols=6, min_len=2, max_len=6)
SMALL_TRANSFORMER = dict(d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)
SMALL_RNN = dict(embed_dim=16, hidden_size=24)


class ContainsZeroTask:
    """Local classification task: does the symbol list contain "0"? (labels no / yes)."""

    name = "contains-zero"

    def __init__(self, seed=0, size=512):
        self.src_vocab = Vocab([str(k) for k in range(6)], level="word")
        self.labels = ["no", "yes"]
        rng = np.random.default_rng(seed)
        self.data = {}
        for split, count in (("train", size), ("valid", 64)):
            docs = [list(rng.integers(0, 6, size=rng.integers(2, 8))) for _ in range(count)]
            ids = [[s + 4 for s in doc] for doc in docs]
            self.data[split] = (ids, np.array([int(0 in doc) for doc in docs]))

    def batches(self, split, batch_size, *, shuffle=False, seed=0):
        ids, labels = self.data[split]
        order = np.random.default_rng(seed).permutation(len(ids)) if shuffle else np.arange(len(ids))
        for start in range(0, len(ids), batch_size):
            index = order[start:start + batch_size]
            padded, lengths = pad_sequences([ids[i] for i in index])
            yield padded, lengths, labels[index]


def _falls(history, ratio):
    losses = [h["loss"] for h in history]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < ratio * first, f"loss fell only from {first:.3f} to {last:.3f}"
    return first, last


@pytest.mark.parametrize("arch,options,steps,ratio", [
    ("seq2seq-bahdanau", dict(SMALL_RNN, rnn_type="gru"), 60, 0.55),
    ("seq2seq-luong", dict(SMALL_RNN, rnn_type="lstm"), 60, 0.55),
    ("transformer", SMALL_TRANSFORMER, 80, 0.6),
    ("transformer-prenorm", SMALL_TRANSFORMER, 80, 0.6),
    ("transformer-lm", dict(d_model=16, num_heads=2, num_decoder_layers=2, dim_feedforward=32), 80, 0.7),
])
def test_tiny_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path, arch, options, steps, ratio):
    model, result = train("reverse", arch, tmp_path, steps=steps, batch_size=16, lr=0.01, schedule="constant",
                          warmup_steps=5, task_options=TOY, progress=False, **options)
    _falls(result.history, ratio)
    config, weights = io.load_model_dir(tmp_path)
    assert config["tokenizer"] == {"type": "attncore.data.vocab", "src": "src_vocab.json", "tgt": "tgt_vocab.json"}
    assert (tmp_path / "src_vocab.json").is_file()
    reloaded = load_model(tmp_path)
    src, src_lengths, tgt, _ = next(iter(_toy_batches()))
    model.eval()
    with ag.no_grad():
        if arch == "transformer-lm":
            inputs, lengths, _ = prefix_lm_batch((src, src_lengths, tgt, _))
            expected, actual = model(inputs, lengths), reloaded(inputs, lengths)
        else:
            expected, actual = model(src, src_lengths, tgt[:, :-1]), reloaded(src, src_lengths, tgt[:, :-1])
    np.testing.assert_array_equal(actual.data, expected.data)


def test_tiny_encoder_only_classifier_learns(tmp_path):
    task = ContainsZeroTask()
    model, result = train(task, "transformer-classifier", tmp_path, steps=80, batch_size=32, lr=0.01,
                          schedule="constant", warmup_steps=5, progress=False, eval_every=40, **SMALL_TRANSFORMER)
    _falls(result.history, 0.75)
    assert [e["step"] for e in result.evaluations] == [40, 80]
    assert result.evaluations[-1]["valid_accuracy"] > 0.75
    assert io.load_model_dir(tmp_path)[0]["kind"] == "encoder_only"


def test_trained_seq2seq_decodes_the_task(tmp_path):
    # Longer than the others (a few seconds): greedy decoding must actually solve "copy".
    model, _ = train("copy", "seq2seq-bahdanau", tmp_path, steps=250, batch_size=32, lr=0.01, schedule="constant",
                     warmup_steps=5, task_options=dict(TOY, max_len=5), progress=False, **SMALL_RNN)
    src, src_lengths, tgt, tgt_lengths = next(iter(_toy_batches(kind="copy", max_len=5)))
    predicted = model.greedy_decode(src, src_lengths, max_len=tgt.shape[1])
    exact = [list(p[: l - 1]) == list(t[1:l]) for p, t, l in zip(predicted, tgt, tgt_lengths)]
    assert np.mean(exact) > 0.7, f"only {np.mean(exact):.2f} of the sequences copied exactly"


def _toy_batches(kind="reverse", max_len=6):
    from attncore.data import get_task

    return get_task(kind, seed=0, **dict(TOY, max_len=max_len)).batches("valid", 16)


# -- determinism and resume -------------------------------------------------------------------------

def _fit(tmp_path, steps, seed=0, resume=False, checkpoint_every=0, dropout=0.2):
    from attncore.data import get_task

    task = get_task("reverse", seed=0, **TOY)
    model = build_model("seq2seq-bahdanau", len(task.src_vocab), len(task.tgt_vocab), seed=seed, dropout=dropout,
                        embed_dim=8, hidden_size=8)
    optimizer = Adam(model.named_parameters(), lr=0.01)
    stream = BatchStream(lambda epoch: task.batches("train", 128, shuffle=True, seed=seed * 1000 + epoch))
    fit(model, optimizer, stream, seq2seq_loss(label_smoothing=0.1), steps, schedule=make_schedule("cosine", 0.01, 3, 12),
        checkpoint_dir=tmp_path / "checkpoint", checkpoint_every=checkpoint_every, resume=resume, progress=False)
    return model, stream


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    # 1000 examples / 128 per batch = 8 batches per epoch: 12 steps cross an epoch boundary.
    uninterrupted, _ = _fit(tmp_path / "a", 12)
    _fit(tmp_path / "b", 5, checkpoint_every=5)             # stops after writing the step-5 checkpoint
    resumed, stream = _fit(tmp_path / "b", 12, resume=True)
    assert stream.epoch == 1
    for name, value in uninterrupted.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 12


def test_resume_without_restoring_would_differ(tmp_path):
    # Guards the test above: restarting from scratch for the last 7 steps gives other weights.
    uninterrupted, _ = _fit(tmp_path / "a", 12)
    restarted, _ = _fit(tmp_path / "c", 7)
    assert any(not np.array_equal(restarted.state_dict()[n], v) for n, v in uninterrupted.state_dict().items())


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    first, _ = _fit(tmp_path / "1", 4, seed=5)
    second, _ = _fit(tmp_path / "2", 4, seed=5)
    other, _ = _fit(tmp_path / "3", 4, seed=6)
    for name, value in first.state_dict().items():
        np.testing.assert_array_equal(second.state_dict()[name], value)
    assert not np.array_equal(other.state_dict()["decoder.output.weight"], first.state_dict()["decoder.output.weight"])


# -- progress bar and CLI ---------------------------------------------------------------------------

def test_progress_bar_reports_loss_accuracy_and_tokens_per_second_on_a_terminal(tmp_path,
                                                                              monkeypatch):
    import io as text_io
    import sys

    class Terminal(text_io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train("copy", "transformer", tmp_path, steps=3, batch_size=8, task_options=TOY, progress=True,
          **SMALL_TRANSFORMER)
    err = terminal.getvalue()
    assert "\r" in err and "3/3" in err   # (bar frames)
    assert "loss=" in err and "acc=" in err and "tok_s=" in err
    assert ": step 1/3: loss=" not in err   # (the log file's lines are not written there)


def test_progress_lines_go_to_stderr_only(tmp_path, capsys, monkeypatch):
    import sys
    train("copy", "transformer", tmp_path, steps=3, batch_size=8, task_options=TOY, progress=True,
          **SMALL_TRANSFORMER)
    captured = capsys.readouterr()
    assert "loss=" in captured.err and "loss=" not in captured.out
    monkeypatch.setattr(sys, "stderr", None)   # (print(file=None) writes to stdout)
    train("copy", "transformer", tmp_path / "b", steps=3, batch_size=8, task_options=TOY,
          progress=True, **SMALL_TRANSFORMER)
    assert "loss=" not in capsys.readouterr().out


def test_a_log_file_gets_plain_lines_not_bar_frames(tmp_path, capsys):
    # stderr redirected to a file filled it with carriage-return bar frames
    train("copy", "transformer", tmp_path, steps=40, batch_size=8, task_options=TOY,
          progress=True, **SMALL_TRANSFORMER)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if re.search(r": step \d+/40: loss=", line)]
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in lines] == \
        list(range(2, 41, 2))
    assert all("acc=" in line and "tok_s=" in line for line in lines)


def test_cli_trains_and_exports(tmp_path, capsys):
    status = cli_main(["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path), "--steps", "3",
                       "--batch-size", "8", "--hidden-size", "8", "--embed-dim", "4", "--no-progress",
                       "--task-option", "num_train=200", "--task-option", "max_len=4"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    config, _ = io.load_model_dir(tmp_path)
    assert config["hidden_size"] == 8 and config["embed_dim"] == 4 and config["rnn_type"] == "gru"


@pytest.mark.parametrize("option, value, fragment", [
    ("--steps", "0", "--steps: expected a finite number >= 1"),        # exported a random model
    ("--lr", "nan", "--lr: expected a finite number > 0.0"),           # exported NaN weights
    ("--lr", "-1", "--lr: expected a finite number > 0.0"),
    ("--label-smoothing", "5", "< 1.0"),
    ("--clip-norm", "nan", "--clip-norm: expected a finite number"),
    ("--weight-decay", "-1", "--weight-decay: expected a finite number >= 0.0"),
    ("--eval-batches", "0", "--eval-batches: expected a finite number >= 1"),
    ("--d-model", "0", "--d-model: expected a finite number >= 1"),        # ZeroDivisionError
    ("--hidden-size", "0", "--hidden-size: expected a finite number >= 1"),
    ("--dropout", "-0.5", "--dropout: expected a finite number >= 0.0 and < 1.0"),  # taken as 0
])
def test_cli_refuses_meaningless_training_numbers(tmp_path, capsys, option, value, fragment):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # one line, as every attncore command (it printed a 30-line usage block first)
    assert fragment in err and len(err.strip().splitlines()) == 1 and "usage:" not in err
    assert err.startswith("attncore train: error: ")


@pytest.mark.parametrize("option, value, error, fragment", [
    ("steps", 0, ValueError, "steps must be a finite number >= 1, got 0"),   # exported untrained
    ("steps", -5, ValueError, "steps must be a finite number >= 1"),
    ("steps", 2.5, TypeError, "steps must be an int, got float"),
    ("lr", 0, ValueError, "lr must be a finite number > 0.0, got 0"),        # never moved
    ("lr", -1, ValueError, "lr must be a finite number > 0.0"),   # (it blamed min_lr)
    ("lr", float("nan"), ValueError, "lr must be a finite number > 0.0"),
    ("label_smoothing", 1.5, ValueError, "label_smoothing must be a finite number >= 0.0 and "
                                         "< 1.0, got 1.5"),
    ("weight_decay", -1.0, ValueError, "weight_decay must be a finite number >= 0.0"),
    ("clip_norm", -1, ValueError, "clip_norm must be a finite number >= 0.0"),
    ("batch_size", True, TypeError, "batch_size must be an int, got bool"),
    ("warmup_steps", "10", TypeError, "warmup_steps must be an int, got str"),
    ("steps", 10 ** 400, ValueError, "steps must be a finite number >= 1"),  # (OverflowError)
])
def test_train_refuses_what_the_command_line_refuses(tmp_path, option, value, error, fragment):
    # the command line's bounds held for `attncore train` only: the Python API trained with
    # them and exported a model
    options = dict(steps=1, batch_size=2, progress=False, embed_dim=8, hidden_size=8,
                   task_options={"num_train": 20})
    options[option] = value
    with pytest.raises(error, match=re.escape(fragment)):
        train("copy", "seq2seq-bahdanau", tmp_path / "m", **options)
    assert not (tmp_path / "m" / "config.json").exists()


def test_cli_task_option_without_a_value_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path / "m"),
                  "--task-option", "num_train"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--task-option needs KEY=VALUE, got 'num_train'" in err


def test_cli_names_a_bad_out_and_task_option_without_a_traceback(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit):   # before any step (it failed after all of them)
        cli_main(["copy", "--arch", "seq2seq-bahdanau", "--out", str(a_file), "--steps", "1"])
    assert "is a file, not a model directory" in capsys.readouterr().err
    status = cli_main(["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path / "m"),
                       "--steps", "1", "--no-progress", "--task-option", "nmu_train=5"])
    assert status == 2 and "nmu_train" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_a_diverged_run_stops_and_exports_nothing(tmp_path, capsys):
    # a learning rate of 1e30 used to write a NaN model (and checkpoint) and exit 0
    status = cli_main(["copy", "--arch", "transformer", "--out", str(tmp_path / "m"),
                       "--steps", "20", "--batch-size", "16", "--no-progress", "--lr", "1e30",
                       "--schedule", "constant", "--warmup-steps", "0", "--clip-norm", "0",
                       "--checkpoint-every", "1", "--d-model", "8", "--num-heads", "2",
                       "--task-option", "num_train=64", "--task-option", "max_len=6"])
    err = capsys.readouterr().err
    assert status == 1 and "training diverged at step" in err and "nothing was" in err
    assert not (tmp_path / "m" / "model.safetensors").exists()
    checkpoint = tmp_path / "m" / "checkpoint" / "checkpoint.safetensors"
    if checkpoint.exists():   # any checkpoint written holds only finite weights
        from safetensors.numpy import load_file
        assert all(np.all(np.isfinite(a)) for a in load_file(str(checkpoint)).values())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("arch", ["seq2seq-bahdanau", "seq2seq-luong"])
def test_a_run_diverged_to_a_finite_loss_exports_nothing(tmp_path, capsys, arch):
    # lr 1e30: weights near 1e30 but finite, "loss": 3.6e29 printed, exit 0 and a model whose
    # every float32 forward overflowed; a loss past 100 x log(vocabulary) now stops the run
    status = cli_main(["copy", "--arch", arch, "--out", str(tmp_path / "m"), "--steps", "5",
                       "--lr", "1e30", "--no-progress", "--embed-dim", "8", "--hidden-size", "8",
                       "--task-option", "num_train=64"])
    err = capsys.readouterr().err
    assert status == 1 and "training diverged at step" in err and "(limit " in err, err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_an_overflowed_optimizer_moment_is_never_checkpointed():
    from attncore.train.loop import TrainingDiverged, _check_finite_moments
    model = build_model("seq2seq-bahdanau", 7, 7, seed=0, embed_dim=4, hidden_size=4)
    optimizer = Adam(model.named_parameters(), lr=0.01)
    _check_finite_moments(optimizer, 3)
    name, array = next(iter(optimizer.state_arrays().items()))
    array.reshape(-1)[0] = np.inf   # (the optimizer's own array: state_arrays shares it)
    if np.isfinite(optimizer.state_arrays()[name]).all():
        pytest.skip("state_arrays returns copies")
    with pytest.raises(TrainingDiverged, match="optimizer state .* is no longer finite"):
        _check_finite_moments(optimizer, 3)


def test_an_unwritable_out_or_a_min_lr_past_lr_is_refused_before_training(tmp_path, capsys):
    # --out under a file was found after the last step ([Errno 20], the run lost); --min-lr
    # above --lr made the cosine schedule raise the rate; --out "" trained into the cwd
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="cannot write to out_dir .*afile/sub"):
        train("copy", "seq2seq-bahdanau", tmp_path / "afile" / "sub", steps=2,
              task_options={"num_train": 8})
    for args, message in [(["--out", str(tmp_path / "m"), "--min-lr", "5"],
                           "--min-lr (5) must be <= --lr (0.001)"),
                          (["--out", ""], "--out is an empty path")]:
        with pytest.raises(SystemExit):
            cli_main(["copy", "--arch", "seq2seq-bahdanau", "--steps", "1", *args])
        assert message in capsys.readouterr().err
    # the command names its option (train()'s out_dir is --out)
    assert cli_main(["copy", "--arch", "seq2seq-bahdanau", "--steps", "1", "--no-progress",
                     "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot write to --out '" in capsys.readouterr().err
    # (only the option's name: a path holding "out_dir" was rewritten too)
    held = tmp_path / "out_dir"
    args = ["copy", "--arch", "seq2seq-bahdanau", "--steps", "1", "--no-progress",
            "--embed-dim", "4", "--hidden-size", "4", "--task-option", "num_train=8",
            "--out", str(held)]
    assert cli_main(args) == 0
    capsys.readouterr()
    (held / "checkpoint").mkdir(exist_ok=True)
    assert cli_main(args) == 2
    assert f"'{held}" in capsys.readouterr().err


def test_a_checkpoint_is_not_overwritten_without_being_asked(tmp_path, capsys):
    # a command re-run without --resume started over from step 0 and overwrote the checkpoint
    args = ["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path), "--steps", "2",
            "--no-progress", "--embed-dim", "4", "--hidden-size", "4",
            "--task-option", "num_train=16"]
    assert cli_main(args) == 0
    capsys.readouterr()
    weights = (tmp_path / "checkpoint" / "checkpoint.safetensors").read_bytes()
    assert cli_main(args) == 2
    assert "holds a checkpoint: resume it (--resume), start over (--overwrite)" in \
        capsys.readouterr().err
    assert (tmp_path / "checkpoint" / "checkpoint.safetensors").read_bytes() == weights
    assert cli_main(args + ["--overwrite"]) == 0


def test_resuming_another_model_config_names_what_differs(tmp_path, capsys):
    # ("belongs to another model config", without saying which setting)
    args = ["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path / "m"), "--steps", "2",
            "--checkpoint-every", "1", "--no-progress", "--embed-dim", "4", "--hidden-size", "4",
            "--task-option", "num_train=16"]
    assert cli_main(args) == 0
    capsys.readouterr()
    args[args.index("--embed-dim") + 1] = "6"
    assert cli_main(args[:5] + ["--steps", "3", "--resume"] + args[7:]) == 2
    assert "belongs to another model config (embed_dim 4 there, 6 here)" in \
        capsys.readouterr().err


def test_the_result_line_holds_every_evaluation(tmp_path, capsys):
    # (only the last: with --no-progress the earlier evaluations were shown nowhere)
    assert cli_main(["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path / "m"),
                     "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--no-progress",
                     "--embed-dim", "4", "--hidden-size", "4",
                     "--task-option", "num_train=16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["step"] for e in result["evaluations"]] == [2, 4]


def test_an_unknown_task_or_a_negative_seed_is_named(tmp_path, capsys):
    assert cli_main(["nosuch", "--arch", "transformer", "--out", str(tmp_path), "--steps", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attncore train: error: unknown task 'nosuch'; known tasks: "), err
    with pytest.raises(SystemExit):
        cli_main(["copy", "--arch", "transformer", "--out", str(tmp_path), "--seed", "-1"])
    assert "argument --seed: expected a finite number >= 0, got '-1'" in capsys.readouterr().err
    # a misspelt task option is named (it read "ToyTask.__init__() got an unexpected keyword
    # argument")
    assert cli_main(["copy", "--arch", "transformer", "--out", str(tmp_path), "--steps", "1",
                     "--no-progress", "--task-option", "num_trian=16"]) == 2
    assert capsys.readouterr().err.startswith(
        "attncore train: error: task 'copy' has no option 'num_trian'")


def test_resuming_with_other_data_options_is_refused(tmp_path):
    # the saved data position then pointed at other batches (batch size 3 on a batch-8
    # checkpoint, another seed or task option), and the run went on with exit 0
    common = dict(steps=2, checkpoint_every=1, progress=False, embed_dim=4, hidden_size=4)
    train("copy", "seq2seq-bahdanau", tmp_path, batch_size=8, seed=0,
          task_options={"num_train": 40}, **common)
    for change, named in [(dict(batch_size=3), "batch_size (8, now 3)"),
                          (dict(seed=7), "seed (0, now 7)"),
                          (dict(task_options={"num_train": 41}), "task_options")]:
        options = dict(batch_size=8, seed=0, task_options={"num_train": 40}, **common)
        options.update(change, steps=3)
        with pytest.raises(ValueError, match=re.escape(named)):
            train("copy", "seq2seq-bahdanau", tmp_path, resume=True, **options)
    train("copy", "seq2seq-bahdanau", tmp_path, resume=True, batch_size=8, seed=0,
          task_options={"num_train": 40}, **dict(common, steps=3))     # the same ones go on


def test_resuming_with_other_optimisation_options_is_refused(tmp_path):
    # each of these resumed with exit 0 and gave another model than one run; a cosine run
    # ended at --steps 2 and resumed to 3 had decayed its rate to min_lr and jumped back up
    common = dict(batch_size=8, seed=0, task_options={"num_train": 40}, checkpoint_every=1,
                  progress=False, embed_dim=4, hidden_size=4, schedule="cosine", warmup_steps=0)
    train("copy", "seq2seq-bahdanau", tmp_path, steps=2, **common)
    for change, named in [(dict(lr=0.01), "lr (0.001, now 0.01)"),
                          (dict(weight_decay=0.1), "weight_decay (0.0, now 0.1)"),
                          (dict(clip_norm=0.5), "clip_norm (1.0, now 0.5)"),
                          (dict(label_smoothing=0.2), "label_smoothing (0.0, now 0.2)"),
                          (dict(warmup_steps=1), "warmup_steps (0, now 1)"),
                          (dict(schedule="constant"), "schedule ('cosine', now 'constant')"),
                          (dict(steps=3), "steps (2, now 3)")]:
        options = dict(common, steps=2)
        options.update(change)
        with pytest.raises(ValueError, match=re.escape(named)):
            train("copy", "seq2seq-bahdanau", tmp_path, resume=True, **options)
    train("copy", "seq2seq-bahdanau", tmp_path, resume=True, steps=2, **common)   # the same
    # a schedule that does not span the run may go on past it
    constant = dict(common, schedule="constant", warmup_steps=0)
    train("copy", "seq2seq-bahdanau", tmp_path / "c", steps=2, **constant)
    train("copy", "seq2seq-bahdanau", tmp_path / "c", steps=3, resume=True, **constant)


def test_a_resumed_run_keeps_its_evaluations_and_last_step(tmp_path):
    # its result (and the CLI's result line) held only the evaluations after the checkpoint,
    # and a run resumed at its end reported no loss
    common = dict(batch_size=8, seed=0, task_options={"num_train": 40}, checkpoint_every=1,
                  eval_every=1, progress=False, embed_dim=4, hidden_size=4,
                  schedule="constant", warmup_steps=0)
    _, straight = train("copy", "seq2seq-bahdanau", tmp_path / "a", steps=3, **common)
    train("copy", "seq2seq-bahdanau", tmp_path / "b", steps=2, **common)
    _, resumed = train("copy", "seq2seq-bahdanau", tmp_path / "b", steps=3, resume=True,
                       **common)
    assert resumed.evaluations == straight.evaluations
    _, again = train("copy", "seq2seq-bahdanau", tmp_path / "b", steps=3, resume=True, **common)
    assert again.history == [] and again.last == straight.history[-1]
    assert again.evaluations == straight.evaluations


def test_resuming_after_the_validation_file_changed_is_refused(tmp_path):
    # (the training file was checked; an edited validation file mixed two data sets in one
    # run's validation history)
    (tmp_path / "train.tsv").write_text("".join(f"a{i} b\tx{i} y\n" for i in range(20)))
    (tmp_path / "valid.tsv").write_text("a1 b\tx1 y\na2 b\tx2 y\n")
    options = dict(batch_size=4, checkpoint_every=1, progress=False, embed_dim=4,
                   hidden_size=4, task_options={"train": str(tmp_path / "train.tsv"),
                                                "valid": str(tmp_path / "valid.tsv")})
    train("pairs", "seq2seq-bahdanau", tmp_path / "m", steps=2, **options)
    (tmp_path / "valid.tsv").write_text("a1 b\tx2 y\na2 b\tx1 y\n")
    with pytest.raises(ValueError, match=r"other validation data \(its validation examples "
                                         r"changed\)"):
        train("pairs", "seq2seq-bahdanau", tmp_path / "m", steps=3, resume=True, **options)


def test_a_stale_readable_state_copy_is_rewritten(tmp_path):
    # a run stopped between the checkpoint's two renames kept the older trainer_state.json
    # for good (a resume with no step left never wrote it again)
    _fit(tmp_path, 4, checkpoint_every=2)
    copy = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(copy.read_text())
    copy.write_text(json.dumps(dict(state, step=2), indent=2))
    _fit(tmp_path, 4, resume=True)
    assert json.loads(copy.read_text()) == state


def test_resuming_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    _fit(tmp_path, 2, checkpoint_every=2)
    from safetensors.numpy import load_file, save_file
    path = tmp_path / "checkpoint" / "checkpoint.safetensors"
    arrays = load_file(str(path))
    name = next(n for n in arrays if n.startswith("model/"))
    arrays[name] = np.full_like(arrays[name], np.nan)
    save_file(arrays, str(path))
    with pytest.raises(ValueError, match=rf"'{name}' holds NaN or infinity"):
        _fit(tmp_path, 4, resume=True)


def _rewrite_checkpoint_state(directory, state_text):
    """The checkpoint's weights with ``state_text`` as their embedded trainer state (None: no
    embedded state, as a checkpoint written before it was embedded)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    path = directory / "checkpoint.safetensors"
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
    metadata.pop("trainer_state")
    if state_text is not None:
        metadata["trainer_state"] = state_text
    save_file(arrays, str(path), metadata=metadata)


@pytest.mark.parametrize("edit, message", [
    (lambda state: "{ not json", "cannot read the trainer state of .*checkpoint.safetensors"),
    (lambda state: json.dumps({k: v for k, v in state.items() if k != "step"}),
     r"lacks \['step'\]"),
    (lambda state: json.dumps(dict(state, batch_index=10 ** 6)), "batch_index 1000000 lies past"),
    (lambda state: json.dumps(dict(state, step=99)), "at step 99, past the 4 steps"),
    (lambda state: json.dumps(dict(state, optimizer=3)), "checkpoint .*: optimizer state: "),
    (lambda state: json.dumps(dict(state, optimizer={k: v for k, v in state["optimizer"].items()
                                                     if k != "step_count"})),
     "checkpoint .*: optimizer state: lacks 'step_count'"),
    (lambda state: json.dumps(dict(state, dropout_rng={"bit_generator": "MT19937"})),
     "checkpoint .*: dropout_rng: "),
])
def test_a_damaged_checkpoint_is_named(tmp_path, edit, message):
    # (bare JSON / KeyError / StopIteration messages, or exit 0 with nothing trained)
    _fit(tmp_path, 2, checkpoint_every=2)
    directory = tmp_path / "checkpoint"
    state = json.loads((directory / "trainer_state.json").read_text())
    _rewrite_checkpoint_state(directory, edit(state))
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, 4, resume=True)


def test_a_checkpoint_without_embedded_state_reads_its_json(tmp_path):
    _fit(tmp_path, 2, checkpoint_every=2)
    directory = tmp_path / "checkpoint"
    _rewrite_checkpoint_state(directory, None)
    (directory / "trainer_state.json").write_text("{ not json")
    with pytest.raises(ValueError, match="cannot read the trainer state of .*trainer_state.json"):
        _fit(tmp_path, 4, resume=True)


def test_weights_and_state_of_a_checkpoint_cannot_come_apart(tmp_path):
    # the two files were renamed one after the other: a run killed between the renames left
    # step-4 weights beside the step-2 state, and --resume continued the mix with exit 0
    # (final weights 3.9e-3 off an uninterrupted run); the state now travels in the weights
    uninterrupted, _ = _fit(tmp_path / "a", 6)
    _fit(tmp_path / "b", 2, checkpoint_every=2)
    stale = (tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text()
    _fit(tmp_path / "b", 4, checkpoint_every=2, resume=True)
    (tmp_path / "b" / "checkpoint" / "trainer_state.json").write_text(stale)   # the kill
    resumed, _ = _fit(tmp_path / "b", 6, resume=True)
    for name, value in uninterrupted.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)


def test_optimizer_moments_of_another_shape_are_refused():
    model = build_model("seq2seq-bahdanau", 7, 7, seed=0, embed_dim=4, hidden_size=4)
    optimizer = Adam(model.named_parameters(), lr=0.01)
    arrays = optimizer.state_arrays()
    name = next(iter(arrays))
    arrays[name] = np.zeros(3, arrays[name].dtype)
    with pytest.raises(ValueError, match="optimizer state: .* is float.* \\[3\\], the parameter"):
        optimizer.load_state(arrays, optimizer.state_meta())


def test_trainer_relu_keeps_nan():
    # (np.where(x > 0, x, 0) turned NaN into 0 and hid a diverged weight behind a finite loss)
    out = ag.relu(np.array([np.nan, -1.0, 2.0])).data
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == 2


def test_cli_reports_an_arch_that_does_not_fit_the_task(tmp_path, capsys):
    status = cli_main(["copy", "--arch", "transformer-classifier", "--out", str(tmp_path), "--steps", "1",
                       "--no-progress"])
    assert status == 2
    assert "does not fit task" in capsys.readouterr().err


# -- RAN architectures --------------------------------------------------------------------------------

SMALL_RAN = dict(d_model=16, num_heads=2, head_size=8, num_layers=1, window_size=4, min_window_size=2)


def test_tiny_ran_classifier_learns_and_exports_its_labels(tmp_path):
    task = ContainsZeroTask()
    model, result = train(task, "ran-classifier", tmp_path, steps=80, batch_size=32, lr=0.01,
                          schedule="constant", warmup_steps=5, progress=False, eval_every=80, **SMALL_RAN)
    _falls(result.history, 0.75)
    assert result.evaluations[-1]["valid_accuracy"] > 0.75
    config, _ = io.load_model_dir(tmp_path)
    assert config["architecture"] == "ran" and config["labels"] == ["no", "yes"]
    assert config["embedding_size"] == 16 and config["ran_layers"] == 1 and config["window_size"] == 4
    # The engine runs the exported classifier with the trainer's numbers.
    import attncore
    engine = attncore.load(tmp_path)
    ids, lengths, _ = next(task.batches("valid", 8))
    with ag.no_grad():
        expected = model.eval().classify(ids, lengths).data
    logits, _ = engine.classify([row[:n] for row, n in zip(ids, lengths)])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_tiny_causal_ran_lm_learns_the_documents(tmp_path):
    # "copy" sources are random symbols then <eos>: the LM can learn at least where <eos> goes
    # and the symbol distribution, so the loss must fall well below its start.
    model, result = train("copy", "ran-lm", tmp_path, steps=60, batch_size=16, lr=0.01, schedule="constant",
                          warmup_steps=5, task_options=TOY, progress=False, **SMALL_RAN)
    _falls(result.history, 0.8)
    config, _ = io.load_model_dir(tmp_path)
    assert config["causal"] is True and config["token_head"] == "lm" and "labels" not in config
    assert config["tokenizer"] == {"type": "attncore.data.vocab", "src": "src_vocab.json"}


def test_ran_options_do_not_apply_to_a_transformer_and_back(tmp_path):
    with pytest.raises(ValueError, match="window_size"):
        build_model("transformer", 8, 8, window_size=4)
    with pytest.raises(ValueError, match="dim_feedforward"):
        build_model("ran-classifier", 8, 8, num_classes=2, dim_feedforward=4)


def test_cli_classify_prints_the_label_names_of_a_trained_ran(tmp_path):
    import subprocess
    import sys
    task = ContainsZeroTask()
    train(task, "ran-classifier", tmp_path / "model", steps=2, batch_size=8, progress=False, **SMALL_RAN)
    from conftest import subprocess_env
    proc = subprocess.run([sys.executable, "-m", "attncore", "classify", "--model", str(tmp_path / "model")],
                          input="0 1 2\n3 4\n", capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert all(line in ("no", "yes") for line in proc.stdout.split()) and len(proc.stdout.split()) == 2


def _reviews_task():
    """A small two-label classification task (character documents)."""
    from attncore.data.task import ClassificationTask

    class Reviews(ClassificationTask):
        name = "reviews"

        def __init__(self):
            super().__init__()
            self.vocab = Vocab(list("abcdefgh"), level="char")
            self.labels = ["neg", "pos"]

        def _make_examples(self, split):
            rng = np.random.default_rng(len(split))
            return [("".join(rng.choice(list("abcdefgh"), 12)), ["neg", "pos"][i % 2])
                    for i in range(32)]

    return Reviews


def test_a_ran_lm_on_a_classification_task_is_a_language_model_throughout(tmp_path, monkeypatch,
                                                                       capsys):
    # its divergence limit came from the number of labels (100 ln 2) not the vocabulary, and
    # the evaluate CLI sent it to class accuracy, which needs a classifier
    from attncore.train import evaluate, loop
    Reviews = _reviews_task()
    limits = []
    real_fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda *a, **k: limits.append(k["loss_limit"]) or real_fit(*a, **k))
    model, _ = train(Reviews(), "ran-lm", tmp_path, steps=2, batch_size=8, progress=False,
                     warmup_steps=0, **SMALL_RAN)
    assert limits == [pytest.approx(100 * np.log(len(Reviews().vocab)))]
    import attncore.data
    monkeypatch.setattr(attncore.data, "get_task", lambda name, seed=0, **options: Reviews())
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tmp_path), "--task", "reviews"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # (a language model's kind, not the task: it suggested "another task, or other options")
    assert "has nothing evaluate can score" in err and "has no classifier" in err
    assert "another task" not in err


def test_evaluate_on_the_other_kind_of_task_names_the_mismatch(tmp_path, monkeypatch, capsys):
    # a sequence-to-sequence model on a classification task was "nothing evaluate can score
    # ... (evaluate scores classifiers and sequence-to-sequence models)": it is one
    from attncore.train import evaluate
    Reviews = _reviews_task()
    train("copy", "seq2seq-bahdanau", tmp_path / "s2s", steps=1, batch_size=4, progress=False,
          task_options=TOY, **SMALL_RNN)
    train(Reviews(), "ran-classifier", tmp_path / "clf", steps=1, batch_size=4, progress=False,
          **SMALL_RAN)
    import attncore.data
    real_get_task = attncore.data.get_task
    for model, task, said in (("s2s", "reviews", "it decodes sequences, the task is a "
                                                 "classification task"),
                              ("clf", "copy", "it is a classifier, the task is a "
                                              "sequence-to-sequence task")):
        monkeypatch.setattr(attncore.data, "get_task", lambda name, seed=0, **options: (
            Reviews() if name == "reviews" else real_get_task(name, seed=seed, **TOY)))
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([str(tmp_path / model), "--task", task])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "does not fit task" in err and said in err, err
        assert "nothing evaluate can score" not in err


def test_a_refused_training_leaves_no_out_directory_and_resume_with_overwrite_is_refused(tmp_path):
    # the directory was made before the task and architecture were checked; --resume with
    # --overwrite resumed silently
    out = tmp_path / "runs" / "nothing"
    with pytest.raises(ValueError, match="does not fit task"):
        train("copy", "ran-classifier", out, steps=1, progress=False, task_options=TOY)
    assert not out.exists()
    with pytest.raises(ValueError, match="contradict"):
        train("copy", "transformer", out, steps=1, progress=False, resume=True, overwrite=True)
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ValueError, match="does not fit task"):
        train("copy", "ran-classifier", kept, steps=1, progress=False, task_options=TOY)
    assert kept.is_dir()   # (a directory the caller made stays)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_validation_reports_the_plain_cross_entropy_too(tmp_path, smoothing):
    # valid_loss is the training objective (label-smoothed, with a floor above 0); valid_nll is
    # the plain cross-entropy of the same batches, comparable across smoothing values
    from attncore.data import get_task
    model, result = train("copy", "seq2seq-bahdanau", tmp_path, steps=10, batch_size=16,
                          lr=0.01, schedule="constant", warmup_steps=1, label_smoothing=smoothing,
                          task_options=TOY, progress=False, eval_every=10, eval_batches=2,
                          **SMALL_RNN)
    last = result.evaluations[-1]
    task = get_task("copy", seed=0, **TOY)
    plain, counted = 0.0, 0
    model.eval()
    with ag.no_grad():
        for index, batch in enumerate(task.batches("valid", 16)):
            if index >= 2:
                break
            loss, _, n = seq2seq_loss(0.0, model.config.pad_id)(model, batch)
            plain, counted = plain + float(loss.data) * n, counted + n
    assert last["valid_nll"] == pytest.approx(plain / counted, rel=1e-5)
    assert (last["valid_loss"] == last["valid_nll"]) == (smoothing == 0.0)


def test_the_engines_bounds_are_checked_before_training(tmp_path):
    # 4097 layers trained to the end and wrote a checkpoint, then failed at export
    options = dict(SMALL_TRANSFORMER, num_encoder_layers=4097)
    with pytest.raises(ValueError, match=r"num_encoder_layers must lie in \[0, 4096\]"):
        train("copy", "transformer", tmp_path, steps=1, batch_size=8, task_options=TOY,
              progress=False, **options)
    assert not (tmp_path / "checkpoint").exists()


def test_resume_without_the_readable_state_copy_still_resumes(tmp_path):
    # the state is in the weights file; without trainer_state.json the run started over from
    # step 0 and overwrote the checkpoint
    uninterrupted, _ = _fit(tmp_path / "a", 12)
    _fit(tmp_path / "b", 5, checkpoint_every=5)
    (tmp_path / "b" / "checkpoint" / "trainer_state.json").unlink()
    resumed, _ = _fit(tmp_path / "b", 12, resume=True)
    for name, value in uninterrupted.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)


def test_training_into_a_model_directory_needs_overwrite(tmp_path):
    # a shipped model (no checkpoint) was replaced without a word
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a model: train into another directory, or "
                                         r"replace it \(--overwrite\)"):
        train("copy", "transformer", tmp_path, steps=1, batch_size=8, task_options=TOY,
              progress=False, **SMALL_TRANSFORMER)
    assert (tmp_path / "config.json").read_text() == "{}"


@pytest.mark.parametrize("error, fragment", [
    (MemoryError("Unable to allocate 2.13 PiB"), "out of memory (Unable to allocate 2.13 PiB)"),
    ("safetensors", "cannot write the model or its checkpoint: No space left on device"),
])
def test_train_memory_and_write_errors_are_one_line(monkeypatch, capsys, error, fragment):
    # tracebacks of 36 and 25 lines
    from attncore.train import loop
    if error == "safetensors":
        from safetensors import SafetensorError
        error = SafetensorError("No space left on device")

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "train", failing)
    assert cli_main(["copy", "--arch", "transformer", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"attncore train: error: {fragment}"]


def test_resuming_a_finished_run_reports_its_step(tmp_path, capsys):
    # a checkpoint already at --steps printed {"steps": null, ...}
    args = ["copy", "--arch", "seq2seq-bahdanau", "--out", str(tmp_path), "--steps", "3",
            "--batch-size", "8", "--hidden-size", "8", "--embed-dim", "4", "--no-progress",
            "--task-option", "num_train=200", "--task-option", "max_len=4"]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(args + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_a_diverging_cli_run_is_one_line(tmp_path):
    # --lr 1e300 printed NumPy's overflow warnings before the "training diverged" line
    import subprocess
    import sys

    from conftest import subprocess_env
    proc = subprocess.run([sys.executable, "-m", "attncore", "train", "copy", "--arch",
                           "transformer", "--out", "m", "--steps", "5", "--lr", "1e300",
                           "--d-model", "16", "--num-heads", "2", "--dim-feedforward", "16",
                           "--num-encoder-layers", "1", "--num-decoder-layers", "1",
                           "--no-progress", "--task-option", "num_train=200"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "training diverged" in lines[0], proc.stderr


def test_train_refuses_a_closed_stdout(tmp_path):
    # the result line went nowhere and the run exited 0
    import subprocess
    import sys

    from conftest import subprocess_env
    proc = subprocess.run(f"{sys.executable} -m attncore train copy --arch transformer --out m "
                          f"--steps 1 >&-", shell=True, cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "stdout is closed" in proc.stderr, proc.stderr
    assert not (tmp_path / "m").exists()


def test_prefix_lm_batch_predicts_every_target_token_after_the_separator():
    src = np.array([[5, 6, 2], [7, 2, 0]])
    tgt = np.array([[1, 8, 9, 2], [1, 4, 2, 0]])
    inputs, lengths, labels = prefix_lm_batch((src, np.array([3, 2]), tgt, np.array([4, 3])))
    # rows: 5 6 2 | 8 9 2  and  7 2 | 4 2
    np.testing.assert_array_equal(inputs, [[5, 6, 2, 8, 9], [7, 2, 4, 2, 0]])
    np.testing.assert_array_equal(lengths, [5, 3])
    np.testing.assert_array_equal(labels, [[0, 0, 8, 9, 2], [0, 4, 2, 0, 0]])


def test_document_lm_loss_counts_the_real_next_tokens_only():
    from attncore.train.loop import document_lm_loss

    class Uniform:   # logits of zeros: loss log(V), argmax 0 (the pad id) everywhere
        def __call__(self, ids, lengths):
            return ag.Tensor(np.zeros(ids.shape + (5,)), requires_grad=True)

    ids = np.array([[3, 4, 2, 0, 0], [1, 3, 4, 4, 2]])
    loss, correct, counted = document_lm_loss()(Uniform(), (ids, np.array([3, 5])))
    assert (counted, correct) == (2 + 4, 0)
    assert float(loss.data) == pytest.approx(np.log(5))


def test_a_negative_position_in_a_checkpoint_is_named(tmp_path):
    _fit(tmp_path, 2, checkpoint_every=2)
    directory = tmp_path / "checkpoint"
    state = json.loads((directory / "trainer_state.json").read_text())
    for key in ("step", "epoch", "batch_index"):
        _rewrite_checkpoint_state(directory, json.dumps(dict(state, **{key: -1})))
        with pytest.raises(ValueError, match=f"{key} must be an integer >= 0, got -1"):
            _fit(tmp_path, 4, resume=True)


def test_optimizer_moments_of_another_dtype_are_refused():
    model = build_model("seq2seq-bahdanau", 7, 7, seed=0, embed_dim=4, hidden_size=4)
    optimizer = Adam(model.named_parameters(), lr=0.01)
    arrays = optimizer.state_arrays()
    name = next(iter(arrays))
    other = np.float32 if arrays[name].dtype == np.float64 else np.float64
    arrays[name] = arrays[name].astype(other)
    with pytest.raises(ValueError, match=f"optimizer state: .* is {np.dtype(other)} "):
        optimizer.load_state(arrays, optimizer.state_meta())
