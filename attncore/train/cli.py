"""``attncore train <task> --arch <arch> --out <dir> [options]``.

:func:`main` parses the arguments and calls :func:`attncore.train.loop.train`; the top-level
``attncore`` command forwards ``train`` to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _number(kind, minimum, *, above=False, below=None):
    """An argparse type: a finite ``kind`` >= minimum (> with ``above``), < ``below`` if given
    (the bounds of ``loop.TRAINING_NUMBERS``, which ``train`` checks again)."""
    from .loop import in_bounds, number_bounds

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not in_bounds(value, minimum, above, below):
            raise argparse.ArgumentTypeError(f"expected a finite number "
                                             f"{number_bounds(minimum, above, below)}, got "
                                             f"{text!r}")
        return value
    return parse


def _training_number(name: str):
    """The argparse type of :func:`attncore.train.train`'s numeric option ``name``."""
    from .loop import TRAINING_NUMBERS
    kind, minimum, above, below = TRAINING_NUMBERS[name]
    return _number(kind, minimum, above=above, below=below)


def build_parser(prog: str = "attncore train") -> argparse.ArgumentParser:
    from .loop import ARCHITECTURES
    from .optim import SCHEDULES

    from attncore.cli import OneLineErrorParser   # one-line errors, as every attncore command

    parser = OneLineErrorParser(
        prog=prog, description="Train a model with the bundled NumPy trainer and export a model directory.",
        epilog="architectures:\n" + "\n".join(f"  {k:24s}{v}" for k, v in ARCHITECTURES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="task name (see attncore.data.list_tasks(): dates, copy, reverse, sort, ...)")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    parser.add_argument("--out", required=True, help="output model directory")
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=_training_number("steps"), default=1000)
    training.add_argument("--batch-size", type=_training_number("batch_size"), default=32)
    training.add_argument("--lr", type=_training_number("lr"), default=1e-3)
    training.add_argument("--seed", type=_training_number("seed"), default=0)
    training.add_argument("--schedule", choices=SCHEDULES, default="inverse_sqrt")
    training.add_argument("--warmup-steps", type=_training_number("warmup_steps"), default=100)
    training.add_argument("--min-lr", type=_training_number("min_lr"), default=0.0)
    training.add_argument("--weight-decay", type=_training_number("weight_decay"), default=0.0, help="> 0 selects AdamW")
    training.add_argument("--clip-norm", type=_training_number("clip_norm"), default=1.0, help="global gradient-norm limit (0: off)")
    training.add_argument("--label-smoothing", type=_training_number("label_smoothing"), default=0.0)
    training.add_argument("--eval-every", type=_training_number("eval_every"), default=0)
    training.add_argument("--eval-batches", type=_training_number("eval_batches"), default=4)
    training.add_argument("--checkpoint-every", type=_training_number("checkpoint_every"), default=0)
    training.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    training.add_argument("--overwrite", action="store_true",
                          help="start from step 0 even when OUT/checkpoint holds a checkpoint")
    training.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    training.add_argument("--task-option", action="append", default=[], metavar="KEY=JSON",
                          help="task option, e.g. --task-option num_train=2000 (repeatable)")
    model = parser.add_argument_group(
        "model (defaults depend on the architecture)",
        "RAN architectures read --d-model, --num-layers and --num-heads as RANConfig's embedding_size, "
        "ran_layers and head_num")
    # sizes checked here: 0 ended in a ZeroDivisionError traceback, a negative dropout was taken
    # for none
    size, count = _number(int, 1), _number(int, 0)
    for name, kind in [("embed-dim", size), ("hidden-size", size), ("num-layers", size),
                       ("rnn-type", str), ("bidirectional", _bool), ("attention", str),
                       ("attention-dim", count), ("input-feeding", _bool), ("d-model", size),
                       ("num-heads", size), ("num-encoder-layers", count),
                       ("num-decoder-layers", count), ("dim-feedforward", size),
                       ("activation", str), ("norm-first", _bool), ("positions", str),
                       ("max-positions", size), ("tie-embeddings", _bool), ("pooling", str),
                       ("dropout", _number(float, 0.0, below=1.0)), ("dtype", str),
                       ("head-size", size), ("window-size", size), ("min-window-size", size),
                       ("cell-pooling", str), ("memory-review", _bool)]:
        model.add_argument(f"--{name}", type=kind, default=None)
    return parser


_TRAINING_KEYS = ("task", "arch", "out", "steps", "batch_size", "lr", "seed", "schedule", "warmup_steps", "min_lr",
                  "weight_decay", "clip_norm", "label_smoothing", "eval_every", "eval_batches",
                  "checkpoint_every", "resume", "overwrite", "no_progress", "task_option")


def parse_task_options(items: List[str], parser: argparse.ArgumentParser) -> dict:
    """``--task-option KEY=VALUE`` items as a dict: VALUE read as JSON, else kept as a string
    (``train=data.tsv``); an item without ``=`` is the parser's usage error. Shared with
    ``python -m attncore.train.evaluate``."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--task-option needs KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``attncore train``; returns the process exit status. A bad command line exits
    through argparse (``SystemExit(2)``, one line on stderr), as every attncore command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loop import TrainingDiverged, _writable_directory, train

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        # (found only when the final checkpoint was written, after every step)
        parser.error(f"--out {args.out!r} is a file, not a model directory")
    if not args.out:   # (it trained into the current directory)
        parser.error("--out is an empty path")
    if args.min_lr > args.lr:   # (cosine / linear then raised the rate towards --min-lr)
        parser.error(f"--min-lr ({args.min_lr:g}) must be <= --lr ({args.lr:g})")
    if sys.stdout is None:   # (started with stdout closed: the result line went nowhere, exit 0)
        parser.error("stdout is closed: the result line has nowhere to go")

    task_options = parse_task_options(args.task_option, parser)
    model_options = {k: v for k, v in vars(args).items() if k not in _TRAINING_KEYS and v is not None}
    import numpy as np

    from ..cli import Stopped, StopSignals
    try:
        # (a diverging run is the one-line "training diverged" error; NumPy's overflow warnings
        # on its way there were extra lines before it)
        with StopSignals.watching(), np.errstate(over="ignore", invalid="ignore",
                                                 divide="ignore"):
            _writable_directory(args.out, "--out")   # (train() checks it again as out_dir)
            _, result = train(
                args.task, args.arch, args.out, steps=args.steps, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, schedule=args.schedule,
                warmup_steps=args.warmup_steps, min_lr=args.min_lr,
                weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                label_smoothing=args.label_smoothing, eval_every=args.eval_every,
                eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
                resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                task_options=task_options, **model_options)
    except TrainingDiverged as error:   # a run that failed, not a wrong command line
        print(f"attncore train: error: {error}", file=sys.stderr)
        return 1
    except KeyError as error:   # (an unknown task: str() of a KeyError quotes its message)
        print(f"attncore train: error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, ImportError, OSError) as error:
        # (TypeError: a task option the task does not take, or of the wrong type)
        print(f"attncore train: error: {error}", file=sys.stderr)
        return 2
    except MemoryError as exc:   # (a traceback before; numpy's names the allocation)
        print(f"attncore train: error: out of memory ({exc})", file=sys.stderr)
        return 1
    except Exception as exc:
        # safetensors' own error type (not an OSError) for a checkpoint or an export that
        # cannot be written, such as on a full disk: a traceback before
        if type(exc).__module__.split(".")[0] != "safetensors":
            raise
        print(f"attncore train: error: cannot write the model or its checkpoint: {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:   # (a traceback; the last checkpoint stays valid)
        return Stopped.report_of(exc, "attncore train", "--resume continues from the last "
                                 "checkpoint, if --checkpoint-every wrote one")
    # (a resumed run that had no step left to take: the checkpoint's last step, not null)
    last = result.last or {"step": result.start_step}
    print(json.dumps({"out": str(args.out), "steps": last.get("step"), "loss": last.get("loss"),
                      "accuracy": last.get("accuracy"),
                      # (every evaluation: with --no-progress the earlier ones were shown nowhere)
                      "evaluations": result.evaluations}))
    return 0


if __name__ == "__main__":
    from attncore.cli import run_command
    sys.exit(run_command(main))
