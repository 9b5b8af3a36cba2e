"""The float stages: train_fp (the FP reference and QAT's starting point) and fp_control.

fp_control continues the FP model for exactly the epochs, batch and optimizer settings QAT
uses, without quantization ("FP continued"), so the W4A16-vs-FP gap compares equal training
even when the FP baseline has not reached a plateau.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from yoloqat.config import Config
from yoloqat.curves.keys import DVCLIVE_PLOTS, PRIMARY, PRIMARY_MAP50
from yoloqat.errors import CheckpointError
from yoloqat.paths import (
    FP_CHECKPOINT,
    FP_CONTROL_DIR,
    FP_CONTROL_RESULTS,
    FP_DIR,
    FP_RESULTS,
)
from yoloqat.provenance import fresh_outputs, run_metadata, write_json
from yoloqat.quant.checkpoint import check_start_checkpoint, load_ultralytics_model
from yoloqat.train.live import EpochLogger, curve_summary
from yoloqat.train.overrides import (
    KEPT_RUN_DIR,
    MODEL_YAML,
    keep_run_files,
    qat_schedule,
    require_dataset,
    ultralytics_overrides,
)
from yoloqat.train.throughput import EpochTimer


def train_fp(cfg: Config) -> dict[str, Any]:
    init = str(cfg.resolve(cfg.fp.init_checkpoint)) if cfg.fp.init_checkpoint else None
    if init is not None:
        check_start_checkpoint(init, "fp.init_checkpoint", cfg.fp.init_checkpoint)
    require_dataset()
    fresh_outputs(FP_DIR, FP_RESULTS)
    t0 = time.time()
    logger = EpochLogger(FP_RESULTS)
    if cfg.fp.epochs == 0:
        summary = _evaluate_only(cfg, init, logger)
    else:
        f = cfg.fp
        summary = _train(cfg, logger, FP_DIR, FP_RESULTS, {
            "model": init or MODEL_YAML[cfg.model], "epochs": f.epochs, "batch": f.batch,
            "optimizer": f.optimizer, "lr0": f.lr0, "weight_decay": f.weight_decay,
            "warmup_epochs": f.warmup_epochs, "workers": f.workers, "patience": f.patience,
            "amp": f.amp, "seed": cfg.fp_seed,
        })
    summary["seconds"] = round(time.time() - t0, 1)
    logger.finish(summary)
    write_json(FP_DIR / "metadata.json", run_metadata(cfg, "train_fp", cfg.device,
                                                      {"fp_seed": cfg.fp_seed, "summary": summary}))
    print(
        f"train_fp: {cfg.model} status={summary['status']} best mAP50-95={summary.get('best')} "
        f"(epoch {summary.get('best_epoch')}) final={summary.get('final')} in {summary['seconds']} s"
    )
    return summary


def train_fp_control(cfg: Config) -> dict[str, Any]:
    """FP continued from models/fp/best.pt with QAT's schedule; off (nothing trained) when
    ``fp.control`` is false."""
    fresh_outputs(FP_CONTROL_DIR, FP_CONTROL_RESULTS)
    t0 = time.time()
    logger = EpochLogger(FP_CONTROL_RESULTS)
    if not cfg.fp.control:
        summary: dict[str, Any] = {"status": "off", "epochs": 0}
        # every declared output must exist, or DVC fails the stage: say why it holds no run
        for folder in (FP_CONTROL_RESULTS / KEPT_RUN_DIR, FP_CONTROL_RESULTS / DVCLIVE_PLOTS):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "OFF.txt").write_text("fp.control is false: no FP-continued run was trained\n")
    else:
        if not FP_CHECKPOINT.is_file():
            raise CheckpointError(f"{FP_CHECKPOINT} not found; run the train_fp stage first")
        load_ultralytics_model(FP_CHECKPOINT, "FP checkpoint")  # restricted load before the trainer's
        require_dataset()
        summary = _train(cfg, logger, FP_CONTROL_DIR, FP_CONTROL_RESULTS, {
            "model": str(FP_CHECKPOINT.resolve()), "patience": max(cfg.qat.epochs, 1),
            **qat_schedule(cfg),
        })
    summary["seconds"] = round(time.time() - t0, 1)
    logger.finish(summary)
    write_json(FP_CONTROL_DIR / "metadata.json",
               run_metadata(cfg, "fp_control", cfg.device, {"summary": summary}))
    print(f"fp_control: status={summary['status']} best mAP50-95={summary.get('best')} "
          f"final={summary.get('final')} in {summary['seconds']} s")
    return summary


def _train(
    cfg: Config, logger: EpochLogger, out_dir: Path, results_dir: Path, hyper: dict[str, Any]
) -> dict[str, Any]:
    """Train a float model with Ultralytics; copy its best/last checkpoints into ``out_dir`` and
    its results.csv / args.yaml into ``results_dir``."""
    from yoloqat.train.trainer import FPTrainer

    with tempfile.TemporaryDirectory(prefix="yoloqat-fp-") as runs:
        overrides = ultralytics_overrides(cfg, project=runs, name="fp", **hyper)
        trainer = FPTrainer(overrides=overrides)
        trainer.add_callback("on_fit_epoch_end", logger.on_fit_epoch_end)
        timer = EpochTimer()
        timer.attach(trainer)
        trainer.train()
        keep_run_files(trainer.save_dir, results_dir)
        best = trainer.best if trainer.best.exists() else trainer.last
        if not best.exists():
            raise CheckpointError("training stopped before one epoch; no checkpoint was produced")
        shutil.copy2(best, out_dir / "best.pt")
        if trainer.last.exists():
            shutil.copy2(trainer.last, out_dir / "last.pt")
        status = "diverged" if trainer.diverged else "completed"
    curve = logger.curve()
    summary = {"status": status, "epochs": len(curve), **curve_summary(curve)}
    summary["best_mAP50"] = max((r.get(PRIMARY_MAP50) or 0.0 for r in logger.history), default=None)
    summary.update(timer.summary())
    return summary


def _evaluate_only(cfg: Config, init: str | None, logger: EpochLogger) -> dict[str, Any]:
    """fp.epochs: 0 -- the given checkpoint is the FP reference; only measure it."""
    from ultralytics import YOLO

    if init is None:
        raise CheckpointError("fp.epochs=0 needs fp.init_checkpoint (a trained Ultralytics .pt)")
    model = YOLO(init)
    with tempfile.TemporaryDirectory(prefix="yoloqat-val-") as project:
        metrics = model.val(
            data=str(require_dataset().resolve()), imgsz=cfg.data.imgsz, batch=cfg.fp.batch,
            device=cfg.device, plots=False, verbose=False, project=project, name="val",
            nms=False,  # the end-to-end head, as in training validation and export
        )
    row = {"epoch": 1.0, PRIMARY: float(metrics.box.map), PRIMARY_MAP50: float(metrics.box.map50)}
    logger.history.append(row)
    logger.log_row(row)
    shutil.copy2(init, FP_CHECKPOINT)
    return {"status": "evaluated", "epochs": 0, **curve_summary([row[PRIMARY]]),
            "best_mAP50": row[PRIMARY_MAP50]}
