"""The qc stage: Quantization Correction on the QAT model, folded for deployment."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from yoloqat.config import Config
from yoloqat.errors import CorrectionError
from yoloqat.paths import QAT_LAST, QAT_METRICS, QC_DIR, QC_METRICS, QC_RESULTS, QC_STEM
from yoloqat.pipeline.status import SKIPPED_DIVERGED, diverged_upstream
from yoloqat.provenance import fresh_outputs, run_metadata, write_json, write_metrics
from yoloqat.quant.checkpoint import load_qat_checkpoint, save_qat_checkpoint, weights_finite
from yoloqat.quant.convert import QuantRecipe, int_weight, quant_convs
from yoloqat.quant.correction import (
    corrected_convs,
    correction_stats,
    correction_steps,
    fold_qc_into_bn,
    insert_correction,
    train_correction,
)
from yoloqat.quant.precision import exact_float32
from yoloqat.train.overrides import require_dataset
from yoloqat.train.validation import calibration_batches, training_val_batch, validate_model

FOLD_TOLERANCE = 1e-4


def raw_head_outputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every raw detect-head map (before decoding and top-k), with BatchNorm in eval mode.

    The end-to-end output sorts detections by score, so a near-tie can swap two rows between
    two numerically equivalent models; the raw maps compare element by element.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    out = model(images)
    model.eval()
    tensors: list[torch.Tensor] = []

    def collect(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            tensors.append(o.detach())
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(out)
    return tensors


def relative_max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a - b| / max(1, max |a|) over matching tensors (float32 rounding grows with magnitude)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scale = max(1.0, float(x.abs().max()))
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


@torch.no_grad()
def check_fold(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Fold the corrections; return the relative max difference of the raw head outputs.

    Raises CorrectionError if it exceeds FOLD_TOLERANCE or if any integer weight moved.
    """
    before_ints = {id(q): int_weight(q).integers.clone() for _, q in quant_convs(model)}
    with exact_float32():  # TF32 convs on a GPU differ by ~1e-3 (module docstring)
        unfolded = raw_head_outputs(model, images)
        fold_qc_into_bn(model)
        folded = raw_head_outputs(model, images)
    diff = relative_max_diff(unfolded, folded)
    for n, q in quant_convs(model):
        if not torch.equal(int_weight(q).integers, before_ints[id(q)]):
            raise CorrectionError(f"folding changed the integer weights of {n}")
    if not diff <= FOLD_TOLERANCE:
        raise CorrectionError(
            f"folded model differs from the corrected one by {diff:.3g} (relative; > {FOLD_TOLERANCE})"
        )
    return diff


def run_qc(cfg: Config) -> dict[str, Any]:
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG
    from ultralytics.utils.torch_utils import select_device

    data_yaml = str(require_dataset().resolve())
    source = QAT_LAST
    model, payload = load_qat_checkpoint(source)
    recipe = QuantRecipe.from_dict(payload["recipe"])
    fresh_outputs(QC_DIR, QC_RESULTS)
    t0 = time.time()
    diverged = diverged_upstream(cfg, QAT_METRICS)
    summary: dict[str, Any] = {"qc": cfg.qc, "source": str(source),
                               "qat_status": "diverged" if diverged else "completed"}
    if diverged or not weights_finite(model):
        summary.update(status=SKIPPED_DIVERGED, applied=False)
        save_qat_checkpoint(model, recipe, QC_STEM,
                            payload.get("info", {}), payload["names"])
        return _finish(cfg, summary, t0)

    device = select_device(cfg.device, verbose=False)
    model.to(device)
    # validated as the qat stage's curves are (rect batches of the trainer's size): "before" is
    # the last epoch's value of the checkpoint's curve, and the delta is in the curves' units
    val_batch = training_val_batch(cfg.qat.batch, cfg.device)
    val = lambda m: validate_model(m, data_yaml, cfg.data.imgsz, val_batch, cfg.device)
    before = val(model)
    summary.update({"before_mAP50-95": before["mAP50-95"], "before_mAP50": before["mAP50"]})
    if not cfg.qc:
        summary.update(status="passed_through", applied=False, steps=0,
                       **{"after_mAP50-95": before["mAP50-95"], "after_mAP50": before["mAP50"]})
    else:
        model.args = get_cfg(DEFAULT_CFG)  # the detection loss reads its gains from model.args
        layers = insert_correction(model, head=cfg.correction.head)
        loader = calibration_batches(data_yaml, cfg.data.imgsz, cfg.correction.batch)
        steps = correction_steps(cfg.correction.epochs, cfg.correction.min_steps, len(loader))
        done, last_loss = train_correction(model, loader, cfg.correction.lr, steps, device)
        stats = correction_stats(model, done, last_loss)
        images = next(iter(loader))["img"][: cfg.export.parity_images].to(device).float() / 255
        fold_diff = check_fold(model, images)
        after = val(model)
        summary.update(
            status="applied", applied=True, layers=len(layers), steps=done, lr=cfg.correction.lr,
            head_layers=len(corrected_convs(model)),  # kept as modules, folded at export
            calib_images=len(loader.dataset), final_loss=last_loss,
            gamma_mean_abs_change=stats.gamma_mean_abs_change,
            gamma_max_abs_change=stats.gamma_max_abs_change,
            beta_mean_abs=stats.beta_mean_abs, beta_max_abs=stats.beta_max_abs,
            fold_max_rel_diff=fold_diff,
            **{"after_mAP50-95": after["mAP50-95"], "after_mAP50": after["mAP50"]},
        )
    summary["delta_mAP50-95"] = summary["after_mAP50-95"] - summary["before_mAP50-95"]
    info = {**payload.get("info", {}), "qc": summary["status"]}
    save_qat_checkpoint(model.cpu(), recipe, QC_STEM, info,
                        payload["names"])
    return _finish(cfg, summary, t0)


def _finish(cfg: Config, summary: dict[str, Any], t0: float) -> dict[str, Any]:
    summary["seconds"] = round(time.time() - t0, 1)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    write_metrics(QC_METRICS, "qc", clean)
    write_json(QC_DIR / "metadata.json", run_metadata(cfg, "qc", cfg.device, {"summary": clean}))
    def r(key: str) -> str:
        v = clean.get(key)
        return "-" if v is None else f"{v:.4f}"

    print(f"qc: {clean['status']} mAP50-95 before={r('before_mAP50-95')} "
          f"after={r('after_mAP50-95')} (delta {r('delta_mAP50-95')}) "
          f"steps={clean.get('steps')} in {clean['seconds']} s")
    return clean
