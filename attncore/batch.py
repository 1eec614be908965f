# SPDX-License-Identifier: Apache-2.0
"""Streaming batch inference: files far bigger than memory, one input per line.

The pipeline, each stage lazy::

    lines (read one at a time)          read_lines(binary_stream)
      -> items (line number, ids)        job.parse(line, tokenizer)
      -> batches of similar length       plan_batches(items, Batching(...))
      -> results (model calls)           job.run_items(model, batch) -> job.run(model, sources)
      -> results in input order          run_batches(...) -> (item, result), input order
      -> output lines                    job.format_item(item, result, frontend)

Memory is bounded by the *window*: at most ``Batching.window`` lines (default 100 x
``batch_size``) are held at once. Within a window the lines are sorted by length and cut into
batches of at most ``batch_size`` rows whose padded size (rows x longest source) stays under
``max_tokens``, so a batch wastes little work on padding; the window's results are put back
in input order before they are written. A window is finished before the next is read, so the
output of line ``n`` is written at most one window after line ``n`` was read.

Errors keep the output honest: when line ``n`` cannot be parsed or the model refuses it, the
results of every line *before* ``n`` are still produced (and written by the caller), nothing
after, and :class:`InputError` names line ``n``. Output is therefore always an exact prefix of
the full output, never a silently truncated or reordered one.

Threads
-------
One batch runs at a time, and the kernels inside it use every core (``attncore``'s thread budget,
``--threads`` / ``OMP_NUM_THREADS``; the default is the CPUs this process may use, capped by a
cgroup CPU quota). Chosen over "N worker processes x 1 thread" because:

* every kernel on the decode path is OpenMP-parallel over batch rows (and heads), and a batch of
  tens of sources gives each core whole rows to work on, so one batch keeps the cores busy;
* the model is loaded once (one copy of the weights, no pickling of batches between processes);
  the ``N x 1`` layout would hold N copies and pay inter-process traffic for every batch;
* Python threads running batches side by side would contend for the GIL in the decode loop
  between kernel calls, and multiplying them by OpenMP threads oversubscribes the cores;
* kernels give bit-identical results for any thread count, so the choice never changes output.

Across machines, :mod:`attncore.distributed` runs the same jobs on Dask workers.
"""
from __future__ import annotations

import inspect
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np

from .models.base import check_seed, continues_prompts, generate_with_default_lengths

__all__ = ["InputError", "Item", "Batching", "Throughput", "Reorderer", "read_lines",
           "count_lines", "plan_batches", "run_batches", "parse_ids", "Frontend", "Job",
           "GenerateJob", "EncodeJob", "ClassifyJob", "json_array"]


class InputError(ValueError):
    """A user input line that cannot be run; ``str()`` is ``"line N: message"``.

    Attributes
    ----------
    line : int
        1-based line number of the offending input.
    message : str
        What is wrong with it.
    """

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = int(line)
        self.message = str(message)

    def __reduce__(self):  # picklable across Dask workers
        return (type(self), (self.line, self.message))


class Item(NamedTuple):
    """One parsed input: its 1-based line number (the output order) and its source ids."""
    line: int
    source: np.ndarray  # (length,) int64


#: A window holds about this many batches' worth of lines (and of tokens under max_tokens).
WINDOW_BATCHES = 100


@dataclass(frozen=True)
class Batching:
    """How lines are grouped.

    Parameters
    ----------
    batch_size : int
        Most sources per model call.
    max_tokens : int, optional
        Most padded source tokens per model call (rows x longest source in the batch). A single
        source longer than this runs alone. ``None``: no token limit.
    window : int, optional
        Lines read, sorted by length and batched together; bounds memory. Default
        ``100 * batch_size``. ``1`` processes lines strictly one by one (interactive use).
        With ``max_tokens`` a window also closes at ``100 * max_tokens`` source tokens (a huge
        ``batch_size`` left to ``max_tokens`` read the whole input into one window).
    """

    batch_size: int = 64
    max_tokens: Optional[int] = None
    window: Optional[int] = None

    def __post_init__(self):
        _check_positive("batch_size", self.batch_size)
        if self.max_tokens is not None:
            _check_positive("max_tokens", self.max_tokens)
        if self.window is None:
            object.__setattr__(self, "window", WINDOW_BATCHES * int(self.batch_size))
        _check_positive("window", self.window)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class Throughput:
    """Counts and wall time of a run; ``summary()`` is the one-line report."""

    lines: int = 0
    source_tokens: int = 0
    batches: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, lines: int, source_tokens: int) -> None:
        """Record one finished batch."""
        self.lines += int(lines)
        self.source_tokens += int(source_tokens)
        self.batches += 1

    @property
    def seconds(self) -> float:
        """Wall time since the run started."""
        return time.perf_counter() - self.started

    def summary(self) -> str:
        """``"1000 lines in 2.1 s: 476 lines/s, 12000 source tokens/s (16 batches)"``."""
        seconds = max(self.seconds, 1e-9)
        return (f"{self.lines} lines in {seconds:.1f} s: {self.lines / seconds:.0f} lines/s, "
                f"{self.source_tokens / seconds:.0f} source tokens/s ({self.batches} batches)")


class Reorderer:
    """Puts results that arrive in any order back in line order.

    Lines are numbered consecutively from ``first``; :meth:`push` returns the results that
    are now ready, in order. Results wait only until the lines before them are done.
    """

    def __init__(self, first: int = 1):
        self.next_line = int(first)
        self._waiting: dict = {}

    def push(self, line: int, value: Any) -> List[tuple]:
        """Add the result of ``line``; return ``[(line, value), ...]`` ready to be written."""
        if line < self.next_line or line in self._waiting:
            raise ValueError(f"line {line} was already delivered")
        self._waiting[line] = value
        ready = []
        while self.next_line in self._waiting:
            ready.append((self.next_line, self._waiting.pop(self.next_line)))
            self.next_line += 1
        return ready

    @property
    def pending(self) -> int:
        """Results held back because an earlier line is not done yet."""
        return len(self._waiting)


# ---------------------------------------------------------------------------------------- input
def read_lines(stream: BinaryIO, *, first: int = 1) -> Iterator[tuple]:
    """``(line_number, text)`` for each line of a binary stream, read lazily.

    The line ending (``\\n`` or ``\\r\\n``, or ``\\r`` closing the last line) is removed, and
    a UTF-8 byte order mark at the start of a line (Windows editors write one at the start of a
    file, and ``cat a.txt b.txt`` puts b's inside; training drops them the same way); nothing
    else is stripped. Text must be UTF-8: a line that is not raises :class:`InputError` with
    its number.
    """
    for number, raw in enumerate(stream, first):
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if text.endswith("\n"):
            text = text[:-1]
        if text.endswith("\r"):   # (also a last line "...\r" without its "\n")
            text = text[:-1]
        yield number, text


def count_lines(path: str | os.PathLike, chunk_size: int = 1 << 20) -> int:
    """Number of lines of a file (a last line without ``\\n`` counts), read in chunks."""
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            if not chunk:
                break
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


_ID_PATTERN = re.compile(r"-?[0-9]+")
# a one-line rerun's row as the model names it (its index in that batch of one, not the file)
ONE_ROW = re.compile(r"\b(?:sources|documents|prompts|tokens_list)\[0\]")


def parse_ids(text: str, vocab_size: Optional[int] = None) -> np.ndarray:
    """Space-separated token ids -> int64 array; raises ``ValueError`` saying what is wrong."""
    fields = text.split()
    if not fields:
        raise ValueError("empty line (expected space-separated token ids)")
    ids = []
    for token in fields:
        # ASCII digits only: int() also takes "4_0" (40), "+4" and other scripts' digits
        if not _ID_PATTERN.fullmatch(token):
            raise ValueError(f"{token!r} is not an integer token id")
        value = int(token)
        if value < 0 or value >= (vocab_size if vocab_size is not None else 2 ** 63):
            # (without a vocabulary, an id past int64 raised OverflowError, which ended a
            # batch job instead of naming its line)
            bound = f"[0, {vocab_size})" if vocab_size is not None else "[0, 2**63)"
            raise ValueError(f"token id {value} outside {bound}")
        ids.append(value)
    return np.asarray(ids, dtype=np.int64)


# ------------------------------------------------------------------------------------- batching
def plan_batches(items: Iterable[Item], batching: Batching) -> Iterator[List[Item]]:
    """Group items into batches of similar length, one window at a time.

    Each window of ``batching.window`` items is sorted by source length (longest first, ties
    in reading order) and cut greedily: a batch closes when one more row would exceed
    ``batch_size`` rows or ``max_tokens`` padded tokens. When reading an item raises
    (a malformed line), the items read before it are still batched and yielded, then the error
    is raised.
    """
    for window, error in _windows(items, batching):
        yield from _split_window(window, batching)
        if error is not None:
            raise error


def _windows(items: Iterable[Item], batching: Batching) -> Iterator[tuple]:
    """``(window, error)``: lists of up to ``batching.window`` items; ``error`` is the
    InputError that cut the last window short (then iteration ends), else None."""
    iterator = iter(items)
    token_limit = None if batching.max_tokens is None else WINDOW_BATCHES * batching.max_tokens
    while True:
        window: List[Item] = []
        tokens, full = 0, False
        try:
            for item in iterator:
                window.append(item)
                tokens += len(item.source)
                full = len(window) >= batching.window or (token_limit is not None
                                                          and tokens >= token_limit)
                if full:
                    break
        except InputError as exc:
            yield window, exc
            return
        if window:
            yield window, None
        if not full:
            return


def _split_window(window: Sequence[Item], batching: Batching) -> Iterator[List[Item]]:
    for positions in _split_positions(window, batching):
        yield [window[i] for i in positions]


def _split_positions(window: Sequence[Item], batching: Batching) -> Iterator[List[int]]:
    """The window's batches as lists of positions in the window (longest source first, ties
    in reading order)."""
    ordered = sorted(range(len(window)), key=lambda i: (-len(window[i].source), i))
    batch: List[int] = []
    for i in ordered:
        # Sorted longest first: the batch's first row is its longest, so padding = rows x that.
        width = len(window[batch[0]].source) if batch else len(window[i].source)
        too_many = len(batch) + 1 > batching.batch_size
        too_big = (batching.max_tokens is not None and batch
                   and (len(batch) + 1) * width > batching.max_tokens)
        if batch and (too_many or too_big):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


# -------------------------------------------------------------------------------------- running
def run_batches(items: Iterable[Item], infer: Callable[[List[Item]], Sequence[Any]],
                batching: Batching, *, throughput: Optional[Throughput] = None,
                on_batch: Optional[Callable[[int, int], None]] = None,
                map_batches: Optional[Callable] = None) -> Iterator[tuple]:
    """Run ``infer`` over batches of ``items`` and yield ``(item, result)`` in line order.

    Parameters
    ----------
    items : iterable of Item
        Results come back in this (reading) order; the line numbers only label the items and
        errors (any numbering: blank lines skipped, repeats). May raise :class:`InputError`
        while being read.
    infer : callable
        ``infer(batch) -> sequence of results``: ``batch`` is a list of :class:`Item` (their
        sources and line numbers), the results one per item, in the same order
        (``lambda batch: job.run_items(model, batch)`` for a :class:`Job`).
    batching : Batching
    throughput : Throughput, optional
        Updated after every batch.
    on_batch : callable, optional
        ``on_batch(lines, source_tokens)`` after every batch (a progress bar).
    map_batches : callable, optional
        ``map_batches(batches) -> iterator of (batch_index, results)`` in any order: runs a
        window's batches elsewhere (several at once, :mod:`attncore.distributed`). It raises
        ``ValueError`` when a batch fails and cleans up when closed. Default: ``infer`` on
        each batch in turn. ``infer`` is still used for the one-by-one reruns.

    Raises
    ------
    InputError
        After every line before the offending one has been yielded, and none after it. A batch
        the model refuses (``ValueError``), or that runs out of memory, is re-run one line at a
        time, in line order, for the lines of its window not yet done, so the error names the
        exact line.
    """
    for window, error in _windows(items, batching):
        yield from _run_window(window, infer, batching, throughput, on_batch,
                               map_batches or _map_in_turn(infer))
        if error is not None:
            raise error


def _map_in_turn(infer):
    def map_batches(batches):
        for index, batch in enumerate(batches):
            yield index, infer(batch)
    return map_batches


def _run_window(window, infer, batching, throughput, on_batch, map_batches):
    """``(item, result)`` of one window's items, in the window's order (results are put back
    in order by position in the window: line numbers may have gaps or repeats)."""
    positions = list(_split_positions(window, batching))
    batches = [[window[i] for i in batch] for batch in positions]
    reorder = Reorderer(0)
    done = set()
    mapped = map_batches(batches)
    try:
        for index, results in mapped:
            batch = batches[index]
            if len(results) != len(batch):
                raise RuntimeError(f"inference returned {len(results)} results for "
                                   f"{len(batch)} sources")
            _account(batch, throughput, on_batch)
            for position, item, result in zip(positions[index], batch, results):
                done.add(position)
                yield from (value for _, value in reorder.push(position, (item, result)))
        return
    except (ValueError, MemoryError):   # (a 42 MB line padded its batch to 182 GiB)
        pass
    finally:
        close = getattr(mapped, "close", None)
        if close is not None:
            close()
    # A batch was refused: rerun the window's remaining lines one by one, in reading order.
    for position in range(len(window)):
        if position in done:
            continue
        item = window[position]
        try:
            result = _infer_checked(infer, [item])[0]
        except ValueError as exc:
            # (the model named the row "sources[0]": its index in this rerun's batch of one)
            raise InputError(item.line, ONE_ROW.sub("this line", str(exc))) from None
        except MemoryError as exc:
            raise InputError(item.line, f"not enough memory for this line "
                                        f"({str(exc) or 'MemoryError'})") from None
        _account([item], throughput, on_batch)
        yield from (value for _, value in reorder.push(position, (item, result)))


def _infer_checked(infer, batch):
    results = infer(batch)
    if len(results) != len(batch):
        raise RuntimeError(f"inference returned {len(results)} results for {len(batch)} sources")
    return results


def _account(batch, throughput, on_batch):
    tokens = sum(len(item.source) for item in batch)
    if throughput is not None:
        throughput.add(len(batch), tokens)
    if on_batch is not None:
        on_batch(len(batch), tokens)


# ------------------------------------------------------------------------------------------ jobs
class Frontend:
    """What the reading and writing side needs of a model: its config and tokenizer.

    :meth:`from_path` reads only ``config.json`` and the vocabularies (no weights), so a
    client that farms the model calls out (:mod:`attncore.distributed`) stays light.
    """

    def __init__(self, config: dict, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer

    @classmethod
    def from_model(cls, model) -> "Frontend":
        return cls(model.config, getattr(model, "tokenizer", None))

    @classmethod
    def from_path(cls, path) -> "Frontend":
        from . import io
        from .tokenizer import load_tokenizer
        config = io.read_config(path)
        return cls(config, load_tokenizer(path, config))

    @property
    def source_vocab_size(self) -> Optional[int]:
        """Size of the id space inputs live in (None when the config does not say)."""
        config = self.config
        if config.get("kind") == "decoder_only":
            key = "tgt_vocab_size"
        elif "src_vocab_size" in config:
            key = "src_vocab_size"
        else:
            key = "vocab_size"
        return int(config[key]) if key in config else None

    def need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and this model has none "
                             f"(config['tokenizer'] is empty): pass token ids with --ids")
        return self.tokenizer


class Job:
    """One kind of inference over lines: parse a line, run a batch, format a result.

    Jobs hold options only (no model), so they pickle cheaply to remote workers. Subclasses
    set ``needs`` (the model method they call) and implement :meth:`run` and :meth:`format`.

    Parameters
    ----------
    ids : bool
        Input lines are space-separated token ids, not text.
    allow_unknown : bool
        Map text tokens the source vocabulary lacks to ``<unk>`` instead of refusing the line.
    """

    needs = ""

    def __init__(self, *, ids: bool = False, allow_unknown: bool = False):
        self.ids = bool(ids)
        self.allow_unknown = bool(allow_unknown)

    #: Transformer kinds (``config["kind"]``) that lack what :attr:`needs`.
    unsupported_kinds: tuple = ()

    def check_model(self, model) -> None:
        """Raise ValueError when ``model`` cannot run this job."""
        self.check_class(type(model), model.config)

    def check_class(self, model_class, config) -> None:
        """Raise ValueError when a model of ``model_class`` with ``config`` cannot run this job
        (the check a client makes without loading weights)."""
        kind = config.get("kind")
        if not callable(getattr(model_class, self.needs, None)) or kind in self.unsupported_kinds:
            architecture = config.get("architecture")
            what = f"{architecture}, {kind}" if kind else str(architecture)
            raise ValueError(f"this model ({what}) cannot {self.needs}")
        cannot = getattr(model_class, "cannot", None)   # (what the class knows from a config)
        reason = cannot(self.needs, config) if cannot is not None else None
        if reason is not None:
            raise ValueError(reason)

    def parse(self, line: int, text: str, frontend: Frontend) -> Item:
        """The :class:`Item` of input line ``line``; InputError when it is malformed."""
        if not text.strip():
            raise InputError(line, "empty line (one input per line)")
        try:
            if self.ids:
                source = parse_ids(text, frontend.source_vocab_size)
            else:
                tokenizer = frontend.need_tokenizer("text input")
                source = tokenizer.encode_source(text, strict=not self.allow_unknown)
                if len(source) == 0:
                    raise ValueError("no tokens in this line")
        except ValueError as exc:
            raise InputError(line, str(exc)) from None
        return Item(line, np.ascontiguousarray(source, dtype=np.int64))

    def items(self, lines: Iterable[tuple], frontend: Frontend) -> Iterator[Item]:
        """Parse ``(line_number, text)`` pairs lazily."""
        for line, text in lines:
            yield self.parse(line, text, frontend)

    def run(self, model, sources: List[np.ndarray], lines: Optional[Sequence[int]] = None) -> list:
        """Results of one batch, one per source (picklable).

        ``lines`` are the sources' 1-based input line numbers, when known: a job whose result
        could depend on where a source sits in its batch (sampling) uses them instead, so a
        line's output is the same for every batching."""
        raise NotImplementedError

    def run_items(self, model, batch: Sequence[Item]) -> list:
        """:meth:`run` on a batch of :class:`Item` (the ``infer`` of :func:`run_batches`).
        Jobs whose results depend on the line numbers (:class:`GenerateJob`'s sampling) pass
        them on; a subclass written for ``run(model, sources)`` keeps working."""
        return self.run(model, [item.source for item in batch])

    def format(self, result, frontend: Frontend) -> str:
        """The output line of one result (no newline)."""
        raise NotImplementedError

    def format_item(self, item: Item, result, frontend: Frontend) -> str:
        """The output line of ``item``'s result: :meth:`format` unless the line's input matters
        (a decoder-only model's text continues its prompt)."""
        return self.format(result, frontend)


#: ``str.translate`` table of text output: the backslash and every character
#: ``str.splitlines`` ends a line at, written as in a Python string literal
LINE_ESCAPES = {ord(c): c.encode("unicode_escape").decode("ascii")
                for c in "\\\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class GenerateJob(Job):
    """Sequence generation (``model.generate``): one output sequence per line, as text through
    the tokenizer, or as space-separated ids (``ids_out``).

    Text output escapes what a generated text could break its line on, as a Python string
    literal does (:data:`LINE_ESCAPES`: ``\\n``, ``\\r``, ``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1e``,
    ``\\x85``, ``\\u2028``, ``\\u2029``, and a backslash as ``\\\\``), so that each input line
    has exactly one output line for any reader (``str.splitlines`` included) and the text
    reads back unambiguously.

    ``max_length=None`` gives each line its own limit (the model's ``default_max_length``:
    ``2 x its length + 10`` tokens, within a position table, or ``min_length + 1`` where that
    is more), as ``translate`` does, so a line's
    output does not depend on its batch. With ``do_sample`` and an int ``seed``, line ``n``
    draws from ``SeedSequence(seed, spawn_key=(n - 1,))`` when :meth:`run` is given the line
    numbers (as :func:`run_batches` does through :meth:`run_items`): the tokens
    ``model.generate(all_lines, seed=seed)`` gives the line in one call, whatever the batch
    size, window or worker count. Without line numbers a source is keyed by its index in the
    batch.

    ``blank_lines=True`` (``attncore translate``) gives an empty or whitespace-only input line
    an empty output line, without a model call (a document's paragraph breaks, as Marian and
    CTranslate2 translate them); by default such a line is an :class:`InputError`, as for
    every job (a prompt or a document needs tokens).
    """

    needs = "generate"
    unsupported_kinds = ("encoder_only",)

    def __init__(self, *, ids: bool = False, ids_out: Optional[bool] = None,
                 allow_unknown: bool = False, max_length: Optional[int] = None,
                 blank_lines: bool = False, **generate_options):
        super().__init__(ids=ids, allow_unknown=allow_unknown)
        self.ids_out = self.ids if ids_out is None else bool(ids_out)
        if max_length is not None:
            _check_positive("max_length", max_length)
        self.max_length = max_length
        self.blank_lines = bool(blank_lines)
        self.options = dict(generate_options)

    def parse(self, line: int, text: str, frontend: Frontend) -> Item:
        if self.blank_lines and not text.strip():
            return Item(line, np.zeros(0, dtype=np.int64))   # (no tokens: no model call)
        return super().parse(line, text, frontend)

    def run_items(self, model, batch):
        results = [[] for _ in batch]   # (a blank line's empty output)
        batch = [(i, item) for i, item in enumerate(batch) if len(item.source)]
        if not batch:
            return results
        sources = [item.source for _, item in batch]
        if "lines" not in inspect.signature(self.run).parameters:   # a subclass's older run()
            done = self.run(model, sources)
        else:
            done = self.run(model, sources, [item.line for _, item in batch])
        for (i, _), result in zip(batch, done):
            results[i] = result
        return results

    def run(self, model, sources, lines=None):
        options = self.options
        if lines is not None and options.get("do_sample") and options.get("seed") is not None:
            # line n's stream: the one source n - 1 of a single call over the whole input gets
            from . import generation
            options = dict(options, seed=generation.source_seeds(
                check_seed(options["seed"]), len(sources), keys=[n - 1 for n in lines]))
        if self.max_length is None:
            results = generate_with_default_lengths(model, sources, **options)
        else:
            results = model.generate(sources, max_length=self.max_length, **options)
        return [list(map(int, result.tokens)) for result in results]

    def format(self, result, frontend):
        if self.ids_out:
            return " ".join(map(str, result))
        text = frontend.need_tokenizer("text output").decode_target(result)
        # one output line per input line, whatever the vocabulary holds
        return text.translate(LINE_ESCAPES)

    def format_item(self, item, result, frontend):
        """A decoder-only model's text output is what follows its prompt (its leading space
        included: prompt + output is the whole text, with a BPE vocabulary too)."""
        if self.ids_out or not len(item.source) or not continues_prompts(frontend.config):
            return self.format(result, frontend)
        text = frontend.need_tokenizer("text output").decode_continuation(
            item.source.tolist(), result)
        return text.translate(LINE_ESCAPES)


class EncodeJob(Job):
    """Encoder outputs (``model.encode``) as one JSON array per line.

    ``pool`` picks what is written per input:

    * ``"document"`` (default): the model's own document vector, (d,): a RAN's pooled GPC
      (its ``cell_pooling``, what its classifier reads); for a Transformer encoder the
      encoder output pooled as its classifier does (``config["pooling"]``: mean or first);
    * ``"mean"`` / ``"first"``: the mean of the per-token outputs, or the first token's;
    * ``"none"``: the per-token outputs, (n, d) as nested arrays.

    Floats are written with the shortest decimal that reads back as the same float32.
    """

    needs = "encode"
    unsupported_kinds = ("decoder_only",)
    POOLING = ("document", "mean", "first", "none")

    def __init__(self, *, pool: str = "document", **options):
        super().__init__(**options)
        if pool not in self.POOLING:
            raise ValueError(f"pool must be one of {self.POOLING}, got {pool!r}")
        self.pool = pool

    def run(self, model, sources, lines=None):
        encoded = model.encode(sources)
        document = None
        if isinstance(encoded, tuple):  # RAN: (RANEncoding, state)
            encoding = encoded[0]
            sequences, document = encoding.sequence, encoding.pooled
        else:  # Transformer: per-token outputs, one (n, d) array per source
            sequences = encoded
        pool = self.pool
        if pool == "document" and document is None:
            pool = "first" if model.config.get("pooling") == "first" else "mean"
        out = []
        for row, sequence in enumerate(sequences):
            sequence = np.asarray(sequence, dtype=np.float32)
            if pool == "document":
                vector = np.asarray(document[row], dtype=np.float32)
            elif pool == "mean":
                vector = sequence.mean(axis=0, dtype=np.float64).astype(np.float32)
            elif pool == "first":
                vector = sequence[0]
            else:
                vector = sequence
            out.append(np.array(vector, dtype=np.float32))
        return out

    def format(self, result, frontend):
        return json_array(result)


class ClassifyJob(Job):
    """Class ids (``model.classify``), one per line, or the class names when the model's
    config has ``labels``; with ``scores`` also the class log-probabilities as a JSON array
    after a tab."""

    needs = "classify"
    unsupported_kinds = ("decoder_only", "encoder_decoder")

    def __init__(self, *, scores: bool = False, **options):
        super().__init__(**options)
        self.scores = bool(scores)

    def run(self, model, sources, lines=None):
        logits = model.classify(sources)
        if isinstance(logits, tuple):  # RAN: (logits, state)
            logits = logits[0]
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim == 1:  # a model that returns class ids directly
            return [(int(label), None) for label in logits]
        finite = np.isfinite(logits).all(axis=1)
        # (argmax of a NaN row is 0: a class, silently; such a row has no label, and
        # format refuses it)
        shifted = np.where(finite[:, None], logits - logits.max(axis=1, keepdims=True), 0.0)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return [(int(np.argmax(row)), row.astype(np.float32)) if ok else (None, None)
                for row, ok in zip(log_probs, finite)]

    def format(self, result, frontend):
        label, log_probs = result
        if label is None:
            raise ValueError("the model's class scores are not finite (NaN or infinity)")
        names = frontend.config.get("labels")
        if isinstance(names, list) and 0 <= label < len(names):
            label = names[label]  # a classifier exported with its class names
        if self.scores and log_probs is not None:
            return f"{label}\t{json_array(log_probs)}"
        return str(label)


def format_result(job: Job, item: Item, result, frontend: Frontend) -> str:
    """``job.format_item(item, result, frontend)``, where a result the output cannot hold (a
    NaN in JSON, a classifier's NaN scores) is the :class:`InputError` of its line."""
    try:
        return job.format_item(item, result, frontend)
    except ValueError as exc:
        raise InputError(item.line, str(exc)) from None


def json_array(array) -> str:
    """A float array as JSON, each value the shortest decimal that reads back as the same
    float32 (``str`` of a NumPy float32)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 0:
        return _float_text(array)
    if array.ndim == 1:
        return "[" + ",".join(_float_text(value) for value in array) + "]"
    return "[" + ",".join(json_array(row) for row in array) + "]"


def _float_text(value) -> str:
    value = np.float32(value)
    if not np.isfinite(value):
        raise ValueError(f"cannot write {value} as JSON")
    return str(value)
