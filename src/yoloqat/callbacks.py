"""``add_qat_monitor``: the collapse's mechanism measured every epoch of any Ultralytics training.

For a training that is not this project's pipeline: an Ultralytics ``YOLO`` model or trainer,
its convs Brevitas-quantized (``QuantConv2d``) or plain::

    from ultralytics import YOLO
    from yoloqat.callbacks import add_qat_monitor

    model = YOLO("yolov10n.yaml")
    monitor = add_qat_monitor(model, batches=2)
    model.train(data="coco8.yaml", epochs=10)
    print(monitor.history[-1]["mech_ema/bn_logvar_mean"])

Every epoch, after the last optimizer step and before validation, the live and the EMA model
are measured on two fixed image sets of the training split (train/mechanism.py: letterboxed,
and through the run's augmentation), without changing the training (random state restored,
eval mode, hooks removed).  Each epoch's row goes to ``monitor.history``, to
``<save_dir>/qat_monitor.csv`` (one column per series), to ``<save_dir>/qat_monitor.json``
(per-layer detail, the worst layers' names) and, when Ultralytics' DVCLive callback is active,
to its Live (the same series names as the qat stage: ``mech_ema/bn_logvar_mean``, ...).
Plain convs give the BN measurements (and, with a YOLOv10 head, the output series) only.

``bn_reestimate=N`` also re-estimates the EMA model's BN statistics on N augmentation-free
training batches before each validation (Nagel et al.), so validation and the saved checkpoints
see them (measured as ``mech_ema_bnre``); the EMA's own statistics are put back after the epoch,
so the EMA keeps averaging what it would have without the monitor.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model

from yoloqat.curves.keys import AUGMENTED, PLAIN
from yoloqat.quant.bn_reestimate import bn_state, load_bn_state, reestimate_bn
from yoloqat.quant.scales import scale_snapshot
from yoloqat.train.mechanism import (
    MechanismProbe,
    augmented_batches,
    document_text,
    first_batches,
)
from yoloqat.train.rng import preserved_rng

CSV_NAME, JSON_NAME = "qat_monitor.csv", "qat_monitor.json"


@dataclass
class QATMonitor:
    """The callbacks :func:`add_qat_monitor` registers, and what they measured."""

    batches: int = 2  # batches of each image set
    bn_reestimate: int = 0  # BN re-estimation batches before each validation; 0 = off
    seed: int | None = None  # of the augmented draw; None: the run's seed
    history: list[dict[str, float]] = field(default_factory=list)
    probe: MechanismProbe | None = None
    _initial_scales: dict[str, Any] = field(default_factory=dict)
    _plain_loader: Any = None
    _ema_bn: dict[str, Any] | None = (
        None  # the EMA's own BN statistics while re-estimated ones stand
    )

    def __post_init__(self) -> None:
        for name, value, lo in (
            ("batches", self.batches, 1),
            ("bn_reestimate", self.bn_reestimate, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(
                    f"add_qat_monitor: {name}={value!r} is not allowed; expected an integer >= {lo}"
                )

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        self._initial_scales = scale_snapshot(unwrap_model(trainer.model))

    def on_train_epoch_end(self, trainer: Any) -> None:
        if RANK not in (-1, 0):
            return
        epoch = int(trainer.epoch) + 1
        row: dict[str, float] = {}
        with preserved_rng():
            probe = self._probe(trainer)
            row.update(probe.measure(epoch, "live", unwrap_model(trainer.model)))
            ema = trainer.ema.ema if getattr(trainer, "ema", None) is not None else None
            if ema is not None:
                row.update(probe.measure(epoch, "ema", ema))
                if self.bn_reestimate > 0:
                    self._ema_bn = bn_state(ema)
                    images = (
                        b["img"].to(trainer.device).float() / 255 for b in self._plain(trainer)
                    )
                    reestimate_bn(ema, islice(images, self.bn_reestimate), self.bn_reestimate)
                    row.update(probe.measure(epoch, "ema", ema, bnre=True))
        self.history.append({"epoch": float(epoch), **row})
        self._write(trainer, row)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        """After validation and the checkpoint save: the EMA's own BN statistics back."""
        if self._ema_bn is not None:
            load_bn_state(trainer.ema.ema, self._ema_bn)
            self._ema_bn = None

    def _plain(self, trainer: Any) -> Any:
        """The augmentation-free, fixed-order training loader, rewound."""
        if self._plain_loader is None:
            from yoloqat.train.validation import calibration_batches

            self._plain_loader = calibration_batches(
                str(trainer.args.data),
                int(trainer.args.imgsz),
                int(trainer.batch_size),
                split="train",
            )
        if hasattr(self._plain_loader, "reset"):
            self._plain_loader.reset()
        return self._plain_loader

    def _probe(self, trainer: Any) -> MechanismProbe:
        if self.probe is None:
            seed = int(trainer.args.seed) if self.seed is None else self.seed
            self.probe = MechanismProbe(
                images={
                    PLAIN: first_batches(self._plain(trainer), self.batches),
                    AUGMENTED: augmented_batches(trainer, self.batches, seed=seed),
                },
                initial_scales=self._initial_scales,
                device=trainer.device,
            )
        return self.probe

    def _write(self, trainer: Any, row: dict[str, float]) -> None:
        save_dir = Path(trainer.save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        columns = ["epoch", *sorted({k for r in self.history for k in r} - {"epoch"})]
        with (save_dir / CSV_NAME).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        assert self.probe is not None
        (save_dir / JSON_NAME).write_text(document_text(self.probe.document()))
        live = _ultralytics_dvclive()
        if live is not None:
            for key, value in row.items():
                live.log_metric(key, value)  # Ultralytics' own callback steps it at the epoch end


def _ultralytics_dvclive() -> Any:
    """The Live of Ultralytics' DVCLive callback when it is logging this training, else None."""
    try:
        from ultralytics.utils.callbacks import dvc
    except ImportError:
        return None
    return getattr(dvc, "live", None)


def add_qat_monitor(
    target: Any, batches: int = 2, bn_reestimate: int = 0, seed: int | None = None
) -> QATMonitor:
    """Register the mechanism monitor's callbacks on an Ultralytics ``YOLO`` model or trainer
    (anything with ``add_callback``); returns the monitor, whose ``history`` fills per epoch.

    ``batches``: batches of each of the two fixed image sets (a few forward passes per model and
    epoch); ``bn_reestimate``: BN re-estimation batches before each validation (0: off);
    ``seed``: the augmented draw's (None: the run's).  A bad value raises ValueError naming it."""
    monitor = QATMonitor(batches=batches, bn_reestimate=bn_reestimate, seed=seed)
    target.add_callback("on_pretrain_routine_end", monitor.on_pretrain_routine_end)
    target.add_callback("on_train_epoch_end", monitor.on_train_epoch_end)
    target.add_callback("on_fit_epoch_end", monitor.on_fit_epoch_end)
    return monitor
