"""Vocab and BPEVocab: special ids, encode/decode, JSON round trips."""
import json
import re

import pytest

from attncore.data import Vocab, load_vocab
from attncore.data.task import pad_sequences


def test_special_ids_fixed():
    v = Vocab("abc", level="char")
    assert (v.pad, v.bos, v.eos, v.unk) == (0, 1, 2, 3)
    assert v.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert len(v) == 7


def test_encode_decode_char():
    v = Vocab("0123456789-", level="char")
    ids = v.encode("2019-03-07", add_bos=True, add_eos=True)
    assert ids[0] == v.bos and ids[-1] == v.eos and len(ids) == 12
    assert v.decode(ids + [v.pad, v.pad]) == "2019-03-07"
    assert v.encode("2x") == [v.token_to_id("2"), v.unk]
    # decoding stops at the first eos, as for generated rows
    assert v.decode([v.bos] + v.encode("12") + [v.eos] + v.encode("34")) == "12"
    assert v.decode([v.bos, v.eos], strip_special=False) == "<bos><eos>"


def test_encode_word_level_and_token_lists():
    v = Vocab.build(["the cat sat", "the dog"], level="word")
    assert v.tokens[4] == "the"  # most frequent first
    assert v.encode("the cat") == v.encode(["the", "cat"])
    assert v.decode(v.encode("the dog sat")) == "the dog sat"
    assert v.encode("a cow") == [v.unk, v.unk]


def test_build_order_independent_and_min_freq():
    a = Vocab.build(["aab", "bc"], level="char", min_freq=2)
    b = Vocab.build(["bc", "aab"], level="char", min_freq=2)
    assert a == b
    assert a.tokens[4:] == ["a", "b"]  # 'c' seen once is left out; ties sort by token


def test_vocab_json_round_trip(tmp_path):
    v = Vocab.build(["héllo wörld", "ünïcode"], level="char")
    path = tmp_path / "vocab.json"
    v.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "attncore.vocab" and data["version"] == 2
    for loaded in (Vocab.load(path), load_vocab(path)):
        assert loaded == v
        assert loaded.encode("wörld") == v.encode("wörld")


def test_vocab_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(["a", "a"])
    with pytest.raises(ValueError, match="level"):
        Vocab("ab", level="byte")
    with pytest.raises(ValueError, match="spaces"):
        Vocab(["a b"], level="word")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "attncore.vocab", "version": 1, "level": "char",
                               "tokens": ["a", "b", "c", "d"]}))
    with pytest.raises(ValueError, match="start with"):
        Vocab.load(bad)
    with pytest.raises(IndexError):
        Vocab("ab").id_to_token(99)


def test_pad_sequences():
    ids, lengths = pad_sequences([[5, 6, 7], [8]])
    assert ids.dtype.name == "int64" and lengths.dtype.name == "int64"
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]


def test_bpe_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab

    texts = ["the cat sat on the mat.", "the dog sat on the log!", "a cat and a dog?"] * 20
    v = BPEVocab.train(texts, vocab_size=120, min_frequency=2)
    assert [v.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    ids = v.encode("the cat sat on the log.", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert v.decode(ids + [0, 0]) == "the cat sat on the log."
    path = tmp_path / "tokenizer.json"
    v.save(path)
    for loaded in (BPEVocab.load(path), load_vocab(path)):
        assert isinstance(loaded, BPEVocab) and loaded == v
        assert loaded.encode("a dog and a cat.") == v.encode("a dog and a cat.")


@pytest.mark.parametrize("bad", ["negative", "size", "huge"])
def test_both_vocabularies_refuse_ids_outside_them_alike(bad):
    # BPEVocab.decode dropped an unknown id silently and id_to_token(-1) raised OverflowError
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab
    texts = ["the cat sat on the mat.", "the dog sat on the log!", "a cat and a dog?"] * 20
    bpe = BPEVocab.train(texts, vocab_size=120, min_frequency=2)
    chars = Vocab(list("abcdefghijklmnopqrstuvwxyz"), level="char")
    for vocab in (bpe, chars):
        size = len(vocab)
        wrong = {"negative": -1, "size": size, "huge": 2 ** 40}[bad]
        with pytest.raises(IndexError, match=rf"token id {wrong} outside \[0, {size}\)"):
            vocab.id_to_token(wrong)
        with pytest.raises(IndexError, match=rf"token id {wrong} outside \[0, {size}\)"):
            vocab.decode([5, wrong])
        assert vocab.decode([5, vocab.eos, wrong]) == vocab.decode([5])   # (past the end)


def test_strict_encoding_names_the_characters_a_bpe_vocabulary_does_not_know():
    # BPE spells an unknown character "<unk>", which the strict check skipped as a literal
    # "<unk>": a line with a character outside the vocabulary then ran with <unk> ids
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab
    from attncore.tokenizer import Tokenizer
    v = BPEVocab.train(["hello world", "hello there", "world peace"] * 5, vocab_size=60,
                       min_frequency=1)
    tokenizer = Tokenizer(v, v)
    with pytest.raises(ValueError, match="missing from the source vocabulary: \\['☃'\\]"):
        tokenizer.encode_source("hello \u2603 world", strict=True)
    assert v.unknown_pieces("hello \u2603 world \u2604") == ["\u2603", "\u2604"]
    tokenizer.encode_source("hello world", strict=True)        # all known: no error


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_special_token_spellings_in_text_are_text(kind):
    # "<eos>" typed by a user encoded to the control id: an EOS or a PAD (a RAN's "no token")
    # in the middle of a source. Text never yields ids 0-2; a token list still names them.
    if kind == "bpe":
        pytest.importorskip("tokenizers")
        from attncore.data.bpe import BPEVocab
        v = BPEVocab.train(["hello world <x>", "hello there", "world peace"] * 5,
                           vocab_size=60, min_frequency=1)
    else:
        v = Vocab.build(["hello world", "hello there"], level="word")
    text = "hello <eos> world <pad> <bos> <unk> there"
    ids = v.encode(text, add_bos=True, add_eos=True)
    inner = ids[1:-1]
    assert ids[0] == v.bos and ids[-1] == v.eos
    assert not {v.pad, v.bos, v.eos} & set(inner), inner
    if kind == "word":
        assert inner == [4, 3, v.token_to_id("world"), 3, 3, 3, v.token_to_id("there")]
        assert v.encode(["hello", "<eos>"]) == [4, v.eos]     # token lists: as given
    else:
        assert "<" in v.tokenize(text)                        # split like other characters


def test_strict_encoding_refuses_a_literal_unk_typed_in_text():
    from attncore.tokenizer import Tokenizer
    v = Vocab.build(["hello world"], level="word")
    tokenizer = Tokenizer(v, v)
    with pytest.raises(ValueError, match=r"missing from the source vocabulary: \['<unk>'\]"):
        tokenizer.encode_source("hello <unk> world", strict=True)
    ids = tokenizer.encode_source("hello <eos> world")
    assert list(ids) == [4, 3, 5, 2]           # the one EOS is the appended one


def _bpe_file(tmp_path, change):
    """A trained BPE vocabulary's JSON, changed by ``change(data)``, written to a file."""
    from attncore.data.bpe import BPEVocab
    texts = ["the cat sat on the mat.", "the dog sat on the log!"] * 20
    data = BPEVocab.train(texts, vocab_size=60, min_frequency=2).to_dict()
    change(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path


def _set(key, value):
    return lambda data: data.__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    # a Replace with a long content multiplied the text: 10^7 ids from 100 characters, and an
    # OOM kill at 1000
    (_set("normalizer", {"type": "Replace", "pattern": {"String": "a"}, "content": "t " * 500}),
     "is longer than what it replaces"),
    # chained, or from an empty pattern (between every character), short ones grew it too:
    # x2 (or x17) a step
    (_set("normalizer", {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": "a"}, "content": "aa"}] * 12}),
     "Replace content 'aa' is longer than what it replaces"),
    (_set("normalizer", {"type": "Replace", "pattern": {"String": ""}, "content": "x"}),
     "Replace pattern must hold 1 to 16 characters"),
    (_set("normalizer", {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] * 33}),
     "Sequence must list at most 32 pieces"),
    (_set("model", "BPE"), "tokenizer model must be BPE, got 'BPE'"),   # (an AttributeError)
    (_set("normalizer", {"type": "Replace", "pattern": "a", "content": ""}),
     "Replace needs a string or regex pattern"),
    # a backtracking regex: minutes a line, or a Rust panic that escapes ``except Exception``
    (_set("pre_tokenizer", {"type": "Split", "pattern": {"Regex": "(a+)+b"},
                            "behavior": "Isolated", "invert": False}),
     "pre_tokenizer 'Split' is not supported"),
    (_set("normalizer", {"type": "Replace", "pattern": {"Regex": "(a|a){1,22}b"},
                         "content": ""}), "Replace regex '(a|a){1,22}b' is not supported"),
    # a Rust panic while parsing
    (_set("normalizer", {"type": "Precompiled", "precompiled_charsmap": "AAAA"}),
     "normalizer 'Precompiled' is not supported"),
    # honoured silently: the model read other ids than the text's
    (_set("truncation", {"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
                         "stride": 0}), "tokenizer has truncation settings"),
    (_set("padding", {"strategy": {"Fixed": 16}, "direction": "Left", "pad_to_multiple_of": None,
                      "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}),
     "tokenizer has padding settings"),
    (lambda data: data["model"].__setitem__("dropout", 0.9), "BPE dropout 0.9"),
    (lambda data: data["model"].__setitem__("type", "WordPiece"), "model must be BPE"),
    # malformed: a bare Exception naming no file
    (lambda data: data["model"].pop("merges"), "not a tokenizers JSON file: Missing vocab/merges"),
    (lambda data: data["model"]["vocab"].__setitem__("sat", 2 ** 40),
     "not a tokenizers JSON file: invalid value"),
])
def test_bpe_files_are_refused_where_they_would_cost_or_change_the_ids(tmp_path, change, message):
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab
    path = _bpe_file(tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(message)):
        BPEVocab.load(path)


def test_bpe_ids_with_a_gap_are_refused(tmp_path):
    # an id past the gap passed the size check and decoded as nothing ('cat sat cat' -> 'cat cat')
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab

    def gap(data):
        vocab = data["model"]["vocab"]
        token = max(vocab, key=vocab.get)
        vocab[token] += 5
    with pytest.raises(ValueError, match="ids must be 0..[0-9]+ without gaps"):
        BPEVocab.load(_bpe_file(tmp_path, gap))
    # the translation task's own normalizer (a whitespace regex) still loads
    from attncore.data.translation import tokenizer_normalizer
    texts = ["The  cat\u202fsat.", "the dog sat!"] * 20
    trained = BPEVocab.train(texts, vocab_size=60, normalizer=tokenizer_normalizer(True))
    trained.save(tmp_path / "t.json")
    assert BPEVocab.load(tmp_path / "t.json") == trained


def test_a_word_vocabulary_repeating_a_special_token_is_refused(tmp_path):
    # the constructor skips specials: 'b' after a second '<eos>' got id 5, not 6
    data = Vocab("ab", level="char").to_dict()
    data["tokens"] = data["tokens"][:5] + ["<eos>"] + data["tokens"][5:]
    with pytest.raises(ValueError, match=re.escape("repeats the special tokens ['<eos>']")):
        Vocab.from_dict(data)


def test_bpe_training_refuses_a_normalizer_a_model_directory_could_not_hold(monkeypatch):
    # it trained fully, then refused the result
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, normalizers
    from attncore.data.bpe import BPEVocab
    trained = []
    monkeypatch.setattr(Tokenizer, "train_from_iterator",
                        lambda self, *a, **k: trained.append(1), raising=False)
    with pytest.raises(ValueError, match="normalizer 'BertNormalizer' is not supported"):
        BPEVocab.train(["a b c"] * 5, vocab_size=30, normalizer=normalizers.BertNormalizer())
    assert trained == []


def test_words_level_keeps_combining_marks_inside_their_words():
    # (\w alone read Devanagari vowel signs and viramas as punctuation: "नमस्ते" was six
    # tokens and decoded as "नमस ् त े")
    from attncore.data.vocab import tokenize_words

    text = "नमस्ते दुनिया"
    assert tokenize_words(text) == ["नमस्ते", "दुनिया"]
    vocab = Vocab.build([text], level="words")
    assert vocab.decode(vocab.encode(text)) == text
    # a zero-width joiner inside a word, Hebrew points, and punctuation still split off
    assert tokenize_words("क्\u200dष, שָׁלוֹם!") == ["क्\u200dष", ",", "שָׁלוֹם", "!"]


@pytest.mark.parametrize("level", ["char", "word", "words", "bpe"])
def test_decomposed_accents_read_as_the_composed_characters(level):
    # (text in NFD -- "e" then U+0301, from macOS or a PDF -- was <unk> at every level)
    composed = "le café est ouvert. " * 3
    decomposed = composed.replace("é", "e\u0301")
    if level == "bpe":
        pytest.importorskip("tokenizers")
        from attncore.data.bpe import BPEVocab, text_normalizer
        vocab = BPEVocab.train([composed] * 5, vocab_size=60, normalizer=text_normalizer())
    else:
        vocab = Vocab.build([composed], level=level)
    assert vocab.encode(decomposed) == vocab.encode(composed)
    assert vocab.unk not in vocab.encode(decomposed)


def test_a_version_1_vocabulary_keeps_the_rules_it_was_built_with(tmp_path):
    # (version 2 reads NFC and keeps combining marks in words: applied to a file saved before,
    # an exported Hindi classifier read every word as <unk>, and a character model built on
    # decomposed text its accents)
    hindi = "नमस्ते दुनिया"
    old_words = re.findall(r"\w+|[^\w\s]", hindi.lower())
    nfd = "cafe\u0301"
    for level, tokens, text in (("words", old_words, hindi), ("char", list(nfd), nfd)):
        path = tmp_path / f"{level}.json"
        path.write_text(json.dumps({"format": "attncore.vocab", "version": 1, "level": level,
                                    "tokens": ["<pad>", "<bos>", "<eos>", "<unk>"] + tokens}),
                        encoding="utf-8")
        vocab = load_vocab(path)
        assert vocab.version == 1 and vocab.unk not in vocab.encode(text)
        vocab.save(tmp_path / "again.json")   # (saved again as what it is)
        assert json.loads((tmp_path / "again.json").read_text())["version"] == 1
    assert Vocab.build([hindi], level="words").version == 2


@pytest.mark.parametrize("level", ["char", "bpe"])
def test_a_lone_surrogate_is_a_value_error_naming_it(level):
    # (a BPE vocabulary raised tokenizers' "TypeError: TextInputSequence must be str")
    if level == "bpe":
        pytest.importorskip("tokenizers")
        from attncore.data.bpe import BPEVocab
        vocab = BPEVocab.train(["abcd"] * 5, vocab_size=40)
    else:
        vocab = Vocab.build(["abcd"], level=level)
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 2"):
        vocab.encode("ab\ud800cd")
    # (the index is the text's own: NFC shortened the text before it was read)
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 4"):
        vocab.encode("e\u0301ab\ud800")


def test_bpe_text_normalizer_reads_any_whitespace_run_as_one_space():
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab, text_normalizer

    vocab = BPEVocab.train(["the cat sat on the mat."] * 5, vocab_size=60,
                           normalizer=text_normalizer())
    plain = vocab.tokenize("the cat sat.")
    assert plain == ["▁the", "▁cat", "▁sat", "."]
    for spaced in ("the\tcat sat.", "the\u00a0cat sat.", "the  cat\n sat. "):
        assert vocab.tokenize(spaced) == plain


def test_a_bpe_token_list_looks_unknown_pieces_up_as_unk():
    # (as Vocab.encode of a token list: a piece the vocabulary lacks is <unk>, never None)
    pytest.importorskip("tokenizers")
    from attncore.data.bpe import BPEVocab
    v = BPEVocab.train(["the cat sat on the mat."] * 20, vocab_size=60, min_frequency=2)
    pieces = v.tokenize("the cat")
    assert v.encode(pieces + ["no such piece"], add_eos=True) == \
        v.encode("the cat") + [v.unk, v.eos]
