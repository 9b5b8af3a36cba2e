"""Standalone validation scores a checkpoint as the trainer's per-epoch validation does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from yoloqat.train.validation import training_val_batch, validate_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("batch", "device", "expected"), [
    (8, "cpu", 16), (8, "0", 16), (8, "0,1", 8), (1, "cpu", 2), (3, "0,1,2,3", 2),
])
def test_the_trainers_validation_batch(batch, device, expected):
    """Ultralytics' trainer validates with twice the per-device training batch."""
    assert training_val_batch(batch, device) == expected


def test_validate_model_uses_rect_batches_like_the_trainer(monkeypatch):
    """rect=True: a 96-px image is scored at 128 x 128 (half a stride of padding), as the QAT
    curves are; rect=False letterboxes to 96 x 96 and scores the same weights differently."""
    from ultralytics.models.yolo import detect

    seen = []

    class FakeValidator:
        def __init__(self, args):
            seen.append(args)

        def __call__(self, model):
            return {"metrics/mAP50-95(B)": 0.25, "metrics/mAP50(B)": 0.5}

    monkeypatch.setattr(detect, "DetectionValidator", FakeValidator)
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    out = validate_model(model, "data.yaml", 96, 16, "cpu")
    assert out == {"mAP50-95": 0.25, "mAP50": 0.5}
    assert seen[0].rect is True and seen[0].batch == 16 and seen[0].nms is False
    validate_model(model, "data.yaml", 96, 8, "cpu", rect=False)
    assert seen[1].rect is False
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_the_qc_stage_validates_with_the_trainers_batch():
    """qc's before/after use training_val_batch(qat.batch): the rect shapes of the QAT curves."""
    tree = ast.parse((REPO / "src/yoloqat/pipeline/qc.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "training_val_batch"]
    assert [ast.unparse(c) for c in calls] == ["training_val_batch(cfg.qat.batch, cfg.device)"]
