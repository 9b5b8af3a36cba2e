"""onnxruntime sessions, model runners, parity and speed: one place for how models are run.

:func:`open_session` is the only ONNX Runtime session builder; export (parity) and evaluate
(mAP, latency) both use it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from yoloqat.errors import EvaluateError


def onnxruntime_module() -> Any:
    """The installed onnxruntime (CPU or GPU build), or a one-line error saying how to get it."""
    try:
        import onnxruntime
    except ImportError:
        raise EvaluateError(
            "onnxruntime is not installed; install one build: pip install -e '.[cpu]' "
            "(or '.[gpu]' for CUDA, never both)"
        ) from None
    return onnxruntime


CUDA_PROVIDER_MISSING = (
    "evaluate: CUDAExecutionProvider not available (pip install -e '.[gpu]'); "
    "running onnxruntime on CPU"
)


def ort_device(requested: str) -> str:
    """The device onnxruntime will really use for ``evaluate.device``: ``cuda`` only when this
    onnxruntime build has the CUDA provider; otherwise ``cpu``, said in one line (a CPU-only
    onnxruntime on a GPU machine is a set-up choice, not a reason to lose the run)."""
    if requested != "cuda":
        return "cpu"
    if "CUDAExecutionProvider" in onnxruntime_module().get_available_providers():
        return "cuda"
    print(CUDA_PROVIDER_MISSING)
    return "cpu"


def providers_for(device: str) -> list[str]:
    ort = onnxruntime_module()

    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EvaluateError(
                "evaluate.device=cuda but onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
                " or set evaluate.device=cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(
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

    ort = onnxruntime_module()
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"ONNX model {str(path)!r} not found; run the export stage")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        if not proto.graph.node:
            raise ValueError("empty graph")
    except Exception as exc:  # noqa: BLE001  (protobuf raises DecodeError and friends)
        raise EvaluateError(
            f"{str(path)!r} is not a valid ONNX model ({type(exc).__name__})"
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
        raise EvaluateError(f"onnxruntime cannot load {str(path)!r} ({first})") from None
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        # onnxruntime-gpu drops the provider (with its own warning) when CUDA or cuDNN libraries
        # do not load; the run then is a CPU run, and its latency must not be read as GPU's.
        print(f"evaluate: onnxruntime could not start CUDA for {path.name}; it runs on CPU")
    inp, out = sess.get_inputs(), sess.get_outputs()
    in_shape = inp[0].shape if len(inp) == 1 else None
    if in_shape is None or len(in_shape) != 4 or in_shape[2:] != [imgsz, imgsz]:
        raise EvaluateError(
            f"{str(path)!r} takes input {in_shape}, expected (N, 3, {imgsz}, {imgsz});"
            " re-run the export stage with the same data.imgsz"
        )
    out_shape = out[0].shape if len(out) == 1 else None
    last = out_shape[-1] if out_shape is not None and len(out_shape) == 3 else -1
    if not (last == 6 or last is None or isinstance(last, str)):  # symbolic dims are accepted
        raise EvaluateError(
            f"{str(path)!r} is not an end-to-end detector (output {out_shape},"
            " expected (N, max_det, 6))"
        )
    return sess


def onnx_runner(sess: Any) -> Callable[[np.ndarray], np.ndarray]:
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def torch_runner(model: Any, max_det: int, imgsz: int) -> Callable[[np.ndarray], np.ndarray]:
    """The fake-quant PyTorch model (changed in place) with the export's end-to-end head."""
    import torch

    from yoloqat.deploy.head import prepare_end2end, torch_end2end

    m = prepare_end2end(model.float().cpu().eval(), imgsz, max_det, export=False)
    return lambda x: torch_end2end(m, torch.from_numpy(x)).numpy()


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


def compare_end2end(out: np.ndarray, ref: np.ndarray, dense: np.ndarray) -> dict[str, Any]:
    """Compare an exported ``(N, k, 6)`` output with a PyTorch reference.

    ``raw`` is the element-wise max |out - ref| in row order.  Top-k may order rows whose scores
    tie within float rounding differently (an untrained model ties almost everywhere), so the
    reported ``max_abs_diff`` is order-free: (a) each exported row is matched to the reference's
    dense pre-top-k prediction of the same class at the closest anchor, max |box, score| over
    rows; (b) the sorted top-k scores of both outputs, element-wise.  A wrong weight shows up in
    (a) as a row with no close anchor or in (b) as a shifted score.
    """
    raw = float(np.abs(out - ref).max()) if out.size else 0.0
    row_diff = score_diff = 0.0
    same_order = 0
    for o, r, d in zip(out, ref, dense, strict=True):
        same_order += int(np.array_equal(o[:, 5], r[:, 5]) and np.abs(o - r).max(initial=0) < 1e-3)
        cls = o[:, 5].astype(np.int64)
        box_d = np.abs(o[:, None, :4] - d[None, :, :4]).max(-1)  # (k, anchors)
        score_d = np.abs(o[:, None, 4] - d[:, 4 + cls].T)  # (k, anchors) same class
        row_diff = max(row_diff, float(np.maximum(box_d, score_d).min(1).max(initial=0)))
        score_diff = max(
            score_diff, float(np.abs(np.sort(o[:, 4]) - np.sort(r[:, 4])).max(initial=0))
        )
    return {
        "raw": raw,
        "max_abs_diff": max(row_diff, score_diff),
        "row_to_anchor": row_diff,
        "sorted_scores": score_diff,
        "images_same_order": same_order,
        "images": len(out),
    }
