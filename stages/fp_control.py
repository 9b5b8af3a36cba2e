"""DVC stage fp_control: "FP continued" for QAT's epochs and optimizer -> models/fp_control."""

from yoloqat.paths import FP_CONTROL_DIR, FP_CONTROL_RESULTS
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    # imported here, not at the top: a bad params.yaml fails before torch loads
    from yoloqat.pipeline.train_fp import train_fp_control

    train_fp_control(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage(
        "fp_control", job, lambda cfg: [FP_CONTROL_DIR, FP_CONTROL_RESULTS], devices=["device"]
    ))
