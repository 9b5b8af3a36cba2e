"""The paired comparison of a control curve and a method curve over seeds.

Each seed gives one pair (control failed?, method failed?).  The one-sided exact McNemar test
asks whether the method fails less often than the control: under the null hypothesis the
discordant pairs split 50/50, so with ``b`` seeds where only the control failed and ``c`` where
only the method failed, ``p = P(X >= b)`` for ``X ~ Binomial(b + c, 1/2)``.

Written by hand because it is three lines of exact binomial arithmetic (``math.comb``); the
project does not otherwise need SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mcnemar_one_sided(control_only: int, method_only: int) -> float:
    """Exact one-sided McNemar p-value that the method fails less often than the control."""
    if control_only < 0 or method_only < 0:
        raise ValueError("pair counts must be >= 0")
    n = control_only + method_only
    if n == 0:
        return 1.0
    return math.fsum(math.comb(n, k) for k in range(control_only, n + 1)) / 2.0**n


@dataclass(frozen=True)
class PairedOutcome:
    pairs: int  # seeds with both curves judged
    control_failed: int
    method_failed: int
    control_only: int  # b: only the control failed
    method_only: int  # c: only the method failed
    p_value: float  # one-sided exact McNemar

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def paired_outcome(pairs: Sequence[tuple[bool, bool]]) -> PairedOutcome:
    """``pairs`` of (control failed, method failed), one per seed."""
    b = sum(1 for c, m in pairs if c and not m)
    c_only = sum(1 for c, m in pairs if m and not c)
    return PairedOutcome(
        pairs=len(pairs),
        control_failed=sum(1 for c, _ in pairs if c),
        method_failed=sum(1 for _, m in pairs if m),
        control_only=b,
        method_only=c_only,
        p_value=mcnemar_one_sided(b, c_only),
    )
