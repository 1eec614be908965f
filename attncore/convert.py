# SPDX-License-Identifier: Apache-2.0
"""Import weights trained elsewhere into attncore model directories (``docs/FORMAT.md``).

* :func:`from_pytorch_transformer`: a PyTorch ``nn.Transformer`` (encoder-decoder) or an
  ``nn.TransformerEncoder`` stack (encoder-only, or decoder-only when run with a causal mask),
  with the embeddings, position table and output layer around it, from a state dict.
* :func:`from_rannet`: the variables of the authors' RAN implementation (``rannet``).

Both read plain arrays (a mapping of NumPy arrays, a ``.safetensors`` file, an ``.npz`` file read
with ``allow_pickle=False``): nothing is ever unpickled, and neither needs PyTorch or TensorFlow.
Every problem of the input (missing, unexpected and wrongly shaped tensors, bad
hyper-parameters) is reported in one ``ValueError``, and nothing is written then. The weights
written are checked once more against :func:`attncore.io.weight_spec` by
:func:`attncore.io.save_model_dir`.

Why the PyTorch import is mostly renaming: the trainer's Transformer uses
``torch.nn.Transformer``'s parameter names and layouts (``in_proj_weight`` (3d, d) =
[W_q; W_k; W_v], ``linear1``, ``norm1``...), so only the modules *around* ``nn.Transformer``,
which every project names differently, must be named by the caller.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import io

__all__ = ["from_pytorch_transformer", "from_rannet", "NAME_KEYS", "DEFAULT_SINUSOIDAL_POSITIONS"]

PathLike = Union[str, os.PathLike]

#: The keys of ``names`` in :func:`from_pytorch_transformer`: the modules around nn.Transformer.
NAME_KEYS = ("src_embedding", "tgt_embedding", "positions", "src_positions", "tgt_positions",
             "output", "output_bias", "classifier", "classifier_bias")

#: Positions covered by a sinusoidal table when ``max_positions`` is not given.
DEFAULT_SINUSOIDAL_POSITIONS = 1024

_KINDS = ("encoder_decoder", "decoder_only", "encoder_only")

# names keys each kind may use; the first group is required.
_REQUIRED_NAMES = {
    "encoder_decoder": ("src_embedding", "tgt_embedding", "output"),
    "decoder_only": ("tgt_embedding", "output"),
    "encoder_only": ("src_embedding", "classifier"),
}
_OPTIONAL_NAMES = {
    "encoder_decoder": ("positions", "src_positions", "tgt_positions", "output_bias"),
    "decoder_only": ("positions", "tgt_positions", "output_bias"),
    "encoder_only": ("positions", "src_positions", "classifier_bias"),
}

# The trainer weights each named module fills (target name -> names key).
_NAMED_TARGETS = {
    "src_embedding.weight": "src_embedding",
    "tgt_embedding.weight": "tgt_embedding",
    "src_position.weight": "src_positions",
    "tgt_position.weight": "tgt_positions",
    "output.weight": "output",
    "output.bias": "output_bias",
    "classifier.weight": "classifier",
    "classifier.bias": "classifier_bias",
}

# Biases that torch drops with nn.Transformer(bias=False) but the trainer always has.
_BIAS_FREE_TORCH = re.compile(r"(^|\.)(linear[12]|norm\d*)\.bias$")


# ------------------------------------------------------------------------------------------
# Reading arrays
# ------------------------------------------------------------------------------------------

def _to_numpy(value) -> np.ndarray:
    """A NumPy array from an array-like or a CPU torch tensor (without importing torch)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu()
        try:
            return value.numpy()
        except TypeError:  # bfloat16 and other dtypes NumPy lacks: go through float32
            return value.float().numpy()
    return np.asarray(value)


def _read_arrays(source, argument: str, suffixes: Tuple[str, ...]) -> Dict[str, np.ndarray]:
    """``source`` (a mapping name -> array, or a path) as a dict of NumPy arrays.

    Paths ending in ``.safetensors`` go through ``safetensors.numpy``; ``.npz`` through
    ``np.load(allow_pickle=False)`` (an object array raises instead of unpickling).
    """
    if isinstance(source, Mapping):
        arrays = {}
        for name, value in source.items():
            if not isinstance(name, str):
                raise ValueError(f"{argument}: tensor names must be strings, got {name!r}")
            arrays[name] = _to_numpy(value)
        return arrays
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"{argument} must be a mapping of arrays or a path to a "
                         f"{' or '.join(suffixes)} file, got {type(source).__name__}")
    path = Path(source)
    if path.suffix not in suffixes:
        raise ValueError(f"{argument}: {str(path)!r} is not a {' or '.join(suffixes)} file")
    if not path.is_file():
        raise ValueError(f"{argument}: no such file {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file
            return dict(load_file(str(path)))
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except Exception as error:  # safetensors/zipfile raise their own types for bad files
        raise ValueError(f"{argument}: cannot read {str(path)!r} ({type(error).__name__}: {error}); "
                         f"a safetensors file in bfloat16 must be converted to float32 first") from None


# ------------------------------------------------------------------------------------------
# PyTorch nn.Transformer
# ------------------------------------------------------------------------------------------

@dataclass
class _Gathered:
    """State-dict tensors under their trainer names, and where each came from."""

    weights: Dict[str, np.ndarray] = field(default_factory=dict)
    origin: Dict[str, str] = field(default_factory=dict)      # trainer name -> source description
    unused: List[str] = field(default_factory=list)           # source keys that map to nothing
    problems: List[str] = field(default_factory=list)
    missing_named: set = field(default_factory=set)           # targets whose named key is absent


def from_pytorch_transformer(state_dict: Union[Mapping[str, np.ndarray], PathLike], out_dir: PathLike, *,
                             names: Mapping[str, str], num_heads: int, scale_embedding: bool,
                             kind: str = "encoder_decoder", prefix: str = "", norm_first: bool = False,
                             activation: str = "relu", layer_norm_eps: float = 1e-5,
                             bias: bool = True, final_norm: Optional[bool] = None,
                             max_positions: Optional[int] = None, pooling: str = "mean",
                             ignore: Iterable[str] = (), dtype: str = "float32",
                             pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, unk_id: int = 3,
                             tokenizer: Optional[dict] = None,
                             tokenizer_files=None) -> Path:
    """Write a PyTorch Transformer's weights as an attncore ``transformer`` model directory.

    Parameters
    ----------
    state_dict : mapping name -> array, or path to a ``.safetensors`` or ``.npz`` file
        ``model.state_dict()`` with each tensor as a NumPy array (``t.detach().numpy()``; CPU
        torch tensors are accepted too), or a file written by ``safetensors.numpy.save_file`` /
        ``safetensors.torch.save_file`` / ``numpy.savez`` (read with ``allow_pickle=False``).
        float16/float32/float64 tensors are cast to ``dtype``. With tied embeddings torch lists
        the shared matrix under both names: put the output layer's key in ``ignore``.
    out_dir : path
        The model directory to write (created if needed).
    names : mapping
        State-dict keys of the modules around the Transformer (see :data:`NAME_KEYS`):

        * ``src_embedding`` (V_src, d), ``tgt_embedding`` (V_tgt, d): token embeddings
          (encoder_decoder needs both, encoder_only the first, decoder_only the second); the
          same key twice for a shared embedding.
        * ``positions`` (P, d), or ``src_positions`` / ``tgt_positions``: a position table added
          to the (scaled) token embeddings, row p for position p (from 0). A learned
          ``nn.Embedding`` or a fixed buffer (shape (P, 1, d) or (1, P, d) is accepted); it is
          stored as a learned table, so any sinusoid layout converts exactly. Without one, the
          model uses attncore's sinusoidal table (``sin`` on even, ``cos`` on odd dimensions,
          the ``nn.Transformer`` tutorial's ``PositionalEncoding``).
        * ``output`` (V_tgt, d), ``output_bias`` (V_tgt): the generator ``nn.Linear``; ``output``
          equal to ``tgt_embedding`` ties them; no ``output_bias`` means a zero bias.
        * ``classifier`` (C, d), ``classifier_bias`` (C): encoder_only's class head.
    num_heads : int
        Attention heads (not visible in the weights).
    scale_embedding : bool
        Whether the model multiplies token embeddings by sqrt(d_model) before adding positions
        (the ``nn.Transformer`` tutorial does; ``nn.Transformer`` itself has no embeddings).
    kind : {"encoder_decoder", "decoder_only", "encoder_only"}
        ``encoder_decoder``: an ``nn.Transformer`` whose keys start with ``prefix`` (its
        ``encoder.layers.{i}.*``, ``encoder.norm.*``, ``decoder.*``). ``encoder_only`` and
        ``decoder_only``: an ``nn.TransformerEncoder`` at ``prefix`` (``layers.{i}.*``,
        optional ``norm.*``), run without a mask (encoder) or with a causal mask (decoder).
    prefix : str
        The Transformer's module path in the state dict (``"transformer."``); ``""`` for none.
    norm_first, activation, layer_norm_eps, bias
        As given to ``nn.Transformer`` (defaults are torch's). ``activation`` is ``"relu"`` or
        ``"gelu"`` (torch's exact erf GELU). ``bias=False``: the model has no attention, FFN or
        LayerNorm biases (its norms ``LayerNorm(bias=False)``; the FFN and norm biases become
        zeros). Given, not inferred: a bias-free ``nn.RMSNorm`` leaves the same tensors as a
        bias-free LayerNorm and would convert into another model. Every norm must be a
        ``LayerNorm``.
    final_norm : bool, optional
        Whether the stacks end with a norm (``nn.Transformer`` always; an
        ``nn.TransformerEncoder`` when given ``norm=``). Default: inferred from the ``norm.*``
        tensors. A final ``LayerNorm(elementwise_affine=False)`` has none: pass True (its
        weight and bias are then ones and zeros).
    max_positions : int, optional
        Longest sequence. Default: the rows of the position table (truncated when smaller),
        else :data:`DEFAULT_SINUSOIDAL_POSITIONS`.
    pooling : {"mean", "first"}
        encoder_only: how token outputs become the classifier input.
    ignore : iterable of str
        State-dict keys (``fnmatch`` patterns such as ``"*.num_batches_tracked"``) to leave
        out; any other key that maps to no weight is an error.
    dtype : {"float32", "float64"}
    pad_id, bos_id, eos_id, unk_id : int
        Special token ids written to ``config.json``.
    tokenizer, tokenizer_files
        ``config["tokenizer"]`` and the files to write with it (see
        :func:`attncore.io.save_model_dir`).

    Returns
    -------
    Path of the model directory.

    Raises
    ------
    ValueError
        Naming the argument for bad arguments; otherwise listing every problem of the state
        dict at once: missing tensors, tensors that map to nothing, wrong shapes, non-float
        or non-finite values. Nothing is written then.
    """
    from .train.transformer import TransformerConfig

    _check_transformer_arguments(kind, num_heads, scale_embedding, norm_first, activation,
                                 layer_norm_eps, bias, final_norm, max_positions, pooling, dtype)
    _check_out_dir(out_dir)
    prefix = _check_prefix(prefix)
    ignore = _check_ignore(ignore)
    arrays = _read_arrays(state_dict, "state_dict", (".safetensors", ".npz"))
    names = _check_names(names, kind)

    gathered = _gather(arrays, kind, prefix, names, ignore)
    hparams = _infer_transformer_shapes(gathered, kind, prefix, names, max_positions)
    if hparams is None:  # not even d_model could be found: nothing more to check
        _raise(gathered.problems)
    _check_bias_and_final_norm(gathered, hparams, bool(bias), final_norm)
    # a missing embedding is reported by the shape comparison: its placeholder vocabulary (1)
    # must not fail the special ids' range check too
    for side, ids in (("src", (pad_id, unk_id)), ("tgt", (bos_id, eos_id))):
        if hparams[f"{side}_vocab_size"] and f"{side}_embedding.weight" not in gathered.weights:
            hparams[f"{side}_vocab_size"] = max([hparams[f"{side}_vocab_size"]]
                                                + [i + 1 for i in ids if isinstance(i, int)])
    try:
        config = TransformerConfig(
            kind=kind, num_heads=num_heads, activation=activation, norm_first=bool(norm_first),
            layer_norm_eps=float(layer_norm_eps), scale_embedding=bool(scale_embedding),
            pooling=pooling, fused_qkv=True, dropout=0.0, dtype=dtype, pad_id=pad_id, bos_id=bos_id,
            eos_id=eos_id, unk_id=unk_id, tokenizer=tokenizer, **hparams)
    except ValueError as error:
        gathered.problems.append(str(error))
        _raise(gathered.problems)
    try:
        spec = io.weight_spec(config.to_dict())
    except ValueError as error:  # (no decoder layers found: report where they were looked for)
        _raise(gathered.problems + [str(error)])
    _fill_zero_biases(gathered, spec, names, config.attention_bias)
    problems = gathered.problems + _compare(gathered, spec, kind, prefix, names)
    _raise(problems)
    with np.errstate(over="ignore"):
        weights = {name: np.ascontiguousarray(gathered.weights[name], dtype=dtype)
                   for name in spec}
    # finite before the cast is not enough: 1e39 in float64 is inf in float32 (the directory
    # was written, then refused by attncore.load)
    _raise([f"tensor {name!r} holds values beyond {dtype}'s range"
            for name, array in weights.items() if not np.all(np.isfinite(array))])
    return io.save_model_dir(out_dir, config.to_dict(), weights, tokenizer_files)


def _raise(problems: List[str]) -> None:
    if problems:
        raise ValueError(f"cannot convert the PyTorch state dict ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))


def _check_transformer_arguments(kind, num_heads, scale_embedding, norm_first, activation,
                                 layer_norm_eps, bias, final_norm, max_positions, pooling,
                                 dtype) -> None:
    """ValueError naming the first bad scalar argument (before any array is read)."""
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    checks = [
        (kind in _KINDS, f"kind must be one of {_KINDS}, got {kind!r}"),
        (is_int(num_heads) and num_heads >= 1, f"num_heads must be a positive int, got {num_heads!r}"),
        (isinstance(scale_embedding, (bool, np.bool_)), f"scale_embedding must be a bool, got {scale_embedding!r}"),
        (isinstance(norm_first, (bool, np.bool_)), f"norm_first must be a bool, got {norm_first!r}"),
        (isinstance(bias, (bool, np.bool_)), f"bias must be a bool, got {bias!r}"),
        (final_norm is None or isinstance(final_norm, (bool, np.bool_)),
         f"final_norm must be a bool or None, got {final_norm!r}"),
        (activation in ("relu", "gelu"),
         f"activation must be 'relu' or 'gelu' (exact erf GELU, torch's default), got {activation!r}"),
        (isinstance(layer_norm_eps, (int, float, np.floating)) and not isinstance(layer_norm_eps, bool)
         and math.isfinite(layer_norm_eps) and layer_norm_eps > 0,
         f"layer_norm_eps must be a finite positive number, got {layer_norm_eps!r}"),
        (max_positions is None or (is_int(max_positions) and max_positions >= 1),
         f"max_positions must be a positive int or None, got {max_positions!r}"),
        (pooling in ("mean", "first"), f"pooling must be 'mean' or 'first', got {pooling!r}"),
        (dtype in ("float32", "float64"), f"dtype must be 'float32' or 'float64', got {dtype!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _check_out_dir(out_dir) -> None:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory")


def _check_prefix(prefix) -> str:
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string, got {type(prefix).__name__}")
    # A torch module path always ends with a dot before the parameter name.
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _check_ignore(ignore) -> Tuple[str, ...]:
    if isinstance(ignore, str):
        ignore = (ignore,)
    ignore = tuple(ignore)
    if not all(isinstance(pattern, str) for pattern in ignore):
        raise ValueError("ignore must be an iterable of strings (state-dict keys or fnmatch patterns)")
    return ignore


def _check_names(names, kind: str) -> Dict[str, str]:
    """The ``names`` mapping, checked against the keys ``kind`` uses."""
    if not isinstance(names, Mapping):
        raise ValueError(f"names must be a mapping such as {{'src_embedding': 'src_tok.weight', ...}}, "
                         f"got {type(names).__name__}")
    names = {key: value for key, value in names.items() if value is not None}
    allowed = _REQUIRED_NAMES[kind] + _OPTIONAL_NAMES[kind]
    problems = []
    unknown = [key for key in names if key not in NAME_KEYS]
    if unknown:
        problems.append(f"unknown keys {unknown}; known: {list(NAME_KEYS)}")
    unused = [key for key in names if key in NAME_KEYS and key not in allowed]
    if unused:
        problems.append(f"keys {unused} are not used by kind {kind!r} (it uses {list(allowed)})")
    missing = [key for key in _REQUIRED_NAMES[kind] if key not in names]
    if missing:
        problems.append(f"kind {kind!r} needs keys {missing}")
    problems += [f"{key!r} must name a state-dict key (a string), got {value!r}"
                 for key, value in names.items() if not isinstance(value, str)]
    if "positions" in names and ({"src_positions", "tgt_positions"} & names.keys()):
        problems.append("give 'positions' (one shared table) or 'src_positions'/'tgt_positions', not both")
    if kind == "encoder_decoder" and len({"src_positions", "tgt_positions"} & names.keys()) == 1:
        problems.append("an encoder_decoder needs both 'src_positions' and 'tgt_positions' (or 'positions')")
    if problems:
        raise ValueError("names: " + "; ".join(problems))
    # One shared table fills the position weights of every stack the kind has.
    if "positions" in names:
        shared = names.pop("positions")
        for key in ("src_positions", "tgt_positions"):
            if key in allowed:
                names[key] = shared
    return names


def _stack_prefixes(kind: str, prefix: str) -> Dict[str, str]:
    """Source key prefix -> trainer prefix of each Transformer stack."""
    if kind == "encoder_decoder":
        return {prefix + "encoder.": "encoder.", prefix + "decoder.": "decoder."}
    return {prefix: "encoder." if kind == "encoder_only" else "decoder."}


def _stack_target(key: str, stacks: Mapping[str, str]) -> Optional[str]:
    """The trainer name of a stack parameter (``layers.*`` or the final ``norm.*``), or None."""
    for source, target in stacks.items():
        if key.startswith(source):
            rest = key[len(source):]
            if rest.startswith(("layers.", "norm.")):
                return target + rest
    return None


def _gather(arrays: Mapping[str, np.ndarray], kind: str, prefix: str, names: Mapping[str, str],
            ignore: Tuple[str, ...]) -> _Gathered:
    """Rename the state dict's tensors to trainer names; pack split q/k/v; squeeze tables."""
    gathered = _Gathered()
    named_keys = set(names.values())
    tied = names.get("output") is not None and names.get("output") == names.get("tgt_embedding")
    for target, key in _NAMED_TARGETS.items():
        source = names.get(key)
        if source is None or (tied and target == "output.weight"):
            continue  # tied: the output layer reads tgt_embedding.weight
        if source in arrays:
            gathered.weights[target] = arrays[source]
            gathered.origin[target] = source
        else:
            gathered.problems.append(f"missing tensor {source!r} (names[{key!r}])")
            gathered.missing_named.add(target)
    stacks = _stack_prefixes(kind, prefix)
    for key, array in arrays.items():
        if key in named_keys or any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore):
            continue
        target = _stack_target(key, stacks)
        if target is None:
            gathered.unused.append(key)
        else:
            gathered.weights[target] = array
            gathered.origin[target] = key
    _pack_split_projections(gathered)
    for target in ("src_position.weight", "tgt_position.weight"):
        if target in gathered.weights:
            gathered.weights[target] = _as_table(gathered.weights[target])
    return gathered


def _pack_split_projections(gathered: _Gathered) -> None:
    """``{q,k,v}_proj_weight`` (d, d) each -> ``in_proj_weight`` (3d, d) = [W_q; W_k; W_v].

    torch keeps them split when ``kdim``/``vdim`` differ from ``embed_dim``; with equal widths
    the stacked matrix is the same computation, and the engine reads the packed form.
    """
    weights, origin = gathered.weights, gathered.origin
    for q_name in [name for name in weights if name.endswith(".q_proj_weight")]:
        base = q_name[: -len("q_proj_weight")]
        parts = [base + p + "_proj_weight" for p in "qkv"]
        if base + "in_proj_weight" in weights or not all(part in weights for part in parts):
            continue  # reported later: the leftovers are unexpected or the packed one missing
        arrays = [weights[part] for part in parts]
        if any(a.ndim != 2 or a.shape != arrays[0].shape for a in arrays):
            gathered.problems.append(
                f"cannot pack {[origin[p] for p in parts]} into in_proj_weight: shapes "
                f"{[list(a.shape) for a in arrays]} differ or are not 2-D")
            # one cause, one problem (the packed weight was also reported missing and each
            # part unexpected, with advice to ignore them that would lose the projection)
            gathered.missing_named.add(base + "in_proj_weight")
            for part in parts:
                del weights[part], origin[part]
            continue
        weights[base + "in_proj_weight"] = np.concatenate(arrays, axis=0)
        origin[base + "in_proj_weight"] = " + ".join(origin[p] for p in parts)
        for part in parts:
            del weights[part], origin[part]


def _as_table(array: np.ndarray) -> np.ndarray:
    """A position table as (P, d): torch tutorials keep a (P, 1, d) or (1, P, d) buffer."""
    if array.ndim == 3 and 1 in array.shape[:2]:
        return array.reshape(-1, array.shape[2])
    return array


def _dim(weights: Mapping[str, np.ndarray], name: str, axis: int) -> Optional[int]:
    array = weights.get(name)
    if array is None or array.ndim <= axis:
        return None
    return int(array.shape[axis])


def _layer_count(weights: Mapping[str, np.ndarray], stack: str) -> int:
    indices = {int(m.group(1)) for name in weights if (m := re.match(rf"{stack}\.layers\.(\d+)\.", name))}
    return max(indices) + 1 if indices else 0


def _prefix_hint(keys: Iterable[str], kind: str, stack: str) -> str:
    """A suggestion for ``prefix`` when no layer of ``stack`` was found under the given one."""
    # nn.Transformer keys read '<prefix>encoder.layers.0.'; a TransformerEncoder's '<prefix>layers.0.'.
    marker = f"{stack}.layers.0." if kind == "encoder_decoder" else "layers.0."
    for key in keys:
        at = key.find(marker)
        if at >= 0 and (at == 0 or key[at - 1] == "."):
            return f" (a key such as {key!r} suggests prefix={key[:at]!r})"
    return ""


def _infer_transformer_shapes(gathered: _Gathered, kind: str, prefix: str, names: Mapping[str, str],
                              max_positions: Optional[int]) -> Optional[dict]:
    """The hyper-parameters that the weights show (widths, counts, flags), or None without d_model.

    Inconsistencies are left to the shape comparison with the spec built from these values,
    which names each offending tensor.
    """
    weights, problems = gathered.weights, gathered.problems
    has_encoder, has_decoder = kind != "decoder_only", kind != "encoder_only"
    # the layers first: one embedding of the wrong width is then one mismatch, not every layer's
    d_model = next((d for d in (_dim(weights, "encoder.layers.0.norm1.weight", 0),
                                _dim(weights, "decoder.layers.0.norm1.weight", 0),
                                _dim(weights, "src_embedding.weight", 1),
                                _dim(weights, "tgt_embedding.weight", 1)) if d), None)
    if d_model is None:
        problems.append("cannot infer d_model: no token embedding and no layers.0.norm1.weight found")
        return None

    counts = {}
    all_keys = list(gathered.origin.values()) + gathered.unused
    for stack, present in (("encoder", has_encoder), ("decoder", has_decoder)):
        counts[stack] = _layer_count(weights, stack) if present else 0
        if present and counts[stack] == 0:
            source = next(s for s, t in _stack_prefixes(kind, prefix).items() if t == stack + ".")
            problems.append(f"no {stack} layers found under {source + 'layers.'!r}"
                            + _prefix_hint(all_keys, kind, stack))
    first_layer = "encoder.layers.0" if has_encoder else "decoder.layers.0"
    # the width most of the feed-forward tensors show: read from linear1.weight alone, one
    # transposed tensor made every correct one of its layers a reported mismatch
    widths = [w for w in (_dim(weights, f"{first_layer}.linear1.bias", 0),
                          _dim(weights, f"{first_layer}.linear2.weight", 1),
                          _dim(weights, f"{first_layer}.linear1.weight", 0)) if w]
    dim_feedforward = max(widths, key=widths.count) if widths else 1

    final = {stack: f"{stack}.norm.weight" in weights or f"{stack}.norm.bias" in weights
             for stack, present in (("encoder", has_encoder), ("decoder", has_decoder)) if present}
    if len(set(final.values())) > 1:
        problems.append("the encoder and decoder must both have a final norm or neither; found only "
                        + next(stack for stack, has in final.items() if has) + ".norm")

    hparams = dict(
        d_model=d_model, num_encoder_layers=counts["encoder"], num_decoder_layers=counts["decoder"],
        dim_feedforward=dim_feedforward, final_norm=any(final.values()),
        src_vocab_size=(_dim(weights, "src_embedding.weight", 0) or 1) if has_encoder else 0,
        # (a missing embedding: the output layer's rows, else a placeholder whose mismatches
        # are left unreported; the missing tensor is the problem)
        tgt_vocab_size=(_dim(weights, "tgt_embedding.weight", 0) or _dim(weights, "output.weight", 0)
                        or _dim(weights, "output.bias", 0) or 1) if has_decoder else 0,
        tie_embeddings=has_decoder and names.get("output") == names.get("tgt_embedding"),
        num_classes=(_dim(weights, "classifier.weight", 0) or _dim(weights, "classifier.bias", 0)
                     or 1) if kind == "encoder_only" else 0,
    )
    hparams.update(_positions(gathered, names, max_positions))
    return hparams


def _positions(gathered: _Gathered, names: Mapping[str, str], max_positions: Optional[int]) -> dict:
    """``positions`` and ``max_positions``; learned tables are cut to ``max_positions`` rows."""
    tables = [t for t in ("src_position.weight", "tgt_position.weight") if t in gathered.weights]
    if not ({"src_positions", "tgt_positions"} & names.keys()):
        return {"positions": "sinusoidal", "max_positions": max_positions or DEFAULT_SINUSOIDAL_POSITIONS}
    rows = [gathered.weights[t].shape[0] for t in tables if gathered.weights[t].ndim == 2]
    if not rows:  # a missing or malformed table is reported by the comparison
        return {"positions": "learned", "max_positions": max_positions or 1}
    limit = max_positions or min(rows)
    if limit > min(rows):
        gathered.problems.append(f"max_positions {limit} exceeds the {min(rows)} rows of the position table")
        limit = min(rows)
    for t in tables:
        # Rows past max_positions can never be read (longer inputs are refused), and the
        # trainer keeps one max_positions for both tables.
        if gathered.weights[t].ndim == 2:
            gathered.weights[t] = gathered.weights[t][:limit]
    return {"positions": "learned", "max_positions": int(limit)}


def _check_bias_and_final_norm(gathered: _Gathered, hparams: dict, bias: bool,
                               final_norm: Optional[bool]) -> None:
    """``attention_bias`` and ``final_norm`` of ``hparams`` from the arguments, with a problem
    where the weights say otherwise (one line, not a missing tensor a layer)."""
    weights, problems = gathered.weights, gathered.problems
    found = any(name.endswith("attn.in_proj_bias") for name in weights)
    if bias and not found:
        problems.append("the attention layers have no in_proj_bias: for a model built with "
                        "bias=False pass bias=False (its norms must be LayerNorms, not RMSNorm)")
    elif not bias and found:
        problems.append("bias=False, but the attention layers have in_proj_bias tensors")
    # (the spec follows the weights: a wrong bias is then this one problem, not a missing or
    # unexpected tensor in every layer)
    hparams["attention_bias"] = found
    if final_norm is None:
        return
    present = [name for name in weights if re.match(r"(encoder|decoder)\.norm\.", name)]
    if not final_norm and present:
        problems.append(f"final_norm=False, but the state dict has final norm tensors "
                        f"({gathered.origin[sorted(present)[0]]!r})")
    if final_norm and not present:
        # a LayerNorm(elementwise_affine=False): the identity affine map
        d = hparams["d_model"]
        for stack, count in (("encoder", hparams["num_encoder_layers"]),
                             ("decoder", hparams["num_decoder_layers"])):
            if count:
                for part, fill in (("weight", np.ones), ("bias", np.zeros)):
                    weights[f"{stack}.norm.{part}"] = fill(d, dtype=np.float32)
                    gathered.origin[f"{stack}.norm.{part}"] = f"{fill.__name__} (final_norm=True)"
    hparams["final_norm"] = final_norm


def _fill_zero_biases(gathered: _Gathered, spec: io.WeightSpec, names: Mapping[str, str],
                      bias: bool) -> None:
    """Zero biases where the torch model has none but the trainer always keeps one.

    * ``output.bias`` / ``classifier.bias`` when ``names`` gives no bias (a bias-free Linear);
    * ``linear{1,2}.bias`` and ``norm*.bias`` of ``nn.Transformer(bias=False)`` (no
      attention biases either: ``bias`` is ``config.attention_bias``).
    """
    weights, origin = gathered.weights, gathered.origin
    for target, key in (("output.bias", "output_bias"), ("classifier.bias", "classifier_bias")):
        if target in spec and key not in names:
            weights[target] = np.zeros(spec[target][0], dtype=spec[target][1])
            origin[target] = f"zeros (names has no {key!r})"
    if not bias:
        for target, (shape, dtype) in spec.items():
            if target not in weights and _BIAS_FREE_TORCH.search(target):
                weights[target] = np.zeros(shape, dtype=dtype)
                origin[target] = "zeros (bias=False)"


def _expected_source(target: str, kind: str, prefix: str, names: Mapping[str, str]) -> str:
    """The state-dict key a trainer weight would come from (for 'missing' messages)."""
    if target in _NAMED_TARGETS:
        key = _NAMED_TARGETS[target]
        return names.get(key, f"names[{key!r}]")
    for source, stack in _stack_prefixes(kind, prefix).items():
        if target.startswith(stack):
            return source + target[len(stack):]
    return target


def _compare(gathered: _Gathered, spec: io.WeightSpec, kind: str, prefix: str,
             names: Mapping[str, str]) -> List[str]:
    """Every missing, unexpected, wrongly shaped, non-float or non-finite tensor."""
    weights, origin = gathered.weights, gathered.origin
    problems = []
    for target, (shape, _) in spec.items():
        if target in gathered.missing_named:
            continue   # (named and reported missing already)
        if target not in weights:
            problems.append(f"missing tensor {_expected_source(target, kind, prefix, names)!r} "
                            f"(expected shape {list(shape)}, for {target})")
            continue
        array, source = weights[target], origin[target]
        if tuple(array.shape) != shape:
            problems.append(f"tensor {source!r} has shape {list(array.shape)}, expected {list(shape)} (for {target})")
        elif not np.issubdtype(array.dtype, np.floating):
            problems.append(f"tensor {source!r} has dtype {array.dtype}, expected floating point")
        elif not np.isfinite(array).all():
            problems.append(f"tensor {source!r} contains NaN or infinity")
    unexpected = [origin[t] for t in weights if t not in spec] + gathered.unused
    problems += [f"unexpected tensor {key!r} (maps to no weight of this {kind} model; "
                 f"name it in names, fix prefix, or pass it in ignore)" for key in sorted(unexpected)]
    return problems


# ------------------------------------------------------------------------------------------
# rannet (RAN, the authors' TensorFlow implementation)
# ------------------------------------------------------------------------------------------

#: RANConfig fields the weights cannot show and that change the outputs: always given.
_RAN_REQUIRED = ("head_num", "head_size", "window_size", "min_window_size")


def from_rannet(variables: Union[Mapping[str, np.ndarray], PathLike], out_dir: PathLike, config, *,
                strict: bool = True, tokenizer_files=None) -> Path:
    """Write the variables of an official ``rannet`` model as an attncore ``ran`` model directory.

    Parameters
    ----------
    variables : mapping name -> array, or path to an ``.npz`` file
        TensorFlow variables by name (``RAN-0/encode-attn/dense-q/kernel:0``, checkpoint names
        ``rannet/ran-0/...``, or the fixture form ``weight::NNN::<name>:0``; see
        :func:`attncore.train.ran.from_rannet_variables`, which does the mapping). An ``.npz``
        is read with ``allow_pickle=False``; every array in it is taken as a variable.
    out_dir : path
        The model directory to write.
    config : RANConfig or mapping
        Hyper-parameters (:class:`attncore.train.ran.RANConfig` fields). A mapping must give
        ``head_num``, ``head_size``, ``window_size`` and ``min_window_size``; ``vocab_size``,
        ``embedding_size`` and ``ran_layers`` default to what the variables show, and
        ``token_head`` to ``"lm"`` when the MLM head's variables are present. Other fields take
        RANConfig's defaults (e.g. ``cell_pooling="last"``, ``memory_review=True``).
    strict : bool
        Refuse variables that map to no weight (e.g. a fine-tuning ``Output-Cell-*`` head or
        optimizer slots); with False they are dropped.
    tokenizer_files
        As for :func:`attncore.io.save_model_dir`.

    Returns
    -------
    Path of the model directory.

    Raises
    ------
    ValueError
        Bad ``config`` (naming the fields), unreadable ``variables``, or (from the mapping)
        unknown variables, missing weights and wrong shapes, all listed at once.
    """
    from .train.ran import RANConfig, from_rannet_variables

    if not isinstance(strict, (bool, np.bool_)):
        raise ValueError(f"strict must be a bool, got {strict!r}")
    _check_out_dir(out_dir)
    arrays = _read_arrays(variables, "variables", (".npz",))
    if not isinstance(config, RANConfig):
        config = _ran_config(config, arrays)
    weights = from_rannet_variables(arrays, config, strict=bool(strict))
    bad = sorted(name for name, array in weights.items() if not np.isfinite(array).all())
    if bad:
        raise ValueError(f"variables: weights {bad} contain NaN or infinity")
    return io.save_model_dir(out_dir, config.to_dict(), weights, tokenizer_files)


def _ran_config(config, arrays: Mapping[str, np.ndarray]):
    """A RANConfig from a mapping, with the sizes the variables show filled in."""
    from dataclasses import fields

    from .train.ran import RANConfig

    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a RANConfig or a mapping, got {type(config).__name__}")
    known = {f.name for f in fields(RANConfig)}
    # A config.json dict may carry these; they are not RANConfig fields.
    extra = [key for key in config if key not in known and key not in ("architecture", "format_version")]
    missing = [key for key in _RAN_REQUIRED if key not in config]
    if extra or missing:
        raise ValueError("config: " + "; ".join(
            ([f"unknown fields {extra}"] if extra else [])
            + ([f"missing {missing} (not visible in the weights, and they change the outputs)"] if missing else [])))
    values = {key: value for key, value in config.items() if key in known}
    for key, value in _ran_shapes(arrays).items():
        values.setdefault(key, value)
    try:
        return RANConfig(**values)
    except (TypeError, ValueError) as error:  # TypeError: vocab_size not given nor inferable
        raise ValueError(f"config: {error}") from None


def _ran_shapes(arrays: Mapping[str, np.ndarray]) -> dict:
    """vocab_size, embedding_size, ran_layers (and token_head "lm") as the variables show them."""
    shapes = {}
    layers = set()
    for name, array in arrays.items():
        lowered = name.lower()
        if lowered.split("::")[-1].split(":")[0].endswith("token-embedding/embeddings") and array.ndim == 2:
            shapes["vocab_size"], shapes["embedding_size"] = (int(n) for n in array.shape)
        layers.update(int(m) for m in re.findall(r"(?:^|/|::)ran-(\d+)/", lowered))
        if "mlm-" in lowered:
            shapes["token_head"] = "lm"
    if layers:
        shapes["ran_layers"] = max(layers) + 1
    return shapes
