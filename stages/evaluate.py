"""DVC stage evaluate: mAP, size and latency of models/onnx/{w4a16,fp32}.onnx on the val split,
plus the fake-quant PyTorch parity check -> results/evaluate (metrics.json, COCO JSON files)."""

from yoloqat.paths import EVALUATE_RESULTS
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    # imported here, not at the top: a bad params.yaml fails before torch loads
    from yoloqat.pipeline.evaluate import evaluate_models

    evaluate_models(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage(
        "evaluate", job, lambda cfg: [EVALUATE_RESULTS], devices=["evaluate.device"]
    ))
