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

The copies are made once per model and repair and refreshed from their model every epoch
(:class:`ScratchCopies`): a deep copy of a Brevitas model walks its ~7,000 quantizer modules and
cost about 1 s, four times an epoch; copying the tensors into the same structure gives the same
model (tested) in a few milliseconds.
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


class ReplayLoader:
    """The batches of a deterministic loader (no augmentation, fixed order), read once and
    replayed: each iteration yields shallow copies of the same batch dicts (consumers replace
    their entries, e.g. the validator's ``img``), so later passes skip decoding the images again.
    ``limit``: keep only the first batches.  Other attributes (``dataset``, ``sampler``,
    ``batch_size``: what Ultralytics' validator reads) are the loader's."""

    def __init__(self, loader: Any, limit: int | None = None) -> None:
        self._loader = loader
        self._batches = list(islice(iter(loader), limit))

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (dict(b) for b in self._batches)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


@torch.no_grad()
def refresh_copy(copy_: nn.Module, source: nn.Module) -> nn.Module:
    """Make ``copy_`` (an earlier deep copy of ``source``, same structure) equal ``source`` as it
    is now: every parameter and buffer, each parameter's ``requires_grad`` and every module's
    train/eval flag, as a new deep copy would have them."""
    for kind in ("named_parameters", "named_buffers"):
        mine, theirs = getattr(copy_, kind)(), getattr(source, kind)()
        for (name, dst), (src_name, src) in zip(mine, theirs, strict=True):
            if name != src_name or dst.shape != src.shape:
                raise ValueError(f"copy has {name} {tuple(dst.shape)} where its source has "
                                 f"{src_name} {tuple(src.shape)}")
            dst.copy_(src)
            if isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)
    for mine_m, theirs_m in zip(copy_.modules(), source.modules(), strict=True):
        mine_m.training = theirs_m.training
    return copy_


class ScratchCopies:
    """One scratch copy per (model, use), deep-copied on first use and refreshed from its model
    on every later one (:func:`refresh_copy`).  A user that changes a copy's structure (QC wraps
    its convs) must restore it before the next use."""

    def __init__(self) -> None:
        self._copies: dict[tuple[str, str], nn.Module] = {}

    def of(self, name: str, use: str, source: nn.Module) -> nn.Module:
        made = self._copies.get((name, use))
        if made is None:
            made = self._copies[(name, use)] = copy.deepcopy(source)
            return made
        return refresh_copy(made, source)


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
    copies: ScratchCopies | None = None,
) -> dict[str, dict[str, float | None]]:
    """``{repair_group(name, repair): score(repaired copy)}`` for every model and repair.

    ``bn_images`` returns a fresh iterator over the BN re-estimation images (the same images on
    every call), ``calib`` the calibration loader, ``score`` the validation of a model.
    ``inspect_bnre(name, copy)`` is called on each BN-re-estimated copy before it is scored or
    corrected (the mechanism measurements; it must leave the copy as it is).  ``copies``: the
    scratch copies to reuse across calls (the trainer keeps one set per run); None makes fresh
    ones.  The models themselves are never changed."""
    from yoloqat.quant.bn_reestimate import reestimate_bn
    from yoloqat.quant.convert import constant_quant_weights
    from yoloqat.quant.correction import remove_correction

    copies = ScratchCopies() if copies is None else copies
    out: dict[str, dict[str, float | None]] = {}
    for name, model in models.items():
        # a copy's weights and scales never change: each is quantized once per copy, for the BN
        # passes, QC's steps and the validations alike (copies are refreshed before patching)
        if plan.needs_bnre:
            bnre = copies.of(name, "bnre", model)
            with constant_quant_weights(bnre):
                reestimate_bn(bnre, islice(bn_images(), plan.bn_batches), plan.bn_batches)
                if inspect_bnre is not None:
                    inspect_bnre(name, bnre)
                if "bnre" in plan.repairs:
                    out[repair_group(name, "bnre")] = score(bnre.eval())
                if "bnre_qc" in plan.repairs:
                    out[repair_group(name, "bnre_qc")] = score(qc_corrected(bnre, calib(), plan, device))
            remove_correction(bnre)
        if "qc" in plan.repairs:
            corrected = copies.of(name, "qc", model)
            with constant_quant_weights(corrected):
                out[repair_group(name, "qc")] = score(qc_corrected(corrected, calib(), plan, device))
            remove_correction(corrected)
    return out
