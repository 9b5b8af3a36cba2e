"""yoloqat remedies: per variant, one curve of a group of seed runs judged, tabulated, plotted."""

from __future__ import annotations

from pathlib import Path

import pytest

from yoloqat.analysis import remedies
from yoloqat.analysis.records import ExpRecord
from yoloqat.analysis.remedies import Variant, parse_variant, variant_row, variant_table
from yoloqat.cli import main
from yoloqat.errors import ExperimentsError

STABLE = [0.10, 0.20, 0.25, 0.26, 0.27, 0.27]
COLLAPSED = [0.10, 0.25, 0.26, 0.05, 0.04, 0.03]


def _rec(name: str, verdict: dict | None = None, **metrics: dict) -> ExpRecord:
    return ExpRecord(name=name, rev=name.ljust(40, "0"), kind="experiment", state="done",
                     metrics={"verdict": verdict or {}, "qat": {"status": "completed"}, **metrics})


def test_variant_text_parses_and_bad_text_is_one_error_naming_it():
    assert parse_variant("BN re-est.=bnre:a, b,c") == Variant("BN re-est.", "bnre", ("a", "b", "c"))
    for bad in ("x=loss:a", "x=live", "=live:a", "x=live:", "live:a"):
        with pytest.raises(ExperimentsError, match=r"--variant .* is not allowed; expected LABEL=CURVE:exp1"):
            parse_variant(bad)


def test_curves_are_judged_unless_the_verdict_stored_a_label():
    recs = [_rec("a"), _rec("b", verdict={"ema_label": "unstable"}), _rec("c")]
    curves = [{"ema": STABLE}, {"ema": STABLE}, {"ema": None}]
    row = variant_row(Variant("EMA", "ema", ("a", "b", "c")), recs, curves)
    assert row.labels == ("stable", "unstable")  # b: the run's own stored verdict wins
    assert row.missing == ("c",) and row.stable == 1
    assert row.bests == (0.27, 0.27) and row.finals == (0.27, 0.27)
    collapsed = variant_row(Variant("live", "live", ("a",)), recs[:1], [{"live": COLLAPSED}])
    assert collapsed.labels == ("collapsed",) and collapsed.bests == (0.26,) and collapsed.finals == (0.03,)
    table = variant_table([row, collapsed])
    assert "| EMA | ema | 2 | 1/2 | stable, unstable (left out: c) | 0.270 ± 0.000 | 0.270 ± 0.000 | - |" in table
    assert "| live | live | 1 | 0/1 | collapsed | 0.260 | 0.030 | - |" in table


def test_report_writes_tables_and_plot(tmp_path, monkeypatch):
    runs = {
        "s0": _rec("s0", qc={"before_mAP50-95": 0.2, "after_mAP50-95": 0.28, "delta_mAP50-95": 0.08},
                   evaluate={"w4a16_mAP50-95": 0.281}),
        "s1": _rec("s1"),
    }
    runs["s1"].metrics["qat"].update(seconds=321.4, frac_frozen_final=0.1234)
    curves = {"s0": {"live": COLLAPSED, "ema": STABLE}, "s1": {"live": STABLE, "ema": STABLE}}
    monkeypatch.setattr(remedies, "read_curves", lambda rec, repo=".": curves[rec.name])
    variants = [parse_variant("none=live:s0,s1"), parse_variant("EMA=ema:s0,s1")]
    report, _tables = remedies.write_remedies_report(tmp_path / "out", variants, runs)
    text = report.read_text()
    assert "| none | live | 2 | 1/2 | collapsed, stable | 0.265 ± 0.007 | 0.150 ± 0.170 | - |" in text
    # QC corrected the EMA model of s0 only (s1 has no qc metrics): no mean over part of the runs
    assert "| EMA | ema | 2 | 2/2 | stable, stable | 0.270 ± 0.000 | 0.270 ± 0.000 | - |" in text
    # endpoints vs the first live row, paired by position (no seed params): AUC = mean of all
    # epochs (no warm-up), STABLE 1.35 / 6 = 0.225, COLLAPSED 0.73 / 6; EMA - live: 0.103, 0
    assert ("| EMA | 2/2 | 0.270 ± 0.000 | 0.270 ± 0.000 | 0.000 ± 0.000 | 0.225 ± 0.000 "
            "| +0.052 [-inf, +inf] | 0.500/1.000 | - |") in text
    assert "paired by position in the variant" in text
    assert "| s0 | 0.2000 -> 0.2800 (+0.0800) | 0.2810 | - | - |" in text
    assert "| s1 | - -> - (-) | - | 321 | 0.123 |" in text
    assert "yoloqat remedies --variant 'none=live:s0,s1' --variant 'EMA=ema:s0,s1'" in text
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_remedies_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "show.json"
    bad.write_text("{not json")
    assert main(["remedies", "--variant", "x=live:a", "--from-json", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["remedies", "--variant", "x=loss:a", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("yoloqat remedies: error:") for line in err)
    assert "'x=loss:a' is not allowed" in err[1]
    assert not (tmp_path / "o").exists()


def test_runs_not_done_are_left_out_not_read(tmp_path, monkeypatch):
    """A running experiment's workspace holds its baseline's results: never count them."""
    running = ExpRecord(name="r", rev="r".ljust(40, "0"), kind="experiment", state="running",
                        metrics={"verdict": {"ema_label": "stable"}, "qc": {"delta_mAP50-95": 0.5}})
    done = _rec("d")
    row = variant_row(Variant("EMA", "ema", ("d", "r")), [done, running], [{"ema": COLLAPSED}, {"ema": STABLE}])
    assert row.labels == ("collapsed",) and row.missing == ("r running",)
    assert "| r | running | - | - | - |" in remedies.run_table([done, running])


def test_qc_result_goes_on_the_row_of_the_model_qc_corrected():
    qc = {"after_mAP50-95": 0.3}
    ema_on = ExpRecord(name="e", rev="e" * 40, kind="experiment", state="done", params={"ema": True},
                       metrics={"verdict": {}, "qat": {}, "qc": qc})
    bnre_on = ExpRecord(name="b", rev="b" * 40, kind="experiment", state="done",
                        params={"ema": True, "qat.bn_reestimate": 16}, metrics={"verdict": {}, "qat": {}, "qc": qc})
    ema_off = ExpRecord(name="o", rev="o" * 40, kind="experiment", state="done", params={"ema": False},
                        metrics={"verdict": {}, "qat": {}, "qc": qc})
    assert [remedies.deployed_curve(r) for r in (ema_on, bnre_on, ema_off)] == ["ema", "bnre", "live"]
    c = {"live": STABLE, "ema": STABLE, "bnre": STABLE}
    assert variant_row(Variant("x", "ema", ("e",)), [ema_on], [c]).qc_after == (0.3,)
    assert variant_row(Variant("x", "live", ("e",)), [ema_on], [c]).qc_after == ()
    assert variant_row(Variant("x", "bnre", ("b",)), [bnre_on], [c]).qc_after == (0.3,)
    assert variant_row(Variant("x", "ema", ("b",)), [bnre_on], [c]).qc_after == ()
    assert variant_row(Variant("x", "live", ("o",)), [ema_off], [c]).qc_after == (0.3,)


def test_a_repair_curve_is_a_variant_read_from_the_run_and_judged_on_its_scored_epochs():
    """qat.repair_curves logs e.g. val_ema_qc/mAP50-95 (thinned by qat.repair_every: None at
    the skipped epochs); remedies reads it as the curve ``ema_qc``."""
    from yoloqat.analysis.exp_curves import curves_view

    assert parse_variant("EMA+QC=ema_qc:a") == Variant("EMA+QC", "ema_qc", ("a",))
    assert parse_variant("x=live_bnre_qc:a").curve == "live_bnre_qc"
    with pytest.raises(ExperimentsError, match="ema_bnre_bnre"):
        parse_variant("x=ema_bnre_bnre:a")
    view = curves_view({"qat": {"val_ema_qc/mAP50-95": [None, 0.20, None, 0.05],
                                "val_live/mAP50-95": COLLAPSED}})
    assert str(view["ema_qc"]) == "[nan, 0.2, nan, 0.05]" and view["live"] == COLLAPSED
    assert view["live_bnre"] is None and view["ema"] is None
    row = variant_row(Variant("EMA+QC", "ema_qc", ("a",)), [_rec("a")], [view])
    assert row.bests == (0.20,) and row.finals == (0.05,)


def _committed_remedies_reports():
    from tests.helpers import REPO

    for readme in sorted((REPO / "reports").glob("*/*/README.md")):
        lines = readme.read_text().splitlines()
        if len(lines) > 2 and lines[2].startswith("Written by `yoloqat remedies --from "):
            yield readme


@pytest.mark.parametrize("readme", list(_committed_remedies_reports()),
                         ids=lambda p: str(p.parent.relative_to(p.parents[2])))
def test_regenerate_each_committed_remedies_report_from_its_archives_byte_for_byte(readme, tmp_path,
                                                                                 monkeypatch):
    """A remedies README written from archived runs opens with its command: run again from the
    committed archives, it writes the same README."""
    import shlex

    from tests.helpers import REPO

    monkeypatch.chdir(REPO)
    text = readme.read_text()
    command = text.splitlines()[2].removeprefix("Written by `").split("`. ", 1)[0]
    argv = shlex.split(command)[1:]
    out = argv[argv.index("--out") + 1]
    assert Path(out) == readme.parent.relative_to(REPO)
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    assert main(argv) == 0
    again = (tmp_path / "out" / "README.md").read_text().replace(str(tmp_path / "out"), out)
    assert again == text


def test_the_committed_remedies_reports_are_found():
    assert any("remedies_recommended" in str(p) for p in _committed_remedies_reports())
