"""The stability verdict for one training curve, judged on the whole curve.

Pure functions, no I/O.  :func:`classify_run` takes a per-epoch validation mAP50-95 curve (and
optionally per-epoch training losses and a run status) and returns a :class:`Verdict`;
:func:`summarize_group` condenses the verdicts of several seeds.

Why the whole curve: the failure this project validates (YOLOv10m, W4A16 QAT) peaked,
collapsed, partly recovered and collapsed again several times.  A test on the last point
alone ("final / best < 0.5") passes such a run whenever it happens to end on a recovery.

Definitions (thresholds from :class:`yoloqat.config.StabilityConfig`):

* ``smooth[t]``: the median of the last ``smooth_epochs`` finite values up to epoch t (fewer
  at the start).  ``rb[t]``, the *running best*, is the maximum of ``smooth`` up to t: one
  noisy high epoch cannot raise it, so a plateau's noise is not mistaken for a fall.
* ``best`` / ``best_epoch``: the maximum finite raw value and its 1-based epoch;
  ``final``: the last value; ``final_over_best``: ``final / best``.
* ``max_drawdown``: the largest ``(rb - value) / rb`` over the curve, in ``[0, 1]``.
* An epoch is *armed* (can start a fall) once the run has learned: its epoch number is above
  ``grace_epochs`` and ``rb >= max(min_peak, learned_fraction * max(smooth))``.  Before that,
  the noise of a from-scratch start is not a collapse.  The verdict stage judges a QAT run
  with ``grace_epochs`` raised to ``ceil(qat.warmup_epochs)`` (:func:`after_warmup`): falls
  while the learning rate still ramps up are the warm-up's.
* A **collapse** starts at an armed epoch whose value is ``< collapse_ratio * rb`` and ends at
  the first later epoch whose value is ``>= recovered_ratio * rb`` (hysteresis: wobbling
  around the line is one event).  A **dip** is counted the same way with the entry line
  ``dip_ratio * rb`` (``<=``); every collapse is also a dip.  A **swing** uses the entry line
  ``(1 - swing_ratio) * rb``.
* The run *ends low* when ``smooth`` at the last epoch is ``< final_ratio * rb``.

Labels, first rule that applies:

1. ``diverged``: ``status == "diverged"``, or any curve value or loss is NaN or inf (a
   missing epoch is NaN: see :mod:`yoloqat.curves.reader`).  A thinned curve (the repair
   curves of ``qat.repair_every`` > 1: values only at every k-th epoch and the last,
   :func:`yoloqat.curves.reader.judged_points`) is judged on its scored epochs alone: they keep
   their epoch numbers (grace, best epoch, fall epochs), while the smoothing window, the fall
   counts and ``epochs_collapsed`` count scored epochs.
2. ``too_short``: at most ``grace_epochs`` epochs (an empty curve included).  Falls in the
   grace epochs never count, so such a curve cannot show anything: at least
   ``grace_epochs + 1`` epochs are needed for any of the labels below.  Not a failure and not
   stable: the ladder and the reports leave such a curve out of the counts.
3. ``no_learning``: ``best < min_peak``.
4. ``collapsed``: at least one collapse, and the run ends collapsed, ends low, or collapsed
   twice or more (so a run that collapses twice is collapsed even when it ends recovered).
5. ``unstable``: any dip (a fall to ``dip_ratio`` of the running best, recovered or not,
   including one recovered collapse); or more than ``max_swings`` swings; or the run ends low.
6. ``stable``: everything else.  A plateau with a few percent of epoch-to-epoch noise and a slow
   late decline of a few percent are stable.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from yoloqat.config import StabilityConfig
from yoloqat.curves.endpoints import warmup_skip
from yoloqat.curves.reader import judged_points

STABLE, TOO_SHORT = "stable", "too_short"
LABELS = ("stable", "collapsed", "unstable", "diverged", "no_learning", "too_short")
# the labels of a judged curve that failed (too_short is not judged: neither stable nor failed)
NOT_STABLE = ("collapsed", "unstable", "diverged", "no_learning")


def min_epochs(cfg: StabilityConfig) -> int:
    """The fewest epochs a curve needs for a verdict other than diverged or too_short."""
    return cfg.grace_epochs + 1


def after_warmup(cfg: StabilityConfig, warmup_epochs: float) -> StabilityConfig:
    """The thresholds a QAT run is judged with: judged from the end of its warm-up.

    The learning rate (and momentum) still ramp during ``qat.warmup_epochs``, so a fall there is
    the warm-up's, not the method's: the grace period becomes
    ``max(stability.grace_epochs, ceil(qat.warmup_epochs))`` epochs (and a curve no longer than
    that is ``too_short``)."""
    grace = max(cfg.grace_epochs, warmup_skip(warmup_epochs))
    return cfg if grace == cfg.grace_epochs else replace(cfg, grace_epochs=grace)


DEFAULT_STABILITY = StabilityConfig()


@dataclass(frozen=True)
class Verdict:
    label: str
    epochs: int
    best: float
    best_epoch: int  # 1-based; 0 when the curve has no finite value
    final: float
    final_over_best: float
    max_drawdown: float
    collapse_events: int
    epochs_collapsed: int
    dips: int
    swings: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly values: NaN and inf become None."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            out[f.name] = v
        return out


@dataclass
class _Hysteresis:
    """Counts distinct excursions below an entry line that end above an exit line."""

    enter: float  # fraction of the running best
    exit: float
    inclusive: bool = False  # value <= line enters (else value < line)
    events: int = 0
    below: int = 0  # armed epochs below the entry line
    active: bool = False
    starts: list[int] = field(default_factory=list)  # 1-based epoch at which each event began

    def step(self, value: float, rb: float, epoch: int = 0) -> None:
        line = self.enter * rb
        if value < line or (self.inclusive and value <= line):
            self.below += 1
            if not self.active:
                self.active = True
                self.events += 1
                self.starts.append(epoch)
        elif self.active and value >= self.exit * rb:
            self.active = False


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except TypeError:
        return False


def _pct(x: float) -> str:
    return f"{100.0 * x:.0f}%"


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Trailing median of the last ``window`` finite values at each epoch (NaN before any)."""
    out, recent = [], []
    for v in values:
        if _finite(v):
            recent = [*recent, v][-window:]
        out.append(statistics.median(recent) if recent else math.nan)
    return out


def running_best(smooth: Sequence[float]) -> list[float]:
    out, best = [], -math.inf
    for s in smooth:
        if _finite(s):
            best = max(best, s)
        out.append(best if best > -math.inf else math.nan)
    return out


@dataclass
class _Scan:
    smooth: list[float]
    rb: list[float]  # running best
    collapse: _Hysteresis
    dip: _Hysteresis
    swing: _Hysteresis
    best: float
    best_epoch: int
    max_dd: float


def _scan(values: list[float], cfg: StabilityConfig, at: list[int] | None = None) -> _Scan:
    """One pass over a curve: running best, best, max drawdown and the falls (collapses, dips,
    swings) counted from the first armed epoch on.  ``at``: the 1-based epoch of each value
    (default 1, 2, ...)."""
    at = at if at is not None else list(range(1, len(values) + 1))
    smooth = smoothed(values, cfg.smooth_epochs)
    rb_curve = running_best(smooth)
    top = max((s for s in smooth if _finite(s)), default=math.nan)
    arm_at = max(cfg.min_peak, cfg.learned_fraction * top) if _finite(top) else math.inf

    swing_enter = 1.0 - cfg.swing_ratio
    swing_exit = cfg.recovered_ratio if cfg.recovered_ratio > swing_enter else 1 - cfg.swing_ratio / 2
    collapse = _Hysteresis(cfg.collapse_ratio, cfg.recovered_ratio)
    dip = _Hysteresis(cfg.dip_ratio, cfg.recovered_ratio, inclusive=True)
    swing = _Hysteresis(swing_enter, swing_exit)

    best, best_epoch, max_dd = -math.inf, 0, 0.0
    for epoch, v, rb in zip(at, values, rb_curve, strict=True):
        if not _finite(v):
            continue
        if v > best:
            best, best_epoch = v, epoch
        if _finite(rb) and rb > 0:
            max_dd = max(max_dd, (rb - v) / rb)
        if epoch > cfg.grace_epochs and _finite(rb) and rb >= arm_at:
            for counter in (collapse, dip, swing):
                counter.step(v, rb, epoch)
    return _Scan(smooth, rb_curve, collapse, dip, swing, best, best_epoch, max_dd)


def fall_epochs(curve: Sequence[float], cfg: StabilityConfig = DEFAULT_STABILITY) -> dict[str, list[int]]:
    """The 1-based epochs at which each collapse and each dip that :func:`classify_run` counts
    begins (``collapse_events`` and ``dips`` of its verdict are their lengths); every collapse
    is also a dip, so a collapse's start is in both lists."""
    at, values = judged_points([float(v) for v in curve])
    scan = _scan(values, cfg, at)
    return {"collapses": list(scan.collapse.starts), "dips": list(scan.dip.starts)}


def classify_run(
    curve: Sequence[float],
    losses: Sequence[float] | None = None,
    cfg: StabilityConfig = DEFAULT_STABILITY,
    status: str | None = None,
) -> Verdict:
    """Label one run from its per-epoch validation curve; see the module docstring."""
    epochs = len(curve)  # the run's epochs, scored or not
    at, values = judged_points([float(v) for v in curve])
    loss_values = [float(v) for v in losses] if losses is not None else []
    scan = _scan(values, cfg, at)
    smooth, rb_curve, collapse, dip, swing = scan.smooth, scan.rb, scan.collapse, scan.dip, scan.swing
    best, best_epoch, max_dd = scan.best, scan.best_epoch, scan.max_dd

    if best_epoch == 0:
        best = math.nan
    final = values[-1] if values else math.nan
    final_over_best = final / best if _finite(best) and best > 0 and _finite(final) else math.nan
    max_dd = min(max(max_dd, 0.0), 1.0)
    rb_end = rb_curve[-1] if rb_curve else math.nan
    end_level = smooth[-1] if smooth else math.nan
    ends_low = _finite(end_level) and _finite(rb_end) and end_level < cfg.final_ratio * rb_end
    end_text = f"{_pct(end_level / rb_end)} of its running best" if ends_low else ""

    bad_curve = [e for e, v in zip(at, values, strict=True) if not _finite(v)]
    bad_loss = [i + 1 for i, v in enumerate(loss_values) if not _finite(v)]
    events = collapse.events

    if status == "diverged" or bad_curve or bad_loss:
        if bad_curve:
            reason = f"validation metric is NaN/inf/missing at epoch {bad_curve[0]}"
        elif bad_loss:
            reason = f"training loss is NaN/inf at epoch {bad_loss[0]}"
        else:
            reason = "training reported status 'diverged'"
        label = "diverged"
    elif epochs < min_epochs(cfg):
        label = TOO_SHORT
        reason = (f"{epochs} epoch(s); judging needs at least {min_epochs(cfg)} "
                  f"(stability.grace_epochs={cfg.grace_epochs} + 1)")
    elif best < cfg.min_peak:
        label = "no_learning"
        reason = f"best {best:.4f} never reached min_peak {cfg.min_peak:g}"
    elif events >= 1 and (collapse.active or ends_low or events >= 2):
        if collapse.active:
            ending = f"ends collapsed at {_pct(final_over_best)} of best"
        elif ends_low:
            ending = f"ends at {end_text}"
        else:
            ending = f"ends on a recovery at {_pct(final_over_best)} of best"
        label = "collapsed"
        reason = (
            f"collapsed {events} time(s) below {_pct(cfg.collapse_ratio)} of the running best "
            f"for {collapse.below} epoch(s); best {best:.4f} at epoch {best_epoch}; {ending}"
        )
    elif dip.events >= 1:
        label = "unstable"
        kind = "one collapse that recovered" if events == 1 else f"{dip.events} dip(s)"
        reason = (
            f"{kind}: fell to <= {_pct(cfg.dip_ratio)} of the running best for "
            f"{dip.below} epoch(s); ends at {_pct(final_over_best)} of best"
        )
    elif swing.events > cfg.max_swings:
        label = "unstable"
        reason = (
            f"{swing.events} drawdowns deeper than {_pct(cfg.swing_ratio)} "
            f"(more than max_swings={cfg.max_swings})"
        )
    elif ends_low:
        label = "unstable"
        reason = (
            f"ends at {end_text} (below final_ratio {cfg.final_ratio:g}) without collapsing"
        )
    else:
        label = "stable"
        reason = (
            f"best {best:.4f} at epoch {best_epoch}, ends at {_pct(final_over_best)} of best, "
            f"max drawdown {_pct(max_dd)}"
        )

    return Verdict(
        label=label,
        epochs=epochs,
        best=best,
        best_epoch=best_epoch,
        final=final,
        final_over_best=final_over_best,
        max_drawdown=max_dd,
        collapse_events=events,
        epochs_collapsed=collapse.below,
        dips=dip.events,
        swings=swing.events,
        reason=reason,
    )


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; None below two values) of a list."""
    if not xs:
        return None, None
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) >= 2 else None
    return mean, std


def summarize_group(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Condense several runs (e.g. seeds of one method): counts per label and the mean and
    sample standard deviation (n - 1; None below two runs) of the finite best and final
    values.  ``all_stable`` is true only for a non-empty group whose runs are all stable."""
    counts = {label: 0 for label in LABELS}
    for v in verdicts:
        counts[v.label] = counts.get(v.label, 0) + 1
    bests = [v.best for v in verdicts if _finite(v.best)]
    finals = [v.final for v in verdicts if _finite(v.final)]
    best_mean, best_std = mean_std(bests)
    final_mean, final_std = mean_std(finals)
    return {
        "runs": len(verdicts),
        "counts": counts,
        "all_stable": bool(verdicts) and counts["stable"] == len(verdicts),
        "best_mean": best_mean,
        "best_std": best_std,
        "final_mean": final_mean,
        "final_std": final_std,
    }
