"""YOLOv10's end-to-end head for export and for PyTorch references run the same way.

What Ultralytics' exporter does for ``format=onnx, nms=False``: select the one-to-one branch,
static anchors, ``(N, max_det, 6)`` rows of ``x1, y1, x2, y2, score, class`` in input pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from yoloqat.errors import ExportError


def anchors_at(model: nn.Module, imgsz: int) -> int:
    return sum(int(imgsz / s) * int(imgsz / s) for s in model.stride.tolist())


def prepare_end2end(model: nn.Module, imgsz: int, max_det: int, export: bool) -> nn.Module:
    """Select YOLOv10's one-to-one head, in place: output ``(N, min(max_det, anchors), 6)``.

    ``export=True`` also removes the unused one-to-many branch and sets the head's export flags
    as ``ultralytics.engine.exporter`` does for ONNX (end2end on, static anchors, xyxy boxes from
    the one-to-one decode, ``max_det`` clamped to the anchor count).
    """
    from ultralytics.nn.modules import C2f, Detect

    head = model.model[-1]
    if not isinstance(head, Detect) or getattr(head, "one2one_cv2", None) is None:
        raise ExportError(
            f"the model head is {type(head).__name__} without a one-to-one branch;"
            " the end-to-end (N, max_det, 6) export needs a YOLOv10 v10Detect head"
        )
    model.end2end = True
    k = min(max_det, anchors_at(model, imgsz))
    for m in model.modules():
        if isinstance(m, Detect):
            m.max_det = k
            m.agnostic_nms = False
            m.xyxy = False
            m.shape = None
            if export:
                m.dynamic = False  # static H, W: anchors become constants; the batch stays dynamic
                m.export = True
                m.format = "onnx"
        elif export and isinstance(m, C2f):
            m.forward = m.forward_split  # type: ignore[method-assign]
    if export and head.cv2 is not None:
        head.fuse()  # drops the one-to-many branch (end2end is already on)
    return model


def torch_end2end(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a model prepared by :func:`prepare_end2end` and return its ``(N, k, 6)`` output."""
    with torch.inference_mode():
        y = model(x)
    return y[0] if isinstance(y, (tuple, list)) else y


def torch_end2end_dense(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(N, k, 6)`` end-to-end rows and the dense ``(N, anchors, 4 + nc)`` decode they come from.

    The model must be prepared with ``export=False`` (it then also returns the raw head dict).
    """
    head = model.model[-1]
    with torch.inference_mode():
        y, raw = model(x)
        dense = head._inference(raw["one2one"]).permute(0, 2, 1)
    return y.numpy(), dense.numpy()
