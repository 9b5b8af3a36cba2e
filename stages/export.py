"""DVC stage export: models/qc/best.qat.pt -> models/onnx/w4a16.onnx (INT4 weights), and the
FP32 baseline models/fp/best.pt -> models/onnx/fp32.onnx; figures in results/export.

A diverged QAT run (results/qat/metrics.json status "diverged", or non-finite weights) exports
the FP32 model only and writes {"status": "skipped_diverged", ...}; it still exits 0.
"""

from yoloqat.paths import EXPORT_RESULTS, ONNX_DIR
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    # imported here, not at the top: a bad params.yaml fails before torch loads
    from yoloqat.pipeline.export import export_models

    export_models(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage("export", job, lambda cfg: [ONNX_DIR, EXPORT_RESULTS]))
