"""A stage builds its outputs in a staging mirror and moves them into place only when its job
succeeds: a failed job leaves no output, a killed one leaves the previous outputs untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.helpers import env_with_venv, tiny_params
from yoloqat.errors import DataError
from yoloqat.pipeline.stage import run_stage
from yoloqat.provenance import git_revision

OUTPUTS = [Path("results/fake"), Path("models/fake")]
OLD = {"results/fake/epoch.tsv": "step\tx\n0\t1\n1\t2\n", "models/fake/last.qat.pt": "old model"}

# A stage whose job writes part of its outputs, says so, and then (with HANG set) waits to be
# killed, the way a QAT run is killed after three epochs.
FAKE_STAGE = """
import os, sys, time
from pathlib import Path
from yoloqat.pipeline.stage import run_stage

def job(cfg):
    Path("results/fake").mkdir(parents=True)
    Path("results/fake/epoch.tsv").write_text("step\\tx\\n0\\t9\\n")
    cfg.resolve("models/fake").mkdir(parents=True)
    cfg.resolve("models/fake/last.qat.pt").write_text("new model")
    print("written", flush=True)
    if os.environ.get("HANG"):
        time.sleep(600)

raise SystemExit(run_stage("fake", job, lambda cfg: [Path("results/fake"), Path("models/fake")]))
"""


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path):
    """A committed git repo with the previous run's outputs, another stage's results and data."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    for rel, text in {**OLD, "results/other/metrics.json": "{}\n", "data/input.txt": "input\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    env = env_with_venv()
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml", "data"],
                ["git", "commit", "-q", "-m", "inputs"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    return tmp_path


def run_in_process(repo: Path, job, monkeypatch) -> int:
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["stages/fake.py"])
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # run_stage sets it
    return run_stage("fake", job, lambda cfg: OUTPUTS)


def test_a_successful_job_replaces_its_outputs_whole_and_leaves_no_staging(repo, monkeypatch):
    seen = {}

    def job(cfg):
        # while the job runs, the previous outputs are still complete in place
        seen["old_in_place"] = tree(repo / "results/fake") == {"epoch.tsv": OLD["results/fake/epoch.tsv"]}
        seen["inputs"] = (Path("data/input.txt").read_text(),
                          cfg.resolve("results/other/metrics.json").read_text())
        seen["fresh"] = not Path("results/fake").exists() and not cfg.resolve("models/fake").exists()
        Path("results/fake").mkdir(parents=True)
        Path("results/fake/metrics.json").write_text(json.dumps(git_revision(cfg.root)))
        cfg.resolve("models/fake").mkdir(parents=True)
        cfg.resolve("models/fake/best.pt").write_text("new model")

    assert run_in_process(repo, job, monkeypatch) == 0
    assert seen == {"old_in_place": True, "inputs": ("input\n", "{}\n"), "fresh": True}
    assert sorted(tree(repo / "results/fake")) == ["metrics.json"]  # nothing left of the old run
    assert tree(repo / "models/fake") == {"best.pt": "new model"}
    # provenance names the real repository's revision, not the mirror's
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert json.loads((repo / "results/fake/metrics.json").read_text()) == {"commit": head, "dirty": False}
    # the other stage's results stay a real folder with their content
    assert not (repo / "results/other").is_symlink()
    assert tree(repo / "results/other") == {"metrics.json": "{}\n"}
    assert os.listdir(repo / ".yoloqat/staging") == []


@pytest.mark.parametrize("error", [DataError, RuntimeError])
def test_a_failing_job_removes_its_outputs_and_leaks_nothing_from_staging(repo, monkeypatch, capsys, error):
    def job(cfg):
        Path("results/fake").mkdir(parents=True)
        Path("results/fake/epoch.tsv").write_text("step\tx\n0\t9\n")
        raise error(f"{cfg.resolve('data/input.txt')} has no labels" if error is DataError else "a bug")

    if error is DataError:
        assert run_in_process(repo, job, monkeypatch) == 2
        # one line, naming the file where the user finds it, not inside the staging mirror
        assert capsys.readouterr().err == f"fake: error: {repo.resolve()}/data/input.txt has no labels\n"
    else:
        with pytest.raises(RuntimeError, match="a bug"):
            run_in_process(repo, job, monkeypatch)
    # as before staging: a failed stage owns no outputs, so DVC caches nothing half-written
    assert not (repo / "results/fake").exists() and not (repo / "models/fake").exists()
    assert tree(repo / "results/other") == {"metrics.json": "{}\n"}
    assert os.listdir(repo / ".yoloqat/staging") == []


def test_a_killed_stage_leaves_the_previous_outputs_untouched(repo):
    script = repo / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    cmd = [sys.executable, str(script)]
    stage = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "HANG": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert stage.stdout.readline() == "written\n"
        # a second writer is refused before it touches anything, the running stage's mirror included
        second = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
        assert second.returncode == 2 and "another process" in second.stderr
        staged = repo / ".yoloqat/staging/fake/results/fake/epoch.tsv"
        assert staged.read_text() == "step\tx\n0\t9\n"
    finally:
        stage.send_signal(signal.SIGKILL)
        stage.wait(timeout=30)
    assert tree(repo / "results") == {"fake/epoch.tsv": OLD["results/fake/epoch.tsv"],
                                      "other/metrics.json": "{}\n"}
    assert tree(repo / "models") == {"fake/last.qat.pt": "old model"}

    # the next run clears what the killed one left in staging and publishes its own result
    again = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert tree(repo / "results/fake") == {"epoch.tsv": "step\tx\n0\t9\n"}
    assert tree(repo / "models/fake") == {"last.qat.pt": "new model"}
    assert os.listdir(repo / ".yoloqat/staging") == []
