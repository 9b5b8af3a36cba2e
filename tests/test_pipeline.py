"""dvc repro of prepare + train_fp on a tiny config, then again: DVC must re-run nothing."""

from __future__ import annotations

import json
import sys

from tests.helpers import REPO, copy_repo, run, tiny_params
from yoloqat.provenance import read_metrics


def test_dvc_repro_prepare_and_train_fp_then_nothing_to_do(tmp_path):
    repo = copy_repo(tmp_path / "repo", tiny_params())
    dvc = [sys.executable, "-m", "dvc"]
    first = run([*dvc, "repro", "train_fp"], repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (repo / "data/prepared/dataset.yaml").is_file()
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 24
    assert (repo / "models/fp/best.pt").is_file()
    meta = json.loads((repo / "models/fp/metadata.json").read_text())
    assert meta["seed"] == 0 and meta["dataset_hash"] == manifest["content_hash"]
    assert "torch" in meta["packages"] and meta["params"]["fp"]["epochs"] == 1
    # the job ran in a staging mirror; provenance still names the repository's own revision
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert meta["git"] == {"commit": head, "dirty": False}
    assert list((repo / ".yoloqat/staging").iterdir()) == []  # nothing left of the mirror
    metrics = read_metrics(repo / "results/train_fp/metrics.json")
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    assert 0.0 <= metrics["best"] <= 1.0
    tsv = repo / "results/train_fp/plots/metrics/val/mAP50-95.tsv"
    assert tsv.read_text().splitlines()[0].split("\t") == ["step", "mAP50-95"]
    assert (repo / "results/train_fp/plots/metrics/train/box_loss.tsv").is_file()

    status = run([*dvc, "status", "train_fp"], repo)
    assert "up to date" in status.stdout, status.stdout
    second = run([*dvc, "repro", "train_fp"], repo)
    assert second.returncode == 0
    # only the always-run source stage runs (it validates params and fingerprints the data)
    ran = [ln for ln in second.stdout.splitlines() if ln.startswith("Running stage")]
    assert ran == ["Running stage 'source':"], second.stdout
    assert "didn't change, skipping" in second.stdout


def test_fp_control_off_still_writes_every_declared_output(tmp_path, monkeypatch):
    """DVC fails a stage whose declared outputs are missing: with fp.control false the stage
    trains nothing but must still leave each of them (a bug that stopped every control-off run)."""
    import yaml

    from yoloqat.config import Config, FPConfig
    from yoloqat.pipeline.train_fp import train_fp_control

    monkeypatch.chdir(tmp_path)
    summary = train_fp_control(Config(root=tmp_path, fp=FPConfig(control=False)))
    assert summary["status"] == "off"
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["fp_control"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"] + spec.get("metrics", [])]
    missing = [o for o in outs if not (tmp_path / o).exists()]
    assert not missing, missing
