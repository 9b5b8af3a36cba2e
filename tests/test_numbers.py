"""The one number formatter the tables share."""

from __future__ import annotations

import math

from yoloqat.numbers import fixed


def test_fixed_decimals_missing_and_non_finite():
    assert fixed(0.123456) == "0.1235"
    assert fixed(0.5, 3) == "0.500"
    assert fixed(299.6, 0) == "300"
    assert fixed(None) == "-"
    assert fixed(math.nan) == "-" and fixed(math.inf, 3) == "-"  # the ladder's tables
    assert fixed(math.nan, 4, "nan") == "nan"  # judge, search: a diverged value shows
