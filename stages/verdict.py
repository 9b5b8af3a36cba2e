"""DVC stage verdict: results/qat (+ evaluate, train_fp) -> results/verdict/metrics.json."""

from yoloqat.paths import VERDICT_RESULTS
from yoloqat.pipeline.stage import run_stage


def job(cfg):
    # imported here, not at the top: a bad params.yaml fails before torch loads
    from yoloqat.pipeline.verdict import judge_qat_run

    judge_qat_run(cfg)


if __name__ == "__main__":
    raise SystemExit(run_stage("verdict", job, lambda cfg: [VERDICT_RESULTS]))
