"""Evaluation of trained models: exact match and BLEU of encoder-decoders, accuracy of classifiers.

:func:`exact_match` decodes a split of a sequence-to-sequence task with the model's greedy
decoder, compares each decoded string with the target text, and leaves out the inputs the task
marks ambiguous (the dates task: numeric day/month inputs that read as two different dates, see
:func:`attncore.data.dates.is_ambiguous`), so a guess between two valid readings is never scored.

Command line::

    python -m attncore.train.evaluate MODEL_DIR [--task dates] [--n 2000] [--split test] [--seed 0]

loads the model with :func:`attncore.train.export.load_model` and prints the exact match and
the number of examples evaluated (also as a JSON line with ``--json``). The task must be built
with the seed and options the model was trained with (they decide which calendar days, or
which lines of your files, are held out, and the vocabularies): by default those of the model
directory's ``training.json``, which the trainer writes; a vocabulary other than the model's
is refused.

* Tasks with a ``bleu(hyps, split)`` method (translation) also report corpus BLEU (sacrebleu).
* ``--beam N`` decodes with the inference engine (``attncore.load``, beam search of width N)
  instead of the trainer's greedy decoder: the path a user runs.
* Classification tasks (kjv) report accuracy, the majority-class baseline and per-class
  accuracy (:func:`classification_accuracy`), computed with the trainer's forward pass.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, List, Optional

import numpy as np

from attncore.data import metrics
from attncore.data.task import is_classification, pad_sequences

from attncore.models.base import check_finite
from .export import TRAINING_FILE

__all__ = ["exact_match", "decode_texts", "engine_decode_texts", "classification_accuracy",
           "ambiguity_check", "main"]


def ambiguity_check(task) -> Optional[Callable[[str], bool]]:
    """The task's ``source text -> is ambiguous`` predicate, or None when it has none.

    A task may define ``is_ambiguous(src)`` itself; the dates task uses
    :func:`attncore.data.dates.is_ambiguous`.
    """
    check = getattr(task, "is_ambiguous", None)
    if callable(check):
        return check
    if getattr(task, "name", None) == "dates":
        from attncore.data.dates import is_ambiguous
        return is_ambiguous
    return None


def _max_len(task, targets: List[str]) -> int:
    """Decoding length limit: the longest encoded target (without ``<bos>``) plus some slack."""
    longest = max((len(task.encode_tgt(t)) - 1 for t in targets), default=1)
    return longest + 4


def decode_texts(model, task, sources: List[str], batch_size: int = 256,
                 max_len: Optional[int] = None) -> List[str]:
    """Greedy decodings of ``sources`` as text, each cut at its first ``<eos>``."""
    if max_len is None:
        max_len = 32
    out: List[str] = []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        src, lengths = pad_sequences([task.encode_src(s) for s in chunk], pad=model.config.pad_id)
        tokens = model.greedy_decode(src, lengths, max_len)
        out.extend(_text(task, row, model.config.eos_id) for row in tokens)
    return out


def _text(task, row, eos_id: int) -> str:
    """Text of a generated row up to its first ``<eos>``; a stray ``<bos>``/``<pad>`` before it is
    written out (so it counts as an error) instead of being silently dropped."""
    row = [int(i) for i in row]
    if eos_id in row:
        row = row[:row.index(eos_id)]
    try:
        return task.tgt_vocab.decode(row, strip_special=False)
    except TypeError:  # a vocabulary without the keyword
        return task.decode_tgt(row)


def engine_decode_texts(model_dir, task, sources: List[str], *, beam_size: int = 1,
                        max_len: int = 32, batch_size: int = 64) -> List[str]:
    """Decodings of ``sources`` by the inference engine (``attncore.load(model_dir)``), beam
    search of width ``beam_size``, as text (a stray ``<bos>``/``<pad>`` written out, as
    :func:`decode_texts` does: the two decoders are scored alike). Needs the compiled
    extensions."""
    import attncore

    engine = attncore.load(model_dir)
    out: List[str] = []
    for start in range(0, len(sources), batch_size):
        chunk = [np.asarray(task.encode_src(s), dtype=np.int64) for s in sources[start:start + batch_size]]
        results = engine.generate(chunk, max_length=max_len, beam_size=beam_size)
        out.extend(_text(task, r.tokens, engine.config["eos_id"]) for r in results)
    return out


def classification_accuracy(model, task, split: str = "test", batch_size: int = 16,
                            n: Optional[int] = None) -> dict:
    """Accuracy of a document classifier on ``split`` of a classification task.

    Parameters
    ----------
    model : callable ``model(ids, lengths) -> logits (B, C)`` (a trainer classifier)
    task : ClassificationTask (``labels``, ``batches(split, batch_size)``, ``class_counts``)
    n : int, optional
        Evaluate the first ``n`` documents of the split (default: all of them).

    Returns
    -------
    dict with ``accuracy``, ``n_evaluated``, ``majority_baseline`` (share of the split's most
    frequent class), ``per_class`` (label -> accuracy over that label's documents) and
    ``confusion`` (C x C list of counts, rows true labels, columns predictions).
    """
    from . import autograd as ag

    labels = list(task.labels)
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with ag.no_grad():
            for ids, lengths, truth in task.batches(split, batch_size):
                left = None if n is None else int(n) - int(confusion.sum())
                if left is not None and left <= 0:
                    break
                ids, lengths, truth = ids[:left], lengths[:left], np.asarray(truth)[:left]
                predicted = check_finite(model(ids, lengths).data, "logits").argmax(axis=-1)
                np.add.at(confusion, (truth, predicted), 1)
    finally:
        model.train(was_training)
    total = int(confusion.sum())
    per_class = {label: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
                 for i, label in enumerate(labels)}
    return {"accuracy": float(np.trace(confusion) / max(total, 1)), "n_evaluated": total,
            "majority_baseline": float(confusion.sum(axis=1).max() / max(total, 1)),
            "per_class": per_class, "confusion": confusion.tolist()}


def exact_match(model, task, split: str = "test", n: Optional[int] = None, batch_size: int = 256,
                return_details: bool = False, decode: Optional[Callable[[List[str], int], List[str]]] = None):
    """Share of examples of ``split`` whose greedy decoding equals the target text.

    Parameters
    ----------
    model : encoder-decoder with ``greedy_decode(src, src_lengths, max_len)`` and ``config.pad_id``
    task : Seq2SeqTask (``examples``, ``encode_src``, ``encode_tgt``, ``decode_tgt``)
    split : {"train", "valid", "test"}
    n : int, optional
        Evaluate the first ``n`` non-ambiguous examples of the split (default: all of them).
    batch_size : int
        Sources decoded together.
    return_details : bool
        Also return the list of ``(source, target, decoded)`` of every evaluated example.
    decode : callable, optional
        ``decode(sources, max_len) -> texts`` in place of the trainer's greedy decoder (e.g.
        :func:`engine_decode_texts` with a beam).

    Returns
    -------
    (accuracy, n_evaluated) : (float, int)
        ``accuracy`` is 0.0 when nothing was evaluated. With ``return_details``, a third item.
        The comparison is exact (no stripping, no case folding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ambiguous = ambiguity_check(task)
    pairs = [(s, t) for s, t in task.examples(split) if ambiguous is None or not ambiguous(s)]
    if n is not None:
        pairs = pairs[:int(n)]
    if not pairs:
        return (0.0, 0, []) if return_details else (0.0, 0)
    sources = [s for s, _ in pairs]
    targets = [t for _, t in pairs]
    max_len = _max_len(task, targets)
    decoded = (decode(sources, max_len) if decode is not None
               else decode_texts(model, task, sources, batch_size, max_len))
    accuracy = metrics.exact_match(decoded, targets)
    if return_details:
        return accuracy, len(pairs), list(zip(sources, targets, decoded))
    return accuracy, len(pairs)


#: _misfit's reasons that are the model's kind (a language model): no task would fit it
_NO_CLASSIFIER = "it has no classifier (num_classes = 0)"
_NO_DECODER = "it does not decode sequences (a language model or an encoder)"
_UNSCORABLE = (_NO_CLASSIFIER, _NO_DECODER)


def _misfit(model, task) -> Optional[str]:
    """Why ``model`` (a trainer model) cannot be evaluated on ``task``, or None: the task kind
    it needs, and vocabularies and classes of the sizes the model was built for."""
    config = model.config
    classification = is_classification(task)
    classifier = bool(getattr(config, "num_classes", 0))
    decoder = callable(getattr(model, "greedy_decode", None)) and not classifier and \
        getattr(config, "kind", None) != "encoder_only"
    if classification:
        if decoder:   # (scorable, on another kind of task: it said nothing could be scored)
            return "it decodes sequences, the task is a classification task"
        if not classifier:   # (a ran-lm trained on the documents)
            return _NO_CLASSIFIER
        if config.num_classes != len(task.labels):
            return f"it has {config.num_classes} classes, the task {len(task.labels)}"
        sizes = {"vocab_size": len(task.vocab), "src_vocab_size": len(task.vocab)}
    else:
        if classifier:
            return "it is a classifier, the task is a sequence-to-sequence task"
        if not decoder:
            return _NO_DECODER
        sizes = {"src_vocab_size": len(task.src_vocab), "tgt_vocab_size": len(task.tgt_vocab)}
    for key, size in sizes.items():
        held = getattr(config, key, None)
        if held is not None and held != size and not (key == "src_vocab_size" and held == 0):
            return f"its {key} is {held}, the task's vocabulary has {size} tokens"
    return None


def _training_run(model_dir) -> dict:
    """The model directory's training.json (the trainer's task, options and seed), or {}."""
    path = os.path.join(model_dir, TRAINING_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _vocabulary_misfit(model_dir, task) -> Optional[str]:
    """Why the task's vocabularies or labels are not the model directory's, or None. The task
    rebuilds them (from its files, with its seed and options): of the same size but other, ids
    meant other tokens and the score was silently wrong (15.8% for a model at 100%)."""
    config, pairs = _vocabulary_pairs(model_dir, task)
    if pairs is None:
        return None
    for side, ours, theirs in pairs:
        if getattr(ours, "tokens", None) != getattr(theirs, "tokens", None):
            return f"its {side} vocabulary is not the task's"
    if is_classification(task) and config.get("labels") not in (None, list(task.labels)):
        return f"its labels {config['labels']} are not the task's {list(task.labels)}"
    return None


def _vocabulary_pairs(model_dir, task):
    """(config, [(side, the task's vocabulary, the directory's)]) of a model directory, the
    pairs None when it has no tokenizer."""
    from attncore import io
    from attncore.tokenizer import load_tokenizer
    config = io.read_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config)
    if tokenizer is None:
        return config, None
    pairs = [("source", task.src_vocab, tokenizer.source_vocab)]
    if not is_classification(task) and tokenizer.tgt is not None:
        pairs.append(("target", task.tgt_vocab, tokenizer.target_vocab))
    return config, pairs


def _text_rules(vocab):
    """What turns text into ``vocab``'s tokens besides the tokens themselves: (kind, level,
    rules): a plain vocabulary's level and version, a BPE vocabulary's pre-tokenizer and
    normalizer (as JSON)."""
    if hasattr(vocab, "version"):
        return ("plain", vocab.level, vocab.version)
    tokenizer = getattr(vocab, "tokenizer", None)
    if tokenizer is None:
        return None
    data = json.loads(tokenizer.to_str())
    return ("bpe", json.dumps(data.get("pre_tokenizer"), sort_keys=True),
            json.dumps(data.get("normalizer"), sort_keys=True))


def _older_text_rules(model_dir, task) -> Optional[str]:
    """Whether the task's rebuilt vocabularies read text by other rules than the model
    directory's (a version-1 vocabulary, a BPE normalizer without NFC: files written before
    this attncore's rules): the reason, or None. Asked when they differ: evaluate blamed the
    task's options, seed or another task."""
    try:
        _, pairs = _vocabulary_pairs(model_dir, task)
    except (ValueError, OSError, AttributeError):   # (AttributeError: a task without src_vocab)
        return None   # (the other checks say what is wrong with the directory)
    for side, ours, theirs in pairs or ():
        ours, theirs = _text_rules(ours), _text_rules(theirs)
        # (another kind or level is another task's vocabulary, not an older one)
        if ours is None or theirs is None or ours[:2] != theirs[:2] or ours == theirs:
            continue
        return (f"its {side} vocabulary reads text by other rules than the ones this attncore "
                f"builds the task's with (a version-1 vocabulary, or a BPE normalizer without "
                f"NFC: written by an older attncore), so the task cannot rebuild it: evaluate "
                f"it with the attncore that trained it, or train it again")
    return None


def _nothing_to_evaluate(args) -> str:
    return (f"the {args.split} split of task {args.task!r} holds no examples to evaluate (its "
            f"size comes from the task options, e.g. --task-option num_{args.split}=N)")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the evaluation command; returns the exit status. Ctrl-C and SIGTERM stop it as they
    stop every attncore command (one line, 130 / 143)."""
    from attncore.cli import Stopped, StopSignals
    try:
        # (outputs are checked for NaN and infinity: NumPy's overflow warnings on the way
        # there would only add lines before the one error line)
        with StopSignals.watching(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return _main(argv)
    except KeyboardInterrupt as exc:
        return Stopped.report_of(exc, "python -m attncore.train.evaluate")


def _main(argv: Optional[List[str]] = None) -> int:
    from attncore.cli import OneLineErrorParser, _one_line   # one-line errors, as every command
    parser = OneLineErrorParser(prog="python -m attncore.train.evaluate",
                                     description="Greedy-decoding exact match of a model directory on a task split "
                                                 "(inputs the task marks ambiguous are left out).")
    parser.add_argument("model_dir")
    parser.add_argument("--task", default=None,
                        help="task name for attncore.data.get_task (e.g. dates); default: the one "
                             "the model was trained on, with its --task-option values and --seed "
                             "(the model directory's training.json)")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--n", type=int, default=None,
                        help="evaluate the split's first N examples, ambiguous inputs left out (the "
                             "dates task generates its split with num_<split>=N, so its train "
                             "split, which holds ambiguous inputs, gives fewer; default: the "
                             "whole split)")
    parser.add_argument("--seed", type=int, default=None,
                        help="task seed (default: the training run's, else 0)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--errors", type=int, default=0, help="print up to this many wrong decodings")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    parser.add_argument("--beam", type=int, default=0,
                        help="decode with the inference engine, beam search of this width (default: the "
                             "trainer's greedy decoder)")
    args = parser.parse_args(argv)
    if sys.stdout is None:   # (started with stdout closed: the result went nowhere, exit 0)
        parser.error("stdout is closed: the result has nowhere to go")
    if args.errors < 0:   # (-1 printed all wrong decodings but one)
        parser.error(f"--errors must be >= 0, got {args.errors}")
    if args.seed is not None and args.seed < 0:   # (the task's message did not name --seed)
        parser.error(f"--seed must be >= 0, got {args.seed}")

    from attncore.data import get_task
    from .cli import parse_task_options
    from .export import load_model

    from attncore.io import missing_model_dir
    problem = missing_model_dir(args.model_dir)
    if problem:   # (it asked for --task: "has no training.json")
        parser.error(problem)
    training = _training_run(args.model_dir)
    if args.task is None:
        if not training.get("task"):
            parser.error(f"--task is needed: {args.model_dir} has no {TRAINING_FILE} naming the "
                         f"task it was trained on")
        args.task = training["task"]
    same_task = args.task == training.get("task")
    if args.seed is None:
        args.seed = int(training.get("seed", 0)) if same_task else 0
    options = dict(training.get("task_options") or {}) if same_task else {}
    options.update(parse_task_options(args.task_option, parser))
    if args.n is not None and args.n < 1:   # (0 reached sacrebleu with no sentences)
        parser.error(f"--n must be at least 1, got {args.n}")
    if args.n is not None and args.task == "dates":
        # Make the split large enough; the dates task's validation/test splits hold no ambiguous input.
        options.setdefault(f"num_{args.split}", args.n)
    try:   # (a bad task option, file or model directory: one line, not a traceback)
        task = get_task(args.task, seed=args.seed, **options)
        model = load_model(args.model_dir)
        problem = _misfit(model, task) or _vocabulary_misfit(args.model_dir, task)
        # (vocabularies that differ because they read text by older rules: no options help;
        # older files whose tokens the task rebuilds as they were are evaluated as before)
        older = _older_text_rules(args.model_dir, task) if problem else None
        problem = older or problem
    except KeyError as exc:
        parser.error(exc.args[0] if exc.args else str(exc))
    except (ValueError, TypeError, OSError, ImportError) as exc:
        parser.error(_one_line(exc))
    head = {"model_dir": str(args.model_dir), "task": args.task, "split": args.split, "seed": args.seed}
    if problem:   # (they came out as AttributeErrors and IndexErrors from deep inside)
        if problem == older:   # (no task options help either)
            parser.error(f"{args.model_dir} cannot be evaluated on task {args.task!r}: {problem}")
        if problem in _UNSCORABLE:   # (the model's kind, not the task: no other options help)
            parser.error(f"{args.model_dir} has nothing evaluate can score on task "
                         f"{args.task!r}: {problem} (evaluate scores classifiers and "
                         f"sequence-to-sequence models)")
        parser.error(f"{args.model_dir} does not fit task {args.task!r}: {problem} (a model "
                     f"trained on another task, or with other --task-option or --seed values?)")
    if is_classification(task):
        if args.beam:   # (ignored before: the accuracy of a classifier involves no search)
            parser.error("--beam applies to sequence models; this one is a classifier")
        try:
            result = classification_accuracy(model, task, args.split,
                                             batch_size=min(args.batch_size, 16), n=args.n)
        except ValueError as exc:   # (e.g. documents past a Transformer's position table)
            parser.error(f"{args.model_dir} on {args.task!r}: {_one_line(exc)}")
        if not result["n_evaluated"]:
            parser.error(_nothing_to_evaluate(args))
        if args.json:
            print(json.dumps({**head, **result}))
        else:
            print(f"{args.model_dir}: accuracy {result['accuracy']:.2%} on {result['n_evaluated']} "
                  f"{args.task}/{args.split} documents (majority class {result['majority_baseline']:.2%})")
            for label, value in result["per_class"].items():
                print(f"  {label}: {'-' if value is None else f'{value:.2%}'}")
        return 0
    decode = None
    if args.beam:
        def decode(sources, max_len):
            return engine_decode_texts(args.model_dir, task, sources, beam_size=args.beam, max_len=max_len)
    try:
        accuracy, count, details = exact_match(model, task, args.split, n=args.n,
                                               batch_size=args.batch_size, return_details=True,
                                               decode=decode)
    except ValueError as exc:   # (e.g. sources past a Transformer's position table)
        parser.error(f"{args.model_dir} on {args.task!r}: {_one_line(exc)}")
    if not count:   # (BLEU failed with sacrebleu's IndexError; exact match read 0.0%)
        parser.error(_nothing_to_evaluate(args))
    wrong = [d for d in details if d[1] != d[2]]
    decoder = f"engine beam {args.beam}" if args.beam else "trainer greedy"
    score = {}
    if callable(getattr(task, "bleu", None)):  # a translation task: corpus BLEU of the same decodings
        tokenize = getattr(task, "bleu_tokenize", "13a")
        score["bleu"] = metrics.bleu([d[2] for d in details], [d[1] for d in details],
                                     tokenize=tokenize)
        if tokenize != "13a":
            score["bleu_tokenize"] = tokenize
    if args.json:
        print(json.dumps({**head, "decoder": decoder, "exact_match": accuracy, "n_evaluated": count,
                          "errors": len(wrong), **score}))
    else:
        bleu_text = f", BLEU {score['bleu']:.2f}" if score else ""
        if "bleu_tokenize" in score:
            bleu_text += f" (sacrebleu tokenize={score['bleu_tokenize']})"
        # (only a task with an ambiguity check excludes inputs: the dates task)
        excluded = "; ambiguous inputs excluded" if ambiguity_check(task) is not None else ""
        print(f"{args.model_dir}: exact match {accuracy:.4%}{bleu_text} on {count} {args.task}/{args.split} "
              f"examples, {decoder} ({len(wrong)} wrong{excluded})")
    for src, tgt, hyp in wrong[:args.errors]:
        print(f"  {src!r}: expected {tgt}, got {hyp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from attncore.cli import run_command
    sys.exit(run_command(main))
