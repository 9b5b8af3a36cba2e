"""DVC stage qat: W4A16 QAT from models/fp (or scratch) -> models/qat, results/qat."""

from yoloqat.paths import QAT_DIR, QAT_RESULTS
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    # imported here, not at the top: a bad params.yaml fails before torch loads
    from yoloqat.pipeline.qat import train_qat

    train_qat(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage("qat", job, lambda cfg: [QAT_DIR, QAT_RESULTS], devices=["device"]))
