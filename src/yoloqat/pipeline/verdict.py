"""The verdict stage: label the QAT run stable / collapsed / unstable / diverged / no_learning.

Reads what the qat stage wrote (DVCLive, ``dvcyaml=False``):

* ``results/qat/plots/metrics/val/mAP50-95.tsv``: validation mAP50-95 per epoch;
* ``results/qat/plots/metrics/train/*loss*.tsv``: training losses, summed per step;
* ``results/qat/metrics.json``: the run summary, whose ``status`` is ``completed`` or
  ``diverged``.

and, when present, ``results/evaluate/metrics.json`` (the onnxruntime W4A16 and FP32
mAP50-95 and their gap) and ``results/train_fp/metrics.json`` (the FP baseline's best).
The rules are :func:`yoloqat.stability.classify_run`'s; this module only gathers inputs and
writes ``results/verdict/metrics.json`` (plain JSON) with the verdict, the comparison numbers
and the params that identify the run, so ``dvc exp show`` and the ladder see everything in
one file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from yoloqat.config import Config
from yoloqat.curves.reader import DVCLIVE_MAP, read_curve
from yoloqat.curves.stability import classify_run
from yoloqat.errors import CurveError, VerdictError
from yoloqat.numbers import finite_number
from yoloqat.paths import (
    EVALUATE_METRICS,
    FP_METRICS,
    FP_RESULTS,
    QAT_METRICS,
    QAT_RESULTS,
    VERDICT_METRICS,
)
from yoloqat.pipeline.status import DIVERGED
from yoloqat.provenance import write_json

EVAL_FIELDS = ("gap_mAP50-95", "w4a16_mAP50-95", "fp32_mAP50-95")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerdictError(f"{path} ({what}) cannot be read: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise VerdictError(f"{path} ({what}) must hold a JSON object")
    return data


def _fp_best(cfg: Config) -> float | None:
    """The FP baseline's best val mAP50-95: its summary, else the max of its curve."""
    path = cfg.resolve(FP_METRICS)
    if path.is_file():
        best = finite_number(_read_json(path, "train_fp metrics").get("best"))
        if best is not None:
            return best
    curve_path = cfg.resolve(FP_RESULTS / DVCLIVE_MAP)
    if curve_path.is_file():
        try:
            values = [v for v in read_curve(curve_path).values if math.isfinite(v)]
        except CurveError:
            return None
        return max(values) if values else None
    return None


def _eval_fields(cfg: Config) -> dict[str, float]:
    path = cfg.resolve(EVALUATE_METRICS)
    if not path.is_file():
        return {}
    data = _read_json(path, "evaluate metrics")
    out: dict[str, float] = {}
    for key in EVAL_FIELDS:
        v = finite_number(data.get(key))
        if v is not None:
            out[key] = v
    return out


def run_params(cfg: Config) -> dict[str, Any]:
    """The params that name a run in the ladder (model, method, seed)."""
    return {
        "model": cfg.model,
        "ema": cfg.ema,
        "qc": cfg.qc,
        "seed": cfg.seed,
        "bits": cfg.qat.bits,
        "init": cfg.qat.init,
    }


def judge_qat_run(cfg: Config) -> dict[str, Any]:
    """Classify the qat stage's run and write ``results/verdict/metrics.json``.

    Raises :class:`VerdictError` when the qat outputs are missing.  A run whose summary says
    ``diverged`` is judged even without a curve (it may have diverged before the first
    validation)."""
    metrics_path = cfg.resolve(QAT_METRICS)
    if not metrics_path.is_file():
        raise VerdictError(f"{QAT_METRICS} not found; run the qat stage first (dvc repro qat)")
    qat = _read_json(metrics_path, "qat metrics")
    status = qat.get("status")
    if not isinstance(status, str):
        raise VerdictError(f"{QAT_METRICS} has no status; expected 'completed' or 'diverged'")

    live = cfg.resolve(QAT_RESULTS)
    curve: list[float] = []
    losses: list[float] | None = None
    if (live / DVCLIVE_MAP).is_file():
        try:
            run = read_curve(live)
        except CurveError as exc:
            raise VerdictError(str(exc)) from None
        curve, losses = run.values, run.losses
    elif status != DIVERGED:
        raise VerdictError(
            f"{QAT_RESULTS / DVCLIVE_MAP} not found; the qat stage logs val mAP50-95 per epoch there"
        )

    verdict = classify_run(curve, losses, cfg.stability, status)
    out: dict[str, Any] = {**verdict.as_dict(), "status": status, **run_params(cfg)}
    fp_best = _fp_best(cfg)
    if fp_best is not None:
        out["fp_best"] = fp_best
        if out.get("best") is not None:
            out["gap_to_fp"] = fp_best - out["best"]
    out.update(_eval_fields(cfg))
    write_json(cfg.resolve(VERDICT_METRICS), out)
    print(
        f"verdict: {cfg.model} ema={cfg.ema} qc={cfg.qc} seed={cfg.seed} -> {verdict.label} "
        f"({verdict.reason})"
    )
    return out
