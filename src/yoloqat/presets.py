"""Named parameter sets: ``dvc exp run -S preset=<name>`` selects one.

A preset is a set of dotted params.yaml keys and values.  :func:`yoloqat.config.load_config`
applies it before validation, and only to keys that params.yaml leaves at their default: a key
set to anything else (``-S qat.epochs=50`` next to ``-S preset=reference``) wins over the
preset, so a preset is a starting point that a grid can still vary.  Every stage records the
resolved values, so what ran is never in doubt.

``reference`` is the recipe of the public YOLOv10m W4A16 run that peaked at 0.226 mAP50-95
(epoch 29) and collapsed to 0.012 (epoch 76), as closely as this project can express it: a
stock Ultralytics trainer from scratch with SGD, Brevitas' decoupled per-tensor int4 weight
quantizer on every conv (first and last included), learned scales in Ultralytics' weight-decay
group, AMP, mosaic, and Ultralytics' EMA constants.  It is sized for COCO on a GPU (docs/presets.md
gives the command and its cost).  ``reference_cpu`` is the same recipe cut to the
embedded data and one CPU run (yolo10n, 96 px, 30 epochs; docs/presets.md says what differs and why).

``collapse_cpu`` is the failure found on the embedded data (reports/README.md, "Looking for the
collapse"; reports/failure_search): the reference recipe from the trained FP model for 15 epochs, with the
learned scales' weight decay raised 100x (0.0005 -> 0.05) so that ~900 CPU steps shrink them
about as far as the reference's first ~10^5 steps would have.
"""

from __future__ import annotations

from typing import Any

# The reference run's optimizer, augmentation and quantizer; shared by both scales.
_REFERENCE_RECIPE: dict[str, Any] = {
    "qat.init": "scratch",
    "qat.optimizer": "SGD",
    "qat.lr0": 0.01,
    "qat.momentum": 0.937,
    "qat.weight_decay": 0.0005,
    "qat.warmup_epochs": 3.0,
    "qat.mosaic": 1.0,
    "qat.amp": True,
    "qat.bits": 4,
    "qat.granularity": "per_tensor",
    "qat.scaling": "decoupled",
    "qat.scale_weight_decay": 0.0005,  # stock Ultralytics decays the scales like conv weights
    # No FP-continued control: QAT starts from scratch, not from the FP checkpoint.
    "fp.control": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "reference": {
        **_REFERENCE_RECIPE,
        "model": "yolo10m",
        "data.imgsz": 640,
        "qat.epochs": 300,
        "qat.batch": 32,
        # stock Ultralytics' nominal batch: gradients of two batches of 32 per optimizer step,
        # so half the steps (and half the scale decay) per epoch of a one-step-per-batch run
        "qat.nbs": 64,
        "qat.lrf": 0.1,
        "qat.close_mosaic": 10,
        # Ultralytics' ModelEMA constants, which the reference run used
        "qat.ema_decay": 0.9999,
        "qat.ema_tau": 2000.0,
    },
    "reference_cpu": {
        **_REFERENCE_RECIPE,
        "qat.epochs": 30,
        # The reference's first 30 of 300 epochs: its linear schedule (lrf 0.1) had only decayed
        # lr to 0.91 x lr0 by then, which lrf 0.9 over a 30-epoch run reproduces; mosaic stayed on.
        "qat.lrf": 0.9,
        "qat.close_mosaic": 0,
    },
}

PRESETS["collapse_cpu"] = {
    **{k: v for k, v in _REFERENCE_RECIPE.items() if k != "qat.init"},  # from the FP model
    "qat.epochs": 15,
    "qat.lrf": 0.9,
    "qat.close_mosaic": 0,
    "qat.scale_weight_decay": 0.05,
    # every repair, on both models, every epoch: the answer is judged on the EMA + QC curve
    "qat.repair_curves": ["bnre", "qc", "bnre_qc"],
    # measure the mechanism (BN statistics mismatch, scale shrink, clipping) instead of
    # inferring it from which repair works: 2 batches of plain and of augmented images
    "qat.mechanism_batches": 2,
    # the FP model continued under QAT's own recipe (SGD, mosaic, warm-up, lr): a dip that the
    # unquantized model shows too is the recipe's, not quantization's
    "fp.control": True,
}
