"""DVC stage qc: Quantization Correction (or pass-through) -> models/qc, results/qc."""

from yoloqat.paths import QC_DIR, QC_RESULTS
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    # imported here, not at the top: a bad params.yaml fails before torch loads
    from yoloqat.pipeline.qc import run_qc

    run_qc(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage("qc", job, lambda cfg: [QC_DIR, QC_RESULTS], devices=["device"]))
