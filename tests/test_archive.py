"""yoloqat archive: one JSON per experiment, read back by ladder / search / remedies --from.

These tests fake the DVC side (records and the curves read at a revision); the archive of a real
tiny ``dvc exp run`` is checked in tests/test_readme_commands.py, next to its one experiment.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import REPO
from yoloqat.analysis import archive as archive_mod
from yoloqat.analysis import exp_curves
from yoloqat.analysis.archive import archive_doc, archive_runs, dumps
from yoloqat.analysis.archive_reader import ARCHIVE_SCHEMA, read_archive
from yoloqat.analysis.exp_curves import read_curves
from yoloqat.analysis.ladder_groups import group_runs
from yoloqat.analysis.ladder_tables import format_table
from yoloqat.analysis.records import ExpRecord
from yoloqat.analysis.remedies import parse_variant, variant_row, variant_table
from yoloqat.analysis.search import markdown_table, search_row, select
from yoloqat.cli import main
from yoloqat.errors import ExperimentsError

NAN = math.nan


def _curves(seed: int) -> dict:
    live = [0.1, 0.2 + 0.01 * seed, 0.05, 0.04, NAN]  # a collapse, then a NaN epoch
    ema = [0.1, 0.2, 0.21, 0.22, 0.22]
    return {
        "qat": {"val/mAP50-95": ema, "val_live/mAP50-95": live, "val_ema/mAP50-95": ema,
                "osc/frac_oscillating": [0.01, 0.02, 0.0300000000000001, 0.02, 0.01],
                "train/box_loss": [2.0, 1.9, 1.8, 1.7, 1.6]},
        "train_fp": {"val/mAP50-95": [0.05, 0.15, 0.2]},
    }


def _rec(name: str, seed: int, state: str = "done", preset: str = "collapse_cpu") -> ExpRecord:
    verdict = {"label": "stable", "live_label": "collapsed", "live_best": 0.2, "live_final": 0.04,
               "live_max_drawdown": 0.8, "live_collapse_events": 1, "live_reason": "r",
               "ema_label": "stable", "ema_best": 0.22, "ema_final": 0.22, "ema_max_drawdown": 0.0,
               "ema_collapse_events": 0, "ema_reason": "r", "qc_delta_mAP50-95": 0.004 + seed / 1000,
               "w4a16_mAP50-95": 0.21, "gap_mAP50-95": NAN}
    return ExpRecord(
        name=name, rev=f"{seed:x}".ljust(40, "a"), kind="experiment", state=state,
        baseline="b" * 40, timestamp=f"2026-12-01T10:0{seed}:00",
        params={"preset": preset, "model": "yolo10n", "ema": True, "qc": True, "seed": seed,
                "qat.bits": 4, "qat.init": "fp", "qat.epochs": 10, "fp.seed": 0,
                "ladder.seeds": [0, 1, 2]},
        metrics={} if state != "done" else {
            "qat": {"status": "completed", "epochs": 5, "seconds": 12.5, "osc/frac_oscillating": 0.01},
            "verdict": verdict, "qc": {"after_mAP50-95": 0.23}, "train_fp": {"best": 0.2}},
    )


@pytest.fixture
def live(monkeypatch):
    """Three DVC experiments (and a queued one) whose curves DVC 'reads' at their revision."""
    recs = [_rec(f"s{i}", i) for i in range(3)] + [_rec("busy", 3, state="queued")]
    by_rev = {r.rev: _curves(r.params["seed"]) for r in recs}
    reads = []

    def fake_read(repo, rev):
        reads.append(rev)
        return by_rev.get(rev, {})

    monkeypatch.setattr(exp_curves, "read_stage_curves", fake_read)
    known = {r.name for r in recs}

    def fake_experiments(repo=".", all_commits=True, revs=()):
        # archive asks for the commits its experiments came from; here all came from "base"
        assert (all_commits, tuple(revs)) in {(False, ("base",)), (True, ())}
        return recs

    monkeypatch.setattr(archive_mod, "baselines_of",
                        lambda names, repo=".": ["base"] if known & set(names) else [])
    monkeypatch.setattr(archive_mod, "read_experiments", fake_experiments)
    return recs


def test_archive_reads_only_the_commits_its_experiments_were_run_from(monkeypatch):
    """DVC's experiment list names each experiment's baseline; exp show then reads those only."""
    import dvc.repo

    from yoloqat.analysis import experiments

    class FakeRepo:
        def __init__(self, root):
            self.experiments = self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def ls(self, all_commits):
            assert all_commits
            return {"ccc": ["s1"], "aaa": [("s0", "sha0")], "bbb": [("other", "sha2")]}

    monkeypatch.setattr(dvc.repo, "Repo", FakeRepo)
    assert experiments.baselines_of(["s0", "s1"]) == ["aaa", "ccc"]
    assert experiments.baselines_of(["nope"]) == []
    calls = []
    monkeypatch.setattr(experiments, "run_dvc", lambda args, repo=".": calls.append(args) or "[]")
    experiments.load_exp_show(all_commits=False, revs=["aaa", "ccc"])
    experiments.load_exp_show()
    assert calls == [["exp", "show", "--json", "--rev", "aaa", "--rev", "ccc"],
                     ["exp", "show", "--json", "--all-commits"]]


def _same(a, b) -> bool:
    return json.dumps(a, default=str) == json.dumps(b, default=str)  # NaN == NaN here


def test_archive_content_and_round_trip(live, tmp_path):
    out = tmp_path / "study" / "runs"
    written = archive_runs(["s0", "s1", "s2"], out)
    assert [p.name for p, _ in written] == ["s0.json", "s1.json", "s2.json"]
    doc = json.loads((out / "s1.json").read_text())
    assert doc["schema"] == ARCHIVE_SCHEMA == 1 and doc["name"] == "s1"
    assert doc["commit"] == live[1].rev and doc["state"] == "done"
    # every param, dotted, with the preset applied
    assert doc["params"]["qat.scale_weight_decay"] == 0.05 and doc["params"]["seed"] == 1
    assert doc["params"]["qat.scaling"] == "decoupled" and doc["params"]["fp.seed"] == 0
    assert doc["metrics"]["verdict"]["gap_mAP50-95"] is None  # NaN is null in JSON
    assert doc["curves"]["qat"]["val_live/mAP50-95"][-1] is None
    assert doc["curves"]["train_fp"]["val/mAP50-95"] == [0.05, 0.15, 0.2]
    # one curve per line
    text = (out / "s1.json").read_text()
    assert '"val_ema/mAP50-95": [0.1, 0.2, 0.21, 0.22, 0.22]' in text
    for path, size in written:
        assert size == path.stat().st_size < 50_000

    back = {r.name: r for r in read_archive(out)}
    assert set(back) == {"s0", "s1", "s2"}
    for rec in live[:3]:
        assert _same(read_curves(back[rec.name]), read_curves(rec))
        assert math.isnan(back[rec.name].curves["qat"]["val_live/mAP50-95"][-1])


def test_tables_from_the_archive_equal_the_tables_from_dvc(live, tmp_path, monkeypatch):
    archive_runs(["s0", "s1", "s2"], tmp_path)
    archived = read_archive(tmp_path)
    names = ["s2", "s0", "s1"]

    def tables(records):
        chosen = select(records, names)
        search = markdown_table([search_row(r, read_curves(r).get("bnre")) for r in chosen])
        ladder = format_table(group_runs(records))
        variant = parse_variant("live=live:s0,s1,s2")
        rem = variant_table([variant_row(variant, select(records, list(variant.names)),
                                         [read_curves(r) for r in select(records, list(variant.names))])])
        return search, ladder, rem

    # the same runs: the archive holds the three finished ones, not the queued one
    from_dvc, from_archive = tables(live[:3]), tables(archived)
    assert from_archive == from_dvc
    assert "preset=collapse_cpu" in from_dvc[0] and "| live | live | 3 | 0/3 |" in from_dvc[2]


def test_unknown_name_queued_run_and_bad_names_write_nothing(live, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(ExperimentsError, match=r"unknown experiment\(s\) nope; known: busy, s0, s1, s2"):
        archive_runs(["s0", "nope"], out)
    with pytest.raises(ExperimentsError, match="experiment busy is queued; expected a finished"):
        archive_runs(["s0", "busy"], out)
    with pytest.raises(ExperimentsError, match=r"experiment name '\.\./x' is not allowed"):
        archive_runs(["../x"], out)
    assert not out.exists()


def test_a_done_run_without_its_curves_is_refused(live, monkeypatch, tmp_path):
    monkeypatch.setattr(exp_curves, "read_stage_curves", lambda repo, rev: {})
    with pytest.raises(ExperimentsError, match=r"experiment s0 at .*missing curves"):
        archive_runs(["s0"], tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_folder_that_cannot_be_written_is_one_error(live, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for to in (blocker, blocker / "runs"):
        with pytest.raises(ExperimentsError, match=r"--to .* is not allowed; .*expected a folder"):
            archive_runs(["s0"], to)
    assert blocker.read_text() == "x"


def test_cli_archive_prints_sizes_and_errors_are_one_line(live, tmp_path, capsys):
    assert main(["archive", "s0", "s1", "--to", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'runs' / 's0.json'} (" in out and " kB)" in out
    assert main(["archive", "zzz", "--to", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("yoloqat archive: error: unknown experiment(s) zzz")
    assert not (tmp_path / "other").exists()
    assert main(["archive", "s0"]) == 2  # --to is required
    assert "--to" in capsys.readouterr().err


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_archive_files_of_another_schema_or_without_curves_are_one_error(live, tmp_path):
    archive_runs(["s0"], tmp_path)
    good = json.loads((tmp_path / "s0.json").read_text())
    cases = {
        "schema=2 is not allowed; expected schema 1": {**good, "schema": 2},
        "schema=None is not allowed": {k: v for k, v in good.items() if k != "schema"},
        "curves=missing is not allowed; expected curves as": {k: v for k, v in good.items() if k != "curves"},
        "(missing curves) is not allowed": {**good, "curves": {"train_fp": good["curves"]["train_fp"]}},
        "curves.qat.val/mAP50-95 is not allowed": {**good, "curves": {"qat": {"val/mAP50-95": ["x"]}}},
        "state='queued' is not allowed; expected done | failed": {**good, "state": "queued"},
        "name=None is not allowed": {**good, "name": None},
    }
    for needle, doc in cases.items():
        folder = tmp_path / f"case{len(needle)}"
        folder.mkdir()
        path = _write(folder / "s0.json", doc)
        with pytest.raises(ExperimentsError) as err:
            read_archive(folder)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and needle in msg, msg
    # a failed run may have no curves at all
    folder = tmp_path / "failed"
    folder.mkdir()
    _write(folder / "f.json", {**good, "name": "f", "state": "failed", "curves": {}, "metrics": {}})
    assert read_archive(folder)[0].state == "failed"


def test_bad_from_folders_are_one_error(tmp_path):
    with pytest.raises(ExperimentsError, match=r"--from .*missing: a path that is not a folder is not allowed"):
        read_archive(tmp_path / "missing")
    with pytest.raises(ExperimentsError, match="a folder without .json files is not allowed"):
        read_archive(tmp_path)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ExperimentsError, match=r"x.json: is not JSON"):
        read_archive(tmp_path)


@pytest.mark.parametrize("command", [
    ["search", "s0"], ["remedies", "--variant", "a=live:s0"], ["ladder", "--no-report"]])
def test_report_commands_read_from_and_reject_a_bad_archive(command, live, tmp_path, capsys):
    runs = tmp_path / "runs"
    archive_runs(["s0", "s1", "s2"], runs)
    extra = ["--out", str(tmp_path / "out")] if command[0] != "ladder" else []
    params = ["--params", str(tmp_path / "none.yaml")] if command[0] == "ladder" else []
    assert main([*command, "--from", str(runs), *extra, *params]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "s0" in out or "yolo10n" in out
    doc = json.loads((runs / "s1.json").read_text())
    _write(runs / "s1.json", {**doc, "schema": 99})
    assert main([*command, "--from", str(runs), *extra, *params]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s1.json: schema=99 is not allowed; expected schema 1" in err[0]


def test_dumps_is_json_with_one_line_per_list():
    doc = archive_doc(_rec("x", 0), _curves(0))
    text = dumps(doc)
    assert json.loads(text)["curves"]["qat"]["osc/frac_oscillating"][2] == 0.0300000000000001
    assert all(line.count("[") <= 1 for line in text.splitlines())


def test_an_archive_archives_again_byte_for_byte(live, tmp_path):
    """Archiving runs read from an archive (a later schema migration, a merged study) reproduces
    the files exactly: the curves an archive carries are used, nothing is read from DVC."""
    archive_runs(["s0", "s1"], tmp_path / "a")
    again = archive_runs(["s0", "s1"], tmp_path / "b", records=read_archive(tmp_path / "a"))
    for path, _ in again:
        assert path.read_bytes() == (tmp_path / "a" / path.name).read_bytes()


def test_ladder_from_an_archive_writes_reports_only_where_out_says(live, tmp_path, capsys):
    """Archived runs are another study's evidence: without --out the ladder prints its tables and
    leaves the committed reports/ladder alone; with --out it writes there."""
    runs = tmp_path / "runs"
    archive_runs(["s0", "s1", "s2"], runs)
    params = ["--params", str(tmp_path / "none.yaml"), "--repo", str(tmp_path)]
    assert main(["ladder", "--from", str(runs), *params]) == 0, capsys.readouterr().err
    assert "reports: not written for archived runs (--from); pass --out DIR" in capsys.readouterr().out
    assert not (tmp_path / "reports").exists()
    out = tmp_path / "elsewhere"
    assert main(["ladder", "--from", str(runs), "--out", str(out), *params]) == 0
    assert sorted(p.suffix for p in out.iterdir()) and (out / "yolo10n.md").is_file()


def test_several_from_folders_are_read_together_and_a_name_in_two_is_one_error(tmp_path, capsys):
    """A remedies table pairs a study's runs with the control runs archived by another study."""
    from yoloqat.analysis.experiments import load_runs

    study = REPO / "reports" / "collapse_repairs" / "runs"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for name in ("cc-rep-s0", "cc-rep-s1"):
        (a / f"{name}.json").write_text((study / f"{name}.json").read_text())
    (b / "cc-rep-s2.json").write_text((study / "cc-rep-s2.json").read_text())
    assert sorted(r.name for r in load_runs(archive=[a, b])) == ["cc-rep-s0", "cc-rep-s1", "cc-rep-s2"]
    assert main(["remedies", "--from", str(a), "--from", str(b), "--out", str(tmp_path / "out"),
                 "--variant", "live=live:cc-rep-s0,cc-rep-s2", "--variant", "EMA+QC=ema_qc:cc-rep-s0,cc-rep-s2"]) == 0
    assert "| EMA+QC | 2/2 |" in (tmp_path / "out" / "README.md").read_text()
    (b / "cc-rep-s0.json").write_text((study / "cc-rep-s0.json").read_text())
    assert main(["remedies", "--from", str(a), "--from", str(b), "--out", str(tmp_path / "out2"),
                 "--variant", "live=live:cc-rep-s0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'cc-rep-s0' is also archived in --from" in err[-1]
    assert not (tmp_path / "out2").exists()
