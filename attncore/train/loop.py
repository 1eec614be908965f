"""The training loop and the ``attncore.train.train`` entry point.

:func:`fit` is model-agnostic: it draws batches from a :class:`BatchStream`, computes a loss with
a *loss function* ``loss_fn(model, batch) -> (loss Tensor, correct, counted)``, back-propagates,
clips the global gradient norm, steps the optimiser with the scheduled learning rate, shows a
tqdm progress bar on a terminal's stderr, or about 20 plain lines when stderr is a file (loss,
accuracy, tokens/s), calls an evaluation callback every
``eval_every`` steps, and writes resumable checkpoints.

:func:`train` builds a task (:func:`attncore.data.get_task`), a model for ``arch``
(:data:`ARCHITECTURES`), runs :func:`fit` and exports a model directory (:mod:`attncore.io`).

Determinism: the model initialisation, the dropout generator and the batch order all derive
from ``seed``; the batch order is (epoch, index) -> batch, so a resumed run skips exactly the
batches already used and matches an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from attncore.data.task import is_classification

from . import autograd as ag
from .checkpoint import CHECKPOINT_WEIGHTS, load_checkpoint, save_checkpoint
from .export import export
from .optim import Adam, clip_grad_norm, make_schedule

__all__ = ["BatchStream", "fit", "TrainResult", "train", "ARCHITECTURES", "build_model",
           "seq2seq_loss", "prefix_lm_loss", "classification_loss", "prefix_lm_batch"]


# ------------------------------------------------------------------------------------------
# Loss functions: (model, batch) -> (loss, number correct, number counted)
# ------------------------------------------------------------------------------------------

def seq2seq_loss(label_smoothing: float = 0.0, pad_id: int = 0) -> Callable:
    """Teacher-forced token cross-entropy for ``(src, src_lengths, tgt, tgt_lengths)`` batches.

    Decoder input ``tgt[:, :-1]``, labels ``tgt[:, 1:]``; padded labels are ignored in loss,
    gradient and accuracy (mean over real target tokens).
    """
    def loss_fn(model, batch):
        src, src_lengths, tgt, _ = batch
        labels = tgt[:, 1:]
        logits = model(src, src_lengths, tgt[:, :-1])
        loss = ag.cross_entropy(logits, labels, ignore_index=pad_id, label_smoothing=label_smoothing)
        counted = labels != pad_id
        correct = int(((logits.data.argmax(-1) == labels) & counted).sum())
        return loss, correct, int(counted.sum())
    return loss_fn


def prefix_lm_batch(batch, pad_id: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn a seq2seq batch into decoder-only inputs: ``source <eos> target <eos>``.

    Each row is ``src[:src_len]`` (which ends in ``<eos>``, the separator) followed by
    ``tgt[1:tgt_len]`` (the target without ``<bos>``). Labels are the next tokens, with the
    source part set to ``pad_id`` (ignored): only the target is predicted.

    Returns
    -------
    inputs : int64 (B, L - 1); lengths : (B,); labels : int64 (B, L - 1)
    """
    src, src_lengths, tgt, tgt_lengths = batch
    rows = [np.concatenate([s[:ls], t[1:lt]]) for s, ls, t, lt in zip(src, src_lengths, tgt, tgt_lengths)]
    length = max(len(r) for r in rows)
    sequences = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length - 1), pad_id, dtype=np.int64)
    for i, (row, source_length) in enumerate(zip(rows, src_lengths)):
        sequences[i, :len(row)] = row
        labels[i, source_length - 1:len(row) - 1] = row[source_length:]
    lengths = np.array([len(r) - 1 for r in rows], dtype=np.int64)
    return sequences[:, :-1], lengths, labels


def prefix_lm_loss(label_smoothing: float = 0.0, pad_id: int = 0) -> Callable:
    """Decoder-only loss on seq2seq batches (see :func:`prefix_lm_batch`)."""
    def loss_fn(model, batch):
        inputs, lengths, labels = prefix_lm_batch(batch, pad_id)
        logits = model(inputs, lengths)
        loss = ag.cross_entropy(logits, labels, ignore_index=pad_id, label_smoothing=label_smoothing)
        counted = labels != pad_id
        correct = int(((logits.data.argmax(-1) == labels) & counted).sum())
        return loss, correct, int(counted.sum())
    return loss_fn


def classification_loss(label_smoothing: float = 0.0) -> Callable:
    """Cross-entropy over ``(ids, lengths, labels)`` batches."""
    def loss_fn(model, batch):
        ids, lengths, labels = batch
        logits = model(ids, lengths)
        loss = ag.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return loss, int((logits.data.argmax(-1) == labels).sum()), len(labels)
    return loss_fn


def document_lm_loss(label_smoothing: float = 0.0, pad_id: int = 0) -> Callable:
    """Next-token cross-entropy of a causal language model over the documents of a batch.

    The documents are the first two fields of the batch: the ``ids, lengths`` of classification
    batches, the ``src, src_lengths`` of seq2seq batches. Position t predicts token t + 1;
    padding is ignored.
    """
    def loss_fn(model, batch):
        ids, lengths = batch[0], np.asarray(batch[1])
        logits = model(ids, lengths)[:, :-1]
        positions = np.arange(1, ids.shape[1])[None, :]
        counted = positions < lengths[:, None]
        labels = np.where(counted, ids[:, 1:], pad_id)
        loss = ag.cross_entropy(logits, labels, ignore_index=pad_id, label_smoothing=label_smoothing)
        correct = int(((logits.data.argmax(-1) == labels) & counted).sum())
        return loss, correct, int(counted.sum())
    return loss_fn


# ------------------------------------------------------------------------------------------
# Data position
# ------------------------------------------------------------------------------------------

class BatchStream:
    """Endless batches from a deterministic epoch factory, with a resumable position.

    Parameters
    ----------
    make_epoch : callable
        ``make_epoch(epoch) -> iterable of batches``; must return the same batches for the
        same epoch (e.g. ``task.batches("train", 32, shuffle=True, seed=seed + epoch)``).
    epoch, batch_index : int
        Where to start (from a checkpoint): earlier batches of ``epoch`` are skipped.
    """

    def __init__(self, make_epoch: Callable[[int], Iterable], epoch: int = 0, batch_index: int = 0):
        self.make_epoch = make_epoch
        self.epoch, self.batch_index = int(epoch), int(batch_index)
        self._iterator: Optional[Iterator] = None

    def _open(self) -> None:
        self._iterator = iter(self.make_epoch(self.epoch))
        for skipped in range(self.batch_index):
            try:
                next(self._iterator)
            except StopIteration:   # (a resumed position past the epoch: a bare traceback)
                raise ValueError(f"batch_index {self.batch_index} lies past epoch "
                                 f"{self.epoch}, which has {skipped} batches") from None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._open()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.batch_index == 0:
                raise ValueError(f"epoch {self.epoch} yielded no batch") from None
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._open()
            batch = next(self._iterator)
        self.batch_index += 1
        return batch


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What :func:`fit` returns.

    history : one dict per step of this call: step, loss, accuracy, lr, grad_norm, tokens
    evaluations : one dict per evaluation of the run: step plus whatever ``eval_fn`` returned
        (a resumed run's include those before its checkpoint)
    start_step : the step a resumed run started after (0 for a new run)
    last : the run's last step's dict (a resumed run that took no step: its checkpoint's)
    """

    history: List[dict] = field(default_factory=list)
    evaluations: List[dict] = field(default_factory=list)
    start_step: int = 0
    last: Optional[dict] = None


def fit(model, optimizer: Adam, batches: BatchStream, loss_fn: Callable, steps: int, *,
        schedule: Optional[Callable[[int], float]] = None, clip_norm: float = 1.0,
        eval_fn: Optional[Callable] = None, eval_every: int = 0,
        checkpoint_dir=None, checkpoint_every: int = 0, resume: bool = False,
        progress: bool = True, description: str = "train",
        loss_limit: Optional[float] = None, data_options: Optional[dict] = None,
        run_options: Optional[dict] = None) -> TrainResult:
    """Train ``model`` until ``optimizer`` has taken ``steps`` updates.

    Parameters
    ----------
    model : Module with ``config`` and ``dropout_rng``
    optimizer : Adam
    batches : BatchStream
    loss_fn : callable ``(model, batch) -> (loss, correct, counted)``
    steps : int
        Total number of updates (a resumed run continues up to it).
    schedule : callable ``step -> lr``, optional (default: constant ``optimizer.lr``)
    clip_norm : float
        Global gradient-norm limit; ``<= 0`` disables clipping.
    eval_fn : callable ``(model, step) -> dict``, optional
        Called in eval mode without gradients every ``eval_every`` steps and after the last.
    checkpoint_dir : path, optional
        Where checkpoints go (every ``checkpoint_every`` steps and after the last step).
    resume : bool
        Start from the checkpoint in ``checkpoint_dir`` if there is one.
    progress : bool
        Show a tqdm bar on stderr.
    data_options : dict, optional
        What fixes the batch order (task, its options, batch size, seed), stored in the
        checkpoints: a resume with other values is refused (the saved data position would
        point at other batches, and the run went on with exit 0).
    run_options : dict, optional
        What else decides the weights (learning rate, schedule and the steps it spans,
        warm-up, weight decay, clipping, label smoothing), stored and checked the same way: a
        resume with another --lr, or a cosine run ended at --steps 5 and resumed to 12 (its
        rate had decayed to 0 and jumped back), gave another model than one run, with exit 0.
    loss_limit : float, optional
        A step whose loss passes it stops the run as diverged (:func:`train` gives 100 x the
        loss of uniform predictions: the weights can stay finite, 1e30, while the loss reads
        3.6e29 and every float32 forward pass of the exported model overflows).
    """
    from tqdm.auto import tqdm

    start_step, resumed = 0, {}   # (resumed: the checkpoint's "extra" record)
    # (the weights file holds the state; trainer_state.json is its readable copy, and a run
    # whose copy was gone started over from step 0, overwriting the checkpoint)
    if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT_WEIGHTS).exists():
        state = load_checkpoint(checkpoint_dir, model, optimizer)
        resumed = state.get("extra") or {}
        saved = resumed.get("data_options")
        if isinstance(saved, dict) and isinstance(saved.get("task_options"), dict):
            # (a checkpoint of a run that named its files relative to this directory)
            saved = dict(saved, task_options=_absolute_paths(saved["task_options"]))
        changed = (_changed_options(saved, data_options)
                   + _changed_options(resumed.get("run_options"), run_options))
        if changed:
            raise ValueError(f"the checkpoint in {str(checkpoint_dir)!r} was trained with other "
                             + ", ".join(changed)
                             + ": resume with the same ones, or train into another directory")
        start_step = state["step"]
        if start_step > steps:   # (it exited 0, printed null for the steps and re-exported)
            raise ValueError(f"the checkpoint in {str(checkpoint_dir)!r} is at step "
                             f"{start_step}, past the {steps} steps asked for")
        batches.epoch, batches.batch_index, batches._iterator = state["epoch"], state["batch_index"], None

    result = TrainResult(start_step=start_step)
    smoothed_loss, smoothed_accuracy = None, None
    if start_step:   # what the run had logged before its checkpoint
        result.evaluations = list(resumed.get("evaluations") or [])
        result.last = resumed.get("last_step") or {"step": start_step}
        smoothed_loss, smoothed_accuracy = resumed.get("smoothed") or (None, None)
    model.train()
    # A log file (stderr not a terminal) gets plain lines, about 20 a run, not bar frames.
    terminal = sys.stderr is not None and sys.stderr.isatty()
    bar = tqdm(total=steps, initial=start_step, file=sys.stderr, disable=not (progress and terminal),
               desc=description, dynamic_ncols=True, leave=True)
    log_every = max(1, steps // 20) if progress and sys.stderr is not None and not terminal else 0
    try:
        for step in range(start_step + 1, steps + 1):
            began = time.perf_counter()
            batch = next(batches)
            lr = schedule(step) if schedule is not None else optimizer.lr
            optimizer.zero_grad()
            loss, correct, counted = loss_fn(model, batch)
            loss.backward()
            grad_norm = clip_grad_norm(optimizer.params, clip_norm)
            # checked before the update: a diverged run stops with its last finite weights and
            # is never exported (it used to write a NaN model and exit 0)
            if not (math.isfinite(float(loss.data)) and math.isfinite(grad_norm)) or \
                    (loss_limit is not None and float(loss.data) > loss_limit):
                raise TrainingDiverged(
                    f"training diverged at step {step}: loss {float(loss.data):.4g}"
                    f"{'' if loss_limit is None else f' (limit {loss_limit:.4g})'}, gradient "
                    f"norm {grad_norm:.4g} (lower the learning rate or clip gradients); nothing "
                    f"was exported")
            optimizer.step(lr)
            elapsed = max(time.perf_counter() - began, 1e-9)

            loss_value = float(loss.data)
            accuracy = correct / max(counted, 1)
            result.history.append({"step": step, "loss": loss_value, "accuracy": accuracy, "lr": lr,
                                   "grad_norm": grad_norm, "tokens": counted})
            result.last = result.history[-1]
            # Exponential moving averages make the bar readable on tiny, noisy batches.
            smoothed_loss = loss_value if smoothed_loss is None else 0.9 * smoothed_loss + 0.1 * loss_value
            smoothed_accuracy = accuracy if smoothed_accuracy is None else 0.9 * smoothed_accuracy + 0.1 * accuracy
            bar.set_postfix(loss=f"{smoothed_loss:.3f}", acc=f"{smoothed_accuracy:.3f}",
                            tok_s=f"{counted / elapsed:.0f}", refresh=False)
            bar.update(1)
            if log_every and (step % log_every == 0 or step == steps):
                print(f"{description}: step {step}/{steps}: loss={smoothed_loss:.3f}, "
                      f"acc={smoothed_accuracy:.3f}, tok_s={counted / elapsed:.0f}",
                      file=sys.stderr, flush=True)

            last = step == steps
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or last):
                result.evaluations.append({"step": step, **_evaluate(model, eval_fn, step)})
                if progress and sys.stderr is not None:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in result.evaluations[-1].items() if k != "step"),
                              file=sys.stderr)
            if checkpoint_dir is not None and ((checkpoint_every and step % checkpoint_every == 0) or last):
                _check_finite_weights(optimizer.params, step)
                _check_finite_moments(optimizer, step)
                extra = _json_safe({"evaluations": result.evaluations, "last_step": result.last,
                                    "smoothed": [smoothed_loss, smoothed_accuracy]})
                if data_options is not None:
                    extra["data_options"] = data_options
                if run_options is not None:
                    extra["run_options"] = run_options
                save_checkpoint(checkpoint_dir, model, optimizer, step, batches.epoch,
                                batches.batch_index, extra=extra)
    finally:
        bar.close()
    model.eval()
    return result


def _changed_options(saved: Optional[dict], now: Optional[dict]) -> List[str]:
    """What differs between a checkpoint's ``saved`` options and this run's, one phrase each.
    Options only one side records are not compared: an older checkpoint's missing ones, and
    the ``steps`` of a decaying schedule when the run now has another (whose change says it)."""
    if not isinstance(saved, dict) or now is None:
        return []
    phrases = {"data_sha256": "data (its training examples or vocabularies changed)",
               "valid_sha256": "validation data (its validation examples changed)"}
    return [phrases.get(key) or f"{key} ({saved[key]!r}, now {now[key]!r})"
            for key in sorted(saved) if key in now and saved[key] != now[key]]


class TrainingDiverged(ValueError):
    """The loss or the gradients of a training step are not finite."""


def _check_finite_weights(params, step: int) -> None:
    """TrainingDiverged when an update left a weight NaN or infinite (a finite loss can still
    take a step that overflows): a checkpoint must never hold one."""
    items = params.items() if isinstance(params, Mapping) else enumerate(params)
    for name, param in items:
        if not np.all(np.isfinite(param.data)):
            raise TrainingDiverged(f"training diverged at step {step}: weight {name!r} is no "
                                   f"longer finite (lower the learning rate or clip gradients); "
                                   f"nothing was saved or exported")


def _check_finite_moments(optimizer, step: int) -> None:
    """TrainingDiverged when an optimizer moment overflowed (weights still finite: a checkpoint
    that --resume would then refuse was written, and the run went on)."""
    for name, array in optimizer.state_arrays().items():
        if not np.all(np.isfinite(array)):
            raise TrainingDiverged(f"training diverged at step {step}: the optimizer state "
                                   f"{name!r} is no longer finite (lower the learning rate or "
                                   f"clip gradients); nothing was saved or exported")


def _check_trained_model(model, loss_fn, batch) -> None:
    """TrainingDiverged when the trained model's loss on ``batch`` (eval mode) is not finite:
    weights can stay finite (1e30) while every forward pass overflows, and such a model was
    exported with exit 0."""
    loss = _evaluate(model, lambda m, step: {"loss": float(loss_fn(m, batch)[0].data)}, 0)["loss"]
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged: the trained model's loss on a batch is "
                               f"{loss} (lower the learning rate or clip gradients); nothing "
                               f"was exported")


#: Task options that name files or directories (the file tasks' and the corpora's).
PATH_OPTIONS = ("train", "valid", "test", "path", "tokenizer_dir", "module_dir")


def _absolute_paths(options: dict) -> dict:
    """``options`` with the paths of :data:`PATH_OPTIONS` made absolute: a resume that named the
    same file ``./train.tsv`` was refused, and evaluate run from another directory read
    training.json's relative ``train.tsv`` there. (Other values stay: ``level=char`` is no path
    even beside a directory named ``char``.)"""
    return {key: os.path.abspath(value) if key in PATH_OPTIONS and isinstance(value, str)
            and value else value for key, value in options.items()}


def _data_digest(task, split: str = "train") -> str:
    """SHA-256 of the task's ``split`` batches (ids, in split order) and vocabularies: what a
    resumed run must find again. Options alone missed a training file edited in between (the
    ids of the checkpoint's embeddings then meant other words, and the run went on); an edited
    validation file mixed two data sets in one run's validation history."""
    import hashlib
    digest = hashlib.sha256()
    for name in ("src_vocab", "tgt_vocab", "vocab"):
        tokens = getattr(getattr(task, name, None), "tokens", None)
        digest.update(repr((name, tokens)).encode())
    digest.update(repr(list(getattr(task, "labels", []) or [])).encode())
    for batch in task.batches(split, 1024):
        for array in batch:
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _check_lengths(task, model, arch: str, classification: bool) -> None:
    """ValueError before the first step for a training or validation example longer than a
    Transformer's position table (it stopped the run at whichever step drew it, with nothing
    saved), naming the example."""
    limit = getattr(model.config, "max_positions", None)
    if limit is None or not arch.startswith("transformer"):
        return
    for split in ("train", "valid"):
        start = 0
        for batch in task.batches(split, 1024):
            if classification:
                lengths, what = batch[1], "tokens"
            elif arch == "transformer-lm":   # source <eos> target, less the last token
                lengths, what = batch[1] + batch[3] - 2, "tokens of source and target"
            else:                             # the source, or the decoder's input <bos> target
                lengths = np.maximum(batch[1], batch[3] - 1)
                what = "tokens (source or <bos> + target)"
            over = np.flatnonzero(lengths > limit)
            if over.size:
                index = start + int(over[0])
                text = task.examples(split)[index][0]
                # (numbered within the split: a file's line numbers differ when a holdout
                # drew the validation split from the same file)
                raise ValueError(
                    f"{split}-split example {index + 1} "
                    f"({text[:60]!r}{'...' if len(text) > 60 else ''})"
                    f" has {int(lengths[over[0]])} {what}, more than max_positions={limit}: "
                    f"raise --max-positions, or leave such examples out"
                    + (" (a classification task's max_len cuts documents)"
                       if classification else ""))
            start += len(lengths)


def _json_safe(value):
    """``value`` as it reads back from the checkpoint's JSON (tuples as lists, NumPy scalars
    as numbers, other objects by their repr), so a resumed run compares like with like."""
    import json
    return json.loads(json.dumps(
        value, default=lambda item: item.item() if isinstance(item, np.generic) else repr(item)))


def _writable_directory(path, name: str) -> Path:
    """``path`` written to once (a temporary file), before any training step: an unwritable
    --out was found only after the last step, and the run lost. The directories made for the
    probe are removed again (checkpoints and the export make them when they write), so a run
    refused or interrupted before writing anything leaves no empty --out behind."""
    if str(path) == "":
        raise ValueError(f"{name} is an empty path")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file, not a directory")
    made = [p for p in (path, *path.parents) if not p.exists()]   # (deepest first)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".attncore-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to {name} {str(path)!r}: "
                         f"{error.strerror or error}") from None
    finally:
        for directory in made:
            with contextlib.suppress(OSError):
                directory.rmdir()
    return path


def _evaluate(model, eval_fn, step) -> dict:
    was_training = model.training
    model.eval()
    try:
        with ag.no_grad():
            return dict(eval_fn(model, step))
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------
# train(task, arch, out_dir): model zoo and export
# ------------------------------------------------------------------------------------------

ARCHITECTURES = {
    "seq2seq-bahdanau": "GRU encoder-decoder, Bahdanau (additive) attention, d2l.ai decoder",
    "seq2seq-luong": "LSTM encoder-decoder, Luong general attention with input feeding",
    "transformer": "encoder-decoder Transformer, post-norm",
    "transformer-prenorm": "encoder-decoder Transformer, pre-norm with final LayerNorm",
    "transformer-lm": "decoder-only Transformer trained as a prefix LM on source <eos> target",
    "transformer-classifier": "encoder-only Transformer with mean pooling (classification tasks)",
    "ran-classifier": "RAN document classifier on the pooled GPC (long documents; docs/RAN_MODEL.md)",
    "ran-lm": "causal RAN language model, head tied to the embedding, trained on the task's documents",
}

#: Architectures trained on classification tasks (documents and labels).
CLASSIFIERS = ("transformer-classifier", "ran-classifier")

# The CLI's generic names -> RANConfig's names (the RAN keeps RanNet's vocabulary in config.json).
_RAN_ALIASES = {"d_model": "embedding_size", "num_layers": "ran_layers", "num_heads": "head_num"}

_MODEL_OPTIONS = {
    "seq2seq": ("embed_dim", "hidden_size", "num_layers", "rnn_type", "bidirectional", "attention",
                "attention_dim", "input_feeding", "packed_source", "dropout", "dtype"),
    "transformer": ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "dim_feedforward",
                    "activation", "norm_first", "final_norm", "layer_norm_eps", "positions", "max_positions",
                    "scale_embedding", "fused_qkv", "attention_bias", "tie_embeddings", "pooling", "dropout",
                    "dtype"),
    "ran": ("d_model", "num_layers", "num_heads", "head_size", "window_size", "min_window_size",
            "cell_pooling", "memory_review", "dropout", "dtype"),
}


def _family(arch: str) -> str:
    return arch.split("-")[0]


def build_model(arch: str, src_vocab_size: int, tgt_vocab_size: int, seed: int = 0, num_classes: int = 0,
                **options):
    """A fresh model for ``arch`` (a key of :data:`ARCHITECTURES`); ``options`` override the config."""
    from .seq2seq import Seq2SeqAttention, Seq2SeqConfig
    from .transformer import Transformer, TransformerConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    family = _family(arch)
    unknown = set(options) - set(_MODEL_OPTIONS[family])
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to {arch!r}")
    if family == "ran":
        from .ran import RAN, RANConfig
        options = {_RAN_ALIASES.get(k, k): v for k, v in options.items()}
        head = ({"num_classes": num_classes} if arch == "ran-classifier"
                else {"causal": True, "token_head": "lm"})
        config = RANConfig(vocab_size=src_vocab_size, **{**head, **options})
        return RAN(config, seed=seed)
    if family == "seq2seq":
        defaults = ({"rnn_type": "gru", "attention": "bahdanau"} if arch == "seq2seq-bahdanau"
                    else {"rnn_type": "lstm", "attention": "luong_general", "input_feeding": True})
        config = Seq2SeqConfig(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **{**defaults, **options})
        return Seq2SeqAttention(config, seed=seed)
    defaults = {
        "transformer": {"kind": "encoder_decoder", "norm_first": False},
        "transformer-prenorm": {"kind": "encoder_decoder", "norm_first": True},
        "transformer-lm": {"kind": "decoder_only", "norm_first": True},
        "transformer-classifier": {"kind": "encoder_only", "norm_first": True, "num_classes": num_classes},
    }[arch]
    config = TransformerConfig(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **{**defaults, **options})
    return Transformer(config, seed=seed)


#: The numeric options of :func:`train`: (type, minimum, strictly above it, upper bound
#: (exclusive) or None). ``attncore train``'s option types are built from the same table.
TRAINING_NUMBERS = {
    "steps": (int, 1, False, None), "batch_size": (int, 1, False, None),
    "lr": (float, 0.0, True, None), "seed": (int, 0, False, None),
    "warmup_steps": (int, 0, False, None), "min_lr": (float, 0.0, False, None),
    "weight_decay": (float, 0.0, False, None), "clip_norm": (float, 0.0, False, None),
    "label_smoothing": (float, 0.0, False, 1.0), "eval_every": (int, 0, False, None),
    "eval_batches": (int, 1, False, None), "checkpoint_every": (int, 0, False, None),
}


def number_bounds(minimum, above: bool, below) -> str:
    """The wording of a bound of :data:`TRAINING_NUMBERS`: ``>= 1``, ``> 0.0 and < 1.0``."""
    return (f"> {minimum}" if above else f">= {minimum}") + \
        (f" and < {below}" if below is not None else "")


def in_bounds(value, minimum, above: bool, below) -> bool:
    try:
        finite = math.isfinite(value)
    except OverflowError:   # (an int past float's range: 10**400 steps)
        return False
    return finite and value >= minimum and not (above and value == minimum) \
        and (below is None or value < below)


def _check_training_numbers(values: Mapping[str, object]) -> None:
    """TypeError / ValueError naming the first of :func:`train`'s numeric options outside
    :data:`TRAINING_NUMBERS` (the command line refused them, the Python API trained with
    them: steps=0 exported an untrained model, lr=0 never moved, label_smoothing=1.5)."""
    import numbers
    for name, (kind, minimum, above, below) in TRAINING_NUMBERS.items():
        value = values[name]
        wanted = numbers.Integral if kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise TypeError(f"{name} must be {'an int' if kind is int else 'a number'}, got "
                            f"{type(value).__name__}")
        if not in_bounds(value, minimum, above, below):
            raise ValueError(f"{name} must be a finite number "
                             f"{number_bounds(minimum, above, below)}, got {value!r}")


def train(task, arch: str, out_dir, *, steps: int = 1000, batch_size: int = 32, lr: float = 1e-3,
          seed: int = 0, schedule: str = "inverse_sqrt", warmup_steps: int = 100, min_lr: float = 0.0,
          weight_decay: float = 0.0, clip_norm: float = 1.0, label_smoothing: float = 0.0,
          eval_every: int = 0, eval_batches: int = 4, checkpoint_every: int = 0, resume: bool = False,
          progress: bool = True, task_options: Optional[dict] = None, overwrite: bool = False,
          **model_options):
    """Train ``arch`` on ``task`` and export the model directory ``out_dir``.

    Parameters
    ----------
    task : str or task object
        A name for :func:`attncore.data.get_task` (built with ``seed`` and ``task_options``) or
        a task object (``src_vocab``, ``tgt_vocab`` or ``labels``, ``batches(split, batch_size,
        shuffle=, seed=)``).
    arch : str
        A key of :data:`ARCHITECTURES`.
    out_dir : path
        Receives ``config.json``, ``model.safetensors``, the vocabularies and ``checkpoint/``.
    steps, batch_size, lr, seed : training length, batch size, peak learning rate, seed of everything
    schedule, warmup_steps, min_lr : see :func:`attncore.train.optim.make_schedule`
    weight_decay : float  AdamW decay (0: plain Adam)
    clip_norm, label_smoothing : float
    eval_every, eval_batches : validation loss/accuracy on ``eval_batches`` batches every ``eval_every`` steps
    checkpoint_every, resume : checkpoints in ``out_dir/checkpoint``; resume from it
    overwrite : bool   start from step 0 even when ``out_dir/checkpoint`` holds a checkpoint
        (else refused unless ``resume``)
    progress : bool   tqdm bar on stderr
    **model_options : hyper-parameters of the model config (e.g. ``hidden_size=64``)

    Returns
    -------
    (model, TrainResult)
    """
    _check_training_numbers(dict(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, warmup_steps=warmup_steps,
        min_lr=min_lr, weight_decay=weight_decay, clip_norm=clip_norm,
        label_smoothing=label_smoothing, eval_every=eval_every, eval_batches=eval_batches,
        checkpoint_every=checkpoint_every))
    if resume and overwrite:   # (resume won silently: the old checkpoint went on)
        raise ValueError("resume and overwrite contradict each other: resume continues the "
                         "checkpoint, overwrite starts from step 0")
    out_dir = _writable_directory(out_dir, "out_dir")
    if not (resume or overwrite) and (out_dir / "checkpoint" / CHECKPOINT_WEIGHTS).is_file():
        # (it was overwritten from step 0 without a word: a long run's progress lost to a
        # command re-run without --resume)
        raise ValueError(f"{str(out_dir / 'checkpoint')!r} holds a checkpoint: resume it "
                         f"(--resume), start over (--overwrite), or train into another "
                         f"directory")
    if not overwrite and (out_dir / "config.json").exists() and \
            not (out_dir / "checkpoint" / CHECKPOINT_WEIGHTS).is_file():
        # (a model without a checkpoint, such as a shipped one, was replaced without a word)
        raise ValueError(f"{str(out_dir)!r} holds a model: train into another directory, or "
                         f"replace it (--overwrite)")
    if min_lr > lr:   # (the cosine and linear schedules then raised the rate towards min_lr)
        raise ValueError(f"min_lr ({min_lr}) must be <= lr ({lr})")
    if isinstance(task, str):
        from attncore.data import get_task
        task = get_task(task, seed=seed, **(task_options or {}))
    classification = is_classification(task)
    if arch != "ran-lm" and classification != (arch in CLASSIFIERS):
        raise ValueError(f"arch {arch!r} does not fit task {getattr(task, 'name', task)!r} "
                         f"({'classification' if classification else 'sequence-to-sequence'})")
    src_vocab = task.src_vocab
    tgt_vocab = None if classification or arch == "ran-lm" else task.tgt_vocab
    if arch == "transformer-lm" and src_vocab.tokens != tgt_vocab.tokens:
        raise ValueError("transformer-lm needs a task whose source and target share one "
                         "vocabulary (pairs: --task-option shared_vocab=true)")
    model = build_model(arch, len(src_vocab), len(tgt_vocab) if tgt_vocab is not None else len(src_vocab), seed=seed,
                        num_classes=len(task.labels) if classification else 0, **model_options)
    _check_lengths(task, model, arch, classification)
    # the engine's bounds on the exported config (layer counts, a sinusoidal table's size),
    # before training rather than at export
    from attncore import io
    io.weight_spec(model.config.to_dict())

    def make_loss(smoothing):
        if arch == "ran-lm":
            return document_lm_loss(smoothing, model.config.pad_id)
        if classification:
            return classification_loss(smoothing)
        if arch == "transformer-lm":
            return prefix_lm_loss(smoothing, model.config.pad_id)
        return seq2seq_loss(smoothing, model.config.pad_id)

    loss_fn = make_loss(label_smoothing)
    # validation also reports the plain cross-entropy, valid_nll: a label-smoothed loss has a
    # floor above 0 and does not compare across --label-smoothing values
    nll_fn = make_loss(0.0) if label_smoothing else loss_fn

    # uniform predictions over `classes` outcomes a token cost log(classes) nats
    # (a ran-lm predicts tokens whatever the task: its outcomes are the vocabulary)
    classes = (len(task.labels) if classification and arch != "ran-lm"
               else len(tgt_vocab or src_vocab))
    stream = BatchStream(lambda epoch: task.batches("train", batch_size, shuffle=True, seed=seed * 100003 + epoch))
    optimizer = Adam(model.named_parameters(), lr=lr, weight_decay=weight_decay, decoupled=weight_decay > 0)
    lr_schedule = make_schedule(schedule, lr, warmup_steps, steps, min_lr)

    def evaluate(model, step):
        losses, nlls, correct, counted = [], [], 0, 0
        for index, batch in enumerate(task.batches("valid", batch_size)):
            if index >= eval_batches:
                break
            loss, c, n = loss_fn(model, batch)
            losses.append(float(loss.data) * n)
            nlls.append(losses[-1] if nll_fn is loss_fn else float(nll_fn(model, batch)[0].data) * n)
            correct, counted = correct + c, counted + n
        if counted == 0:  # an empty validation split: nothing measured (not a loss of 0)
            return {"valid_loss": None, "valid_nll": None, "valid_accuracy": None}
        return {"valid_loss": sum(losses) / counted, "valid_nll": sum(nlls) / counted,
                "valid_accuracy": correct / counted}

    result = fit(model, optimizer, stream, loss_fn, steps, schedule=lr_schedule, clip_norm=clip_norm,
                 eval_fn=evaluate if eval_every else None, eval_every=eval_every,
                 checkpoint_dir=out_dir / "checkpoint", checkpoint_every=checkpoint_every, resume=resume,
                 progress=progress, description=f"{arch} on {getattr(task, 'name', 'task')}",
                 loss_limit=100 * math.log(max(classes, 2)),
                 data_options=_json_safe({"task": getattr(task, "name", None),
                                          "task_options": _absolute_paths(task_options or {}),
                                          "batch_size": batch_size, "seed": seed,
                                          "data_sha256": _data_digest(task),
                                          "valid_sha256": _data_digest(task, "valid")}),
                 run_options=_json_safe({"lr": lr, "schedule": schedule,
                                         "warmup_steps": warmup_steps, "min_lr": min_lr,
                                         "weight_decay": weight_decay, "clip_norm": clip_norm,
                                         "label_smoothing": label_smoothing,
                                         # (the steps a decaying schedule spans; the others
                                         # may be extended)
                                         **({"steps": steps} if schedule in ("cosine", "linear")
                                            else {})}))
    _check_trained_model(model, loss_fn, next(iter(task.batches("train", batch_size))))
    export(model, out_dir, src_vocab, tgt_vocab,
           labels=list(task.labels) if arch in CLASSIFIERS else None,
           max_source_tokens=getattr(task, "max_len", None) if arch in CLASSIFIERS else None,
           training=_json_safe({"task": getattr(task, "name", None),
                                "task_options": _absolute_paths(task_options or {}),
                                "seed": seed, "arch": arch, "steps": steps,
                                "batch_size": batch_size}))
    return model, result
