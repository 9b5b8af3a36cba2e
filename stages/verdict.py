"""DVC stage verdict: results/qat (+ evaluate, train_fp) -> results/verdict/metrics.json."""

from pathlib import Path

from yoloqat.stage import run_stage


def job(cfg):
    from yoloqat.verdict import judge_qat_run

    judge_qat_run(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage("verdict", job, lambda cfg: [Path("results/verdict")]))
