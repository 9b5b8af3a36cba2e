"""Ultralytics trainer subclasses for the FP baseline and W4A16 QAT.

This module must stay importable on its own: Ultralytics' DDP launcher pickles the trainer
*class* by reference and re-creates it in each worker, where ``get_model`` builds (and for
QAT quantizes) the model.  Nothing Brevitas is ever pickled across processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model

from yoloqat.curves.keys import BNRE_PREFIX, MAP, MAP50, OSC, series, val_group
from yoloqat.numbers import finite_or_none
from yoloqat.quant.convert import QuantRecipe, quantize_model, set_fake_quant_mode
from yoloqat.quant.ema import make_ema
from yoloqat.train.rng import preserved_rng

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
    # Nagel et al.'s remedies (all off by default) and LSQ's gradient scale; see config.QATConfig.
    dampening: float = 0.0
    dampening_ramp: bool = False
    dampening_form: str = "weight"
    freeze_threshold: float = 0.0
    freeze_threshold_end: float | None = None
    freeze_anneal_start: float = 0.25
    bn_reestimate: int = 0
    lsq_grad_scale: bool = False
    scale_weight_decay: float = 0.0  # weight decay of learned scales (0: a no-decay group)
    bn_momentum: float | None = None  # BatchNorm momentum of the QAT model; None: Ultralytics'
    fake_quant: str = "auto"  # convert.set_fake_quant_mode's mode for the QAT model
    # per-epoch repair curves (train/repairs.py): which, BN batches, and the qc stage's settings
    repair_curves: tuple[str, ...] = ()
    repair_bn_batches: int = 50
    repair_every: int = 1
    qc_lr: float = 1e-3
    qc_epochs: int = 1
    qc_batch: int = 8
    qc_min_steps: int = 48
    qc_head: bool = True
    # the collapse's mechanism measured every epoch (train/mechanism.py): batches per image set
    mechanism_batches: int = 0

    def to_env(self) -> None:
        os.environ[SETTINGS_ENV] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> QATSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"{SETTINGS_ENV} is not set; construct QATTrainer with settings=")
        values = json.loads(raw)
        values["repair_curves"] = tuple(values.get("repair_curves", ()))  # JSON has no tuples
        return cls(**values)


# GPUs Ultralytics' own check_amp refuses AMP on (ultralytics/utils/checks.py, 8.4): fp16 on
# them gives NaN losses or zero mAP.  Kept here because the check itself cannot run offline.
AMP_UNSAFE_GPU = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
    re.IGNORECASE,
)


def offline_check_amp(model: nn.Module) -> bool:
    """Stand-in for Ultralytics' ``check_amp`` that never loads or downloads anything.

    Ultralytics' check compares fp32 and fp16 detections of ``yolo26n.pt``, downloading it when
    missing; this project never downloads.  AMP is granted on CUDA unless the GPU is one that
    Ultralytics refuses by name; the fp32-vs-fp16 comparison is skipped, so a run with AMP
    watches its own losses (a non-finite loss stops it as ``diverged``).
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    gpu = torch.cuda.get_device_name(device)
    if AMP_UNSAFE_GPU.search(gpu):
        print(f"amp: off on {gpu} (Ultralytics lists it as unsafe for fp16 training)")
        return False
    print(f"amp: fp16 autocast + GradScaler on {gpu} (Ultralytics' yolo26n.pt check skipped: offline)")
    return True


@contextmanager
def offline_amp_check() -> Iterator[None]:
    """While Ultralytics sets up training, its trainer module's ``check_amp`` is
    :func:`offline_check_amp`.  Ultralytics imports the name into ``ultralytics.engine.trainer``
    and calls it from ``_setup_train``; replacing that one binding bypasses the download without
    copying Ultralytics' set-up code.  Restored afterwards, whatever happens."""
    import ultralytics.engine.trainer as engine

    original = engine.check_amp
    engine.check_amp = offline_check_amp
    try:
        yield
    finally:
        engine.check_amp = original


def disk_cache_dir() -> Path:
    """Where ``cache: disk`` keeps its ``.npy`` images: the project's state folder.  Ultralytics
    would write them next to the images, inside ``data/prepared`` (a DVC output), and later
    runs read any ``.npy`` there even with the cache off."""
    from yoloqat.offline import project_state_dir

    return project_state_dir() / "image_cache"


def redirect_disk_cache(dataset: Any, folder: Path) -> None:
    """Point an Ultralytics dataset's ``.npy`` cache at ``folder`` (one file per image path,
    named by its hash) and fill it.  Ultralytics' own staleness rule (the .npy older than the
    image is rewritten) still applies."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset.npy_files = [
        folder / (hashlib.sha1(str(Path(f).resolve()).encode()).hexdigest() + ".npy")
        for f in dataset.im_files
    ]
    dataset.cache = "disk"
    dataset.cache_images()


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


def _install_ema(trainer: Any) -> None:
    """Replace Ultralytics' always-on EMA with the one the experiment asks for."""
    s: QATSettings = trainer.qat_settings
    trainer.ema = make_ema(trainer.model, enabled=s.ema, decay=s.ema_decay, tau=s.ema_tau)


def _map_pair(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        MAP: finite_or_none(metrics.get(f"metrics/{MAP}(B)")),
        MAP50: finite_or_none(metrics.get(f"metrics/{MAP50}(B)")),
    }


class DampenedCriterion:
    """Ultralytics' detection criterion plus the oscillation dampening penalty.

    Ultralytics' loss is the per-image mean loss times the batch size, so the penalty is added
    as ``batch_size * lambda * L_damp``: lambda keeps its meaning relative to the per-image
    detection loss whatever the batch.  Only training calls (gradients enabled) add it; the
    validator's loss calls (inference mode) get the plain criterion.  Every other attribute
    (E2ELoss' ``update`` and friends) is the wrapped criterion's.
    """

    def __init__(self, base: Any, dampening: Any) -> None:
        self.base = base
        self.dampening = dampening

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        loss, items = self.base(preds, batch)
        if not torch.is_grad_enabled():
            return loss, items
        return loss.sum() + batch["img"].shape[0] * self.dampening(), items

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if base is None:  # during copy/unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(base, name)


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
        self.recipe = QuantRecipe.from_dict(self.qat_settings.recipe)
        self.tracker: Any = None
        self.saved_epochs: list[int] = []
        self.paired_metrics: dict[str, dict[str, float | None]] = {}
        self.dampening: Any = None
        self.freezer: Any = None
        self.bnre_state: dict[str, torch.Tensor] | None = None  # BN stats of the last val_bnre
        self._bnre_loader: Any = None
        self._repair_loaders: dict[str, Any] = {}  # "bn" (training split) and "calib"
        self.repair_seconds = 0.0  # wall time spent on the repair curves, for their cost
        self._repairs_pending = False  # a validation ran whose repair curves are not scored yet
        self.initial_scales: dict[str, torch.Tensor] = {}  # learned scales at the start
        self.mechanism: Any = None  # train.mechanism.MechanismProbe, built at the first validation
        self.mechanism_row: dict[str, float] = {}  # this epoch's mechanism series
        super().__init__(*args, **kwargs)
        self.add_callback("on_pretrain_routine_end", _install_ema)
        self.add_callback("on_pretrain_routine_end", _install_tracker)
        self.add_callback("on_pretrain_routine_end", _install_dampening)
        self.add_callback("on_pretrain_routine_end", _snapshot_scales)
        # before any callback added later (the stage's epoch logger reads paired_metrics)
        self.add_callback("on_fit_epoch_end", QATTrainer._score_repairs)

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        model = quantize_model(super().get_model(cfg=cfg, weights=weights, verbose=verbose), self.recipe)
        set_fake_quant_mode(model, self.qat_settings.fake_quant)
        if self.recipe.scaling != "maxabs" and self.qat_settings.lsq_grad_scale:
            from yoloqat.quant.scales import register_lsq_grad_scale

            register_lsq_grad_scale(model)
        if self.qat_settings.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = self.qat_settings.bn_momentum
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
        move_to_group(optimizer, scales, "scale", weight_decay=self.qat_settings.scale_weight_decay)
        optimizer.register_step_post_hook(self._after_optimizer_step)
        return optimizer

    def _after_optimizer_step(self, *_: Any) -> None:
        if self.freezer is not None:
            self.freezer.apply()

    def optimizer_step(self) -> None:
        if self.freezer is not None:
            self.freezer.mask_grads()
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
        if self.qat_settings.bn_reestimate > 0:
            self.paired_metrics[val_group(BNRE_PREFIX)] = self._validate_bnre()
        if self.qat_settings.mechanism_batches > 0 and RANK in {-1, 0}:
            self.mechanism_row = self._measure_mechanism()
        self._repairs_pending = bool(self.qat_settings.repair_curves)
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
        if epoch % self.qat_settings.repair_every and not self.stop:
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
        from yoloqat.train.mechanism import (
            AUGMENTED,
            PLAIN,
            MechanismProbe,
            augmented_batches,
            first_batches,
        )

        n = self.qat_settings.mechanism_batches
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
        from yoloqat.train.repairs import RepairPlan, score_repairs

        s = self.qat_settings
        plan = RepairPlan(repairs=tuple(s.repair_curves), bn_batches=s.repair_bn_batches,
                          qc_lr=s.qc_lr, qc_steps_min=s.qc_min_steps, qc_epochs=s.qc_epochs,
                          qc_head=s.qc_head)
        inspect = self._measure_bnre_copy if self.mechanism is not None else None
        with preserved_rng():
            return score_repairs(self._measure_models(), plan, self._repair_bn_images,
                                 lambda: self._repair_loader("calib", s.qc_batch),
                                 self._score_copy, self.device, inspect_bnre=inspect)

    def _repair_loader(self, split: str, batch: int) -> Any:
        """An augmentation-free, fixed-order loader over ``split``, rewound on every call so that
        every epoch's repairs see the same batches (Ultralytics' loaders otherwise continue)."""
        loader = self._repair_loaders.get(split)
        if loader is None:
            from yoloqat.train.validation import calibration_batches

            loader = self._repair_loaders[split] = calibration_batches(
                str(self.args.data), int(self.args.imgsz), batch, split=split)
        if hasattr(loader, "reset"):
            loader.reset()
        return loader

    def _repair_bn_images(self) -> Iterator[torch.Tensor]:
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
                reestimate_bn(model, self._bnre_images(), self.qat_settings.bn_reestimate)
                self.bnre_state = bn_state(model)
                scored = self.validator(self)
        finally:
            load_bn_state(model, plain)
        return _map_pair(scored or {})

    def _bnre_images(self) -> Iterator[torch.Tensor]:
        """Training images, augmentation-free and in a fixed order, continuing across calls.

        A loader of its own: drawing from the training loader would shift the batches training
        sees.  Ultralytics' loader keeps one iterator, so successive re-estimations walk on
        through the training split instead of reusing its first batches."""
        if self._bnre_loader is None:
            from yoloqat.train.validation import calibration_batches

            self._bnre_loader = calibration_batches(
                str(self.args.data), int(self.args.imgsz), int(self.batch_size), split="train"
            )
        for batch in self._bnre_loader:
            yield batch["img"].to(self.device).float() / 255

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
        from yoloqat.quant.checkpoint import save_qat_checkpoint

        if self.diverged:
            return False
        out = Path(self.qat_settings.out_dir)
        ema_model = self.ema.ema
        is_best = self.best_fitness == self.fitness
        info = {"epoch": self.epoch + 1, "fitness": finite_or_none(self.fitness)}
        with self._bnre_statistics(ema_model):
            if self.bnre_state is not None:
                info["bn_reestimated"] = self.qat_settings.bn_reestimate
            save_qat_checkpoint(ema_model, self.recipe, out / "last", info=info, names=self.data["names"])
            if is_best:
                save_qat_checkpoint(ema_model, self.recipe, out / "best", info=info, names=self.data["names"])
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


def move_to_group(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], label: str, weight_decay: float = 0.0
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
    optimizer.add_param_group({**settings, "params": list(params), "weight_decay": weight_decay, "param_group": label})


def _snapshot_scales(trainer: QATTrainer) -> None:
    from yoloqat.quant.scales import scale_snapshot

    trainer.initial_scales = scale_snapshot(unwrap_model(trainer.model))


def _install_tracker(trainer: QATTrainer) -> None:
    from yoloqat.quant.oscillation import OscillationTracker

    s = trainer.qat_settings
    # Freezing acts on the weights, so every DDP rank must take the same decisions: each keeps
    # its own tracker (the weights are identical on all ranks).  Without freezing only the rank
    # that logs needs one.
    if RANK in {-1, 0} or s.freeze_threshold > 0:
        trainer.tracker = OscillationTracker(
            unwrap_model(trainer.model), every=s.track_every, headline_bits=trainer.recipe.bits
        )
    if s.freeze_threshold > 0:
        from yoloqat.quant.freezing import WeightFreezer

        trainer.freezer = WeightFreezer(
            trainer.tracker, s.freeze_threshold, s.freeze_threshold_end, s.freeze_anneal_start,
            total_steps=optimizer_steps(trainer))


def optimizer_steps(trainer: QATTrainer) -> int:
    """The optimizer steps of the whole run: one per ``accumulate`` batches (Ultralytics' nominal
    batch; during warm-up it steps more often, so the annealing ends a little early then)."""
    per_epoch = math.ceil(len(trainer.train_loader) / max(int(trainer.accumulate), 1))
    return int(trainer.epochs) * per_epoch


def _install_dampening(trainer: QATTrainer) -> None:
    s = trainer.qat_settings
    if s.dampening <= 0:
        return
    from yoloqat.quant.dampening import Dampening

    model = unwrap_model(trainer.model)
    if getattr(model, "criterion", None) is None:
        model.criterion = model.init_criterion()
    total = int(trainer.epochs) * len(trainer.train_loader)
    trainer.dampening = Dampening(model, s.dampening, ramp=s.dampening_ramp, total_steps=total,
                                  form=s.dampening_form)
    model.criterion = DampenedCriterion(model.criterion, trainer.dampening)
