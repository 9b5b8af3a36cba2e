"""The train_fp stage: the float YOLOv10 reference and QAT starting point."""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

from yoloqat.config import Config
from yoloqat.errors import CheckpointError
from yoloqat.paths import FP_CHECKPOINT, FP_DIR, FP_RESULTS
from yoloqat.provenance import fresh_outputs, run_metadata, write_json
from yoloqat.train.live import EpochLogger, curve_summary
from yoloqat.train.overrides import MODEL_YAML, require_dataset, ultralytics_overrides


def train_fp(cfg: Config) -> dict[str, Any]:
    require_dataset()
    fresh_outputs(FP_DIR, FP_RESULTS)
    t0 = time.time()
    logger = EpochLogger(FP_RESULTS)
    init = str(cfg.resolve(cfg.fp.init_checkpoint)) if cfg.fp.init_checkpoint else None
    if cfg.fp.epochs == 0:
        summary = _evaluate_only(cfg, init, logger)
    else:
        summary = _train(cfg, init, logger)
    summary["seconds"] = round(time.time() - t0, 1)
    logger.finish(summary)
    write_json(FP_DIR / "metadata.json", run_metadata(cfg, "train_fp", cfg.device, {"summary": summary}))
    print(
        f"train_fp: {cfg.model} status={summary['status']} best mAP50-95={summary.get('best')} "
        f"(epoch {summary.get('best_epoch')}) final={summary.get('final')} in {summary['seconds']} s"
    )
    return summary


def _train(cfg: Config, init: str | None, logger: EpochLogger) -> dict[str, Any]:
    from yoloqat.train.trainer import FPTrainer

    with tempfile.TemporaryDirectory(prefix="yoloqat-fp-") as runs:
        overrides = ultralytics_overrides(
            cfg, model=init or MODEL_YAML[cfg.model], epochs=cfg.fp.epochs, batch=cfg.fp.batch,
            optimizer=cfg.fp.optimizer, lr0=cfg.fp.lr0, weight_decay=cfg.fp.weight_decay,
            warmup_epochs=cfg.fp.warmup_epochs, workers=cfg.fp.workers, project=runs, name="fp",
            patience=cfg.fp.patience,
        )
        trainer = FPTrainer(overrides=overrides)
        trainer.add_callback("on_fit_epoch_end", logger.on_fit_epoch_end)
        trainer.train()
        best = trainer.best if trainer.best.exists() else trainer.last
        if not best.exists():
            raise CheckpointError("training stopped before one epoch; no checkpoint was produced")
        shutil.copy2(best, FP_CHECKPOINT)
        if trainer.last.exists():
            shutil.copy2(trainer.last, FP_DIR / "last.pt")
        status = "diverged" if trainer.diverged else "completed"
    curve = logger.curve()
    summary = {"status": status, "epochs": len(curve), **curve_summary(curve)}
    summary["best_mAP50"] = max((r.get("val/mAP50") or 0.0 for r in logger.history), default=None)
    return summary


def _evaluate_only(cfg: Config, init: str | None, logger: EpochLogger) -> dict[str, Any]:
    """fp.epochs: 0 -- the given checkpoint is the FP reference; only measure it."""
    from ultralytics import YOLO

    if init is None:
        raise CheckpointError("fp.epochs=0 needs fp.init_checkpoint (a trained Ultralytics .pt)")
    model = YOLO(init)
    metrics = model.val(
        data=str(require_dataset().resolve()), imgsz=cfg.data.imgsz, batch=cfg.fp.batch,
        device=cfg.device, plots=False, verbose=False, project=tempfile.mkdtemp(), name="val",
        nms=False,  # the end-to-end head, as in training validation and export
    )
    row = {"epoch": 1.0, "val/mAP50-95": float(metrics.box.map), "val/mAP50": float(metrics.box.map50)}
    logger.history.append(row)
    logger.log_row(row)
    shutil.copy2(init, FP_CHECKPOINT)
    return {"status": "evaluated", "epochs": 0, **curve_summary([row["val/mAP50-95"]]),
            "best_mAP50": row["val/mAP50"]}
