"""Which images BN re-estimation should see: one checkpoint, re-estimated on three image sets.

The repair curves re-estimate BN on the training split letterboxed to ``imgsz`` x ``imgsz``
(:func:`~yoloqat.train.validation.calibration_batches`), but the validator scores rect batches
padded by half a stride (a 96-px image at 128 x 128, a gray border over ~44 % of it), and
training saw its own augmentation (random scale and translation fill with the same gray).  So
re-estimated statistics can fit the re-estimation images and still miss the validated ones.
This measures it on a saved checkpoint: the same number of batches of the training split, as

* ``letterbox``: the repair curves' loader (what ``val_<model>_bnre/`` uses);
* ``val geometry``: rect batches built as the validator builds them, over the training split;
* ``augmented``: the training dataset with its augmentation (``mosaic`` as given), seeded;

each on a copy of the model, scored with the validator the curves use.  Nothing is written but
the table.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

IMAGE_SETS = ("letterbox", "val geometry", "augmented")


@dataclass(frozen=True)
class BnreImagesRow:
    checkpoint: str
    saved: float  # mAP50-95 of the checkpoint as saved
    reestimated: dict[str, float]  # image set -> mAP50-95 after BN re-estimation on it
    shapes: dict[str, tuple[int, int]]  # image set -> (height, width) of its first batch


def _augmented_dataset(data_yaml: str, imgsz: int, batch: int, mosaic: float) -> Any:
    """The training split through Ultralytics' training augmentation (its defaults, ``mosaic``
    as given: the only augmentation setting this project changes)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG

    data = check_det_dataset(data_yaml)
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "batch": batch, "mosaic": mosaic})
    return build_yolo_dataset(cfg, data["train"], batch, data, mode="train", rect=False, stride=32)


def image_batches(image_set: str, data_yaml: str, imgsz: int, batch: int, mosaic: float = 0.0,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """Float image batches in [0, 1] of the training split, as ``image_set`` prepares them."""
    from ultralytics.data import build_dataloader

    from yoloqat.train.rng import seed_everything
    from yoloqat.train.validation import calibration_batches

    if image_set == "letterbox":
        loader = calibration_batches(data_yaml, imgsz, batch, split="train")
    elif image_set == "val geometry":
        loader = calibration_batches(data_yaml, imgsz, batch, split="train", rect=True)
    elif image_set == "augmented":
        seed_everything(seed)
        loader = build_dataloader(_augmented_dataset(data_yaml, imgsz, batch, mosaic), batch,
                                  workers=0, shuffle=False, pin_memory=False)
    else:
        raise ValueError(f"unknown image set {image_set!r}; expected one of {', '.join(IMAGE_SETS)}")
    for b in loader:
        yield b["img"].float() / 255


def probe_checkpoint(path: Path, data_yaml: str, imgsz: int, batch: int, batches: int,
                     mosaic: float = 0.0) -> BnreImagesRow:
    from yoloqat.quant.bn_reestimate import reestimate_bn
    from yoloqat.quant.checkpoint import load_qat_checkpoint
    from yoloqat.quant.convert import constant_quant_weights
    from yoloqat.train.validation import training_val_batch, validate_model

    model, _ = load_qat_checkpoint(path)
    val_batch = training_val_batch(batch, "cpu")

    def score(m: torch.nn.Module) -> float:
        return validate_model(m, data_yaml, imgsz, val_batch, "cpu")["mAP50-95"]

    saved = score(copy.deepcopy(model))
    scores: dict[str, float] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for image_set in IMAGE_SETS:
        images = list(islice(image_batches(image_set, data_yaml, imgsz, batch, mosaic), batches))
        shapes[image_set] = (int(images[0].shape[-2]), int(images[0].shape[-1]))
        m = copy.deepcopy(model)
        with constant_quant_weights(m):
            reestimate_bn(m, images, batches)
            scores[image_set] = score(m)
    return BnreImagesRow(str(path), saved, scores, shapes)


def bnre_images_table(rows: Sequence[BnreImagesRow]) -> str:
    """Markdown: one row per checkpoint, then the mean change of each image set vs as saved."""
    head = "| checkpoint | as saved | " + " | ".join(f"BNre on {s}" for s in IMAGE_SETS) + " |"
    lines = [head, "|" + "---|" * (2 + len(IMAGE_SETS))]
    for r in rows:
        lines.append(f"| {r.checkpoint} | {r.saved:.4f} | "
                     + " | ".join(f"{r.reestimated[s]:.4f}" for s in IMAGE_SETS) + " |")
    if rows:
        n = len(rows)
        mean = [sum(r.reestimated[s] - r.saved for r in rows) / n for s in IMAGE_SETS]
        lines.append(f"| mean change ({n}) | - | " + " | ".join(f"{d:+.4f}" for d in mean) + " |")
        first = rows[0].shapes
        lines.append("")
        lines.append("Image size of each set (height x width): "
                     + ", ".join(f"{s} {first[s][0]} x {first[s][1]}" for s in IMAGE_SETS) + ".")
    return "\n".join(lines) + "\n"
