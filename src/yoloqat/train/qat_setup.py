"""What the QAT trainer sets up around Ultralytics' training: the callbacks it runs when the
pretrain routine ends (the EMA the experiment asks for, the oscillation tracker and freezer, the
dampening loss, the learned scales' starting values) and the optimizer group of the scales.

Each reads the run's settings from ``trainer.qat_settings`` (train/trainer.py's QATSettings:
the ``qat`` section whole).  Module-level functions, so Ultralytics' DDP launcher can pickle
them by reference with the trainer's callbacks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model

from yoloqat.quant.ema import make_ema


def install_ema(trainer: Any) -> None:
    """Replace Ultralytics' always-on EMA with the one the experiment asks for."""
    s = trainer.qat_settings
    trainer.ema = make_ema(trainer.model, enabled=s.ema, decay=s.qat.ema_decay, tau=s.qat.ema_tau)


def move_to_group(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    label: str,
    weight_decay: float = 0.0,
) -> None:
    """Take ``params`` out of their groups and add them as one group with ``weight_decay``.

    The new group copies the settings (lr, betas / momentum) of the group they came from, with
    Ultralytics' ``param_group`` label, so warm-up and the lr schedule treat it like the rest."""
    if not params:
        return
    ids = {id(p) for p in params}
    source: dict[str, Any] | None = None
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in ids]
        if len(kept) != len(group["params"]):
            source = source or group
            group["params"] = kept
    if source is None:
        raise ValueError("none of the parameters is in the optimizer")
    settings = {k: v for k, v in source.items() if k != "params"}
    optimizer.add_param_group(
        {**settings, "params": list(params), "weight_decay": weight_decay, "param_group": label}
    )


def snapshot_scales(trainer: Any) -> None:
    from yoloqat.quant.scales import scale_snapshot

    trainer.initial_scales = scale_snapshot(unwrap_model(trainer.model))


def install_tracker(trainer: Any) -> None:
    from yoloqat.quant.oscillation import OscillationTracker

    s = trainer.qat_settings.qat
    # Freezing acts on the weights, so every DDP rank must take the same decisions: each keeps
    # its own tracker (the weights are identical on all ranks).  Without freezing only the rank
    # that logs needs one.
    if RANK in {-1, 0} or s.freeze_threshold > 0:
        trainer.tracker = OscillationTracker(
            unwrap_model(trainer.model),
            momentum=s.osc_momentum,
            every=s.track_every,
            headline_bits=trainer.recipe.bits,
        )
    if s.freeze_threshold > 0:
        from yoloqat.quant.freezing import WeightFreezer

        trainer.freezer = WeightFreezer(
            trainer.tracker,
            s.freeze_threshold,
            s.freeze_threshold_end,
            s.freeze_anneal_start,
            total_steps=optimizer_steps(trainer),
        )


def optimizer_steps(trainer: Any) -> int:
    """The optimizer steps of the whole run: one per ``accumulate`` batches (Ultralytics' nominal
    batch; during warm-up it steps more often, so the annealing ends a little early then)."""
    per_epoch = math.ceil(len(trainer.train_loader) / max(int(trainer.accumulate), 1))
    return int(trainer.epochs) * per_epoch


def install_dampening(trainer: Any) -> None:
    s = trainer.qat_settings.qat
    if s.dampening <= 0:
        return
    from yoloqat.quant.dampening import DampenedCriterion, Dampening

    model = unwrap_model(trainer.model)
    if getattr(model, "criterion", None) is None:
        model.criterion = model.init_criterion()
    total = int(trainer.epochs) * len(trainer.train_loader)
    trainer.dampening = Dampening(
        model, s.dampening, ramp=s.dampening_ramp, total_steps=total, form=s.dampening_form
    )
    model.criterion = DampenedCriterion(model.criterion, trainer.dampening)
