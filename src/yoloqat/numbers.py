"""The two ways a number is read back from a run: a JSON metric, or a trainer value."""

from __future__ import annotations

import math
from typing import Any


def finite_number(x: Any) -> float | None:
    """A JSON metric value as a float, or None when it is missing, a bool, text, NaN or inf."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def finite_or_none(value: Any) -> float | None:
    """Any float-convertible value (a tensor, a numpy scalar) as a float, None if not finite."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def nan_if_none(x: Any) -> float:
    """A metric for arithmetic: its finite value, else NaN."""
    f = finite_number(x)
    return math.nan if f is None else f


def fixed(x: float | None, digits: int = 4, nonfinite: str = "-") -> str:
    """A number as a table shows it: ``digits`` decimals, ``-`` when missing, ``nonfinite``
    for NaN or inf (tables that list judged curves say ``nan`` there, so a diverged value shows)."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if math.isfinite(x) else nonfinite
