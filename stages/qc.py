"""DVC stage qc: Quantization Correction (or pass-through) -> models/qc, results/qc."""

from pathlib import Path

from yoloqat.stage import run_stage


def job(cfg):
    from yoloqat.qc import run_qc

    run_qc(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage("qc", job, lambda cfg: [Path("models/qc"), Path("results/qc")]))
