"""The ``dates`` task: human-readable English dates -> ISO 8601 ``YYYY-MM-DD``, per character.

Inputs are rendered with ``babel`` (pinned to 2.18.0; CLDR data changes between releases,
and so would the generated data) from dates between 1000-01-01 and 2999-12-31:

* every standard pattern (short, medium, long, full) of the locales en_US, en_GB, en_AU,
  en_IN and en_CA, e.g. ``4/10/85``, ``10 Apr 1885``, ``Friday, April 10, 1885``;
* ISO forms (``1885-04-10``, ``18850410``);
* common hand-written forms, each rendered in one of the five locales (so both
  ``Sep`` and ``Sept`` appear): ``3 March 1998``, ``March 3rd, 1998``,
  ``the 3rd of March 1998``, ``03/03/98``, ``Tue 3 Mar 1998``, ``03.03.1998``, ...;
* optionally (``case_variants=True``, the default) lower- or upper-cased.

Rules the generator keeps (DATA.md §A2.1):

* Years are written with CLDR ``y`` (calendar year), never ``Y`` (week-based year: with
  ``YYY``, 2019-12-30 renders as 2020).
* A two-digit year ``yy`` means 1950-2049 (``50``-``99`` -> 19yy, ``00``-``49`` -> 20yy), so a
  pattern with a two-digit year is only used for dates in that range.
* Day/month order. A numeric input such as ``04/10/1885`` reads as April 10 under en_US and
  as 4 October under en_GB. :func:`is_ambiguous` flags such inputs (both of the first two
  numbers between 1 and 12 and different). Training data keeps one reading per separator,
  :data:`AMBIGUOUS_READING` (``/`` month first as in en_US; ``.`` and ``-`` day first): an
  ambiguous string rendered by a pattern of the other order is drawn again. Validation and
  test splits contain no ambiguous input at all, so evaluation never scores a guess.
* The dates of the three splits are disjoint: each calendar day belongs to exactly one
  split, drawn from the seed.

Everything is deterministic given ``seed`` and the babel version.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .task import SPLITS, Seq2SeqTask
from .vocab import Vocab

__all__ = ["DATE_MIN", "DATE_MAX", "TWO_DIGIT_YEAR_RANGE", "LOCALES", "AMBIGUOUS_READING",
           "DateFormat", "DateExample", "date_formats", "render_date", "is_ambiguous",
           "DatesTask"]

DATE_MIN = _dt.date(1000, 1, 1)
DATE_MAX = _dt.date(2999, 12, 31)
TWO_DIGIT_YEAR_RANGE = (1950, 2049)
LOCALES = ("en_US", "en_GB", "en_AU", "en_IN", "en_CA")
# How training data reads an ambiguous day/month pair, by separator (see module docstring).
AMBIGUOUS_READING = {"/": "MDY", ".": "DMY", "-": "DMY"}

_STANDARD_LENGTHS = ("short", "medium", "long", "full")
# Hand-written forms as CLDR patterns. A quoted '§' is a placeholder for the English ordinal
# suffix of the day (st/nd/rd/th), which CLDR patterns cannot express.
_HANDWRITTEN = (
    "yyyy-MM-dd",            # ISO 8601 extended
    "yyyyMMdd",              # ISO 8601 basic
    "y/MM/dd",
    "d MMMM y",              # 3 March 1998
    "d MMM y",
    "dd MMM y",
    "d MMMM, y",
    "d-MMM-y",
    "dd-MMM-yy",
    "MMMM d, y",
    "MMMM d y",
    "MMM d y",
    "MMMM d'§', y",          # March 3rd, 1998
    "MMMM d'§' y",
    "d'§' MMMM y",           # 3rd March 1998
    "'the' d'§' 'of' MMMM y",
    "EEE d MMM y",           # Tue 3 Mar 1998
    "EEE, MMM d, y",
    "EEEE d MMMM y",
    "EEEE, MMMM d'§', y",
    "MM/dd/yy",              # 03/03/98
    "MM/dd/y",
    "M/d/y",
    "dd/MM/y",
    "d/M/y",
    "dd.MM.y",
    "d.M.yy",
    "dd.MM.yy",
    "dd-MM-y",
)


@dataclass(frozen=True)
class DateFormat:
    """One way of writing a date.

    Attributes
    ----------
    pattern : str
        CLDR pattern for :func:`babel.dates.format_date`; a quoted ``'§'`` becomes the
        day's ordinal suffix.
    locale : str or None
        Locale of the rendering; None means one of :data:`LOCALES` drawn per example.
    name : str
        ``"en_US/short"`` for standard patterns, ``"hand:<pattern>"`` otherwise.
    """
    pattern: str
    locale: str | None
    name: str

    @property
    def fields(self) -> list[str]:
        """Letter runs of the pattern outside quotes, e.g. ``['d', 'MMM', 'y']``."""
        unquoted = re.sub(r"'[^']*'", "", self.pattern)
        return [m.group(0) for m in re.finditer(r"([A-Za-z])\1*", unquoted)]

    @property
    def two_digit_year(self) -> bool:
        return "yy" in self.fields

    @property
    def numeric_order(self) -> str | None:
        """``"MDY"``-style field order when every field is a number, else None."""
        fields = self.fields
        if any(f[0] == "E" or (f[0] == "M" and len(f) >= 3) for f in fields):
            return None
        return "".join(f[0].upper() for f in fields if f[0] in "dMy")


class DateExample(NamedTuple):
    """A generated example with the facts it was made from."""
    src: str
    tgt: str
    date: _dt.date
    pattern: str
    locale: str


def date_formats() -> list[DateFormat]:
    """All formats the generator draws from: 5 locales x 4 standard lengths, then hand-written."""
    from babel import Locale

    out = []
    for loc in LOCALES:
        locale = Locale.parse(loc)
        for length in _STANDARD_LENGTHS:
            out.append(DateFormat(locale.date_formats[length].pattern, loc, f"{loc}/{length}"))
    out += [DateFormat(p, None, f"hand:{p}") for p in _HANDWRITTEN]
    return out


def _ordinal_suffix(day: int) -> str:
    if 11 <= day % 100 <= 13:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def render_date(day: _dt.date, fmt: DateFormat, locale: str | None = None) -> str:
    """Write ``day`` in format ``fmt`` (``locale`` overrides ``fmt.locale``)."""
    from babel.dates import format_date

    loc = locale or fmt.locale or LOCALES[0]
    text = format_date(day, fmt.pattern, locale=loc)
    return text.replace("§", _ordinal_suffix(day.day))


_NUMERIC_DATE = re.compile(r"^\s*(\d{1,4})\s*([/.\-])\s*(\d{1,2})\s*\2\s*(\d{2}|\d{4})\s*$")


def is_ambiguous(src: str) -> bool:
    """True when a numeric date can be read day-first and month-first as two different dates.

    ``"04/10/1885"`` and ``"4.10.85"`` are ambiguous; ``"13/10/1885"`` (13 is no month),
    ``"03/03/98"`` (both readings agree), ``"1885-04-10"`` (year first: ISO order) and any
    input with a month name are not.
    """
    m = _NUMERIC_DATE.match(src)
    if not m or len(m.group(1)) == 4:
        return False
    a, b = int(m.group(1)), int(m.group(3))
    return 1 <= a <= 12 and 1 <= b <= 12 and a != b


def _ambiguous_reading(src: str) -> str:
    return AMBIGUOUS_READING[_NUMERIC_DATE.match(src).group(2)]


def _split_of_each_day(seed: int, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of every day from DATE_MIN to DATE_MAX."""
    num_days = (DATE_MAX - DATE_MIN).days + 1
    u = np.random.default_rng([seed, 0]).random(num_days)
    return np.where(u < test_fraction, 2, np.where(u < test_fraction + valid_fraction, 1, 0))


class DatesTask(Seq2SeqTask):
    """Human-readable date -> ``YYYY-MM-DD``, character level.

    Parameters
    ----------
    seed : int
        Fixes the split of days and every example.
    num_train, num_valid, num_test : int
        Examples per split.
    valid_fraction, test_fraction : float
        Share of calendar days reserved for validation / test.
    case_variants : bool
        Lower-case 15 % and upper-case 10 % of the inputs.

    Attributes
    ----------
    src_vocab : Vocab
        Characters of every format in every locale and case: independent of the seed, so a
        model trained with one seed can be evaluated on data of another.
    tgt_vocab : Vocab
        ``0``-``9`` and ``-``.

    Notes
    -----
    Source ids are the characters then ``<eos>``; targets ``<bos> Y Y Y Y - M M - D D <eos>``
    (12 ids). Use :meth:`records` for the date and format behind each example.
    """

    name = "dates"

    def __init__(self, seed: int = 0, *, num_train: int = 20000, num_valid: int = 1000,
                 num_test: int = 1000, valid_fraction: float = 0.05, test_fraction: float = 0.05,
                 case_variants: bool = True):
        super().__init__()
        import babel

        if babel.__version__ != "2.18.0":
            import warnings
            warnings.warn(f"dates task is pinned to babel 2.18.0, found {babel.__version__}; "
                          "the generated data may differ", stacklevel=2)
        if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
            raise ValueError("valid_fraction and test_fraction must be > 0 and sum to < 1")
        self.seed = int(seed)
        self.sizes = {"train": int(num_train), "valid": int(num_valid), "test": int(num_test)}
        self.case_variants = case_variants
        self.formats = date_formats()
        self._day_split = _split_of_each_day(self.seed, valid_fraction, test_fraction)
        self._records: dict[str, list[DateExample]] = {}
        self.src_vocab = Vocab(sorted(self._alphabet()), level="char")
        self.tgt_vocab = Vocab("0123456789-", level="char")

    def _alphabet(self) -> set[str]:
        # 84 days cover every month and weekday name; digits come from ISO renders.
        chars = set("0123456789")
        for month in range(1, 13):
            for dom in range(1, 8):
                day = _dt.date(2001, month, dom)
                for fmt in self.formats:
                    for loc in ([fmt.locale] if fmt.locale else LOCALES):
                        text = render_date(day, fmt, loc)
                        chars.update(text)
                        chars.update(text.lower())
                        chars.update(text.upper())
        chars.update("stndrh" + "STNDRH")  # ordinal suffixes
        return chars

    def day_pool(self, split: str, two_digit_year: bool = False) -> np.ndarray:
        """Day offsets from DATE_MIN (int64) that belong to ``split``."""
        days = np.flatnonzero(self._day_split == SPLITS.index(split))
        if two_digit_year:
            lo = (_dt.date(TWO_DIGIT_YEAR_RANGE[0], 1, 1) - DATE_MIN).days
            hi = (_dt.date(TWO_DIGIT_YEAR_RANGE[1], 12, 31) - DATE_MIN).days
            days = days[(days >= lo) & (days <= hi)]
        return days

    def records(self, split: str) -> list[DateExample]:
        """Examples of ``split`` with their date, pattern and locale."""
        if split not in self._records:
            self._records[split] = self._generate(split)
        return self._records[split]

    def _make_examples(self, split: str) -> list[tuple[str, str]]:
        return [(r.src, r.tgt) for r in self.records(split)]

    def _generate(self, split: str) -> list[DateExample]:
        # One generator per split: the size of one split never changes another.
        rng = np.random.default_rng([self.seed, 1 + SPLITS.index(split)])
        pools = {False: self.day_pool(split), True: self.day_pool(split, two_digit_year=True)}
        out: list[DateExample] = []
        while len(out) < self.sizes[split]:
            fmt = self.formats[rng.integers(len(self.formats))]
            loc = fmt.locale or LOCALES[rng.integers(len(LOCALES))]
            pool = pools[fmt.two_digit_year]
            day = DATE_MIN + _dt.timedelta(days=int(pool[rng.integers(len(pool))]))
            src = render_date(day, fmt, loc)
            if is_ambiguous(src):
                # Evaluation holds no ambiguous input; training keeps only the agreed reading.
                if split != "train" or fmt.numeric_order != _ambiguous_reading(src):
                    continue
            if self.case_variants:
                u = rng.random()
                src = src.lower() if u < 0.15 else src.upper() if u < 0.25 else src
            out.append(DateExample(src, day.isoformat(), day, fmt.pattern, loc))
        return out
