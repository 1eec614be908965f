# SPDX-License-Identifier: Apache-2.0
"""Cross-attention heat maps: which source tokens each generated token looked at.

:func:`attention_map` generates for one source with ``return_attention=True`` and labels the
weights with the tokens; :func:`render_text` draws them with block characters (for a terminal,
no dependency) and :func:`save_png` with matplotlib (the optional ``plot`` extra)::

    amap = attention_map(model, model.tokenizer.encode_source("3 March 1998"))
    print(render_text(amap))
    save_png(amap, "attention.png")

Rows are generated tokens (EOS included when it was generated), columns are source tokens;
each row is one decoder step's attention distribution over the source (heads averaged for
multi-head models), so it sums to 1.
"""
from __future__ import annotations

import re
import textwrap
import threading
import unicodedata
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .models.base import _default_limit, check_token_ids

__all__ = ["AttentionMap", "attention_map", "render_text", "save_png", "matplotlib_available",
           "SHADES"]

#: Block characters of the text rendering and the weight each one starts at.
SHADES = ((0.75, "█"), (0.5, "▓"), (0.25, "▒"), (0.05, "░"), (0.0, " "))


@dataclass
class AttentionMap:
    """Attention weights with their labels.

    Attributes
    ----------
    source_tokens : list of str, length S
    target_tokens : list of str, length T (the generated tokens; ``<eos>`` last when generated)
    weights : (T, S) float32, row t = attention of decoder step t over the source
    output : str, the generated text (or ids) in one string
    """

    source_tokens: List[str]
    target_tokens: List[str]
    weights: np.ndarray
    output: str = ""

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float32)
        expected = (len(self.target_tokens), len(self.source_tokens))
        if self.weights.shape != expected:
            raise ValueError(f"weights have shape {self.weights.shape}, labels give {expected}")


def _label(token: str) -> str:
    """A token as it is drawn: visible whitespace, and other unprintable characters (a
    carriage return, an escape sequence, a direction override) as ``\\x..``/``\\u....``
    escapes, which a terminal would otherwise obey."""
    return _printable(token.replace(" ", "␣").replace("\t", "⇥").replace("\n", "⏎")) or "∅"


def _printable(text: str) -> str:
    """``text`` with unprintable characters as their ``repr`` escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _labels(ids: Sequence[int], vocab) -> List[str]:
    if vocab is None:
        return [str(int(i)) for i in ids]
    out = []
    for i in ids:
        try:
            out.append(_label(vocab.id_to_token(int(i))))
        except (IndexError, AttributeError):
            out.append(str(int(i)))
    return out


def _check_source(source, vocab_size: Optional[int]) -> np.ndarray:
    """One source's token ids as int64, named ``source`` when they are not: a cast to int64
    read floats truncated and bools as ids 0 and 1, and drew the map of other tokens."""
    if isinstance(source, (str, bytes)):   # (this entry point's own hint)
        raise TypeError("source must be token ids, got a string (encode it first: "
                        "model.tokenizer.encode_source(text))")
    return check_token_ids(source, "source", vocab_size)


def attention_map(model, source: Sequence[int], *, max_length: Optional[int] = None,
                  beam_size: int = 1, length_penalty: float = 1.0,
                  eos_label: str = "<eos>", no_repeat_ngram_size: int = 0) -> AttentionMap:
    """Generate for one source and return its labelled cross-attention.

    Parameters
    ----------
    model : an encoder-decoder engine model (``generate(..., return_attention=True)``)
    source : 1-d token ids
    max_length : int, optional
        Default ``model.default_max_length(len(source))`` (as ``translate``; else
        ``2 * len(source) + 10``).
    beam_size : int
        The best hypothesis' attention is shown.
    length_penalty : float
        Ranks the beam's hypotheses (``generate``'s).
    no_repeat_ngram_size : int
        ``generate``'s (0: off), so the map is that of what ``translate`` gives with it.

    Raises
    ------
    ValueError
        The model returns no cross-attention (a decoder-only model), or bad arguments.
    """
    source = _check_source(source, getattr(model, "source_vocab_size", None))
    if max_length is None:   # (the model's own, within a position table; else translate's)
        max_length = getattr(model, "default_max_length", _default_limit)(len(source))
    result = model.generate([source], max_length=max_length, beam_size=beam_size,
                            length_penalty=length_penalty, return_attention=True,
                            no_repeat_ngram_size=no_repeat_ngram_size)[0]
    if not result.attention or result.attention[0] is None:
        raise ValueError("this model returns no cross-attention (it has no encoder)")
    weights = np.asarray(result.attention[0], dtype=np.float32)
    if weights.ndim == 3:  # (steps, heads, S): average the heads
        weights = weights.mean(axis=1)
    tokenizer = getattr(model, "tokenizer", None)
    source_vocab = getattr(tokenizer, "source_vocab", None)
    target_vocab = getattr(tokenizer, "target_vocab", None)
    tokens = [int(t) for t in result.tokens]
    source_labels = _labels(source, source_vocab)
    # The engine may attend over a source it extended (an EOS it appended): label the extra.
    source_labels += [eos_label] * (weights.shape[1] - len(source_labels))
    target_labels = _labels(tokens, target_vocab)
    target_labels += [eos_label] * (weights.shape[0] - len(target_labels))
    if tokenizer is not None:
        output = tokenizer.decode_target(tokens)
    else:
        output = " ".join(map(str, tokens))
    return AttentionMap(source_labels[:weights.shape[1]], target_labels[:weights.shape[0]],
                        weights, output)


def _char_width(char: str) -> int:
    """Terminal columns of one character: 0 for a combining mark or a zero-width format
    character, 2 for an East Asian wide or full-width one, else 1."""
    if unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _width(text: str) -> int:
    return sum(_char_width(char) for char in text)


def _clusters(text: str) -> List[str]:
    """``text`` as what a terminal draws in one place: each character with the combining
    marks (and joiners) after it, a leading mark on a dotted circle (it would merge into the
    padding before it). "नमस्ते" is four clusters, not six characters."""
    out: List[str] = []
    for char in text:
        joins = unicodedata.category(char)[0] == "M" or char in "\u200c\u200d"
        if joins and out:
            out[-1] += char
        else:
            out.append("\u25cc" + char if joins else char)
    return out


def _pad(text: str, width: int, *, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` terminal columns (``str.ljust`` counts
    characters: a wide character or a combining mark shifted every column after it)."""
    fill = " " * max(0, width - _width(text))
    return fill + text if right else text + fill


def _shade(weight: float) -> str:
    for start, char in SHADES:
        if weight >= start:
            return char
    return " "


def render_text(amap: AttentionMap, *, max_label: int = 8) -> str:
    """The heat map as text: a row per generated token, two characters per source token.

    Source labels are written vertically above their columns (cut to ``max_label``
    characters); each row ends with the source token it attends to most and that weight.
    """
    cell = 2
    if isinstance(max_label, bool) or not isinstance(max_label, int) or max_label < 1:
        raise ValueError(f"max_label must be a positive integer, got {max_label!r}")
    # (labels made by attention_map are printable already; a hand-made map's may not be)
    sources = [_printable(t) for t in amap.source_tokens]
    targets = [_printable(t) for t in amap.target_tokens]
    # labels drawn vertically, a terminal cluster (a character and its marks) a row
    cut = [_clusters(t) for t in sources]
    cut = [t if len(t) <= max_label else t[:max_label - 1] + ["…"] for t in cut]
    row_width = max([_width(t) for t in targets] + [6])
    height = max([len(t) for t in cut] + [1])
    lines = [f"output: {_printable(amap.output)}", ""]
    for k in range(height):
        header = "".join(_pad(t[k] if k < len(t) else "", cell) for t in cut)
        lines.append(" " * (row_width + 1) + "│" + header.rstrip())
    lines.append(" " * (row_width + 1) + "┼" + "─" * (cell * len(cut)))
    for label, row in zip(targets, amap.weights):
        cells = "".join(_shade(float(w)) * cell for w in row)
        best = int(np.argmax(row)) if row.size else 0
        focus = f"{sources[best]} {float(row[best]):.2f}" if row.size else ""
        lines.append(f"{_pad(label, row_width, right=True)} │{cells}  {focus}")
    legend = "  ".join(f"{char} ≥ {start:.2f}" for start, char in SHADES if char != " ")
    lines += ["", f"rows: generated tokens; columns: source tokens; {legend}"]
    return "\n".join(lines) + "\n"


def matplotlib_available() -> bool:
    """Whether :func:`save_png` can run."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


#: The most tokens labelled along a side of a PNG heat map (and the most the figure grows for).
MAX_LABELS = 120


def _label_positions(count: int) -> list:
    """Every position up to MAX_LABELS, else every k-th (k the smallest that fits)."""
    step = max(1, -(-count // MAX_LABELS))
    return list(range(0, count, step))


def save_png(amap: AttentionMap, path, *, title: Optional[str] = None, dpi: int = 150,
             warn: bool = True) -> List[str]:
    """Write the heat map as a PNG (matplotlib's Agg canvas; the global backend is untouched).

    The default title (the output) is wrapped to the figure's width; a ``title`` given is
    drawn as it is. Returns notes on the drawing, one line each: the characters matplotlib's
    font has no glyph for (drawn as empty boxes; one note for all of them) and matplotlib's
    other warnings, each also issued as a warning unless ``warn=False``.

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install 'attncore[plot]'``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("matplotlib is not installed: pip install 'attncore[plot]'") from None
    rows, cols = amap.weights.shape
    # a third of an inch a token up to MAX_LABELS tokens a side; past that the figure stops
    # growing and every k-th token is labelled (a 2000-token line drew 2000 labels on a
    # 660-inch canvas: 15 s and 2 GB)
    figure = Figure(figsize=(max(4.0, 0.32 * min(cols, MAX_LABELS) + 2.0),
                             max(3.0, 0.32 * min(rows, MAX_LABELS) + 1.6)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(amap.weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                        interpolation="nearest")
    x_at, y_at = _label_positions(cols), _label_positions(rows)
    # tokens and the output are text, never mathtext: "$1-$2" was drawn as math, "$x^$" failed
    plain = {"parse_math": False}
    axes.set_xticks(x_at, [amap.source_tokens[i] for i in x_at], rotation=90, fontsize=8, **plain)
    axes.set_yticks(y_at, [amap.target_tokens[i] for i in y_at], fontsize=8, **plain)
    axes.set_xlabel("source tokens")
    axes.set_ylabel("generated tokens")
    if title is None:
        title = _fit_title(f"cross-attention → {amap.output}", figure.get_figwidth())
    axes.set_title(title, fontsize=9, **plain)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="attention weight")
    # (catch_warnings swaps process-wide state: two threads' blocks interleaving left the
    # filters at "always" for good; heat maps drawn at once take turns here)
    # (a PNG cut short by a full disk or a kill replaced the good one with a truncated file)
    from .io import replaced_whole
    with _DRAWING, warnings.catch_warnings(record=True) as caught, \
            replaced_whole(path) as temporary:
        warnings.simplefilter("always")
        figure.tight_layout()
        figure.savefig(temporary, dpi=dpi, format="png")
    notes = []
    for category, note in _drawing_notes(caught):
        notes.append(note)
        if warn:
            warnings.warn(note, category, stacklevel=2)
    return notes


_DRAWING = threading.Lock()


#: Title lines at most, and the width of a 9-point character in inches (a wide estimate)
TITLE_LINES, TITLE_CHAR_INCHES = 3, 0.075


def _fit_title(title: str, figure_inches: float) -> str:
    """``title`` wrapped to the figure's width, at most TITLE_LINES lines, the last ending in
    "…" when cut (a long output's one-line title ran past both edges of a narrow figure)."""
    width = max(10, int(figure_inches / TITLE_CHAR_INCHES))
    lines = textwrap.wrap(title, width, break_long_words=True, break_on_hyphens=False)
    if len(lines) > TITLE_LINES:
        lines = lines[:TITLE_LINES]
        lines[-1] = lines[-1][:width - 1] + "…"
    return "\n".join(lines)


#: matplotlib's warning for a character its font lacks ("missing from font(s) DejaVu Sans",
#: before 3.6 "missing from current font")
_GLYPH = re.compile(r"Glyph (\d+)\b.*missing from (?:current )?font")


def _drawing_notes(caught) -> List[Tuple[type, str]]:
    """(category, one-line message) of a draw's warnings: matplotlib's "Glyph N missing from
    font" ones (one per character and draw: a CJK label gave 12) as one note naming the
    characters, the others as they came (the command line prints each as one line)."""
    notes, missing = [], []
    for item in caught:
        found = _GLYPH.search(str(item.message))
        if found is None:
            notes.append((item.category, " ".join(str(item.message).split())))
        elif chr(int(found.group(1))) not in missing:
            missing.append(chr(int(found.group(1))))
    if missing:
        notes.append((UserWarning, f"the heat map's font has no glyph for "
                                   f"{''.join(missing)!r}: drawn as empty boxes (matplotlib's "
                                   f"rcParams['font.family'] can name a font that has them)"))
    return notes
