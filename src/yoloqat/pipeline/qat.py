"""The qat stage: W4A16 quantization-aware training with EMA on or off, oscillations tracked."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from typing import Any

from yoloqat.config import Config, QATConfig
from yoloqat.curves.keys import (
    BNRE,
    DAMP,
    EMA,
    LIVE,
    PRIMARY_MAP50,
    SCALE,
    logged_repairs,
    series,
)
from yoloqat.errors import CheckpointError
from yoloqat.paths import (
    FP_CHECKPOINT,
    QAT_BEST_STEM,
    QAT_DIR,
    QAT_LAST_STEM,
    QAT_LAYER_CSV,
    QAT_MECHANISM,
    QAT_MECHANISM_CSV,
    QAT_RESULTS,
)
from yoloqat.provenance import fresh_outputs, run_metadata, write_json
from yoloqat.quant.checkpoint import (
    check_start_checkpoint,
    load_ultralytics_model,
    save_qat_checkpoint,
)
from yoloqat.quant.convert import QuantRecipe
from yoloqat.quant.ema import averaging_window, ema_decay_at
from yoloqat.train.live import EpochLogger, curve_summary
from yoloqat.train.overrides import (
    MODEL_YAML,
    keep_run_files,
    qat_schedule,
    require_dataset,
    ultralytics_overrides,
)


def init_model_arg(cfg: Config) -> str:
    """What the trainer starts from: the FP checkpoint, the bare yaml, or a user checkpoint."""
    if cfg.qat.init == "fp":
        best = FP_CHECKPOINT
        if not best.is_file():
            raise CheckpointError(f"qat.init=fp needs {best}; run the train_fp stage first")
        load_ultralytics_model(best, "FP checkpoint")  # restricted load before the trainer's
        return str(best.resolve())
    if cfg.qat.init == "scratch":
        return MODEL_YAML[cfg.model]
    path = cfg.resolve(cfg.qat.init).resolve()
    check_start_checkpoint(path, "qat.init", cfg.qat.init)
    return str(path)


def freeze_threshold_warning(q: QATConfig) -> str | None:
    """One line when freezing's lowest threshold is under twice the tracker's momentum.

    A warning, not an error: the earlier remedies runs froze at 0.01 = the momentum, and
    replicating them must stay possible."""
    if q.freeze_threshold <= 0:
        return None
    lowest = q.freeze_threshold if q.freeze_threshold_end is None else q.freeze_threshold_end
    if lowest >= 2 * q.osc_momentum:
        return None
    key = "qat.freeze_threshold" if q.freeze_threshold_end is None else "qat.freeze_threshold_end"
    return (f"{key}={lowest:g} is under 2x the oscillation tracker's momentum ({q.osc_momentum:g}): "
            f"a weight that oscillates twice within ~{1 / q.osc_momentum:.0f} steps freezes "
            f"(Nagel et al.'s code advises a threshold of at least 2-3x the momentum)")


def remedy_summary(cfg: Config, logger: EpochLogger, trainer: Any) -> dict[str, Any]:
    """The end-of-run figures of the remedies that are on (their settings are the run's params,
    in metadata.json)."""
    q = cfg.qat
    out: dict[str, Any] = {}
    last = logger.history[-1] if logger.history else {}
    for key in (series(SCALE, "ratio_geomean"), series(SCALE, "ratio_min")):  # learned scales only
        if last.get(key) is not None:
            out[f"{key.replace('/', '_')}_final"] = last[key]
    if q.dampening > 0:
        out["dampening_penalty_final"] = last.get(series(DAMP, "penalty"))
        out["dampening_lambda_final"] = last.get(series(DAMP, "lambda"))
    if trainer.freezer is not None:
        out["frac_frozen_final"] = trainer.freezer.frac_frozen()
    if q.bn_reestimate > 0:
        out.update(curve_summary(logger.curve(BNRE), prefix="bnre_"))
    return out


def repair_summary(cfg: Config, logger: EpochLogger) -> dict[str, Any]:
    """Best/final of every repair curve the run logged, e.g. ``ema_qc_best``."""
    out: dict[str, Any] = {}
    for model, repair, key in logged_repairs(cfg.ema, cfg.qat.repair_curves):
        out.update(curve_summary(logger.curve(key), prefix=f"{model}_{repair}_"))
    return out


def write_mechanism(probe: Any, batches: int) -> None:
    """results/qat/mechanism.json (every epoch's per-layer detail and worst layers) and
    mechanism.csv (long-format plot data); both exist, empty, when the measurement is off."""
    import csv

    from yoloqat.train.mechanism import CSV_COLUMNS, document_text

    doc = {"mechanism_batches": batches, **(probe.document() if probe is not None else {"epochs": []})}
    QAT_MECHANISM.parent.mkdir(parents=True, exist_ok=True)
    QAT_MECHANISM.write_text(document_text(doc))
    with QAT_MECHANISM_CSV.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(probe.csv_rows() if probe is not None else [])


def train_qat(cfg: Config) -> dict[str, Any]:
    from yoloqat.train.trainer import QATSettings, QATTrainer

    model_arg = init_model_arg(cfg)  # a bad checkpoint fails here, before any output exists
    note = freeze_threshold_warning(cfg.qat)
    if note is not None:
        print(f"qat: warning: {note}", file=sys.stderr)
    require_dataset()
    fresh_outputs(QAT_DIR, QAT_RESULTS)
    t0 = time.time()
    recipe = QuantRecipe.of(cfg.qat)
    settings = QATSettings(cfg.qat, cfg.correction, ema=cfg.ema, out_dir=str(QAT_DIR.resolve()))
    logger = EpochLogger(QAT_RESULTS, extra=lambda tr: tr.epoch_extras())
    with tempfile.TemporaryDirectory(prefix="yoloqat-qat-") as runs:
        overrides = ultralytics_overrides(
            cfg, model=model_arg, project=runs, name="qat", **qat_schedule(cfg)
        )
        trainer = QATTrainer(overrides=overrides, settings=settings)
        trainer.add_callback("on_fit_epoch_end", logger.on_fit_epoch_end)
        trainer.train()
        keep_run_files(trainer.save_dir, QAT_RESULTS)
    if not QAT_BEST_STEM.with_suffix(".qat.pt").is_file():
        # Diverged before the first save: keep the (non-finite) model so the DAG's outputs exist;
        # downstream stages read status=diverged and pass it on instead of evaluating it.
        names = trainer.data["names"]
        for stem in (QAT_LAST_STEM, QAT_BEST_STEM):
            save_qat_checkpoint(trainer.ema.ema, recipe, stem, {"epoch": 0}, names)
    tracker = trainer.tracker
    QAT_LAYER_CSV.parent.mkdir(parents=True, exist_ok=True)
    if tracker is not None:
        tracker.write_layer_csv(QAT_LAYER_CSV)
    write_mechanism(trainer.mechanism, cfg.qat.mechanism_batches)
    steps = int(trainer.ema.updates) if trainer.ema is not None else 0
    curve = logger.curve()
    curve50 = logger.curve(PRIMARY_MAP50)
    status = "diverged" if trainer.diverged or any(not math.isfinite(v) for v in curve) else "completed"
    summary: dict[str, Any] = {
        "status": status,
        "epochs": len(curve),
        **curve_summary(curve),
        **curve_summary(curve50, prefix="mAP50_"),
        **curve_summary(logger.curve(LIVE), prefix="live_"),
        **(curve_summary(logger.curve(EMA), prefix="ema_") if cfg.ema else {}),
        **repair_summary(cfg, logger),
        "steps": steps,
        "ema": cfg.ema,
        "ema_decay_final": ema_decay_at(steps, cfg.qat.ema_decay, cfg.qat.ema_tau) if cfg.ema else 0.0,
        "ema_window_steps": averaging_window(steps, cfg.qat.ema_decay, cfg.qat.ema_tau)
        if cfg.ema else 1.0,
        "bits": recipe.bits,
        "edge_bits": recipe.edge_bits,
        "init": cfg.qat.init,
        **remedy_summary(cfg, logger, trainer),
    }
    if tracker is not None:
        summary.update(tracker.summary())
    summary["seconds"] = round(time.time() - t0, 1)
    if cfg.qat.repair_curves:
        # their cost, measured in this run: the stage time over the time without them
        summary["repair_seconds"] = round(trainer.repair_seconds, 1)
        rest = summary["seconds"] - summary["repair_seconds"]
        summary["repair_time_ratio"] = round(summary["seconds"] / rest, 2) if rest > 0 else None
    if trainer.mechanism is not None:
        summary["mechanism_seconds"] = round(trainer.mechanism.seconds, 1)
    logger.finish(summary)
    write_json(
        QAT_DIR / "metadata.json",
        run_metadata(cfg, "qat", cfg.device, {"summary": summary, "recipe": recipe.to_dict()}),
    )
    print(
        f"qat: {cfg.model} W{recipe.bits}A16 ema={cfg.ema} status={status} "
        f"best mAP50-95={summary.get('best')} (epoch {summary.get('best_epoch')}) "
        f"final={summary.get('final')} in {summary['seconds']} s"
    )
    return summary
