"""The paired comparison of a control curve and a method curve over seeds.

Each seed gives one pair (control failed?, method failed?).  The one-sided exact McNemar test
asks whether the method fails less often than the control: under the null hypothesis the
discordant pairs split 50/50, so with ``b`` seeds where only the control failed and ``c`` where
only the method failed, ``p = P(X >= b)`` for ``X ~ Binomial(b + c, 1/2)``.

Continuous endpoints (:mod:`yoloqat.curves.endpoints`: best, final, drawdown, AUC) are compared
with :func:`sign_flip`, the exact paired sign-flip permutation test of the per-seed differences,
and the interval that inverts it (see :class:`SignFlip`).

Written by hand because it is a few lines of exact arithmetic (``math.comb``, an enumeration of
at most 2**16 sign vectors); the project does not otherwise need SciPy.
"""

from __future__ import annotations

import math
import random
import statistics
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


# --------------------------------------------------------------------------------------------
# continuous endpoints: the paired sign-flip test and its interval

MAX_EXACT = 16  # up to this many pairs every sign flip is enumerated (2**16 = 65536)
RANDOM_FLIPS = 65535  # beyond it: this many random sign vectors, drawn with a fixed seed


@dataclass(frozen=True)
class SignFlip:
    """The paired sign-flip permutation test of the differences ``d_i = method_i - control_i``.

    Under the null hypothesis (no effect) each ``d_i`` is as likely to have the other sign, so
    every sign vector ``e`` gives an equally likely ``T* = sum(e_i * d_i)``; ``T = sum(d_i)`` is
    the observed one.  ``p_greater = P(T* >= T)`` (method higher), ``p_less = P(T* <= T)``,
    ``p_two_sided = P(|T*| >= |T|) = min(1, 2 * min(p_greater, p_less))`` (the distribution is
    symmetric).  Exact over all ``2**n`` vectors for ``n <= MAX_EXACT`` (the observed one
    included, so the smallest one-sided p is ``1 / 2**n``); a zero difference is the same under
    either sign and only doubles both counts, so zeros and ties need no special rule.  Beyond
    ``MAX_EXACT``: ``RANDOM_FLIPS`` random non-identity vectors (seed 0), ``p = (1 + hits) /
    (RANDOM_FLIPS + 1)``.

    ``low``/``high``: the exact inversion of the same test, the shifts ``m`` that neither one-
    sided test rejects at ``(1 - level) / 2`` when applied to ``d_i - m``.  Flipping the set S
    of signs gives ``T*(m) >= T(m)`` exactly when ``mean(d over S) <= m``, so the bounds are
    order statistics of the subset means: the K-th smallest and K-th largest, ``K =
    floor((1 - level) / 2 * 2**n)``.  It excludes 0 exactly when ``p_two_sided <= 1 - level``.
    With ``K = 0`` (n <= 5 at 95 %) no shift can be rejected and the interval is infinite:
    five seeds cannot give a finite 95 % interval without assumptions about the differences.
    """

    n: int
    mean: float  # mean difference (method - control)
    sd: float | None  # sample sd of the differences (None below 2)
    low: float  # may be -inf
    high: float  # may be +inf
    p_greater: float
    p_less: float
    p_two_sided: float
    exact: bool
    flips: int  # sign vectors counted, the observed one included
    level: float = 0.95

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in self.__dict__.items()}


def _subset_sums(d: Sequence[float]) -> tuple[list[float], list[int]]:
    """Sums and sizes of every subset of ``d`` (the empty one first)."""
    sums, sizes = [0.0], [0]
    for x in d:
        sums += [s + x for s in sums]
        sizes += [k + 1 for k in sizes]
    return sums, sizes


def _random_subset_sums(d: Sequence[float], draws: int, seed: int) -> tuple[list[float], list[int]]:
    """Sums and sizes of ``draws`` random non-empty subsets (each element in with p = 1/2)."""
    rng = random.Random(seed)
    n = len(d)
    sums, sizes = [], []
    for _ in range(draws):
        mask = 0
        while mask == 0:
            mask = rng.getrandbits(n)
        picked = [d[i] for i in range(n) if mask >> i & 1]
        sums.append(math.fsum(picked))
        sizes.append(len(picked))
    return sums, sizes


def sign_flip(diffs: Sequence[float], level: float = 0.95, max_exact: int = MAX_EXACT,
              draws: int = RANDOM_FLIPS, seed: int = 0) -> SignFlip | None:
    """The paired sign-flip test of ``diffs`` (see :class:`SignFlip`); None without pairs."""
    d = [float(x) for x in diffs]
    if not d:
        return None
    if any(not math.isfinite(x) for x in d):
        raise ValueError("differences must be finite")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(d)
    exact = n <= max_exact
    if exact:
        sums, sizes = _subset_sums(d)
        sums, sizes = sums[1:], sizes[1:]  # the identity is counted once below
        flips = 2**n
    else:
        sums, sizes = _random_subset_sums(d, draws, seed)
        flips = draws + 1
    # flipping the signs of S changes T by -2 * sum(S): T* >= T exactly when sum(S) <= 0
    tol = 1e-9 * math.fsum(abs(x) for x in d)  # float rounding of equal sums is a tie
    p_greater = (1 + sum(1 for s in sums if s <= tol)) / flips
    p_less = (1 + sum(1 for s in sums if s >= -tol)) / flips
    means = sorted(s / k for s, k in zip(sums, sizes, strict=True))
    k = math.floor((1 - level) / 2 * flips + 1e-9)
    low, high = (means[k - 1], means[-k]) if k >= 1 else (-math.inf, math.inf)
    return SignFlip(
        n=n, mean=math.fsum(d) / n, sd=statistics.stdev(d) if n >= 2 else None,
        low=low, high=high, p_greater=p_greater, p_less=p_less,
        p_two_sided=min(1.0, 2 * min(p_greater, p_less)), exact=exact, flips=flips, level=level,
    )
