"""How numbers look to people: the one place terminal tables, reports and messages format them.

Every function accepts what results.json holds: floats, ints, ``"inf"``/``"-inf"`` strings and
``None`` (missing or NaN), and shows missing values as ``–``.
"""

from __future__ import annotations

import math
from typing import Any

#: z for a two-sided 95 % normal interval.
Z95 = 1.959963984540054
MISSING = "–"


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


def number(value: Any, digits: int = 4) -> str:
    """A number for tables: fixed ``digits`` decimals, thousands separators from 10⁴, scientific
    below ``10^-digits``; integers exact; ``inf`` stays ``inf``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    x = to_float(value)
    if math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    if x != 0 and abs(x) < 10**-digits:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"


def prose(value: Any, digits: int = 3) -> str:
    """A number inside a sentence: ``digits`` significant figures, trailing zeros dropped."""
    x = to_float(value)
    if not math.isfinite(x):
        return "inf" if x > 0 else "n/a"
    if x == 0:
        return "0"
    if abs(x) < 1e-4 or abs(x) >= 1e5:
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:,.{digits}f}".rstrip("0").rstrip(".")


def mean_se(obj: dict[str, Any] | None, key: str = "mean", digits: int = 4) -> str:
    """``mean ± se`` of a metric object (the ``± se`` part only when the se is finite)."""
    obj = obj or {}
    se = to_float(obj.get("se"))
    text = number(obj.get(key), digits)
    return text if not math.isfinite(se) else f"{text} ± {number(se, digits)}"


def percent(value: Any, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage."""
    x = to_float(value)
    return MISSING if math.isnan(x) else f"{100 * x:.{digits}f}%"


def percent_se(obj: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± se`` of a share, in percent."""
    obj = obj or {}
    mean, se = to_float(obj.get("mean")), to_float(obj.get("se"))
    if not math.isfinite(mean):
        return MISSING
    return percent(mean, digits) + (f" ± {percent(se, digits)}" if math.isfinite(se) else "")


def interval(bounds: Any, digits: int = 4) -> str:
    """``[low, high]`` of a two-element interval (``–`` when missing)."""
    if not bounds or len(bounds) != 2:
        return MISSING
    return f"[{number(bounds[0], digits)}, {number(bounds[1], digits)}]"


def normal_interval(obj: dict[str, Any] | None, digits: int = 4) -> str:
    """The 95 % normal interval ``mean ± 1.96 se`` of a metric object."""
    obj = obj or {}
    mean, se = to_float(obj.get("mean")), to_float(obj.get("se"))
    if not (math.isfinite(mean) and math.isfinite(se)):
        return MISSING
    return interval([mean - Z95 * se, mean + Z95 * se], digits)


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
