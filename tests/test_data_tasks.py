"""Task registry, toy tasks and the batch contract shared by all seq2seq tasks."""
import numpy as np
import pytest

from attncore.data import get_task, list_tasks, register_task


def test_registry_lists_and_rejects():
    assert {"dates", "copy", "reverse", "sort", "translation", "kjv"} <= set(list_tasks())
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nope")


def test_register_task():
    register_task("tiny_copy", lambda seed=0, **o: get_task("copy", seed, num_train=5, **o))
    assert get_task("tiny_copy", num_valid=2, num_test=2).num_examples("train") == 5


@pytest.mark.parametrize("kind", ["copy", "reverse", "sort"])
def test_toy_targets(kind):
    task = get_task(kind, seed=3, num_train=200, num_valid=20, num_test=20, max_len=6)
    for src, tgt in task.examples("train"):
        s = [int(x) for x in src.split()]
        t = [int(x) for x in tgt.split()]
        expected = {"copy": s, "reverse": s[::-1], "sort": sorted(s)}[kind]
        assert t == expected
        assert 2 <= len(s) <= 6 and all(0 <= x < 10 for x in s)


def test_toy_deterministic_and_held_out():
    a = get_task("reverse", seed=1, num_train=300)
    b = get_task("reverse", seed=1, num_train=300)
    c = get_task("reverse", seed=2, num_train=300)
    assert a.examples("train") == b.examples("train")
    assert a.examples("train") != c.examples("train")
    held = {s for s, _ in a.examples("test")} | {s for s, _ in a.examples("valid")}
    assert not held & {s for s, _ in a.examples("train")}


def test_toy_impossible_request():
    with pytest.raises(ValueError, match="too small"):
        get_task("copy", num_symbols=2, min_len=1, max_len=1, num_test=5).examples("test")


def test_seq2seq_batch_contract():
    task = get_task("copy", seed=0, num_train=50, num_valid=10, num_test=10)
    batches = list(task.batches("train", 16))
    assert [b.src_ids.shape[0] for b in batches] == [16, 16, 16, 2]
    assert len(list(task.batches("train", 16, drop_last=True))) == 3
    pairs = task.examples("train")
    row = 0
    for src_ids, src_len, tgt_ids, tgt_len in batches:
        for arr in (src_ids, src_len, tgt_ids, tgt_len):
            assert arr.dtype == np.int64
        assert src_ids.shape[1] == src_len.max() and tgt_ids.shape[1] == tgt_len.max()
        for i in range(src_ids.shape[0]):
            src, tgt = pairs[row]
            n, m = src_len[i], tgt_len[i]
            assert src_ids[i, n - 1] == task.src_vocab.eos and np.all(src_ids[i, n:] == 0)
            assert tgt_ids[i, 0] == task.tgt_vocab.bos and tgt_ids[i, m - 1] == task.tgt_vocab.eos
            assert np.all(tgt_ids[i, m:] == 0)
            assert n == len(src.split()) + 1 and m == len(tgt.split()) + 2
            assert task.src_vocab.decode(src_ids[i]) == src
            assert task.decode_tgt(tgt_ids[i]) == tgt
            row += 1


def test_shuffle_is_seeded_permutation():
    task = get_task("sort", seed=0, num_train=40, num_valid=5, num_test=5)

    def rows(**kw):
        return [tuple(r[:l]) for b in task.batches("train", 7, **kw) for r, l in zip(b.src_ids, b.src_lengths)]

    plain = rows()
    s1, s2, s3 = rows(shuffle=True, seed=5), rows(shuffle=True, seed=5), rows(shuffle=True, seed=6)
    assert s1 == s2 and s1 != s3 and s1 != plain
    assert sorted(s1) == sorted(plain)


def test_bad_split_and_batch_size():
    task = get_task("copy", num_train=10, num_valid=2, num_test=2)
    with pytest.raises(ValueError, match="split"):
        task.examples("dev")
    with pytest.raises(ValueError, match="batch_size"):
        next(task.batches("train", 0))


def test_each_toy_kind_draws_its_own_sources():
    # the stream was keyed by len(kind): copy and sort drew the same source lists
    sources = {kind: [s for s, _ in get_task(kind, seed=0, num_train=50, num_valid=5,
                                              num_test=5).examples("train")]
               for kind in ("copy", "reverse", "sort")}
    assert sources["copy"] != sources["sort"] and sources["copy"] != sources["reverse"]
    assert sources["sort"] != sources["reverse"]


def test_drop_last_keeps_every_full_batch():
    task = get_task("copy", seed=0, num_train=48, num_valid=4, num_test=4)
    assert [len(b.src_ids) for b in task.batches("train", 16, drop_last=True)] == [16, 16, 16]
    assert [len(b.src_ids) for b in task.batches("train", 20, drop_last=True)] == [20, 20]
