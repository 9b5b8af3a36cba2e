"""Several machines, one study, with DVC's own remotes (README "Several machines").

Two clones of one repo (the machines) each run an experiment and ``dvc exp push origin``: the
experiment's commit goes to the git remote, its DVC-cached outputs to the DVC remote that the
repo's .dvc/config names.  A third clone sees none of them until ``dvc exp pull origin``, then
reads both runs as the ladder does: params, metrics, the git-tracked QAT curve and the
DVC-cached FP curve.  Tiny settings, and only up to the qat stage (what the reader needs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import copy_repo, run, tiny_params, use_env_with_venv
from yoloqat.analysis.exp_curves import read_curves
from yoloqat.analysis.experiments import read_experiments

DVC = [sys.executable, "-m", "dvc"]


def _ok(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    res = run(cmd, cwd, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} in {cwd.name}: {res.stderr[-2000:]}"
    return res.stdout


def _experiments(repo: Path) -> dict:
    return {r.name: r for r in read_experiments(repo) if r.kind == "experiment"}


def test_two_machines_push_experiments_a_third_pulls_and_reads_both(tmp_path, monkeypatch):
    use_env_with_venv(monkeypatch)  # read_experiments runs dvc in this process
    params = tiny_params({"fp": {"epochs": 1, "batch": 8, "seed": 0}})
    project = copy_repo(tmp_path / "project", params)
    storage = tmp_path / "dvc-storage"  # stands for s3://..., ssh://..., a shared folder
    _ok([*DVC, "remote", "add", "-d", "storage", str(storage)], project)
    _ok(["git", "commit", "-q", "-am", "DVC remote"], project)
    origin = tmp_path / "origin.git"  # stands for the team's git server
    _ok(["git", "clone", "-q", "--bare", str(project), str(origin)], tmp_path)

    for machine, seed in (("machine-a", 0), ("machine-b", 1)):
        clone = tmp_path / machine
        _ok(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
        _ok([*DVC, "exp", "run", "-n", machine, "-S", f"seed={seed}", "qat"], clone, timeout=900)
        _ok([*DVC, "exp", "push", "origin", machine], clone)

    third = tmp_path / "machine-c"
    _ok(["git", "clone", "-q", str(origin), str(third)], tmp_path)
    assert _experiments(third) == {}
    _ok([*DVC, "exp", "pull", "origin"], third)

    runs = _experiments(third)
    assert sorted(runs) == ["machine-a", "machine-b"]
    assert {name: r.params["seed"] for name, r in runs.items()} == {"machine-a": 0, "machine-b": 1}
    for name, record in runs.items():
        assert record.state == "done", (name, record.error)
        assert record.metrics["qat"]["status"] == "completed", (name, record.metrics.get("qat"))
        curves = read_curves(record, third)
        assert len(curves["map"] or []) == params["qat"]["epochs"], (name, curves)
        # train_fp's curves are DVC-cached, not in git: read from the pulled cache
        assert len(curves["fp_map"] or []) == params["fp"]["epochs"], (name, curves)
    assert not subprocess.run(
        ["git", "status", "--porcelain"], cwd=third, capture_output=True, text=True, check=True
    ).stdout  # pulling changed no workspace file
