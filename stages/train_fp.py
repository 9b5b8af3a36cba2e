"""DVC stage train_fp: the float YOLOv10 baseline -> models/fp, results/train_fp."""

from yoloqat.paths import FP_DIR, FP_RESULTS
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    # imported here, not at the top: a bad params.yaml fails before torch loads
    from yoloqat.pipeline.train_fp import train_fp

    train_fp(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage(
        "train_fp", job, lambda cfg: [FP_DIR, FP_RESULTS], devices=["device"]
    ))
