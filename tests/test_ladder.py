"""The ladder: grouping DVC experiments by method, the rung decision, queueing, reports."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from yoloqat.analysis import ladder as ladder_mod
from yoloqat.analysis.experiments import (
    MAP_TSV,
    ExpRecord,
    flatten_exp_show,
    load_exp_show,
    read_curves,
    read_experiments,
)
from yoloqat.analysis.ladder import (
    decide,
    format_table,
    group_rows,
    ladder_settings,
    markdown_table,
    queue_command,
    queue_next,
)
from yoloqat.analysis.report import mean_curve, write_reports
from yoloqat.config import LadderConfig
from yoloqat.curves.reader import parse_tsv
from yoloqat.errors import CurveError, ExperimentsError

FIXTURE = Path(__file__).parent / "fixtures" / "exp_show.json"
CFG = LadderConfig(min_seeds=3, seeds=(0, 1, 2))


@pytest.fixture(scope="module")
def records() -> list[ExpRecord]:
    return read_experiments(json_file=FIXTURE)


def row_of(rows, model, ema, qc):
    (row,) = [r for r in rows if (r.key.model, r.key.ema, r.key.qc) == (model, ema, qc)]
    return row


def fake(model, ema, qc, seed, label="stable", best=0.3, final=0.29, name=None, state="done"):
    """A judged experiment record as experiments.py would build it."""
    metrics = {} if label is None else {
        "qat": {"status": "completed", "best": best, "final": final},
        "verdict": {"label": label, "best": best, "final": final, "reason": "made up"},
    }
    return ExpRecord(
        name=name or f"{model}-{ema}-{qc}-{seed}", rev=f"rev-{model}-{ema}-{qc}-{seed}",
        kind="experiment", state=state, baseline="base", timestamp="2026-11-28T02:00:00",
        params={"model": model, "ema": ema, "qc": qc, "seed": seed, "qat.bits": 4,
                "qat.init": "fp"},
        metrics=metrics,
    )


# --------------------------------------------------------------------------------------------
# experiments.py on the recorded `dvc exp show --json`


def test_fixture_flattens_workspace_baseline_and_experiments(records):
    kinds = [r.kind for r in records]
    assert kinds[:2] == ["workspace", "baseline"] and kinds.count("experiment") == 14
    base = records[1]
    assert base.name == "main" and base.metrics == {} and base.state == "done"
    assert all(r.baseline == base.rev for r in records[2:])
    by_name = {r.name: r for r in records}
    assert by_name["tacky-dent"].state == "queued" and by_name["tacky-dent"].metrics == {}
    failed = by_name["filar-vlei"]
    assert failed.state == "failed" and failed.error == "Experiment run failed"
    assert failed.metrics == {} and failed.label is None
    diverged = by_name["mirky-cons"]
    assert diverged.label == "diverged" and diverged.metrics["qat"]["status"] == "diverged"
    assert diverged.params == {"model": "yolo10n", "ema": False, "qc": False, "seed": 2,
                               "qat.bits": 4, "qat.init": "fp"}
    assert set(by_name["bumpy-taro"].metrics) == {"qat", "verdict", "evaluate", "train_fp"}
    assert by_name["woozy-seer"].state == "done"  # plain `dvc exp run`: executor is null
    assert records[0].params["model"] == "yolo10s" and records[0].label == "stable"


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
    assert group_rows([base, exp]) == []  # no method without ema/qc/bits
    with pytest.raises(ExperimentsError):
        flatten_exp_show(["not a row"])


def test_bad_exp_show_json_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ExperimentsError, match="not JSON"):
        load_exp_show(json_file=bad)
    bad.write_text('{"rev": "workspace"}')
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
# grouping


def test_group_rows_exact_counts_and_means(records):
    rows = group_rows(records)
    keys = [(r.key.model, r.key.ema, r.key.qc) for r in rows]
    assert keys == [
        ("yolo10n", True, True), ("yolo10n", True, False), ("yolo10n", False, True),
        ("yolo10n", False, False), ("yolo10s", True, True),
    ]
    assert all((r.key.bits, r.key.init) == (4, "fp") for r in rows)

    r = row_of(rows, "yolo10n", True, True)
    assert r.runs == 3 and r.seeds == [0, 1, 2] and r.all_stable
    assert r.counts == {"stable": 3, "collapsed": 0, "unstable": 0, "diverged": 0,
                        "no_learning": 0}
    assert r.best_mean == pytest.approx(0.31) and r.best_std == pytest.approx(0.01)
    assert r.final_mean == pytest.approx(0.30) and r.final_std == pytest.approx(0.01)
    assert r.w4a16_mean == pytest.approx(0.29) and r.w4a16_std == pytest.approx(0.01)
    assert r.gap_fp_mean == pytest.approx(0.05) and r.fp_best_mean == pytest.approx(0.36)
    assert r.pending == [] and r.failed == []

    r = row_of(rows, "yolo10n", True, False)
    assert r.counts["stable"] == 2 and r.counts["unstable"] == 1 and not r.all_stable
    assert r.best_mean == pytest.approx(0.295) and r.best_std == pytest.approx(0.005)
    assert r.final_mean == pytest.approx((0.28 + 0.285 + 0.22) / 3)

    r = row_of(rows, "yolo10n", False, True)
    assert r.runs == 2 and r.seeds == [0, 1] and r.failed == [2]
    assert r.counts["collapsed"] == 2

    r = row_of(rows, "yolo10n", False, False)
    assert r.runs == 3 and r.counts["collapsed"] == 2 and r.counts["diverged"] == 1
    assert r.best_mean == pytest.approx((0.23 + 0.22 + 0.10) / 3)
    assert r.final_mean == pytest.approx(0.0125)  # the diverged run has no final
    assert r.w4a16_runs == 2 and r.w4a16_mean == pytest.approx(0.0075)
    assert r.gap_fp_mean == pytest.approx((0.12 + 0.14 + 0.27) / 3)

    r = row_of(rows, "yolo10s", True, True)
    # the workspace holds the applied woozy-seer run: one seed, counted once
    assert r.runs == 1 and r.seeds == [0] and r.pending == [1]
    assert [x.name for x in r.records] == ["woozy-seer"]
    assert r.best_std is None and r.best_mean == pytest.approx(0.40)


def test_table_text(records):
    rows = group_rows(records)
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].startswith("model")
    assert "0.3100 ± 0.0100" in lines[1] and "stable 3" in lines[1]
    assert "collapsed 2, diverged 1" in lines[4]
    md = markdown_table(rows)
    assert md.splitlines()[2].startswith("| yolo10n | true | true | 4 | fp | 3 | stable 3 |")


def test_a_newer_judged_run_wins_over_a_failed_one_with_the_same_seed():
    old = fake("yolo10n", True, True, 0, label=None, name="old", state="failed")
    new = fake("yolo10n", True, True, 0, label="collapsed", name="new")
    queued = fake("yolo10n", True, True, 1, label=None, name="q", state="queued")
    no_verdict = dataclasses.replace(fake("yolo10n", True, True, 2), name="nv",
                                     metrics={"qat": {"status": "completed", "best": 0.2}})
    fp_only = dataclasses.replace(fake("yolo10n", True, True, 3), name="fp",
                                  metrics={"train_fp": {"best": 0.3}})
    (row,) = group_rows([old, new, queued, no_verdict, fp_only])
    assert row.runs == 1 and [r.name for r in row.records] == ["new"]
    assert row.failed == [] and row.pending == [1] and row.unjudged == [2]
    assert format_table([row]).splitlines()[1].split()[-3:] == ["1", "0", "1"]


# --------------------------------------------------------------------------------------------
# the rung decision


def test_decision_on_the_fixture(records):
    d = decide(group_rows(records), CFG)
    states = {r.model: r.state for r in d.rungs}
    assert states["yolo10n"] == "passed" and states["yolo10s"] == "incomplete"
    assert d.rung("yolo10m").blocked_by == "yolo10s"
    assert d.next_rung == "yolo10s"
    text = "\n".join(d.lines())
    assert "yolo10n: passed (3/3 seeds stable)" in text
    assert "yolo10s ema=true qc=true: 1/3 seeds (1 queued/running)" in text
    assert "yolo10s ema=false qc=false: 0/3 seeds" in text
    assert "yolo10n ema=false qc=true: 2/3 seeds (1 failed)" in text
    assert "yolo10m: waiting for yolo10s" in text
    assert "Next rung: yolo10s" in text
    assert d.rung("yolo10s").missing_seeds == [0, 1, 2]


def test_missing_variants_text_for_a_partial_rung():
    recs = [fake("yolo10n", True, True, s) for s in (0, 1)]
    d = decide(group_rows(recs), CFG)
    assert d.next_rung == "yolo10n"
    assert "yolo10n ema=true qc=true: 2/3 seeds  <- required to pass the rung" in d.lines()[-5:][0]
    assert d.rung("yolo10n").missing == [
        "yolo10n ema=true qc=true: 2/3 seeds  <- required to pass the rung",
        "yolo10n ema=true qc=false: 0/3 seeds",
        "yolo10n ema=false qc=true: 0/3 seeds",
        "yolo10n ema=false qc=false: 0/3 seeds",
    ]


def test_no_runs_at_all_starts_with_yolo10n():
    d = decide([], CFG)
    assert d.next_rung == "yolo10n"
    assert [r.state for r in d.rungs] == ["not_started"] * 3


@pytest.mark.parametrize("s_labels", [
    [], ["stable"], ["stable", "stable"], ["stable", "collapsed", "stable"],
    ["unstable"], ["stable", "stable", "diverged"],
])
def test_yolo10m_is_never_recommended_before_yolo10s_passes(s_labels):
    recs = [fake("yolo10n", True, True, s) for s in range(3)]
    recs += [fake("yolo10s", True, True, s, label) for s, label in enumerate(s_labels)]
    recs += [fake("yolo10m", True, True, s) for s in range(3)]  # yolo10m looks perfect
    d = decide(group_rows(recs), CFG)
    assert d.next_rung != "yolo10m"
    assert d.rung("yolo10m").blocked_by == "yolo10s"
    if any(label != "stable" for label in s_labels):
        assert d.next_rung is None and d.rung("yolo10s").state == "failed"
        assert "do not climb" in d.summary
        assert queue_next(d, dry_run=True, echo=lambda s: None) is None
    else:
        assert d.next_rung == "yolo10s"


def test_a_failed_first_rung_stops_the_ladder():
    recs = [fake("yolo10n", True, True, 0), fake("yolo10n", True, True, 1, "collapsed")]
    d = decide(group_rows(recs), CFG)
    assert d.next_rung is None and d.rung("yolo10n").state == "failed"
    assert d.rung("yolo10s").blocked_by == "yolo10n"


def test_yolo10m_follows_once_yolo10s_passed_and_then_the_ladder_is_complete():
    recs = [fake(m, True, True, s) for m in ("yolo10n", "yolo10s") for s in range(3)]
    d = decide(group_rows(recs), CFG)
    assert d.next_rung == "yolo10m" and d.rung("yolo10m").blocked_by is None
    recs += [fake("yolo10m", True, True, s) for s in range(3)]
    d = decide(group_rows(recs), CFG)
    assert d.next_rung is None and "ladder is complete" in d.summary


def test_only_the_default_bits_and_init_count_for_a_rung():
    recs = [dataclasses.replace(r, params={**r.params, "qat.bits": 3})
            for r in (fake("yolo10n", True, True, s) for s in range(3))]
    assert decide(group_rows(recs), CFG).rung("yolo10n").state == "not_started"
    recs = [fake("yolo10n", True, True, s) for s in range(3)]
    assert decide(group_rows(recs), CFG, init="scratch").rung("yolo10n").state == "not_started"


# --------------------------------------------------------------------------------------------
# queueing


def test_queue_next_dry_run_prints_the_grid_command(records):
    out: list[str] = []
    cmd = queue_next(decide(group_rows(records), CFG), dry_run=True, echo=out.append)
    expected = ("dvc exp run --queue -S model=yolo10s -S ema=true,false -S qc=true,false "
                "-S seed=0,1,2")
    assert " ".join(cmd) == expected
    assert f"would run: {expected}" in out
    assert any("dvc queue start" in line for line in out)


def test_queue_next_fresh_rung_uses_the_ladder_seeds():
    recs = [fake("yolo10n", e, q, s) for e in (True, False) for q in (True, False)
            for s in range(3)]
    d = decide(group_rows(recs), LadderConfig(min_seeds=2, seeds=(0, 1, 2, 7)))
    out: list[str] = []
    cmd = queue_next(d, dry_run=True, echo=out.append)
    assert cmd == queue_command("yolo10s", [0, 1, 2, 7])
    assert cmd[-1] == "seed=0,1,2,7" and not any(line.startswith("note") for line in out)


def test_queue_next_runs_dvc_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(ladder_mod, "run_dvc", lambda args, repo: calls.append((args, repo))
                        or "Queued experiment 'x' for future execution.\n")
    out: list[str] = []
    cmd = queue_next(decide([], CFG), repo=tmp_path, echo=out.append)
    assert calls == [(cmd[1:], tmp_path)]
    assert cmd[:4] == ["dvc", "exp", "run", "--queue"] and "model=yolo10n" in cmd
    assert "Queued experiment 'x' for future execution." in out


# --------------------------------------------------------------------------------------------
# params and reports


def test_ladder_settings(tmp_path):
    assert ladder_settings(tmp_path / "none.yaml") == (LadderConfig(), "fp")
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"ladder": {"min_seeds": 2, "seeds": [3, 4]},
                                 "data": {"source": "coco", "path": "/nowhere"}}))
    assert ladder_settings(p) == (LadderConfig(min_seeds=2, seeds=(3, 4)), "fp")


def test_mean_curve_skips_missing_epochs():
    assert mean_curve([[1.0, 2.0, 3.0], [3.0, float("nan")]]) == [2.0, 2.0, 3.0]


def test_report_writes_markdown_and_pngs(records, tmp_path):
    rows = group_rows(records)
    d = decide(rows, CFG)

    def reader(rec):
        best = rec.verdict.get("best") or 0.1
        if rec.name == "chewy-zone":
            return {"map": None, "osc": None, "fp_map": None}
        return {"map": [best * e / 5 for e in range(1, 6)], "osc": [0.01 * e for e in range(5)],
                "fp_map": None}

    written = write_reports(rows, d, tmp_path / "reports", curve_reader=reader)
    names = sorted(p.name for p in written)
    assert names == sorted(f"{m}{s}" for m in ("yolo10n", "yolo10s")
                           for s in (".md", "_map.png", "_osc.png"))
    for p in written:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "reports" / "yolo10n.md").read_text()
    assert "| yolo10n | true | true | 4 | fp | 3 | stable 3 | 0.3100 ± 0.0100 |" in md
    assert "Next rung: yolo10s" in md and "![val mAP50-95](yolo10n_map.png)" in md
    assert "| ema=false qc=false W4 fp | 2 | mirky-cons | diverged |" in md
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
    verdict = {**v.as_dict(), "model": p["model"], "ema": p["ema"], "qc": p["qc"], "seed": seed,
               "bits": p["qat"]["bits"], "init": p["qat"]["init"]}
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
    for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(k, "yoloqat-test")
    for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(k, "test@yoloqat.local")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    # the queue worker starts `dvc exp exec-run` by name: the venv's bin must be on PATH
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
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

    rows = group_rows(read_experiments(repo))
    assert len(rows) == 1
    (row,) = rows
    assert row.runs == 2 and row.seeds == [0, 1] and row.counts["stable"] == 2
    assert row.best_mean == pytest.approx((0.3 + 0.31) / 2)
    d = decide(rows, ladder_settings(repo / "params.yaml")[0])
    assert d.next_rung == "yolo10n" and d.rung("yolo10n").state == "incomplete"
    assert d.rung("yolo10n").missing_seeds == [0, 1, 2]  # the other variants have no runs
    assert d.rung("yolo10n").existing_in_grid == ["ema=true qc=true seed=0",
                                                  "ema=true qc=true seed=1"]

    exp1 = next(r for r in row.records if r.params["seed"] == 1)
    curves = read_curves(exp1, repo)
    assert curves["map"] == pytest.approx([0.06, 0.11, 0.16, 0.21, 0.26, 0.31])
    assert curves["osc"] == [0.01] * 6 and curves["fp_map"] is None
    assert parse_tsv(run("git", "show", f"{exp1.rev}:{MAP_TSV}"), MAP_TSV)[5] == 0.31

    written = write_reports(rows, d, repo / "reports" / "ladder", repo=repo)
    md = (repo / "reports" / "ladder" / "yolo10n.md").read_text()
    assert len(written) == 3 and "could not be read" not in md
    assert "yolo10n ema=true qc=true: 2/3 seeds" in md
