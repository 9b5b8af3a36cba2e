"""The source stage: prepare re-runs when the files data.path names change, and every
``dvc exp run`` validates the whole params.yaml (an unknown top-level key, a device this
machine lacks: one line)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers import copy_repo, run, tiny_params
from yoloqat.config import DataConfig
from yoloqat.data import prepare_dataset
from yoloqat.data.source import source_files, source_fingerprint

DVC = [sys.executable, "-m", "dvc"]


def _yolo_source(folder: Path) -> Path:
    """A small YOLO dataset (the synthetic generator writes that layout) and its yaml."""
    small = DataConfig(train_images=6, val_images=4, calib_images=2, imgsz=64)
    prepare_dataset(small, 0, folder, folder.parent, difficulty=0.3)
    return folder / "dataset.yaml"


def test_fingerprint_follows_edits_additions_and_removals(tmp_path):
    dataset_yaml = _yolo_source(tmp_path / "ds")
    cfg = DataConfig(source="yolo", path=str(dataset_yaml))
    files = source_files(cfg, tmp_path)
    # the yaml, 10 train/val images and their 10 label files
    assert len(files) == 21 and dataset_yaml in files
    first = source_fingerprint(cfg, tmp_path)
    assert first["files"] == 21 and source_fingerprint(cfg, tmp_path) == first

    label = min((tmp_path / "ds/labels/train").glob("*.txt"))
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
    edited = source_fingerprint(cfg, tmp_path)
    assert edited["sha256"] != first["sha256"] and edited["files"] == 21

    label.unlink()
    removed = source_fingerprint(cfg, tmp_path)
    assert removed["sha256"] not in (first["sha256"], edited["sha256"]) and removed["files"] == 20

    assert source_fingerprint(DataConfig(), tmp_path) == {
        "source": "synthetic", "path": None, "files": 0,
        "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    }


def test_editing_a_yolo_label_reruns_prepare_and_changes_the_manifest(tmp_path):
    dataset_yaml = _yolo_source(tmp_path / "ds")
    params = tiny_params({"data": {"source": "yolo", "path": str(dataset_yaml),
                                   "train_images": 6, "val_images": 4, "calib_images": 2}})
    repo = copy_repo(tmp_path / "repo", params)
    first = run([*DVC, "repro", "prepare"], repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert json.loads((repo / "data/source.json").read_text())["files"] == 21

    again = run([*DVC, "repro", "prepare"], repo)
    assert again.returncode == 0
    assert "Running stage 'source'" in again.stdout  # always runs (cheap)
    assert "Running stage 'prepare'" not in again.stdout, again.stdout

    label = min((tmp_path / "ds/labels/train").glob("*.txt"))
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
    edited = run([*DVC, "repro", "prepare"], repo)
    assert edited.returncode == 0, edited.stdout[-3000:] + edited.stderr[-3000:]
    assert "Running stage 'prepare'" in edited.stdout, edited.stdout
    after = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert after["splits"]["train"]["instances"] == before["splits"]["train"]["instances"] + 1
    assert after["content_hash"] != before["content_hash"]


def test_dvc_exp_run_with_an_unknown_top_level_key_fails_with_one_line(tmp_path):
    repo = copy_repo(tmp_path / "repo", tiny_params())
    res = run([*DVC, "exp", "run", "-S", "+foo=1"], repo)
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("source: ")]
    assert lines == [
        ("source: error: params: unknown key foo; allowed keys are cache, correction, data, "
         "deterministic, device, ema, evaluate, export, fp, ladder, model, preset, qat, qc, seed, "
         "stability")
    ]
    assert "Running stage 'prepare'" not in res.stdout
    assert not (repo / "data/prepared").exists()


def test_dvc_exp_run_with_a_device_this_machine_lacks_fails_at_source_in_one_line(tmp_path, monkeypatch):
    """Before: ``-S device=banana`` passed source and prepare, then train_fp died in a traceback
    from Ultralytics.  Now source names what this machine has and nothing else runs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the same answer on a GPU machine
    repo = copy_repo(tmp_path / "repo", tiny_params())
    res = run([*DVC, "exp", "run", "-S", "device=banana"], repo)
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("source: ")]
    assert lines == [
        ("source: error: params: device='banana' is not allowed; expected cpu, a CUDA index N, "
         "a list N,M, cuda, cuda:N or mps; this machine has: cpu")
    ]
    assert "Traceback" not in res.stdout + res.stderr
    assert "Running stage 'prepare'" not in res.stdout
    assert not (repo / "data/source.json").exists() and not (repo / "data/prepared").exists()
