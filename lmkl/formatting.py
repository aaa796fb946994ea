"""How numbers look to people: the one formatter of terminal tables, HTML and Markdown reports,
and messages.

Every function accepts what results.json holds: floats, ints, ``"inf"``/``"-inf"`` strings and
``None`` (missing or NaN), and shows a missing value as ``–``.

The rules, the same everywhere:

* **Significant digits, not fixed decimals.** A value keeps ``digits`` significant digits
  (default 4): ``0.9592``, ``74.29``, ``0.0006123``; below 0.001 in scientific notation
  (``4.074e-05``); from 10,000 up as a whole number with thousands separators (``17,362``).
  Integers are exact (``1,137,556``).
* **Distinct values print distinct.** :func:`format_column` (a table column, the numbers one
  sentence compares) and :func:`format_interval` (a mean and its CI ends) add significant digits
  to the whole group until no two different values share a string.
* **Brackets are intervals, ``±`` is one standard error.** ``[low, high]`` is always a 95 %
  confidence interval; ``mean ± se`` always means plus or minus *one* standard error over
  tokens, the error to two significant digits (:func:`format_mean_se`).
* Percentages, ratios and rates have their own function so that the style of each is fixed:
  :func:`format_percent`, :func:`format_ratio`, :func:`format_rate`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

#: z for a two-sided 95 % normal interval.
Z95 = 1.959963984540054
#: Shown for a missing or NaN value.
MISSING = "–"
#: Significant digits of a value unless a caller asks for others.
DIGITS = 4
#: The most significant digits :func:`format_column` adds to keep values distinct.
MAX_DIGITS = 10
#: Below this magnitude values switch to scientific notation.
SMALL = 1e-3
#: From this magnitude on, values print as whole numbers with thousands separators.
LARGE = 1e4
#: A rate is not shown before its clock has run this many seconds (the first reading of a
#: progress bar is a few tokens over microseconds: a meaningless, huge number).
MIN_RATE_SECONDS = 1.0


def to_float(value: Any) -> float:
    """A results.json number as a float: ``"inf"`` → inf, null/missing/garbage → NaN."""
    if value is None or isinstance(value, bool):
        return math.nan if value is None else float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    if isinstance(value, int | float):
        return float(value)
    return math.nan


def _special(x: float) -> str | None:
    """The text of NaN/±inf, or None for a finite number."""
    if math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def _exponent(x: float) -> int:
    """The power of ten of ``x``'s leading digit (``x`` finite and non-zero)."""
    return math.floor(math.log10(abs(x)))


def format_value(value: Any, digits: int = DIGITS) -> str:
    """One number with ``digits`` significant digits (see the module docstring).

    >>> format_value(0.95917), format_value(4.0741e-05), format_value(17362.4), format_value(3)
    ('0.9592', '4.074e-05', '17,362', '3')
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    x = to_float(value)
    special = _special(x)
    if special is not None:
        return special
    if x == 0:
        return "0"
    digits = max(1, digits)
    if abs(x) < SMALL:
        return f"{x:.{digits - 1}e}"
    # Rounding can carry into the next power of ten (9.99996 → 10.00): decide on the rounded value.
    decimals = max(0, digits - 1 - _exponent(float(f"{x:.{digits - 1}e}")))
    if abs(x) >= LARGE or decimals == 0:
        return f"{x:,.0f}"
    return f"{x:.{decimals}f}"


def format_signed(value: Any, digits: int = DIGITS) -> str:
    """A difference, its sign always shown: ``+0.01234``, ``-4.074e-05``, ``0``.

    >>> format_signed(0.012345), format_signed(-4.0741e-05)
    ('+0.01235', '-4.074e-05')
    """
    text = format_value(value, digits)
    return text if text.startswith(("-", "+", "–")) or text in ("0", "nan") else f"+{text}"


def _distinct_digits(values: Sequence[float], digits: int) -> int:
    """The fewest significant digits ≥ ``digits`` at which different finite values print
    different strings (at most :data:`MAX_DIGITS`)."""
    finite = {v for v in values if math.isfinite(v)}
    for d in range(max(1, digits), MAX_DIGITS + 1):
        if len({format_value(v, d) for v in finite}) == len(finite):
            return d
    return MAX_DIGITS


def format_column(values: Iterable[Any], digits: int = DIGITS) -> list[str]:
    """A group of numbers (a table column, the numbers one sentence compares), all with the
    same number of significant digits: ``digits``, or more where fewer would print two
    different values alike. Integers stay exact.

    >>> format_column([0.95917, 0.95921, 1.5])
    ['0.95917', '0.95921', '1.5000']
    """
    values = list(values)
    floats = [to_float(v) for v in values if not (isinstance(v, int) and not isinstance(v, bool))]
    d = _distinct_digits(floats, digits)
    return [format_value(v, d) for v in values]


def format_interval(mean: Any, low: Any, high: Any | None = None, digits: int = DIGITS) -> str:
    """A value and its 95 % CI, ``mean [low, high]``; the three share their significant digits
    and get more where the ends would print like the mean. ``format_interval(None, low, high)``
    (or ``format_interval(low, high)``) gives the bracket alone.

    >>> format_interval(0.9592, 0.8630, 1.069)
    '0.9592 [0.8630, 1.069]'
    >>> format_interval(0.000612, 0.0006081, 0.0006163)
    '6.120e-04 [6.081e-04, 6.163e-04]'
    """
    if high is None:  # format_interval(low, high): the bracket alone
        mean, low, high = None, mean, low
    m, lo, hi = to_float(mean), to_float(low), to_float(high)
    if math.isnan(lo) and math.isnan(hi):
        return format_value(m, digits) if mean is not None else MISSING
    d = _distinct_digits([m, lo, hi] if mean is not None else [lo, hi], digits)
    bracket = f"[{format_value(lo, d)}, {format_value(hi, d)}]"
    return bracket if mean is None else f"{format_value(m, d)} {bracket}"


def format_ci(bounds: Any, digits: int = DIGITS) -> str:
    """The bracket ``[low, high]`` of a two-element interval (``–`` when missing)."""
    if not bounds or len(bounds) != 2:
        return MISSING
    return format_interval(None, bounds[0], bounds[1], digits)


def format_mean_se(mean: Any, se: Any, digits: int = DIGITS) -> str:
    """``mean ± se`` (one standard error): the mean exactly as :func:`format_value` prints it
    everywhere else, the error to two significant digits. Without a finite error, the mean
    alone.

    >>> format_mean_se(0.000612345, 1.562e-05), format_mean_se(0.95917, 0.00604)
    ('6.123e-04 ± 1.6e-05', '0.9592 ± 0.0060')
    >>> format_mean_se(0.19491, 0.000962)
    '0.1949 ± 0.00096'

    """
    m, s = to_float(mean), to_float(se)
    if not math.isfinite(m) or not math.isfinite(s) or s <= 0:
        return format_value(m, digits)
    error = format_value(s, 2)
    if abs(m) >= SMALL and 1e-6 <= s < SMALL:
        # A mean in fixed notation keeps its error in fixed notation too: 0.1949 ± 0.00096.
        error = f"{s:.{1 - _exponent(s)}f}"
    return f"{format_value(m, digits)} ± {error}"


def format_percent(value: Any, digits: int = 3) -> str:
    """A share in [0, 1] as a percentage with ``digits`` significant digits: ``87.3%``,
    ``0.0412%``, ``100%``, ``0%``.

    >>> format_percent(0.8731), format_percent(0.000412), format_percent(1.0)
    ('87.3%', '0.0412%', '100%')
    """
    x = to_float(value)
    special = _special(x)
    if special is not None:
        return special
    return f"{format_value(100 * x, digits)}%"


def format_percent_column(values: Iterable[Any], digits: int = 3) -> list[str]:
    """Shares as percentages that stay distinct (see :func:`format_column`)."""
    values = [to_float(v) for v in values]
    shown = format_column([100 * v for v in values], digits)
    return [text if text == MISSING else f"{text}%" for text in shown]


def format_percent_se(mean: Any, se: Any, digits: int = 3) -> str:
    """``mean ± se`` of a share, in percent (one standard error, two significant digits)."""
    m, s = to_float(mean), to_float(se)
    if not math.isfinite(m):
        return MISSING
    if not math.isfinite(s) or s <= 0:
        return format_percent(m, digits)
    return f"{format_percent(m, digits)} ± {format_percent(s, 2)}"


def format_ratio(value: Any, digits: int = 3) -> str:
    """A ratio such as perplexity Q / P, ``1.0025×``: near 1 with enough decimals that its
    difference from 1 shows two significant digits (never ``1×`` for 1.0025).

    >>> format_ratio(74.291 / 74.107), format_ratio(2.5), format_ratio(1.0)
    ('1.0025×', '2.50×', '1.000×')
    """
    x = to_float(value)
    special = _special(x)
    if special is not None:
        return special
    gap = abs(x - 1.0)
    if 0 < gap < 0.1 and abs(x) < LARGE:
        return f"{x:.{max(3, 1 - _exponent(gap))}f}×"
    if gap == 0:
        return f"{x:.{max(digits, 4) - 1}f}×"
    return f"{format_value(x, digits)}×"


def format_rate(count: Any, seconds: Any, unit: str = "tokens/s") -> str:
    """``count / seconds`` as a rate: whole numbers with separators from 100 up (``17,362
    tokens/s``), three significant digits below; ``–`` before :data:`MIN_RATE_SECONDS` have
    passed (a rate over microseconds means nothing).

    >>> format_rate(173620, 10.0), format_rate(12, 3.0), format_rate(5, 0.001)
    ('17,362 tokens/s', '4.00 tokens/s', '– tokens/s')
    """
    n, t = to_float(count), to_float(seconds)
    suffix = f" {unit}" if unit else ""
    if not (math.isfinite(n) and math.isfinite(t)) or t < MIN_RATE_SECONDS:
        return MISSING + suffix
    rate = n / t
    text = f"{rate:,.0f}" if abs(rate) >= 100 else format_value(rate, 3)
    return text + suffix


def format_count(value: Any) -> str:
    """A count: exact, with thousands separators (``1,137,556``)."""
    x = to_float(value)
    special = _special(x)
    if special is not None:
        return special
    return f"{round(x):,}"


def format_seconds(value: Any) -> str:
    """A duration in seconds: three significant digits (``0.412 s``, ``37.1 s``, ``1,234 s``)."""
    x = to_float(value)
    special = _special(x)
    return special if special is not None else f"{format_value(x, 3)} s"


def parameters(value: Any) -> str:
    """A parameter count: ``135M``, ``1.5B`` (SI, three significant figures)."""
    x = to_float(value)
    if not math.isfinite(x):
        return MISSING
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"


def byte_size(value: Any) -> str:
    """A size in bytes: ``1.5 GiB``, ``270 MiB`` (binary units, three significant figures)."""
    x = to_float(value)
    if not math.isfinite(x):
        return MISSING
    for suffix, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {suffix}"
    return f"{x:.0f} B"


# -- the names callers used before; each is one of the functions above -----------------------


def number(value: Any, digits: int = DIGITS) -> str:
    """:func:`format_value` with at least three significant digits (``digits`` was once a
    number of decimals: ``number(x, 1)`` must not round 6853.9 to ``7e+03``)."""
    return format_value(value, max(digits, 3))


def prose(value: Any, digits: int = 3) -> str:
    """A number inside a sentence: :func:`format_value` with ``digits`` significant digits."""
    return format_value(value, digits)


def mean_se(obj: dict[str, Any] | None, key: str = "mean", digits: int = DIGITS) -> str:
    """:func:`format_mean_se` of a metric object (``mean`` and ``se``)."""
    obj = obj or {}
    return format_mean_se(obj.get(key), obj.get("se"), digits)


def percent(value: Any, decimals: int = 1) -> str:
    """:func:`format_percent` for callers that once asked for ``decimals`` decimals: that many
    plus two significant digits (the same text for shares from 10% to 99.9%, and no ``0.0%``
    for a share that is not zero)."""
    return format_percent(value, max(decimals + 2, 2))


def percent_se(obj: dict[str, Any] | None, digits: int = 3) -> str:
    """:func:`format_percent_se` of a metric object (``mean`` and ``se``)."""
    obj = obj or {}
    return format_percent_se(obj.get("mean"), obj.get("se"), max(digits, 2))


def interval(bounds: Any, digits: int = DIGITS) -> str:
    """:func:`format_ci`: ``[low, high]`` of a two-element interval (``–`` when missing)."""
    return format_ci(bounds, max(digits, 3))


def normal_interval(obj: dict[str, Any] | None, digits: int = DIGITS) -> str:
    """The 95 % normal interval ``[mean − 1.96 se, mean + 1.96 se]`` of a metric object."""
    obj = obj or {}
    mean, se = to_float(obj.get("mean")), to_float(obj.get("se"))
    if not (math.isfinite(mean) and math.isfinite(se)):
        return MISSING
    return format_ci([mean - Z95 * se, mean + Z95 * se], max(digits, 3))


def metric_ci(obj: dict[str, Any] | None, digits: int = DIGITS) -> str:
    """A metric object's stored CI ``[ci_low, ci_high]`` (the document bootstrap of results.json),
    ``–`` when it has none."""
    obj = obj or {}
    if obj.get("ci_low") is None and obj.get("ci_high") is None:
        return MISSING
    return format_ci([obj.get("ci_low"), obj.get("ci_high")], digits)


def metric_with_ci(obj: dict[str, Any] | None, digits: int = DIGITS) -> str:
    """``mean [ci_low, ci_high]`` of a metric object with a stored CI; ``mean ± se`` without."""
    obj = obj or {}
    if obj.get("ci_low") is None and obj.get("ci_high") is None:
        return mean_se(obj, digits=digits)
    return format_interval(obj.get("mean"), obj.get("ci_low"), obj.get("ci_high"), digits)
