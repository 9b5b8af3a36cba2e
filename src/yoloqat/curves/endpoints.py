"""Continuous endpoints of one per-epoch val mAP50-95 curve: pure functions, no I/O.

The stability label says *whether* a curve failed; these numbers say *by how much*, so two
methods can be compared seed by seed (:func:`yoloqat.analysis.paired.sign_flip`).  For a curve
``v[1..n]`` (one value per epoch, as :mod:`yoloqat.curves.reader` gives it):

* ``best``: ``max(v)``; ``best_epoch``: the 1-based epoch of its first occurrence (the peak);
* ``final``: ``v[n]``; ``final_over_best``: ``final / best`` (None when ``best <= 0``);
* ``drawdown`` (post-peak drawdown, in mAP, not a fraction): ``best - min(v[peak+1..n])``, the
  deepest fall after the peak; 0 when the peak is the last epoch.  (The verdict's
  ``max_drawdown`` is another quantity: a fraction of the smoothed running best.)
* ``auc`` (area under the curve after warm-up, normalised per epoch): the *mean* of
  ``v[skip+1..n]``, with ``skip = ceil(qat.warmup_epochs)`` (:func:`warmup_skip`) by default:
  the epochs whose learning rate was still ramping are left out, and the mean (area / epochs)
  keeps runs of different lengths on one scale (mAP).  None when no epoch is left after
  ``skip``.

A thinned curve (the repair curves of ``qat.repair_every`` > 1, values only at every k-th epoch
and the last: :func:`yoloqat.curves.reader.judged_points`) is measured on its scored epochs: the
peak, the fall after it and the AUC's mean are over those, and ``best_epoch`` is a real epoch.

Any other curve with a NaN or inf anywhere (a missing epoch is NaN) is *diverged*: every endpoint is
None, since a number computed around the hole would hide the failure; the label (``diverged``)
says what happened.  An empty curve also has every endpoint None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from yoloqat.curves.reader import judged_points


def warmup_skip(warmup_epochs: Any) -> int:
    """The epochs left out of the AUC: ``ceil(qat.warmup_epochs)`` (Ultralytics' warm-up ends
    inside that epoch); 0 for a missing or invalid value."""
    try:
        w = float(warmup_epochs)
    except (TypeError, ValueError):
        return 0
    return math.ceil(w) if math.isfinite(w) and w > 0 else 0


@dataclass(frozen=True)
class Endpoints:
    epochs: int
    skip: int  # epochs left out of the AUC
    diverged: bool
    best: float | None = None
    best_epoch: int | None = None  # 1-based, first occurrence of the best value
    final: float | None = None
    final_over_best: float | None = None
    drawdown: float | None = None  # best - min after the peak (mAP); 0 when the peak is last
    auc: float | None = None  # mean per epoch over epochs skip+1 .. end

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def endpoints(values: Sequence[float], skip: int = 0) -> Endpoints:
    """The endpoints of one curve; see the module docstring for the definitions."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    n = len(values)
    at, v = judged_points([float(x) for x in values])
    if any(not math.isfinite(x) for x in v):
        return Endpoints(n, skip, diverged=True)
    if not v:
        return Endpoints(0, skip, diverged=False)
    best = max(v)
    peak = v.index(best)  # 0-based, first occurrence
    after = v[peak + 1:]
    drawdown = best - min(after) if after else 0.0
    tail = [x for e, x in zip(at, v, strict=True) if e > skip]
    return Endpoints(
        epochs=n, skip=skip, diverged=False, best=best, best_epoch=at[peak], final=v[-1],
        final_over_best=v[-1] / best if best > 0 else None,
        drawdown=drawdown, auc=math.fsum(tail) / len(tail) if tail else None,
    )
