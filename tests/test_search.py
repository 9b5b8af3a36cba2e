"""yoloqat search: each run described by what it changed, its curves judged and plotted."""

from __future__ import annotations

import pytest

from yoloqat.analysis.records import ExpRecord
from yoloqat.analysis.search import markdown_table, search_row, select, setting_text
from yoloqat.cli import main
from yoloqat.errors import ExperimentsError


def _rec(name: str, params: dict, verdict: dict | None = None, qat: dict | None = None) -> ExpRecord:
    return ExpRecord(
        name=name, rev="0" * 40, kind="experiment", state="done", params=params,
        metrics={"verdict": verdict or {}, "qat": qat or {}},
    )


def test_setting_is_what_differs_from_the_defaults_after_the_preset():
    assert setting_text({"model": "yolo10n", "seed": 0, "qat.epochs": 10}) == "default"
    assert setting_text({"qat.lr0": 0.01, "qat.scaling": "learned", "data.path": "/x"}) == (
        "data.path=/x qat.lr0=0.01 qat.scaling=learned"
    )
    preset = setting_text({"preset": "reference_cpu", "qat.epochs": 12})
    assert preset.startswith("preset=reference_cpu ")
    assert "qat.epochs=12" in preset and "qat.scaling=decoupled" in preset and "qat.lrf=0.9" in preset
    assert "qat.init=scratch" in preset and "fp.control=false" in preset


def test_search_and_the_ladder_share_one_rule_for_what_makes_a_setting():
    """Other data, other stability rules or another export are other settings for both tools (the
    ladder never pools them, so search must not describe them as ``default``); the device, the
    fake-quant path and the tools' own params are nobody's setting."""
    from yoloqat.analysis.ladder_groups import setting_of

    base = {"model": "yolo10n", "ema": True, "qc": True, "seed": 0}
    for key, value in (("data.path", "/other"), ("stability.collapse_ratio", 0.4), ("export.opset", 20)):
        assert setting_text({**base, key: value}) == f"{key}={value}"
        assert (key, str(value)) in setting_of(_rec("x", {**base, key: value})).values
    for key, value in (("device", "cuda:0"), ("qat.fake_quant", "batched"), ("evaluate.batch", 2),
                       ("ladder.min_seeds", 3)):
        assert setting_text({**base, key: value}) == "default"
        assert key not in dict(setting_of(_rec("x", {**base, key: value})).values)


def test_rows_read_the_paired_verdicts_and_the_scale_drift():
    rec = _rec(
        "wd-accel", {"qat.scale_weight_decay": 0.05, "qat.scaling": "decoupled"},
        verdict={"label": "collapsed", "live_label": "collapsed", "live_best": 0.2, "live_best_epoch": 3,
                 "live_final": 0.01, "live_max_drawdown": 0.95, "ema_label": "collapsed", "ema_final": 0.02},
        qat={"epochs": 15, "osc/frac_oscillating": 0.012, "scale_ratio_geomean_final": 0.004, "seconds": 300.0},
    )
    row = search_row(rec)
    assert (row.live_label, row.live_best, row.live_best_epoch, row.live_final) == ("collapsed", 0.2, 3, 0.01)
    assert (row.scale_ratio_final, row.osc_final, row.epochs) == (0.004, 0.012, 15)
    table = markdown_table([row])
    assert "| wd-accel | `qat.scale_weight_decay=0.05 qat.scaling=decoupled` | 15 | collapsed | 0.2000 (3) |" in table
    assert "| 0.0100 | 0.950 | collapsed / 0.0200 | - | 0.0120 | 0.004 | 300 |" in table
    judged = search_row(rec, bnre=[0.1, 0.2, 0.25, 0.26, 0.27, 0.27])
    assert (judged.bnre_label, judged.bnre_final) == ("stable", 0.27)
    assert "| stable / 0.2700 |" in markdown_table([judged])


def test_unknown_experiment_names_are_one_error_naming_them():
    recs = [_rec("a", {}), _rec("b", {})]
    assert [r.name for r in select(recs, ["b", "a"])] == ["b", "a"]
    with pytest.raises(ExperimentsError, match=r"unknown experiment\(s\) zzz; known: a, b"):
        select(recs, ["a", "zzz"])
    failed = ExpRecord(name="a", rev="1" * 40, kind="experiment", state="failed", timestamp="2026-11-30T05:30")
    newer = ExpRecord(name="a", rev="2" * 40, kind="experiment", state="done", timestamp="2026-11-30T05:40")
    assert select([failed, recs[0], newer], ["a"])[0].rev == "2" * 40  # done and newest wins
    assert select([newer, failed], ["a"])[0].rev == "2" * 40


def test_search_cli_bad_json_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "show.json"
    bad.write_text("{not json")
    assert main(["search", "x", "--from-json", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("yoloqat search: error:")
    assert not (tmp_path / "out").exists()


def test_ladder_and_search_describe_a_preset_run_by_what_it_ran_with():
    from yoloqat.analysis.ladder_groups import setting_of
    from yoloqat.analysis.records import resolved_params

    params = {"model": "yolo10n", "ema": True, "qc": True, "seed": 1, "preset": "collapse_cpu",
              "qat.epochs": 10, "qat.optimizer": "AdamW", "qat.bn_reestimate": 16}
    resolved = resolved_params(params)
    assert (resolved["qat.epochs"], resolved["qat.optimizer"], resolved["qat.scale_weight_decay"]) == (
        15, "SGD", 0.05
    )
    assert resolved["qat.bn_reestimate"] == 16  # not a preset key: as given
    setting = dict(setting_of(_rec("x", params)).values)
    assert setting["qat.epochs"] == "15" and setting["qat.optimizer"] == "SGD"
    assert resolved_params({"preset": "gone", "qat.epochs": 10}) == {"preset": "gone", "qat.epochs": 10}


def test_the_ladder_finds_a_preset_setting_from_a_params_file_naming_the_preset():
    from yoloqat.analysis.ladder import configured_setting
    from yoloqat.analysis.ladder_groups import setting_of

    run = _rec("x", {"model": "yolo10n", "ema": True, "qc": True, "seed": 2, "preset": "collapse_cpu",
                     "qat.epochs": 10})
    assert configured_setting("yolo10n", {"preset": "collapse_cpu", "qat.epochs": 10}) == setting_of(run)


def test_a_running_experiment_row_shows_its_state_not_its_baselines_results():
    rec = ExpRecord(name="r", rev="0" * 40, kind="experiment", state="running", params={},
                    metrics={"verdict": {"live_label": "stable", "live_best": 0.2}, "qat": {"epochs": 10}})
    row = search_row(rec)
    assert (row.status, row.live_label, row.live_best, row.epochs) == ("running", None, None, None)
    assert "| r | `default` | - | running | - |" in markdown_table([row])
