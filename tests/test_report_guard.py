"""ladder / search / remedies never replace committed reports from a clone without experiments.

DVC experiments are not cloned with git: a fresh clone's ``dvc exp show`` lists commits and the
workspace only.  The default report folders hold committed evidence, so without the experiments
asked about the commands print one line saying what was missing, exit 2 and write nothing;
an explicit ``--out DIR`` is written with whatever was found.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import use_env_with_venv, write_ladder_params
from yoloqat.analysis.ladder_groups import committed_report_models, group_runs
from yoloqat.cli import main
from yoloqat.errors import ExperimentsError
from yoloqat.paths import LADDER_REPORTS

from .test_ladder import fake

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "exp_show.json"
LADDER_ERROR = (
    "yoloqat ladder: error: no DVC experiments found (only 1 git commit(s) and the workspace; DVC "
    "experiments are not cloned with git: dvc exp pull <remote>); {out} left as is: pass --out "
    "DIR to write a report there anyway, or --no-report\n"
)


def fresh_clone_json(tmp_path: Path) -> Path:
    """The recorded `dvc exp show --json` as a clone sees it: no experiments, and the commit
    carrying one run's committed results (what used to become "incomplete (1/3 seeds)")."""
    rows = json.loads(FIXTURE.read_text())
    base = rows[1]
    done = next(g for g in base["experiments"] if g["name"] == "pesky-pans")  # yolo10n seed 0
    base["data"]["metrics"] = copy.deepcopy(done["revs"][0]["data"]["metrics"])
    base["experiments"] = []
    out = tmp_path / "clone_show.json"
    out.write_text(json.dumps(rows))
    return out


def committed(tmp_path: Path, folder: str) -> dict[str, bytes]:
    """A copy of the repo's committed report folder under tmp_path; its files' bytes."""
    dst = tmp_path / folder
    shutil.copytree(REPO / folder, dst)
    return {p.name: p.read_bytes() for p in sorted(dst.iterdir())}


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def params(tmp_path) -> Path:
    return write_ladder_params(tmp_path)


# --------------------------------------------------------------------------------------------
# ladder


def test_ladder_without_experiments_is_one_line_and_leaves_the_committed_reports(
        tmp_path, params, capsys):
    before = committed(tmp_path, "reports/ladder")
    show = fresh_clone_json(tmp_path)
    rc = main(["ladder", "--from-json", str(show), "--repo", str(tmp_path), "--params", str(params)])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert cap.err == LADDER_ERROR.format(out=tmp_path / LADDER_REPORTS)
    assert contents(tmp_path / "reports" / "ladder") == before  # byte-identical, nothing added


def test_ladder_without_experiments_json_mode_is_the_same_line(tmp_path, params, capsys):
    before = committed(tmp_path, "reports/ladder")
    argv = ["ladder", "--from-json", str(fresh_clone_json(tmp_path)), "--repo", str(tmp_path),
            "--params", str(params), "--json"]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == LADDER_ERROR.format(out=tmp_path / LADDER_REPORTS)
    assert contents(tmp_path / "reports" / "ladder") == before


def test_ladder_without_experiments_and_out_writes_there_only(tmp_path, params, capsys):
    before = committed(tmp_path, "reports/ladder")
    out = tmp_path / "elsewhere"
    rc = main(["ladder", "--from-json", str(fresh_clone_json(tmp_path)), "--repo", str(tmp_path),
               "--params", str(params), "--out", str(out)])
    text = capsys.readouterr().out
    # the workspace's yolo10s run; the commit's yolo10n results are a plain commit, never pooled
    assert rc == 0 and f"reports: 3 files in {out}" in text
    assert "yolo10s.md" in set(contents(out)) and "yolo10n.md" not in set(contents(out))
    assert contents(tmp_path / "reports" / "ladder") == before


def test_ladder_without_experiments_and_no_report_prints_the_table(tmp_path, params, capsys):
    before = committed(tmp_path, "reports/ladder")
    rc = main(["ladder", "--from-json", str(fresh_clone_json(tmp_path)), "--repo", str(tmp_path),
               "--params", str(params), "--no-report"])
    assert rc == 0 and "  yolo10n: not started" in capsys.readouterr().out  # commits never pooled
    assert contents(tmp_path / "reports" / "ladder") == before


def test_ladder_with_experiments_still_writes_the_default_folder(tmp_path, params, capsys):
    rc = main(["ladder", "--from-json", str(FIXTURE), "--repo", str(tmp_path), "--params",
               str(params)])
    assert rc == 0 and f"reports: 6 files in {tmp_path / LADDER_REPORTS}" in capsys.readouterr().out
    assert sorted(contents(tmp_path / LADDER_REPORTS)) == [
        "yolo10n.md", "yolo10n_map.png", "yolo10n_osc.png",
        "yolo10s.md", "yolo10s_map.png", "yolo10s_osc.png"]


def test_a_model_seen_only_in_commits_is_left_out_of_the_committed_folder():
    n = [fake("yolo10n", seed=s) for s in range(2)]
    s_commit = dataclasses.replace(fake("yolo10s", seed=0), kind="baseline")
    records = [*n, s_commit]
    # a plain commit is never pooled: yolo10s forms no group, so nothing is written for it
    assert committed_report_models(records, group_runs(records), "reports/ladder") == (
        ["yolo10n"], [])
    only_commits = [dataclasses.replace(r, kind="baseline") for r in n]
    with pytest.raises(ExperimentsError, match=r"^no DVC experiments found \(only 2 git commit"):
        committed_report_models(only_commits, group_runs(only_commits), "reports/ladder")


def test_ladder_says_which_model_it_left_out(tmp_path, params, capsys):
    rows = json.loads(FIXTURE.read_text())
    base = rows[1]
    yolo10s = [g for g in base["experiments"] if g["name"] in ("woozy-seer", "tacky-dent")]
    base["experiments"] = [g for g in base["experiments"] if g not in yolo10s]
    # the commit carries a yolo10s run's committed results
    base["data"]["params"] = copy.deepcopy(yolo10s[1]["revs"][0]["data"]["params"])
    base["data"]["metrics"] = copy.deepcopy(yolo10s[1]["revs"][0]["data"]["metrics"])
    show = tmp_path / "show.json"
    show.write_text(json.dumps(rows))
    rc = main(["ladder", "--from-json", str(show), "--repo", str(tmp_path), "--params", str(params)])
    out = capsys.readouterr().out
    assert rc == 0
    assert sorted(contents(tmp_path / LADDER_REPORTS)) == ["yolo10n.md", "yolo10n_map.png",
                                                           "yolo10n_osc.png"]
    assert out.splitlines()[-1] == ("reports: yolo10s not written: no DVC experiments of it, only "
                                    "git commits (pass --out DIR to write it there)")


def test_ladder_in_a_real_fresh_clone(tmp_path, monkeypatch, capsys):
    """`dvc exp show` in a clone: a commit with committed results, no experiments."""
    use_env_with_venv(monkeypatch)
    repo = tmp_path / "clone"
    repo.mkdir()
    verdict = {**fake("yolo10n").verdict, "status": "completed"}
    (repo / "results" / "verdict").mkdir(parents=True)
    (repo / "results" / "verdict" / "metrics.json").write_text(json.dumps(verdict))
    (repo / "params.yaml").write_text(yaml.safe_dump({
        "model": "yolo10n", "ema": True, "qc": True, "seed": 0, "qat": {"bits": 4, "init": "fp"},
        "ladder": {"min_seeds": 3, "seeds": [0, 1, 2]}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"verdict": {
        "cmd": "true", "params": ["seed"],
        "metrics": [{"results/verdict/metrics.json": {"cache": False}}]}}}))
    (repo / "reports" / "ladder").mkdir(parents=True)
    (repo / "reports" / "ladder" / "yolo10n.md").write_text("committed evidence\n")

    def run(*cmd: str) -> None:
        res = subprocess.run(list(cmd), cwd=repo, capture_output=True, text=True, timeout=120,
                             check=False)
        assert res.returncode == 0, res.stderr[-2000:]

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "results committed, experiments not")
    assert main(["ladder", "--repo", str(repo), "--params", str(repo / "params.yaml")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert cap.err.startswith("yoloqat ladder: error: no DVC experiments found (only ")
    assert (repo / "reports" / "ladder" / "yolo10n.md").read_text() == "committed evidence\n"
    assert sorted(p.name for p in (repo / "reports" / "ladder").iterdir()) == ["yolo10n.md"]


# --------------------------------------------------------------------------------------------
# search and remedies

NAMES = ["fs-ref-cpu", "fs-collapse-s0"]
SEARCH_ERROR = (
    "yoloqat search: error: unknown experiment(s) fs-ref-cpu, fs-collapse-s0; known: none; "
    "reports/failure_search left as is (DVC experiments are not cloned with git: dvc exp pull "
    "<remote>); pass --out DIR to write the others there\n"
)


def test_search_without_the_experiments_is_one_line_and_writes_nothing(tmp_path, monkeypatch,
                                                                       capsys):
    before = committed(tmp_path, "reports/failure_search")
    monkeypatch.chdir(tmp_path)
    assert main(["search", *NAMES, "--from-json", str(fresh_clone_json(tmp_path))]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == SEARCH_ERROR
    assert contents(tmp_path / "reports" / "failure_search") == before


def test_search_with_out_writes_what_was_found_there(tmp_path, monkeypatch, capsys):
    before = committed(tmp_path, "reports/failure_search")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine"
    assert main(["search", "pesky-pans", "gone", "--from-json", str(FIXTURE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not found (left out): gone" in printed
    text = (out / "README.md").read_text()
    assert "| pesky-pans |" in text and "Not found in `dvc exp show` (left out): gone." in text
    assert (out / "curves.png").stat().st_size > 0
    assert contents(tmp_path / "reports" / "failure_search") == before
    # none found at all: still written where asked
    assert main(["search", *NAMES, "--from-json", str(fresh_clone_json(tmp_path)), "--out",
                 str(tmp_path / "empty")]) == 0
    capsys.readouterr()
    assert "(left out): fs-ref-cpu, fs-collapse-s0." in (tmp_path / "empty" / "README.md").read_text()


def test_search_of_experiments_that_exist_writes_the_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "pesky-pans", "--from-json", str(FIXTURE)]) == 0
    capsys.readouterr()
    assert sorted(contents(tmp_path / "reports" / "failure_search")) == ["README.md", "curves.png"]


def test_remedies_without_the_experiments_is_one_line_and_writes_nothing(tmp_path, monkeypatch,
                                                                         capsys):
    before = committed(tmp_path, "reports/remedies")
    monkeypatch.chdir(tmp_path)
    argv = ["remedies", "--variant", "none=live:fs-collapse-s0,fs-collapse-s1",
            "--from-json", str(fresh_clone_json(tmp_path))]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == (
        "yoloqat remedies: error: unknown experiment(s) fs-collapse-s0, fs-collapse-s1; known: "
        "none; reports/remedies left as is (DVC experiments are not cloned with git: dvc exp "
        "pull <remote>); pass --out DIR to write the others there\n")
    assert contents(tmp_path / "reports" / "remedies") == before


def test_remedies_with_out_lists_the_missing_in_their_row(tmp_path, monkeypatch, capsys):
    before = committed(tmp_path, "reports/remedies")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine"
    argv = ["remedies", "--variant", "EMA=ema:pesky-pans,gone", "--from-json", str(FIXTURE),
            "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    text = (out / "README.md").read_text()
    assert "gone (not found))" in text and "| pesky-pans |" in text
    assert "| gone |" not in text  # not a run-table row: there is nothing to show
    assert contents(tmp_path / "reports" / "remedies") == before
