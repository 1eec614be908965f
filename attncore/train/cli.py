"""``attncore train <task> --arch <arch> --out <dir> [options]``.

:func:`main` parses the arguments and calls :func:`attncore.train.loop.train`; the top-level
``attncore`` command forwards ``train`` to it.
"""

from __future__ import annotations

import argparse
import json
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


def build_parser(prog: str = "attncore train") -> argparse.ArgumentParser:
    from .loop import ARCHITECTURES
    from .optim import SCHEDULES

    parser = argparse.ArgumentParser(
        prog=prog, description="Train a model with the bundled NumPy trainer and export a model directory.",
        epilog="architectures:\n" + "\n".join(f"  {k:24s}{v}" for k, v in ARCHITECTURES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="task name (see attncore.data.list_tasks(): dates, copy, reverse, sort, ...)")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    parser.add_argument("--out", required=True, help="output model directory")
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=1000)
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--schedule", choices=SCHEDULES, default="inverse_sqrt")
    training.add_argument("--warmup-steps", type=int, default=100)
    training.add_argument("--min-lr", type=float, default=0.0)
    training.add_argument("--weight-decay", type=float, default=0.0, help="> 0 selects AdamW")
    training.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm limit (0: off)")
    training.add_argument("--label-smoothing", type=float, default=0.0)
    training.add_argument("--eval-every", type=int, default=0)
    training.add_argument("--eval-batches", type=int, default=4)
    training.add_argument("--checkpoint-every", type=int, default=0)
    training.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    training.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    training.add_argument("--task-option", action="append", default=[], metavar="KEY=JSON",
                          help="task option, e.g. --task-option num_train=2000 (repeatable)")
    model = parser.add_argument_group(
        "model (defaults depend on the architecture)",
        "RAN architectures read --d-model, --num-layers and --num-heads as RANConfig's embedding_size, "
        "ran_layers and head_num")
    for name, kind in [("embed-dim", int), ("hidden-size", int), ("num-layers", int), ("rnn-type", str),
                       ("bidirectional", _bool), ("attention", str), ("attention-dim", int),
                       ("input-feeding", _bool), ("d-model", int), ("num-heads", int),
                       ("num-encoder-layers", int), ("num-decoder-layers", int), ("dim-feedforward", int),
                       ("activation", str), ("norm-first", _bool), ("positions", str), ("max-positions", int),
                       ("tie-embeddings", _bool), ("pooling", str), ("dropout", float), ("dtype", str),
                       ("head-size", int), ("window-size", int), ("min-window-size", int),
                       ("cell-pooling", str), ("memory-review", _bool)]:
        model.add_argument(f"--{name}", type=kind, default=None)
    return parser


_TRAINING_KEYS = ("task", "arch", "out", "steps", "batch_size", "lr", "seed", "schedule", "warmup_steps", "min_lr",
                  "weight_decay", "clip_norm", "label_smoothing", "eval_every", "eval_batches",
                  "checkpoint_every", "resume", "no_progress", "task_option")


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``attncore train``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    from .loop import train

    task_options = {}
    for item in args.task_option:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--task-option needs KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            task_options[key] = json.loads(value)
        except ValueError:
            task_options[key] = value
    model_options = {k: v for k, v in vars(args).items() if k not in _TRAINING_KEYS and v is not None}
    try:
        _, result = train(args.task, args.arch, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, schedule=args.schedule, warmup_steps=args.warmup_steps, min_lr=args.min_lr,
                          weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                          label_smoothing=args.label_smoothing, eval_every=args.eval_every,
                          eval_batches=args.eval_batches, checkpoint_every=args.checkpoint_every,
                          resume=args.resume, progress=not args.no_progress, task_options=task_options,
                          **model_options)
    except (ValueError, KeyError, ImportError, FileNotFoundError) as error:
        print(f"attncore train: error: {error}", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else {}
    print(json.dumps({"out": str(args.out), "steps": last.get("step"), "loss": last.get("loss"),
                      "accuracy": last.get("accuracy"), "evaluations": result.evaluations[-1:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
