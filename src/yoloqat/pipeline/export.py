"""The export stage: the fake-quant QAT model as a true W4A16 ONNX graph, and the FP32 baseline.

``models/onnx/w4a16.onnx`` stores every quantized conv weight as an ONNX ``INT4`` initializer
(two values per byte) plus a per-output-channel float32 scale, dequantized in the graph by
``DequantizeLinear(axis=0)`` whose output is the Conv weight.  ``models/onnx/fp32.onnx`` is the
float model through the same export path.  Both carry YOLOv10's end-to-end head: one output
``(N, max_det, 6)`` = ``x1, y1, x2, y2, score, class`` in input pixels, no external NMS.

BN folding is :mod:`yoloqat.quant.fold`'s, the INT4 graph rewrite and its verification
:mod:`yoloqat.deploy.int4_onnx`'s, the Slice inputs that let OpenVINO compile the INT4 convs
:mod:`yoloqat.deploy.split_to_slice`'s and the parity check :mod:`yoloqat.deploy.runtime`'s.

A diverged QAT run (``results/qat/metrics.json`` "diverged", ``results/qc/metrics.json``
"skipped_diverged", or non-finite weights) exports the FP32 model only and writes
``{"status": SKIPPED_DIVERGED, ...}``; the stage still succeeds so the DAG can report it.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from yoloqat.config import Config
from yoloqat.data.splits import letterbox_batch, read_split
from yoloqat.deploy.head import prepare_end2end, torch_end2end_dense
from yoloqat.deploy.int4_onnx import (
    INPUT_NAME,
    conv_weight_kinds,
    export_onnx,
    initializer_nbytes,
    quantize_initializers,
    verify_int_weights,
    write_onnx,
)
from yoloqat.deploy.runtime import compare_end2end, open_session
from yoloqat.deploy.split_to_slice import slice_int_conv_inputs
from yoloqat.errors import ExportError
from yoloqat.paths import (
    DATASET_YAML,
    EXPORT_METRICS,
    EXPORT_RESULTS,
    FP32_ONNX,
    FP_CHECKPOINT,
    FP_CONTROL_CHECKPOINT,
    ONNX_DIR,
    QAT_METRICS,
    QC_CHECKPOINT,
    QC_METRICS,
    W4A16_ONNX,
)
from yoloqat.pipeline.status import SKIPPED_DIVERGED, diverged_upstream
from yoloqat.provenance import run_metadata, write_json, write_metrics
from yoloqat.quant.checkpoint import load_qat_checkpoint, load_ultralytics_model, weights_finite
from yoloqat.quant.fold import FoldedConv, fold_float, fold_quantized


def fp_reference(cfg: Config) -> Path:
    """The FP32 model W4A16 is compared with: "FP continued" for QAT's epochs when
    ``fp.control`` is on (equal training), else the FP baseline QAT started from."""
    return FP_CONTROL_CHECKPOINT if cfg.fp.control else FP_CHECKPOINT


def parity_batch(cfg: Config, n: int) -> np.ndarray:
    """``n`` val images (repeated if fewer) preprocessed exactly as the evaluate stage does."""
    samples, _ = read_split(cfg.resolve(DATASET_YAML), require_labels=False)
    picks = [samples[i % len(samples)] for i in range(n)]
    return letterbox_batch(picks, cfg.data.imgsz)


# --------------------------------------------------------------------------------------------
# the stage


def build_fp32(cfg: Config, fp_model: nn.Module, imgsz: int) -> Any:
    model = prepare_end2end(fold_float(fp_model), imgsz, cfg.export.max_det, export=True)
    meta = {
        "yoloqat": "fp32",
        "imgsz": imgsz,
        "end2end": True,
        "names": getattr(model, "names", {}),
    }
    return export_onnx(model, imgsz, cfg.export.opset, meta)


def build_w4a16(
    cfg: Config, qat_model: nn.Module, payload: dict[str, Any], imgsz: int, inplace: bool = False
) -> tuple[Any, nn.Module, dict[str, FoldedConv], dict[str, str], int]:
    """Fold, export and rewrite the fake-quant model.

    Returns (proto, deploy model, records, matched, Split nodes whose int-conv outputs are read
    through Slice).

    ``inplace`` turns ``qat_model`` itself into the deploy model instead of copying it.
    """
    model = qat_model if inplace else copy.deepcopy(qat_model)
    deploy, records = fold_quantized(
        prepare_end2end(model, imgsz, cfg.export.max_det, export=True), inplace=True
    )
    for p in deploy.parameters():
        p.requires_grad_(False)
    meta = {
        "yoloqat": "w4a16",
        "imgsz": imgsz,
        "end2end": True,
        "recipe": payload.get("recipe", {}),
        "names": payload.get("names", {}),
    }
    proto = export_onnx(deploy, imgsz, cfg.export.opset, meta)
    matched = quantize_initializers(proto, records)
    verify_int_weights(proto, records, matched)
    sliced = slice_int_conv_inputs(proto)
    return proto, deploy, records, matched, sliced


def export_models(cfg: Config) -> dict[str, Any]:
    """Write models/onnx/{w4a16,fp32}.onnx and results/export/metrics.json; returns the metrics."""
    t0 = time.time()
    imgsz = cfg.data.imgsz
    onnx_dir, results_dir = cfg.resolve(ONNX_DIR), cfg.resolve(EXPORT_RESULTS)
    fp_source = fp_reference(cfg)
    fp_model = load_ultralytics_model(cfg.resolve(fp_source), "FP checkpoint")
    upstream = diverged_upstream(cfg, QAT_METRICS, QC_METRICS)
    diverged = str(upstream) if upstream else None
    qat_model, payload = (None, {}) if diverged else load_qat_checkpoint(cfg.resolve(QC_CHECKPOINT))
    if qat_model is not None and not weights_finite(qat_model):
        diverged, qat_model = f"{QC_CHECKPOINT} (non-finite weights)", None
    x = parity_batch(cfg, cfg.export.parity_images)  # fails early if the dataset is missing

    # Build both graphs in memory first, so a failure leaves no half-written outputs.
    fp_proto = build_fp32(cfg, fp_model, imgsz)
    proto = records = fq_ref = None
    sliced = 0
    if qat_model is not None:
        # The PyTorch reference first: build_w4a16 then turns the loaded model into the deploy one.
        prepare_end2end(qat_model, imgsz, cfg.export.max_det, export=False)
        fq_ref = torch_end2end_dense(qat_model, torch.from_numpy(x))
        proto, _, records, _, sliced = build_w4a16(cfg, qat_model, payload, imgsz, inplace=True)
        counts = conv_weight_kinds(proto)
        n_int = counts["int4_convs"] + counts["int8_convs"]
        if n_int != len(records):
            raise ExportError(
                f"{n_int} int Conv nodes in the graph, expected {len(records)}"
            )

    for p in (onnx_dir, results_dir):
        shutil.rmtree(p, ignore_errors=True)
    fp_path = cfg.resolve(FP32_ONNX)
    fp_size = write_onnx(fp_proto, fp_path)
    fp_counts = conv_weight_kinds(fp_proto)
    fp_bytes = sum(initializer_nbytes(t) for t in fp_proto.graph.initializer)
    fp_out = open_session(fp_path, imgsz).run(None, {INPUT_NAME: x})[0]
    fp_ref = torch_end2end_dense(
        prepare_end2end(copy.deepcopy(fp_model), imgsz, cfg.export.max_det, export=False),
        torch.from_numpy(x),
    )
    fp_parity = compare_end2end(fp_out, *fp_ref)

    metrics: dict[str, Any] = {
        "fp32_source": fp_source.as_posix(),
        "opset": cfg.export.opset,
        "imgsz": imgsz,
        "max_det": int(fp_out.shape[1]),
        "fp32_file_bytes": fp_size,
        "fp32_weight_bytes": fp_bytes,
        "fp32_float_convs": fp_counts["float_convs"],
        "fp32_parity_max_abs_diff": fp_parity["max_abs_diff"],
    }
    if proto is None or records is None or fq_ref is None:
        metrics = {
            "status": SKIPPED_DIVERGED,
            "reason": f"{diverged} reports a diverged run; no W4A16 model was exported",
            **metrics,
        }
        _finish(cfg, results_dir, metrics, t0)
        print(f"export: W4A16 skipped ({diverged} diverged); wrote {FP32_ONNX} only")
        return metrics

    w_path = cfg.resolve(W4A16_ONNX)
    w_size = write_onnx(proto, w_path)
    w_bytes = sum(initializer_nbytes(t) for t in proto.graph.initializer)

    # Parity: onnxruntime on the file vs. the fake-quant PyTorch model (BN unfolded).
    ort_out = open_session(w_path, imgsz).run(None, {INPUT_NAME: x})[0]
    parity = compare_end2end(ort_out, *fq_ref)

    metrics = {
        "status": "exported",
        **metrics,
        "w4a16_file_bytes": w_size,
        "w4a16_weight_bytes": w_bytes,
        "size_ratio": w_size / fp_size,
        "weight_bytes_ratio": w_bytes / fp_bytes,
        "int4_convs": counts["int4_convs"],
        "int8_convs": counts["int8_convs"],
        "float_convs": counts["float_convs"],
        "float_convs_note": "the DFL conv (fixed arange weights) stays float by design",
        "bn_folded_convs": sum(r.bn_folded for r in records.values()),
        "sign_flipped_channels": int(sum((r.sign < 0).sum() for r in records.values())),
        "int_weights_exact": True,
        "int_conv_splits_sliced": sliced,
        "parity_images": int(x.shape[0]),
        "parity_compared": "onnxruntime w4a16.onnx vs the fake-quant PyTorch model (BN unfolded), "
        "end-to-end (N, max_det, 6) outputs: each ONNX row vs the same-class "
        "PyTorch pre-top-k prediction at the nearest anchor, and the sorted "
        "top-k scores (top-k may order near-tied rows differently); 'raw' is "
        "row by row",
        "parity_max_abs_diff": parity["max_abs_diff"],
        "parity_row_to_anchor_max_abs_diff": parity["row_to_anchor"],
        "parity_sorted_scores_max_abs_diff": parity["sorted_scores"],
        "parity_max_abs_diff_raw": parity["raw"],
        "parity_images_same_order": parity["images_same_order"],
    }
    _finish(cfg, results_dir, metrics, t0)
    # the paths the files end up at (relative to the repo), not where a staged run writes them
    print(
        f"export: {W4A16_ONNX} {w_size / 1e6:.2f} MB ({counts['int4_convs']} int4 + "
        f"{counts['int8_convs']} int8 + {counts['float_convs']} float convs) vs {FP32_ONNX} "
        f"{fp_size / 1e6:.2f} MB: size ratio {metrics['size_ratio']:.3f}; max |ORT - PyTorch| "
        f"{metrics['parity_max_abs_diff']:.3g} over {x.shape[0]} images"
    )
    return metrics


def _finish(cfg: Config, results_dir: Path, metrics: dict[str, Any], t0: float) -> None:
    metrics["seconds"] = round(time.time() - t0, 1)
    write_metrics(cfg.resolve(EXPORT_METRICS), "export", metrics)
    write_json(
        results_dir / "metadata.json", run_metadata(cfg, "export", "cpu", {"summary": metrics})
    )
