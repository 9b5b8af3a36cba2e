"""The stability verdict: one test per shape of curve, plus exact counts on a hand-made curve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from yoloqat.config import StabilityConfig
from yoloqat.curves.stability import (
    LABELS,
    Verdict,
    classify_run,
    fall_epochs,
    running_best,
    smoothed,
    summarize_group,
)

# The seed's real failure (YOLOv10m, W4A16 QAT on COCO), per-epoch anchors from
# method.md; epochs in between are linearly interpolated, epoch 1 is a guess.
SEED_ANCHORS = [
    (1, 0.010),
    (13, 0.204),
    (16, 0.025),
    (29, 0.226),
    (33, 0.014),
    (49, 0.097),
    (55, 0.001),
    (76, 0.012),
]


def seed_curve(last_epoch: int = 76) -> list[float]:
    ep, val = zip(*SEED_ANCHORS, strict=True)
    return [float(v) for v in np.interp(np.arange(1, last_epoch + 1), ep, val)]


# --------------------------------------------------------------------------------------------
# the smoothed running best (exact values)


def test_smoothed_is_a_trailing_median_and_running_best_its_max():
    values = [0.1, 0.3, 0.2, 0.5, 0.2, float("nan"), 0.4]
    assert smoothed(values, 3) == pytest.approx([0.1, 0.2, 0.2, 0.3, 0.2, 0.2, 0.4])
    assert running_best(smoothed(values, 3)) == pytest.approx([0.1, 0.2, 0.2, 0.3, 0.3, 0.3, 0.4])
    assert smoothed(values, 1)[:5] == values[:5]  # window 1: the raw curve


# --------------------------------------------------------------------------------------------
# stable shapes


def test_monotonic_rise_is_stable():
    v = classify_run(list(np.linspace(0.02, 0.35, 30)))
    assert v.label == "stable"
    assert v.best_epoch == 30
    assert v.max_drawdown == 0.0
    assert v.collapse_events == 0 and v.swings == 0 and v.dips == 0 and v.epochs_collapsed == 0
    assert v.final_over_best == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(50))
def test_plateau_with_5_percent_noise_is_stable(seed):
    """A flat curve with 5 % (one sd) epoch-to-epoch noise over 76 epochs: always stable."""
    rng = np.random.default_rng(seed)
    curve = list(0.30 * (1.0 + rng.normal(0.0, 0.05, 76)))
    v = classify_run(curve)
    assert v.label == "stable", v.reason


def test_a_single_noisy_high_epoch_does_not_raise_the_running_best():
    curve = [0.30] * 6 + [0.45] + [0.30] * 6
    v = classify_run(curve)
    assert v.best == pytest.approx(0.45)
    assert v.label == "stable", v.reason
    assert v.max_drawdown == pytest.approx(0.0)
    # raw running best (no smoothing): the spike makes the plateau look like a fall to 67 %
    assert classify_run(curve, cfg=StabilityConfig(smooth_epochs=1)).label == "unstable"


def test_from_scratch_start_is_not_a_collapse():
    # early noise before the run has learned: 0.021 -> 0.008 is not a fall
    curve = [0.0, 0.021, 0.008, 0.03, 0.02, 0.06, 0.09, 0.12, 0.16, 0.19, 0.22, 0.24, 0.26]
    v = classify_run(curve)
    assert v.label == "stable", v.reason
    assert v.collapse_events == 0 and v.dips == 0


def test_slow_late_decline_is_stable():
    curve = list(np.linspace(0.05, 0.30, 30)) + list(np.linspace(0.299, 0.285, 20))
    v = classify_run(curve)
    assert v.label == "stable", v.reason
    assert v.best == pytest.approx(0.30) and v.best_epoch == 30
    assert v.final_over_best == pytest.approx(0.95)
    assert v.max_drawdown < 0.05


def test_drops_before_min_peak_do_not_count():
    curve = [0.005, 0.001, 0.006, 0.0, 0.05, 0.1, 0.2, 0.3]
    v = classify_run(curve)
    assert v.collapse_events == 0 and v.swings == 0
    assert v.label == "stable"


# --------------------------------------------------------------------------------------------
# falls that recover: never stable


def test_a_40_percent_dip_that_fully_recovers_is_unstable():
    curve = [0.1, 0.2, 0.3, 0.3, 0.3, 0.18, 0.3, 0.3, 0.31, 0.3]
    v = classify_run(curve)
    assert v.dips == 1 and v.collapse_events == 0
    assert v.label == "unstable", v.reason


def test_two_one_epoch_dips_to_55_percent_are_unstable():
    curve = [0.1, 0.2, 0.3, 0.3, 0.3, 0.165, 0.3, 0.3, 0.3, 0.165, 0.3, 0.3]
    v = classify_run(curve)
    assert v.dips == 2 and v.collapse_events == 0
    assert v.label == "unstable", v.reason


def test_single_brief_recovered_collapse_is_unstable():
    curve = [0.1, 0.2, 0.3, 0.3, 0.1, 0.28, 0.3, 0.31, 0.3]
    v = classify_run(curve)
    assert v.label == "unstable"
    assert v.collapse_events == 1 and v.epochs_collapsed == 1 and v.dips == 1
    assert "collapse that recovered" in v.reason


def test_many_large_swings_without_a_dip_is_unstable():
    curve = [0.2, 0.4, 0.4, 0.4, 0.28, 0.4, 0.28, 0.4, 0.28, 0.4]  # three 30 % drawdowns
    v = classify_run(curve)
    assert v.collapse_events == 0 and v.dips == 0
    assert v.swings == 3
    assert v.label == "unstable"
    assert "max_swings" in v.reason
    assert classify_run(curve, cfg=StabilityConfig(max_swings=3)).label == "stable"


def test_ending_well_below_best_without_collapse_is_unstable():
    v = classify_run([0.1, 0.2, 0.4, 0.4, 0.38, 0.3, 0.28, 0.28])
    assert v.collapse_events == 0 and v.dips == 0
    assert v.label == "unstable", v.reason
    assert v.final_over_best == pytest.approx(0.7)


def test_grace_epochs_ignore_the_first_epochs():
    curve = [0.3, 0.1, 0.3, 0.3, 0.31, 0.3]
    assert classify_run(curve).label == "stable"  # epoch 2 is inside grace_epochs=2
    assert classify_run(curve, cfg=StabilityConfig(grace_epochs=0)).dips == 1


# --------------------------------------------------------------------------------------------
# collapses


def test_seed_failure_curve_is_collapsed():
    v = classify_run(seed_curve())
    assert v.label == "collapsed"
    assert v.best == pytest.approx(0.226) and v.best_epoch == 29
    assert v.final == pytest.approx(0.012)
    assert v.collapse_events == 2  # after epoch 13 and after epoch 29
    assert v.max_drawdown > 0.99


@pytest.mark.parametrize("last_epoch", [49, 50])
def test_seed_failure_truncated_on_a_recovery_is_still_collapsed(last_epoch):
    # ends on the partial recovery towards 0.097 (still below the recovered line)
    v = classify_run(seed_curve(last_epoch))
    assert v.label == "collapsed", v.reason
    assert v.collapse_events >= 1


@pytest.mark.parametrize("last_epoch", [29, 30])
def test_seed_failure_truncated_near_its_best_is_not_stable(last_epoch):
    # one collapse (epochs 15-20) that fully recovered to a new best: never "stable"
    v = classify_run(seed_curve(last_epoch))
    assert v.collapse_events == 1
    assert v.label == "unstable", v.reason


def test_early_peak_then_collapse():
    curve = list(np.linspace(0.05, 0.25, 8)) + list(np.linspace(0.2, 0.01, 20))
    v = classify_run(curve)
    assert v.label == "collapsed"
    assert v.best_epoch == 8
    assert v.collapse_events == 1
    assert "ends collapsed" in v.reason


def test_repeated_collapse_ending_on_partial_recovery_is_collapsed():
    # two collapses, then it climbs back to 70% of best: above the collapse line,
    # below final_ratio; a last-epoch test (final/best >= 0.5) would pass it
    curve = [0.1, 0.2, 0.3, 0.3, 0.05, 0.28, 0.3, 0.3, 0.04, 0.1, 0.2, 0.21]
    v = classify_run(curve)
    assert v.label == "collapsed"
    assert v.collapse_events == 2
    assert v.final_over_best == pytest.approx(0.7)


def test_repeated_collapse_ending_near_best_is_still_collapsed():
    curve = [0.1, 0.2, 0.3, 0.3, 0.05, 0.29, 0.3, 0.3, 0.04, 0.28, 0.29, 0.3]
    v = classify_run(curve)
    assert v.final_over_best > 0.9
    assert v.label == "collapsed"
    assert v.collapse_events == 2
    assert "ends on a recovery" in v.reason


def test_single_collapse_that_ends_low_is_collapsed():
    curve = [0.1, 0.2, 0.3, 0.3, 0.1, 0.26, 0.2, 0.18, 0.18]
    v = classify_run(curve)
    assert v.label == "collapsed", v.reason
    assert v.collapse_events == 1


def test_hand_made_curve_exact_numbers():
    curve = [0.10, 0.20, 0.40, 0.40, 0.15, 0.10, 0.25, 0.35, 0.45, 0.45, 0.20, 0.42, 0.40]
    # smooth (median of 3): .1 .15 .2 .4 .4 .15 .15 .25 .35 .45 .45 .42 .42
    # running best:         .1 .15 .2 .4 .4 .4  .4  .4  .4  .45 .45 .45 .45
    v = classify_run(curve)
    assert v.epochs == 13
    assert v.best == pytest.approx(0.45) and v.best_epoch == 9
    assert v.final == pytest.approx(0.40)
    assert v.max_drawdown == pytest.approx(0.75)  # epoch 6: (0.4 - 0.1) / 0.4
    # collapse 1: epochs 5-6 below .2, epoch 7 (.25) not yet >= .32, epoch 8 (.35) recovers;
    # collapse 2: epoch 11 (.20 < .225), epoch 12 (.42 >= .36) recovers
    assert v.collapse_events == 2
    assert v.epochs_collapsed == 3
    assert v.dips == 2
    assert v.swings == 2
    assert v.label == "collapsed"  # two collapses, though it ends at 89% of best


def test_wobbling_around_the_collapse_line_is_one_event():
    curve = [0.4, 0.4, 0.4, 0.19, 0.21, 0.19, 0.21, 0.19, 0.33, 0.4]
    v = classify_run(curve)
    assert v.collapse_events == 1
    assert v.epochs_collapsed == 3
    assert v.label == "unstable"


def test_thresholds_come_from_the_config():
    curve = [0.1, 0.2, 0.3, 0.3, 0.1, 0.28, 0.3, 0.31, 0.3]  # one fall to 33% of best
    assert classify_run(curve).collapse_events == 1
    loose = StabilityConfig(collapse_ratio=0.3, dip_ratio=0.3, recovered_ratio=0.8)
    v = classify_run(curve, cfg=loose)
    assert v.collapse_events == 0 and v.dips == 0
    assert v.label == "stable"  # one swing <= max_swings, ends near best


# --------------------------------------------------------------------------------------------
# diverged and no_learning


def test_nan_in_curve_is_diverged():
    v = classify_run([0.1, 0.2, float("nan"), float("nan")])
    assert v.label == "diverged"
    assert "epoch 3" in v.reason
    assert v.best == pytest.approx(0.2)
    d = v.as_dict()
    assert d["final"] is None and d["final_over_best"] is None
    json.dumps(d, allow_nan=False)


def test_nan_or_inf_in_losses_is_diverged():
    curve = list(np.linspace(0.05, 0.3, 5))
    assert classify_run(curve, losses=[3.0, 2.0, float("nan"), 1.0, 1.0]).label == "diverged"
    assert classify_run(curve, losses=[3.0, float("inf"), 1, 1, 1]).label == "diverged"
    assert classify_run(curve, losses=[3.0, 2.0, 1.5, 1.2, 1.0]).label == "stable"


def test_status_diverged_wins():
    assert classify_run([0.1, 0.2, 0.3], status="diverged").label == "diverged"
    assert classify_run([0.1, 0.2, 0.3], status="finished").label == "stable"


def test_flat_zero_is_no_learning():
    v = classify_run([0.0] * 20)
    assert v.label == "no_learning"
    assert v.collapse_events == 0 and v.max_drawdown == 0.0
    assert v.final_over_best is not None and math.isnan(v.final_over_best)
    assert v.as_dict()["final_over_best"] is None


def test_empty_curve_is_too_short():
    v = classify_run([])
    assert v.label == "too_short"
    assert v.epochs == 0 and v.best_epoch == 0
    json.dumps(v.as_dict(), allow_nan=False)


@pytest.mark.parametrize("curve", [[0.3], [0.1, 0.3], [0.3, 0.05], [0.0, 0.0]])
def test_no_more_epochs_than_the_grace_period_is_too_short(curve):
    """grace_epochs=2: falls in epochs 1-2 never count, so 1 or 2 epochs show nothing."""
    v = classify_run(curve)
    assert v.label == "too_short" and v.epochs == len(curve)
    assert v.reason == (f"{len(curve)} epoch(s); judging needs at least 3 "
                        "(stability.grace_epochs=2 + 1)")
    assert classify_run([*curve, *[0.3] * (3 - len(curve))]).label != "too_short"  # 3 epochs: judged


def test_too_short_follows_grace_epochs_and_diverged_still_wins():
    assert classify_run([0.3], cfg=StabilityConfig(grace_epochs=0)).label == "stable"
    assert classify_run([0.3, 0.3], cfg=StabilityConfig(grace_epochs=2)).label == "too_short"
    assert classify_run([0.3, float("nan")]).label == "diverged"
    assert classify_run([0.3], status="diverged").label == "diverged"
    assert summarize_group([classify_run([0.3])])["counts"]["too_short"] == 1
    assert summarize_group([classify_run([0.3])])["all_stable"] is False


# --------------------------------------------------------------------------------------------


def test_verdict_is_frozen_and_as_dict_is_json():
    v = classify_run(seed_curve())
    assert isinstance(v, Verdict)
    with pytest.raises(AttributeError):
        v.label = "stable"  # type: ignore[misc]
    d = json.loads(json.dumps(v.as_dict(), allow_nan=False))
    assert d["label"] == "collapsed" and d["best_epoch"] == 29
    assert set(d) >= {
        "label", "epochs", "best", "best_epoch", "final", "final_over_best",
        "max_drawdown", "collapse_events", "epochs_collapsed", "dips", "swings", "reason",
    }


def test_summarize_group():
    vs = [
        classify_run([0.1, 0.2, 0.3]),
        classify_run([0.1, 0.2, 0.5]),
        classify_run(seed_curve()),
    ]
    s = summarize_group(vs)
    assert s["runs"] == 3
    assert set(s["counts"]) == set(LABELS)
    assert s["counts"]["stable"] == 2 and s["counts"]["collapsed"] == 1
    assert s["all_stable"] is False
    assert s["best_mean"] == pytest.approx((0.3 + 0.5 + 0.226) / 3)
    assert s["best_std"] == pytest.approx(float(np.std([0.3, 0.5, 0.226], ddof=1)))
    assert s["final_mean"] == pytest.approx((0.3 + 0.5 + 0.012) / 3)
    json.dumps(s, allow_nan=False)

    one = summarize_group(vs[:1])
    assert one["all_stable"] is True and one["best_std"] is None
    empty = summarize_group([])
    assert empty["runs"] == 0 and empty["all_stable"] is False and empty["best_mean"] is None


# --------------------------------------------------------------------------------------------
# thinned curves (qat.repair_every): values at every k-th epoch and the last, judged on those

NAN = math.nan


def test_scored_epochs_are_every_kth_and_the_last():
    from yoloqat.curves.reader import scored_epochs

    assert scored_epochs(15, 4) == [4, 8, 12, 15]
    assert scored_epochs(15, 5) == [5, 10, 15]
    assert scored_epochs(3, 5) == [3]  # k beyond the run: the last epoch only
    assert scored_epochs(4, 1) == [1, 2, 3, 4]
    assert scored_epochs(0, 2) == []


def test_a_thinned_curve_is_judged_on_its_scored_epochs_with_their_epoch_numbers():
    from yoloqat.curves.reader import judged_points

    rising = [NAN, 0.12, NAN, 0.25, NAN, 0.28, NAN, 0.28]  # repair_every=2 over 8 epochs
    assert judged_points(rising) == ([2, 4, 6, 8], [0.12, 0.25, 0.28, 0.28])
    v = classify_run(rising)
    assert (v.label, v.epochs, v.best_epoch, v.final) == ("stable", 8, 6, 0.28)
    falls = [NAN, 0.2, NAN, 0.28, NAN, 0.01, NAN, 0.012]
    v = classify_run(falls)
    assert (v.label, v.best_epoch, v.collapse_events, v.epochs_collapsed) == ("collapsed", 4, 1, 2)
    assert fall_epochs(falls) == {"collapses": [6], "dips": [6]}  # the real epoch, not the 3rd point


@pytest.mark.parametrize("curve", [
    [NAN, 0.2, NAN, 0.28, NAN, 0.27, NAN, NAN],  # the last epoch is always scored: missing
    [NAN, 0.2, NAN, NAN, NAN, 0.27, NAN, 0.28],  # a scheduled epoch missing
    [NAN, 0.2, 0.21, 0.28, NAN, 0.27, NAN, 0.28],  # a value off the schedule
    [0.1, NAN, 0.2, NAN, 0.27, NAN, 0.28, 0.28],  # every epoch logged but the even ones
], ids=["no-last", "hole", "extra", "odd"])
def test_a_gap_off_the_thinning_schedule_is_still_missing_and_diverged(curve):
    v = classify_run(curve)
    assert v.label == "diverged" and "NaN/inf/missing" in v.reason
