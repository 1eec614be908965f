# SPDX-License-Identifier: Apache-2.0
"""The command line as a user runs it: ``python -m attncore ...`` in a subprocess, from an empty
directory, on real files; exit codes, stdout, and the one-line stderr of every user error.

The subprocess imports the same attncore as this test process (the source tree when built in
place, site-packages when installed): ``conftest.subprocess_env``.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import attncore
from conftest import subprocess_env
from attncore.cli import main as cli_main

DATES = os.path.join(os.path.dirname(os.path.abspath(attncore.__file__)), "assets", "dates")
SAMPLES = {  # input -> ISO date, unambiguous forms of several kinds
    "Tuesday, 3 March 1998": "1998-03-03",
    "4/10/85": "1985-04-10",
    "the 3rd of March 1998": "1998-03-03",
    "Sat 1 Jan 2000": "2000-01-01",
    "December 25, 2023": "2023-12-25",
    "2011-07-14": "2011-07-14",
}


def attncore_cli(args, tmp_path, *, stdin="", env=None, timeout=300):
    """Run ``python -m attncore ARGS`` in ``tmp_path``; returns the CompletedProcess (text)."""
    environ = subprocess_env(env)
    environ.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "attncore", *map(str, args)], input=stdin,
                          cwd=tmp_path, env=environ, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc, *fragments, code=1):
    """A user error: exit ``code``, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def dates_model():
    from attncore import models
    return models.load(DATES)


# ------------------------------------------------------------------------------------ translate
def test_echo_a_date_prints_only_its_iso_form(tmp_path):
    proc = attncore_cli(["translate"], tmp_path, stdin="Tuesday, 3 March 1998\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1998-03-03\n"
    assert proc.stderr == ""


def test_stdin_lines_in_order(tmp_path):
    proc = attncore_cli(["translate", "--batch-size", "2"], tmp_path,
                        stdin="".join(f"{s}\n" for s in SAMPLES))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == list(SAMPLES.values())


def test_file_to_file_keeps_input_order_across_batches_and_windows(tmp_path, dates_model):
    # 311 lines of mixed lengths, batches of 3 and a 40-token budget: many length-sorted batches
    # in several windows (100 x 3 lines), so order restoration is exercised for real.
    rng = np.random.default_rng(0)
    keys = list(SAMPLES)
    lines = [keys[i] for i in rng.integers(0, len(keys), size=311)]
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    proc = attncore_cli(["translate", "--input", "in.txt", "--output", "out.txt",
                         "--batch-size", "3", "--max-tokens", "40"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    out = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    assert out == [SAMPLES[line] for line in lines]
    assert out == dates_model.translate(lines), "the CLI equals the Python API"
    # the progress bar and a throughput line, on stderr only
    assert "311 lines in" in proc.stderr and "lines/s" in proc.stderr


def test_no_progress_keeps_stderr_silent(tmp_path):
    (tmp_path / "in.txt").write_text("3 March 1998\n")
    proc = attncore_cli(["translate", "--input", "in.txt", "--no-progress"], tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "1998-03-03\n", "")


def test_ids_in_ids_out_agrees_with_text(tmp_path, dates_model):
    tokenizer = dates_model.tokenizer
    ids_lines = [" ".join(map(str, tokenizer.encode_source(s))) for s in SAMPLES]
    proc = attncore_cli(["translate", "--ids"], tmp_path, stdin="\n".join(ids_lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    decoded = [tokenizer.decode_target([int(t) for t in line.split()])
               for line in proc.stdout.splitlines()]
    assert decoded == list(SAMPLES.values())


def test_model_and_search_options_reach_the_model(monkeypatch, tmp_path, capsys):
    # the dates model translates these dates alike in float32 and bfloat16, and whatever the
    # length penalty: what reaches attncore.load and the heat map's search is checked directly
    from attncore import heatmap, models
    loads, searches = [], []
    plain_load, plain_map = models.load, heatmap.attention_map
    monkeypatch.setattr(models, "load", lambda path, **options: loads.append(options)
                        or plain_load(path, **options))
    monkeypatch.setattr(heatmap, "attention_map", lambda model, source, **options:
                        searches.append(options) or plain_map(model, source, **options))
    (tmp_path / "in.txt").write_text("3 March 1998\n")
    assert cli_main(["translate", "--input", str(tmp_path / "in.txt"), "--weight-dtype",
                     "bfloat16", "--no-progress"]) == 0
    assert cli_main(["attention", "3 March 1998", "--beam", "3", "--length-penalty", "2",
                     "--max-length", "14", "--weight-dtype", "int8",
                     "--no-repeat-ngram-size", "4"]) == 0
    assert loads == [{"weight_dtype": "bfloat16"}, {"weight_dtype": "int8"}]
    assert searches == [dict(max_length=14, beam_size=3, length_penalty=2.0,
                             no_repeat_ngram_size=4)]
    assert "1998-03-03" in capsys.readouterr().out


def test_beam_search_and_generate_agree_with_greedy_on_the_dates_model(tmp_path):
    text = "".join(f"{s}\n" for s in SAMPLES)
    beam = attncore_cli(["translate", "--beam", "4", "--threads", "1"], tmp_path, stdin=text)
    gen = attncore_cli(["generate", "--max-length", "12"], tmp_path, stdin=text)
    assert beam.returncode == 0 and gen.returncode == 0, beam.stderr + gen.stderr
    assert beam.stdout.splitlines() == gen.stdout.splitlines() == list(SAMPLES.values())


def test_bfloat16_weights_translate_the_samples_alike(tmp_path):
    text = "".join(f"{s}\n" for s in SAMPLES)
    proc = attncore_cli(["translate", "--weight-dtype", "bfloat16", "--beam", "2"], tmp_path,
                        stdin=text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == list(SAMPLES.values())


def test_bundled_model_exact_match_on_held_out_dates(tmp_path):
    """200 dates the model never saw (the test split of the task seed it was trained with),
    through the CLI: exact match >= 99%."""
    pytest.importorskip("babel")
    from attncore.data import get_task
    task = get_task("dates", seed=0, num_test=200)
    pairs = task.examples("test")[:200]
    assert len(pairs) == 200
    (tmp_path / "dates.txt").write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    proc = attncore_cli(["translate", "--input", "dates.txt", "--output", "iso.txt",
                         "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = (tmp_path / "iso.txt").read_text(encoding="utf-8").splitlines()
    assert len(out) == 200
    correct = sum(o == t for o, (_, t) in zip(out, pairs))
    wrong = [(s, t, o) for o, (s, t) in zip(out, pairs) if o != t]
    assert correct / 200 >= 0.99, wrong


# ---------------------------------------------------------------------------------- user errors
def test_missing_input_file(tmp_path):
    assert_user_error(attncore_cli(["translate", "--input", "nope.txt"], tmp_path),
                      "attncore translate: error:", "'nope.txt'", "No such file")


def test_input_is_a_directory(tmp_path):
    assert_user_error(attncore_cli(["translate", "--input", "."], tmp_path), "is a directory")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    line = assert_user_error(attncore_cli(["translate", "--model", "notamodel"], tmp_path,
                                          stdin="3 March 1998\n"), "notamodel")
    assert "config.json" in line


def test_model_that_does_not_exist(tmp_path):
    assert_user_error(attncore_cli(["translate", "--model", "missing"], tmp_path, stdin="x\n"),
                      "'missing' does not exist")


def test_an_existing_output_is_kept_when_the_first_line_fails(tmp_path):
    # (it was emptied, then nothing was written to it)
    (tmp_path / "out.txt").write_text("KEEP\n")
    proc = attncore_cli(["translate", "--output", "out.txt"], tmp_path, stdin="3 März 1998\n")
    assert_user_error(proc, "line 1:", "nothing was written")
    assert (tmp_path / "out.txt").read_text() == "KEEP\n"
    ok = attncore_cli(["translate", "--output", "out.txt"], tmp_path, stdin="")
    assert ok.returncode == 0 and (tmp_path / "out.txt").read_text() == "", ok.stderr
    again = attncore_cli(["translate", "--output", "new.txt", "--no-progress"], tmp_path,
                         stdin="\ufeff3 March 1998\n4 May 2001\n")   # a byte order mark first
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert (tmp_path / "new.txt").read_text() == "1998-03-03\n2001-05-04\n"


def test_output_in_a_missing_directory_fails_before_reading(tmp_path):
    assert_user_error(attncore_cli(["translate", "--output", "no/such/dir.txt"], tmp_path,
                                   stdin="3 March 1998\n"), "cannot write output")
    # (a directory path that does not exist was "it is a directory")
    (tmp_path / "here").mkdir()
    for path, said in (("newdir/", "a file name may not end with '/'"),
                       ("here", "it is a directory"), ("here/", "it is a directory")):
        proc = attncore_cli(["translate", "--output", path], tmp_path, stdin="3 March 1998\n")
        assert_user_error(proc, f"cannot write output {path!r}: {said}")


@pytest.mark.parametrize("args, fragment", [
    (["translate", "--beam", "0"], "--beam: expected a positive integer, got 0"),
    (["translate", "--batch-size", "x"], "--batch-size: expected a positive integer, got 'x'"),
    (["translate", "--no-such-option"],    # (it was the top level's error, "attncore: ...")
     "attncore translate: error: unrecognized arguments: --no-such-option (see attncore "
     "translate --help)"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["--bogus", "info"], "attncore: error: unrecognized arguments: --bogus (see attncore --help)"),
    (["translate", "--weight-dtype", "int4"], "--weight-dtype: invalid choice: 'int4'"),
    (["generate", "--sample", "--beam", "2"], "--sample draws one sequence"),
    # checked before any line runs (they came back as an error of "line 1")
    (["generate", "--sample", "--temperature", "0"], "--temperature must be > 0"),
    (["generate", "--sample", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["generate", "--min-length", "-1"], "--min-length must be >= 0"),
    # a sampling option without --sample was ignored: greedy output, no word
    (["generate", "--temperature", "0.7"], "--temperature=0.7 only applies to sampling: pass --sample"),
    (["generate", "--top-k", "5"], "--top-k=5 only applies to sampling"),
    (["generate", "--max-length", "2000000"], "--max-length must be at most 1048576"),
    (["generate", "--length-penalty", "400"], "--length-penalty must lie in [-10, 10]"),
    (["generate", "--beam", "5000"], "--beam must be at most 1024, got 5000"),
    (["generate", "--sample", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["generate", "--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size must be >= 0"),
])
def test_bad_options(tmp_path, args, fragment):
    proc = attncore_cli(args, tmp_path, stdin="3 March 1998\n")
    code = 1 if args[0] == "generate" else 2
    assert_user_error(proc, fragment, code=code)


@pytest.mark.parametrize("value, fragment", [("0", "thread counts lie in [1, 1024], got 0"),
                                             ("5000", "thread counts lie in [1, 1024], got 5000"),
                                             ("two", "expected a thread count, got 'two'")])
def test_thread_counts_out_of_range_are_usage_errors(tmp_path, value, fragment):
    # 5000 exited 1 after parsing while 0 exited 2: both are usage errors
    proc = attncore_cli(["translate", "--threads", value], tmp_path, stdin="3 March 1998\n")
    assert_user_error(proc, "--threads", fragment, code=2)


def test_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path):
    (tmp_path / "dates.txt").write_text("3 March 1998\n")
    assert_user_error(attncore_cli(["translate", "--input", "dates.txt", "--output",
                                    "./dates.txt"], tmp_path), "is the input file")
    assert (tmp_path / "dates.txt").read_text() == "3 March 1998\n"


def test_output_that_is_the_file_on_stdin_is_refused_and_the_input_kept(tmp_path):
    # ``--output F < F`` emptied F after the first window was read: the rest read as EOF,
    # 6555 output lines for 60000 input lines, exit 0
    (tmp_path / "dates.txt").write_text("3 March 1998\n" * 3)
    environ = subprocess_env()
    with open(tmp_path / "dates.txt", "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "attncore", "translate", "--output",
                               "dates.txt"], stdin=stdin, cwd=tmp_path, env=environ,
                              capture_output=True, text=True, timeout=300)
    assert_user_error(proc, "is the input file")
    assert (tmp_path / "dates.txt").read_text() == "3 March 1998\n" * 3


@pytest.mark.parametrize("redirect, fragment, status", [
    ("<&-", "stdin is closed: give the input with --input FILE", 1),
    ("< in.txt >&-", "stdout is closed: give the output with --output FILE", 1),
    ("--input in.txt --output out.txt >&-", None, 0),          # stdout unused: no error
    ("--input in.txt 2>&-", None, 0),                         # no stderr for the progress bar
])
def test_closed_standard_streams_are_named_not_a_traceback(tmp_path, redirect, fragment, status):
    # they raised AttributeError tracebacks ('NoneType' object has no attribute 'isatty')
    (tmp_path / "in.txt").write_text("3 March 1998\n")
    proc = subprocess.run(f"{sys.executable} -m attncore translate {redirect}",
                          shell=True, cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    if fragment is not None:
        assert_user_error(proc, fragment)
    if "out.txt" in redirect:
        assert (tmp_path / "out.txt").read_text() == "1998-03-03\n"
    elif "2>&-" in redirect:
        assert proc.stdout == "1998-03-03\n"


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs /proc/self/mem")
def test_input_read_errors_name_the_input(tmp_path):
    # an I/O error past the open said "[Errno 5] Input/output error", naming nothing
    assert_user_error(attncore_cli(["translate", "--input", "/proc/self/mem"], tmp_path),
                      "cannot read input '/proc/self/mem': Input/output error")


def test_output_write_errors_name_the_file(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    assert_user_error(attncore_cli(["translate", "--output", "/dev/full"], tmp_path,
                                   stdin="3 March 1998\n"),
                      "cannot write output '/dev/full': No space left on device")
    assert_user_error(attncore_cli(["translate", "--output", ""], tmp_path,
                                   stdin="3 March 1998\n"), "--output is an empty path")


def _stdout_env(unbuffered):
    """The environment of a user's shell, with stdout block-buffered (write errors show at the
    final flush) or unbuffered (``PYTHONUNBUFFERED``, as many containers set: at each write)."""
    environ = subprocess_env()
    environ.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        environ["PYTHONUNBUFFERED"] = "1"
    return environ


def test_an_output_file_that_fills_keeps_whole_lines(tmp_path):
    # (a file size limit or a full disk cut the last line in the middle: "...2013-11-1")
    import resource
    lines = "".join(f"{d} March {1900 + d * 3}\n" for d in range(1, 29)) * 40
    (tmp_path / "in.txt").write_text(lines)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
    proc = subprocess.run([sys.executable, "-m", "attncore", "translate", "--input", "in.txt",
                           "--output", "out.txt", "--no-progress"], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 1 and "cannot write output 'out.txt': File too large" in \
        proc.stderr, proc.stderr
    written = (tmp_path / "out.txt").read_text()
    assert 0 < len(written) <= 6000 and written.endswith("\n")
    assert all(len(line) == 10 for line in written.splitlines())   # (whole YYYY-MM-DD lines)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("args", [["translate", "--input", "in.txt"], ["info"], ["--help"],
                                  ["translate", "--help"], ["train", "--help"]])
def test_stdout_write_errors_are_one_line(tmp_path, args, unbuffered):
    # a full disk on stdout: a traceback, "Exception ignored", and exit 120; unbuffered,
    # argparse swallowed the error of --help and exited 0
    (tmp_path / "in.txt").write_text("3 March 1998\n")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "attncore", *args], stdout=full,
                              stderr=subprocess.PIPE, cwd=tmp_path, env=_stdout_env(unbuffered),
                              text=True, timeout=300)
    assert_user_error(proc, "cannot write to stdout: No space left on device")


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("args", [["--help"], ["translate", "--help"], ["info"]])
def test_a_closed_pipe_on_stdout_is_a_quiet_141_for_every_command(tmp_path, args, unbuffered):
    # ``attncore --help | true``: "Exception ignored ... BrokenPipeError" and exit 120
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "attncore", *args], stdout=write_end,
                              stderr=subprocess.PIPE, cwd=tmp_path, env=_stdout_env(unbuffered),
                              text=True, timeout=300)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


@pytest.mark.parametrize("how", ["--input", "stdin"])
def test_stdout_appending_to_the_input_is_refused(tmp_path, how):
    # ``attncore translate --input F >> F`` read its own output lines (dates are valid input)
    # and never ended: 20,000 lines grew past 130,000 in ten seconds
    lines = "3 March 1998\n" * 3
    (tmp_path / "in.txt").write_text(lines)
    args = ["--input", "in.txt"] if how == "--input" else []
    with open(tmp_path / "in.txt", "a") as stdout, open(tmp_path / "in.txt", "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "attncore", "translate", *args],
                              stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, cwd=tmp_path,
                              env=subprocess_env(), text=True, timeout=60)
    assert_user_error(proc, "stdout is the input file")
    assert (tmp_path / "in.txt").read_text() == lines


_SIGNAL_AT_LINE_2 = """
import signal, sys
from attncore import batch, cli
# the signal at its default, whatever the test run inherited (under nohup, SIGHUP is ignored)
signal.signal(getattr(signal, sys.argv[1]), signal.SIG_DFL)
if sys.argv[2:] == ["SIGINT ignored"]:   # (a background job of a script: cmd &)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.argv[2:] == ["ignored"]:   # (nohup: the run goes on)
    signal.signal(getattr(signal, sys.argv[1]), signal.SIG_IGN)
plain_format, calls = batch.GenerateJob.format, []
def format_then_signal(self, result, frontend):
    calls.append(1)
    if len(calls) == 2:
        signal.raise_signal(getattr(signal, sys.argv[1]))
    return plain_format(self, result, frontend)
batch.GenerateJob.format = format_then_signal
status = cli.main(["translate", "--input", "in.txt", "--output", "out.txt", "--no-progress",
                   "--batch-size", "2"])
print(status, len(calls))
"""


@pytest.mark.parametrize("name, status, how", [("SIGTERM", 143, ""), ("SIGHUP", 129, ""),
                                               ("SIGTERM", 143, "SIGINT ignored"),
                                               ("SIGHUP", 0, "ignored")])
def test_sigterm_and_sighup_stop_the_run_as_ctrl_c_does(tmp_path, name, status, how):
    # what timeout, systemd, Kubernetes and Slurm send: the run ended at once and said nothing,
    # leaving an output that looked complete
    import signal
    if not hasattr(signal, name):
        pytest.skip(f"no {name} here")
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in SAMPLES) * 4)
    (tmp_path / "run.py").write_text(_SIGNAL_AT_LINE_2)
    proc = subprocess.run([sys.executable, "run.py", name, how], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr   # (the script itself, not killed by the signal)
    if how == "ignored":   # (started under nohup: the ignored signal stays ignored)
        lines = len(SAMPLES) * 4
        assert proc.stdout.split() == ["0", str(lines)]
        assert "stopped" not in proc.stderr
        assert (tmp_path / "out.txt").read_text().count("\n") == lines
        return
    assert proc.stdout.split() == [str(status), "2"]   # stopped before the next line
    assert proc.stderr.splitlines() == [f"attncore translate: stopped by {name}"]
    assert (tmp_path / "out.txt").read_text() == "".join(f"{iso}\n" for iso in
                                                         list(SAMPLES.values())[:1])


_TRAIN_SIGNALLED = """
import signal
from attncore.train import cli, loop
def train(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    raise AssertionError("not stopped")
loop.train = train
print(cli.main(["copy", "--arch", "transformer", "--out", "model", "--steps", "5"]))
"""


def test_sigterm_stops_training_with_the_resume_hint(tmp_path):
    # a preempted training job (Slurm, Kubernetes) ended without a word
    (tmp_path / "run.py").write_text(_TRAIN_SIGNALLED)
    proc = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout.strip()) == (0, "143"), proc.stderr
    assert proc.stderr.splitlines() == [
        "attncore train: stopped by SIGTERM (--resume continues from the last checkpoint, if "
        "--checkpoint-every wrote one)"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_input_from_a_named_pipe_is_translated(tmp_path):
    # the progress bar counted the lines first, reading the pipe to its end: no output, exit 0
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    environ = subprocess_env(None)
    proc = subprocess.Popen([sys.executable, "-m", "attncore", "translate", "--input", str(fifo)],
                            cwd=tmp_path, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with open(fifo, "w") as writer:
        writer.write("3 March 1998\n4 May 2001\n")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out == "1998-03-03\n2001-05-04\n"


def test_a_lines_default_length_does_not_depend_on_its_batch(tmp_path, dates_model):
    # no --max-length: each line gets its own 2 x length + 10 (the whole batch got it from its
    # longest line, so a line's output changed with --batch-size)
    from attncore import batch
    lines = [dates_model.tokenizer.encode_source(t) for t in ("3/3/98", "Tuesday, 3 March 1998")]
    job = batch.GenerateJob(ids=True)
    limits = [dates_model.default_max_length(len(line)) for line in lines]
    assert limits[0] < limits[1]
    together = job.run(dates_model, lines)
    assert together == [job.run(dates_model, [line])[0] for line in lines]
    capped = job.run(_eos_never(dates_model), lines)
    assert [len(tokens) for tokens in capped] == limits


def test_a_sampled_lines_output_does_not_depend_on_the_batching(tmp_path, dates_model):
    # line n draws from the stream SeedSequence(seed, spawn_key=(n - 1,)): the tokens one
    # model.generate call over every line gives it, for any batch size or window
    from attncore import batch
    from attncore.models.base import generate_with_default_lengths
    texts = [form for form in SAMPLES] * 3
    lines = list(enumerate(texts, 1))
    sample = dict(do_sample=True, temperature=3.0, seed=11)
    job = batch.GenerateJob(**sample)
    frontend = batch.Frontend.from_model(dates_model)
    outputs = []
    for batching in (batch.Batching(batch_size=1, window=1), batch.Batching(batch_size=4, window=7),
                     batch.Batching(batch_size=64)):
        rows = batch.run_batches(job.items(lines, frontend),
                                 lambda rows: job.run_items(dates_model, rows), batching)
        outputs.append([result for _, result in rows])
    sources = [dates_model.tokenizer.encode_source(text) for text in texts]
    one_call = generate_with_default_lengths(dates_model, sources, **sample)
    assert outputs[0] == outputs[1] == outputs[2] == [list(map(int, r.tokens)) for r in one_call]
    # the temperature makes samples differ: by line, not by place in a batch
    assert len({tuple(tokens) for tokens in outputs[0]}) > len(SAMPLES)
    by_place = [job.run(dates_model, [source])[0] for source in sources]  # each at index 0
    assert by_place != outputs[0]

    text = "".join(f"{t}\n" for t in texts)
    cli = [attncore_cli(["generate", "--sample", "--temperature", "3", "--seed", "11",
                         "--batch-size", size, "--no-progress"],
                        tmp_path, stdin=text) for size in (1, 5)]
    assert cli[0].returncode == 0 and cli[1].returncode == 0, cli[0].stderr + cli[1].stderr
    assert cli[0].stdout == cli[1].stdout
    assert cli[0].stdout.splitlines() == [dates_model.tokenizer.decode_target(r.tokens)
                                          for r in one_call]


def test_unknown_token_stops_at_its_line_after_writing_the_lines_before(tmp_path):
    lines = ["3 March 1998", "4 May 2001", "3 März 1998", "5 June 2005"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = attncore_cli(["translate", "--input", "in.txt", "--output", "out.txt",
                         "--no-progress"], tmp_path)
    line = assert_user_error(proc, "line 3:", "missing from the source vocabulary", "'ä'")
    assert "the 2 lines before it were written to 'out.txt'" in line
    assert (tmp_path / "out.txt").read_text().splitlines() == ["1998-03-03", "2001-05-04"]
    lenient = attncore_cli(["translate", "--input", "in.txt", "--allow-unknown"], tmp_path)
    assert lenient.returncode == 0 and len(lenient.stdout.splitlines()) == 4


@pytest.mark.parametrize("args, stdin, fragment, written", [
    (["generate"], "3 March 1998\n\n4 May 2001\n", "line 2: empty line", 1),
    (["translate", "--ids"], "9 4 2\n9 x 2\n9 4 2\n", "line 2: 'x' is not an integer token id",
     1),
    (["translate", "--ids"], "9 700 2\n", "line 1: token id 700 outside [0, 63)", 0),
])
def test_malformed_lines(tmp_path, args, stdin, fragment, written):
    proc = attncore_cli(args, tmp_path, stdin=stdin)
    assert_user_error(proc, fragment)
    assert len(proc.stdout.splitlines()) == written, "the lines before the bad one, no more"


@pytest.mark.parametrize("ids", [False, True])
def test_translate_keeps_blank_lines_blank(tmp_path, ids):
    # (a document's paragraph break stopped the run: "line 2: empty line")
    text = "3 March 1998\n\n \t\n4 May 2001\n" if not ids else "9 4 2\n\n  \n9 4 2\n"
    proc = attncore_cli(["translate", "--batch-size", "2"] + (["--ids"] if ids else []),
                        tmp_path, stdin=text)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert len(lines) == 5 and lines[1:3] == ["", ""] and lines[4] == ""
    assert lines[0] and lines[3]
    if not ids:
        assert lines[0] == "1998-03-03" and lines[3] == "2001-05-04"


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "in.txt").write_bytes(b"3 March 1998\n4 May \xff2001\n")
    proc = attncore_cli(["translate", "--input", "in.txt", "--no-progress"], tmp_path)
    assert_user_error(proc, "line 2: not valid UTF-8")
    assert proc.stdout == "1998-03-03\n"


def test_closed_stdout_is_not_an_error(tmp_path):
    """``attncore translate < big | head -1``: the reader leaving ends the run quietly."""
    (tmp_path / "in.txt").write_text("3 March 1998\n" * 5000)
    code = ("import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-m', 'attncore', 'translate'],"
            " stdin=open('in.txt', 'rb'), stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
            "print(p.stdout.readline().decode().strip()); p.stdout.close()\n"
            "err = p.stderr.read().decode(); p.wait()\n"
            "print(p.returncode, 'Traceback' in err, 'Exception ignored' in err)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.split("\n")[:2] == ["1998-03-03", "141 False False"], proc.stdout + proc.stderr


# -------------------------------------------------------------------------- encode / classify
@pytest.fixture(scope="module")
def encoder_model(tmp_path_factory):
    """A small random encoder-only Transformer with a character tokenizer (positions: 16)."""
    from attncore import models
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer
    from attncore.train.transformer import TransformerConfig
    config = TransformerConfig(kind="encoder_only", src_vocab_size=10, tgt_vocab_size=10,
                               d_model=8, num_heads=2, dim_feedforward=12, num_encoder_layers=1,
                               num_decoder_layers=0, max_positions=16, num_classes=3,
                               dtype="float32").to_dict()
    config["architecture"] = "transformer"
    model = models.from_config(config, seed=3, tokenizer=Tokenizer(src=Vocab("abcdef")))
    path = tmp_path_factory.mktemp("encoder") / "model"
    model.save(path)
    return path, models.load(path)


def test_classify_and_encode_an_encoder_only_model(tmp_path, encoder_model):
    path, model = encoder_model
    texts = ["abc", "fed", "a", "abcdefabcdef"]
    stdin = "".join(f"{t}\n" for t in texts)
    sources = [model.tokenizer.encode_source(t) for t in texts]
    classes = attncore_cli(["classify", "--model", path, "--batch-size", "2"], tmp_path,
                           stdin=stdin)
    assert classes.returncode == 0, classes.stderr
    assert classes.stdout.split() == [str(int(np.argmax(row))) for row in model.classify(sources)]
    scored = attncore_cli(["classify", "--model", path, "--scores"], tmp_path, stdin=stdin)
    label, log_probs = scored.stdout.splitlines()[0].split("\t")
    assert label == classes.stdout.split()[0]
    np.testing.assert_allclose(np.exp(json.loads(log_probs)).sum(), 1.0, rtol=1e-5)
    vectors = attncore_cli(["encode", "--model", path, "--pool", "mean"], tmp_path, stdin=stdin)
    assert vectors.returncode == 0, vectors.stderr
    got = [np.array(json.loads(line), dtype=np.float32) for line in vectors.stdout.splitlines()]
    want = [out.mean(axis=0) for out in model.encode(sources)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    per_token = attncore_cli(["encode", "--model", path, "--pool", "none"], tmp_path,
                             stdin="ab\n")
    assert np.array(json.loads(per_token.stdout)).shape == (2, 8)
    # the default, "document", pools as the classifier does (mean for this model)
    document = attncore_cli(["encode", "--model", path], tmp_path, stdin=stdin)
    assert document.stdout == vectors.stdout


def test_outputs_that_are_not_finite_are_the_error_of_their_line(tmp_path, encoder_model):
    # a model whose embedding overflows on 'f' (3e38): encode said "cannot write nan as JSON"
    # without a line, and classify printed class 0 for the NaN scores (argmax of NaN), exit 0
    path, model = encoder_model
    weights = dict(model.weights)
    table = weights["src_embedding.weight"].copy()
    table[model.tokenizer.encode_source("f")[0]] = 3e38
    weights["src_embedding.weight"] = table
    broken = tmp_path / "overflows"
    type(model)(model.config, weights, tokenizer=model.tokenizer).save(broken)
    stdin = "abc\nabc\nfed\nabc\n"
    for args in (["classify"], ["classify", "--scores"], ["encode"]):
        with np.errstate(all="ignore"):
            proc = attncore_cli([*args, "--model", broken], tmp_path, stdin=stdin)
        assert_user_error(proc, "line 3: ", "stopped there, the 2 lines before it were written")
        assert len(proc.stdout.splitlines()) == 2


def test_outputs_are_utf8_in_an_ascii_locale(tmp_path, encoder_model):
    # LC_ALL=C without Python's UTF-8 mode: "'ascii' codec can't encode character", no line
    path, model = encoder_model
    names = ["café", "thé", "zoë"]
    labelled = tmp_path / "labelled"
    type(model)(dict(model.config, labels=names), model.weights,
                tokenizer=model.tokenizer).save(labelled)
    environ = subprocess_env()
    environ.update(LC_ALL="C", LANG="C", PYTHONUTF8="0")
    environ.pop("PYTHONIOENCODING", None)
    proc = subprocess.run([sys.executable, "-m", "attncore", "classify", "--model", str(labelled)],
                          input=b"abc\nfed\n", capture_output=True, cwd=tmp_path, env=environ,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = [names[int(np.argmax(row))] for row in
                model.classify([model.tokenizer.encode_source(t) for t in ("abc", "fed")])]
    assert proc.stdout.decode("utf-8").splitlines() == expected


def test_ran_classify_and_encode_with_ids(tmp_path):
    from attncore import models
    from attncore.train.ran import RANConfig
    config = RANConfig(vocab_size=20, embedding_size=8, ran_layers=1, head_num=2, head_size=4,
                       window_size=4, min_window_size=2, num_classes=3).to_dict()
    config["architecture"] = "ran"
    models.from_config(config, seed=1).save(tmp_path / "ran")
    model = models.load(tmp_path / "ran")
    documents = [[4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15], [19]]
    stdin = "".join(" ".join(map(str, d)) + "\n" for d in documents)
    classes = attncore_cli(["classify", "--model", "ran", "--ids", "--batch-size", "2"],
                           tmp_path, stdin=stdin)
    assert classes.returncode == 0, classes.stderr
    logits, _ = model.classify([np.array(d) for d in documents])
    assert classes.stdout.split() == [str(int(np.argmax(row))) for row in logits]
    vectors = attncore_cli(["encode", "--model", "ran", "--ids"], tmp_path, stdin=stdin)
    assert vectors.returncode == 0, vectors.stderr
    encoding, _ = model.encode([np.array(d) for d in documents])
    got = np.array([json.loads(line) for line in vectors.stdout.splitlines()], dtype=np.float32)
    np.testing.assert_allclose(got, encoding.pooled, rtol=1e-5, atol=1e-6)
    assert_user_error(attncore_cli(["classify", "--model", "ran"], tmp_path, stdin="abc\n"),
                      "no tokenizer", "--ids")
    assert_user_error(attncore_cli(["classify", "--model", "ran", "--ids"], tmp_path,
                                   stdin="4 20\n"), "line 1: token id 20 outside [0, 20)")
    # a bidirectional RAN cannot generate: refused up front, not as line 1's error
    proc = attncore_cli(["generate", "--model", "ran", "--ids"], tmp_path, stdin="4 5\n")
    line = assert_user_error(proc, "generation needs a causal RAN with token_head='lm'")
    assert "line 1" not in line
    config["num_classes"] = 0
    models.from_config(config, seed=1).save(tmp_path / "no_classes")
    proc = attncore_cli(["classify", "--model", "no_classes", "--ids"], tmp_path, stdin="4 5\n")
    assert "line 1" not in assert_user_error(proc, "this RAN has no classifier")


def test_max_length_past_the_position_table_is_refused_before_any_line(tmp_path):
    from attncore import models
    from attncore.train.transformer import TransformerConfig
    config = TransformerConfig(kind="encoder_decoder", src_vocab_size=9, tgt_vocab_size=9,
                               d_model=8, num_heads=2, dim_feedforward=8, num_encoder_layers=1,
                               num_decoder_layers=1, max_positions=16).to_dict()
    models.from_config(config, seed=0).save(tmp_path / "t")
    proc = attncore_cli(["generate", "--model", tmp_path / "t", "--ids", "--max-length", "30"],
                        tmp_path, stdin="4 5 2\n")
    assert_user_error(proc, "--max-length 30 is more positions than the model's position "
                            "table has (max_positions=16)")
    proc = attncore_cli(["generate", "--model", tmp_path / "t", "--ids", "--min-length", "30"],
                        tmp_path, stdin="4 5 2\n")
    assert_user_error(proc, "--min-length 30 is more positions than the model's position "
                            "table has (max_positions=16)")
    ok = attncore_cli(["generate", "--model", tmp_path / "t", "--ids", "--max-length", "16"],
                      tmp_path, stdin="4 5 2\n")
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 1, ok.stderr
    # a decoder-only prompt whose length with --max-length passes the table: that line's error,
    # in the command line's option names (it said "max_length")
    config.update(kind="decoder_only", num_encoder_layers=0, src_vocab_size=0)
    models.from_config(config, seed=0).save(tmp_path / "lm")
    proc = attncore_cli(["generate", "--model", tmp_path / "lm", "--ids", "--max-length", "14"],
                        tmp_path, stdin="4 5\n4 5 6 7 8 4 5 6\n")
    line = assert_user_error(proc, "line 2:", "--max-length")
    assert "max_length" not in line


def test_a_line_the_model_refuses_is_named(tmp_path, encoder_model):
    path, _ = encoder_model
    stdin = "abc\nab\n" + "a" * 20 + "\nabc\n"  # 20 tokens: longer than the position table
    proc = attncore_cli(["classify", "--model", path], tmp_path, stdin=stdin)
    message = assert_user_error(proc, "line 3:", "position table")
    assert "[0]" not in message, message    # ("sources[0] has 20 tokens": the rerun's index)
    assert len(proc.stdout.split()) == 2


def test_commands_the_model_cannot_run(tmp_path, encoder_model):
    path, _ = encoder_model
    assert_user_error(attncore_cli(["classify"], tmp_path, stdin="3 March 1998\n"),
                      "this model (seq2seq_attention) cannot classify")
    assert_user_error(attncore_cli(["generate", "--model", path], tmp_path, stdin="abc\n"),
                      "this model (transformer, encoder_only) cannot generate")
    line = assert_user_error(attncore_cli(["translate", "--model", path], tmp_path,
                                          stdin="abc\n"),
                             "translate needs an encoder-decoder model")
    assert "use generate" not in line   # (it cannot generate either)


def test_generate_writes_a_paired_language_models_target_text(tmp_path):
    # (a transformer-lm trained on pairs reads "source <eos>": its text output was empty for
    # every line, the ids right)
    from attncore import models
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer
    from attncore.train.transformer import TransformerConfig
    vocab = Vocab("abcdefgh", level="char")
    config = TransformerConfig(kind="decoder_only", src_vocab_size=len(vocab),
                               tgt_vocab_size=len(vocab), d_model=8, num_heads=2,
                               dim_feedforward=12, num_encoder_layers=0, num_decoder_layers=1,
                               max_positions=32).to_dict()
    models.from_config(config, seed=4, tokenizer=Tokenizer(vocab, vocab)).save(tmp_path / "lm")
    args = ["generate", "--model", tmp_path / "lm", "--min-length", "4", "--max-length", "6"]
    text = attncore_cli(args, tmp_path, stdin="abcd\nhgfe\n")
    ids = attncore_cli(args + ["--output-ids"], tmp_path, stdin="abcd\nhgfe\n")
    assert text.returncode == ids.returncode == 0, text.stderr + ids.stderr
    expected = [vocab.decode([int(i) for i in line.split()]) for line in ids.stdout.splitlines()]
    assert text.stdout.splitlines() == expected and any(expected)


def test_attention_names_the_input_not_a_batch_row(tmp_path):
    # (the one input was "sources[0]", as in a batch the user never made)
    from attncore import models
    from attncore.train.transformer import TransformerConfig
    config = TransformerConfig(src_vocab_size=10, tgt_vocab_size=10, d_model=8, num_heads=2,
                               dim_feedforward=12, num_encoder_layers=1, num_decoder_layers=1,
                               max_positions=8).to_dict()
    models.from_config(config, seed=3).save(tmp_path / "tiny")
    proc = attncore_cli(["attention", "--model", tmp_path / "tiny", "--ids",
                         " ".join(["4", "5", "6"] * 4)], tmp_path)
    assert_user_error(proc, "the input has 12 tokens, longer than the position table (8)")


@pytest.mark.parametrize("dask", [False, True])
def test_translate_refuses_a_decoder_only_model(tmp_path, dask):
    # with --dask it ran one (exit 0); refused before any cluster starts
    from attncore import models
    from attncore.train.transformer import TransformerConfig
    config = TransformerConfig(kind="decoder_only", src_vocab_size=10, tgt_vocab_size=10,
                               d_model=8, num_heads=2, dim_feedforward=12, num_encoder_layers=0,
                               num_decoder_layers=1, max_positions=16).to_dict()
    models.from_config(config, seed=3).save(tmp_path / "lm")
    # a RAN language model too (its library translate continues prompts, as generate does)
    models.from_config(dict(architecture="ran", vocab_size=10, embedding_size=8, ran_layers=1,
                            head_num=2, head_size=4, window_size=4, causal=True,
                            token_head="lm"), seed=3).save(tmp_path / "ran")
    # a RAN classifier neither translates nor generates: not told to use generate
    models.from_config(dict(architecture="ran", vocab_size=10, embedding_size=8, ran_layers=1,
                            head_num=2, head_size=4, window_size=4, num_classes=2),
                       seed=3).save(tmp_path / "classifier")
    for model in ("lm", "ran", "classifier"):
        args = ["translate", "--model", tmp_path / model, "--ids"] + (
            ["--dask", "local:1"] if dask else [])
        line = assert_user_error(attncore_cli(args, tmp_path, stdin="4 5\n"),
                                 "translate needs an encoder-decoder model")
        assert line.endswith("; use generate") == (model != "classifier"), line
    # attention named a --max-length the user never gave
    assert_user_error(attncore_cli(["attention", "--model", tmp_path / "lm", "--ids", "4 5"],
                                   tmp_path), "attention needs a generative encoder-decoder model")


# ---------------------------------------------------------------------------------- attention
def test_attention_text_rendering(tmp_path):
    proc = attncore_cli(["attention", "3 March 1998", "--text"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "output: 1998-03-03"
    grid = [line for line in lines if "│" in line and line.split("│")[0].strip()]
    # one row per generated character and one for <eos>
    assert [line.split("│")[0].strip() for line in grid] == list("1998-03-03") + ["<eos>"]
    # the year's digits look at the year: row "1" focuses on a source "1" or "9"
    assert grid[0].rsplit(" ", 2)[1] in "19"


def test_attention_png(tmp_path):
    pytest.importorskip("matplotlib")
    proc = attncore_cli(["attention", "--output", "map.png"], tmp_path, stdin="4/10/85\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "wrote map.png" in proc.stderr
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_png_notes_are_one_line_each(tmp_path, monkeypatch, capsys):
    # (a font without a label's glyphs warned as Python does: file, line and source, per glyph)
    from attncore import cli, heatmap

    def save_png_with_a_note(amap, path, warn=True, **options):
        assert warn is False   # (the command prints the notes itself)
        (tmp_path / "map.png").write_bytes(b"\x89PNG")
        return ["the heat map's font has no glyph for '東京'"]

    monkeypatch.setattr(heatmap, "save_png", save_png_with_a_note)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attention", "3 March 1998", "--output", "map.png"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "attncore attention: warning: the heat map's font has no glyph for '東京'"
    assert err[1].startswith("attncore attention: wrote map.png") and len(err) == 2


def test_attention_without_matplotlib_prints_text_and_fails(tmp_path):
    # A stand-in 'matplotlib' whose import fails, first on the path: as if it were not installed.
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    proc = attncore_cli(["attention", "3 March 1998", "--output", "map.png"], tmp_path, env=env)
    assert_user_error(proc, "map.png not written", "pip install 'attncore[plot]'")
    assert proc.stdout.startswith("output: 1998-03-03")
    assert not (tmp_path / "map.png").exists()


def test_attention_input_errors(tmp_path):
    assert_user_error(attncore_cli(["attention"], tmp_path, stdin=""), "no input")
    assert_user_error(attncore_cli(["attention", "3 Mä"], tmp_path), "'ä'")
    # (PNG data was written under the .jpg name)
    assert_user_error(attncore_cli(["attention", "3 March 1998", "--output", "map.jpg"],
                                   tmp_path), "name it *.png")
    assert not (tmp_path / "map.jpg").exists()
    # the search options reach the search (--length-penalty was accepted and ignored)
    assert_user_error(attncore_cli(["attention", "3 March 1998", "--beam", "4",
                                    "--length-penalty", "1000"], tmp_path),
                      "--length-penalty must lie in [-10, 10]")


def test_attention_refuses_a_ran_before_reading_the_text(tmp_path):
    # (a RAN classifier reported the text's unknown words; a RAN language model
    # "return_attention: this model has no cross-attention to return")
    from attncore import models
    from attncore.data.vocab import Vocab
    from attncore.tokenizer import Tokenizer
    from attncore.train.ran import RANConfig
    vocab = Vocab("abcdef", level="char")
    for name, extra in (("classifier", dict(num_classes=2)),
                        ("lm", dict(num_classes=0, causal=True, token_head="lm"))):
        config = RANConfig(vocab_size=len(vocab), embedding_size=8, ran_layers=1, head_num=2,
                           head_size=4, window_size=4, min_window_size=2, **extra).to_dict()
        models.from_config(config, seed=1, tokenizer=Tokenizer(src=vocab)).save(tmp_path / name)
        for text in ("zzz", "abc"):
            assert_user_error(attncore_cli(["attention", text, "--model", tmp_path / name],
                                           tmp_path),
                              "attention needs a generative encoder-decoder model")
    helped = attncore_cli(["translate", "--help"], tmp_path).stdout
    assert "--min-length" not in helped   # (its --max-length help named an option it lacks)


# -------------------------------------------------------------------------------- other commands
def test_info_and_help(tmp_path):
    info = attncore_cli(["info"], tmp_path)
    assert info.returncode == 0 and f"version: {attncore.__version__}" in info.stdout
    helped = attncore_cli(["--help"], tmp_path)
    for command in ("translate", "generate", "attention", "encode", "classify", "train", "bench"):
        assert command in helped.stdout
    # no command at all is a usage error (it exited 0): the help goes to stderr, status 2
    bare = attncore_cli([], tmp_path)
    assert bare.returncode == 2 and bare.stdout == "" and "translate" in bare.stderr


def test_bench_runs_the_model_benchmark_script(tmp_path):
    # The smallest real run: the RAN rows of bench/models.py with small models, one thread, no
    # peers; installed, the scripts come from attncore.bench, in a checkout from bench/.
    proc = attncore_cli(["bench", "models", "--quick", "--only", "ran", "--threads", "1", "--no-torch"],
                        tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "RAN encode" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert rows and all(float(line.split("|")[3]) > 0 for line in rows)  # RAN tokens/s


def test_bench_with_an_unknown_option_fails_with_the_scripts_usage(tmp_path):
    proc = attncore_cli(["bench", "kernels", "--no-such-option"], tmp_path)
    assert proc.returncode != 0 and "--no-such-option" in proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (["kernels", "--threads", "0"], "thread counts lie in [1, 1024], got 0"),
    (["models", "--threads", "1", "2000"], "thread counts lie in [1, 1024], got 2000"),
    (["models", "--beam", "2000"], "--beam must lie in [1, 1024], got 2000"),
])
def test_bench_option_values_are_usage_errors_not_tracebacks(tmp_path, args, fragment):
    # --threads 0 ended in set_num_threads' traceback after the header had printed, and
    # --beam 2000 after every model was built; then argparse's usage block came with the line
    proc = attncore_cli(["bench", *args], tmp_path)
    assert_user_error(proc, fragment, code=2)


def test_bench_help_prints_each_scripts_help_once(tmp_path):
    # (the option check exits 0 on --help, and the real pass printed it again)
    proc = attncore_cli(["bench", "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.count("usage:") == 2


def test_bench_stops_at_the_first_script_that_fails(tmp_path):
    # an option only models.py takes: kernels.py refused it, then the whole model benchmark ran
    proc = attncore_cli(["bench", "--beam", "2", "--quick", "--threads", "1", "--no-torch"],
                        tmp_path)
    assert_user_error(proc, "attncore bench kernels: error: unrecognized arguments: --beam 2",
                      code=2)
    assert proc.stdout == ""
    # an option only kernels.py takes fails before the kernel benchmark runs (it failed in
    # models.py after the whole kernel table; the messages named the script files)
    proc = attncore_cli(["bench", "--only", "softmax", "--quick", "--threads", "1",
                         "--no-torch"], tmp_path)
    assert_user_error(proc, "attncore bench models: error: argument --only: invalid choice: "
                            "'softmax'", code=2)
    assert proc.stdout == ""


def test_a_benchmark_ended_by_a_signal_is_not_a_success():
    # the OOM killer's SIGKILL gave a return code of -9, which max(0, -9) made exit 0
    from attncore import cli
    command = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert cli._run_script(command) == 128 + 9
    assert cli._run_script([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_bench_token_agreement_counts_missing_tokens_as_disagreement():
    # zip dropped a side's extra tokens and rows: a truncated output agreed 1.00
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "models.py")
    if not os.path.exists(path):
        pytest.skip("needs a source checkout (bench/)")
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location("bench_models", path)
        models = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(models)
    finally:
        sys.path.pop(0)
    assert models._agreement([[5, 6, 7]], [[5, 6, 7]]) == 1.0
    assert models._agreement([[5]], [[5, 6, 7]]) == pytest.approx(1 / 3)
    assert models._agreement([[1, 2], [3]], [[1, 2]]) == pytest.approx(2 / 3)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_interactive_translate_answers_each_line_as_it_is_typed(tmp_path):
    # stdin a terminal: the answer to a line comes before the next line is typed (no batching
    # window to fill), and the process ends at end of input (Ctrl-D).
    import select
    primary, secondary = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "attncore", "translate"], stdin=secondary,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env=subprocess_env())
    os.close(secondary)
    try:
        for text, iso in list(SAMPLES.items())[:2]:
            os.write(primary, (text + "\n").encode())
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, f"no answer to {text!r} while stdin stays open"
            assert proc.stdout.readline().decode().strip() == iso
        os.write(primary, b"\x04")  # end of input
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)


def _bahdanau_command_of_the_dates_script():
    """The ``attncore.train.cli`` arguments of scripts/train_dates.sh's seq2seq-bahdanau run."""
    import shlex
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts", "train_dates.sh")
    if not os.path.exists(script):
        pytest.skip("scripts/train_dates.sh is not in this checkout")
    text = open(script, encoding="utf-8").read().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "attncore.train.cli dates --arch seq2seq-bahdanau" in line)
    words = shlex.split(line.split("|")[0].replace("2>&1", ""))
    return words[words.index("attncore.train.cli") + 1:]


def test_the_bundled_models_reproduction_command_at_small_scale(tmp_path):
    # The documented command, cut to 3 steps (1 of warm-up) on a small training set: it must build the very
    # model that is shipped (same config, same vocabularies, same tensor names and shapes).
    pytest.importorskip("babel")
    from attncore import io
    from attncore.train.cli import main as train_main
    args = _bahdanau_command_of_the_dates_script()
    args[args.index("--out") + 1] = str(tmp_path / "dates")
    args[args.index("--steps") + 1] = "3"
    args[args.index("--warmup-steps") + 1] = "1"
    assert train_main(args + ["--task-option", "num_train=64", "--no-progress"]) == 0
    config, weights = io.load_model_dir(tmp_path / "dates")
    bundled_config, bundled_weights = io.load_model_dir(DATES)
    assert config == bundled_config
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in bundled_weights.items()}
    for name in ("src_vocab.json", "tgt_vocab.json"):
        assert (tmp_path / "dates" / name).read_bytes() == open(os.path.join(DATES, name), "rb").read()


def _eos_never(model):
    """The model with EOS made impossible (its output bias at -1e9): every search runs to its
    limit."""
    from attncore import models
    weights = dict(model.weights)
    bias = weights["decoder.output.bias"].copy()
    bias[model.eos_id] = -1e9
    weights["decoder.output.bias"] = bias
    return models.model_class(model.config["architecture"])(model.config, weights,
                                                            tokenizer=model.tokenizer)


def test_a_ctrl_c_swallowed_by_a_destructor_still_stops_the_run(tmp_path, monkeypatch, capsys):
    # Python raises KeyboardInterrupt wherever the main thread is; inside a __del__ (Dask's
    # Future.__del__ under --dask) it is printed as "ignored" and the run went on to exit 0.
    import signal
    from attncore import batch, cli
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")

    class SignalsOnDelete:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    plain_format = batch.GenerateJob.format
    calls = []

    def format_then_interrupt_in_a_destructor(self, result, frontend):
        calls.append(1)
        if len(calls) == 2:
            SignalsOnDelete()   # deleted at once: the KeyboardInterrupt is raised in __del__
        return plain_format(self, result, frontend)

    monkeypatch.setattr(batch.GenerateJob, "format", format_then_interrupt_in_a_destructor)
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in SAMPLES) * 20)
    status = cli.main(["translate", "--input", str(tmp_path / "in.txt"), "--output",
                       str(tmp_path / "out.txt"), "--no-progress", "--batch-size", "4"])
    assert status == 130
    assert len(calls) == 2   # stopped before the next line, not at the end of the input
    assert capsys.readouterr().err.splitlines() == ["attncore translate: interrupted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # the interrupt is not left behind for a later run, in this thread or another
    import threading
    monkeypatch.setattr(batch.GenerateJob, "format", plain_format)
    statuses = []
    args = ["translate", "--input", str(tmp_path / "in.txt"), "--output",
            str(tmp_path / "again.txt"), "--no-progress"]
    worker = threading.Thread(target=lambda: statuses.append(cli.main(args)))
    worker.start()
    worker.join()
    assert statuses == [0] and cli.main(args) == 0


def test_threads_option_holds_for_the_run_only(tmp_path, monkeypatch):
    # --threads was set_num_threads: a run from a library caller's thread changed every
    # thread's budget for good, and inside a caller's num_threads block it was ignored
    from attncore import batch, cli
    seen = []
    plain_run = batch.GenerateJob.run_items

    def run_items_noting_threads(self, model, items):
        seen.append(attncore.get_num_threads())
        return plain_run(self, model, items)

    monkeypatch.setattr(batch.GenerateJob, "run_items", run_items_noting_threads)
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in SAMPLES))
    args = ["translate", "--input", str(tmp_path / "in.txt"), "--output",
            str(tmp_path / "out.txt"), "--no-progress", "--threads", "1"]
    attncore.set_num_threads(3)
    try:
        three = attncore.get_num_threads()
        with attncore.num_threads(2):
            assert cli.main(args) == 0
            assert attncore.get_num_threads() == min(2, three)   # (1 without OpenMP)
        assert attncore.get_num_threads() == three
        assert seen and set(seen) == {1}
    finally:
        attncore.set_num_threads(None)


def test_overlapping_runs_in_threads_leave_stdout_as_it_was(monkeypatch):
    # each run wrapped sys.stdout and put back what it had found: with A starting first and B
    # ending last, B put A's wrapper back, for good
    import sys
    import threading
    from attncore import cli
    original = sys.stdout
    a_started, b_started, a_done = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def command(args):
        if args.command == "info":        # run A
            a_started.set()
            assert b_started.wait(10)
        else:                             # run B, started while A runs, ends after it
            b_started.set()
            assert a_done.wait(10)
            seen.append(type(sys.stdout).__name__)   # (A's end took B's wrapper away)
        return 0

    monkeypatch.setitem(cli._COMMANDS, "info", command)
    monkeypatch.setitem(cli._COMMANDS, "translate", command)
    a = threading.Thread(target=lambda: (cli.main(["info"]), a_done.set()))
    a.start()
    assert a_started.wait(10)
    b = threading.Thread(target=lambda: cli.main(["translate"]))
    b.start()
    a.join(10)
    b.join(10)
    assert sys.stdout is original and seen == ["_NamedStdout"]


def test_a_run_inside_another_names_the_stdout_it_finds(capsys):
    # a run started while another ran (nested, or in another thread) wrote through whatever
    # stdout it found, unwrapped: a full disk under a redirect read "[Errno 28] ..." unnamed
    import contextlib
    import errno
    import io
    import sys
    from attncore import cli

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    def inner():
        print("a line")
        return 0

    def outer():
        with contextlib.redirect_stdout(Full()):
            return cli.run_command(inner)

    original = sys.stdout
    assert cli.run_command(outer) == cli.EXIT_ERROR
    assert "attncore: error: cannot write to stdout: No space left on device" in \
        capsys.readouterr().err
    assert sys.stdout is original


def test_a_ctrl_c_turned_into_an_error_still_reads_as_interrupted(tmp_path, monkeypatch, capsys):
    # code between the signal and the CLI that catches KeyboardInterrupt and raises its own
    # error (a library's clean-up, say): the run was interrupted, not failed
    import signal
    from attncore import batch, cli
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")

    def format_interrupted_into_an_oserror(self, result, frontend):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise OSError("connection closed") from None

    monkeypatch.setattr(batch.GenerateJob, "format", format_interrupted_into_an_oserror)
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in SAMPLES))
    status = cli.main(["translate", "--input", str(tmp_path / "in.txt"), "--output",
                       str(tmp_path / "out.txt"), "--no-progress"])
    assert status == 130
    assert capsys.readouterr().err.splitlines() == ["attncore translate: interrupted"]


def test_out_of_memory_is_one_error_line(monkeypatch, capsys):
    # a MemoryError (numpy's names the allocation) printed a traceback
    from attncore import cli

    def command(args):
        raise MemoryError("Unable to allocate 182. GiB for an array")

    monkeypatch.setitem(cli._COMMANDS, "translate", command)
    assert cli.main(["translate"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == ("attncore translate: error: out of memory (Unable to "
                                       "allocate 182. GiB for an array)\n")


def test_generate_and_translate_options_reach_the_generation(monkeypatch, tmp_path):
    # (the options were checked, then some were dropped on the way to generate)
    from attncore import batch
    seen = []
    plain = batch.GenerateJob.run
    monkeypatch.setattr(batch.GenerateJob, "run", lambda self, model, sources, lines=None:
                        seen.append(dict(self.options)) or plain(self, model, sources, lines))
    (tmp_path / "in.txt").write_text("3 March 1998\n")
    assert cli_main(["generate", "--input", str(tmp_path / "in.txt"), "--no-progress",
                     "--sample", "--seed", "3", "--temperature", "0.5", "--top-k", "5",
                     "--top-p", "0.9", "--min-length", "2", "--length-penalty", "0.5"]) == 0
    assert cli_main(["translate", "--input", str(tmp_path / "in.txt"), "--no-progress",
                     "--beam", "3", "--length-penalty", "2", "--no-repeat-ngram-size", "3"]) == 0
    assert seen == [dict(beam_size=1, length_penalty=0.5, no_repeat_ngram_size=0, min_length=2,
                         do_sample=True, temperature=0.5, top_k=5, top_p=0.9, seed=3),
                    dict(beam_size=3, length_penalty=2.0, no_repeat_ngram_size=3)]
