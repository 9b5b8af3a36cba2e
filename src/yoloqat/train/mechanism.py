"""The collapse's mechanism every epoch (``qat.mechanism_batches``): quant/mechanism.py's
measurements of the live and EMA models on two fixed image sets of the training split.

* ``plain``: the first N batches of the augmentation-free, fixed-order loader that BN
  re-estimation uses (letterboxed training images), the same images every epoch;
* ``aug``: N batches drawn once, with the run's seed, through the run's own training
  augmentation (mosaic, HSV, flips... as Ultralytics' training dataset applies them), then kept:
  the statistics the BN running averages were accumulated on.

Both sets are built inside :func:`~yoloqat.train.rng.preserved_rng` and kept as uint8 tensors,
and every measurement runs in eval mode without gradients, with its hooks removed afterwards:
training is the same with and without it.  DVCLive series (values rounded to 4 significant
digits, so that an archive of a run stays small) are ``mech_<model>[_bnre][_aug]/<name>``:

* ``mech_<model>/`` (plain images): the 4 mismatch series, ``bn_var_min``,
  ``bn_var_below_fp16``, for quantized models ``scale_ratio_median``, ``scale_ratio_min``,
  ``clipped_mean``, ``clipped_max``, and for a YOLOv10 head the 5 output series
  (:data:`~yoloqat.curves.keys.OUTPUT_SERIES`), recorded from the same forward pass as the
  mismatch, so they cost no extra forward;
* ``mech_<model>_aug/``: the 4 mismatch series on the augmented images;
* ``mech_<model>_bnre[_aug]/``: the BN-re-estimated copy of the repair curves
  (``qat.repair_curves`` with bnre or bnre_qc), its 4 mismatch series (and the variance floor
  and the output series).

The worst layers' names and every layer's values go to the per-epoch JSON
(:meth:`MechanismProbe.document`), not to series.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn

from yoloqat.curves.keys import (
    PLAIN,
    mechanism_group,
)
from yoloqat.quant.convert import constant_quant_weights
from yoloqat.quant.mechanism import (
    bn_mismatch,
    bn_variance_floor,
    mismatch_summary,
    recording_outputs,
    weight_mechanism,
)
from yoloqat.train.rng import preserved_rng, seed_everything

SIGNIFICANT_DIGITS = 4
CSV_COLUMNS = ("epoch", "series", "bn_logvar_mean", "bn_mean_shift_mean")


def rounded(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def first_batches(loader: Any, batches: int) -> list[torch.Tensor]:
    """The images (uint8, on the CPU) of the first ``batches`` batches of a detection loader."""
    return [b["img"].cpu().clone() for b in islice(iter(loader), batches)]


def augmented_batches(trainer: Any, batches: int, seed: int) -> list[torch.Tensor]:
    """``batches`` batches of training images through the trainer's own training dataset
    (its augmentation), drawn with ``seed`` and without moving the caller's random state."""
    batch = int(trainer.batch_size)
    with preserved_rng():
        dataset = trainer.build_dataset(trainer.data["train"], mode="train", batch=batch)
        seed_everything(seed)
        order = torch.randperm(len(dataset)).tolist()
        out = []
        for b in range(batches):
            items = [dataset[order[(b * batch + i) % len(order)]] for i in range(batch)]
            out.append(dataset.collate_fn(items)["img"].cpu().clone())
    return out


def document_text(doc: dict[str, Any]) -> str:
    """:meth:`MechanismProbe.document` as JSON with one line per key and per epoch (an epoch of
    yolov10n is ~13 kB on one line; indented, the file would be ~2.5x larger)."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "epochs"]
    epochs = ",\n".join(f"  {json.dumps(e)}" for e in doc.get("epochs", []))
    epochs = f"[\n{epochs}\n ]" if epochs else "[]"
    return "{\n" + ",\n".join([*head, f' "epochs": {epochs}']) + "\n}\n"


@dataclass
class MechanismProbe:
    """Measures models on fixed image sets and keeps every epoch's detail for the JSON file."""

    images: dict[str, list[torch.Tensor]]  # PLAIN / AUGMENTED -> uint8 batches
    initial_scales: dict[str, torch.Tensor]
    device: torch.device
    seconds: float = 0.0  # wall time of every measurement so far (its cost)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    layers: dict[str, list[str]] = field(default_factory=dict)  # "bn" / "quant" -> names

    def measure(
        self, epoch: int, model_name: str, model: nn.Module, bnre: bool = False
    ) -> dict[str, float]:
        """The DVCLive row of ``model`` (``mech_<model_name>[_bnre][_aug]/...``); the detail is
        kept under ``epoch`` (1-based).  The model is left exactly as it was."""
        t0 = time.perf_counter()
        record = self._epoch_record(epoch)
        row: dict[str, float] = {}
        floor = bn_variance_floor(model)
        weights: dict[str, float] = {}
        quant_layers: list[Any] = []
        if not bnre:
            quant_layers, weights = weight_mechanism(model, self.initial_scales)
            self.layers.setdefault("quant", [q.name for q in quant_layers])
        for images in self.images:
            group = mechanism_group(model_name, images, bnre)
            # quantized once for all the batches: the weights do not change during the block
            outputs = recording_outputs(model) if images == PLAIN else nullcontext(None)
            with torch.no_grad(), constant_quant_weights(model), outputs as out:
                bn_layers = bn_mismatch(model, self._inputs(images, model))
            self.layers.setdefault("bn", [b.name for b in bn_layers])
            values, worst = mismatch_summary(bn_layers)
            if images == PLAIN:
                values.update(floor)
                values.update(weights)
                values.update(out.summary() if out is not None else {})
            row.update({f"{group}/{k}": rounded(v) for k, v in values.items()})
            detail: dict[str, Any] = {k: rounded(v) for k, v in values.items()}
            detail.update(worst)
            # per layer, in the order of the document's bn_layers / quant_layers
            layers: dict[str, list[float | None]] = {
                "bn_logvar": [rounded(b.logvar) for b in bn_layers],
                "bn_mean_shift": [rounded(b.mean_shift) for b in bn_layers],
            }
            if images == PLAIN and not bnre:
                layers["clipped"] = [rounded(q.clipped) for q in quant_layers]
                layers["scale_ratio_median"] = [
                    None if q.scale_ratio_median is None else rounded(q.scale_ratio_median)
                    for q in quant_layers
                ]
            detail["layers"] = layers
            record[group] = detail
        self.seconds += time.perf_counter() - t0
        return row

    def _inputs(self, images: str, model: nn.Module) -> Iterator[torch.Tensor]:
        dtype = next(model.parameters()).dtype
        for batch in self.images[images]:
            yield batch.to(self.device).to(dtype) / 255

    def _epoch_record(self, epoch: int) -> dict[str, Any]:
        if not self.epochs or self.epochs[-1]["epoch"] != epoch:
            self.epochs.append({"epoch": epoch, "sets": {}})
        return self.epochs[-1]["sets"]

    def csv_rows(self) -> list[dict[str, Any]]:
        """Long format for ``dvc plots`` (:data:`CSV_COLUMNS`): one row per epoch and measured
        set, the set's group name as its series."""
        return [
            {
                "epoch": record["epoch"],
                "series": group,
                **{k: values.get(k) for k in CSV_COLUMNS[2:]},
            }
            for record in self.epochs
            for group, values in record["sets"].items()
        ]

    def document(self) -> dict[str, Any]:
        """Everything measured, for ``results/qat/mechanism.json``."""
        return {
            "batches": {k: len(v) for k, v in self.images.items()},
            "images_per_set": {k: sum(int(b.shape[0]) for b in v) for k, v in self.images.items()},
            "seconds": round(self.seconds, 2),
            "bn_layers": self.layers.get("bn", []),
            "quant_layers": self.layers.get("quant", []),
            "epochs": self.epochs,
        }
