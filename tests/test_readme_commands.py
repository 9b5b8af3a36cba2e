"""Every `dvc exp show`, `dvc plots` and `yoloqat` command the README prints, run against a real
small experiment: each must succeed and show the columns / plots the README says it does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, copy_repo, env_with_venv, tiny_params

README_PREFIXES = ("dvc exp show", "dvc plots", "yoloqat ")
# the README's report commands name the experiments its tables came from; here they read "tiny"
README_EXPERIMENTS = re.compile(r"\b(fs|rem)-[\w-]+")


def readme_commands() -> list[str]:
    """Commands from README's bash blocks (continuations joined, trailing comments dropped)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(README_PREFIXES):
                commands.append(" ".join(line.split()))
    return commands


@pytest.fixture(scope="module")
def experiment_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("readme") / "repo", tiny_params())
    res = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-n", "tiny"], cwd=repo,
                         env=env_with_venv(), capture_output=True, text=True, timeout=900,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


def sh(cmd: str, repo: Path) -> subprocess.CompletedProcess:
    env = env_with_venv()
    env["COLUMNS"] = "300"  # a wide terminal: DVC's table truncates headers to the width
    return subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_readme_prints_the_commands_this_test_runs():
    cmds = readme_commands()
    assert any(c.startswith("dvc exp show -A") for c in cmds)
    assert any(c.startswith("dvc plots diff") for c in cmds)
    assert {"yoloqat exps", "yoloqat ladder"} <= set(cmds)


def test_every_readme_command_runs_and_shows_what_it_claims(experiment_repo):
    repo = experiment_repo
    seen = set()
    for cmd in readme_commands():
        run = README_EXPERIMENTS.sub("tiny", cmd.replace(" --open", ""))  # no browser here
        if run.startswith(("yoloqat search", "yoloqat remedies")):
            run += f" --out {repo / 'report_out'}"
        if "--queue-next" in run:
            run += " --dry-run"  # print the dvc command instead of queueing
        res = sh(run, repo)
        assert res.returncode == 0, f"{cmd}: {res.stderr[-2000:]}"
        out = res.stdout
        if cmd.startswith("dvc exp show -A"):
            for column in ("Experiment", "model", "seed", "verdict.label", "verdict.live_label",
                           "verdict.ema_label", "verdict.qc_delta_mAP50-95",
                           "evaluate.w4a16_mAP50-95", "evaluate.gap_mAP50-95"):
                assert column in out, (column, out[:2000])
            assert "results/" not in out  # no file-prefixed headers
            seen.add("show")
        elif cmd.startswith("dvc plots diff"):
            html = repo / "dvc_plots" / "index.html"
            assert html.is_file(), out
            page = html.read_text()
            for name in ("val_mAP50-95", "qat_losses", "oscillating_fraction",
                         "qat_learning_rate"):
                assert name in page, name
            assert "plots/metrics/val/mAP50-95.tsv" not in page  # no automatic per-file plots
            seen.add("plots")
        elif cmd == "yoloqat exps":
            lines = out.splitlines()
            assert lines[0].split()[:5] == ["experiment", "model", "ema", "qc", "seed"]
            assert any(line.startswith("tiny ") for line in lines)
            assert max(len(line) for line in lines) <= 160
            seen.add("exps")
        elif cmd.startswith("yoloqat judge"):
            assert "val_live" in out and "val_ema" in out
            seen.add("judge")
        elif cmd.startswith("yoloqat ladder"):
            assert "Ladder yolo10n -> yolo10s -> yolo10m" in out
            seen.add("ladder")
        elif cmd.startswith("yoloqat search"):
            assert "| exp | setting (vs defaults) |" in out and "| tiny |" in out
            seen.add("search")
        elif cmd.startswith("yoloqat remedies"):
            assert "| variant | curve | runs | stable |" in out and "| tiny |" in out
            seen.add("remedies")
    assert seen == {"show", "plots", "exps", "judge", "ladder", "search", "remedies"}
