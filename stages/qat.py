"""DVC stage qat: W4A16 QAT from models/fp (or scratch) -> models/qat, results/qat."""

from pathlib import Path

from yoloqat.stage import run_stage


def job(cfg):
    from yoloqat.qat import train_qat

    train_qat(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage("qat", job, lambda cfg: [Path("models/qat"), Path("results/qat")]))
