"""`yoloqat exps`: EMA minus live and each repair minus its model, in the compact table."""

from __future__ import annotations

from yoloqat.analysis.exps import COLUMNS, format_exps
from yoloqat.analysis.records import ExpRecord


def record(name: str, verdict: dict, ema: bool = True, evaluate: dict | None = None) -> ExpRecord:
    return ExpRecord(
        name=name, rev=name * 4, kind="experiment", state="done", timestamp=name,
        params={"model": "yolo10n", "ema": ema, "qc": True, "seed": 0},
        metrics={"verdict": verdict, "qat": {"live_best": 0.25, "live_final": 0.2,
                                              "ema_best": 0.26, "ema_final": 0.25},
                 "evaluate": evaluate or {"w4a16_mAP50-95": 0.24, "fp32_mAP50-95": 0.3}},
    )


def cells(line: str) -> dict[str, str]:
    """Split a table line by the column widths."""
    out, pos = {}, 0
    for header, width, _ in COLUMNS:
        out[header] = line[pos:pos + width].strip()
        pos += width + 1
    return out


def test_ema_minus_live_and_the_fp_continued_column():
    new = record("a-new", {"ema_minus_live_best": 0.002, "ema_minus_live_final": 0.01,
                           "ema_minus_live_max_drawdown": -0.05, "ema_label": "stable",
                           "live_label": "unstable", "fp_control_best": 0.31})
    # judged before the differences were recorded: computed from the two curves' own numbers
    old = record("b-old", {"ema_best": 0.26, "live_best": 0.25, "ema_final": 0.25,
                           "live_final": 0.2, "ema_max_drawdown": 0.01,
                           "live_max_drawdown": 0.2})
    off = record("c-off", {"ema_minus_live_best": None, "fp_control_best": None}, ema=False)
    lines = format_exps([new, old, off]).splitlines()
    header = lines[0]
    assert "E-L best" in header and "E-L fin" in header and "E-L dd" in header
    assert "FP cont." in header and "FP32" not in header
    assert max(len(line) for line in lines) <= 160
    a, b, c = (cells(line) for line in lines[1:4])
    assert (a["E-L best"], a["E-L fin"], a["E-L dd"]) == ("+0.0020", "+0.0100", "-0.05")
    assert (b["E-L best"], b["E-L fin"], b["E-L dd"]) == ("+0.0100", "+0.0500", "-0.19")
    assert (c["E-L best"], c["E-L fin"], c["E-L dd"]) == ("-", "-", "-")
    assert a["FP cont."] == "0.3000"  # evaluate's FP32 model is the FP-continued one
    assert b["FP cont."] == c["FP cont."] == "-"  # no FP-continued model: not this column's number
    assert len(lines) == 4  # no repair curves: no second table


def test_repair_curves_get_a_second_table():
    rec = record("a-rep", {"ema_qc_label": "stable", "ema_qc_minus_ema_best": 0.061,
                           "ema_qc_minus_ema_final": 0.121, "ema_qc_minus_ema_max_drawdown": -0.3,
                           "live_bnre_label": "collapsed", "live_bnre_best": 0.2, "live_best": 0.25,
                           "live_bnre_final": 0.1, "live_final": 0.2})
    lines = format_exps([rec, record("b-none", {})]).splitlines()
    start = lines.index("repair curves, minus the model they repair (best, final, max drawdown):")
    assert lines[start + 1].split() == ["experiment", "curve", "best", "final", "max", "dd",
                                        "verdict"]
    rows = [line.split() for line in lines[start + 2:]]
    assert rows == [["a-rep", "live", "+", "BN", "re-est.", "-0.0500", "-0.1000", "-", "collapsed"],
                    ["a-rep", "EMA", "+", "QC", "+0.0610", "+0.1210", "-0.30", "stable"]]
