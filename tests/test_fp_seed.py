"""fp.seed: the seed of the dataset draw and FP training, so a grid over the QAT seed trains FP once.

The source stage writes params.yaml resolved (preset applied, fp.seed filled in) to
results/resolved_params.yaml; prepare and train_fp depend on the keys they read there, and every
out of train_fp is cached, so DVC's run-cache restores an FP run it has seen.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import yaml

from tests.helpers import copy_repo, default_params, run, tiny_params
from yoloqat.config import ConfigError, load_config
from yoloqat.provenance import resolved_params_doc, write_resolved_params


def _params(tmp_path, **fp):
    raw = default_params()
    raw["fp"].update(fp)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("value", [-1, 1.5, "zero", True])
def test_bad_fp_seed_is_one_line_naming_key_value_and_allowed(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        load_config(_params(tmp_path, seed=value))
    msg = str(err.value)
    assert "\n" not in msg and f"fp.seed={value!r}" in msg
    assert "expected null (use seed) or an integer >= 0" in msg


def test_fp_seed_defaults_to_seed_and_a_fixed_one_wins(tmp_path):
    cfg = load_config(_params(tmp_path))
    assert cfg.fp.seed is None and cfg.fp_seed == cfg.seed == 0
    raw = default_params()
    raw["seed"] = 3
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "a.yaml").fp_seed == 3
    raw["fp"]["seed"] = 0
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "b.yaml").fp_seed == 0


def test_resolved_file_has_the_presets_values_and_the_fp_seed(tmp_path):
    raw = default_params()
    raw.update({"preset": "reference", "seed": 4})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "params.yaml")
    write_resolved_params(tmp_path / "resolved.yaml", cfg)
    doc = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert doc == json.loads(json.dumps(resolved_params_doc(cfg)))
    r = doc["resolved"]
    # the preset's model and image size reach train_fp through these keys
    assert r["model"] == "yolo10m" and r["data"]["imgsz"] == 640 and r["preset"] == "reference"
    assert r["seed"] == 4 and r["fp"]["seed"] == 4 and r["fp"]["init_checkpoint_sha256"] is None


def test_the_start_checkpoints_content_is_in_the_resolved_file(tmp_path):
    ckpt = tmp_path / "start.pt"
    ckpt.write_bytes(b"one")
    cfg = load_config(_params(tmp_path, init_checkpoint=str(ckpt)))
    first = resolved_params_doc(cfg)["resolved"]["fp"]["init_checkpoint_sha256"]
    ckpt.write_bytes(b"two")
    assert resolved_params_doc(cfg)["resolved"]["fp"]["init_checkpoint_sha256"] not in (first, None)


def test_fp_training_uses_the_fp_seed(tmp_path, monkeypatch):
    from yoloqat.train import overrides

    monkeypatch.setattr(overrides, "require_dataset", lambda: tmp_path / "dataset.yaml")
    raw = default_params()
    raw["seed"], raw["fp"]["seed"] = 2, 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "params.yaml")
    common = {"model": "m", "epochs": 1, "batch": 1, "optimizer": "SGD", "lr0": 0.1,
              "weight_decay": 0.0, "warmup_epochs": 0.0, "workers": 0, "project": "p", "name": "n"}
    assert overrides.ultralytics_overrides(cfg, **common)["seed"] == 2  # QAT, fp_control
    assert overrides.ultralytics_overrides(cfg, **common, seed=cfg.fp_seed)["seed"] == 0  # FP


def test_two_queued_experiments_differing_only_in_the_qat_seed_train_fp_once(tmp_path):
    """The issue's case: a queue of seed=0,1 with fp.seed fixed.  The first task trains FP; the
    second restores prepare and train_fp from DVC's run-cache (identical metrics, same seconds)."""
    params = tiny_params({"fp": {"epochs": 1, "batch": 8, "seed": 0}})
    repo = copy_repo(tmp_path / "repo", params)
    dvc = [sys.executable, "-m", "dvc"]
    queued = run([*dvc, "exp", "run", "--queue", "-S", "seed=0,1", "train_fp"], repo)
    assert queued.returncode == 0, queued.stderr[-2000:]
    started = run([*dvc, "queue", "start", "-j", "1"], repo)
    assert started.returncode == 0, started.stderr[-2000:]
    deadline = time.monotonic() + 900
    status = ""
    while time.monotonic() < deadline:
        status = run([*dvc, "queue", "status"], repo).stdout
        if "0 active, 0 idle" in status and "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    rows = [ln.split() for ln in status.splitlines() if ln.strip().endswith("Success")]
    assert len(rows) == 2, status
    logs = {name: run([*dvc, "queue", "logs", name], repo).stdout for _, name, *_ in rows}
    trained = [n for n, log in logs.items() if "Running stage 'train_fp'" in log]
    restored = [n for n, log in logs.items() if "Stage 'train_fp' is cached - skipping run" in log]
    assert len(trained) == 1 and len(restored) == 1, {n: log[-1500:] for n, log in logs.items()}
    assert "Stage 'prepare' is cached - skipping run" in logs[restored[0]]

    shown = json.loads(run([*dvc, "exp", "show", "--json"], repo).stdout)
    exps = [g["revs"][0]["data"] for row in shown for g in (row.get("experiments") or [])]
    seeds = sorted(e["params"]["params.yaml"]["data"]["seed"] for e in exps)
    fp_metrics = [e["metrics"]["results/train_fp/metrics.json"]["data"] for e in exps]
    assert seeds == [0, 1] and fp_metrics[0] == fp_metrics[1]  # "seconds" included: one run
