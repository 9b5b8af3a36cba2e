"""The ladder: grouping DVC experiments by setting, the paired decision, queueing, reports."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import use_env_with_venv
from yoloqat.analysis import ladder as ladder_mod
from yoloqat.analysis import ladder_tables
from yoloqat.analysis.exp_curves import MAP_TSV, read_curves
from yoloqat.analysis.experiments import flatten_exp_show, load_exp_show, read_experiments
from yoloqat.analysis.ladder import decide, ladder_settings, queue_command, queue_next
from yoloqat.analysis.ladder_groups import group_runs
from yoloqat.analysis.ladder_tables import format_table, ladder_json, markdown_table
from yoloqat.analysis.paired import mcnemar_one_sided, paired_outcome
from yoloqat.analysis.records import ExpRecord
from yoloqat.analysis.report import mean_curve, write_reports
from yoloqat.config import LadderConfig
from yoloqat.curves.reader import parse_tsv
from yoloqat.errors import CurveError, ExperimentsError

FIXTURE = Path(__file__).parent / "fixtures" / "exp_show.json"
CFG = LadderConfig(min_seeds=3, seeds=(0, 1, 2))
FIXTURE_PARAMS = {"qat.bits": 4, "qat.init": "fp"}  # what the fixture's params.yaml configures


@pytest.fixture(scope="module")
def records() -> list[ExpRecord]:
    return read_experiments(json_file=FIXTURE)


def curve(label, best=0.3, dd=0.05, collapses=0):
    return {"label": label, "best": best, "final": best * (1 - dd), "max_drawdown": dd,
            "collapse_events": collapses, "reason": "made up"}


def fake(model="yolo10n", seed=0, live="stable", ema="stable", qc=True, qc_delta=0.002,
         name=None, state="done", extra_params=None, ema_on=True, old_format=False):
    """A judged experiment record in the verdict stage's current format."""
    verdict = {**curve(ema if ema_on else live), "qc_delta_mAP50-95": qc_delta if qc else None,
               "w4a16_mAP50-95": 0.28, "gap_mAP50-95": 0.01}
    if not old_format:
        verdict.update({f"live_{k}": v for k, v in curve(live).items()})
        ema_fields = curve(ema) if ema_on else dict.fromkeys(curve("x"))
        verdict.update({f"ema_{k}": v for k, v in ema_fields.items()})
    params = {"model": model, "ema": ema_on, "qc": qc, "seed": seed, "qat.bits": 4,
              "qat.init": "fp", **(extra_params or {})}
    return ExpRecord(
        name=name or f"{model}-s{seed}-{ema_on}-{qc}", rev=f"rev-{model}-{seed}-{ema_on}-{qc}",
        kind="experiment", state=state, baseline="base", timestamp=f"2026-11-30T02:0{seed}:00",
        params=params, metrics={} if state != "done" else {"qat": {"status": "completed"},
                                                           "verdict": verdict},
        error="Experiment run failed" if state == "failed" else None,
    )


def rung_seeds(model, labels, live="collapsed", **kw):
    return [fake(model, seed=i, ema=lab, live=live, **kw) for i, lab in enumerate(labels)]


PARAMS = {"qat.bits": 4, "qat.init": "fp"}


# --------------------------------------------------------------------------------------------
# experiments.py on the recorded `dvc exp show --json`


def test_fixture_flattens_workspace_baseline_and_experiments(records):
    kinds = [r.kind for r in records]
    assert kinds[:2] == ["workspace", "baseline"] and kinds.count("experiment") == 14
    base = records[1]
    assert base.name == "main" and base.metrics == {} and base.state == "done"
    by_name = {r.name: r for r in records}
    assert by_name["tacky-dent"].state == "queued" and by_name["tacky-dent"].metrics == {}
    failed = by_name["filar-vlei"]
    assert failed.state == "failed" and failed.error == "Experiment run failed"
    diverged = by_name["mirky-cons"]
    assert diverged.label == "diverged" and diverged.metrics["qat"]["status"] == "diverged"
    assert diverged.params == {"model": "yolo10n", "ema": False, "qc": False, "seed": 2,
                               "qat.bits": 4, "qat.init": "fp", "ladder.min_seeds": 3,
                               "ladder.seeds": [0, 1, 2]}
    assert set(by_name["bumpy-taro"].metrics) == {"qat", "verdict", "evaluate", "train_fp"}


def test_running_experiment_and_missing_params():
    raw = [{"rev": "abc1234567", "name": None, "data": {"params": {}}, "error": None,
            "experiments": [{"name": "busy-run", "executor": {"state": "running"},
                             "revs": [{"rev": "def", "name": "busy-run", "error": None,
                                       "data": {"params": {"params.yaml": {"data": {
                                           "model": "yolo10m", "seed": 1}}}}}]}]}]
    base, exp = flatten_exp_show(raw)
    assert base.name == "abc1234" and base.kind == "baseline"
    assert exp.state == "running" and exp.params["model"] == "yolo10m"
    assert exp.params["qat.bits"] is None and exp.metrics == {}
    assert group_runs([base, exp]) == []  # no method without ema/qc
    with pytest.raises(ExperimentsError):
        flatten_exp_show(["not a row"])


def test_bad_exp_show_json_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ExperimentsError, match="is not JSON"):
        load_exp_show(json_file=bad)
    bad.write_text("{}")
    with pytest.raises(ExperimentsError, match="list of rows"):
        load_exp_show(json_file=bad)
    with pytest.raises(ExperimentsError, match="cannot be read"):
        load_exp_show(json_file=tmp_path / "missing.json")


def test_parse_tsv_keeps_the_last_value_of_a_repeated_step():
    text = "timestamp\tstep\tmAP50-95\n1\t0\t0.1\n2\t1\t0.2\n3\t1\t0.25\n"
    assert parse_tsv(text, "t.tsv") == {0: 0.1, 1: 0.25}
    with pytest.raises(CurveError, match="t.tsv has no step column"):
        parse_tsv("a\tb\n1\t2\n", "t.tsv")


# --------------------------------------------------------------------------------------------
# the paired exact test (hand-computed)


def test_mcnemar_one_sided_exact_values():
    assert mcnemar_one_sided(0, 0) == 1.0
    assert mcnemar_one_sided(3, 0) == pytest.approx(1 / 8)
    assert mcnemar_one_sided(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_one_sided(4, 1) == pytest.approx(6 / 32)  # P(X>=4 | n=5)
    assert mcnemar_one_sided(0, 2) == 1.0
    out = paired_outcome([(True, False), (True, True), (False, False), (True, False)])
    assert (out.pairs, out.control_failed, out.method_failed) == (4, 3, 1)
    assert (out.control_only, out.method_only) == (2, 0)
    assert out.p_value == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mcnemar_one_sided(-1, 0)


# --------------------------------------------------------------------------------------------
# grouping


def test_old_fixture_pairs_ema_runs_with_ema_off_controls(records):
    groups = group_runs(records)
    (n,) = [g for g in groups if g.model == "yolo10n"]
    assert [r.seed for r in n.runs] == [0, 1, 2]
    assert [r.ema.label for r in n.runs] == ["stable", "stable", "stable"]
    # the fixture predates paired curves: live comes from the ema=false runs of each seed
    assert [r.live.label for r in n.runs] == ["collapsed", "collapsed", "diverged"]
    assert n.failed == [("filar-vlei", 2)]  # failed: listed, never judged
    st = n.stats()
    assert (st["live_failed"], st["ema_failed"]) == (3, 0)
    assert st["paired"]["p_value"] == pytest.approx(1 / 8)
    (s,) = [g for g in groups if g.model == "yolo10s"]
    assert s.pending == [("tacky-dent", 1)]


def test_runs_with_different_settings_are_never_pooled():
    recs = rung_seeds("yolo10n", ["stable"] * 3)
    recs += [fake("yolo10n", seed=s, extra_params={"qat.lr0": 0.5}, name=f"hot{s}")
             for s in range(2)]
    recs.append(fake("yolo10n", seed=0, extra_params={"qat.epochs": 1}, name="smoke"))
    groups = group_runs(recs)
    assert len(groups) == 3
    text = format_table(groups)
    assert "qat.epochs=1" in text and "qat.lr0=0.5" in text
    # a setting holds every setting param, those a run does not record at their defaults
    (default,) = [g for g in groups if dict(g.setting.values)["qat.lr0"] != "0.5"
                  and dict(g.setting.values)["qat.epochs"] != "1"]
    assert {("qat.bits", "4"), ("qat.init", "fp")} <= set(default.setting.values)
    assert [r.names for r in default.runs] == [["yolo10n-s0-True-True"], ["yolo10n-s1-True-True"],
                                               ["yolo10n-s2-True-True"]]


def test_how_a_run_executes_does_not_split_a_setting():
    """Seeds on another device or fake-quant pass, or from before qat.fake_quant existed, pool."""
    recs = rung_seeds("yolo10n", ["stable"] * 2)
    recs.append(fake("yolo10n", seed=2, extra_params={"qat.fake_quant": "batched", "device": 0},
                     name="gpu2"))
    groups = group_runs(recs)
    assert len(groups) == 1 and len(groups[0].runs) == 3


def test_a_failed_experiment_is_listed_never_judged_even_with_baseline_metrics():
    bad = fake(seed=1, state="done", name="crashed")
    bad = ExpRecord(**{**bad.as_dict(), "state": "failed", "error": "Experiment run failed"})
    (g,) = group_runs([fake(seed=0), bad])
    assert [r.seed for r in g.runs] == [0] and g.failed == [("crashed", 1)]


def test_old_ema_run_without_paired_curves_shows_no_live_curve():
    (g,) = group_runs([fake(seed=0, old_format=True)])
    (run,) = g.runs
    assert run.live is None and run.note == "no live curve" and run.ema.label == "stable"
    assert "| 0 | no live curve | stable |" in ladder_tables.seed_rows_markdown(g)


def test_qc_delta_statistics():
    recs = [fake(seed=i, qc_delta=d) for i, d in enumerate([0.004, -0.001, 0.001])]
    (g,) = group_runs(recs)
    st = g.stats()
    assert st["qc_n"] == 3 and st["qc_improved"] == 2
    assert st["qc_delta_mean"] == pytest.approx(0.004 / 3)
    assert st["qc_delta_std"] == pytest.approx(0.0025166, rel=1e-4)


# --------------------------------------------------------------------------------------------
# the rung decision


def test_fixture_decision_passes_yolo10n_and_asks_for_yolo10s(records):
    d = decide(group_runs(records), CFG, FIXTURE_PARAMS)
    assert d.rung("yolo10n").state == "passed"
    assert d.rung("yolo10n").p_value == pytest.approx(1 / 8)
    assert d.next_rung == "yolo10s" and d.rung("yolo10s").state == "incomplete"
    assert d.rung("yolo10m").blocked_by == "yolo10s"
    assert ("passed (EMA (no per-epoch QC curve: qat.repair_curves lacks qc) not stable in 0/3 seeds, "
            "live (control) in 3/3") in "\n".join(d.lines())


def test_the_rung_is_decided_on_the_ema_qc_curve_where_it_was_logged():
    """With per-epoch repair curves the method is EMA + QC: an EMA curve that collapsed but was
    repaired by QC at every epoch passes, and the output names the EMA+QC curve."""
    recs = rung_seeds("yolo10n", ["collapsed"] * 3, live="collapsed")
    for rec in recs:
        rec.verdict.update({f"ema_qc_{k}": v for k, v in curve("stable").items()})
    d = decide(group_runs(recs), CFG, PARAMS)
    r = d.rung("yolo10n")
    assert (r.state, r.method, r.ema_failed) == ("passed", "EMA+QC", 0)
    assert "passed (EMA+QC not stable in 0/3 seeds" in "\n".join(d.lines())
    run = group_runs(recs)[0].runs[0]
    assert run.others["ema"].label == "collapsed"  # the plain EMA curve is kept as a row


def test_a_logged_ema_qc_curve_without_a_stored_label_is_judged_from_the_curve():
    """Runs whose verdict predates the per-repair labels still logged the EMA+QC curve: the rung
    judges that curve by today's rules (as the endpoint rows do), not the plain EMA curve."""
    steady = [0.10, 0.20, 0.25, 0.26, 0.27, 0.27]
    falls = [0.10, 0.25, 0.26, 0.05, 0.04, 0.03]
    recs = rung_seeds("yolo10n", ["collapsed"] * 3, live="collapsed",
                      extra_params={"qat.repair_curves": ["qc"]})
    curves = {rec.name: {"qat": {"val_ema_qc/mAP50-95": steady if i else falls}}
              for i, rec in enumerate(recs)}
    runs = group_runs(recs, lambda rec: curves[rec.name])[0].runs
    assert [(r.method, r.ema.label) for r in runs] == [
        ("EMA+QC", "collapsed"), ("EMA+QC", "stable"), ("EMA+QC", "stable")]
    assert runs[1].ema.best == 0.27 and runs[1].ema.final == 0.27
    # a run that did not log the curve keeps the EMA fallback, and nothing is read for it
    plain = rung_seeds("yolo10n", ["collapsed"])
    assert group_runs(plain, lambda rec: pytest.fail("read"))[0].runs[0].method == "EMA"


def test_a_live_failure_counts_only_where_it_is_worse_than_the_fp_continued_control():
    """fp.control trains the FP model on with QAT's own recipe: where that unquantized control
    fails as badly as live, the failure is the recipe's, and the rung may not count it."""
    steady = [0.10, 0.20, 0.25, 0.26, 0.27, 0.27]
    swing = [0.10, 0.25, 0.26, 0.15, 0.27, 0.26]  # one deep dip, recovered: unstable
    recs = rung_seeds("yolo10n", ["stable"] * 3, live="unstable",
                      extra_params={"fp.control": True})
    fp = {recs[0].name: swing, recs[1].name: swing, recs[2].name: swing}

    def curves_of(rec):
        return {"fp_control": {"val/mAP50-95": fp[rec.name]}}

    d = decide(group_runs(recs, curves_of), CFG, PARAMS)
    r = d.rung("yolo10n")
    assert [run.fp_control.label for run in group_runs(recs, curves_of)[0].runs] == ["unstable"] * 3
    assert (r.state, r.live_failed, r.live_failed_beyond_fp) == ("no_failure", 3, 0)
    assert "worse than its FP-continued control in 0/3" in r.text()
    fp[recs[1].name] = steady  # this seed's control held: its live failure is quantization's
    r = decide(group_runs(recs, curves_of), CFG, PARAMS).rung("yolo10n")
    assert (r.state, r.live_failed_beyond_fp) == ("passed", 1)
    # without the control (fp.control off, or runs from before it) every live failure counts
    off = rung_seeds("yolo10n", ["stable"] * 3, live="unstable", extra_params={"fp.control": False})
    r = decide(group_runs(off, lambda rec: pytest.fail("read")), CFG,
               {**PARAMS, "fp.control": False}).rung("yolo10n")
    assert (r.state, r.live_failed_beyond_fp) == ("passed", None)


def test_no_failure_reproduced_stops_the_ladder():
    d = decide(group_runs(rung_seeds("yolo10n", ["stable"] * 3, live="stable")), CFG, PARAMS)
    r = d.rung("yolo10n")
    assert r.state == "no_failure" and d.next_rung is None
    assert "cannot show anything" in r.text() and "reproduce the failure" in d.summary


def test_an_unstable_ema_curve_fails_the_rung():
    d = decide(group_runs(rung_seeds("yolo10n", ["stable", "collapsed", "stable"])), CFG, PARAMS)
    assert d.rung("yolo10n").state == "failed" and d.next_rung is None
    assert "do not climb" in d.summary


def test_one_failed_ema_curve_fails_the_rung_before_all_seeds_ran():
    """The rung needs every EMA curve stable: the seeds still missing cannot change that."""
    d = decide(group_runs(rung_seeds("yolo10n", ["collapsed", "stable"])), CFG, PARAMS)
    assert CFG.min_seeds > 2
    assert d.rung("yolo10n").state == "failed" and d.next_rung is None


def test_too_few_seeds_is_incomplete_and_lists_missing_seeds():
    d = decide(group_runs(rung_seeds("yolo10n", ["stable"] * 2)), CFG, PARAMS)
    r = d.rung("yolo10n")
    assert r.state == "incomplete" and r.missing_seeds == [2] and d.next_rung == "yolo10n"


def test_too_short_curves_are_neither_stable_nor_failures_and_are_not_queued_again():
    """A run of no more epochs than stability.grace_epochs is judged too_short: it must not make
    a rung fail (as `not stable`) nor pass (as stable), and queuing its seed again at the same
    setting would give the same short curve."""
    runs = rung_seeds("yolo10n", ["stable", "too_short", "too_short"])
    runs[1] = fake("yolo10n", seed=1, ema="too_short", live="too_short")
    group = group_runs(runs)
    d = decide(group, CFG, PARAMS)
    r = d.rung("yolo10n")
    assert (r.state, r.seeds, r.ema_failed, r.live_failed, r.too_short) == ("incomplete", 1, 0, 1, 2)
    assert r.missing_seeds == [] and d.next_rung == "yolo10n"
    assert r.text() == ("incomplete (1/3 seeds, 0 queued, 2 too short to judge: raise qat.epochs "
                        "above stability.grace_epochs)")
    stats = group[0].stats()
    assert (stats["ema_n"], stats["ema_failed"], stats["ema_too_short"]) == (1, 0, 2)
    assert (stats["live_n"], stats["live_failed"]) == (2, 2)  # seed 1's live curve: too short
    assert group[0].paired().pairs == 1
    assert "| 1 | too_short | too_short |" in ladder_tables.seed_rows_markdown(group[0])
    assert queue_next(d, dry_run=True, echo=lambda _m: None) is None  # nothing to queue
    json.dumps(ladder_json(group, d))


def test_only_the_configured_setting_decides_a_rung():
    recs = [fake("yolo10n", seed=s, ema="stable", live="collapsed",
                 extra_params={"qat.lr0": 0.01}) for s in range(3)]
    d = decide(group_runs(recs), CFG, PARAMS)
    assert d.rung("yolo10n").state == "not_started"
    assert d.rung("yolo10n").other_settings == 1
    assert "1 other setting(s) not pooled" in "\n".join(d.lines())
    d2 = decide(group_runs(recs), CFG, {**PARAMS, "qat.lr0": 0.01})
    assert d2.rung("yolo10n").state == "passed"


def test_yolo10m_is_never_recommended_before_yolo10s_passes():
    recs = rung_seeds("yolo10n", ["stable"] * 3) + rung_seeds("yolo10m", ["stable"] * 3)
    d = decide(group_runs(recs), CFG, PARAMS)
    assert d.rung("yolo10n").state == "passed" and d.next_rung == "yolo10s"
    assert d.rung("yolo10m").blocked_by == "yolo10s"
    recs += rung_seeds("yolo10s", ["stable"] * 3)
    d = decide(group_runs(recs), CFG, PARAMS)
    assert d.next_rung is None and "complete" in d.summary


def test_json_output_is_serialisable(records):
    groups = group_runs(records)
    out = json.loads(json.dumps(ladder_json(groups, decide(groups, CFG, FIXTURE_PARAMS))))
    assert out["decision"]["next_rung"] == "yolo10s"
    g = next(g for g in out["groups"] if g["model"] == "yolo10n")
    assert g["paired"]["pairs"] == 3 and g["runs"][0]["live"]["label"] == "collapsed"


def test_markdown_table_has_one_row_per_setting(records):
    md = markdown_table(group_runs(records))
    assert md.count("\n") == 1 + 2
    assert "| yolo10n | default | 3 | 3/3 (2 collapsed) | 0/3 (0 collapsed) | 0.125 (3 pairs)" in md


# --------------------------------------------------------------------------------------------
# queueing


def test_queue_command_is_one_paired_run_per_seed():
    assert queue_command("yolo10s", [0, 1, 2]) == [
        "dvc", "exp", "run", "--queue", "-S", "model=yolo10s", "-S", "ema=true", "-S", "qc=true",
        "-S", "seed=0,1,2"]


def test_queue_next_dry_run_and_real(records, monkeypatch, tmp_path):
    d = decide(group_runs(records), CFG, FIXTURE_PARAMS)
    out: list[str] = []
    cmd = queue_next(d, dry_run=True, echo=out.append)
    assert cmd[-1] == "seed=2"  # yolo10s: seed 0 judged (woozy-seer), seed 1 queued
    assert out[0].startswith("would run: dvc exp run --queue") and "dvc queue start" in out[-1]
    calls = []
    monkeypatch.setattr(ladder_mod, "run_dvc", lambda args, repo: calls.append(args) or "Queued")
    queue_next(d, tmp_path, echo=out.append)
    assert calls == [cmd[1:]]
    stopped = decide(group_runs(rung_seeds("yolo10n", ["collapsed"] * 3)), CFG, PARAMS)
    assert queue_next(stopped, echo=out.append) is None and "nothing to queue" in out[-1]


def test_ladder_settings(tmp_path):
    cfg, params = ladder_settings(tmp_path / "none.yaml")
    assert cfg == LadderConfig() and params["qat.bits"] == 4
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"ladder": {"min_seeds": 2, "seeds": [3, 4]},
                                 "data": {"source": "coco", "path": "/nowhere"}}))
    cfg, params = ladder_settings(p)
    assert cfg == LadderConfig(min_seeds=2, seeds=(3, 4)) and params["data.source"] == "coco"


def test_mean_curve_skips_missing_epochs():
    assert mean_curve([[1.0, 2.0, 3.0], [3.0, float("nan")]]) == [2.0, 2.0, 3.0]


def test_report_writes_markdown_and_pngs(records, tmp_path):
    groups = group_runs(records)
    d = decide(groups, CFG, FIXTURE_PARAMS)

    def reader(rec):
        best = rec.verdict.get("best") or 0.1
        if rec.name == "chewy-zone":
            return {"map": None, "live": None, "ema": None, "osc": None, "fp_map": None}
        return {"map": [best * e / 5 for e in range(1, 6)], "live": None, "ema": None,
                "osc": [0.01 * e for e in range(5)], "fp_map": None}

    written = write_reports(groups, d, tmp_path / "reports", curve_reader=reader)
    names = sorted(p.name for p in written)
    assert names == sorted(f"{m}{s}" for m in ("yolo10n", "yolo10s")
                           for s in (".md", "_map.png", "_osc.png"))
    for p in written:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "reports" / "yolo10n.md").read_text()
    assert "Next rung: yolo10s" in md and "![val mAP50-95](yolo10n_map.png)" in md
    assert "| 2 | diverged | stable |" in md
    assert "failed (never judged): filar-vlei (seed 2)" in md
    assert "Curves could not be read for: chewy-zone." in md


# --------------------------------------------------------------------------------------------
# integration: a real tiny DVC repo, two queued experiments


GEN = textwrap.dedent('''
    """Fake QAT: a curve computed from params, judged by the real classify_run."""
    import json
    import os

    import yaml

    from yoloqat.curves.stability import classify_run

    p = yaml.safe_load(open("params.yaml"))
    seed = p["seed"]
    curve = [round(0.05 * e + 0.01 * seed, 4) for e in range(1, 7)]
    v = classify_run(curve, None)
    os.makedirs("results/qat/plots/metrics/val", exist_ok=True)
    os.makedirs("results/qat/plots/metrics/osc", exist_ok=True)
    os.makedirs("results/verdict", exist_ok=True)
    for name, values in (("val/mAP50-95", curve), ("osc/frac_oscillating", [0.01] * 6)):
        with open(f"results/qat/plots/metrics/{name}.tsv", "w") as f:
            f.write("timestamp\\tstep\\t" + name.split("/")[1] + "\\n")
            f.writelines(f"{1000 + i}\\t{i}\\t{x}\\n" for i, x in enumerate(values))
    with open("results/qat/metrics.json", "w") as f:
        json.dump({"status": "completed", "best": v.best, "final": v.final}, f)
    live = classify_run([x * (0.3 if i == 3 else 1) for i, x in enumerate(curve)], None)
    verdict = {**v.as_dict(), "model": p["model"], "ema": p["ema"], "qc": p["qc"], "seed": seed,
               "bits": p["qat"]["bits"], "init": p["qat"]["init"], "qc_delta_mAP50-95": 0.001,
               **{f"live_{k}": x for k, x in live.as_dict().items()},
               **{f"ema_{k}": x for k, x in v.as_dict().items()}}
    with open("results/verdict/metrics.json", "w") as f:
        json.dump(verdict, f)
''')


def _dvc_yaml() -> str:
    return textwrap.dedent(f'''
        stages:
          qat:
            cmd: {json.dumps(shlex.quote(sys.executable) + ' gen.py')}
            deps: [gen.py]
            params: [model, ema, qc, seed, qat]
            metrics:
              - results/qat/metrics.json:
                  cache: false
              - results/verdict/metrics.json:
                  cache: false
            plots:
              - results/qat/plots/metrics:
                  x: step
                  cache: false
    ''')


def test_queued_dvc_experiments_end_up_in_the_ladder(tmp_path, monkeypatch, capsys):
    # the queue worker starts `dvc exp exec-run` by name: the venv's bin must be on PATH
    use_env_with_venv(monkeypatch)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "gen.py").write_text(GEN)
    (repo / "dvc.yaml").write_text(_dvc_yaml())
    (repo / "params.yaml").write_text(yaml.safe_dump({
        "model": "yolo10n", "ema": True, "qc": True, "seed": 0,
        "qat": {"bits": 4, "init": "fp"}, "ladder": {"min_seeds": 3, "seeds": [0, 1, 2]},
    }, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]

    def run(*cmd):
        res = subprocess.run(list(cmd), cwd=repo, capture_output=True, text=True, timeout=120,
                             check=False)
        assert res.returncode == 0, f"{cmd}: {res.stderr[-2000:]}"
        return res.stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "tiny ladder repo")
    run(*dvc, "exp", "run", "--queue", "-S", "seed=0,1")
    run(*dvc, "queue", "start", "-j", "1")

    deadline = time.monotonic() + 120
    exps: list[ExpRecord] = []
    while time.monotonic() < deadline:
        exps = [r for r in read_experiments(repo) if r.kind == "experiment"]
        if len(exps) == 2 and all(r.state not in ("queued", "running") for r in exps):
            break
        time.sleep(2)
    while time.monotonic() < deadline and "0 active, 0 idle" not in run(*dvc, "queue", "status"):
        time.sleep(1)  # let the worker exit before tmp_path goes away
    assert len(exps) == 2 and all(r.state == "done" for r in exps), [r.as_dict() for r in exps]

    groups = group_runs(read_experiments(repo))
    assert len(groups) == 1
    (group,) = groups
    assert [r.seed for r in group.runs] == [0, 1]
    assert [(r.live.label, r.ema.label) for r in group.runs] == [("unstable", "stable")] * 2
    d = decide(groups, *ladder_settings(repo / "params.yaml"))
    assert d.next_rung == "yolo10n" and d.rung("yolo10n").state == "incomplete"
    assert d.rung("yolo10n").missing_seeds == [2]

    exp1 = next(r for r in group.records if r.params["seed"] == 1)
    curves = read_curves(exp1, repo)
    assert curves["map"] == pytest.approx([0.06, 0.11, 0.16, 0.21, 0.26, 0.31])
    assert curves["osc"] == [0.01] * 6 and curves["fp_map"] is None
    assert parse_tsv(run("git", "show", f"{exp1.rev}:{MAP_TSV}"), MAP_TSV)[5] == 0.31

    written = write_reports(groups, d, repo / "reports" / "ladder", repo=repo)
    md = (repo / "reports" / "ladder" / "yolo10n.md").read_text()
    assert len(written) == 3 and "could not be read" not in md
    assert "incomplete (2/3 seeds, 0 queued)" in md


def test_the_fp_seed_is_pooled_like_the_seed():
    """Seed 0 with fp.seed null (FP seed = seed) and seed 1 from that same FP model (fp.seed 0)
    are two seeds of one setting, not two settings of one seed each."""
    runs = [fake(seed=0, extra_params={"fp.seed": None}), fake(seed=1, extra_params={"fp.seed": 0}),
            fake(seed=2, extra_params={"fp.seed": 0, "qat.lrf": 0.5})]
    groups = group_runs(runs)
    assert sorted([r.seed for r in g.runs] for g in groups) == [[0, 1], [2]]


def test_measurements_beside_training_do_not_split_a_setting():
    """Repair curves and mechanism metrics are scored on copies; training is bit-identical with
    and without them, so runs that differ only there are seeds of one setting."""
    runs = [fake(seed=0), fake(seed=1, extra_params={"qat.repair_curves": ["bnre", "qc"],
                                                      "qat.repair_every": 3,
                                                      "qat.mechanism_batches": 2,
                                                      "qat.repair_bn_batches": 10})]
    (group,) = group_runs(runs)
    assert [r.seed for r in group.runs] == [0, 1]
