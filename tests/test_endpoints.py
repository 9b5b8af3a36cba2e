"""Continuous endpoints of a curve, the exact paired sign-flip test, and the endpoint tables."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from yoloqat.analysis import endpoint_table as et
from yoloqat.analysis.exp_curves import EMA_TSV, LIVE_TSV
from yoloqat.analysis.ladder_groups import group_runs
from yoloqat.analysis.paired import sign_flip
from yoloqat.analysis.records import ExpRecord
from yoloqat.analysis.remedies import Variant
from yoloqat.config import StabilityConfig
from yoloqat.curves.endpoints import Endpoints, endpoints, warmup_skip
from yoloqat.curves.stability import after_warmup, classify_run

# --------------------------------------------------------------------------------------------
# endpoints of one curve


def test_endpoints_of_a_hand_made_curve():
    e = endpoints([0.1, 0.3, 0.2, 0.25, 0.15])
    assert (e.epochs, e.skip, e.diverged, e.best, e.best_epoch, e.final) == (5, 0, False, 0.3, 2, 0.15)
    assert e.final_over_best == pytest.approx(0.5)
    assert e.drawdown == pytest.approx(0.15)  # 0.3 - min(0.2, 0.25, 0.15)
    assert e.auc == pytest.approx(0.2)  # (0.1 + 0.3 + 0.2 + 0.25 + 0.15) / 5
    assert endpoints([0.1, 0.3, 0.2, 0.25, 0.15], skip=1).auc == pytest.approx(0.225)  # 0.9 / 4
    assert endpoints([0.1, 0.3, 0.2, 0.25, 0.15], skip=4).auc == pytest.approx(0.15)


def test_drawdown_is_zero_when_the_peak_is_last_and_a_repeated_peak_counts_from_the_first():
    assert endpoints([0.1, 0.2, 0.3]).drawdown == 0.0
    tied = endpoints([0.3, 0.1, 0.3])
    assert tied.best_epoch == 1 and tied.drawdown == pytest.approx(0.2)
    assert endpoints([0.2]).as_dict() == {
        "epochs": 1, "skip": 0, "diverged": False, "best": 0.2, "best_epoch": 1, "final": 0.2,
        "final_over_best": 1.0, "drawdown": 0.0, "auc": 0.2}


def test_a_nan_or_inf_makes_the_curve_diverged_with_no_endpoints():
    for bad in (math.nan, math.inf, -math.inf):
        e = endpoints([0.1, 0.2, bad, 0.3])
        assert e == Endpoints(epochs=4, skip=0, diverged=True)
        assert e.best is e.final is e.drawdown is e.auc is e.final_over_best is None


def test_empty_curve_zero_best_and_nothing_after_warm_up():
    assert endpoints([]) == Endpoints(0, 0, False)
    zero = endpoints([0.0, 0.0])
    assert zero.best == 0.0 and zero.final_over_best is None and zero.auc == 0.0
    assert endpoints([0.1, 0.2], skip=2).auc is None
    with pytest.raises(ValueError):
        endpoints([0.1], skip=-1)


@pytest.mark.parametrize(("warmup", "skip"), [
    (0, 0), (0.0, 0), (0.5, 1), (1, 1), (3.0, 3), (3.2, 4), (None, 0), ("x", 0), (math.nan, 0),
    (-1, 0),
])
def test_warmup_skip_is_the_ceiling_of_the_warm_up(warmup, skip):
    assert warmup_skip(warmup) == skip


# --------------------------------------------------------------------------------------------
# the paired sign-flip test


def brute_force(d):
    """P(T* >= T), P(T* <= T), P(|T*| >= |T|) over every sign vector, by direct enumeration."""
    t = sum(d)
    flips = [sum(e * x for e, x in zip(signs, d, strict=True))
             for signs in itertools.product((1, -1), repeat=len(d))]
    eps = 1e-9
    n = len(flips)
    return (sum(f >= t - eps for f in flips) / n, sum(f <= t + eps for f in flips) / n,
            sum(abs(f) >= abs(t) - eps for f in flips) / n)


def test_all_positive_differences_give_one_over_two_to_the_n():
    three = sign_flip([0.01, 0.02, 0.03])
    assert (three.p_greater, three.p_less, three.p_two_sided) == (1 / 8, 1.0, 1 / 4)
    assert three.exact and three.flips == 8 and three.mean == pytest.approx(0.02)
    assert three.sd == pytest.approx(0.01)
    ten = sign_flip([0.5] * 10)
    assert (ten.p_greater, ten.p_less, ten.p_two_sided) == (1 / 1024, 1.0, 2 / 1024)
    neg = sign_flip([-0.01, -0.02, -0.03])
    assert (neg.p_greater, neg.p_less, neg.p_two_sided) == (1.0, 1 / 8, 1 / 4)


def test_zeros_and_ties():
    # a zero difference is the same under either sign: p as without it
    assert sign_flip([0.0, 1.0, 1.0, 1.0]).p_greater == 1 / 8
    # |d| ties: T = 1; T* over 8 flips: 3 (x1), 1 (x3), -1 (x3), -3 (x1)
    tie = sign_flip([1.0, 1.0, -1.0])
    assert (tie.p_greater, tie.p_less, tie.p_two_sided) == (4 / 8, 7 / 8, 1.0)
    # float rounding of equal sums is a tie: 0.1 + 0.2 - 0.3 is T = 0, and 4 of 8 T* equal it
    rounding = sign_flip([0.1, 0.2, -0.3])
    assert (rounding.p_greater, rounding.p_less, rounding.p_two_sided) == (5 / 8, 5 / 8, 1.0)
    zeros = sign_flip([0.0] * 6)
    assert (zeros.p_greater, zeros.p_two_sided, zeros.low, zeros.high) == (1.0, 1.0, 0.0, 0.0)
    assert sign_flip([]) is None and sign_flip([0.2]).sd is None
    with pytest.raises(ValueError):
        sign_flip([0.1, math.nan])


def test_p_values_equal_a_brute_force_enumeration():
    rng = random.Random(3)
    for n in (1, 2, 4, 7, 9):
        d = [round(rng.uniform(-1, 1), 2) for _ in range(n)]
        r = sign_flip(d)
        assert (r.p_greater, r.p_less, r.p_two_sided) == pytest.approx(brute_force(d)), d


def test_interval_is_the_exact_inversion_of_the_test():
    # K = floor(0.025 * 2**n): 0 for n <= 5 (no finite interval), 1 for n = 6, 3 for n = 7
    assert (sign_flip([1, 2, 3, 4, 5]).low, sign_flip([1, 2, 3, 4, 5]).high) == (-math.inf, math.inf)
    six = sign_flip([1, 2, 3, 4, 5, 6])
    assert (six.low, six.high) == (1.0, 6.0)  # the smallest and largest subset mean
    seven = sign_flip([1, 2, 3, 4, 5, 6, 7])
    # subset means, smallest: 1, 1.5 ({1,2}), 2 ({2}, {1,3}, {1,2,3}); largest: 7, 6.5, 6
    assert (seven.low, seven.high) == (2.0, 6.0)
    # any level: the K-th smallest / largest of the 127 subset means, K = floor(0.25 * 128) = 32
    means = sorted(sum(s) / len(s) for k in range(1, 8) for s in itertools.combinations(range(1, 8), k))
    half = sign_flip([1, 2, 3, 4, 5, 6, 7], level=0.5)
    assert (half.low, half.high) == (means[31], means[-32]) == (3.5, 4.5)
    # duality: the interval leaves 0 out exactly when the two-sided p is <= 5 %
    rng = random.Random(7)
    for _ in range(40):
        d = [rng.uniform(-0.3, 1) for _ in range(rng.randint(6, 10))]
        r = sign_flip(d)
        assert (r.low > 0 or r.high < 0) == (r.p_two_sided <= 0.05), d


def test_more_than_16_pairs_draw_random_flips_with_a_fixed_seed():
    r = sign_flip([1.0] * 20)
    assert not r.exact and r.flips == 65536 and r.p_greater == 1 / 65536
    d = [random.Random(1).uniform(-1, 2) for _ in range(18)]
    assert sign_flip(d) == sign_flip(d)  # reproducible
    assert sign_flip(d, max_exact=18).p_greater == pytest.approx(sign_flip(d).p_greater, abs=0.01)


# --------------------------------------------------------------------------------------------
# judged from the end of warm-up


def test_grace_is_at_least_the_warm_up():
    cfg = StabilityConfig()  # grace_epochs = 2
    assert after_warmup(cfg, 0.0) is cfg and after_warmup(cfg, 2.0) is cfg
    assert after_warmup(cfg, 3.0).grace_epochs == 3 and after_warmup(cfg, 3.5).grace_epochs == 4
    assert after_warmup(StabilityConfig(grace_epochs=5), 3.0).grace_epochs == 5
    dip_at_4 = [0.20, 0.25, 0.28, 0.10, 0.28, 0.29, 0.30, 0.30]
    assert classify_run(dip_at_4, cfg=after_warmup(cfg, 4.0)).label == "stable"  # inside warm-up
    assert classify_run(dip_at_4, cfg=after_warmup(cfg, 3.0)).label == "unstable"  # after it


# --------------------------------------------------------------------------------------------
# the ladder's endpoint table

LIVE = {0: [0.10, 0.20, 0.30, 0.10, 0.20], 1: [0.10, 0.25, 0.20, 0.05, 0.10],
        2: [0.20, 0.30, 0.30, 0.30, 0.30]}
EMA = {0: [0.10, 0.20, 0.30, 0.30, 0.30], 1: [0.10, 0.20, 0.25, 0.25, 0.25],
       2: [0.20, 0.30, 0.30, 0.30, 0.40]}
EMA_QC = {0: [0.10, 0.20, math.nan, 0.30, 0.30], 1: [0.12, 0.22, 0.27, 0.27, 0.27],
          2: [0.22, 0.32, 0.32, 0.32, 0.42]}
LABELS = {"live": ("unstable", "collapsed", "stable"), "ema": ("stable",) * 3,
          "ema_qc": ("diverged", "stable", "stable"), "live_qc": ("stable",) * 3}


def record(seed: int, warmup: float = 1.0) -> ExpRecord:
    verdict = {"label": LABELS["ema"][seed]}
    for key, labels in LABELS.items():
        verdict.update({f"{key}_label": labels[seed], f"{key}_best": 0.5, f"{key}_final": 0.4})
    params = {"model": "yolo10n", "ema": True, "qc": True, "seed": seed, "qat.bits": 4,
              "qat.init": "fp", "qat.warmup_epochs": warmup}
    return ExpRecord(name=f"s{seed}", rev=f"rev{seed}", kind="experiment", state="done",
                     params=params, metrics={"qat": {"status": "completed"}, "verdict": verdict})


def reader(rec: ExpRecord, path: str) -> list[float] | None:
    seed = rec.params["seed"]
    curves = {LIVE_TSV: LIVE, EMA_TSV: EMA, et.curve_tsv("ema_qc"): EMA_QC}
    return curves[path][seed] if path in curves else None  # live_qc: not readable


def test_ladder_rows_exact_endpoints_and_paired_difference():
    (group,) = group_runs([record(s) for s in (0, 1, 2)])
    rows = {r.name: r for r in et.group_rows(group, reader)}
    assert list(rows) == ["live", "EMA", "live+QC", "EMA+QC"]  # only the curves present
    live, ema = rows["live"], rows["EMA"]
    # qat.warmup_epochs = 1: the AUC is the mean of epochs 2..5
    assert live.column("auc") == pytest.approx([0.20, 0.15, 0.30])
    assert live.column("drawdown") == pytest.approx([0.20, 0.20, 0.0])
    assert live.column("best") == [0.30, 0.25, 0.30] and live.column("final") == [0.20, 0.10, 0.30]
    assert ema.column("auc") == pytest.approx([0.275, 0.2375, 0.325])
    assert (live.stable, live.judged, live.is_control, live.vs_live) == (1, 3, True, None)
    d = ema.vs_live  # AUC differences 0.075, 0.0875, 0.025: all positive
    assert d.n == 3 and d.mean == pytest.approx(0.0625)
    assert (d.p_greater, d.p_two_sided, d.low, d.high) == (1 / 8, 1 / 4, -math.inf, math.inf)
    # a diverged curve has no endpoints, so its seed drops out of the paired difference
    qc = rows["EMA+QC"]
    assert qc.obs[0].label == "diverged" and set(qc.obs[0].values.values()) == {None}
    # AUC of seeds 1 and 2: (0.22 + 3 * 0.27) / 4 = 0.2575 and (3 * 0.32 + 0.42) / 4 = 0.345
    assert qc.vs_live.n == 2 and qc.vs_live.mean == pytest.approx((0.1075 + 0.045) / 2)
    # a curve that could not be read: best and final from the verdict, no drawdown or AUC
    lqc = rows["live+QC"]
    assert [o.from_curve for o in lqc.obs] == [False] * 3
    assert lqc.column("best") == [0.5] * 3 and lqc.column("auc") == [] and lqc.vs_live is None


def test_the_fp_continued_control_is_a_row_judged_by_todays_rules_and_paired_with_live():
    """fp.control trains the FP model on with QAT's recipe, unquantized: its curve is a row, so
    a dip it shows too is the recipe's (issue: the early dip of every collapse_cpu curve)."""
    from yoloqat.analysis.exp_curves import FP_CONTROL_TSV

    fp = {0: [0.20, 0.10, 0.30, 0.30, 0.30], 1: [0.20, 0.25, 0.30, 0.10, 0.30]}

    def with_fp(rec, path):
        if path == FP_CONTROL_TSV:
            return fp.get(rec.params["seed"])
        return reader(rec, path)

    def runs(control: bool):
        records = [record(s) for s in (0, 1, 2)]
        for rec in records:
            rec.params["fp.control"] = control
        return records

    (group,) = group_runs(runs(True))
    rows = {r.name: r for r in et.group_rows(group, with_fp)}
    assert list(rows)[-1] == "FP cont."
    control = rows["FP cont."]
    assert [o.pair for o in control.obs] == [0, 1]  # seed 2 trained none
    # warm-up 1 epoch: seed 0's dip at epoch 2 does not count, seed 1's at epoch 4 does
    assert [o.label for o in control.obs] == ["stable", "unstable"]
    assert control.column("auc") == pytest.approx([0.25, 0.2375])
    assert control.vs_live.n == 2 and control.vs_live.mean == pytest.approx((0.05 + 0.0875) / 2)
    assert "FP cont." not in {r.name for r in et.group_rows(group, reader)}
    # runs with fp.control off: a curve found for them (a stale output) is no control
    (off,) = group_runs(runs(False))
    assert "FP cont." not in {r.name for r in et.group_rows(off, with_fp)}


def test_ladder_table_cells_and_text_fit_160_columns():
    tables = et.ladder_tables(group_runs([record(s) for s in (0, 1, 2)]), reader)
    cells = [et.row_cells(r) for r in tables[0].rows]
    assert cells == [
        ["live", "1/3", "0.283 ± 0.029", "0.200 ± 0.100", "0.133 ± 0.115", "0.217 ± 0.076",
         "(control)", "-", "1 collapsed, 1 unstable"],
        ["EMA", "3/3", "0.317 ± 0.076", "0.317 ± 0.076", "0.000 ± 0.000", "0.279 ± 0.044",
         "+0.063 [-inf, +inf]", "0.125/0.250", "-"],  # 0.0625 + float rounding
        ["live+QC", "3/3", "0.500 ± 0.000", "0.400 ± 0.000", "-", "-", "-", "-", "-"],
        ["EMA+QC", "2/3", "0.345 ± 0.106 (2)", "0.345 ± 0.106 (2)", "0.000 ± 0.000 (2)",
         "0.301 ± 0.062 (2)", "+0.076 [-inf, +inf] (2)", "0.250/0.500",
         "1 diverged"],
    ]
    text = et.ladder_text(tables)
    lines = text.splitlines()
    assert lines[0] == "Endpoints: yolo10n default (seeds 0, 1, 2), AUC from epoch 2"
    assert lines[1].split()[:6] == ["curve", "stable", "best", "final", "drawdown", "AUC"]
    assert max(len(line) for line in lines) <= 160
    data = et.ladder_json(tables)
    assert data[0]["auc_skip_epochs"] == 1 and data[0]["rows"][1]["vs_live"]["p_greater"] == 0.125
    assert data[0]["rows"][1]["vs_live"]["low"] is None  # -inf is not JSON


# --------------------------------------------------------------------------------------------
# the remedies report's endpoint table


def test_remedies_rows_pair_each_variant_with_the_first_live_row_by_seed():
    recs = {f"s{s}": record(s, warmup=0.0) for s in (0, 1, 2)}
    curves = {f"s{s}": {"live": LIVE[s], "ema": EMA[s], "bnre": None} for s in (0, 1, 2)}
    variants = [Variant("EMA", "ema", ("s2", "s1", "s0")), Variant("none", "live", ("s0", "s1", "s2")),
                Variant("BN re-est.", "bnre", ("s0", "s1", "s2"))]
    rows, pairing = et.remedies_rows(variants, recs, curves,
                                     lambda rec, curve, series: LABELS[curve][rec.params["seed"]])
    assert pairing == "seed" and [r.name for r in rows] == ["EMA", "none", "BN re-est."]
    ema, live, bnre = rows
    assert live.is_control and bnre.obs == () and bnre.vs_live is None
    # no warm-up: the AUC is the mean of all 5 epochs; live 0.18, 0.14, 0.28 (seeds 0, 1, 2)
    assert ema.column("auc") == pytest.approx([0.30, 0.21, 0.24]) and ema.vs_live.n == 3
    assert ema.vs_live.mean == pytest.approx((0.06 + 0.07 + 0.02) / 3)
    text = et.remedies_text(rows, pairing)
    assert text.splitlines()[0].startswith("| variant | stable | best | final | drawdown | AUC |")
    assert ("| none | 1/3 | 0.283 ± 0.029 | 0.200 ± 0.100 | 0.133 ± 0.115 | 0.200 ± 0.072 | (control) | - "
            "| 1 collapsed, 1 unstable |") in text
    assert "| EMA | 3/3 | 0.317 ± 0.076 | 0.317 ± 0.076 | 0.000 ± 0.000 | 0.250 ± 0.046 | +0.050 [-inf, +inf] " \
        "| 0.125/0.250 | - |" in text
    assert "| BN re-est. | 0/0 | - | - | - | - | - | - | - |" in text
    assert max(len(line) for line in text.splitlines()[:5]) <= 160


def test_endpoints_of_a_thinned_curve_use_its_scored_epochs():
    # repair_every=2 over 8 epochs: scored 2, 4, 6, 8; the AUC after 3 warm-up epochs is the
    # mean of the scored epochs 4, 6, 8
    nan = math.nan
    e = endpoints([nan, 0.2, nan, 0.28, nan, 0.01, nan, 0.012], skip=3)
    assert (e.epochs, e.diverged, e.best, e.best_epoch, e.final) == (8, False, 0.28, 4, 0.012)
    assert e.drawdown == 0.28 - 0.01
    assert e.auc == math.fsum([0.28, 0.01, 0.012]) / 3
    assert endpoints([nan, 0.2, nan, 0.28, nan, 0.01, nan, nan]).diverged  # the last is missing
