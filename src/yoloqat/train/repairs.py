"""Repair curves: every epoch, what BN re-estimation, QC, or both would make of the live and
the EMA model (``qat.repair_curves``), scored on the same val images as the plain curves.

Each repair acts on a deep copy of the model, with the random state saved and restored around
it, so training (weights, optimizer, BN statistics, data order) is exactly what it is without
them (tested).  QC is the qc stage's: the ``correction`` settings, on the calibration split,
Adam on per-channel gamma/beta only (:func:`yoloqat.quant.correction.train_correction`).  BN
re-estimation uses the first ``qat.repair_bn_batches`` batches of an augmentation-free,
fixed-order loader over the training split (or, with ``qat.bn_images=augmented``, batches drawn
once through the training augmentation), the same batches for both models and every epoch,
so the live and EMA repairs are paired.  ``bnre_qc`` corrects the BN-re-estimated copy, so BN
re-estimation runs once per model and epoch whichever of the two curves asked for it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn

from yoloqat.config import CorrectionConfig
from yoloqat.curves.keys import repair_group


@dataclass(frozen=True)
class RepairPlan:
    """Which repairs to score, the BN re-estimation's batches, and QC's settings (the qc stage's)."""

    repairs: tuple[str, ...]
    bn_batches: int
    qc: CorrectionConfig

    @property
    def needs_bnre(self) -> bool:
        return "bnre" in self.repairs or "bnre_qc" in self.repairs


def qc_corrected(model: nn.Module, calib: Any, plan: RepairPlan, device: torch.device) -> nn.Module:
    """QC applied in place to ``model`` (a copy the caller owns), as the qc stage applies it."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    from yoloqat.quant.correction import correction_steps, insert_correction, train_correction

    model.args = get_cfg(DEFAULT_CFG)  # the detection loss's gains, as in the qc stage
    model.criterion = None  # the plain detection loss (not a training-time dampened one)
    insert_correction(model, head=plan.qc.head)
    steps = correction_steps(plan.qc.epochs, plan.qc.min_steps, len(calib))
    with torch.enable_grad():
        train_correction(model, calib, plan.qc.lr, steps, device)
    return model.eval()


def score_repairs(
    models: dict[str, nn.Module],
    plan: RepairPlan,
    bn_images: Callable[[], Iterator[torch.Tensor]],
    calib: Callable[[], Any],
    score: Callable[[nn.Module], dict[str, float | None]],
    device: torch.device,
    inspect_bnre: Callable[[str, nn.Module], None] | None = None,
) -> dict[str, dict[str, float | None]]:
    """``{repair_group(name, repair): score(repaired copy)}`` for every model and repair.

    ``bn_images`` returns a fresh iterator over the BN re-estimation images (the same images on
    every call), ``calib`` the calibration loader, ``score`` the validation of a model.
    ``inspect_bnre(name, copy)`` is called on each BN-re-estimated copy before it is scored or
    corrected (the mechanism measurements; it must leave the copy as it is).  The models
    themselves are never changed."""
    from yoloqat.quant.bn_reestimate import reestimate_bn
    from yoloqat.quant.convert import constant_quant_weights

    out: dict[str, dict[str, float | None]] = {}
    for name, model in models.items():
        # a copy's weights and scales never change: each is quantized once per copy, for the BN
        # passes, QC's steps and the validations alike (copies are made before patching)
        if plan.needs_bnre:
            bnre = copy.deepcopy(model)
            with constant_quant_weights(bnre):
                reestimate_bn(bnre, islice(bn_images(), plan.bn_batches), plan.bn_batches)
                if inspect_bnre is not None:
                    inspect_bnre(name, bnre)
                if "bnre" in plan.repairs:
                    out[repair_group(name, "bnre")] = score(bnre.eval())
                if "bnre_qc" in plan.repairs:
                    out[repair_group(name, "bnre_qc")] = score(qc_corrected(bnre, calib(), plan, device))
        if "qc" in plan.repairs:
            corrected = copy.deepcopy(model)
            with constant_quant_weights(corrected):
                out[repair_group(name, "qc")] = score(qc_corrected(corrected, calib(), plan, device))
    return out
