"""The embedded default dataset: seeded, cluttered images of geometric shapes.

Why synthetic: the experiment must run anywhere (CI, a laptop, a DVC queue) without a download,
and the comparison it makes (FP vs. QAT with/without EMA and correction) only needs a detection
task that is learnable in minutes yet hard enough that a collapse is visible.  A flat
"coloured squares on white" set saturates at mAP 1.0 and hides differences, so this generator
deliberately adds what makes real detection hard: many scales, rotation, aspect ratio, colour
that carries no class information, occlusion, truncation at the border, textured clutter and
line distractors.  ``difficulty`` scales all of those together.

Determinism: every image draws from its own ``np.random.default_rng([seed, split, index])``, so
an image does not depend on how many images came before it (changing ``train_images`` keeps the
first N images identical), and JPEG is written with fixed settings, so the same seed gives
byte-identical files on the same Pillow/libjpeg build.

One image is drawn by :mod:`.scene` from the shape families of :mod:`.shapes`; this module
writes the dataset.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataError
from .manifest import format_label, images_dir, labels_dir, write_dataset_yaml, write_labels
from .scene import Knobs, render_image
from .shapes import SHAPES

SPLIT_INDEX = {"train": 0, "val": 1, "calib": 2}

# Fixed encoder settings: with the same Pillow/libjpeg build the bytes depend only on the pixels.
JPEG_SETTINGS: dict[str, Any] = {
    "format": "JPEG",
    "quality": 92,
    "subsampling": 0,
    "optimize": False,
}


def synthetic_names(num_classes: int) -> list[str]:
    if not 1 <= num_classes <= len(SHAPES):
        raise DataError(
            f"data: synthetic source supports 1..{len(SHAPES)} classes,"
            f" got num_classes={num_classes}"
        )
    return list(SHAPES[:num_classes])


def generate_synthetic(
    out_dir: Path,
    *,
    seed: int,
    train_images: int,
    val_images: int,
    calib_images: int,
    imgsz: int,
    num_classes: int,
    difficulty: float = 1.0,
) -> dict[str, Any]:
    """Write a complete YOLO-layout synthetic dataset (images, labels, dataset.yaml).

    The calib split is generated with its own seed stream (split index 2), not copied from
    train, so calibration images are fresh samples of the same distribution.

    Returns stats: ``names``, and per split ``images``, ``instances``, ``negatives``,
    ``per_class`` (instances by class name) and ``hidden_dropped`` (shapes drawn but too hidden
    to label).
    """
    if imgsz < 32:
        raise DataError(f"data: synthetic imgsz must be >= 32, got {imgsz}")
    if difficulty < 0 or not math.isfinite(difficulty):
        raise DataError(f"data: synthetic difficulty must be finite and >= 0, got {difficulty}")
    names = synthetic_names(num_classes)
    knobs = Knobs.from_difficulty(difficulty)
    out_dir = Path(out_dir)
    counts = {"train": train_images, "val": val_images, "calib": calib_images}
    stats: dict[str, Any] = {"names": names, "splits": {}}
    for split, count in counts.items():
        img_dir, lbl_dir = images_dir(out_dir, split), labels_dir(out_dir, split)
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        per_class = dict.fromkeys(names, 0)
        instances = negatives = hidden_total = 0
        for index in range(count):
            rng = np.random.default_rng([seed, SPLIT_INDEX[split], index])
            pixels, labels, hidden = render_image(rng, imgsz, num_classes, knobs)
            stem = f"{split}_{index:05d}"
            Image.fromarray(pixels, "RGB").save(img_dir / f"{stem}.jpg", **JPEG_SETTINGS)
            write_labels(lbl_dir / f"{stem}.txt", [format_label(*lab) for lab in labels])
            instances += len(labels)
            negatives += not labels
            hidden_total += hidden
            for lab in labels:
                per_class[names[lab[0]]] += 1
        stats["splits"][split] = {
            "images": count,
            "instances": instances,
            "negatives": negatives,
            "per_class": per_class,
            "hidden_dropped": hidden_total,
        }
    write_dataset_yaml(out_dir, names)
    return stats
