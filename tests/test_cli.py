"""The `yoloqat` console script: judge and ladder subcommands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import write_ladder_params
from yoloqat.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "exp_show.json"
GRID_CMD = "dvc exp run --queue -S model=yolo10s -S ema=true -S qc=true -S seed=2"


def write_tsv(path: Path, values: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\tmAP50-95\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
    return path


@pytest.fixture
def params(tmp_path) -> Path:
    return write_ladder_params(tmp_path)


def test_judge_table_and_json(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "mAP50-95.tsv", [0.05, 0.15, 0.25, 0.1, 0.03, 0.01])
    missing_params = str(tmp_path / "none.yaml")
    assert main(["judge", str(tsv), "--params", missing_params]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["path", "curve", "label"]
    assert "collapsed" in out.splitlines()[1]
    assert main(["judge", str(tsv), "--json", "--params", missing_params]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["label"] == "collapsed" and row["best"] == 0.25 and row["source"] == "dvclive_tsv"


def test_judge_error_is_one_line_exit_2(tmp_path, capsys):
    assert main(["judge", str(tmp_path / "nope.tsv"), "--params", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yoloqat judge: error:") and err.count("\n") == 1


def test_ladder_from_json_no_report(params, capsys):
    assert main(["ladder", "--from-json", str(FIXTURE), "--no-report", "--params",
                 str(params)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "setting", "seeds"]
    assert lines[1].split()[:3] == ["yolo10n", "default", "3"]
    assert ("  yolo10n: passed (EMA (no per-epoch QC curve: qat.repair_curves lacks qc) not stable "
            "in 0/3 seeds, live (control) in 3/3, paired p = 0.125)") in lines
    # per setting, the endpoint table (the fixture's curves are not in this repo: verdict values)
    assert "Endpoints: yolo10n default (seeds 0, 1, 2), AUC from epoch 1" in lines
    assert "  yolo10s: incomplete (1/3 seeds, 1 queued)" in lines
    assert "  yolo10m: waiting for yolo10s" in lines
    assert lines[-1].startswith("Next rung: yolo10s.")
    assert "would run" not in out


def test_ladder_json_and_queue_next_dry_run(params, capsys):
    argv = ["ladder", "--from-json", str(FIXTURE), "--no-report", "--params", str(params)]
    assert main([*argv, "--json", "--queue-next", "--dry-run"]) == 0
    cap = capsys.readouterr()
    data = json.loads(cap.out)  # stdout stays pure JSON
    assert [len(g["runs"]) for g in data["groups"]] == [3, 1]
    assert data["decision"]["next_rung"] == "yolo10s"
    assert [e["model"] for e in data["endpoints"]] == ["yolo10n", "yolo10s"]
    assert [r["state"] for r in data["decision"]["rungs"]] == ["passed", "incomplete",
                                                                "not_started"]
    assert f"would run: {GRID_CMD}" in cap.err
    assert main([*argv, "--queue-next", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"would run: {GRID_CMD}" in out
    assert out[-1].startswith("then start the queue: dvc queue start")


def test_ladder_min_seeds_from_params(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"qat": {"bits": 4, "init": "fp"},
                                 "ladder": {"min_seeds": 1, "seeds": [0]}}))
    assert main(["ladder", "--from-json", str(FIXTURE), "--no-report", "--params", str(p),
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # yolo10s has one stable EMA seed but no control curve failed there: it cannot pass
    assert data["decision"]["next_rung"] is None
    assert [r["state"] for r in data["decision"]["rungs"]][:2] == ["passed", "no_failure"]


def test_ladder_writes_reports(params, tmp_path, capsys):
    out_dir = tmp_path / "reports"
    assert main(["ladder", "--from-json", str(FIXTURE), "--params", str(params), "--repo",
                 str(tmp_path), "--out", str(out_dir)]) == 0
    assert "reports: 6 files" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "yolo10n.md", "yolo10n_map.png", "yolo10n_osc.png",
        "yolo10s.md", "yolo10s_map.png", "yolo10s_osc.png",
    ]
    assert "Curves could not be read for" in (out_dir / "yolo10n.md").read_text()


@pytest.mark.parametrize("argv, start", [
    (["ladder", "--from-json", "/nonexistent/exp.json", "--no-report"],
     "yoloqat ladder: error: /nonexistent/exp.json cannot be read"),
    (["ladder", "--bogus"], "yoloqat ladder: error: unrecognized arguments: --bogus"),
    (["frobnicate"], "yoloqat: error: unknown command 'frobnicate'"),
])
def test_errors_are_one_line_exit_2(argv, start, params, capsys):
    if argv[0] == "ladder" and "--bogus" not in argv:
        argv = [*argv, "--params", str(params)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1


def test_bad_ladder_params_is_an_error(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"ladder": {"min_seeds": 0}}))
    assert main(["ladder", "--from-json", str(FIXTURE), "--no-report", "--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yoloqat ladder: error: params: ladder.min_seeds=0") and \
        err.count("\n") == 1


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "judge" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["ladder", "--help"]) == 0
    assert "--queue-next" in capsys.readouterr().out


def test_console_module_runs(tmp_path):
    tsv = write_tsv(tmp_path / "m.tsv", [0.05, 0.1, 0.2, 0.25, 0.26])
    res = subprocess.run(
        [sys.executable, "-m", "yoloqat.cli", "judge", str(tsv), "--json", "--params",
         str(tmp_path / "none.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["label"] == "stable"


def test_exps_is_one_compact_line_per_experiment(capsys):
    assert main(["exps", "--from-json", str(FIXTURE)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["experiment", "model", "ema", "qc", "seed"]
    assert len(lines) == 1 + 14  # the fixture's experiments, not the workspace or commits
    assert max(len(line) for line in lines) <= 160
    bumpy = next(line for line in lines if line.startswith("bumpy-taro"))
    assert bumpy.split()[1:5] == ["yolo10n", "true", "true", "0"]
    assert "queued" in next(line for line in lines if line.startswith("tacky-dent"))
