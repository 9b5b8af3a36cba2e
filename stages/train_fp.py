"""DVC stage train_fp: the float YOLOv10 baseline -> models/fp, results/train_fp."""

from pathlib import Path

from yoloqat.stage import run_stage


def job(cfg):
    from yoloqat.fp import train_fp

    train_fp(cfg)


if __name__ == "__main__":
    raise SystemExit(
        run_stage("train_fp", job, lambda cfg: [Path("models/fp"), Path("results/train_fp")])
    )
