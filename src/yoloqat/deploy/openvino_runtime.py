"""OpenVINO (CPU plugin): the second runtime the exported ONNX files are compiled and run in.

OpenVINO is an optional extra (``pip install -e '.[openvino]'``); asking for it without it
installed is a one-line EvaluateError.  The model is compiled from the ONNX file as written
(no conversion step, no cache), so what runs is exactly what the export stage verified.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from yoloqat.errors import EvaluateError

DEVICE = "CPU"  # OpenVINO's GPU plugin is for Intel GPUs; CUDA machines run it on the CPU too


def openvino_version() -> str | None:
    """The installed OpenVINO version, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def compile_openvino(path: Path, threads: int) -> Any:
    """An OpenVINO CPU compiled model of an ONNX file, or a one-line EvaluateError."""
    if openvino_version() is None:
        raise EvaluateError(
            "evaluate.runtimes includes openvino but OpenVINO is not installed;"
            " pip install -e '.[openvino]' or remove openvino from evaluate.runtimes"
        )
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"ONNX model {str(path)!r} not found; run the export stage")
    config = {
        # W4A16 means float activations, as in PyTorch and onnxruntime: OpenVINO would otherwise
        # run bf16 on CPUs that have it, and quantize the activations of int-weight 1x1 convs
        # (turned into MatMuls) to int8 on the fly (measured: boxes 0.07 px off vs 1e-4).
        hints.inference_precision: ov.Type.f32,
        hints.dynamic_quantization_group_size: 0,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        props.inference_num_threads: threads,  # as many as onnxruntime gets
    }
    try:
        core = ov.Core()
        return core.compile_model(core.read_model(str(path)), DEVICE, config)
    except Exception as exc:  # noqa: BLE001  (OpenVINO raises untyped multi-line C++ errors)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # the first lines are OpenVINO source locations; the cause is the last one with content
        cause = lines[-1][:200] if lines else type(exc).__name__
        raise EvaluateError(f"OpenVINO cannot compile {str(path)!r} ({cause})") from None


def openvino_runner(compiled: Any) -> Callable[[np.ndarray], np.ndarray]:
    request = compiled.create_infer_request()
    return lambda x: request.infer(x)[0]  # share_outputs=False (default): a fresh array per call
