"""Ultralytics trainer subclasses for the FP baseline and W4A16 QAT.

This module must stay importable on its own: Ultralytics' DDP launcher pickles the trainer
*class* by reference and re-creates it in each worker, where ``get_model`` builds (and for
QAT quantizes) the model.  Nothing Brevitas is ever pickled across processes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model

from yoloqat.config import CorrectionConfig, QATConfig
from yoloqat.config_checks import Bool, Text, build, param
from yoloqat.curves.keys import BNRE_PREFIX, MAP, MAP50, OSC, series, val_group
from yoloqat.numbers import finite_or_none
from yoloqat.quant.convert import QuantRecipe, quantize_model, set_fake_quant_mode
from yoloqat.train.offline_setup import disk_cache_dir, offline_amp_check, redirect_disk_cache
from yoloqat.train.optimizer_speed import listed_parameters, with_foreach_update
from yoloqat.train.qat_setup import (
    install_dampening,
    install_ema,
    install_tracker,
    move_to_group,
    snapshot_scales,
)
from yoloqat.train.repairs import RepairPlan, ReplayLoader, ScratchCopies, score_repairs
from yoloqat.train.rng import preserved_rng

SETTINGS_ENV = "YOLOQAT_QAT_SETTINGS"


@dataclass(frozen=True)
class QATSettings:
    """What the QAT trainer needs beyond Ultralytics' own args: the ``qat`` section whole, the
    ``correction`` section (QC of the repair curves), whether EMA is on, where to save.

    Ultralytics rejects unknown keys in its args, and DDP workers rebuild the trainer from those
    args alone, so these travel as JSON through an environment variable that child processes
    inherit, and come back through the config's own builder (and its checks).
    """

    qat: QATConfig = field(default_factory=QATConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    ema: bool = param(True, Bool())
    out_dir: str = param(".", Text())

    def to_env(self) -> None:
        os.environ[SETTINGS_ENV] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> QATSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"{SETTINGS_ENV} is not set; construct QATTrainer with settings=")
        return build(cls, json.loads(raw))


def loss_is_finite(trainer: Any) -> bool:
    return trainer.loss is None or bool(torch.isfinite(trainer.loss).all())


class FPTrainer(DetectionTrainer):
    """The float baseline: Ultralytics' detection trainer plus divergence bookkeeping."""

    diverged: bool = False
    in_final_eval: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback("on_train_batch_end", _stop_on_nonfinite_loss)

    def _setup_train(self) -> None:
        amp = self.args.amp not in (False, "fp32")
        if amp and self.device.type == "cpu":
            print("amp: requested, but the device is CPU: Ultralytics does not autocast there; training in fp32")
        with offline_amp_check():
            super()._setup_train()

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Ultralytics' optimizer with the multi-tensor (``foreach``) update on every device.

        PyTorch picks it by default on accelerators only; on CPU the per-tensor loop cost ~8 %
        of an FP epoch here.  The update is the same arithmetic, element for element, so the weights are
        bit-identical (tests/test_trainer.py checks it for the optimizers Ultralytics builds).
        """
        return with_foreach_update(super().build_optimizer(model, *args, **kwargs))

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        """Ultralytics' dataset; with ``cache: disk`` its .npy files go to :func:`disk_cache_dir`."""
        if self.args.cache != "disk":
            return super().build_dataset(img_path, mode, batch)
        self.args.cache = False  # build without caching, then cache to the project's folder
        try:
            dataset = super().build_dataset(img_path, mode, batch)
        finally:
            self.args.cache = "disk"
        redirect_disk_cache(dataset, disk_cache_dir())
        return dataset

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


def _map_pair(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        MAP: finite_or_none(metrics.get(f"metrics/{MAP}(B)")),
        MAP50: finite_or_none(metrics.get(f"metrics/{MAP50}(B)")),
    }


class QATTrainer(FPTrainer):
    """W4A16 QAT: quantize in ``get_model``, explicit EMA, oscillation tracking, Brevitas-safe saves.

    Every validation scores the model the run deploys (Ultralytics validates ``ema.ema``: the
    EMA weights when EMA is on, a live-weight mirror when off) and, when EMA is on, also the
    live weights, on the same val split: ``paired_metrics`` holds ``val_live`` and ``val_ema``.
    Validation never changes the weights or BN statistics, so one run yields both curves of
    the same training trajectory.

    Remedies (Nagel et al. 2022), each off unless its setting is: ``dampening`` wraps the
    criterion (:class:`DampenedCriterion`); ``freeze_threshold`` freezes oscillating weights
    around every optimizer step; ``bn_reestimate`` scores the deployed model once more after
    re-estimating its BN statistics (``val_bnre``) and saves checkpoints with those statistics,
    restoring the plain ones so training and the plain curve are unchanged.  Learned scales get
    their own no-decay parameter group (and, optionally, LSQ's gradient scale).
    """

    def __init__(self, *args: Any, settings: QATSettings | None = None, **kwargs: Any) -> None:
        if settings is not None:
            settings.to_env()
        self.qat_settings = settings or QATSettings.from_env()
        self.recipe = QuantRecipe.of(self.qat_settings.qat)
        self.tracker: Any = None
        self.saved_epochs: list[int] = []
        self.paired_metrics: dict[str, dict[str, float | None]] = {}
        self.dampening: Any = None
        self.freezer: Any = None
        self.bnre_state: dict[str, torch.Tensor] | None = None  # BN stats of the last val_bnre
        self._bnre_loader: Any = None
        self._augmented_bn: list[torch.Tensor] | None = None  # qat.bn_images=augmented, drawn once
        self._repair_loaders: dict[str, Any] = {}  # "train" (BN images, mechanism) and "calib", replayed
        self._repair_copies = ScratchCopies()  # the repair curves' copies, one per model and repair
        self._val_replay: Any = None  # the validator's batches, replayed for the repair scores
        self.repair_seconds = 0.0  # wall time spent on the repair curves, for their cost
        self._repairs_pending = False  # a validation ran whose repair curves are not scored yet
        self.initial_scales: dict[str, torch.Tensor] = {}  # learned scales at the start
        self.mechanism: Any = None  # train.mechanism.MechanismProbe, built at the first validation
        self.mechanism_row: dict[str, float] = {}  # this epoch's mechanism series
        self._listed: tuple[nn.Module, list[nn.Parameter]] | None = None  # for optimizer_step
        super().__init__(*args, **kwargs)
        for install in (install_ema, install_tracker, install_dampening, snapshot_scales):
            self.add_callback("on_pretrain_routine_end", install)
        # before any callback added later (the stage's epoch logger reads paired_metrics)
        self.add_callback("on_fit_epoch_end", QATTrainer._score_repairs)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        model = quantize_model(super().get_model(cfg=cfg, weights=weights, verbose=verbose), self.recipe)
        set_fake_quant_mode(model, self.qat_settings.qat.fake_quant)
        if self.recipe.scaling != "maxabs" and self.qat_settings.qat.lsq_grad_scale:
            from yoloqat.quant.scales import register_lsq_grad_scale

            register_lsq_grad_scale(model)
        if self.qat_settings.qat.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = self.qat_settings.qat.bn_momentum
        return model

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Ultralytics' optimizer, with learned scales moved to a no-decay group ("scale").

        Ultralytics groups parameters by name and type: a Brevitas scale is neither a bias nor a
        norm weight, so it would get weight decay, which pulls the scale (the grid) towards 0.
        ``scale_weight_decay`` > 0 gives them that decay instead (the reference run's stock
        Ultralytics grouping decayed them like conv weights).
        The freezer's reset is hooked right after ``optimizer.step()``: before Ultralytics'
        EMA update reads the weights.
        """
        from yoloqat.quant.scales import scale_parameters

        optimizer = super().build_optimizer(model, *args, **kwargs)
        scales = [p for *_, p in scale_parameters(unwrap_model(model))]
        move_to_group(optimizer, scales, "scale", weight_decay=self.qat_settings.qat.scale_weight_decay)
        optimizer.register_step_post_hook(self._after_optimizer_step)
        return optimizer

    def _after_optimizer_step(self, *_: Any) -> None:
        if self.freezer is not None:
            self.freezer.apply()

    def optimizer_step(self) -> None:
        if self.freezer is not None:
            self.freezer.mask_grads()
        if self._listed is None or self._listed[0] is not self.model:
            self._listed = (self.model, list(self.model.parameters()))
        with listed_parameters(*self._listed):
            super().optimizer_step()
        if self.tracker is not None and self.tracker.step() and self.freezer is not None:
            self.freezer.update()

    def validate(self) -> tuple[Any, Any]:
        metrics, fitness = super().validate()
        self.paired_metrics = {}
        self.mechanism_row = {}
        if metrics is None:
            return metrics, fitness
        if self.qat_settings.ema:
            self.paired_metrics[val_group("ema")] = _map_pair(metrics)
            self.paired_metrics[val_group("live")] = self._validate_live()
        else:
            self.paired_metrics[val_group("live")] = _map_pair(metrics)
        if self.qat_settings.qat.bn_reestimate > 0:
            self.paired_metrics[val_group(BNRE_PREFIX)] = self._validate_bnre()
        if self.qat_settings.qat.mechanism_batches > 0 and RANK in {-1, 0}:
            self.mechanism_row = self._measure_mechanism()
        self._repairs_pending = bool(self.qat_settings.qat.repair_curves)
        return metrics, fitness

    def _score_repairs(self) -> None:
        """The repair curves of a validated epoch, when ``qat.repair_every`` schedules them:
        every k-th epoch and the epoch training stops at.  Run at ``on_fit_epoch_end``, before
        the epoch logger, because only then is the stop known (the planned last epoch, early
        stopping or the time limit all set ``self.stop`` after validation)."""
        if not self._repairs_pending:
            return
        self._repairs_pending = False
        epoch = int(self.epoch) + 1
        if epoch % self.qat_settings.qat.repair_every and not self.stop:
            return
        t0 = time.perf_counter()
        measured = self.mechanism.seconds if self.mechanism is not None else 0.0
        self.paired_metrics.update(self._validate_repairs())
        # the BN-re-estimated copy's mechanism is measured inside; its time is the probe's
        measured = (self.mechanism.seconds if self.mechanism is not None else 0.0) - measured
        self.repair_seconds += time.perf_counter() - t0 - measured

    def _measure_models(self) -> dict[str, nn.Module]:
        models = {"live": unwrap_model(self.model)}
        if self.qat_settings.ema:
            models["ema"] = self.ema.ema
        return models

    def _measure_mechanism(self) -> dict[str, float]:
        """This epoch's mechanism series of the live and EMA models (train/mechanism.py), with
        the random state restored: training is unchanged."""
        from yoloqat.curves.keys import AUGMENTED, PLAIN
        from yoloqat.train.mechanism import MechanismProbe, augmented_batches, first_batches

        n = self.qat_settings.qat.mechanism_batches
        row: dict[str, float] = {}
        with preserved_rng():
            if self.mechanism is None:
                self.mechanism = MechanismProbe(
                    images={PLAIN: first_batches(self._repair_loader("train", int(self.batch_size)), n),
                            AUGMENTED: augmented_batches(self, n, seed=int(self.args.seed))},
                    initial_scales=self.initial_scales, device=self.device)
            for name, model in self._measure_models().items():
                row.update(self.mechanism.measure(self.epoch + 1, name, model))
        return row

    def _measure_bnre_copy(self, name: str, model: nn.Module) -> None:
        """The mechanism of the deployed model's BN-re-estimated repair copy (called by
        score_repairs, inside its preserved random state)."""
        deployed = "ema" if self.qat_settings.ema else "live"
        if self.mechanism is not None and name == deployed:
            self.mechanism_row.update(self.mechanism.measure(self.epoch + 1, name, model, bnre=True))

    def _validate_repairs(self) -> dict[str, dict[str, float | None]]:
        """The repair curves of this epoch (train/repairs.py), on copies of the live and EMA
        models, with the random state restored: training is unchanged."""
        s = self.qat_settings
        plan = RepairPlan(s.qat.repair_curves, s.qat.repair_bn_batches, s.correction)
        inspect = self._measure_bnre_copy if self.mechanism is not None else None
        validator = self.validator
        val_loader = validator.dataloader
        with preserved_rng():
            # the validator's own batches, read once and replayed for the six repair scores
            if self._val_replay is None:
                self._val_replay = ReplayLoader(val_loader)
            validator.dataloader = self._val_replay
            try:
                return score_repairs(self._measure_models(), plan, self._repair_bn_images,
                                     lambda: self._repair_loader("calib", s.correction.batch),
                                     self._score_copy, self.device, inspect_bnre=inspect,
                                     copies=self._repair_copies)
            finally:
                validator.dataloader = val_loader

    def _repair_loader(self, split: str, batch: int) -> Any:
        """The batches of an augmentation-free, fixed-order loader over ``split``, read once and
        replayed on every call, so every epoch's repairs and measurements see the same batches
        without decoding them again; of the training split only as many as they use."""
        loader = self._repair_loaders.get(split)
        if loader is None:
            from yoloqat.train.validation import calibration_batches

            q = self.qat_settings.qat
            used = max(q.repair_bn_batches if q.repair_curves else 0, q.mechanism_batches)
            loader = self._repair_loaders[split] = ReplayLoader(
                calibration_batches(str(self.args.data), int(self.args.imgsz), batch, split=split),
                limit=(used or None) if split == "train" else None)
        return loader

    def _repair_bn_images(self) -> Iterator[torch.Tensor]:
        if self.qat_settings.qat.bn_images == "augmented":
            yield from self._augmented_bn_images()
            return
        for batch in self._repair_loader("train", int(self.batch_size)):
            yield batch["img"].to(self.device).float() / 255

    def _score_copy(self, model: nn.Module) -> dict[str, float | None]:
        """Validate ``model`` (the live weights, or a repaired copy) with the trainer's validator,
        which scores ``ema.ema``: swapped in for the call, then restored."""
        deployed = self.ema.ema
        self.ema.ema = model
        try:
            scored = self.validator(self)
        finally:
            self.ema.ema = deployed
        return _map_pair(scored or {})

    def _validate_bnre(self) -> dict[str, float | None]:
        """Score the deployed model after BN re-estimation; keep those stats for the checkpoint.

        Re-estimation runs on ``ema.ema`` in place and its BN statistics are restored exactly
        afterwards, with the RNG state: the plain curve, the EMA and training are unchanged."""
        from yoloqat.quant.bn_reestimate import bn_state, load_bn_state, reestimate_bn

        model = self.ema.ema
        plain = bn_state(model)
        try:
            with preserved_rng():
                reestimate_bn(model, self._bnre_images(), self.qat_settings.qat.bn_reestimate)
                self.bnre_state = bn_state(model)
                scored = self.validator(self)
        finally:
            load_bn_state(model, plain)
        return _map_pair(scored or {})

    def _bnre_images(self) -> Iterator[torch.Tensor]:
        """Training images, augmentation-free and in a fixed order, continuing across calls.

        A loader of its own: drawing from the training loader would shift the batches training
        sees.  Ultralytics' loader keeps one iterator, so successive re-estimations walk on
        through the training split instead of reusing its first batches.  With
        ``qat.bn_images=augmented``: the augmented batches, the same at every call."""
        if self.qat_settings.qat.bn_images == "augmented":
            yield from self._augmented_bn_images()
            return
        if self._bnre_loader is None:
            from yoloqat.train.validation import calibration_batches

            self._bnre_loader = calibration_batches(
                str(self.args.data), int(self.args.imgsz), int(self.batch_size), split="train"
            )
        for batch in self._bnre_loader:
            yield batch["img"].to(self.device).float() / 255

    def _augmented_bn_images(self) -> Iterator[torch.Tensor]:
        """Batches drawn once through the training augmentation with the run's seed (the
        caller's random state is kept; the mechanism's augmented set is the first of them), as
        many as the larger of the two BN re-estimations asks for, kept as uint8."""
        if self._augmented_bn is None:
            from yoloqat.train.mechanism import augmented_batches

            q = self.qat_settings.qat
            batches = max(q.bn_reestimate, q.repair_bn_batches if q.repair_curves else 0)
            self._augmented_bn = augmented_batches(self, batches, seed=int(self.args.seed))
        for images in self._augmented_bn:
            yield images.to(self.device).float() / 255

    def _validate_live(self) -> dict[str, float | None]:
        """Score the live fake-quant weights with the same validator (it reads ``ema.ema``).

        Iterating a DataLoader draws from the global RNGs; restoring them afterwards keeps the
        training trajectory bit-identical to a run without this extra pass (EMA off)."""
        with preserved_rng():
            return self._score_copy(unwrap_model(self.model))

    def epoch_extras(self) -> dict[str, float | None]:
        """What the epoch logger adds for QAT: paired val curves and oscillation statistics."""
        row: dict[str, float | None] = {}
        for group, values in self.paired_metrics.items():
            row.update({series(group, k): v for k, v in values.items()})
        if self.tracker is not None:
            row.update(self.tracker.epoch_summary())
        if self.freezer is not None:
            row[series(OSC, "frac_frozen")] = self.freezer.frac_frozen()
            row[series(OSC, "freeze_threshold")] = self.freezer.last_threshold  # None: not freezing yet
        if self.dampening is not None:
            row.update(self.dampening.pop_stats())
        if self.initial_scales:
            from yoloqat.quant.scales import scale_ratio_stats

            row.update(scale_ratio_stats(unwrap_model(self.model), self.initial_scales))
        row.update(self.mechanism_row)
        return row

    def save_model(self) -> bool:
        """Save recipe + state_dict (Brevitas modules cannot be pickled) and a baked checkpoint."""
        from yoloqat.quant.checkpoint import copy_checkpoint, save_qat_checkpoint

        if self.diverged:
            return False
        out = Path(self.qat_settings.out_dir)
        ema_model = self.ema.ema
        is_best = self.best_fitness == self.fitness
        info = {"epoch": self.epoch + 1, "fitness": finite_or_none(self.fitness)}
        with self._bnre_statistics(ema_model):
            if self.bnre_state is not None:
                info["bn_reestimated"] = self.qat_settings.qat.bn_reestimate
            saved = save_qat_checkpoint(ema_model, self.recipe, out / "last", info=info, names=self.data["names"])
        if is_best:  # the same model and info: copy the files instead of baking the model again
            copy_checkpoint(saved, out / "best")
        self.saved_epochs.append(self.epoch + 1)
        return True

    @contextmanager
    def _bnre_statistics(self, model: nn.Module) -> Iterator[None]:
        """With BN re-estimation on, the saved (deployed) model carries the re-estimated stats."""
        if self.bnre_state is None:
            yield
            return
        from yoloqat.quant.bn_reestimate import bn_state, load_bn_state

        plain = bn_state(model)
        load_bn_state(model, self.bnre_state)
        try:
            yield
        finally:
            load_bn_state(model, plain)

    def final_eval(self) -> None:
        # Ultralytics' final_eval reloads best.pt and rewrites it in fp16; the QAT checkpoints
        # are Brevitas state_dicts, evaluated by the qc/evaluate stages instead.
        return None
