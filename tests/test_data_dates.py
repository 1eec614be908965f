"""The dates task: ISO labels, formats, two-digit years, ambiguity, splits, determinism."""
import datetime as dt
import re

import pytest

babel = pytest.importorskip("babel")

from attncore.data import get_task  # noqa: E402
from attncore.data.dates import (AMBIGUOUS_READING, LOCALES, DateFormat, date_formats,  # noqa: E402
                                 is_ambiguous, render_date)

SIZES = dict(num_train=3000, num_valid=400, num_test=400)


@pytest.fixture(scope="module")
def task():
    return get_task("dates", seed=0, **SIZES)


def test_labels_are_iso_of_the_date(task):
    for split in ("train", "valid", "test"):
        for rec in task.records(split):
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", rec.tgt)
            assert dt.date.fromisoformat(rec.tgt) == rec.date
            assert dt.date(1000, 1, 1) <= rec.date <= dt.date(2999, 12, 31)
            assert rec.src.lower() == render_date(rec.date, _fmt(rec), rec.locale).lower()


def _fmt(rec):
    return DateFormat(rec.pattern, rec.locale, "")


def test_spelled_out_inputs_name_the_right_day_and_month(task):
    # Independent of babel: the month and weekday words of the input match the label's date.
    months = [dt.date(2001, m, 1).strftime("%B").lower() for m in range(1, 13)]
    days = [dt.date(2001, 1, d).strftime("%A").lower() for d in range(1, 8)]  # Mon..Sun
    checked = 0
    for rec in task.records("train"):
        words = re.findall(r"[a-z]+", rec.src.lower())
        named_months = {m for m, name in enumerate(months, 1)
                        for w in words if len(w) >= 3 and name.startswith(w)}
        named_days = {d for d, name in enumerate(days) for w in words
                      if len(w) >= 3 and name.startswith(w)}
        if "MMM" in rec.pattern:
            assert named_months == {rec.date.month}, rec
            checked += 1
        if "EEE" in rec.pattern:
            assert named_days == {rec.date.weekday()}, rec
        assert str(rec.date.year) in rec.src or "yy" in rec.pattern.replace("yyyy", "")
    assert checked > 1000


def test_two_digit_years_only_in_1950_2049(task):
    two_digit = [r for s in ("train", "valid", "test") for r in task.records(s)
                 if _fmt(r).two_digit_year]
    assert len(two_digit) > 100
    for rec in two_digit:
        assert 1950 <= rec.date.year <= 2049
        yy = int(re.findall(r"\d+", rec.src)[-1])  # the year is the last number in those formats
        assert yy == rec.date.year % 100
        assert (1900 if yy >= 50 else 2000) + yy == rec.date.year


def test_no_week_year_patterns():
    for fmt in date_formats():
        assert "Y" not in re.sub(r"'[^']*'", "", fmt.pattern)
    # the pitfall itself: week-year 'YYY' would give 2020 for 2019-12-30
    assert render_date(dt.date(2019, 12, 30), DateFormat("d MMM y", "en_US", "")) == "30 Dec 2019"


def test_all_locale_standard_formats_present(task):
    names = {f.name for f in task.formats}
    for loc in LOCALES:
        for length in ("short", "medium", "long", "full"):
            assert f"{loc}/{length}" in names
    used = {(r.pattern, r.locale) for r in task.records("train")}
    assert {(f.pattern, f.locale) for f in task.formats if f.locale} <= used
    srcs = {r.src for r in task.records("train")}
    assert any(re.fullmatch(r"\w+ \d{1,2}(st|nd|rd|th), \d{4}", s) for s in srcs)  # March 3rd, 1998
    assert any(re.fullmatch(r"\w{3} \d{1,2} \w{3,4} \d{4}", s) for s in srcs)      # Tue 3 Mar 1998


def test_is_ambiguous():
    assert is_ambiguous("04/10/1885") and is_ambiguous("4.10.85") and is_ambiguous("10-04-1885")
    assert not is_ambiguous("13/10/1885")   # 13 is no month
    assert not is_ambiguous("03/03/98")     # both readings agree
    assert not is_ambiguous("1885-04-10")   # year first: ISO order
    assert not is_ambiguous("4 Oct 1885")
    assert not is_ambiguous("18850410")


def test_ambiguous_inputs_have_one_reading(task):
    labels = {}
    for rec in task.records("train"):
        labels.setdefault(rec.src, set()).add(rec.tgt)
        if is_ambiguous(rec.src):
            sep = re.search(r"[/.\-]", rec.src).group(0)
            assert _fmt(rec).numeric_order == AMBIGUOUS_READING[sep]
    assert all(len(v) == 1 for v in labels.values())
    assert sum(is_ambiguous(r.src) for r in task.records("train")) > 20
    for split in ("valid", "test"):
        assert not any(is_ambiguous(s) for s, _ in task.examples(split))


def test_splits_have_disjoint_dates(task):
    dates = {s: {r.date for r in task.records(s)} for s in ("train", "valid", "test")}
    assert not dates["train"] & dates["test"]
    assert not dates["train"] & dates["valid"]
    assert not dates["valid"] & dates["test"]


def test_deterministic_from_seed(task):
    again = get_task("dates", seed=0, **SIZES)
    assert again.examples("train")[:500] == task.examples("train")[:500]
    assert again.examples("test") == task.examples("test")
    other = get_task("dates", seed=1, num_train=500, num_valid=10, num_test=10)
    assert other.examples("train")[:50] != task.examples("train")[:50]
    assert other.src_vocab == task.src_vocab  # the alphabet does not depend on the seed


def test_vocab_covers_inputs_and_batches(task):
    unk = task.src_vocab.unk
    for split in ("train", "test"):
        for src_ids, src_len, tgt_ids, tgt_len in task.batches(split, 256):
            assert not (src_ids == unk).any() and not (tgt_ids == unk).any()
            assert (tgt_len == 12).all()
    assert len(task.tgt_vocab) == 4 + 11
    assert max(len(s) for s, _ in task.examples("train")) < 40


def test_case_variants_optional():
    plain = get_task("dates", seed=0, num_train=300, num_valid=10, num_test=10, case_variants=False)
    assert all(r.src == render_date(r.date, _fmt(r), r.locale) for r in plain.records("train"))


def test_ordinal_suffixes():
    fmt = DateFormat("MMMM d'§', y", "en_US", "")
    days = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th",
            21: "21st", 22: "22nd", 23: "23rd", 30: "30th", 31: "31st"}
    for day, text in days.items():
        assert render_date(dt.date(1998, 1, day), fmt) == f"January {text}, 1998"


def test_case_variants_lower_and_upper_case_their_shares(task):
    # 15 % lower-cased and 10 % upper-cased (among inputs that have letters to change)
    letters = [r.src for r in task.records("train") if r.src.upper() != r.src.lower()]
    upper = sum(s == s.upper() for s in letters) / len(letters)
    lower = sum(s == s.lower() for s in letters) / len(letters)
    assert 0.06 < upper < 0.14 and 0.11 < lower < 0.20
    plain = get_task("dates", seed=0, num_train=300, num_valid=10, num_test=10,
                     case_variants=False)
    assert not any(s == s.upper() for s, _ in plain.examples("train") if s.upper() != s.lower())


def test_a_month_of_13_is_not_ambiguous():
    assert not is_ambiguous("04/13/1885") and not is_ambiguous("4.13.85")


@pytest.mark.parametrize("valid, test", [(0.5, 0.5), (0.0, 0.1), (0.1, 0.0), (0.7, 0.4)])
def test_split_fractions_must_leave_days_for_training(valid, test):
    with pytest.raises(ValueError, match="valid_fraction and test_fraction"):
        get_task("dates", seed=0, num_train=10, valid_fraction=valid, test_fraction=test)
