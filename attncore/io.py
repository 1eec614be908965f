"""The attncore model directory: ``config.json`` + ``model.safetensors`` (+ tokenizer files).

A model is a directory::

    my-model/
      config.json          {"format_version": 1, "architecture": "...", hyper-parameters...,
                            "pad_id", "bos_id", "eos_id", "unk_id", "tokenizer": {...} | null}
      model.safetensors    every weight, named and shaped as weight_spec(config) declares
      <tokenizer files>    optional, referenced from config["tokenizer"]

No pickle anywhere: weights go through ``safetensors.numpy`` and the configuration is JSON.

The weights of each architecture are declared **once**, by a spec function
``spec_fn(config: dict) -> {name: (shape, dtype)}`` registered with
:func:`register_architecture`. The trainer's export, :func:`load_model_dir`'s validation, the
inference engine and the converters all use :func:`weight_spec`. An architecture's spec may
live in another module: :data:`_ARCHITECTURE_MODULES` names the module whose import registers it
(``"ran"`` -> ``attncore.train.ran``), so loading never depends on import order.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "WeightSpec",
    "register_architecture", "registered_architectures", "weight_spec", "check_weights",
    "save_model_dir", "load_model_dir", "read_config",
    "seq2seq_attention_weight_spec", "transformer_weight_spec",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: The trainer's record of the run that made the weights beside it (task, options, seed; read
#: by ``python -m attncore.train.evaluate``): a save of other weights removes a stale one.
TRAINING_FILE = "training.json"
SPECIAL_TOKEN_KEYS = ("pad_id", "bos_id", "eos_id", "unk_id")

WeightSpec = Dict[str, Tuple[Tuple[int, ...], str]]
"""name -> (shape, dtype name such as "float32")."""

_SPECS: Dict[str, Callable[[dict], WeightSpec]] = {}
# Hyper-parameters each architecture's models read, which a config must state (FORMAT.md:
# nothing is implied by defaults at load time; a RAN without window_size loaded with the
# default and gave other outputs, a Transformer without activation raised a bare KeyError).
_REQUIRED_KEYS: Dict[str, Tuple[str, ...]] = {}
# Architectures whose spec is registered by importing a module (imported on first use).
_ARCHITECTURE_MODULES = {"ran": "attncore.train.ran"}


# ------------------------------------------------------------------------------------------
# Spec registry
# ------------------------------------------------------------------------------------------

def register_architecture(name: str, spec_fn: Callable[[dict], WeightSpec],
                          required_keys: Sequence[str] = ()) -> None:
    """Declare (or replace) the weight spec of architecture ``name``, and the hyper-parameters
    ``required_keys`` its models read (a config lacking one is refused at load and save).

    Parameters
    ----------
    name : str
        The value of ``config["architecture"]``.
    spec_fn : callable
        ``spec_fn(config) -> {tensor name: (shape tuple, dtype name)}``. It reads every
        hyper-parameter it needs with ``config[key]`` (a missing key raises ``KeyError``, which
        the loader reports) and raises ``ValueError`` for inconsistent values.
    """
    if not callable(spec_fn):
        raise TypeError(f"spec_fn for {name!r} must be callable")
    _SPECS[name] = spec_fn
    _REQUIRED_KEYS[name] = tuple(required_keys)


def registered_architectures() -> List[str]:
    """Names with a registered spec (plus those registered on import, once importable)."""
    for name in list(_ARCHITECTURE_MODULES):
        _spec_function(name, required=False)
    return sorted(_SPECS)


def _spec_function(name: str, required: bool = True):
    if not isinstance(name, str):
        if required:
            raise ValueError(f"architecture must be a string, got {name!r}")
        return None
    if name not in _SPECS and name in _ARCHITECTURE_MODULES:
        try:
            importlib.import_module(_ARCHITECTURE_MODULES[name])
        except ImportError:
            pass
    if name not in _SPECS and required:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(_SPECS)}")
    return _SPECS.get(name)


def weight_spec(config: Mapping) -> WeightSpec:
    """The declared weights of the model described by ``config``.

    Raises
    ------
    ValueError
        Unknown architecture, or a missing / inconsistent hyper-parameter.
    """
    if "architecture" not in config:
        raise ValueError("config has no 'architecture'")
    spec_fn = _spec_function(config["architecture"])   # (ValueError for a non-string)
    missing = [key for key in _REQUIRED_KEYS.get(config["architecture"], ()) if key not in config]
    problems = config_value_problems(config)
    if missing:   # (and the values present: every problem in one error)
        problems.insert(0, f"config lacks hyper-parameter{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(map(repr, missing))} needed by architecture "
                           f"{config['architecture']!r}")
    if problems:
        raise ValueError("\n  ".join(problems))
    try:
        spec = spec_fn(config)
        return {name: (tuple(int(d) for d in shape), str(np.dtype(dtype)))
                for name, (shape, dtype) in spec.items()}
    except KeyError as error:
        raise ValueError(f"config lacks hyper-parameter {error.args[0]!r} needed by "
                         f"architecture {config['architecture']!r}") from None
    except (TypeError, ArithmeticError) as error:  # a value of the wrong kind the checks missed
        # (OverflowError is one: int() of an infinite size)
        raise ValueError(f"config: invalid hyper-parameters for architecture "
                         f"{config['architecture']!r}: {error}") from None


def check_weights(spec: WeightSpec, weights: Mapping[str, np.ndarray]) -> List[str]:
    """The differences between ``weights`` and ``spec`` as a list of messages (empty if none):
    at most :data:`MAX_PROBLEMS`, then one saying how many more there are."""
    problems = [f"missing tensor {name!r} (expected shape {list(shape)} {dtype})"
                for name, (shape, dtype) in spec.items() if name not in weights]
    problems += [f"unexpected tensor {name!r}" for name in weights if name not in spec]
    for name in spec.keys() & weights.keys():
        shape, dtype = spec[name]
        array = weights[name]
        if tuple(array.shape) != shape:
            problems.append(f"tensor {name!r} has shape {list(array.shape)}, expected {list(shape)}")
        if str(array.dtype) != dtype:
            problems.append(f"tensor {name!r} has dtype {array.dtype}, expected {dtype}")
    return _at_most(sorted(problems))


#: the most problems a load error lists one by one
MAX_PROBLEMS = 50


def _at_most(problems: List[str], limit: int = MAX_PROBLEMS) -> List[str]:
    """The first ``limit`` problems, and how many more there are."""
    if len(problems) <= limit:
        return problems
    return problems[:limit] + [f"... and {len(problems) - limit} more"]


# ------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------

def new_file_mode() -> int:
    """The mode ``open()`` gives a new file, 0o666 less the umask: safetensors' ``save_file``
    writes 0o600, and a model other users could read the config of was unreadable to them."""
    try:
        with open("/proc/self/status") as status:   # (reading it leaves the umask alone)
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)   # (elsewhere: read it by setting it, and put it back)
    os.umask(mask)
    return 0o666 & ~mask


def first_nonfinite(arrays: Mapping[str, np.ndarray]) -> Optional[str]:
    """The name of the first float array of ``arrays`` holding NaN or infinity, or None (a
    checkpoint's or a model directory's tensors, before a trainer model takes them)."""
    return next((name for name, array in arrays.items()
                 if array.dtype.kind == "f" and not np.all(np.isfinite(array))), None)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's ``__metadata__`` with its keys sorted, in place: safetensors
    writes them from a hash map, in an order that changes from process to process, so two saves
    of one model differed in bytes. The header keeps its length (the same entries, reordered),
    so the tensors' offsets, which count from its end, stay as they are."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        entries = json.loads(header)
        metadata = entries.get("__metadata__")
        if not isinstance(metadata, dict):
            return
        entries["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:   # (another writer's spacing: leave the file as it is)
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))   # (the format pads headers with spaces)


def save_model_dir(path: Union[str, os.PathLike], config: Mapping, weights: Mapping[str, np.ndarray],
                   tokenizer_files: Optional[Union[Mapping[str, Union[str, bytes]], Iterable[os.PathLike]]] = None,
                   *, training: Optional[str] = None) -> Path:
    """Write a model directory after checking ``weights`` against the architecture's spec.

    Parameters
    ----------
    path : path-like
        Created if needed; a model it holds is replaced.
    config : mapping
        JSON-serialisable; must contain ``architecture``. ``format_version`` is set to 1.
    weights : mapping name -> np.ndarray
        Exactly the tensors of ``weight_spec(config)``.
    tokenizer_files : mapping filename -> str | bytes, or iterable of paths to copy, optional
    training : str, optional
        The text of :data:`TRAINING_FILE` (the trainer's export); without it a
        :data:`TRAINING_FILE` the directory holds is removed (it described other weights).

    Every file is written whole under a temporary name first (a failure there, a full disk
    or an interrupt, leaves the directory as it was); then the old ``config.json`` is removed,
    the other files are renamed into place, and the new ``config.json`` comes last. A save cut
    short while renaming leaves a directory without ``config.json``, which does not load,
    never the old config with new weights or vocabularies (or the reverse) loading silently.

    Returns
    -------
    Path of the directory.

    Raises
    ------
    ValueError
        Listing the mismatches between ``weights`` and the spec (at most ``MAX_PROBLEMS``, then a
        count); nothing is written then.
    """
    from safetensors.numpy import save_file

    config = dict(config)
    config["format_version"] = FORMAT_VERSION
    problems = check_weights(weight_spec(config), weights)
    if problems:
        raise ValueError(f"weights do not match the {config['architecture']!r} spec:\n  " + "\n  ".join(problems))
    if tokenizer_files is not None and not isinstance(tokenizer_files, Mapping):
        tokenizer_files = [Path(source) for source in tokenizer_files]
    _check_tokenizer_files(config, tokenizer_files, Path(path))
    # (numpy scalars, e.g. a size read from an array, are written as the number they hold; any
    # other non-JSON value fails here, before anything is written)
    config_text = json.dumps(config, indent=2, sort_keys=True, default=_json_number)

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    texts: Dict[str, Union[str, bytes]] = {}
    if isinstance(tokenizer_files, Mapping):
        texts.update(tokenizer_files)
    elif tokenizer_files:
        texts.update({source.name: source.read_bytes() for source in tokenizer_files})
    if training is not None:
        texts[TRAINING_FILE] = training
    staged: List[Tuple[Path, Path]] = []   # (temporary, final), config.json last
    try:
        arrays = {name: np.ascontiguousarray(array) for name, array in weights.items()}
        temporary = directory / (WEIGHTS_FILE + ".tmp")
        staged.append((temporary, directory / WEIGHTS_FILE))
        save_file(arrays, str(temporary),
                  metadata={"format": "attncore", "format_version": str(FORMAT_VERSION)})
        _sort_metadata(temporary)
        flush_file(temporary)
        for filename, content in list(texts.items()) + [(CONFIG_FILE, config_text + "\n")]:
            temporary = directory / (filename + ".tmp")
            staged.append((temporary, directory / filename))
            _write_durably(temporary, content)
        for temporary, _ in staged:
            os.chmod(temporary, new_file_mode())
        # commit: no config.json while the files change, the new one last
        _remove_if_present(directory / CONFIG_FILE)
        if training is None:
            _remove_if_present(directory / TRAINING_FILE)
        for temporary, final in staged:
            os.replace(temporary, final)
        flush_directory(directory)
    finally:   # (each renamed one is gone: what is left is a staged file of a failed save)
        for temporary, _ in staged:
            _remove_if_present(temporary)
    return directory


def _remove_if_present(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_durably(path: Path, content: Union[str, bytes]) -> None:
    """``content`` (text as UTF-8) into ``path``, on disk before this returns."""
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def replaced_whole(path: Union[str, os.PathLike]):
    """Yields a temporary path beside ``path`` for the caller to write; when the block ends
    the file is flushed and renamed over ``path``, and on an error it is removed: a write cut
    short (a kill, a full disk) leaves ``path`` as it was, never a truncated file. A symbolic
    link's target is what is replaced; a path that exists but is no regular file (a device
    such as /dev/stdout, a named pipe) is yielded as it is, written in place."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        yield path
        return
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield temporary
        flush_file(temporary)
        os.replace(temporary, path)
    finally:
        _remove_if_present(temporary)


def flush_file(path: Path) -> None:
    """fsync a file written by another library (safetensors): a rename over the old file
    must not reach the disk before the new file's data (a power cut then left an empty one)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def flush_directory(directory: Path) -> None:
    """fsync a directory's entries (the renames), where the platform allows it."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:   # (Windows: directories cannot be opened)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _check_tokenizer_files(config: Mapping, tokenizer_files, directory: Path) -> None:
    """ValueError when ``config["tokenizer"]`` names a vocabulary file that neither
    ``tokenizer_files`` gives nor ``directory`` holds: the directory written would not load
    (``save_model_dir(dst, *load_model_dir(src))`` kept the names and lost the files)."""
    entry = config.get("tokenizer")
    if not isinstance(entry, Mapping):
        return
    given = set(tokenizer_files) if isinstance(tokenizer_files, Mapping) else \
        {source.name for source in tokenizer_files or ()}
    for side in ("src", "tgt"):
        name = entry.get(side)
        if isinstance(name, str) and name not in given and not (directory / name).is_file():
            raise ValueError(f"config['tokenizer'][{side!r}] names {name!r}, which "
                             f"tokenizer_files does not give and {str(directory)!r} does not "
                             f"hold: pass the vocabulary files (load_model_dir returns none; "
                             f"copy them from the source directory), or set "
                             f"config['tokenizer'] to None")


def _json_number(value):
    """json.dumps' fallback: a numpy bool / integer / float scalar as the Python one."""
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    raise TypeError(f"config values must be JSON values, got {type(value).__name__} "
                    f"({value!r})")


# Hyper-parameters every architecture reads the same way: flags must be JSON booleans (a
# string "false" would be truthy), sizes integers (not booleans, not 8.9) in [minimum, MAX_SIZE].
_FLAG_KEYS = ("bidirectional", "input_feeding", "packed_source", "norm_first", "scale_embedding",
              "fused_qkv", "attention_bias", "tie_embeddings", "causal", "memory_review")
_OPTIONAL_FLAG_KEYS = ("final_norm",)            # null: as norm_first
_SIZE_KEYS = {"hidden_size": 1, "embed_dim": 1, "num_layers": 1, "attention_dim": 0,
              "src_vocab_size": 0, "tgt_vocab_size": 0, "vocab_size": 1, "d_model": 1,
              "num_heads": 1, "dim_feedforward": 1, "num_encoder_layers": 0,
              "num_decoder_layers": 0, "num_classes": 0, "embedding_size": 1, "ran_layers": 1,
              "head_num": 1, "head_size": 1, "window_size": 1, "min_window_size": 1,
              "max_positions": 1, "num_token_classes": 0}
#: The largest size a config may declare (vocabularies, widths); max_positions and layer counts
#: have their own bounds: a sinusoidal table is made at load without a stored tensor, and each
#: layer adds a dozen tensors to the spec (2^24 layers: a 650-byte config.json spent gigabytes
#: listing the tensors it lacked).
MAX_SIZE = 1 << 24
MAX_POSITIONS = 1 << 20
MAX_LAYERS = 1 << 12
#: The largest sinusoidal position table (bytes of float32) a config may ask for: it is made at
#: load without a stored tensor, so a few-KB model directory could otherwise take gigabytes
#: (up to 8 GiB within MAX_POSITIONS and MAX_SIZE). 65536 positions of 1024 features fit.
MAX_SINUSOID_BYTES = 1 << 28
_LAYER_KEYS = ("num_layers", "num_encoder_layers", "num_decoder_layers", "ran_layers")


def check_config_values(config: Mapping) -> None:
    """ValueError listing every hyper-parameter whose value has the wrong kind or range
    (:func:`config_value_problems`), one a line."""
    problems = config_value_problems(config)
    if problems:
        raise ValueError("\n  ".join(problems))


def config_value_problems(config: Mapping) -> List[str]:
    """What is wrong with the values of ``config``, one message each (all of them: a
    directory with three bad values named one, and the next load the next): flags that are
    not booleans, sizes and layer counts that are not integers in range, labels, dropout,
    layer_norm_eps, and special token ids outside the vocabulary they index (pad_id / unk_id:
    the sources'; bos_id / eos_id: the targets')."""
    problems = []
    for key in _FLAG_KEYS + _OPTIONAL_FLAG_KEYS:
        if key in config and not isinstance(config[key], (bool, np.bool_)) and \
                not (key in _OPTIONAL_FLAG_KEYS and config[key] is None):
            problems.append(f"config: {key} must be true or false, got {config[key]!r}")
    integers = {}
    for key, minimum in list(_SIZE_KEYS.items()) + [(k, 0) for k in SPECIAL_TOKEN_KEYS]:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            problems.append(f"config: {key} must be an integer, got {value!r}")
            continue
        limit = (MAX_POSITIONS if key == "max_positions" else
                 MAX_LAYERS if key in _LAYER_KEYS else MAX_SIZE)
        if not minimum <= value <= limit:
            problems.append(f"config: {key} must lie in [{minimum}, {limit}], got {value}")
            continue
        integers[key] = int(value)
    if "labels" in config:   # class names: one string per class (classify printed ids or
        labels = config["labels"]   # other names)
        classes = config.get("num_classes")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or \
                (isinstance(classes, int) and len(labels) != classes):
            problems.append(f"config: labels must be a list of {classes} class names, got "
                            f"{labels!r}"[:200])
    if "dropout" in config:   # (training only, but "x" or 5 was saved and loaded as given)
        dropout = config["dropout"]
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            problems.append(f"config: dropout must be a number in [0, 1), got {dropout!r}")
    if "layer_norm_eps" in config:
        problem = _layer_norm_eps_problem(config["layer_norm_eps"])
        if problem:
            problems.append(problem)
    targets = integers.get("tgt_vocab_size") or integers.get("vocab_size") or 0
    sources = integers.get("src_vocab_size") or targets
    for key, vocab, side in (("pad_id", sources, "source"), ("unk_id", sources, "source"),
                             ("bos_id", targets, "target"), ("eos_id", targets, "target")):
        if key in integers and vocab and integers[key] >= vocab:
            problems.append(f"config: {key} {integers[key]} lies outside the {side} vocabulary "
                            f"[0, {vocab})")
    return problems


def _layer_norm_eps_problem(eps) -> Optional[str]:
    """What is wrong with a ``layer_norm_eps``, or None: it must be a finite number > 0 (0
    divides by zero on a row of equal values: every row when d_model is 1)."""
    try:   # (an integer of 400 digits: OverflowError in isfinite)
        finite = math.isfinite(eps)
    except (TypeError, OverflowError):
        finite = False
    if isinstance(eps, (bool, np.bool_)) or not isinstance(
            eps, (int, float, np.integer, np.floating)) or not finite or eps <= 0:
        return f"config: layer_norm_eps must be a finite number > 0, got {eps!r}"
    return None


def read_config(path: Union[str, os.PathLike]) -> dict:
    """Read and check ``config.json`` of a model directory (no weights)."""
    config, problems = _read_config(Path(path))
    if not problems:  # (load_model_dir checks them through weight_spec)
        problems += config_value_problems(config)
    if problems:
        raise ValueError(f"invalid model directory {str(path)!r}:\n  " + "\n  ".join(problems))
    return config


def is_rust_panic(error: BaseException) -> bool:
    """Whether ``error`` is a Rust panic of safetensors or tokenizers (pyo3's PanicException, a
    BaseException that escapes ``except Exception``)."""
    return type(error).__name__ == "PanicException"


def not_there(path: Path) -> str:
    """Why nothing can be read at ``path``, which is not a directory or not a regular file."""
    if path.is_symlink() and not path.exists():
        return "a symbolic link to nothing (broken, or a loop)"
    if not path.exists():
        return "missing"
    return "a directory" if path.is_dir() else "not a regular file"


def missing_model_dir(path: Union[str, os.PathLike]) -> Optional[str]:
    """The problem of a model directory that is not there (missing, or a broken link), or None:
    the one message of every command that takes a model directory."""
    if os.path.exists(path):
        return None
    return absent(Path(path), f"model directory {str(path)!r} does not exist",
                  f"model directory {str(path)!r}")


def absent(path: Path, missing: str, name: str) -> str:
    """The problem of a file that cannot be read at ``path``: ``missing`` when there is nothing
    there, else ``"<name> is <why>"`` (a directory, a broken link...)."""
    why = not_there(path)
    return missing if why == "missing" else f"{name} is {why}"


def _read_config(directory: Path):
    if not directory.exists():
        return None, [absent(directory, "path does not exist", "path")]
    if not directory.is_dir():
        return None, ["not a directory (a model is a directory with config.json and model.safetensors)"]
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return None, [absent(config_path, f"missing {CONFIG_FILE} (not an attncore model "
                                          f"directory?)", CONFIG_FILE)]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        return None, [f"{CONFIG_FILE} is not valid JSON: {error}"]
    except RecursionError:
        return None, [f"{CONFIG_FILE} is nested too deeply to be a model config"]
    if not isinstance(config, dict):
        return None, [f"{CONFIG_FILE} must hold a JSON object"]
    problems = []
    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:   # (true and 1.0 equal 1)
        problems.append(f"unsupported format_version {version!r} (this attncore reads {FORMAT_VERSION})")
    if "architecture" not in config:
        problems.append(f"{CONFIG_FILE} has no 'architecture'")
    elif not isinstance(config["architecture"], str):
        problems.append(f"architecture must be a string, got {config['architecture']!r}")
    elif _spec_function(config["architecture"], required=False) is None:
        problems.append(f"unknown architecture {config['architecture']!r}; known: {sorted(_SPECS)}")
    return config, problems


def load_model_dir(path: Union[str, os.PathLike]) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Read a model directory and check every tensor against the architecture's spec.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    config : dict
    weights : dict name -> np.ndarray

    Raises
    ------
    ValueError
        Naming ``path`` and listing the problems found (at most ``MAX_PROBLEMS``, then a
        count): not a directory, missing or invalid config, unknown format version or
        architecture, missing hyper-parameters, missing or unreadable (truncated, corrupt)
        weights file, and missing, unexpected, wrongly shaped or wrongly typed tensors.
    """
    from safetensors.numpy import load_file

    directory = Path(path)
    config, problems = _read_config(directory)
    weights: Dict[str, np.ndarray] = {}
    weights_path = directory / WEIGHTS_FILE
    if config is not None:
        if not weights_path.is_file():
            problems.append(absent(weights_path, f"missing {WEIGHTS_FILE}", WEIGHTS_FILE))
        else:
            try:
                weights = load_file(str(weights_path))
            except MemoryError:   # (an intact file, reported as corrupt)
                raise
            except BaseException as error:   # safetensors raises its own error types for bad
                # files, and a Rust panic (pyo3's PanicException, a BaseException: it escaped
                # every handler) when, e.g., an allocation fails
                panic = is_rust_panic(error)
                if not (isinstance(error, Exception) or panic):
                    raise   # (KeyboardInterrupt, SystemExit)
                cause = "out of memory, or a corrupt file?" if panic else "truncated or corrupt?"
                problems.append(f"cannot read {WEIGHTS_FILE} ({cause}): "
                                f"{type(error).__name__}: {error}")
                weights = None
        spec = None
        architecture = config.get("architecture")
        if architecture is not None and _spec_function(architecture, required=False) is not None:
            try:
                spec = weight_spec(config)
            except ValueError as error:  # missing or inconsistent hyper-parameters
                problems.extend(str(error).split("\n  "))
        if spec is not None and weights is not None:
            problems.extend(check_weights(spec, weights))
    if problems:
        raise ValueError(f"invalid model directory {str(path)!r}:\n  " + "\n  ".join(problems))
    return config, weights


# ------------------------------------------------------------------------------------------
# Specs of the built-in architectures
# ------------------------------------------------------------------------------------------

def _dtype_of(config: Mapping) -> str:
    dtype = config["dtype"]
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dtype


def _rnn_spec(prefix: str, cell: str, input_size: int, hidden: int, layers: int, directions: int, dtype: str):
    gates = {"gru": 3, "lstm": 4}[cell] * hidden
    spec = {}
    for layer in range(layers):
        layer_input = input_size if layer == 0 else hidden * directions
        for suffix in [f"_l{layer}", f"_l{layer}_reverse"][:directions]:
            spec[f"{prefix}.weight_ih{suffix}"] = ((gates, layer_input), dtype)
            spec[f"{prefix}.weight_hh{suffix}"] = ((gates, hidden), dtype)
            spec[f"{prefix}.bias_ih{suffix}"] = ((gates,), dtype)
            spec[f"{prefix}.bias_hh{suffix}"] = ((gates,), dtype)
    return spec


def seq2seq_attention_weight_spec(config: Mapping) -> WeightSpec:
    """Weights of ``attncore.train.seq2seq.Seq2SeqAttention`` (see its module docstring).

    ===================================  ===================  ==============================
    name                                 shape                present
    ===================================  ===================  ==============================
    encoder.embedding.weight             (V_src, E)
    encoder.rnn.{weight,bias}_{ih,hh}_lK  torch nn.GRU/LSTM    H/2 per direction if bidirectional
    decoder.embedding.weight             (V_tgt, E)
    decoder.rnn.*                        input E (+H)         +H for bahdanau or input feeding
    decoder.attention.query.weight       (A, H)               bahdanau, luong_concat
    decoder.attention.key.weight         (A, H)               bahdanau, luong_concat
    decoder.attention.score.weight       (1, A)               bahdanau, luong_concat
    decoder.attention.linear_in.weight   (H, H)               luong_general
    decoder.attention.output.weight      (H, 2H)              luong_* ([context; h] order)
    decoder.output.weight / .bias        (V_tgt, H) / (V_tgt)
    ===================================  ===================  ==============================
    """
    dtype = _dtype_of(config)
    cell, attention = config["rnn_type"], config["attention"]
    hidden, embed, layers = int(config["hidden_size"]), int(config["embed_dim"]), int(config["num_layers"])
    bidirectional = bool(config["bidirectional"])
    if cell not in ("gru", "lstm"):
        raise ValueError(f"rnn_type must be 'gru' or 'lstm', got {cell!r}")
    if attention not in ("bahdanau", "luong_dot", "luong_general", "luong_concat"):
        raise ValueError(f"unknown attention {attention!r}")
    if bidirectional and hidden % 2:
        raise ValueError(f"a bidirectional encoder needs an even hidden_size, got {hidden}")
    attention_dim = int(config["attention_dim"]) or hidden
    src_vocab = _used_vocabulary(config, "src_vocab_size", "an encoder")
    tgt_vocab = _used_vocabulary(config, "tgt_vocab_size", "a decoder")
    directions = 2 if bidirectional else 1

    spec = {"encoder.embedding.weight": ((src_vocab, embed), dtype)}
    spec.update(_rnn_spec("encoder.rnn", cell, embed, hidden // directions, layers, directions, dtype))
    spec["decoder.embedding.weight"] = ((tgt_vocab, embed), dtype)
    feeds_context = attention == "bahdanau" or bool(config["input_feeding"])
    spec.update(_rnn_spec("decoder.rnn", cell, embed + (hidden if feeds_context else 0), hidden, layers, 1, dtype))
    if attention in ("bahdanau", "luong_concat"):
        spec["decoder.attention.query.weight"] = ((attention_dim, hidden), dtype)
        spec["decoder.attention.key.weight"] = ((attention_dim, hidden), dtype)
        spec["decoder.attention.score.weight"] = ((1, attention_dim), dtype)
    if attention == "luong_general":
        spec["decoder.attention.linear_in.weight"] = ((hidden, hidden), dtype)
    if attention.startswith("luong"):
        spec["decoder.attention.output.weight"] = ((hidden, 2 * hidden), dtype)
    spec["decoder.output.weight"] = ((tgt_vocab, hidden), dtype)
    spec["decoder.output.bias"] = ((tgt_vocab,), dtype)
    return spec


def _used_vocabulary(config: Mapping, key: str, user: str) -> int:
    """``config[key]``, a vocabulary size that may be 0 where no layer reads it, for a model with
    ``user`` (an encoder, a decoder), which needs at least one token."""
    size = int(config[key])
    if size < 1:
        raise ValueError(f"config: {key} must be >= 1 for a model with {user}, got {size}")
    return size


def _attention_spec(prefix: str, d_model: int, fused: bool, bias: bool, dtype: str) -> WeightSpec:
    # torch.nn.MultiheadAttention names: in_proj_weight (3d, d) when q/k/v are fused, else
    # {q,k,v}_proj_weight (d, d); in_proj_bias (3d); out_proj.weight (d, d), out_proj.bias (d).
    if fused:
        spec = {f"{prefix}.in_proj_weight": ((3 * d_model, d_model), dtype)}
    else:
        spec = {f"{prefix}.{p}_proj_weight": ((d_model, d_model), dtype) for p in "qkv"}
    spec[f"{prefix}.out_proj.weight"] = ((d_model, d_model), dtype)
    if bias:
        spec[f"{prefix}.in_proj_bias"] = ((3 * d_model,), dtype)
        spec[f"{prefix}.out_proj.bias"] = ((d_model,), dtype)
    return spec


def _norm_spec(prefix: str, d_model: int, dtype: str) -> WeightSpec:
    return {f"{prefix}.weight": ((d_model,), dtype), f"{prefix}.bias": ((d_model,), dtype)}


def transformer_weight_spec(config: Mapping) -> WeightSpec:
    """Weights of ``attncore.train.transformer.Transformer`` (torch ``nn.Transformer`` names).

    Per layer ``encoder.layers.{i}.`` / ``decoder.layers.{i}.``: ``self_attn.*`` (and
    ``multihead_attn.*`` for encoder-decoder decoders), ``linear1`` (F, d), ``linear2`` (d, F),
    ``norm1``, ``norm2`` (+ ``norm3`` with cross-attention). Top level: ``src_embedding``,
    ``tgt_embedding`` (V, d); ``src_position`` / ``tgt_position`` (max_positions, d) when learned;
    ``encoder.norm`` / ``decoder.norm`` with ``final_norm``; ``output.weight`` (V_tgt, d) unless
    tied, ``output.bias``; ``classifier.weight`` (C, d) and ``.bias`` for encoder-only.
    """
    dtype = _dtype_of(config)
    kind = config["kind"]
    if kind not in ("encoder_decoder", "decoder_only", "encoder_only"):
        raise ValueError(f"kind must be encoder_decoder, decoder_only or encoder_only, got {kind!r}")
    d_model, heads, ffn = int(config["d_model"]), int(config["num_heads"]), int(config["dim_feedforward"])
    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not divisible by num_heads {heads}")
    fused, bias = bool(config["fused_qkv"]), bool(config["attention_bias"])
    learned = config["positions"] == "learned"
    if config["positions"] not in ("sinusoidal", "learned"):
        raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {config['positions']!r}")
    table_bytes = 4 * int(config["max_positions"]) * d_model
    if not learned and table_bytes > MAX_SINUSOID_BYTES:
        raise ValueError(f"config: a sinusoidal table of max_positions x d_model = "
                         f"{config['max_positions']} x {d_model} takes {table_bytes / 2**20:.0f} "
                         f"MiB, made at load; at most {MAX_SINUSOID_BYTES >> 20} MiB: lower "
                         f"max_positions")
    # null means "as norm_first", the trainer's TransformerConfig default
    final_norm = bool(config["norm_first"] if config["final_norm"] is None else config["final_norm"])
    problem = _layer_norm_eps_problem(config["layer_norm_eps"])   # (called directly, too)
    if problem:
        raise ValueError(problem)

    spec: WeightSpec = {}
    has_encoder = kind in ("encoder_decoder", "encoder_only")
    has_decoder = kind in ("encoder_decoder", "decoder_only")
    if has_decoder and int(config["num_decoder_layers"]) < 1:
        raise ValueError(f"config: num_decoder_layers must be >= 1 for kind {kind!r}, got "
                         f"{config['num_decoder_layers']}")
    if has_encoder:
        spec["src_embedding.weight"] = ((_used_vocabulary(config, "src_vocab_size", "an encoder"),
                                         d_model), dtype)
        if learned:
            spec["src_position.weight"] = ((int(config["max_positions"]), d_model), dtype)
        for i in range(int(config["num_encoder_layers"])):
            prefix = f"encoder.layers.{i}"
            spec.update(_attention_spec(prefix + ".self_attn", d_model, fused, bias, dtype))
            spec.update(_feedforward_spec(prefix, d_model, ffn, dtype))
            spec.update(_norm_spec(prefix + ".norm1", d_model, dtype))
            spec.update(_norm_spec(prefix + ".norm2", d_model, dtype))
        if final_norm:
            spec.update(_norm_spec("encoder.norm", d_model, dtype))
    if has_decoder:
        tgt_vocab = _used_vocabulary(config, "tgt_vocab_size", "a decoder")
        spec["tgt_embedding.weight"] = ((tgt_vocab, d_model), dtype)
        if learned:
            spec["tgt_position.weight"] = ((int(config["max_positions"]), d_model), dtype)
        cross = kind == "encoder_decoder"
        for i in range(int(config["num_decoder_layers"])):
            prefix = f"decoder.layers.{i}"
            spec.update(_attention_spec(prefix + ".self_attn", d_model, fused, bias, dtype))
            if cross:
                # Cross-attention keys/values come from a different sequence: torch stores them
                # in in_proj_weight too, so the same layout applies.
                spec.update(_attention_spec(prefix + ".multihead_attn", d_model, fused, bias, dtype))
            spec.update(_feedforward_spec(prefix, d_model, ffn, dtype))
            for norm in (("norm1", "norm2", "norm3") if cross else ("norm1", "norm2")):
                spec.update(_norm_spec(f"{prefix}.{norm}", d_model, dtype))
        if final_norm:
            spec.update(_norm_spec("decoder.norm", d_model, dtype))
        if not bool(config["tie_embeddings"]):
            spec["output.weight"] = ((tgt_vocab, d_model), dtype)
        spec["output.bias"] = ((tgt_vocab,), dtype)
    if kind == "encoder_only":
        classes = int(config["num_classes"])
        spec["classifier.weight"] = ((classes, d_model), dtype)
        spec["classifier.bias"] = ((classes,), dtype)
    return spec


def _feedforward_spec(prefix: str, d_model: int, ffn: int, dtype: str) -> WeightSpec:
    return {f"{prefix}.linear1.weight": ((ffn, d_model), dtype), f"{prefix}.linear1.bias": ((ffn,), dtype),
            f"{prefix}.linear2.weight": ((d_model, ffn), dtype), f"{prefix}.linear2.bias": ((d_model,), dtype)}


register_architecture("seq2seq_attention", seq2seq_attention_weight_spec, (
    "src_vocab_size", "tgt_vocab_size", "embed_dim", "hidden_size", "num_layers", "rnn_type",
    "bidirectional", "attention", "attention_dim", "input_feeding", "packed_source", "dtype",
    *SPECIAL_TOKEN_KEYS))
register_architecture("transformer", transformer_weight_spec, (
    "kind", "src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "num_encoder_layers",
    "num_decoder_layers", "dim_feedforward", "activation", "norm_first", "final_norm",
    "layer_norm_eps", "positions", "max_positions", "scale_embedding", "fused_qkv",
    "attention_bias", "tie_embeddings", "num_classes", "pooling", "dtype", *SPECIAL_TOKEN_KEYS))
