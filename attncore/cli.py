# SPDX-License-Identifier: Apache-2.0
"""The ``attncore`` command line.

    attncore translate [...]   text (or --ids) lines -> generated text, one line per input line
    attncore generate [...]    the same for any generative model, with sampling options
    attncore attention [...]   one input -> cross-attention heat map (PNG, or text on stdout)
    attncore encode [...]      input lines -> encoder vectors as JSON lines
    attncore classify [...]    input lines -> class labels (or ids)
    attncore demo              run the kernels on a small batch and check them against NumPy
    attncore info              version, OpenMP, threads, usable CPUs, SIMD level, BLAS
    attncore train ...         the bundled NumPy trainer (see ``attncore train --help``)
    attncore bench [kernels|models] [...]   bench/kernels.py and bench/models.py

Inference commands read stdin or ``--input FILE`` lazily and write stdout or ``--output FILE``
in input order (:mod:`attncore.batch`); the default model is the bundled dates model, so
``echo "Tuesday, 3 March 1998" | attncore translate`` prints ``1998-03-03``.

Errors a user can make (a missing file, a directory that is not a model, a malformed input
line, an unknown token, a bad option) give one line on stderr and a non-zero exit code, never a
traceback: 2 when argparse rejects the command line, 1 for other errors (option values checked
after parsing included), 130 on Ctrl-C (143 on SIGTERM, 129 on SIGHUP), 141 when the reader of
stdout goes away. When an input line fails, every line before it has been written and the
message names the line and what was written.
"""
import argparse
import contextlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time

EXIT_ERROR = 1
EXIT_USAGE = 2
BUNDLED_MODEL = "dates"


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 1."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):
        # argparse swallows write errors here (``--help > /dev/full`` exited 0 on an
        # unbuffered stdout): main() reports them
        if message:
            (file or sys.stderr).write(message)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def thread_count(text):
    """argparse type of every ``--threads`` (these commands' and the bench scripts'): an int in
    [1, MAX_THREADS] (0 and 2000 were a usage error here and a traceback after a bench's header
    there)."""
    from attncore.kernels.threads import MAX_THREADS
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a thread count, got {text!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"thread counts lie in [1, {MAX_THREADS}], got {value}")
    return value


class Stopped(KeyboardInterrupt):
    """The run was stopped by ``signum`` (SIGINT, SIGTERM or SIGHUP). A KeyboardInterrupt, so
    code that handles Ctrl-C handles the others the same way."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    def report(self, prog: str, note: str = "") -> int:
        """Say so on stderr; return the shell's status for the signal, 128 + its number."""
        how = "interrupted" if self.signum == signal.SIGINT else \
            f"stopped by {signal.Signals(self.signum).name}"
        print(f"{prog}: {how}" + (f" ({note})" if note else ""), file=sys.stderr)
        return 128 + int(self.signum)

    @classmethod
    def report_of(cls, exc: KeyboardInterrupt, prog: str, note: str = "") -> int:
        """:meth:`report` for a caught KeyboardInterrupt: a plain one (Python's own Ctrl-C, where
        no :class:`StopSignals` watched) reads as SIGINT."""
        return (exc if isinstance(exc, cls) else cls()).report(prog, note)


class StopSignals:
    """Ctrl-C (and SIGTERM, SIGHUP) that cannot be lost. Python's own handler raises
    KeyboardInterrupt wherever the main thread is, and where that is a ``__del__`` or a callback
    (Dask's ``Future.__del__``, say) the exception is printed as "ignored" and the run goes on
    to exit 0. This handler also remembers the signal, and the output loop asks :meth:`check`
    after each line. SIGTERM (what ``timeout``, systemd, Kubernetes and Slurm send) and SIGHUP
    used to end the run at once, saying nothing: they now stop it as Ctrl-C does, between lines,
    with a message and the status 128 + the signal's number."""

    seen = 0   # the signal that came, or 0

    @classmethod
    @contextlib.contextmanager
    def watching(cls):
        # Each signal only where it has Python's default: a run started with SIGINT ignored
        # (``nohup``, ``cmd &`` in a script) keeps ignoring it, as ``nohup`` keeps SIGHUP
        # ignored, and a caller's own handler stays. main() called from a thread leaves the
        # handlers (and the main thread's flag) alone.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        defaults = {signal.SIGINT: signal.default_int_handler}
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                defaults[getattr(signal, name)] = signal.SIG_DFL
        watched = {signum: default for signum, default in defaults.items()
                   if signal.getsignal(signum) == default}
        cls.seen = 0
        for signum in watched:
            signal.signal(signum, cls._handle)
        previous_hook = sys.unraisablehook

        def quiet_about_ctrl_c(unraisable):
            # the swallowed signal's "Exception ignored in ... KeyboardInterrupt" traceback:
            # the run stops at the next line and says once that it was stopped
            if not issubclass(unraisable.exc_type, KeyboardInterrupt):
                previous_hook(unraisable)

        sys.unraisablehook = quiet_about_ctrl_c
        try:
            yield
        finally:
            sys.unraisablehook = previous_hook
            for signum, default in watched.items():
                signal.signal(signum, default)
            cls.seen = 0   # (not left for a later run, in this thread or another)

    @classmethod
    def _handle(cls, signum, frame):
        cls.seen = cls.seen or signum
        raise Stopped(signum)

    @classmethod
    def check(cls):
        """Raise :class:`Stopped` if a signal came and was swallowed on its way."""
        if cls.seen:
            raise Stopped(cls.seen)


def _one_line(exc) -> str:
    """An exception's message on one line: a multi-line loader report ``"head:\n  a\n  b"``
    becomes ``"head: a; b"``."""
    parts = [part.strip() for part in str(exc).splitlines() if part.strip()]
    if not parts:
        return type(exc).__name__
    head, rest = parts[0], parts[1:]
    return head if not rest else head.rstrip(":") + ": " + "; ".join(rest)


# ------------------------------------------------------------------------------ existing commands
def _demo(args):
    with _thread_budget(args):
        return _demo_run()


def _demo_run():
    import numpy as np

    import attncore
    from attncore import reference
    rng = np.random.default_rng(0)
    batch, heads, kv_heads, length, head_dim = 4, 8, 2, 512, 64
    q = rng.standard_normal((batch, heads, length, head_dim), dtype=np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, length, head_dim), dtype=np.float32)
            for _ in range(2))
    kv_lengths = np.array([512, 300, 17, 0])
    print(f"attncore {attncore.__version__}: {attncore.info()['simd']}, "
          f"{attncore.get_num_threads()} threads, OpenMP {attncore.info()['openmp']}")
    print(f"fused causal attention, q {q.shape}, k/v {k.shape} (grouped-query), "
          f"kv_lengths {kv_lengths.tolist()}")
    t = time.perf_counter()
    out = attncore.attention(q, k, v, causal=True, kv_lengths=kv_lengths)
    t_fused = time.perf_counter() - t
    t = time.perf_counter()
    ref = reference.attention(q, k, v, causal=True, kv_lengths=kv_lengths)
    t_ref = time.perf_counter() - t
    err = float(np.abs(out - ref).max())
    print(f"  attncore {t_fused * 1e3:7.2f} ms   NumPy reference {t_ref * 1e3:7.2f} ms   "
          f"max |difference| {err:.2e}")
    decode_q = q[:, :, -1:]
    out1 = attncore.attention(decode_q, k, v, kv_lengths=kv_lengths)
    ref1 = reference.attention(decode_q, k, v, kv_lengths=kv_lengths)
    print(f"decode step (q_len 1, split-KV): max |difference| {float(np.abs(out1 - ref1).max()):.2e}")
    x = rng.standard_normal((4, 24, 256), dtype=np.float32)
    w = rng.standard_normal((256, 256), dtype=np.float32) * 0.05
    add = attncore.additive_attention(x[:, :1], x, x, w, w, w[0])
    add_ref = reference.additive_attention(x[:, :1], x, x, w, w, w[0])
    print(f"additive (Bahdanau) attention: max |difference| {float(np.abs(add - add_ref).max()):.2e}")
    ok = err < 1e-4 and np.abs(out1 - ref1).max() < 1e-4 and np.abs(add - add_ref).max() < 1e-4
    print("all kernels agree with the NumPy reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


def _info(args):
    import attncore
    for key, value in attncore.info().items():
        print(f"{key}: {value}")
    return 0


#: what ``attncore bench`` tells a bench script (bench/_harness.py reads them): the name its
#: messages give it, and "1" for a run that only checks its arguments
BENCH_PROG_VARIABLE, BENCH_CHECK_VARIABLE = "ATTNCORE_BENCH_PROG", "ATTNCORE_BENCH_CHECK"


def _bench(argv):
    """``attncore bench [kernels|models] [options]``: the named script with the options, or
    every script present (kernels, then models) when none is named."""
    package = os.path.dirname(os.path.abspath(__file__))
    # Installed: bench/ is the package attncore.bench; in a source checkout it sits beside attncore/.
    folders = [os.path.join(package, "bench"), os.path.join(os.path.dirname(package), "bench")]
    folder = next((f for f in folders if os.path.exists(os.path.join(f, "_harness.py"))), None)
    names = ("kernels", "models")
    chosen = [argv.pop(0)] if argv and argv[0] in names else list(names)
    scripts = [] if folder is None else [os.path.join(folder, f"{name}.py") for name in chosen]
    present = [script for script in scripts if os.path.exists(script)]
    if not present:
        wanted = " and ".join(f"bench/{name}.py" for name in chosen)
        print(f"attncore bench: {wanted} not found in this installation", file=sys.stderr)
        return EXIT_USAGE
    def environment(script, **extra):
        # (its messages name "attncore bench kernels", not "kernels.py")
        name = os.path.splitext(os.path.basename(script))[0]
        return dict(os.environ, **{BENCH_PROG_VARIABLE: f"attncore bench {name}"}, **extra)

    # (an option one script refuses failed after the other's whole run; --help exits 0 from
    # the check and was printed twice)
    if len(present) > 1 and not {"-h", "--help"} & set(argv):
        for script in present:
            status = _run_script([sys.executable, script] + argv,
                                 env=environment(script, **{BENCH_CHECK_VARIABLE: "1"}))
            if status:
                return status
    for script in present:
        status = _run_script([sys.executable, script] + argv, env=environment(script))
        if status:   # (the next script would run its whole benchmark before failing the same way)
            return status
    return 0


def _run_script(command, env=None) -> int:
    """``command``'s exit status, 128 + the signal's number when a signal ended it (a negative
    return code, e.g. the OOM killer's SIGKILL, was taken as success). A signal that stops this
    process (Ctrl-C, SIGTERM) stops the script too, then is reported as this command's."""
    process = subprocess.Popen(command, env=env)
    try:
        with StopSignals.watching():
            status = process.wait()
    except KeyboardInterrupt:
        process.terminate()   # (Ctrl-C reached it too, from the terminal; SIGTERM did not)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    return 128 - status if status < 0 else status


# ----------------------------------------------------------------------------------- inference
def _model_path(args, stack):
    if args.model is not None:
        return args.model
    from importlib import resources
    resource = resources.files("attncore") / "assets" / BUNDLED_MODEL
    return str(stack.enter_context(resources.as_file(resource)))


def _check_model_dir(path) -> None:
    """UserError for a model directory that is not there (missing, or a broken link)."""
    from attncore.io import missing_model_dir
    problem = missing_model_dir(path)
    if problem:
        raise UserError(problem)


def _load_model(path, weight_dtype="float32"):
    from attncore import models
    _check_model_dir(path)
    try:
        return models.load(path, weight_dtype=weight_dtype)
    except (ValueError, TypeError, OSError) as exc:
        raise UserError(_one_line(exc)) from None


def _thread_budget(args):
    """``--threads N`` as a context manager for the run: ``attncore.num_threads(N)``, so a run
    from a library caller's thread changes no other thread's budget and leaves its own as it
    was (``set_num_threads`` changed every thread's, for good, and lost to a caller's
    ``num_threads`` block); without the option, the budget the run finds."""
    if args.threads is None:   # (a given count was checked by argparse: thread_count)
        return contextlib.nullcontext()
    import attncore
    return attncore.num_threads(args.threads)


# generate()'s argument names in its errors, as the command line spells them
_OPTION_NAMES = (("max_length", "--max-length"), ("min_length", "--min-length"),
                 ("temperature", "--temperature"), ("top_p", "--top-p"), ("top_k", "--top-k"),
                 ("length_penalty", "--length-penalty"), ("do_sample=True", "--sample"),
                 ("beam_size", "--beam"), ("seed", "--seed"),
                 ("no_repeat_ngram_size", "--no-repeat-ngram-size"))


def _option_names(message: str) -> str:
    for name, option in _OPTION_NAMES:
        message = message.replace(name, option)
    return message


def _job(args):
    from attncore import batch
    common = dict(ids=args.ids, allow_unknown=args.allow_unknown)
    if args.command in ("translate", "generate"):
        options = dict(beam_size=args.beam, length_penalty=args.length_penalty,
                       no_repeat_ngram_size=args.no_repeat_ngram_size)
        if args.command == "generate":
            options.update(min_length=args.min_length, do_sample=args.sample,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed)
            if args.sample and args.beam != 1:
                raise UserError("--sample draws one sequence per input: leave --beam at 1")
        # checked here, before any line runs (else they came back as an error of line 1)
        from attncore.models.base import MAX_GENERATION_LENGTH, check_generation_options
        try:
            check_generation_options(max_length=args.max_length or MAX_GENERATION_LENGTH,
                                     **options)
        except (TypeError, ValueError) as exc:
            raise UserError(_option_names(_one_line(exc))) from None
        ids_out = args.ids or getattr(args, "output_ids", False)
        # (translate: a document's blank lines stay blank lines; a prompt needs tokens)
        return batch.GenerateJob(ids_out=ids_out, max_length=args.max_length,
                                 blank_lines=args.command == "translate", **common, **options)
    if args.command == "encode":
        return batch.EncodeJob(pool=args.pool, **common)
    return batch.ClassifyJob(scores=args.scores, **common)


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _open_input(args):
    if args.input is None or args.input == "-":
        if sys.stdin is None:   # (started with stdin closed: ``<&-``)
            raise UserError("stdin is closed: give the input with --input FILE")
        return contextlib.nullcontext(sys.stdin.buffer)
    if os.path.isdir(args.input):
        raise UserError(f"input {args.input!r} is a directory, not a file")
    try:
        return open(args.input, "rb")
    except OSError as exc:
        raise UserError(f"cannot read input {args.input!r}: {exc.strerror}") from None


def _read_lines_named(source, args):
    """``batch.read_lines(source)``, whose read errors (an I/O error past the open) name the
    input."""
    from attncore import batch
    lines = batch.read_lines(source)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except OSError as exc:
            where = "stdin" if args.input in (None, "-") else repr(args.input)
            raise UserError(f"cannot read input {where}: {exc.strerror or exc}") from None
        yield line


class _LazyOutput:
    """The ``--output`` file, emptied and written from the first output line on, or at the end
    of a run that had none: a run that fails before any output leaves an existing file as it
    was (it used to be emptied when line 1 failed)."""

    def __init__(self, path):
        self.path = path
        self._file = None
        # can it be written? Asked without opening it: an open would create the file, or hang
        # up on the reader of a named pipe. (Symlinks followed, as the open will.)
        if not path:
            raise UserError("--output is an empty path")
        target = os.path.realpath(path)
        parent = os.path.dirname(target)
        if os.path.isdir(target):
            raise UserError(f"cannot write output {path!r}: it is a directory")
        if path.endswith(os.sep):   # (a directory that does not exist: "it is a directory")
            raise UserError(f"cannot write output {path!r}: a file name may not end with "
                            f"{os.sep!r}")
        if not os.path.isdir(parent):
            raise UserError(f"cannot write output {path!r}: No such file or directory")
        if not (os.access(target, os.W_OK) if os.path.exists(target)
                else os.access(parent, os.W_OK | os.X_OK)):
            raise UserError(f"cannot write output {path!r}: Permission denied")

    def write(self, text: str) -> None:
        if self._file is None:
            self.finish()
        with self._errors_named():   # (a full disk: the message names the file)
            self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            with self._errors_named():
                self._file.flush()

    def finish(self) -> None:
        """Empty the file for this run's output (done by the first write)."""
        if self._file is None:
            with self._errors_named():
                self._file = open(self.path, "w", encoding="utf-8", newline="\n")

    @contextlib.contextmanager
    def _errors_named(self):
        """An OSError of the file as the one-line error naming it; the file then keeps its
        whole lines only (a full disk had cut the last one in the middle: ``2013-11-1``)."""
        try:
            yield
        except OSError as exc:
            if self._file is not None:
                file, self._file = self._file, None
                with contextlib.suppress(OSError):   # (its buffer cannot be written either)
                    file.close()
                _trim_to_whole_lines(self.path)
            raise UserError(f"cannot write output {self.path!r}: {exc.strerror}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self._file is not None:
            file, self._file = self._file, None
            # (close flushes: the last lines' write error shows here, unless one is already
            # on its way out)
            with self._errors_named() if exc_info[0] is None else contextlib.suppress(OSError):
                file.close()


def _trim_to_whole_lines(path) -> None:
    """Cut a file back to just after its last newline (best effort: an output file whose
    last write failed)."""
    with contextlib.suppress(OSError), open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


def _open_output(args):
    # The output must not be the input: an --output file is emptied by the first line written
    # (the input then reads as empty), and stdout appending to the input (``--input F >> F``)
    # feeds the run its own output lines, forever.
    input_file = args.input if args.input not in (None, "-") else _file_number(sys.stdin)
    if args.output is None or args.output == "-":
        if sys.stdout is None:   # (started with stdout closed: ``>&-``)
            raise UserError("stdout is closed: give the output with --output FILE")
        if _same_file(_file_number(sys.stdout), input_file):
            raise UserError("stdout is the input file: write to another file")
        # Lines are UTF-8 in and out, as in an --output file: an ASCII locale's stdout (LC_ALL=C
        # without Python's UTF-8 mode) failed on the first non-ASCII output.
        encoding = (getattr(sys.stdout, "encoding", None) or "").replace("-", "").lower()
        if encoding not in ("utf8", "") and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(encoding="utf-8")
        return contextlib.nullcontext(sys.stdout)
    if _same_file(args.output, input_file):
        raise UserError(f"output {args.output!r} is the input file: write to another file")
    return _LazyOutput(args.output)


class _StdoutError(OSError):
    """A write error of stdout (a full disk; not a reader going away), worded to name it."""

    def __str__(self):
        return str(self.strerror)


class _NamedStdout:
    """stdout while a command runs: its write errors name it (a ``print`` of ``attncore info``
    on a full disk said "[Errno 28] No space left on device")."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        with self._errors_named():
            return self._stream.write(text)

    def flush(self) -> None:
        with self._errors_named():
            self._stream.flush()

    def __getattr__(self, name):   # (fileno, isatty, reconfigure, buffer, encoding...)
        return getattr(self._stream, name)

    @staticmethod
    @contextlib.contextmanager
    def _errors_named():
        try:
            yield
        except (BrokenPipeError, _StdoutError):
            raise
        except OSError as exc:
            raise _StdoutError(exc.errno, f"cannot write to stdout: {exc.strerror}") from None


def _file_number(stream):
    """The file descriptor behind a standard stream, or None (closed, or replaced by an object
    without one)."""
    try:
        return stream.fileno() if stream is not None else None
    except (AttributeError, OSError, ValueError):   # (io.UnsupportedOperation is both)
        return None


def _same_file(a, b) -> bool:
    """Whether ``a`` and ``b`` (paths or open file descriptors) are one regular file."""
    if a is None or b is None:
        return False
    try:
        first, second = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(first.st_mode) and (first.st_dev, first.st_ino) == (second.st_dev,
                                                                           second.st_ino)


def _check_translates(args, model_class, config) -> None:
    """``translate`` takes encoder-decoder models only (on Dask too: it ran a decoder-only one)."""
    from attncore.models.base import continues_prompts
    if args.command == "translate" and (
            not callable(getattr(model_class, "translate", None))
            or config.get("architecture") == "ran"
            or config.get("kind") in ("decoder_only", "encoder_only")):
        # (a language model generates; a classifier or an encoder does neither)
        raise UserError("translate needs an encoder-decoder model" +
                        ("; use generate" if continues_prompts(config) else ""))


def _reports_progress(args, interactive) -> bool:
    """Whether the run reports on stderr: file input, not interactive, not --no-progress."""
    return not (args.no_progress or args.input in (None, "-") or interactive)


def _progress(args, interactive):
    """A tqdm bar on stderr for file input when stderr is a terminal (total from a line count of
    a regular file: a pipe or a FIFO would be read to its end by the count, leaving nothing to
    run), else None. A log file gets no bar frames, only errors and the summary line."""
    if not _reports_progress(args, interactive) or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    from attncore.batch import count_lines
    regular = os.path.isfile(args.input)   # (False for a FIFO or a character device)
    return tqdm(total=count_lines(args.input) if regular else None, unit=" lines",
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5, desc=args.command)


def _run_lines(args):
    """translate / generate / encode / classify: lines in, one output line per input line."""
    from attncore import batch
    from attncore.distributed import ClusterError   # (imports no Dask)
    job = _job(args)
    interactive = (args.input in (None, "-")) and _stdin_is_terminal()
    # Interactive input answers each line as it is typed: no window to fill.
    batching = batch.Batching(batch_size=1, window=1) if interactive else batch.Batching(
        batch_size=args.batch_size, max_tokens=args.max_tokens)
    with contextlib.ExitStack() as stack:
        # (an overflowing model is a line's one-line error, from the outputs' finiteness
        # check; NumPy's RuntimeWarnings on its way there would add lines to stderr)
        import numpy as np
        stack.enter_context(np.errstate(over="ignore", invalid="ignore", divide="ignore"))
        path = _model_path(args, stack)
        if args.dask is not None:
            from attncore import distributed, models
            frontend = _frontend(path)
            model_class = models.model_class(frontend.config.get("architecture"))
            _check_translates(args, model_class, frontend.config)   # (the command's own word first)
            try:
                job.check_class(model_class, frontend.config)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            client = stack.enter_context(distributed.connect(args.dask))
            infer_model = None
        else:
            model = _load_model(path, args.weight_dtype)
            _check_translates(args, type(model), model.config)
            try:
                job.check_model(model)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            frontend = batch.Frontend.from_model(model)
            infer_model = model
        if not args.ids and frontend.tokenizer is None:
            raise UserError("this model has no tokenizer: give token ids with --ids")
        _check_max_length(args, frontend.config)
        stack.enter_context(_thread_budget(args))
        source = stack.enter_context(_open_input(args))
        sink = stack.enter_context(_open_output(args))
        bar = _progress(args, interactive)
        if bar is not None:
            stack.callback(bar.close)
        throughput = batch.Throughput()

        def on_batch(lines, tokens):
            if bar is not None:
                bar.update(lines)
                bar.set_postfix_str(f"{throughput.source_tokens / max(throughput.seconds, 1e-9):.0f} "
                                    f"tok/s", refresh=False)

        items = job.items(_read_lines_named(source, args), frontend)
        if infer_model is not None:
            results = batch.run_batches(items, lambda rows: job.run_items(infer_model, rows),
                                        batching, throughput=throughput, on_batch=on_batch)
        else:
            results = distributed.run_on_dask(client, path, job, items, batching,
                                              kernel_threads=args.threads,
                                              throughput=throughput, on_batch=on_batch,
                                              weight_dtype=args.weight_dtype)
            # closed before the client (the stack unwinds in reverse): its clean-up cancels
            # futures, which on a closed client printed a traceback after `| head`
            stack.callback(results.close)
        written = 0

        def done():
            sink.flush()
            where = "stdout" if args.output in (None, "-") else repr(args.output)
            return "nothing was written" if written == 0 else (
                f"the {written} line{'s' if written > 1 else ''} before it "
                f"{'were' if written > 1 else 'was'} written to {where}")

        try:
            for item, result in results:
                StopSignals.check()
                sink.write(batch.format_result(job, item, result, frontend) + "\n")
                written += 1
                if interactive or written % 256 == 0:
                    sink.flush()
        except batch.InputError as exc:
            # (a line's error from the model names generate's arguments: say the options)
            raise UserError(f"{_option_names(_one_line(exc))}; stopped there, {done()}") from None
        except ClusterError as exc:   # (--dask: workers lost, none came, a model they can't load)
            raise UserError(f"{_one_line(exc)}; stopped there, {done()}") from None
        finish = getattr(sink, "finish", None)
        if finish is not None:   # (an --output file of a run without output lines: emptied)
            finish()
        sink.flush()
        if bar is not None:
            bar.close()
        if _reports_progress(args, interactive):
            print(f"{args.command}: {throughput.summary()}", file=sys.stderr)
    return 0


def _check_max_length(args, config):
    """--max-length / --min-length past a Transformer's position table, refused before any line
    runs (it came back as the error of line 1)."""
    limit = config.get("max_positions") if config.get("architecture") == "transformer" else None
    for option in ("max_length", "min_length"):   # (--min-length came back as line 1's error,
        value = getattr(args, option, None)        # naming a max_length never given)
        if value is not None and isinstance(limit, int) and value > limit:
            raise UserError(f"{_option_names(option)} {value} is more positions than the "
                            f"model's position table has (max_positions={limit})")


def _frontend(path):
    from attncore import batch
    _check_model_dir(path)
    try:
        return batch.Frontend.from_path(path)
    except (ValueError, TypeError, OSError) as exc:
        raise UserError(_one_line(exc)) from None


def _read_one_input(args):
    if args.text is not None:
        return args.text
    with _open_input(args) as source:
        from attncore.batch import read_lines
        for _, text in read_lines(source):
            return text
    raise UserError("no input: give the text as an argument, with --input FILE, or on stdin")


def _attention(args):
    from attncore import batch, heatmap
    with contextlib.ExitStack() as stack:
        model = _load_model(_model_path(args, stack), args.weight_dtype)
    from attncore.models.base import EncoderDecoderModel
    # (a RAN, classifier or language model, is none: it was refused only after the text was
    # read, with "tokens missing from the source vocabulary" or "return_attention: ...")
    if not isinstance(model, EncoderDecoderModel) or \
            model.config.get("kind") in ("decoder_only", "encoder_only"):
        raise UserError("attention needs a generative encoder-decoder model")
    budget = _thread_budget(args)
    job = batch.GenerateJob(ids=args.ids, allow_unknown=args.allow_unknown)
    if not args.ids and model.tokenizer is None:
        raise UserError("this model has no tokenizer: give token ids with --ids")
    try:
        item = job.parse(1, _read_one_input(args), batch.Frontend.from_model(model))
        with budget:
            amap = heatmap.attention_map(model, item.source, max_length=args.max_length,
                                         beam_size=args.beam, length_penalty=args.length_penalty,
                                         no_repeat_ngram_size=args.no_repeat_ngram_size)
    except batch.InputError as exc:
        raise UserError(f"input {exc.message}" if args.text is not None else str(exc)) from None
    except ValueError as exc:   # ("sources[0] has 101 tokens": the one input)
        raise UserError(batch.ONE_ROW.sub("the input", _option_names(_one_line(exc)))) from None
    missing = None
    if args.output is not None and not str(args.output).lower().endswith(".png"):
        raise UserError(f"--output {args.output!r}: the heat map is a PNG, name it *.png")
    if args.output is not None:
        try:
            for note in heatmap.save_png(amap, args.output, warn=False):   # (one line each)
                print(f"attncore attention: warning: {note}", file=sys.stderr)
        except ImportError as exc:  # matplotlib absent: the text rendering instead, and say so
            missing = exc
        except OSError as exc:
            raise UserError(f"cannot write {args.output!r}: {exc.strerror or exc}") from None
        else:
            print(f"attncore attention: wrote {args.output} ({len(amap.target_tokens)} generated "
                  f"x {len(amap.source_tokens)} source tokens)", file=sys.stderr)
    if args.as_text or args.output is None or missing is not None:
        if sys.stdout is None:   # (started with stdout closed: ``>&-``)
            raise UserError("stdout is closed: write the heat map with --output FILE.png")
        sys.stdout.write(heatmap.render_text(amap))
    if missing is not None:
        raise UserError(f"{args.output} not written: {missing}; the text rendering is on stdout")
    return 0


# -------------------------------------------------------------------------------------- parser
def _add_model_options(parser, *, lines=True, generates=True):
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model directory (default: the bundled dates model)" if generates
                        else "model directory (a RAN or an encoder-only Transformer)")
    parser.add_argument("--input", metavar="FILE", default=None,
                        help="read inputs from FILE, one per line (default: stdin)")
    ids_help = "inputs are space-separated token ids, given to the model as they are"
    if generates:
        ids_help += " (an attncore encoder-decoder expects its EOS id, 2, last)"
    if generates and lines:
        ids_help += "; generated outputs are ids too"
    parser.add_argument("--ids", action="store_true", help=ids_help)
    parser.add_argument("--allow-unknown", action="store_true",
                        help="map text tokens missing from the vocabulary to <unk> instead of "
                             "refusing the line")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="kernel threads (default: OMP_NUM_THREADS, else every usable CPU "
                             "within a CPU quota)")
    parser.add_argument("--weight-dtype", choices=("float32", "bfloat16", "int8"),
                        default="float32",
                        help="bfloat16: weight matrices rounded to bfloat16, half the bytes per "
                             "decoding step (faster at small batches); int8: products quantized "
                             "to int8, a quarter of the bytes (fast on AVX-512 VNNI CPUs); see "
                             "docs/ENGINE.md")
    if lines:
        parser.add_argument("--output", metavar="FILE", default=None,
                            help="write outputs to FILE (default: stdout)")
        parser.add_argument("--batch-size", type=_positive_int, default=64,
                            help="most inputs per model call (default 64)")
        parser.add_argument("--max-tokens", type=_positive_int, default=None,
                            help="most padded source tokens per model call")
        parser.add_argument("--no-progress", action="store_true",
                            help="no progress bar / throughput line on stderr for --input files")
        parser.add_argument("--dask", metavar="ADDRESS", default=None,
                            help="run the batches on a Dask cluster: a scheduler address, or "
                                 "'local' / 'local:N' for N local worker processes")


def _add_generation_options(parser, *, min_length=False):
    """--beam, --max-length, --length-penalty, --no-repeat-ngram-size; ``min_length``: the
    parser also has --min-length (generate), which the --max-length help then names."""
    parser.add_argument("--beam", type=_positive_int, default=1, help="beam size (default 1: greedy)")
    parser.add_argument("--max-length", type=_positive_int, default=None,
                        help="most generated tokens (default: each line its own, 2 x its length + 10"
                             + (", or --min-length + 1 where that is more)" if min_length
                                else ")"))
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam scores are log-prob / length ** this (default 1)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                        help="never repeat an N-gram of the decoder sequence (a language "
                             "model's prompt included; default 0: off)")


def build_parser():
    """The argparse parser of every subcommand but ``train`` and ``bench`` (passed through)."""
    parser = OneLineErrorParser(prog="attncore", description="attncore: CPU inference for attention models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices   # name -> sub-command parser

    translate = sub.add_parser("translate", help="text in, generated text out (encoder-decoder)",
                               description="Translate each input line with an encoder-decoder "
                                           "model; one output line per input line, in order.")
    _add_model_options(translate)
    _add_generation_options(translate)

    generate = sub.add_parser("generate", help="generate from each input line (any generative model)",
                              description="Generate a sequence for each input line (greedy, beam "
                                          "search or sampling).")
    _add_model_options(generate)
    _add_generation_options(generate, min_length=True)
    generate.add_argument("--output-ids", action="store_true", help="write token ids, not text")
    generate.add_argument("--min-length", type=int, default=0, help="no EOS before this many tokens")
    generate.add_argument("--sample", action="store_true", help="sample instead of searching")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k best (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, default=None,
                          help="sampling seed: line n draws from its own stream, so its output "
                               "does not depend on --batch-size (default: fresh entropy)")

    attention = sub.add_parser("attention", help="cross-attention heat map of one input",
                               description="Generate for one input and draw its cross-attention: "
                                           "source tokens across, generated tokens down.")
    attention.add_argument("text", nargs="?", default=None,
                           help="the input (default: the first line of --input or stdin)")
    _add_model_options(attention, lines=False)
    _add_generation_options(attention)
    attention.add_argument("--output", metavar="PNG", default=None,
                           help="write the heat map as a PNG (needs matplotlib: attncore[plot])")
    attention.add_argument("--text", dest="as_text", action="store_true",
                           help="print the text rendering too (it is printed without --output)")

    encode = sub.add_parser("encode", help="encoder vectors as JSON lines (RAN, encoder-only)")
    _add_model_options(encode, generates=False)
    encode.add_argument("--pool", choices=("document", "mean", "first", "none"),
                        default="document",
                        help="document: the model's document vector (RAN pooled cell, encoder "
                             "pooled as its classifier); mean / first: of the per-token outputs; "
                             "none: every token's output (default: document)")

    classify = sub.add_parser("classify", help="class labels, or ids without label names "
                                               "(RAN, encoder-only Transformer)")
    _add_model_options(classify, generates=False)
    classify.add_argument("--scores", action="store_true",
                          help="also write the class log-probabilities (JSON) after a tab")

    demo = sub.add_parser("demo", help="run the kernels and check them against NumPy")
    demo.add_argument("--threads", type=thread_count, default=None)
    sub.add_parser("info", help="build and runtime facts")
    sub.add_parser("train", help="train a model with the bundled NumPy trainer")
    sub.add_parser("bench", help="run the benchmark scripts (bench/kernels.py, bench/models.py)")
    return parser


_COMMANDS = {"translate": _run_lines, "generate": _run_lines, "encode": _run_lines,
             "classify": _run_lines, "attention": _attention, "demo": _demo, "info": _info}


def main(argv=None):
    """Run ``attncore ARGV``; returns the exit status."""
    return run_command(_main, argv)


def run_command(function, *args):
    """Run a command's ``function(*args)`` (returning its exit status) as every attncore command
    runs (``attncore``, ``python -m attncore.train.cli``, ``python -m attncore.train.evaluate``):
    stdout's write errors are one line naming it and exit 1, a reader going away is a quiet
    141, and argparse's exits (``--help``, usage errors) pass through the same handling."""
    if sys.stderr is None:   # (started with stderr closed: errors then go nowhere, the status
        sys.stderr = open(os.devnull, "w")   # still tells; print(file=None) wrote to stdout)
    status = None   # (not yet known: a write error then is this run's only error)
    named = _named_stdout_enter()
    try:
        try:
            status = function(*args)
        except SystemExit as exc:   # (argparse's --help and usage errors: stdout still to flush)
            status = exc.code
        if sys.stdout is not None:
            sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader went away (``attncore translate ... | head``): stop quietly.
        _discard_stdout()
        return 141
    except OSError as exc:   # (stdout's last lines on a full disk, say)
        _discard_stdout()
        if status in (None, 0):   # (else the run's own error line has said it)
            print(f"attncore: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        _named_stdout_exit(named)


# The stdout wrappers of runs in progress: wrapper -> [the stream it wraps, runs using it].
# A run wraps the stdout it finds unless it is a wrapper already (another run's, which it then
# shares), and the last run using a wrapper takes it away, while it is still the one in place:
# runs overlapping in library callers' threads each restored what they had found, and put
# another run's wrapper back for good, or took it away while that run still wrote.
_STDOUT_LOCK = threading.Lock()
_STDOUT_RUNS: dict = {}


def _named_stdout_enter():
    """The wrapper this run writes through (None: stdout is closed)."""
    with _STDOUT_LOCK:
        current = sys.stdout
        if current is None:
            return None
        if not isinstance(current, _NamedStdout):
            current = sys.stdout = _NamedStdout(current)
            _STDOUT_RUNS[current] = [current._stream, 0]
        _STDOUT_RUNS.setdefault(current, [None, 0])[1] += 1   # (None: not ours to take away)
        return current


def _named_stdout_exit(named) -> None:
    if named is None:
        return
    with _STDOUT_LOCK:
        entry = _STDOUT_RUNS[named]
        entry[1] -= 1
        if entry[1] == 0:
            del _STDOUT_RUNS[named]
            if entry[0] is not None and sys.stdout is named:
                sys.stdout = entry[0]


def _discard_stdout():
    """Python flushes stdout again at exit: point it at /dev/null, so what is left in its buffer
    goes nowhere quietly instead of as a second error. (A stdout without a file descriptor, a
    caller's redirect to a stream, is left to its owner.)"""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):   # (io.UnsupportedOperation is both)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from attncore.train.cli import main as train_main
        return train_main(argv[1:])
    if argv and argv[0] == "bench":
        try:
            return _bench(argv[1:])
        except KeyboardInterrupt as exc:
            return Stopped.report_of(exc, "attncore bench")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # (the sub-command's error, under its name, when it follows the command)
        after = args.command in argv and unknown[0] in argv[argv.index(args.command) + 1:]
        command = parser.commands[args.command] if after else parser
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:   # a usage error (argparse's status 2), so a script notices
        parser.print_help(sys.stderr)
        return 2
    prog = f"attncore {args.command}"
    try:
        with StopSignals.watching():
            try:
                status = _COMMANDS[args.command](args)
            finally:   # (a Ctrl-C swallowed after the last line, or made into another error
                StopSignals.check()   # by code that caught it: still an interrupted run)
        return status
    except BrokenPipeError:
        raise
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except (ValueError, TypeError, OSError) as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
    except MemoryError as exc:   # (a traceback before; numpy's names the allocation)
        print(f"{prog}: error: out of memory ({_one_line(exc)})", file=sys.stderr)
    except ImportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt as exc:
        return Stopped.report_of(exc, prog)
    return EXIT_ERROR
