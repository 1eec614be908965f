# SPDX-License-Identifier: Apache-2.0
"""attncore.heatmap: labelled cross-attention of the bundled dates model, text and PNG output."""
import os

import numpy as np
import pytest

import attncore
from attncore import heatmap

DATES = os.path.join(os.path.dirname(os.path.abspath(attncore.__file__)), "assets", "dates")


@pytest.fixture(scope="module")
def amap():
    from attncore import models
    model = models.load(DATES)
    return heatmap.attention_map(model, model.tokenizer.encode_source("3 March 1998"))


def test_attention_map_labels_and_rows(amap):
    assert amap.output == "1998-03-03"
    assert amap.source_tokens == list("3␣March␣1998") + ["<eos>"]
    assert amap.target_tokens == list("1998-03-03") + ["<eos>"]
    assert amap.weights.shape == (11, 13) and amap.weights.dtype == np.float32
    np.testing.assert_allclose(amap.weights.sum(axis=1), 1.0, rtol=1e-5)
    # the year digits are copied: "9" "9" "8" attend most to the source's "9" "9" "8"
    assert [amap.source_tokens[j] for j in amap.weights[1:4].argmax(axis=1)] == ["9", "9", "8"]


def test_render_text_shades_each_cell(amap):
    text = heatmap.render_text(amap)
    rows = [line for line in text.splitlines() if "│" in line and line.split("│")[0].strip()]
    assert len(rows) == 11
    width = 2 * len(amap.source_tokens)
    for row, weights in zip(rows, amap.weights):
        cells = row.split("│", 1)[1][:width]
        assert cells[::2] == "".join(heatmap._shade(w) for w in weights)


def test_shades():
    assert [heatmap._shade(w) for w in (0.0, 0.04, 0.05, 0.3, 0.6, 0.75, 1.0)] == \
        [" ", " ", "░", "▒", "▓", "█", "█"]


def test_attention_map_passes_the_search_options_on():
    # --length-penalty of `attncore attention` was accepted and never reached the search
    from attncore import models
    model = models.load(DATES)
    source = model.tokenizer.encode_source("3 March 1998")
    for penalty in (0.0, 2.0):
        amap = heatmap.attention_map(model, source, beam_size=3, length_penalty=penalty)
        best = model.generate([source], max_length=2 * len(source) + 10, beam_size=3,
                              length_penalty=penalty, return_attention=True)[0]
        np.testing.assert_array_equal(amap.weights, best.attention[0])
    with pytest.raises(ValueError, match="length_penalty"):
        heatmap.attention_map(model, source, beam_size=3, length_penalty=100.0)
    # (on this input every penalty picks the same best hypothesis: what reaches generate is
    # checked directly)
    calls = []
    plain_generate = model.generate
    model.generate = lambda sources, **options: calls.append(options) or plain_generate(sources, **options)
    heatmap.attention_map(model, source, beam_size=3, length_penalty=2.0, max_length=15,
                          no_repeat_ngram_size=2)
    assert calls == [dict(max_length=15, beam_size=3, length_penalty=2.0, return_attention=True,
                          no_repeat_ngram_size=2)]


def test_attention_map_checks_shapes():
    with pytest.raises(ValueError, match="labels give"):
        heatmap.AttentionMap(["a", "b"], ["x"], np.zeros((1, 3)))


def test_save_png(amap, tmp_path):
    pytest.importorskip("matplotlib")
    heatmap.save_png(amap, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_long_lines_label_every_kth_token_on_a_bounded_figure(tmp_path):
    # a 2000-token line drew 2000 labels on a 660-inch canvas (15 s, 2 GB); now at most
    # MAX_LABELS a side, evenly spaced from the first token
    assert heatmap._label_positions(5) == [0, 1, 2, 3, 4]
    at = heatmap._label_positions(2081)
    assert len(at) <= heatmap.MAX_LABELS and at[0] == 0 and len(set(np.diff(at))) == 1
    assert heatmap._label_positions(heatmap.MAX_LABELS) == list(range(heatmap.MAX_LABELS))
    pytest.importorskip("matplotlib")
    amap = heatmap.AttentionMap([f"s{i}" for i in range(1500)], ["a", "b"],
                                np.full((2, 1500), 1 / 1500), output="x")
    heatmap.save_png(amap, tmp_path / "long.png", dpi=50)
    assert (tmp_path / "long.png").stat().st_size > 0


def test_tokens_with_dollar_signs_are_drawn_as_text(tmp_path):
    # matplotlib read "$...$" in a label or the title as mathtext: "$1-$2" drew "1-", and
    # "$x^$" failed with a pyparsing error
    pytest.importorskip("matplotlib")
    amap = heatmap.AttentionMap(["$x^$", "$1-$2"], ["$", "b"], np.full((2, 2), 0.5),
                                output="$x^$ costs $1-$2")
    heatmap.save_png(amap, tmp_path / "dollars.png", dpi=50)
    assert (tmp_path / "dollars.png").read_bytes()[:4] == b"\x89PNG"


def test_a_long_title_is_wrapped_to_the_figure():
    # (a 59-character output's one-line title ran past both edges of a 4-inch figure)
    title = "cross-attention → " + "the quick brown fox jumps over the lazy dog " * 9
    fitted = heatmap._fit_title(title, 4.0)
    width = int(4.0 / heatmap.TITLE_CHAR_INCHES)
    lines = fitted.split("\n")
    assert len(lines) == heatmap.TITLE_LINES and all(len(line) <= width for line in lines)
    assert lines[-1].endswith("…") and lines[0].startswith("cross-attention → the quick")
    assert heatmap._fit_title("cross-attention → 1998-03-03", 4.0) == \
        "cross-attention → 1998-03-03"
    assert "…" not in heatmap._fit_title("a" * 120, 4.0)   # (3 lines of 53: not cut)


def test_missing_glyphs_are_one_warning(tmp_path):
    # matplotlib's default font has no CJK glyphs: it warned once per character and draw (12
    # warnings for two labels), each two lines on the command line's stderr
    pytest.importorskip("matplotlib")
    import warnings
    amap = heatmap.AttentionMap(["▁東京", "<eos>"], ["▁大阪", "<eos>"], np.full((2, 2), 0.5),
                                output="大阪")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notes = heatmap.save_png(amap, tmp_path / "cjk.png", dpi=50)
    messages = [str(item.message) for item in caught]
    assert not [m for m in messages if m.startswith("Glyph")], messages
    assert messages == notes and len(notes) <= 1   # (none where the font has the glyphs)
    if notes:
        assert "no glyph for '東京大阪'" in notes[0]
    assert (tmp_path / "cjk.png").read_bytes()[:4] == b"\x89PNG"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert heatmap.save_png(amap, tmp_path / "cjk.png", dpi=50, warn=False) == notes
    assert not caught


@pytest.mark.parametrize("message", [
    "Glyph 26481 (\\N{CJK UNIFIED IDEOGRAPH-6771}) missing from font(s) DejaVu Sans.",
    "Glyph 26481 missing from current font.",   # (matplotlib before 3.6)
])
def test_both_wordings_of_the_missing_glyph_warning_are_grouped(message):
    import warnings
    caught = [warnings.WarningMessage(UserWarning(message), UserWarning, "f.py", 1)] * 2
    other = warnings.WarningMessage(UserWarning("Tight layout not\napplied."), UserWarning,
                                    "f.py", 2)
    assert heatmap._drawing_notes(caught + [other]) == [
        (UserWarning, "Tight layout not applied."),   # (one line, as the command prints it)
        (UserWarning, "the heat map's font has no glyph for '東': drawn as empty boxes "
                      "(matplotlib's rcParams['font.family'] can name a font that has them)")]


def test_a_title_given_is_drawn_as_it_is(tmp_path, monkeypatch):
    # (the default title is wrapped to the figure; a caller's lost its own line breaks)
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda self, text, **kw: titles.append(text))
    amap = heatmap.AttentionMap(["a", "b"], ["x", "y"], np.full((2, 2), 0.5), output="x y")
    heatmap.save_png(amap, tmp_path / "t.png", dpi=50, title="Model A\nbeam 4, sentence 12")
    assert titles == ["Model A\nbeam 4, sentence 12"]


@pytest.mark.parametrize("source, error, match", [
    ([True, False], TypeError, "source must hold integer token ids, got dtype bool"),
    (np.array([4.9, 5.2]), TypeError, "source must hold integer token ids, got dtype float64"),
    ("3 March", TypeError, "source must be token ids, got a string"),
    ([], ValueError, "source is empty"),
    ([[4, 5]], ValueError, r"source must be 1-d, got shape \(1, 2\)"),
    ([4, 10**6], ValueError, r"source has token id 1000000 outside \[0, "),
])
def test_attention_map_names_a_bad_source(source, error, match):
    # a cast to int64 truncated floats and read bools as ids 1 and 0: a map of other tokens
    from attncore import models
    with pytest.raises(error, match=match):
        heatmap.attention_map(models.load(DATES), source)


def test_unprintable_token_characters_are_escaped_not_sent_to_the_terminal():
    # a vocabulary token holding ESC or a direction override reached the terminal raw
    assert heatmap._label("\x1b[31m") == "\\x1b[31m"
    assert heatmap._label("\u202eabc") == "\\u202eabc"
    assert heatmap._label("a b\r") == "a␣b\\r"
    assert heatmap._label("März") == "März" and heatmap._label("") == "∅"
    text = heatmap.render_text(heatmap.AttentionMap(["\x1b[2J", "b"], ["c"], np.full((1, 2), 0.5)))
    assert "\x1b" not in text
    with pytest.raises(ValueError, match="max_label"):
        heatmap.render_text(heatmap.AttentionMap(["a"], ["c"], np.ones((1, 1))), max_label=0)


def _columns(text):
    """Terminal columns of ``text`` (wide characters 2, combining marks 0)."""
    import unicodedata
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_text_map_columns_stay_aligned_with_wide_characters_and_marks():
    # (str.ljust counts characters: under a "日" label every later column moved one to the
    # right, so the weight of "b" was drawn under "a"; a lone combining mark merged into the
    # space before it)
    amap = heatmap.AttentionMap(["日", "本", "a", "\u0301", "b"], ["x", "日本"],
                                np.array([[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]], np.float32), "o")
    lines = heatmap.render_text(amap).splitlines()
    header, row_x, row_wide = lines[2], lines[4], lines[5]
    bar = {_columns(line[:line.index("│")]) for line in (header, row_x, row_wide)}
    assert len(bar) == 1   # the row labels "x" and "日本" padded to the same width
    start = bar.pop() + 1
    # the shade of "b" (column 4, two terminal columns a source token) sits under "b"
    assert _columns(header[:header.index("b")]) == start + 2 * 4
    assert _columns(row_x[:row_x.index("█")]) == start + 2 * 4
    assert "\u25cc\u0301" in header   # a lone mark on a dotted circle


def test_a_multi_head_models_weights_are_averaged_over_its_heads():
    # (steps, heads, S) attention is drawn as each step's mean over the heads
    from types import SimpleNamespace
    weights = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 2)).astype(np.float32)

    class Heads:
        tokenizer = None

        def generate(self, sources, **options):
            return [SimpleNamespace(tokens=[5, 6], attention=[weights])]
    amap = heatmap.attention_map(Heads(), [7, 8, 9])
    np.testing.assert_allclose(amap.weights, weights.mean(axis=1), rtol=1e-6)
    assert amap.source_tokens == ["7", "8", "9", "<eos>"]
    assert amap.target_tokens == ["5", "6", "<eos>"] and amap.output == "5 6"


def test_whitespace_in_labels_is_drawn_visibly():
    assert heatmap._label("a\tb c\n") == "a⇥b␣c⏎"
