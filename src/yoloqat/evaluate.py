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

When the export stage reports ``skipped_diverged`` (QAT diverged, no W4A16 model), only the FP32
model is scored: the W4A16 fields are null, ``status`` is ``skipped_diverged`` and
``predictions_w4a16.json`` is an empty list.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml

from yoloqat.config import Config
from yoloqat.provenance import fresh_outputs, run_metadata, write_json

ONNX_DIR = Path("models/onnx")
W4A16_ONNX = ONNX_DIR / "w4a16.onnx"
FP32_ONNX = ONNX_DIR / "fp32.onnx"
EXPORT_METRICS = Path("results/export/metrics.json")
QAT_CHECKPOINT = Path("models/qc/best.qat.pt")
DATASET_YAML = Path("data/prepared/dataset.yaml")
RESULTS_DIR = Path("results/evaluate")
INPUT_NAME = "images"
THROUGHPUT_BATCH = 8
PARITY_TARGET = 0.005
IMG_SUFFIXES = frozenset(
    {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo"}
)


class EvaluateError(ValueError):
    """Inputs the evaluate stage cannot use; the message is a single line."""


# --------------------------------------------------------------------------------------------
# the val split


@dataclass
class Sample:
    path: Path
    image_id: int | str
    width: int
    height: int
    boxes: np.ndarray  # (M, 4) float32 xyxy, original pixels
    classes: np.ndarray  # (M,) int64


@dataclass
class Detections:
    boxes: np.ndarray  # (K, 4) float32 xyxy, original pixels
    scores: np.ndarray  # (K,) float32, descending
    classes: np.ndarray  # (K,) int64


def image_id_of(path: Path) -> int | str:
    return int(path.stem) if path.stem.isnumeric() else path.stem


def _split_images(root: Path, entry: Any, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        p = Path(str(e)).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            images += [f for f in p.rglob("*") if f.suffix.lower() in IMG_SUFFIXES]
        elif p.is_file() and p.suffix == ".txt":
            for raw in p.read_text().splitlines():
                line = raw.strip()
                if line:
                    f = Path(line)
                    images.append(f if f.is_absolute() else (p.parent / f).resolve())
        else:
            raise EvaluateError(
                f"evaluate: split path {str(p)!r} from {str(yaml_path)!r} not found"
            )
    return sorted(images)


def _read_labels(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    boxes, classes = [], []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            vals = line.split()
            if not vals:
                continue
            try:
                nums = [float(v) for v in vals]
            except ValueError:
                raise EvaluateError(
                    f"evaluate: label file {str(path)!r} line {n} is not numeric"
                ) from None
            if len(nums) == 5:
                cx, cy, w, h = nums[1:]
                x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            elif len(nums) >= 7 and len(nums) % 2 == 1:  # polygon: its bounding box
                xs, ys = nums[1::2], nums[2::2]
                x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            else:
                raise EvaluateError(f"evaluate: label file {str(path)!r} line {n} is malformed")
            classes.append(int(nums[0]))
            boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64))


def read_split(
    dataset_yaml: Path, split: str = "val", require_labels: bool = True
) -> tuple[list[Sample], dict[int, str]]:
    """The images of a split of an Ultralytics dataset yaml with their boxes in pixels."""
    from PIL import Image
    from ultralytics.data.utils import exif_size, img2label_paths

    dataset_yaml = Path(dataset_yaml)
    if not dataset_yaml.is_file():
        raise EvaluateError(
            f"evaluate: dataset {str(dataset_yaml)!r} not found; run the prepare stage first"
        )
    try:
        doc = yaml.safe_load(dataset_yaml.read_text()) or {}
    except yaml.YAMLError:
        raise EvaluateError(f"evaluate: dataset {str(dataset_yaml)!r} is not valid YAML") from None
    if not isinstance(doc, dict) or doc.get(split) in (None, ""):
        raise EvaluateError(f"evaluate: dataset {str(dataset_yaml)!r} has no {split!r} split")
    names = doc.get("names") or {}
    names = {
        int(k): str(v) for k, v in (names.items() if isinstance(names, dict) else enumerate(names))
    }
    root = Path(str(doc.get("path") or ".")).expanduser()
    root = root if root.is_absolute() else dataset_yaml.parent / root
    images = _split_images(root, doc[split], dataset_yaml)
    if not images:
        raise EvaluateError(f"evaluate: the {split} split of {str(dataset_yaml)!r} has no images")
    label_paths = [Path(p) for p in img2label_paths([str(p) for p in images])]
    if require_labels and not any(p.is_file() for p in label_paths):
        raise EvaluateError(
            f"evaluate: the {split} split of {str(dataset_yaml)!r} has no label files "
            f"(looked for e.g. {str(label_paths[0])!r}); cannot score it"
        )
    samples = []
    for img, lbl in zip(images, label_paths, strict=True):
        try:
            with Image.open(img) as im:
                width, height = exif_size(im)
        except OSError:
            raise EvaluateError(f"evaluate: image {str(img)!r} is unreadable") from None
        boxes, classes = _read_labels(lbl, width, height)
        samples.append(Sample(img, image_id_of(img), width, height, boxes, classes))
    return samples, names


def letterbox_batch(samples: Sequence[Sample], imgsz: int) -> np.ndarray:
    """Ultralytics' LetterBox to ``imgsz`` (centered, pad 114), BGR->RGB, CHW, float32 /255."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.patches import imread

    lb = LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=32)
    out = np.empty((len(samples), 3, imgsz, imgsz), np.float32)
    for i, s in enumerate(samples):
        im = imread(str(s.path))
        if im is None:
            raise EvaluateError(f"evaluate: image {str(s.path)!r} is unreadable")
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        im = lb(image=im[..., :3])
        out[i] = im[..., ::-1].transpose(2, 0, 1) / np.float32(255.0)
    return out


def to_detections(rows: np.ndarray, sample: Sample, imgsz: int, conf: float) -> Detections:
    """One image's ``(k, 6)`` end-to-end rows -> detections above ``conf`` in original pixels."""
    from ultralytics.utils.ops import scale_boxes

    rows = np.asarray(rows, np.float32)
    rows = rows[rows[:, 4] > conf]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    boxes = scale_boxes((imgsz, imgsz), rows[:, :4].copy(), (sample.height, sample.width))
    return Detections(np.asarray(boxes, np.float32), rows[:, 4].copy(), rows[:, 5].astype(np.int64))


# --------------------------------------------------------------------------------------------
# metrics (Ultralytics' code) and COCO JSON


def detection_metrics(
    samples: Sequence[Sample], detections: Sequence[Detections], names: dict[int, str]
) -> dict[str, float]:
    """mAP50-95, mAP50, precision and recall with Ultralytics' matcher and DetMetrics."""
    import torch
    from ultralytics.models.yolo.detect.val import DetectionValidator
    from ultralytics.utils.metrics import DetMetrics, box_iou

    iouv = torch.linspace(0.5, 0.95, 10)
    # match_predictions only reads ``self.iouv``: call the validator's own matcher without
    # building a validator (which would create run folders).
    matcher = SimpleNamespace(iouv=iouv)
    metrics = DetMetrics(names=dict(names))
    for s, d in zip(samples, detections, strict=True):
        if len(s.classes) and len(d.classes):
            iou = box_iou(torch.from_numpy(s.boxes), torch.from_numpy(d.boxes))
            tp = DetectionValidator.match_predictions(
                matcher,
                torch.from_numpy(d.classes),
                torch.from_numpy(s.classes),
                iou,  # type: ignore[arg-type]
            ).numpy()
        else:
            tp = np.zeros((len(d.classes), len(iouv)), dtype=bool)
        metrics.update_stats(
            {
                "tp": tp,
                "conf": d.scores,
                "pred_cls": d.classes,
                "target_cls": s.classes,
                "target_img": np.unique(s.classes),
                "im_name": s.path.name,
            }
        )
    metrics.process()
    p, r, map50, map5095 = (float(v) for v in metrics.mean_results())
    return {"mAP50-95": map5095, "mAP50": map50, "precision": p, "recall": r}


def _xywh(b: np.ndarray) -> list[float]:
    return [
        round(float(b[0]), 3),
        round(float(b[1]), 3),
        round(float(b[2] - b[0]), 3),
        round(float(b[3] - b[1]), 3),
    ]


def coco_ground_truth(samples: Sequence[Sample], names: dict[int, str]) -> dict[str, Any]:
    images, anns = [], []
    for s in samples:
        images.append(
            {"id": s.image_id, "file_name": s.path.name, "width": s.width, "height": s.height}
        )
        for b, c in zip(s.boxes, s.classes, strict=True):
            bbox = _xywh(b)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": s.image_id,
                    "category_id": int(c),
                    "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 3),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": int(i), "name": n} for i, n in sorted(names.items())]
    return {
        "info": {"description": "yoloqat val split"},
        "images": images,
        "annotations": anns,
        "categories": cats,
    }


def coco_predictions(samples: Sequence[Sample], detections: Sequence[Detections]) -> list[dict]:
    return [
        {
            "image_id": s.image_id,
            "category_id": int(c),
            "bbox": _xywh(b),
            "score": round(float(p), 5),
        }
        for s, d in zip(samples, detections, strict=True)
        for b, p, c in zip(d.boxes, d.scores, d.classes, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# models


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EvaluateError(
                "evaluate: evaluate.device=cuda but onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
                " or set evaluate.device=cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_onnx(
    path: Path,
    imgsz: int,
    device: str = "cpu",
    threads: int | None = None,
    fold_dequantize: bool = False,
) -> Any:
    """An onnxruntime session for an end-to-end detector ONNX file, or one-line EvaluateError.

    By default onnxruntime keeps ``DequantizeLinear`` nodes (it reserves them for QDQ fusion),
    so INT4 weights are dequantized on every run.  ``fold_dequantize`` sets
    ``session.disable_quant_qdq`` so they are constant-folded to float once at load instead.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"evaluate: ONNX model {str(path)!r} not found; run the export stage")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        if not proto.graph.node:
            raise ValueError("empty graph")
    except Exception as exc:  # noqa: BLE001  (protobuf raises DecodeError and friends)
        raise EvaluateError(
            f"evaluate: {str(path)!r} is not a valid ONNX model ({type(exc).__name__})"
        ) from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    if fold_dequantize:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers_for(device))
    except EvaluateError:
        raise
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own untyped errors)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EvaluateError(f"evaluate: onnxruntime cannot load {str(path)!r} ({first})") from None
    inp, out = sess.get_inputs(), sess.get_outputs()
    in_shape = inp[0].shape if len(inp) == 1 else None
    if in_shape is None or len(in_shape) != 4 or in_shape[2:] != [imgsz, imgsz]:
        raise EvaluateError(
            f"evaluate: {str(path)!r} takes input {in_shape}, expected (N, 3, {imgsz}, {imgsz});"
            " re-run the export stage with the same data.imgsz"
        )
    out_shape = out[0].shape if len(out) == 1 else None
    last = out_shape[-1] if out_shape is not None and len(out_shape) == 3 else -1
    if not (last == 6 or last is None or isinstance(last, str)):  # symbolic dims are accepted
        raise EvaluateError(
            f"evaluate: {str(path)!r} is not an end-to-end detector (output {out_shape},"
            " expected (N, max_det, 6))"
        )
    return sess


def onnx_runner(sess: Any) -> Callable[[np.ndarray], np.ndarray]:
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def torch_runner(model: Any, max_det: int, imgsz: int) -> Callable[[np.ndarray], np.ndarray]:
    """The fake-quant PyTorch model (changed in place) with the export's end-to-end head."""
    import torch

    from yoloqat.export import prepare_end2end, torch_end2end

    m = prepare_end2end(model.float().cpu().eval(), imgsz, max_det, export=False)
    return lambda x: torch_end2end(m, torch.from_numpy(x)).numpy()


def predict_split(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]],
    samples: Sequence[Sample],
    imgsz: int,
    batch: int,
    conf: float,
) -> dict[str, list[Detections]]:
    """Run every model on the same preprocessed batches (each image is decoded once)."""
    out: dict[str, list[Detections]] = {k: [] for k in runners}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        x = letterbox_batch(chunk, imgsz)
        for key, run in runners.items():
            y = run(x)
            out[key] += [
                to_detections(rows, s, imgsz, conf) for rows, s in zip(y, chunk, strict=True)
            ]
    return out


def measure_speed(
    runners: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray, warmup: int, runs: int
) -> dict[str, float]:
    """Median seconds per call for each runner on ``x``, runs interleaved (order alternates)."""
    keys = list(runners)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(warmup + runs):
        for k in keys if i % 2 == 0 else keys[::-1]:
            t = time.perf_counter()
            runners[k](x)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------------
# the stage


def _export_status(cfg: Config) -> str | None:
    p = cfg.resolve(EXPORT_METRICS)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text()).get("status")
    except (json.JSONDecodeError, AttributeError):
        return None


def _write_compact_json(path: Path, data: Any) -> None:
    """COCO files hold up to max_det rows per image: one compact line, written atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def _round(v: float | None, nd: int = 5) -> float | None:
    return None if v is None else round(float(v), nd)


def format_table(metrics: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in metrics.items() if not isinstance(v, (dict, list))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def evaluate_models(cfg: Config) -> dict[str, Any]:
    """Score both ONNX models (and the fake-quant PyTorch model) on val; write results/evaluate."""
    t0 = time.time()
    imgsz, ev = cfg.data.imgsz, cfg.evaluate
    threads = os.cpu_count() or 1
    skipped = _export_status(cfg) == "skipped_diverged"

    # Validate every input before anything is written.
    fp_sess = open_onnx(cfg.resolve(FP32_ONNX), imgsz, ev.device, threads)
    w_sess = None if skipped else open_onnx(cfg.resolve(W4A16_ONNX), imgsz, ev.device, threads)
    samples, names = read_split(cfg.resolve(DATASET_YAML), "val", require_labels=True)
    runners = {"fp32": onnx_runner(fp_sess)}
    if w_sess is not None:
        from yoloqat.quant.checkpoint import CheckpointError, load_qat_checkpoint

        try:
            qat_model, _ = load_qat_checkpoint(cfg.resolve(QAT_CHECKPOINT))
        except CheckpointError as exc:
            raise EvaluateError(f"evaluate: {exc}") from None
        k = w_sess.get_outputs()[0].shape[1]  # the rows the ONNX head keeps (pinned at export)
        max_det = k if isinstance(k, int) else cfg.export.max_det
        runners["w4a16"] = onnx_runner(w_sess)
        runners["pytorch_w4a16"] = torch_runner(qat_model, max_det, imgsz)

    preds = predict_split(runners, samples, imgsz, ev.batch, ev.conf)
    scores = {k: detection_metrics(samples, d, names) for k, d in preds.items()}

    onnx_runners = {k: v for k, v in runners.items() if k in ("fp32", "w4a16")}
    if w_sess is not None:
        folded = open_onnx(cfg.resolve(W4A16_ONNX), imgsz, ev.device, threads, fold_dequantize=True)
        onnx_runners["w4a16_prefolded"] = onnx_runner(folded)
    x1 = letterbox_batch(samples[:1], imgsz)
    x8 = letterbox_batch([samples[i % len(samples)] for i in range(THROUGHPUT_BATCH)], imgsz)
    lat = measure_speed(onnx_runners, x1, ev.latency_warmup, ev.latency_runs)
    thr = measure_speed(onnx_runners, x8, ev.latency_warmup, ev.latency_runs)

    fp_size = cfg.resolve(FP32_ONNX).stat().st_size
    m: dict[str, Any] = {
        "status": "skipped_diverged" if skipped else "evaluated",
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
    m.update(
        {
            "conf": ev.conf,
            "imgsz": imgsz,
            "device": ev.device,
            "providers": fp_sess.get_providers(),
            "ort_intra_op_threads": threads,
            "latency_warmup": ev.latency_warmup,
            "latency_runs": ev.latency_runs,
            "throughput_batch": THROUGHPUT_BATCH,
            "seconds": round(time.time() - t0, 1),
        }
    )

    out = cfg.resolve(RESULTS_DIR)
    fresh_outputs(out)
    _write_compact_json(out / "ground_truth_coco.json", coco_ground_truth(samples, names))
    for key in ("fp32", "w4a16"):
        # A diverged run has no W4A16 model: an empty list keeps the DVC outputs complete.
        rows = coco_predictions(samples, preds[key]) if key in preds else []
        _write_compact_json(out / f"predictions_{key}.json", rows)
    write_json(out / "metrics.json", m)
    write_json(out / "metadata.json", run_metadata(cfg, "evaluate", ev.device, {"summary": m}))
    print(format_table(m))
    return m
