"""The evaluate stage: accuracy, size and speed of the exported W4A16 and FP32 ONNX models.

Both ONNX models run in onnxruntime over the val split with one preprocessing path (Ultralytics'
``LetterBox`` to ``data.imgsz``, RGB, CHW, /255) and one postprocessing path (the end-to-end
head's ``(N, k, 6)`` rows above ``evaluate.conf``, mapped back to original pixels with
``ultralytics.utils.ops.scale_boxes``).  mAP comes from Ultralytics' own metric code
(``box_iou``, the validator's ``match_predictions``, ``DetMetrics``/``ap_per_class``); nothing
here computes AP by hand.  The fake-quant PyTorch model (``models/qc/best.qat.pt``) goes through
the same path, so |mAP(ORT W4A16) - mAP(PyTorch fake-quant)| measures the export alone.

Predictions and the ground truth are also written in COCO format, so anyone can re-score them
with pycocotools (``image_id`` is the file stem -- an int when the stem is numeric, as in
Ultralytics' own JSON -- ``category_id`` the class index, ``bbox`` ``[x, y, w, h]`` in original
pixels).

Latency is the median of ``evaluate.latency_runs`` batch-1 runs after
``evaluate.latency_warmup`` warm-up runs, the two models interleaved run by run (alternating
which goes first) so both see the same machine load; throughput is images/s at batch 8, measured
the same way.  onnxruntime uses as many intra-op threads as the machine has cores.  By default
onnxruntime keeps ``DequantizeLinear`` in the graph, so the INT4 weights are expanded on every run
(``w4a16_latency_ms``, the headline ``latency_ratio``); ``w4a16_prefolded_*`` times the same file
with the dequantization constant-folded once at session load (float weights in RAM, INT4 only on
disk), measured in the same interleaved loop.

With ``openvino`` in ``evaluate.runtimes`` both files are also compiled by OpenVINO's CPU plugin
(f32 inference, as many threads as onnxruntime) and go through the same prediction, scoring and
timing paths: ``openvino_*`` fields beside onnxruntime's, with the W4A16 mAP's parity against
the same PyTorch fake-quant model, and the OpenVINO models in the same interleaved timing loop.

When the export stage reports ``skipped_diverged`` (QAT diverged, no W4A16 model), only the FP32
model is scored: the W4A16 fields are null, ``status`` is ``skipped_diverged`` and
``predictions_w4a16.json`` is an empty list.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from yoloqat.config import Config
from yoloqat.data.splits import letterbox_batch, read_split
from yoloqat.deploy.openvino_runtime import DEVICE as OPENVINO_DEVICE
from yoloqat.deploy.openvino_runtime import compile_openvino, openvino_runner, openvino_version
from yoloqat.deploy.runtime import (
    measure_speed,
    onnx_runner,
    open_session,
    ort_device,
    torch_runner,
)
from yoloqat.deploy.scoring import (
    coco_ground_truth,
    coco_predictions,
    detection_metrics,
    predict_split,
)
from yoloqat.paths import (
    DATASET_YAML,
    EVALUATE_METRICS,
    EVALUATE_RESULTS,
    EXPORT_METRICS,
    FP32_ONNX,
    QC_CHECKPOINT,
    W4A16_ONNX,
)
from yoloqat.pipeline.status import SKIPPED_DIVERGED, diverged_upstream
from yoloqat.provenance import fresh_outputs, run_metadata, write_json, write_metrics
from yoloqat.quant.checkpoint import load_qat_checkpoint

THROUGHPUT_BATCH = 8
PARITY_TARGET = 0.005


def _write_compact_json(path: Path, data: Any) -> None:
    """COCO files hold up to max_det rows per image: one compact line, written atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def _round(v: float | None, nd: int = 5) -> float | None:
    return None if v is None else round(float(v), nd)


def format_table(m: dict[str, Any]) -> str:
    """The stage's terminal summary: one row per model, then the ratios."""

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = [("model", "mAP50-95", "mAP50", "MB", "latency ms", "img/s")]
    rows.append(("FP32 onnxruntime", f(m["fp32_mAP50-95"], ".4f"), f(m["fp32_mAP50"], ".4f"),
                 f(m["fp32_size_bytes"] / 1e6, ".2f"), f(m["fp32_latency_ms"], ".2f"),
                 f(m["fp32_throughput_ips"], ".1f")))
    if m.get("w4a16_mAP50-95") is not None:
        rows.append(("W4A16 onnxruntime", f(m["w4a16_mAP50-95"], ".4f"), f(m["w4a16_mAP50"], ".4f"),
                     f(m["w4a16_size_bytes"] / 1e6, ".2f"), f(m["w4a16_latency_ms"], ".2f"),
                     f(m["w4a16_throughput_ips"], ".1f")))
        rows.append(("W4A16 PyTorch fake-quant", f(m["pytorch_w4a16_mAP50-95"], ".4f"),
                     f(m["pytorch_w4a16_mAP50"], ".4f"), "-", "-", "-"))
    for key, label in (("fp32", "FP32 OpenVINO"), ("w4a16", "W4A16 OpenVINO")):
        if m.get(f"openvino_{key}_mAP50-95") is not None:
            size = m[f"{key}_size_bytes"]
            rows.append((label, f(m[f"openvino_{key}_mAP50-95"], ".4f"),
                         f(m[f"openvino_{key}_mAP50"], ".4f"), f(size / 1e6, ".2f"),
                         f(m[f"openvino_{key}_latency_ms"], ".2f"),
                         f(m[f"openvino_{key}_throughput_ips"], ".1f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    head = f"evaluate: {m['images']} val images, {m['instances']} boxes, status {m['status']}"
    tail = "W4A16 not evaluated (QAT diverged)"
    if m.get("w4a16_mAP50-95") is not None:
        tail = (f"gap FP32 - W4A16 {m['gap_mAP50-95']:+.4f}; |ORT - PyTorch| "
                f"{m['parity_abs_diff']:.4f} ({'ok' if m['parity_ok'] else 'OVER 0.005'}); "
                f"size ratio {m['size_ratio']:.3f}; latency ratio {m['latency_ratio']:.2f} "
                f"(prefolded {m['w4a16_prefolded_latency_ratio']:.2f}); {m['seconds']} s")
        if m.get("openvino_parity_abs_diff") is not None:
            tail += (f"\nOpenVINO: |OV - PyTorch| {m['openvino_parity_abs_diff']:.4f} "
                     f"({'ok' if m['openvino_parity_ok'] else 'OVER 0.005'}); latency ratio "
                     f"{m['openvino_latency_ratio']:.2f}")
    return "\n".join([head, *lines, tail])


def _openvino_metrics(
    scores: dict[str, Any], lat: dict[str, float], thr: dict[str, float], skipped: bool
) -> dict[str, Any]:
    """The OpenVINO columns beside onnxruntime's: mAP, parity with PyTorch, latency, throughput.

    ``openvino_latency_ratio`` is W4A16 over FP32 within OpenVINO; ``openvino_vs_onnxruntime_*``
    compare the same file across the two runtimes.
    """
    fp = scores["openvino_fp32"]
    m: dict[str, Any] = {
        "openvino_version": openvino_version(),
        "openvino_fp32_mAP50-95": _round(fp["mAP50-95"]),
        "openvino_fp32_mAP50": _round(fp["mAP50"]),
        "openvino_w4a16_mAP50-95": None,
        "openvino_w4a16_mAP50": None,
        "openvino_parity_abs_diff": None,
        "openvino_parity_ok": None,
        "openvino_fp32_latency_ms": _round(lat["openvino_fp32"] * 1e3, 3),
        "openvino_w4a16_latency_ms": None,
        "openvino_latency_ratio": None,
        "openvino_vs_onnxruntime_fp32_latency_ratio": _round(lat["openvino_fp32"] / lat["fp32"], 3),
        "openvino_vs_onnxruntime_w4a16_latency_ratio": None,
        "openvino_fp32_throughput_ips": _round(THROUGHPUT_BATCH / thr["openvino_fp32"], 1),
        "openvino_w4a16_throughput_ips": None,
    }
    if skipped:
        return m
    w, pt = scores["openvino_w4a16"], scores["pytorch_w4a16"]
    parity = abs(w["mAP50-95"] - pt["mAP50-95"])
    m.update(
        {
            "openvino_w4a16_mAP50-95": _round(w["mAP50-95"]),
            "openvino_w4a16_mAP50": _round(w["mAP50"]),
            "openvino_parity_abs_diff": _round(parity, 6),
            "openvino_parity_ok": parity <= PARITY_TARGET,
            "openvino_w4a16_latency_ms": _round(lat["openvino_w4a16"] * 1e3, 3),
            "openvino_latency_ratio": _round(lat["openvino_w4a16"] / lat["openvino_fp32"], 3),
            "openvino_vs_onnxruntime_w4a16_latency_ratio": _round(
                lat["openvino_w4a16"] / lat["w4a16"], 3
            ),
            "openvino_w4a16_throughput_ips": _round(THROUGHPUT_BATCH / thr["openvino_w4a16"], 1),
        }
    )
    return m


def evaluate_models(cfg: Config) -> dict[str, Any]:
    """Score both ONNX models (and the fake-quant PyTorch model) on val; write results/evaluate."""
    t0 = time.time()
    imgsz, ev = cfg.data.imgsz, cfg.evaluate
    threads = os.cpu_count() or 1
    skipped = diverged_upstream(cfg, EXPORT_METRICS) is not None

    # evaluate.device=cuda without onnxruntime's CUDA provider: one line, then CPU
    device = ort_device(ev.device)
    # Validate every input before anything is written.
    fp_sess = open_session(cfg.resolve(FP32_ONNX), imgsz, device, threads)
    w_sess = None if skipped else open_session(cfg.resolve(W4A16_ONNX), imgsz, device, threads)
    samples, names = read_split(cfg.resolve(DATASET_YAML), "val", require_labels=True)
    runners = {"fp32": onnx_runner(fp_sess)}
    if w_sess is not None:
        qat_model, _ = load_qat_checkpoint(cfg.resolve(QC_CHECKPOINT))
        k = w_sess.get_outputs()[0].shape[1]  # the rows the ONNX head keeps (pinned at export)
        max_det = k if isinstance(k, int) else cfg.export.max_det
        runners["w4a16"] = onnx_runner(w_sess)
        runners["pytorch_w4a16"] = torch_runner(qat_model, max_det, imgsz)
    openvino = "openvino" in ev.runtimes
    if openvino:
        ov_models = ("fp32",) if w_sess is None else ("fp32", "w4a16")
        for key in ov_models:
            path = cfg.resolve(FP32_ONNX if key == "fp32" else W4A16_ONNX)
            runners[f"openvino_{key}"] = openvino_runner(compile_openvino(path, threads))

    preds = predict_split(runners, samples, imgsz, ev.batch, ev.conf)
    scores = {k: detection_metrics(samples, d, names) for k, d in preds.items()}

    # Every deployed model is timed in one interleaved loop, so all see the same machine load.
    timed = {k: v for k, v in runners.items() if k != "pytorch_w4a16"}
    if w_sess is not None:
        folded = open_session(cfg.resolve(W4A16_ONNX), imgsz, device, threads, fold_dequantize=True)
        timed["w4a16_prefolded"] = onnx_runner(folded)
    x1 = letterbox_batch(samples[:1], imgsz)
    x8 = letterbox_batch([samples[i % len(samples)] for i in range(THROUGHPUT_BATCH)], imgsz)
    lat = measure_speed(timed, x1, ev.latency_warmup, ev.latency_runs)
    thr = measure_speed(timed, x8, ev.latency_warmup, ev.latency_runs)

    fp_size = cfg.resolve(FP32_ONNX).stat().st_size
    m: dict[str, Any] = {
        "status": SKIPPED_DIVERGED if skipped else "evaluated",
        "images": len(samples),
        "instances": int(sum(len(s.classes) for s in samples)),
        "fp32_mAP50-95": _round(scores["fp32"]["mAP50-95"]),
        "fp32_mAP50": _round(scores["fp32"]["mAP50"]),
        "w4a16_mAP50-95": None,
        "w4a16_mAP50": None,
        "pytorch_w4a16_mAP50-95": None,
        "pytorch_w4a16_mAP50": None,
        "parity_abs_diff": None,
        "parity_ok": None,
        "gap_mAP50-95": None,
        "fp32_size_bytes": fp_size,
        "w4a16_size_bytes": None,
        "size_ratio": None,
        "fp32_latency_ms": _round(lat["fp32"] * 1e3, 3),
        "w4a16_latency_ms": None,
        "latency_ratio": None,
        "fp32_throughput_ips": _round(THROUGHPUT_BATCH / thr["fp32"], 1),
        "w4a16_throughput_ips": None,
    }
    if not skipped:
        w, pt, fp = scores["w4a16"], scores["pytorch_w4a16"], scores["fp32"]
        w_size = cfg.resolve(W4A16_ONNX).stat().st_size
        parity = abs(w["mAP50-95"] - pt["mAP50-95"])
        m.update(
            {
                "w4a16_mAP50-95": _round(w["mAP50-95"]),
                "w4a16_mAP50": _round(w["mAP50"]),
                "pytorch_w4a16_mAP50-95": _round(pt["mAP50-95"]),
                "pytorch_w4a16_mAP50": _round(pt["mAP50"]),
                "parity_abs_diff": _round(parity, 6),
                "parity_ok": parity <= PARITY_TARGET,
                "gap_mAP50-95": _round(fp["mAP50-95"] - w["mAP50-95"]),
                "w4a16_size_bytes": w_size,
                "size_ratio": _round(w_size / fp_size, 4),
                "w4a16_latency_ms": _round(lat["w4a16"] * 1e3, 3),
                "latency_ratio": _round(lat["w4a16"] / lat["fp32"], 3),
                "w4a16_throughput_ips": _round(THROUGHPUT_BATCH / thr["w4a16"], 1),
                "w4a16_prefolded_latency_ms": _round(lat["w4a16_prefolded"] * 1e3, 3),
                "w4a16_prefolded_latency_ratio": _round(lat["w4a16_prefolded"] / lat["fp32"], 3),
                "w4a16_prefolded_throughput_ips": _round(
                    THROUGHPUT_BATCH / thr["w4a16_prefolded"], 1
                ),
            }
        )
    if openvino:
        m.update(_openvino_metrics(scores, lat, thr, skipped))
    m.update(
        {
            "runtimes": list(ev.runtimes),
            "conf": ev.conf,
            "imgsz": imgsz,
            "device": ev.device,
            "onnxruntime_device": device,  # cpu when the CUDA provider was missing
            "providers": fp_sess.get_providers(),
            "ort_intra_op_threads": threads,
            **({"openvino_device": OPENVINO_DEVICE, "openvino_threads": threads} if openvino else {}),
            "latency_warmup": ev.latency_warmup,
            "latency_runs": ev.latency_runs,
            "throughput_batch": THROUGHPUT_BATCH,
            "seconds": round(time.time() - t0, 1),
        }
    )

    out = cfg.resolve(EVALUATE_RESULTS)
    fresh_outputs(out)
    _write_compact_json(out / "ground_truth_coco.json", coco_ground_truth(samples, names))
    for key in ("fp32", "w4a16"):
        # A diverged run has no W4A16 model: an empty list keeps the DVC outputs complete.
        rows = coco_predictions(samples, preds[key]) if key in preds else []
        _write_compact_json(out / f"predictions_{key}.json", rows)
    write_metrics(cfg.resolve(EVALUATE_METRICS), "evaluate", m)
    write_json(out / "metadata.json", run_metadata(cfg, "evaluate", ev.device, {"summary": m}))
    print(format_table(m))
    return m
