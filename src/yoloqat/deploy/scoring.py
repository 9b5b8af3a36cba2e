"""Detections from end-to-end rows, mAP with Ultralytics' matcher and DetMetrics, COCO JSON."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from yoloqat.data.splits import Sample, letterbox_batch


@dataclass
class Detections:
    boxes: np.ndarray  # (K, 4) float32 xyxy, original pixels
    scores: np.ndarray  # (K,) float32, descending
    classes: np.ndarray  # (K,) int64



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
