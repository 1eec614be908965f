"""Vocab and BPEVocab: special ids, encode/decode, JSON round trips."""
import json

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
    assert data["format"] == "attncore.vocab" and data["version"] == 1
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
