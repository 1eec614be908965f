"""Resumable training checkpoints: ``checkpoint.safetensors`` + ``trainer_state.json``, no pickle.

A checkpoint directory holds

``checkpoint.safetensors``
    ``model/<parameter name>`` (the weights), ``optimizer/exp_avg/<name>`` and
    ``optimizer/exp_avg_sq/<name>`` (Adam moments).
``trainer_state.json``
    ``step``, the data position (``epoch``, ``batch_index``), the optimiser's scalars, the
    state of the model's dropout generator (``numpy.random.Generator.bit_generator.state``,
    plain integers), the model config and free-form ``extra`` data.

Restoring all of it makes a resumed run bit-identical to an uninterrupted one. The state is
also written into the safetensors file's metadata (``trainer_state``), and read from there: the
weights and the state they belong to then appear in one atomic rename. (Written as two files
only, a run killed between the two renames left step-4 weights and Adam moments beside the
step-2 state, and ``--resume`` continued that mix with exit 0.) ``trainer_state.json`` stays as
the readable copy, and is what a checkpoint without the metadata is read from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .. import io

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_WEIGHTS", "CHECKPOINT_STATE"]

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "trainer_state.json"
_STATE_KEYS = ("step", "epoch", "batch_index", "optimizer", "dropout_rng", "config")
_STATE_METADATA = "trainer_state"


def save_checkpoint(directory, model, optimizer, step: int, epoch: int, batch_index: int,
                    extra: Optional[dict] = None) -> Path:
    """Write a checkpoint of ``model`` + ``optimizer`` after ``step`` updates (atomically per file)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{name}": np.ascontiguousarray(a) for name, a in model.state_dict().items()}
    arrays.update({f"optimizer/{name}": np.ascontiguousarray(a) for name, a in optimizer.state_arrays().items()})
    state = {
        "step": int(step),
        "epoch": int(epoch),
        "batch_index": int(batch_index),
        "optimizer": optimizer.state_meta(),
        "dropout_rng": model.dropout_rng.bit_generator.state,
        "config": model.config.to_dict(),
        "extra": extra or {},
    }
    temporary = directory / (CHECKPOINT_WEIGHTS + ".tmp")
    save_file(arrays, str(temporary), metadata={_STATE_METADATA: json.dumps(state)})
    os.chmod(temporary, io.new_file_mode())   # (save_file writes 0o600)
    # on disk before it replaces the last good checkpoint (after a power cut a renamed,
    # unflushed file could come back empty: the run's only resume point lost)
    io.flush_file(temporary)
    os.replace(temporary, directory / CHECKPOINT_WEIGHTS)
    io.flush_directory(directory)
    _write_state_copy(directory, state)
    return directory


def _write_state_copy(directory: Path, state: dict) -> None:
    """``trainer_state.json``, the readable copy of the weights file's state (atomically)."""
    temporary = directory / (CHECKPOINT_STATE + ".tmp")
    temporary.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(temporary, directory / CHECKPOINT_STATE)


def _refresh_state_copy(directory: Path, state: dict) -> None:
    """Rewrite the readable ``trainer_state.json`` where it is not the weights file's state (a
    run stopped between a checkpoint's two renames kept the older copy for good: a resume that
    had no step left never wrote it again). A read-only directory keeps it as it is."""
    path = directory / CHECKPOINT_STATE
    try:
        if not (path.is_file() and path.read_text(encoding="utf-8") == json.dumps(state, indent=2)):
            _write_state_copy(directory, state)
    except OSError:
        pass


def read_checkpoint(directory) -> Tuple[dict, dict]:
    """The raw ``(state, arrays)`` of a checkpoint directory."""
    from safetensors import safe_open

    directory = Path(directory)
    state_path, weights_path = directory / CHECKPOINT_STATE, directory / CHECKPOINT_WEIGHTS
    if not weights_path.is_file():   # (the state copy alone may be gone: the weights hold it)
        raise ValueError(f"{str(directory)!r} is not a checkpoint directory "
                         f"(needs {CHECKPOINT_WEIGHTS})")
    try:   # (one read of the file: its tensors and the state in its metadata)
        with safe_open(str(weights_path), framework="numpy") as handle:
            embedded = (handle.metadata() or {}).get(_STATE_METADATA)
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:
        raise ValueError(f"cannot read {weights_path}: {type(error).__name__}: {error}") from None
    if embedded is not None:   # the state written with these weights (see the module doc)
        state_path, text = weights_path, embedded
    else:
        try:
            text = state_path.read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read the trainer state {str(state_path)!r}: "
                             f"{error.strerror}") from None
    try:
        state = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"cannot read the trainer state of {state_path}: {error}") from None
    missing = [key for key in _STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{state_path} lacks {missing} (not a checkpoint of this trainer?)")
    for key in ("step", "epoch", "batch_index"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{state_path}: {key} must be an integer >= 0, got {value!r}")
    return state, arrays


def load_checkpoint(directory, model, optimizer) -> dict:
    """Restore ``model`` and ``optimizer`` in place; returns the trainer state dict.

    Raises
    ------
    ValueError
        When the checkpoint was written for a different model config or is unreadable.
    """
    state, arrays = read_checkpoint(directory)
    _refresh_state_copy(Path(directory), state)
    bad = io.first_nonfinite(arrays)
    if bad is not None:   # (a diverged run's weights, resumed and exported again)
        raise ValueError(f"checkpoint {str(directory)!r}: {bad!r} holds NaN or infinity")
    if state["config"] != model.config.to_dict():
        saved, now = state["config"], model.config.to_dict()
        differ = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
        shown = ", ".join(f"{key} {saved.get(key)!r} there, {now.get(key)!r} here"
                          for key in differ[:5])
        raise ValueError(f"checkpoint {str(directory)!r} belongs to another model config "
                         f"({shown}{', ...' if len(differ) > 5 else ''})")
    model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    # (a damaged state failed as "error: 'step_count'" or "'int' object is not subscriptable",
    # naming neither the checkpoint nor the field)
    try:
        optimizer.load_state({k[len("optimizer/"):]: v for k, v in arrays.items()
                              if k.startswith("optimizer/")}, state["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        detail = f"lacks {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"checkpoint {str(directory)!r}: optimizer state: {detail}") from None
    try:
        model.dropout_rng.bit_generator.state = state["dropout_rng"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {str(directory)!r}: dropout_rng: {error}") from None
    return state
