"""prepare and train_fp must not touch the network: run them with sockets blocked."""

from __future__ import annotations

import socket
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import copy_repo, tiny_params
from yoloqat.provenance import read_metrics


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt raises, and is recorded (in case a caller swallows the error)."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        where = " <- ".join(f"{f.filename}:{f.lineno}" for f in traceback.extract_stack(limit=14))
        attempts.append(f"{args[1:] or args!r} from {where}")
        raise NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts


def test_prepare_and_train_fp_run_with_sockets_blocked(tmp_path, monkeypatch, no_network):
    from yoloqat.config import load_config
    from yoloqat.data import prepare_dataset
    from yoloqat.offline import configure_offline
    from yoloqat.pipeline.train_fp import train_fp

    repo = copy_repo(tmp_path / "repo", tiny_params())
    monkeypatch.chdir(repo)
    configure_offline()
    cfg = load_config(repo / "params.yaml")
    manifest = prepare_dataset(cfg.data, cfg.seed, repo / "data/prepared", cfg.root,
                               difficulty=cfg.data.difficulty)
    assert manifest["splits"]["train"]["images"] == 24
    summary = train_fp(cfg)
    assert summary["status"] == "completed"
    assert (repo / "models/fp/best.pt").is_file()
    assert read_metrics(repo / "results/train_fp/metrics.json")["epochs"] == 1
    assert yaml.safe_load((repo / "data/prepared/dataset.yaml").read_text())["nc"] == 6
    assert no_network == []  # nothing even tried to connect


def test_fp_epochs_zero_only_evaluates_the_given_checkpoint(tmp_path, monkeypatch, no_network):
    """fp.epochs: 0 + fp.init_checkpoint: the checkpoint is the FP reference, measured as is."""
    import shutil

    from yoloqat.config import load_config
    from yoloqat.data import prepare_dataset
    from yoloqat.offline import configure_offline
    from yoloqat.pipeline.train_fp import train_fp

    repo = copy_repo(tmp_path / "repo", tiny_params())
    monkeypatch.chdir(repo)
    configure_offline()
    cfg = load_config(repo / "params.yaml")
    prepare_dataset(cfg.data, cfg.seed, repo / "data/prepared", cfg.root, difficulty=cfg.data.difficulty)
    train_fp(cfg)
    shutil.copy2(repo / "models/fp/best.pt", repo / "user_yolov10n.pt")
    cfg = load_config(repo / "params.yaml", overrides={"fp.epochs": 0, "fp.init_checkpoint": "user_yolov10n.pt"})

    # Spy on Ultralytics' val: record what it was asked and what it measured, and hand back
    # marker figures, so the summary must carry the evaluation's numbers (a tiny run's mAP is
    # often exactly 0, which a constant would match).
    from ultralytics.engine.model import Model

    real_val, calls = Model.val, []

    def spy(self, **kwargs):
        metrics = real_val(self, **kwargs)
        calls.append({"ckpt": self.ckpt_path, "kwargs": kwargs,
                      "map": float(metrics.box.map), "map50": float(metrics.box.map50)})
        return SimpleNamespace(box=SimpleNamespace(map=0.3125, map50=0.5625))

    monkeypatch.setattr(Model, "val", spy)
    summary = train_fp(cfg)
    assert summary["status"] == "evaluated" and summary["epochs"] == 0
    assert (summary["best"], summary["final"], summary["best_mAP50"]) == (0.3125, 0.3125, 0.5625)
    assert len(calls) == 1
    call = calls[0]
    assert Path(call["ckpt"]).resolve() == (repo / "user_yolov10n.pt").resolve()
    data = (repo / "data/prepared/dataset.yaml").resolve()
    assert Path(call["kwargs"]["data"]) == data and call["kwargs"].get("split", "val") == "val"
    assert call["kwargs"]["imgsz"] == cfg.data.imgsz and call["kwargs"]["nms"] is False
    # what it measured is the checkpoint's mAP on the val split, evaluated independently
    from ultralytics import YOLO

    from yoloqat.train.validation import validate_model

    again = validate_model(YOLO(repo / "user_yolov10n.pt").model, str(data), cfg.data.imgsz,
                           call["kwargs"]["batch"], cfg.device, split="val", rect=True)
    assert again["mAP50-95"] == pytest.approx(call["map"], abs=1e-9)
    assert again["mAP50"] == pytest.approx(call["map50"], abs=1e-9)
    assert (repo / "models/fp/best.pt").read_bytes() == (repo / "user_yolov10n.pt").read_bytes()
    assert no_network == []


def test_the_trainer_args_dump_is_dropped_but_other_lines_stay():
    import logging

    from yoloqat.offline import configure_offline

    configure_offline()
    from ultralytics.utils import LOGGER

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    LOGGER.addHandler(handler)
    try:
        LOGGER.info("engine/trainer: agnostic_nms=False, epochs=10, lr0=0.0005, nbs=8")
        LOGGER.info("      Epoch    GPU_mem   box_loss")
    finally:
        LOGGER.removeHandler(handler)
    assert seen == ["      Epoch    GPU_mem   box_loss"]


def test_an_unreadable_image_does_not_print_ultralytics_pi_heif_requirement(tmp_path):
    """Ultralytics' patched PIL.Image.open asks for pi-heif whenever Pillow cannot identify a
    file (it cannot install it here); the project's own skip warning says it once instead."""
    import logging

    from yoloqat.data.manifest import probe_image
    from yoloqat.offline import _HeifRequirementLine, configure_offline

    configure_offline()
    from ultralytics.utils import LOGGER

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    handler = Keep()
    LOGGER.addHandler(handler)
    (ours,) = [f for f in LOGGER.filters if isinstance(f, _HeifRequirementLine)]
    try:
        assert probe_image(bad) is None and probe_image(bad) is None
        assert seen == []
        # without the filter, Ultralytics says it once per bad file
        LOGGER.removeFilter(ours)
        assert probe_image(bad) is None
    finally:
        LOGGER.addFilter(ours)
        LOGGER.removeHandler(handler)
    assert len(seen) == 1 and "requirement ['pi-heif'] not found" in seen[0]
