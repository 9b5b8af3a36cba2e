"""Ultralytics trainer subclasses for the FP baseline and W4A16 QAT.

This module must stay importable on its own: Ultralytics' DDP launcher pickles the trainer
*class* by reference and re-creates it in each worker, where ``get_model`` builds (and for
QAT quantizes) the model.  Nothing Brevitas is ever pickled across processes.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model

from yoloqat.numbers import finite_or_none
from yoloqat.quant.convert import QuantRecipe, quantize_model
from yoloqat.quant.ema import make_ema

SETTINGS_ENV = "YOLOQAT_QAT_SETTINGS"


@dataclass(frozen=True)
class QATSettings:
    """What the QAT trainer needs beyond Ultralytics' own args.

    Ultralytics rejects unknown keys in its args, and DDP workers rebuild the trainer from those
    args alone, so these travel through an environment variable that child processes inherit.
    """

    recipe: dict[str, Any]
    ema: bool
    ema_decay: float
    ema_tau: float
    track_every: int
    out_dir: str

    def to_env(self) -> None:
        os.environ[SETTINGS_ENV] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> QATSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"{SETTINGS_ENV} is not set; construct QATTrainer with settings=")
        return cls(**json.loads(raw))


def loss_is_finite(trainer: Any) -> bool:
    return trainer.loss is None or bool(torch.isfinite(trainer.loss).all())


class FPTrainer(DetectionTrainer):
    """The float baseline: Ultralytics' detection trainer plus divergence bookkeeping."""

    diverged: bool = False
    in_final_eval: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback("on_train_batch_end", _stop_on_nonfinite_loss)

    def final_eval(self) -> None:
        # Ultralytics re-validates best.pt and fires on_fit_epoch_end once more; the flag lets
        # the epoch logger keep that extra row out of the per-epoch curve.
        self.in_final_eval = True
        try:
            super().final_eval()
        finally:
            self.in_final_eval = False

    def _handle_nan_recovery(self, epoch: int) -> bool:
        # Ultralytics would reload last.pt and retry; here a diverged run is a result to record,
        # so training stops and the stage reports status=diverged.
        if not loss_is_finite(self) or (self.fitness is not None and not math.isfinite(self.fitness)):
            self.diverged = True
            self.stop = True
        return False


def _stop_on_nonfinite_loss(trainer: Any) -> None:
    if not loss_is_finite(trainer):
        trainer.diverged = True
        trainer.stop = True


def _install_ema(trainer: Any) -> None:
    """Replace Ultralytics' always-on EMA with the one the experiment asks for."""
    s: QATSettings = trainer.qat_settings
    trainer.ema = make_ema(trainer.model, enabled=s.ema, decay=s.ema_decay, tau=s.ema_tau)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving Python's, NumPy's or torch's (CPU and CUDA) random state."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _map_pair(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        "mAP50-95": finite_or_none(metrics.get("metrics/mAP50-95(B)")),
        "mAP50": finite_or_none(metrics.get("metrics/mAP50(B)")),
    }


class QATTrainer(FPTrainer):
    """W4A16 QAT: quantize in ``get_model``, explicit EMA, oscillation tracking, Brevitas-safe saves.

    Every validation scores the model the run deploys (Ultralytics validates ``ema.ema``: the
    EMA weights when EMA is on, a live-weight mirror when off) and, when EMA is on, also the
    live weights, on the same val split: ``paired_metrics`` holds ``val_live`` and ``val_ema``.
    Validation never changes the weights or BN statistics, so one run yields both curves of
    the same training trajectory.
    """

    def __init__(self, *args: Any, settings: QATSettings | None = None, **kwargs: Any) -> None:
        if settings is not None:
            settings.to_env()
        self.qat_settings = settings or QATSettings.from_env()
        self.recipe = QuantRecipe.from_dict(self.qat_settings.recipe)
        self.tracker: Any = None
        self.saved_epochs: list[int] = []
        self.paired_metrics: dict[str, dict[str, float | None]] = {}
        super().__init__(*args, **kwargs)
        self.add_callback("on_pretrain_routine_end", _install_ema)
        self.add_callback("on_pretrain_routine_end", _install_tracker)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        return quantize_model(model, self.recipe)

    def optimizer_step(self) -> None:
        super().optimizer_step()
        if self.tracker is not None:
            self.tracker.step()

    def validate(self) -> tuple[Any, Any]:
        metrics, fitness = super().validate()
        self.paired_metrics = {}
        if metrics is None:
            return metrics, fitness
        if self.qat_settings.ema:
            self.paired_metrics["val_ema"] = _map_pair(metrics)
            self.paired_metrics["val_live"] = self._validate_live()
        else:
            self.paired_metrics["val_live"] = _map_pair(metrics)
        return metrics, fitness

    def _validate_live(self) -> dict[str, float | None]:
        """Score the live fake-quant weights with the same validator (it reads ``ema.ema``).

        Iterating a DataLoader draws from the global RNGs; restoring them afterwards keeps the
        training trajectory bit-identical to a run without this extra pass (EMA off)."""
        deployed = self.ema.ema
        self.ema.ema = unwrap_model(self.model)
        try:
            with preserved_rng():
                live = self.validator(self)
        finally:
            self.ema.ema = deployed
        return _map_pair(live or {})

    def epoch_extras(self) -> dict[str, float | None]:
        """What the epoch logger adds for QAT: paired val curves and oscillation statistics."""
        row: dict[str, float | None] = {}
        for group, values in self.paired_metrics.items():
            row.update({f"{group}/{k}": v for k, v in values.items()})
        if self.tracker is not None:
            row.update(self.tracker.epoch_summary())
        return row

    def save_model(self) -> bool:
        """Save recipe + state_dict (Brevitas modules cannot be pickled) and a baked checkpoint."""
        from yoloqat.quant.checkpoint import save_qat_checkpoint

        if self.diverged:
            return False
        out = Path(self.qat_settings.out_dir)
        ema_model = self.ema.ema
        is_best = self.best_fitness == self.fitness
        info = {"epoch": self.epoch + 1, "fitness": finite_or_none(self.fitness)}
        save_qat_checkpoint(ema_model, self.recipe, out / "last", info=info, names=self.data["names"])
        if is_best:
            save_qat_checkpoint(ema_model, self.recipe, out / "best", info=info, names=self.data["names"])
        self.saved_epochs.append(self.epoch + 1)
        return True

    def final_eval(self) -> None:
        # Ultralytics' final_eval reloads best.pt and rewrites it in fp16; the QAT checkpoints
        # are Brevitas state_dicts, evaluated by the qc/evaluate stages instead.
        return None


def _install_tracker(trainer: QATTrainer) -> None:
    from yoloqat.quant.oscillation import OscillationTracker

    if RANK in {-1, 0}:
        trainer.tracker = OscillationTracker(
            unwrap_model(trainer.model), every=trainer.qat_settings.track_every
        )
