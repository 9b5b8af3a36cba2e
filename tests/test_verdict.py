"""The verdict stage: DVCLive outputs of the qat stage -> results/verdict/metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from yoloqat.config import config_from_dict
from yoloqat.errors import VerdictError
from yoloqat.paths import VERDICT_METRICS
from yoloqat.pipeline.verdict import judge_qat_run
from yoloqat.provenance import metrics_only, read_metrics

STABLE = [0.05, 0.12, 0.2, 0.25, 0.27, 0.28, 0.275, 0.28]
COLLAPSE = [0.05, 0.15, 0.226, 0.014, 0.097, 0.001, 0.01, 0.012]


def write_tsv(path: Path, name: str, values: list[float]) -> None:
    """A DVCLive metric TSV (timestamp, step, value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"timestamp\tstep\t{name}"]
    lines += [f"{1764290000000 + 1000 * i}\t{i}\t{v}" for i, v in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")


def write_qat(
    root: Path, curve: list[float] | None, status: str = "completed",
    losses: dict[str, list[float]] | None = None,
) -> None:
    live = root / "results/qat"
    if curve is not None:
        write_tsv(live / "plots/metrics/val/mAP50-95.tsv", "mAP50-95", curve)
    n = len(curve or [])
    for name, values in (losses or {"box_loss": [1.5] * n, "cls_loss": [2.0] * n}).items():
        write_tsv(live / f"plots/metrics/train/{name}.tsv", name, values)
    write_tsv(live / "plots/metrics/val/box_loss.tsv", "box_loss", [9.0] * n)  # not training loss
    (live / "metrics.json").write_text(json.dumps({"status": status, "epochs": n, "step": n - 1}))


def make_cfg(root: Path, **top):
    raw = {"model": "yolo10s", "ema": False, "qc": True, "seed": 2, "qat": {"bits": 4}}
    raw.update(top)
    return config_from_dict(raw, root=root)


def test_stable_run_writes_the_verdict_and_run_params(tmp_path):
    write_qat(tmp_path, STABLE)
    out = judge_qat_run(make_cfg(tmp_path))
    written = read_metrics(tmp_path / VERDICT_METRICS)
    assert written == metrics_only(out) and "reason" not in written and "model" not in written
    assert out["label"] == "stable"
    assert out["best"] == 0.28 and out["best_epoch"] == 6 and out["final"] == 0.28
    assert out["final_over_best"] == 1.0
    assert out["collapse_events"] == 0 and out["epochs_collapsed"] == 0 and out["swings"] == 0
    assert out["max_drawdown"] == pytest.approx(0.0)  # 0.275 is not below the 3-epoch median
    assert out["status"] == "completed"
    assert {k: out[k] for k in ("model", "ema", "qc", "seed", "bits", "init")} == {
        "model": "yolo10s", "ema": False, "qc": True, "seed": 2, "bits": 4, "init": "fp",
    }
    assert "reason" in out and isinstance(out["reason"], str)
    # EMA off: the deployed curve is the live one; there is no EMA curve
    assert out["live_label"] == "stable" and out["live_best"] == 0.28
    assert out["ema_label"] is None and out["ema_best"] is None
    for key in ("gap_to_fp", "gap_mAP50-95", "w4a16_mAP50-95", "fp32_mAP50-95"):
        assert key not in out  # no evaluate / train_fp outputs here
    assert out["fp_best"] is None and out["fp_control_best"] is None
    assert out["qc_delta_mAP50-95"] is None


def test_collapse_curve_is_collapsed(tmp_path):
    write_qat(tmp_path, COLLAPSE)
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["label"] == "collapsed"
    assert out["best"] == 0.226 and out["best_epoch"] == 3
    assert out["collapse_events"] == 1  # 0.097 never gets back above 80 % of the running best
    assert out["epochs_collapsed"] == 4  # 0.097 is above half of the running best (0.15)
    assert out["max_drawdown"] == pytest.approx((0.15 - 0.001) / 0.15)  # rb: 3-epoch median


def test_diverged_status_wins_over_a_good_curve(tmp_path):
    write_qat(tmp_path, STABLE, status="diverged")
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["label"] == "diverged"
    assert "diverged" in out["reason"]


def test_diverged_before_the_first_validation_has_no_curve(tmp_path):
    write_qat(tmp_path, None, status="diverged", losses={})
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["label"] == "diverged"
    assert out["best"] is None and out["final"] is None and out["epochs"] == 0


def test_nan_training_loss_is_diverged(tmp_path):
    write_qat(tmp_path, STABLE, losses={"box_loss": [1.0] * 7 + [math.nan]})
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["label"] == "diverged"
    assert "loss" in out["reason"]


def test_evaluate_and_fp_numbers_are_copied(tmp_path):
    write_qat(tmp_path, STABLE)
    ev = {"status": "completed", "w4a16_mAP50-95": 0.26, "fp32_mAP50-95": 0.31,
          "gap_mAP50-95": 0.05, "size_ratio": 0.16}
    (tmp_path / "results/evaluate").mkdir(parents=True)
    (tmp_path / "results/evaluate/metrics.json").write_text(json.dumps(ev))
    (tmp_path / "results/train_fp").mkdir(parents=True)
    (tmp_path / "results/train_fp/metrics.json").write_text(json.dumps({"best": 0.33}))
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["w4a16_mAP50-95"] == 0.26
    assert out["fp32_mAP50-95"] == 0.31
    assert out["gap_mAP50-95"] == 0.05
    assert "size_ratio" not in out
    assert out["fp_best"] == 0.33
    assert out["gap_to_fp"] == pytest.approx(0.33 - 0.28)


def test_fp_best_falls_back_to_the_fp_curve(tmp_path):
    write_qat(tmp_path, STABLE)
    fp = tmp_path / "results/train_fp"
    write_tsv(fp / "plots/metrics/val/mAP50-95.tsv", "mAP50-95", [0.1, 0.34, 0.3])
    (fp / "metrics.json").write_text(json.dumps({"val": {"mAP50-95": 0.3}, "step": 2}))
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["fp_best"] == 0.34
    assert out["gap_to_fp"] == pytest.approx(0.06)


def write_live_ema(root: Path, live: list[float], ema: list[float]) -> None:
    plots = root / "results/qat/plots/metrics"
    write_tsv(plots / "val_live/mAP50-95.tsv", "mAP50-95", live)
    write_tsv(plots / "val_ema/mAP50-95.tsv", "mAP50-95", ema)


def test_paired_live_and_ema_curves_each_get_a_verdict(tmp_path, capsys):
    live = [0.2, 0.25, 0.28, 0.28, 0.1, 0.27, 0.28, 0.28]  # one collapse that recovered
    write_qat(tmp_path, STABLE)  # the deployed (EMA) curve
    write_live_ema(tmp_path, live, STABLE)
    out = judge_qat_run(make_cfg(tmp_path, ema=True))
    assert out["label"] == out["ema_label"] == "stable"
    assert out["live_label"] == "unstable" and out["live_collapse_events"] == 1
    assert out["live_best"] == 0.28 and out["live_dips"] == 1
    assert out["ema_best"] == out["best"] == 0.28
    # the answer as numbers: EMA minus live
    assert out["ema_minus_live_best"] == pytest.approx(0.0)
    assert out["ema_minus_live_final"] == pytest.approx(0.0)
    assert out["ema_minus_live_max_drawdown"] == pytest.approx(-(0.28 - 0.1) / 0.28)
    written = read_metrics(tmp_path / VERDICT_METRICS)
    assert written["ema_minus_live_max_drawdown"] == out["ema_minus_live_max_drawdown"]
    # ... and in words, in the stage's output
    assert ("verdict: EMA vs live: +0.0000 best, +0.0000 final, -0.643 max drawdown"
            in capsys.readouterr().out.splitlines())
    rows = (tmp_path / "results/verdict/curves.csv").read_text().splitlines()
    assert rows[0] == "epoch,series,mAP50-95"
    assert "5,QAT live,0.10000" in rows and "5,QAT EMA,0.27000" in rows and len(rows) == 1 + 16


def test_a_nan_epoch_in_the_live_curve_is_diverged(tmp_path):
    write_qat(tmp_path, STABLE)
    plots = tmp_path / "results/qat/plots/metrics"
    write_live_ema(tmp_path, STABLE, STABLE)
    lines = (plots / "val_live/mAP50-95.tsv").read_text().splitlines()
    (plots / "val_live/mAP50-95.tsv").write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    out = judge_qat_run(make_cfg(tmp_path, ema=True))
    assert out["live_label"] == "diverged" and "epoch 4" in out["live_reason"]
    assert out["label"] == "stable"


def test_qc_delta_and_the_equal_training_control(tmp_path):
    write_qat(tmp_path, STABLE)
    (tmp_path / "results/qc").mkdir(parents=True)
    (tmp_path / "results/qc/metrics.json").write_text(json.dumps(
        {"applied": True, "delta_mAP50-95": 0.004, "status": "applied"}))
    fp = tmp_path / "results/train_fp"
    write_tsv(fp / "plots/metrics/val/mAP50-95.tsv", "mAP50-95", [0.1, 0.2, 0.25])
    (fp / "metrics.json").write_text(json.dumps({"best": 0.25}))
    control = tmp_path / "results/fp_control"
    write_tsv(control / "plots/metrics/val/mAP50-95.tsv", "mAP50-95", [0.26, 0.3])
    (control / "metrics.json").write_text(json.dumps({"best": 0.3, "status": "completed"}))
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["qc_delta_mAP50-95"] == 0.004
    assert out["fp_best"] == 0.25 and out["fp_control_best"] == 0.3
    assert out["gap_to_fp"] == pytest.approx(0.3 - 0.28)  # equal training: the control
    rows = (tmp_path / "results/verdict/curves.csv").read_text().splitlines()
    assert rows[1:7] == ["1,FP,0.10000", "2,FP,0.20000", "3,FP,0.25000", "4,FP continued,0.26000",
                         "5,FP continued,0.30000", "4,QAT live,0.05000"]  # QAT epoch 1 at 3 + 1
    (tmp_path / "results/qc/metrics.json").write_text(json.dumps(
        {"applied": False, "delta_mAP50-95": 0.0, "status": "passed_through"}))
    assert judge_qat_run(make_cfg(tmp_path))["qc_delta_mAP50-95"] is None


def test_thresholds_come_from_the_stability_block(tmp_path):
    write_qat(tmp_path, [0.1, 0.2, 0.3, 0.3, 0.3, 0.2, 0.3, 0.3])
    assert judge_qat_run(make_cfg(tmp_path))["label"] != "collapsed"
    strict = make_cfg(tmp_path, stability={"collapse_ratio": 0.7, "dip_ratio": 0.7,
                                           "recovered_ratio": 0.9, "grace_epochs": 0})
    assert judge_qat_run(strict)["label"] == "unstable"  # one collapse that recovered


def test_missing_qat_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(VerdictError, match="results/qat/metrics.json not found") as err:
        judge_qat_run(make_cfg(tmp_path))
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)
    assert not (tmp_path / VERDICT_METRICS).exists()


def test_completed_run_without_a_curve_is_an_error(tmp_path):
    write_qat(tmp_path, None)
    with pytest.raises(VerdictError, match="mAP50-95.tsv not found"):
        judge_qat_run(make_cfg(tmp_path))


def test_metrics_without_status_is_an_error(tmp_path):
    write_qat(tmp_path, STABLE)
    (tmp_path / "results/qat/metrics.json").write_text(json.dumps({"best": 0.2}))
    with pytest.raises(VerdictError, match="no status"):
        judge_qat_run(make_cfg(tmp_path))


def test_broken_curve_is_a_verdict_error(tmp_path):
    write_qat(tmp_path, STABLE)
    (tmp_path / "results/qat/plots/metrics/val/mAP50-95.tsv").write_text("step\tmAP50-95\n0\tx\n")
    with pytest.raises(VerdictError, match="expected a number"):
        judge_qat_run(make_cfg(tmp_path))


def test_bn_reestimation_curve_gets_its_own_verdict_when_on(tmp_path):
    bnre = [0.2, 0.25, 0.28, 0.28, 0.1, 0.09, 0.08, 0.05]  # collapses to the end
    write_qat(tmp_path, STABLE)
    write_live_ema(tmp_path, STABLE, STABLE)
    write_tsv(tmp_path / "results/qat/plots/metrics/val_bnre/mAP50-95.tsv", "mAP50-95", bnre)
    on = judge_qat_run(make_cfg(tmp_path, ema=True, qat={"bits": 4, "bn_reestimate": 16}))
    assert on["bnre_label"] == "collapsed" and on["bnre_best"] == 0.28
    # the saved checkpoints carry the re-estimated statistics: the deployed label is that curve's
    assert on["label"] == "collapsed" and on["deployed_curve"] == "val_bnre"
    assert on["ema_label"] == "stable"
    off = judge_qat_run(make_cfg(tmp_path, ema=True))
    assert off["bnre_label"] is None and off["bnre_best"] is None
    assert off["label"] == "stable" and off["deployed_curve"] == "val"


def test_a_fall_inside_the_warm_up_does_not_count_the_same_fall_after_it_does(tmp_path):
    """Judged from the end of warm-up: grace = max(stability.grace_epochs, ceil(qat.warmup_epochs))."""
    write_qat(tmp_path, [0.20, 0.25, 0.28, 0.10, 0.28, 0.29, 0.30, 0.30])  # falls at epoch 4

    def label(warmup: float) -> str:
        return judge_qat_run(make_cfg(tmp_path, qat={"bits": 4, "warmup_epochs": warmup}))["label"]

    assert label(4.0) == "stable" and label(3.5) == "stable"  # epoch 4 is inside the warm-up
    assert label(3.0) == "unstable" and label(0.0) == "unstable"  # after it: a recovered collapse
    write_qat(tmp_path, [0.20, 0.25, 0.28])
    assert label(3.0) == "too_short" and label(0.0) == "stable"  # every epoch was warm-up


def test_every_curve_label_reaches_metrics_json_so_the_ladder_can_read_it():
    """Found on the first collapse_cpu run with repair curves: ema_qc_label (the curve the rung
    decides on) was dropped from metrics.json as prose, and the ladder fell back to EMA."""
    summary = {"label": "stable", "ema_qc_label": "stable", "live_bnre_qc_label": "collapsed",
               "bnre_label": "unstable", "deployed_curve": "val_bnre", "reason": "prose",
               "ema_qc_reason": "prose", "ema_qc_best": 0.29}
    assert metrics_only(summary) == {"label": "stable", "ema_qc_label": "stable",
                                     "live_bnre_qc_label": "collapsed", "bnre_label": "unstable",
                                     "deployed_curve": "val_bnre", "ema_qc_best": 0.29}
