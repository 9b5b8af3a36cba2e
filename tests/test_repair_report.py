"""The committed repair-curve table is regenerated from the committed archive, byte for byte."""

from __future__ import annotations

import pytest

from tests.helpers import REPO
from yoloqat.analysis.repair_report import table_from_archive
from yoloqat.cli import main

STUDY = REPO / "reports" / "collapse_repairs"


# every study folder with archived runs and a repair table (collapse_repairs, analog, ...)
STUDIES = sorted(p.parent for p in (REPO / "reports").glob("*/table.md") if (p.parent / "runs").is_dir())


def test_every_archived_study_has_a_table():
    assert STUDY in STUDIES


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_regenerate_the_committed_repair_table_from_its_archive_byte_for_byte(study):
    assert table_from_archive(study / "runs") == (study / "table.md").read_text()


def test_repairs_command_prints_the_table_and_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    assert main(["repairs", "--from", str(STUDY / "runs"), "--out", str(tmp_path / "t.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "t.md").read_text() == (STUDY / "table.md").read_text()
    assert "| cc-rep-s0 | EMA+QC |" in printed and "| cc-rep-s0 | FP cont. | unstable |" in printed
    assert main(["repairs", "--from", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("yoloqat repairs: error: --from ")


def test_mechanism_table_puts_each_epoch_curves_beside_its_mismatch_clipping_and_scales():
    from yoloqat.analysis.mechanism_report import mechanism_sections
    from yoloqat.analysis.records import ExpRecord

    qat = {"val_live/mAP50-95": [0.1, 0.2], "val_ema/mAP50-95": [0.15, 0.01],
           "val_ema_bnre/mAP50-95": [0.16, 0.25],
           "mech_ema/bn_logvar_mean": [0.05, 1.5], "mech_ema/bn_logvar_worst": [0.2, 9.0],
           "mech_ema_aug/bn_logvar_mean": [0.04, 0.3], "mech_ema_bnre/bn_logvar_mean": [0.01, 0.02],
           "mech_ema/bn_mean_shift_mean": [0.1, 0.7], "mech_ema/clipped_mean": [0.005, 0.0],
           "mech_ema/clipped_max": [0.03, 0.0], "mech_ema/scale_ratio_median": [0.9, 0.5],
           "mech_ema/bn_var_below_fp16": [0.0, 12.0],
           "mech_ema/out_score_max_mean": [0.6125, 0.00125], "mech_ema/out_above_001": [187.5, 0.0625],
           "mech_live/out_score_max_mean": [0.9, 0.9]}  # the live model's: not in the table
    with_mech = ExpRecord(name="m", rev="r", kind="experiment", state="done", params={"ema": True},
                          curves={"qat": qat})
    without = ExpRecord(name="n", rev="r", kind="experiment", state="done", params={"ema": True},
                        curves={"qat": {"val_ema/mAP50-95": [0.1]}})
    text = mechanism_sections([without, with_mech])
    assert text.splitlines()[1] == "## Mechanism per epoch: m"
    rows = text.splitlines()[5:]
    assert rows == [
        "| 1 | - | 0.100 | 0.150 | 0.160 | 0.0500 / 0.2000 | 0.0400 | 0.0100 | 0.1000 | 0.0050 / 0.0300 | 0.9000 | 0 | 0.6125 | 187.5 |",
        "| 2 | - | 0.200 | 0.010 | 0.250 | 1.5000 / 9.0000 | 0.3000 | 0.0200 | 0.7000 | 0.0000 / 0.0000 | 0.5000 | 12 | 0.0013 | 0.1 |",
    ]
    # a run archived before the output statistics existed prints '-' in their columns
    del qat["mech_ema/out_score_max_mean"], qat["mech_ema/out_above_001"]
    assert mechanism_sections([with_mech]).splitlines()[-1].endswith("| 12 | - | - |")
    assert mechanism_sections([without]) == ""


# every study folder with archived runs and a ladder report of its own setting
LADDER_STUDIES = sorted(
    p.parent for p in (REPO / "reports").glob("*/ladder.txt")
    if (p.parent / "runs").is_dir() and (p.parent / "ladder_params.yaml").is_file()
)


def test_the_failure_study_has_a_ladder_report():
    assert STUDY in LADDER_STUDIES


@pytest.mark.parametrize("study", LADDER_STUDIES, ids=lambda p: p.name)
def test_regenerate_the_committed_ladder_endpoints_from_the_archive_byte_for_byte(study, capsys):
    """<study>/ladder.txt is `yoloqat ladder --from runs --no-report --params
    ladder_params.yaml` (the study's setting, e.g. collapse_cpu seeds 0-9): the runs pool into
    one setting (fp.seed and the measurement-only params do not split it, params added since the
    oldest run read as their defaults), and repair curves whose stored verdict has no labels for
    them are judged by today's rules from their curves, in the endpoint rows and the rung."""
    assert main(["ladder", "--from", str(study / "runs"), "--no-report",
                 "--params", str(study / "ladder_params.yaml")]) == 0
    printed = capsys.readouterr().out
    assert printed == (study / "ladder.txt").read_text()
    assert "EMA+QC        " in printed
    assert "other setting(s) not pooled" not in printed
    if study == STUDY:
        assert "yolo10n  preset=collapse_cpu  " in printed


def test_cumulative_decay_is_the_scale_groups_lr_times_wd_times_steps_per_epoch():
    from yoloqat.analysis.mechanism_report import cumulative_decay
    from yoloqat.analysis.records import ExpRecord

    rec = ExpRecord(name="d", rev="r", kind="experiment", state="done",
                    params={"qat.scaling": "decoupled", "qat.scale_weight_decay": 0.5},
                    metrics={"qat": {"steps": 20, "epochs": 2}},
                    curves={"qat": {"lr/pg2": [0.5, 0.5], "lr/pg10": [0.01, 0.02],
                                    "lr/pg0": [0.1, 0.2]}})
    assert cumulative_decay(rec) == pytest.approx([0.05, 0.15], abs=1e-15)  # pg10 is the last group
    rec.params["qat.scale_weight_decay"] = 0.0
    assert cumulative_decay(rec) == [0.0, 0.0]


def test_an_archived_run_with_bad_stability_rules_is_one_error_naming_the_key(tmp_path, capsys):
    import json

    run = json.loads((STUDY / "runs" / "cc-rep-s0.json").read_text())
    run["params"]["stability.collapse_ratio"] = 1.5
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cc-rep-s0.json").write_text(json.dumps(run))
    assert main(["repairs", "--from", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stability.collapse_ratio" in err[0] and "1.5" in err[0]
    assert not (tmp_path / "t.md").exists()


def test_the_fp_control_curve_is_read_by_one_rule_fp_control_as_resolved():
    """The repair table, the endpoint rows and the ladder read a run's FP-continued control
    through one rule: fp.control as the run resolved it (a preset may set it), never a stale
    curve of a run that trained none, nor a run from before the param."""
    from yoloqat.analysis.exp_curves import fp_control_ran, fp_control_series
    from yoloqat.analysis.records import ExpRecord
    from yoloqat.analysis.repair_report import run_rows

    curves = {"qat": {"val_live/mAP50-95": [0.1, 0.2]}, "fp_control": {"val/mAP50-95": [0.3, 0.4]}}

    def rec(params):
        return ExpRecord(name="r", rev="r", kind="experiment", state="done",
                         params={"ema": True, **params}, curves=curves)

    on, off = rec({"fp.control": True}), rec({"fp.control": False})
    by_preset = rec({"fp.control": True, "preset": "reference"})  # the preset turns it off
    old = rec({})  # before the param existed
    assert [fp_control_ran(r) for r in (on, off, by_preset, old)] == [True, False, False, False]
    assert fp_control_series(on, curves) == [0.3, 0.4]
    assert fp_control_series(off, curves) is fp_control_series(old, curves) is None
    assert any("| FP cont. |" in row for row in run_rows(on))
    assert not any("| FP cont. |" in row for r in (off, by_preset, old) for row in run_rows(r))


def test_cost_table_sets_a_run_without_repair_curves_beside_one_with_them():
    from yoloqat.analysis.records import ExpRecord
    from yoloqat.analysis.repair_report import cost_table

    params = {"seed": 5, "qat.scale_weight_decay": 0.05}
    on = ExpRecord("on", "r1", "experiment", "done", metrics={"qat": {
        "epochs": 15, "seconds": 1200.0, "repair_seconds": 720.0, "repair_time_ratio": 2.5,
        "mechanism_seconds": 30.1}},
        params={**params, "preset": "collapse_cpu", "qat.repair_curves": ["bnre", "qc"],
                "qat.repair_every": 2})
    off = ExpRecord("off", "r2", "experiment", "done", metrics={"qat": {"epochs": 15, "seconds": 480.0}},
                    params={**params, "preset": "none", "qat.repair_curves": [], "qat.repair_every": 1})
    # another seed without curves is no twin of `on`
    other = ExpRecord("other-seed", "r4", "experiment", "done",
                      metrics={"qat": {"epochs": 15, "seconds": 510.4}},
                      params={**params, "seed": 6, "qat.repair_curves": []})
    untimed = ExpRecord("failed", "r3", "experiment", "failed")
    rows = cost_table([on, off, other, untimed]).splitlines()[-4:]
    assert rows == ["|---|---|---|---|---|---|---|",
                    "| off | 15 | 480.0 | - | - | - | - |",
                    "| on | 15 | 1200.0 | 720.0 | 2.5 | 30.1 | 2.50 (off) |",
                    "| other-seed | 15 | 510.4 | - | - | - | - |"]
    assert cost_table([off, other, untimed]) == ""  # nothing to compare with
