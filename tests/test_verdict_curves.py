"""The verdict stage's curves: plot data that shows a value only where its stage ran, the PNG,
and the paired differences (EMA minus live, each repair minus its model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.test_verdict import STABLE, make_cfg, write_live_ema, write_qat, write_tsv
from yoloqat.curves.keys import EMA, LIVE
from yoloqat.curves.stability import fall_epochs
from yoloqat.paths import VERDICT_CURVES, VERDICT_CURVES_PNG, VERDICT_METRICS
from yoloqat.pipeline.verdict import judge_qat_run, plot_series
from yoloqat.pipeline.verdict_plot import COLOURS, PlotLine, write_curves_png, y_range
from yoloqat.provenance import read_metrics

FP = [0.01, 0.05, 0.1, 0.14, 0.16]  # train_fp: 5 epochs
CONTROL = [0.17, 0.18, 0.185, 0.19, 0.19, 0.2, 0.2, 0.2]  # fp_control: QAT's 8 epochs
LIVE_CURVE = [0.15, 0.2, 0.26, 0.27, 0.1, 0.27, 0.28, 0.28]
COLLAPSE = [0.05, 0.15, 0.226, 0.014, 0.097, 0.001, 0.01, 0.012]


def write_fp_and_control(root: Path) -> None:
    fp = root / "results/train_fp"
    write_tsv(fp / "plots/metrics/val/mAP50-95.tsv", "mAP50-95", FP)
    (fp / "metrics.json").write_text(json.dumps({"best": max(FP)}))
    control = root / "results/fp_control"
    write_tsv(control / "plots/metrics/val/mAP50-95.tsv", "mAP50-95", CONTROL)
    (control / "metrics.json").write_text(json.dumps({"best": max(CONTROL), "status": "completed"}))


def write_run(root: Path, ema: bool) -> None:
    """What the qat stage logs: val (deployed) and val_live always, val_ema only with EMA on."""
    write_fp_and_control(root)
    write_qat(root, STABLE if ema else LIVE_CURVE)
    plots = root / "results/qat/plots/metrics"
    write_tsv(plots / "val_live/mAP50-95.tsv", "mAP50-95", LIVE_CURVE)
    if ema:
        write_tsv(plots / "val_ema/mAP50-95.tsv", "mAP50-95", STABLE)


def plot_rows(root: Path) -> dict[str, dict[int, float]]:
    """curves.csv as {series: {epoch: value}}; every row must hold a number."""
    out: dict[str, dict[int, float]] = {}
    with (root / VERDICT_CURVES).open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["epoch", "series", "mAP50-95"]
        for row in reader:
            epoch, value = int(row["epoch"]), float(row["mAP50-95"])  # never an empty cell
            assert epoch not in out.setdefault(row["series"], {}), row
            out[row["series"]][epoch] = value
    return out


@pytest.mark.parametrize("ema", [False, True], ids=["ema_false", "default"])
def test_no_series_has_a_value_where_its_stage_did_not_run(tmp_path, ema):
    write_run(tmp_path, ema)
    judge_qat_run(make_cfg(tmp_path, ema=ema))
    rows = plot_rows(tmp_path)
    fp_epochs, qat_epochs = range(1, 6), range(6, 14)  # QAT epoch k at 5 + k
    expected = {"FP": fp_epochs, "FP continued": qat_epochs, "QAT live": qat_epochs}
    if ema:
        expected["QAT EMA"] = qat_epochs
    assert {s: sorted(v) for s, v in rows.items()} == {s: list(e) for s, e in expected.items()}
    assert "QAT EMA" not in rows or ema  # EMA off: no EMA line at all, not a line of zeros
    assert [rows["FP"][e] for e in fp_epochs] == FP
    assert [rows["FP continued"][e] for e in qat_epochs] == CONTROL
    assert [rows["QAT live"][e] for e in qat_epochs] == LIVE_CURVE
    if ema:
        assert [rows["QAT EMA"][e] for e in qat_epochs] == STABLE


def test_a_missing_epoch_and_absent_stages_leave_no_row(tmp_path):
    """No FP curve (qat.init=scratch) and no control: QAT starts at epoch 1; a diverged (NaN,
    never logged) epoch is a gap, not a zero."""
    write_qat(tmp_path, STABLE)
    plots = tmp_path / "results/qat/plots/metrics"
    write_live_ema(tmp_path, STABLE, STABLE)
    lines = (plots / "val_live/mAP50-95.tsv").read_text().splitlines()
    (plots / "val_live/mAP50-95.tsv").write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    judge_qat_run(make_cfg(tmp_path, ema=True))
    rows = plot_rows(tmp_path)
    assert set(rows) == {"QAT live", "QAT EMA"}
    assert sorted(rows["QAT EMA"]) == list(range(1, 9))
    assert sorted(rows["QAT live"]) == [1, 2, 3, 5, 6, 7, 8]  # epoch 4 was not logged


def test_repair_curves_are_plotted_judged_and_compared_with_their_model(tmp_path, capsys):
    write_run(tmp_path, ema=True)
    plots = tmp_path / "results/qat/plots/metrics"
    ema_qc = [v + 0.01 for v in STABLE]
    write_tsv(plots / "val_ema_qc/mAP50-95.tsv", "mAP50-95", ema_qc)
    write_tsv(plots / "val_live_qc/mAP50-95.tsv", "mAP50-95", COLLAPSE)
    out = judge_qat_run(make_cfg(tmp_path, ema=True, qat={"bits": 4, "repair_curves": ["qc"]}))
    assert out["ema_qc_minus_ema_best"] == pytest.approx(0.01)
    assert out["ema_qc_minus_ema_final"] == pytest.approx(0.01)
    assert out["ema_qc_minus_ema_max_drawdown"] == pytest.approx(0.0)
    assert out["live_qc_minus_live_best"] == pytest.approx(0.226 - 0.28)
    assert out["live_qc_minus_live_final"] == pytest.approx(0.012 - 0.28)
    assert out["ema_minus_live_best"] == pytest.approx(0.0)
    assert out["ema_minus_live_final"] == pytest.approx(0.0)
    written = read_metrics(tmp_path / VERDICT_METRICS)  # dvc exp show / diff see them as numbers
    assert written["ema_qc_minus_ema_best"] == out["ema_qc_minus_ema_best"]
    printed = capsys.readouterr().out.splitlines()
    assert "verdict: EMA + QC vs EMA: +0.0100 best, +0.0100 final, +0.000 max drawdown" in printed
    assert any(p.startswith("verdict: live + QC vs live: -0.0540 best, -0.2680 final") for p in printed)
    rows = plot_rows(tmp_path)
    assert sorted(rows) == ["FP", "FP continued", "QAT EMA", "QAT EMA + QC", "QAT live",
                            "QAT live + QC"]
    assert sorted(rows["QAT EMA + QC"]) == list(range(6, 14))


def test_differences_are_null_when_ema_is_off_or_a_repair_did_not_run(tmp_path, capsys):
    write_run(tmp_path, ema=False)
    out = judge_qat_run(make_cfg(tmp_path, ema=False, qat={"bits": 4, "repair_curves": ["qc"]}))
    assert out["ema_minus_live_best"] is None and out["ema_minus_live_max_drawdown"] is None
    assert out["live_qc_minus_live_best"] is None  # configured, but no curve logged
    assert "ema_qc_minus_ema_best" not in out  # EMA off: no EMA repair curve exists
    assert not [p for p in capsys.readouterr().out.splitlines() if " vs " in p]


def test_the_png_is_written_non_empty_with_markers_where_the_verdict_counted_falls(tmp_path):
    write_run(tmp_path, ema=True)
    write_tsv(tmp_path / "results/qat/plots/metrics/val_live/mAP50-95.tsv", "mAP50-95", COLLAPSE)
    out = judge_qat_run(make_cfg(tmp_path, ema=True))
    png = tmp_path / VERDICT_CURVES_PNG
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    # the markers are the verdict's: COLLAPSE falls once, at its epoch 4 (on the axis 5 + 4)
    assert out["live_collapse_events"] == len(fall_epochs(COLLAPSE)["collapses"]) == 1
    assert fall_epochs(COLLAPSE) == {"collapses": [4], "dips": [4]}


def test_a_run_without_any_curve_still_gets_a_png(tmp_path):
    write_qat(tmp_path, None, status="diverged", losses={})
    out = judge_qat_run(make_cfg(tmp_path))
    assert out["label"] == "diverged"
    assert (tmp_path / VERDICT_CURVES_PNG).stat().st_size > 0
    assert (tmp_path / VERDICT_CURVES).read_text() == "epoch,series,mAP50-95\n"


def test_y_range_is_fitted_to_the_data_not_to_zero():
    lines = [PlotLine("QAT live", [(6, 0.17), (7, 0.2)]), PlotLine("QAT EMA", [])]
    lo, hi = y_range(lines)
    assert 0.16 < lo < 0.17 and 0.2 < hi < 0.21
    assert y_range([PlotLine("FP", [])]) is None


def test_write_curves_png_draws_every_kind_of_line(tmp_path):
    lines = [PlotLine("FP", [(1, 0.1), (2, 0.2)]),
             PlotLine("QAT live", [(3, 0.2), (4, 0.05), (5, 0.19)], "unstable", [4], []),
             PlotLine("QAT EMA", [(3, 0.21), (4, 0.12), (5, 0.2)], "unstable", [], [4]),
             PlotLine("something new", [(3, 0.15)])]
    path = write_curves_png(tmp_path / "c.png", lines, "title", qat_start=3)
    assert path.stat().st_size > 10_000


def test_plot_series_lists_only_the_curves_that_ran():
    series = {LIVE: [0.1, 0.2], EMA: [0.1, 0.2]}
    names = [s.name for s in plot_series([], [], series, ema=False)]
    assert names == ["QAT live"]  # an EMA curve on disk but EMA off: not the run's curve
    lines = plot_series([0.1], [0.2, 0.3], series, ema=True)
    assert [(s.name, s.first_epoch) for s in lines] == [
        ("FP", 1), ("FP continued", 2), ("QAT live", 2), ("QAT EMA", 2)]


def test_dvc_plots_use_the_long_table_its_template_and_the_png():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    plots = {next(iter(p)) if isinstance(p, dict) else p: p for p in dvc["plots"]}
    val = plots["val_mAP50-95"]["val_mAP50-95"]
    assert val["y"] == {VERDICT_CURVES.as_posix(): "mAP50-95"} and val["x"] == "epoch"
    assert VERDICT_CURVES_PNG.as_posix() in plots
    outs = [next(iter(o)) for o in dvc["stages"]["verdict"]["outs"]]
    assert VERDICT_CURVES_PNG.as_posix() in outs
    template = json.loads((REPO / ".dvc/plots" / f"{val['template']}.json").read_text())
    colour = template["encoding"]["color"]
    assert colour["field"] == "series"  # one colour per curve; revisions differ by dash
    assert template["encoding"]["strokeDash"]["field"] == "rev"
    assert template["encoding"]["y"]["scale"] == {"zero": False}
    # the HTML's colours are the PNG's
    assert dict(zip(colour["sort"], colour["scale"]["range"], strict=True)) == COLOURS


def test_a_thinned_repair_curve_is_judged_on_its_scored_epochs_and_plotted_only_there(tmp_path):
    """qat.repair_every=3 over 8 epochs: the EMA + QC curve is logged at epochs 3, 6 and 8
    (DVCLive steps 2, 5, 7) and nowhere else; that is a schedule, not a divergence."""
    write_run(tmp_path, ema=True)
    path = tmp_path / "results/qat/plots/metrics/val_ema_qc/mAP50-95.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("timestamp\tstep\tmAP50-95\n1\t2\t0.21\n2\t5\t0.29\n3\t7\t0.29\n")
    cfg = make_cfg(tmp_path, ema=True, qat={"bits": 4, "repair_curves": ["qc"], "repair_every": 3})
    out = judge_qat_run(cfg)
    assert out["ema_qc_label"] == "stable"
    assert (out["ema_qc_best"], out["ema_qc_best_epoch"], out["ema_qc_final"]) == (0.29, 6, 0.29)
    assert out["ema_qc_minus_ema_final"] == pytest.approx(0.29 - STABLE[-1])
    assert plot_rows(tmp_path)["QAT EMA + QC"] == {5 + 3: 0.21, 5 + 6: 0.29, 5 + 8: 0.29}
    path.write_text("timestamp\tstep\tmAP50-95\n1\t2\t0.21\n2\t5\t0.29\n")  # the last is missing
    assert judge_qat_run(cfg)["ema_qc_label"] == "diverged"
