"""PyTorch-side validation of a (possibly fake-quant) model with Ultralytics' own validator."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yoloqat.curves.keys import MAP, MAP50


@contextmanager
def fusion_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Make Ultralytics' ``fuse()`` a no-op for this model instance.

    Standalone validation wraps the model in AutoBackend, which fuses Conv+BN and re-parameterizes
    RepVGGDW.  On a fake-quant model that would replace the quantized convs by float ones, so
    the validator would measure a different network.
    """
    had = "is_fused" in model.__dict__
    old = model.__dict__.get("is_fused")
    model.is_fused = lambda *a, **k: True  # type: ignore[method-assign]
    try:
        yield model
    finally:
        if had:
            model.is_fused = old  # type: ignore[method-assign]
        else:
            del model.is_fused


def training_val_batch(batch: int, device: str) -> int:
    """The batch Ultralytics' trainer validates with: twice the per-device training batch."""
    devices = [d for d in str(device).split(",") if d.strip()]
    per_device = batch // len(devices) if len(devices) > 1 else batch
    return max(per_device, 1) * 2


def validate_model(
    model: nn.Module, data_yaml: str, imgsz: int, batch: int, device: str, split: str = "val",
    rect: bool = True,
) -> dict[str, float]:
    """mAP50-95 and mAP50 of ``model`` on a split, as Ultralytics computes them.

    ``rect=True`` (with the trainer's batch, :func:`training_val_batch`) is how the trainer
    validates every epoch, and how ``yolo val`` does: images are batched by aspect ratio and
    padded by half a stride, so a 96-px image is scored at 128 x 128.  ``rect=False`` letterboxes
    to ``imgsz`` x ``imgsz``.  The same weights score differently under the two (docs/pipeline.md "Why
    one checkpoint has several numbers"), so a stage comparing its number with the training curve
    must use the trainer's setting.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils import DEFAULT_CFG

    with tempfile.TemporaryDirectory(prefix="yoloqat-val-") as project:
        args = get_cfg(DEFAULT_CFG, {
            "data": data_yaml, "imgsz": imgsz, "batch": batch, "device": device, "split": split,
            "plots": False, "verbose": False, "save_json": False, "nms": False, "rect": rect,
            "project": project, "name": "val",
        })
        validator = DetectionValidator(args=args)
        model = model.float().eval()
        with fusion_disabled(model), torch.no_grad():
            stats = validator(model=model)
    return {MAP: float(stats[f"metrics/{MAP}(B)"]), MAP50: float(stats[f"metrics/{MAP50}(B)"])}


def calibration_batches(data_yaml: str, imgsz: int, batch: int, split: str = "calib",
                        rect: bool = False) -> Any:
    """A deterministic, augmentation-free dataloader over a split, yielding detection batches:
    letterboxed to ``imgsz`` x ``imgsz``, or with ``rect`` batched as the validator batches
    (by aspect ratio, padded by half a stride)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG

    data = check_det_dataset(data_yaml)
    if split not in data:
        raise ValueError(f"dataset {data_yaml} has no {split!r} split")
    # check_det_dataset resolves only train/val/test against the yaml's folder, not "calib"
    images = Path(data[split])
    if not images.is_absolute():
        images = Path(data["path"]) / images
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "batch": batch})
    ds = build_yolo_dataset(cfg, str(images), batch, data, mode="val", rect=rect, stride=32)
    return build_dataloader(ds, batch, workers=0, shuffle=False, pin_memory=False)
