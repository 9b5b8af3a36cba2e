"""Every `dvc exp show`, `dvc plots` and `yoloqat` command the README, docs/ and the reports'
READMEs print, run against a real small experiment: each must succeed and show the columns /
plots the text says it does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, copy_repo, env_with_venv, tiny_params

README_PREFIXES = ("dvc exp show", "dvc plots", "yoloqat ")
# the README's report commands name the experiments its tables came from; here they read "tiny"
README_EXPERIMENTS = re.compile(r"\b(fs|rem)-[\w-]+")


def documentation_files() -> list[Path]:
    """README.md, then docs/, then the reports' READMEs: the order their commands run in."""
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "reports").rglob("README.md")),
    ]


def readme_commands(files: list[Path] | None = None) -> list[str]:
    """Commands from the bash blocks of ``files`` (default: every documentation file), with
    continuations joined and trailing comments dropped."""
    text = "\n".join(f.read_text() for f in (files or documentation_files()))
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(README_PREFIXES):
                commands.append(" ".join(line.split()))
    return list(dict.fromkeys(commands))  # a command shown in two places runs once


@pytest.fixture(scope="module")
def experiment_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("readme") / "repo", tiny_params())
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "-n", "tiny"],
        cwd=repo,
        env=env_with_venv(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


def sh(cmd: str, repo: Path) -> subprocess.CompletedProcess:
    env = env_with_venv()
    env["COLUMNS"] = "300"  # a wide terminal: DVC's table truncates headers to the width
    return subprocess.run(
        ["bash", "-c", cmd],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_readme_prints_the_commands_this_test_runs():
    cmds = readme_commands([REPO / "README.md"])
    assert any(c.startswith("dvc exp show --no-pager") for c in cmds)
    assert any(c.startswith("dvc plots diff") for c in cmds)
    assert {"yoloqat exps", "yoloqat ladder", "yoloqat judge results/qat"} <= set(cmds)


def test_commands_are_collected_from_docs_and_reports_too():
    readme = set(readme_commands([REPO / "README.md"]))
    docs = set(readme_commands([REPO / "docs" / "experiments.md"]))
    reports = set(readme_commands([REPO / "reports" / "README.md"]))
    assert any(c.startswith("yoloqat archive") for c in docs)
    assert any(c.startswith("yoloqat ladder --params") for c in reports)
    assert (docs | reports) - readme <= set(readme_commands())


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
        if cmd.startswith("dvc exp show --no-pager"):
            for column in (
                "Experiment",
                "model",
                "seed",
                "verdict.label",
                "verdict.live_label",
                "verdict.ema_label",
                "verdict.qc_delta_mAP50-95",
                "evaluate.w4a16_mAP50-95",
                "evaluate.gap_mAP50-95",
            ):
                assert column in out, (column, out[:2000])
            assert "results/" not in out  # no file-prefixed headers
            seen.add("show")
        elif cmd.startswith("dvc plots diff"):
            html = repo / "dvc_plots" / "index.html"
            assert html.is_file(), out
            page = html.read_text()
            for name in ("val_mAP50-95", "qat_losses", "oscillating_fraction", "qat_learning_rate"):
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
        elif cmd.startswith("yoloqat archive"):
            assert out.startswith("wrote ") and "tiny.json" in out, out
            seen.add("archive")
    assert seen == {"show", "plots", "exps", "judge", "ladder", "search", "remedies", "archive"}


# --------------------------------------------------------------------------------------------
# yoloqat archive of the one tiny experiment


def _experiment_rev(repo: Path) -> str:
    res = sh("git for-each-ref --format='%(objectname) %(refname)' refs/exps", repo)
    (rev,) = [line.split()[0] for line in res.stdout.splitlines() if line.endswith("/tiny")]
    return rev


def test_archive_of_a_real_experiment_holds_its_params_metrics_and_curves(experiment_repo):
    from yoloqat.curves.reader import read_live_dir

    repo = experiment_repo
    res = sh("yoloqat archive tiny --to reports/study/runs", repo)
    assert res.returncode == 0, res.stderr
    path = repo / "reports/study/runs/tiny.json"
    assert res.stdout.startswith(
        f"wrote reports/study/runs/tiny.json ({path.stat().st_size / 1000:.1f} kB)"
    )
    assert path.stat().st_size < 50_000
    doc = json.loads(path.read_text())
    assert list(doc) == [
        "schema",
        "name",
        "commit",
        "baseline",
        "timestamp",
        "state",
        "error",
        "params",
        "metrics",
        "curves",
    ]
    assert (doc["schema"], doc["name"], doc["state"]) == (1, "tiny", "done")
    assert doc["commit"] == _experiment_rev(repo)
    params = doc["params"]
    assert params["qat.scale_weight_decay"] == 0.0 and params["seed"] == 0
    assert params["fp.epochs"] == 1 and params["qat.epochs"] == 2 and params["preset"] == "none"
    assert {"qat", "qc", "verdict", "train_fp", "fp_control", "export", "evaluate"} <= set(
        doc["metrics"]
    )
    assert doc["metrics"]["verdict"]["label"] == doc["metrics"]["verdict"]["ema_label"]
    assert set(doc["curves"]) == {"qat", "train_fp", "fp_control"}
    qat = doc["curves"]["qat"]
    assert {
        "val/mAP50-95",
        "val_live/mAP50-95",
        "val_ema/mAP50-95",
        "osc/frac_oscillating",
        "train/box_loss",
        "lr/pg0",
    } <= set(qat)
    assert (
        all(len(v) == 2 for v in qat.values())
        and len(doc["curves"]["train_fp"]["val/mAP50-95"]) == 1
    )
    # the experiment was applied to the workspace: its curves are the ones DVCLive wrote there
    # (train_fp's from the DVC cache: its plots are a cached output now)
    for stage, folder in (("qat", "results/qat"), ("train_fp", "results/train_fp")):
        live_dir = read_live_dir(repo / folder)
        for name, values in live_dir.series.items():
            assert doc["curves"][stage][name] == values, (stage, name)


def test_reports_from_the_archive_equal_the_reports_from_the_experiment(experiment_repo):
    from yoloqat.analysis.archive_reader import read_archive
    from yoloqat.analysis.exp_curves import read_curves
    from yoloqat.analysis.experiments import read_experiments
    from yoloqat.analysis.ladder_groups import group_runs
    from yoloqat.analysis.ladder_tables import format_table, ladder_json
    from yoloqat.analysis.search import markdown_table, search_row, select

    repo = experiment_repo
    assert sh("yoloqat archive tiny --to reports/eq/runs", repo).returncode == 0
    live = [r for r in read_experiments(repo) if r.kind == "experiment"]
    archived = read_archive(repo / "reports/eq/runs")

    def tables(records):
        chosen = select(records, ["tiny"])
        rows = [search_row(r, read_curves(r, repo).get("bnre")) for r in chosen]
        groups = group_runs(records)
        return markdown_table(rows), format_table(groups), [read_curves(r, repo) for r in chosen]

    assert tables(archived) == tables(live)
    assert json.dumps(ladder_json(group_runs(archived), _decision(repo, archived))) == json.dumps(
        ladder_json(group_runs(live), _decision(repo, live))
    )
    search = [
        sh(f"yoloqat search tiny {src} --out {repo / out}", repo)
        for src, out in (("", "s_live"), ("--from reports/eq/runs", "s_arch"))
    ]
    assert search[0].returncode == search[1].returncode == 0, search[1].stderr
    assert search[0].stdout.splitlines()[:-1] == search[1].stdout.splitlines()[:-1]  # but "wrote"


def _decision(repo, records):
    from yoloqat.analysis.ladder import decide, ladder_settings
    from yoloqat.analysis.ladder_groups import group_runs

    return decide(group_runs(records), *ladder_settings(repo / "params.yaml"))


def test_archive_bad_input_is_one_line_exit_2_and_writes_nothing(experiment_repo, tmp_path):
    repo = experiment_repo
    (tmp_path / "a_file").write_text("")
    cases = [
        ("yoloqat archive tiny nope --to reports/bad/runs", "unknown experiment(s) nope; known: "),
        (
            f"yoloqat archive tiny --to {tmp_path / 'a_file' / 'runs'}",
            "is not a folder; expected a folder",
        ),
    ]
    for cmd, needle in cases:
        res = sh(cmd, repo)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1 and needle in err[0], (cmd, res.stderr)
        assert err[0].startswith("yoloqat archive: error: ")
    assert not (repo / "reports/bad").exists() and (tmp_path / "a_file").read_text() == ""
