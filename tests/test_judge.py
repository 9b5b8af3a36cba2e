"""`yoloqat judge`: reading Ultralytics / DVCLive curves and printing verdicts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from yoloqat.analysis.judge import judge_main
from yoloqat.curves.reader import read_curve
from yoloqat.errors import CurveError

STABLE = [0.05, 0.12, 0.2, 0.25, 0.27, 0.28]
COLLAPSE = [0.05, 0.15, 0.25, 0.1, 0.03, 0.01]


def write_old_results_csv(path: Path, maps: list[float], nan_loss_at: int | None = None) -> Path:
    """A YOLOv5-style results.csv: header names and values padded with spaces."""
    cols = [
        "epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision",
        "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss",
        "val/obj_loss", "val/cls_loss", "x/lr0", "x/lr1", "x/lr2",
    ]
    lines = [",".join(f"{c:>20s}" for c in cols)]
    for e, m in enumerate(maps):
        box = "nan" if e == nan_loss_at else "0.05"
        vals = [str(e), box, "0.02", "0.01", "0.5", "0.4", str(m + 0.1), str(m),
                "0.04", "0.02", "0.01", "0.01", "0.01", "0.01"]
        lines.append(",".join(f"{v:>20s}" for v in vals))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_new_results_csv(path: Path, maps: list[float]) -> Path:
    """An Ultralytics 8.x results.csv (YOLOv8/10/11)."""
    header = (
        "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),"
        "metrics/recall(B),metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,"
        "val/dfl_loss,lr/pg0,lr/pg1,lr/pg2"
    )
    lines = [header]
    for e, m in enumerate(maps, start=1):
        lines.append(f"{e},{10 * e},1.5,2.0,1.0,0.5,0.4,{m + 0.1:.6g},{m:.6g},1.4,1.9,1.0,"
                     "0.001,0.001,0.001")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tsv(path: Path, name: str, values: list[float]) -> Path:
    lines = [f"timestamp\tstep\t{name}"]
    lines += [f"{1700000000000 + i}\t{i}\t{v}" for i, v in enumerate(values)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_dvclive_dir(root: Path, maps: list[float], losses: dict[str, list[float]]) -> Path:
    write_tsv(root / "plots/metrics/val/mAP50-95.tsv", "mAP50-95", maps)
    for name, vals in losses.items():
        write_tsv(root / f"plots/metrics/train/{name}.tsv", name, vals)
    return root


# --------------------------------------------------------------------------------------------
# read_curve


def test_old_style_results_csv_with_padded_headers(tmp_path):
    p = write_old_results_csv(tmp_path / "runs/old/results.csv", STABLE)
    c = read_curve(p)
    assert c.values == pytest.approx(STABLE)
    assert c.losses == pytest.approx([0.08] * len(STABLE))  # box + obj + cls, not val/*
    assert c.source == "ultralytics_csv"
    assert c.name == str(p)


def test_new_style_results_csv(tmp_path):
    p = write_new_results_csv(tmp_path / "results.csv", COLLAPSE)
    c = read_curve(p)
    assert c.values == pytest.approx(COLLAPSE)
    assert c.losses == pytest.approx([4.5] * len(COLLAPSE))


@pytest.mark.parametrize("column", ["metrics/mAP50-95", "val/mAP50-95"])
def test_other_map_column_names(tmp_path, column):
    p = tmp_path / "results.csv"
    p.write_text(f"epoch,{column}\n1,0.1\n2,0.2\n")
    c = read_curve(p)
    assert c.values == pytest.approx([0.1, 0.2])
    assert c.losses is None


def test_results_csv_resumed_epochs_keep_last_row(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("epoch,metrics/mAP50-95(B)\n1,0.1\n2,0.2\n2,0.25\n3,0.3\n")
    assert read_curve(p).values == pytest.approx([0.1, 0.25, 0.3])


def test_results_csv_nan_loss_is_read_as_nan(tmp_path):
    p = write_old_results_csv(tmp_path / "results.csv", STABLE, nan_loss_at=3)
    c = read_curve(p)
    assert c.losses is not None and math.isnan(c.losses[3])


def test_dvclive_tsv(tmp_path):
    p = write_tsv(tmp_path / "results/qat/plots/metrics/val/mAP50-95.tsv", "mAP50-95", COLLAPSE)
    c = read_curve(p)
    assert c.values == pytest.approx(COLLAPSE)
    assert c.losses is None
    assert c.source == "dvclive_tsv"


def test_dvclive_dir_with_losses(tmp_path):
    root = write_dvclive_dir(
        tmp_path / "results/qat",
        STABLE,
        {"box_loss": [1.0] * 6, "cls_loss": [2.0] * 6, "dfl_loss": [0.5] * 6},
    )
    write_tsv(root / "plots/metrics/train/lr.tsv", "lr", [0.1] * 6)  # not a loss
    c = read_curve(root)
    assert c.values == pytest.approx(STABLE)
    assert c.losses == pytest.approx([3.5] * 6)
    assert c.source == "dvclive_dir"


def test_dvclive_dir_without_losses(tmp_path):
    root = write_dvclive_dir(tmp_path / "qat", STABLE, {})
    assert read_curve(root).losses is None


def test_ultralytics_run_dir(tmp_path):
    write_new_results_csv(tmp_path / "runs/train/results.csv", STABLE)
    assert read_curve(tmp_path / "runs/train").values == pytest.approx(STABLE)


# --------------------------------------------------------------------------------------------
# errors


def test_no_map_column_names_the_file(tmp_path):
    p = tmp_path / "runs/x/results.csv"
    p.parent.mkdir(parents=True)
    p.write_text("epoch,train/box_loss,metrics/mAP50(B)\n1,0.5,0.3\n")
    with pytest.raises(CurveError) as e:
        read_curve(p)
    msg = str(e.value)
    assert str(p) in msg and "no mAP50-95 column" in msg
    assert "metrics/mAP50-95(B)" in msg and "metrics/mAP_0.5:0.95" in msg
    assert "\n" not in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("text", ["", "\n\n", "epoch,metrics/mAP50-95(B)\n"])
def test_empty_file_names_the_file(tmp_path, text):
    p = tmp_path / "results.csv"
    p.write_text(text)
    with pytest.raises(CurveError, match="results.csv") as e:
        read_curve(p)
    assert str(p) in str(e.value)


def test_missing_path_and_bad_dir(tmp_path):
    with pytest.raises(CurveError, match="does not exist"):
        read_curve(tmp_path / "nope.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CurveError, match="empty_dir"):
        read_curve(tmp_path / "empty_dir")


def test_bad_value_names_file_and_row(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("epoch,metrics/mAP50-95(B)\n1,0.1\n2,oops\n")
    with pytest.raises(CurveError, match=r"row 3 .*'oops'"):
        read_curve(p)


def test_tsv_with_two_value_columns(tmp_path):
    p = tmp_path / "m.tsv"
    p.write_text("step\ta\tb\n0\t0.1\t0.2\n")
    with pytest.raises(CurveError, match="m.tsv"):
        read_curve(p)


# --------------------------------------------------------------------------------------------
# judge_main


def test_table_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: default thresholds
    good = write_new_results_csv(tmp_path / "good/results.csv", STABLE)
    bad = write_dvclive_dir(tmp_path / "bad", COLLAPSE, {})
    assert judge_main([str(good), str(bad)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["path", "curve", "label", "best"]
    assert len(out) == 3
    assert out[1].split()[:3] == [str(good), "val", "stable"]
    assert out[2].split()[:3] == [str(bad), "val", "collapsed"]
    assert out[1].index("stable") == out[0].index("label")  # aligned columns


def test_json_output_parses(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = write_old_results_csv(tmp_path / "good/results.csv", STABLE)
    nan = write_old_results_csv(tmp_path / "nan/results.csv", STABLE, nan_loss_at=2)
    flat = write_tsv(tmp_path / "flat.tsv", "mAP50-95", [0.0] * 5)
    assert judge_main([str(good), str(nan), str(flat), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["stable", "diverged", "no_learning"]
    assert rows[0]["path"] == str(good) and rows[0]["best_epoch"] == 6
    assert rows[2]["final_over_best"] is None
    assert {"max_drawdown", "collapse_events", "epochs_collapsed", "source"} <= set(rows[0])


def test_params_stability_block_is_used(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    curve = write_tsv(tmp_path / "c.tsv", "mAP50-95", [0.1, 0.2, 0.3, 0.3, 0.1, 0.28, 0.3, 0.31])
    assert judge_main([str(curve), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["collapse_events"] == 1
    params = tmp_path / "p.yaml"
    params.write_text("stability:\n  collapse_ratio: 0.3\n  dip_ratio: 0.3\n")
    assert judge_main([str(curve), "--json", "--params", str(params)]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["collapse_events"] == 0 and row["label"] == "stable"


def test_invalid_params_stability_is_an_error(tmp_path, capsys):
    curve = write_tsv(tmp_path / "c.tsv", "mAP50-95", STABLE)
    params = tmp_path / "p.yaml"
    params.write_text("stability:\n  collapse_ratio: 2.0\n")
    assert judge_main([str(curve), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yoloqat judge: error: params: stability.collapse_ratio")


def test_error_exit_code_and_message(tmp_path, capsys):
    p = tmp_path / "results.csv"
    p.write_text("epoch,foo\n1,2\n")
    assert judge_main([str(p), "--params", str(tmp_path / "none.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith(f"yoloqat judge: error: {p}") and "judge: judge:" not in err
    assert len(err.splitlines()) == 1


def test_python_dash_m(tmp_path):
    p = write_new_results_csv(tmp_path / "results.csv", COLLAPSE)
    r = subprocess.run(
        [sys.executable, "-m", "yoloqat.analysis.judge", str(p), "--json"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["label"] == "collapsed"


def test_a_dvclive_dir_gives_one_row_per_val_curve_and_a_gap_is_diverged(tmp_path, capsys):
    """val (deployed), val_ema and val_live are each judged; a step missing from one val TSV
    while the run logged it elsewhere (DVCLive skips NaN) makes that curve diverged."""
    run = tmp_path / "qat"
    plots = run / "plots/metrics"
    write_tsv(plots / "val/mAP50-95.tsv", "mAP50-95", STABLE)
    write_tsv(plots / "val_ema/mAP50-95.tsv", "mAP50-95", STABLE)
    write_tsv(plots / "lr/pg0.tsv", "pg0", [0.001] * len(STABLE))
    live = plots / "val_live/mAP50-95.tsv"
    write_tsv(live, "mAP50-95", STABLE[:-1])  # the last epoch was NaN: never logged
    assert judge_main([str(run), "--json", "--params", str(tmp_path / "none.yaml")]) == 0
    rows = {r["curve"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["val/mAP50-95", "val_ema/mAP50-95", "val_live/mAP50-95"]
    assert rows["val/mAP50-95"]["label"] == rows["val_ema/mAP50-95"]["label"] == "stable"
    assert rows["val_live/mAP50-95"]["label"] == "diverged"
    assert f"epoch {len(STABLE)}" in rows["val_live/mAP50-95"]["reason"]


def test_a_dir_without_a_val_curve_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty/plots/metrics/train").mkdir(parents=True)
    assert judge_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yoloqat judge: error:") and err.count("\n") == 1


def test_a_curve_no_longer_than_the_grace_period_is_too_short_not_stable(tmp_path, capsys, monkeypatch):
    """A 1-epoch results.csv said `stable`; judging needs grace_epochs + 1 (default 3) epochs."""
    monkeypatch.chdir(tmp_path)  # no params.yaml: grace_epochs=2
    one = write_new_results_csv(tmp_path / "one/results.csv", [0.25])
    two = write_new_results_csv(tmp_path / "two/results.csv", [0.2, 0.25])
    three = write_new_results_csv(tmp_path / "three/results.csv", [0.2, 0.25, 0.26])
    assert judge_main([str(one), str(two), str(three), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["too_short", "too_short", "stable"]
    assert rows[0]["reason"] == "1 epoch(s); judging needs at least 3 (stability.grace_epochs=2 + 1)"
    params = tmp_path / "p.yaml"
    params.write_text("stability:\n  grace_epochs: 0\n")
    assert judge_main([str(one), "--json", "--params", str(params)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] == "stable"


def test_the_deployed_curve_is_named_and_paired_differences_follow_the_table(tmp_path, capsys):
    """EMA on: val is the EMA model; under the table EMA minus live and each repair minus its
    model, in words (and in --json as the row's `minus`)."""
    run = tmp_path / "qat"
    plots = run / "plots/metrics"
    write_tsv(plots / "val/mAP50-95.tsv", "mAP50-95", STABLE)
    write_tsv(plots / "val_ema/mAP50-95.tsv", "mAP50-95", STABLE)
    write_tsv(plots / "val_live/mAP50-95.tsv", "mAP50-95", COLLAPSE)
    write_tsv(plots / "val_ema_qc/mAP50-95.tsv", "mAP50-95", [v + 0.01 for v in STABLE])
    none = str(tmp_path / "none.yaml")
    assert judge_main([str(run), "--params", none]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split("  ")[1] == "val (deployed: EMA)"
    assert out[-3] == ""
    assert out[-2] == f"{run}: EMA vs live: +0.0300 best, +0.2700 final, -0.933 max drawdown"
    assert out[-1] == f"{run}: EMA + QC vs EMA: +0.0100 best, +0.0100 final, +0.000 max drawdown"
    assert judge_main([str(run), "--json", "--params", none]) == 0
    rows = {r["curve"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["val/mAP50-95"]["deployed"] == "ema" and rows["val_ema/mAP50-95"]["deployed"] is None
    assert rows["val_ema/mAP50-95"]["minus"] == pytest.approx(
        {"curve": "val_live/mAP50-95", "best": 0.03, "final": 0.27, "max_drawdown": -0.14 / 0.15})
    assert rows["val_ema_qc/mAP50-95"]["minus"]["curve"] == "val_ema/mAP50-95"
    assert rows["val_live/mAP50-95"]["minus"] is None
    # EMA off: the run logs val and val_live, and val is the live model; nothing to compare
    (plots / "val_ema/mAP50-95.tsv").unlink()
    (plots / "val_ema_qc/mAP50-95.tsv").unlink()
    assert judge_main([str(run), "--params", none]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split("  ")[1] == "val (deployed: live)" and len(out) == 3
