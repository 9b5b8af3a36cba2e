"""The verdict stage: label the QAT run stable / collapsed / unstable / diverged / no_learning
(or too_short: no more epochs than the grace epochs).  A run is judged from the end of its
warm-up: the grace epochs are ``max(stability.grace_epochs, ceil(qat.warmup_epochs))``
(:func:`yoloqat.curves.stability.after_warmup`).

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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yoloqat.config import Config, StabilityConfig
from yoloqat.curves.compare import (
    DIFFERENCE_FIELDS,
    curve_title,
    difference,
    difference_words,
    repair_curves,
)
from yoloqat.curves.keys import (
    BNRE,
    BNRE_PREFIX,
    EMA,
    LIVE,
    MAP,
    PRIMARY,
    PRIMARY_TSV,
    logged_repairs,
    model_key,
    repair_prefix,
    val_group,
)
from yoloqat.curves.reader import read_curve
from yoloqat.curves.stability import Verdict, after_warmup, classify_run, fall_epochs
from yoloqat.errors import CurveError, VerdictError
from yoloqat.numbers import finite_number
from yoloqat.paths import (
    EVALUATE_METRICS,
    FP_CONTROL_METRICS,
    FP_CONTROL_RESULTS,
    FP_METRICS,
    FP_RESULTS,
    QAT_METRICS,
    QAT_RESULTS,
    QC_METRICS,
    VERDICT_CURVES,
    VERDICT_CURVES_PNG,
    VERDICT_METADATA,
    VERDICT_METRICS,
)
from yoloqat.pipeline.status import DIVERGED
from yoloqat.provenance import read_metrics, write_json, write_metrics

EVAL_FIELDS = ("gap_mAP50-95", "w4a16_mAP50-95", "fp32_mAP50-95")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A stage's results (nested or flat metrics.json), or a one-line VerdictError."""
    try:
        return read_metrics(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VerdictError(f"{path} ({what}) cannot be read: {type(exc).__name__}") from None


def _fp_curve(cfg: Config) -> list[float]:
    """The FP baseline's per-epoch val mAP50-95 ([] when train_fp logged none)."""
    live = cfg.resolve(FP_RESULTS)
    if not (live / PRIMARY_TSV).is_file():
        return []
    try:
        return read_curve(live).values
    except CurveError as exc:
        raise VerdictError(str(exc)) from None


def _fp_best(cfg: Config, fp_curve: list[float]) -> float | None:
    """The FP baseline's best val mAP50-95: its summary, else the max of its curve."""
    path = cfg.resolve(FP_METRICS)
    if path.is_file():
        best = finite_number(_read_json(path, "train_fp metrics").get("best"))
        if best is not None:
            return best
    values = [v for v in fp_curve if math.isfinite(v)]
    return max(values) if values else None


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


PER_CURVE_FIELDS = ("label", "best", "best_epoch", "final", "max_drawdown", "collapse_events",
                    "dips", "reason")
CURVES_CSV_COLUMNS = ("epoch", "series", MAP)


def _curve_fields(prefix: str, verdict: Verdict | None) -> dict[str, Any]:
    if verdict is None:  # EMA off: the EMA curve does not exist
        return {f"{prefix}{k}": None for k in PER_CURVE_FIELDS}
    d = verdict.as_dict()
    return {f"{prefix}{k}": d[k] for k in PER_CURVE_FIELDS}


def _qc_delta(cfg: Config) -> float | None:
    """QC's own effect: mAP50-95 after minus before QC on the same checkpoint (qc stage)."""
    path = cfg.resolve(QC_METRICS)
    if not path.is_file():
        return None
    data = _read_json(path, "qc metrics")
    return finite_number(data.get("delta_mAP50-95")) if data.get("applied") else None


def _control(cfg: Config) -> tuple[float | None, list[float]]:
    """The FP-continued control's best and curve (None, [] when off or absent)."""
    path = cfg.resolve(FP_CONTROL_METRICS)
    if not path.is_file():
        return None, []
    best = finite_number(_read_json(path, "fp_control metrics").get("best"))
    live = cfg.resolve(FP_CONTROL_RESULTS)
    curve = read_curve(live).values if (live / PRIMARY_TSV).is_file() else []
    return best, curve


@dataclass(frozen=True)
class PlotSeries:
    """One line of the run's val mAP50-95 plot: its name, the QAT curve key (None for FP and
    FP continued), the epoch of its first value and its values (NaN where missing)."""

    name: str
    key: str | None
    first_epoch: int
    values: list[float]

    def points(self) -> list[tuple[int, float]]:
        """(epoch, value) for every epoch that has a finite value, and only those."""
        return [(self.first_epoch + i, v) for i, v in enumerate(self.values) if math.isfinite(v)]


def plot_series(fp: list[float], control: list[float], series: dict[str, list[float]],
                ema: bool) -> list[PlotSeries]:
    """Every curve of the run on one epoch axis: FP's epochs 1..N first, then QAT's epoch k (and
    FP continued's) at N + k.  A curve is listed only when its stage logged it: no EMA line when
    EMA is off, no FP continued without the control, a repair curve only when it ran."""
    after = len(fp) + 1
    out = [PlotSeries("FP", None, 1, fp)] if fp else []
    if control:
        out.append(PlotSeries("FP continued", None, after, control))
    live = series.get(LIVE, [] if ema else series.get(PRIMARY, []))
    if live:
        out.append(PlotSeries("QAT live", LIVE, after, live))
    ema_curve = series.get(EMA, []) if ema else []
    if ema_curve:
        out.append(PlotSeries("QAT EMA", EMA, after, ema_curve))
    if series.get(BNRE):
        out.append(PlotSeries(f"QAT {curve_title(BNRE, ema)}", BNRE, after, series[BNRE]))
    for _model, _repair, key in repair_curves():
        if series.get(key):
            out.append(PlotSeries(f"QAT {curve_title(key)}", key, after, series[key]))
    return out


def write_curves_csv(path: Path, lines: list[PlotSeries]) -> None:
    """The plot data in long format, one row per curve and epoch that has a value (so no curve
    shows a value where its stage did not run): ``epoch,series,mAP50-95``."""
    rows = [",".join(CURVES_CSV_COLUMNS)]
    rows += [f"{epoch},{line.name},{value:.5f}" for line in lines for epoch, value in line.points()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


def _difference_fields(prefix: str, a: Verdict | None, b: Verdict | None) -> dict[str, Any]:
    """``<prefix>best`` / ``final`` / ``max_drawdown``: a minus b (None when either is absent)."""
    if a is None or b is None:
        return {f"{prefix}{f}": None for f in DIFFERENCE_FIELDS}
    return {f"{prefix}{f}": v for f, v in difference(a, b).items()}


def comparison_lines(cfg: Config, verdicts: dict[str, Verdict | None]) -> list[str]:
    """The run's answer in words: EMA vs live, then each repair that ran vs its model."""
    lines = []
    if cfg.ema and verdicts.get(EMA) is not None and verdicts.get(LIVE) is not None:
        lines.append(difference_words("EMA", "live", difference(verdicts[EMA], verdicts[LIVE])))
    for model, _repair, key in logged_repairs(cfg.ema, cfg.qat.repair_curves):
        judged, base = verdicts.get(key), verdicts.get(model_key(model))
        if judged is not None and base is not None:
            lines.append(difference_words(curve_title(key), curve_title(model_key(model)),
                                          difference(judged, base)))
    return lines


def judge_qat_run(cfg: Config) -> dict[str, Any]:
    """Classify every val curve of the qat run and write ``results/verdict/metrics.json``.

    ``label`` is the deployed curve's (EMA when on, live when off); ``live_label`` and
    ``ema_label`` (None when EMA is off) judge the paired curves of the same run.  Raises
    :class:`VerdictError` when the qat outputs are missing.  A run whose summary says
    ``diverged`` is judged even without a curve (it may have diverged before the first
    validation)."""
    metrics_path = cfg.resolve(QAT_METRICS)
    if not metrics_path.is_file():
        raise VerdictError(f"{QAT_METRICS} not found; run the qat stage first (dvc repro qat)")
    qat = _read_json(metrics_path, "qat metrics")
    status = qat.get("status")
    if not isinstance(status, str):
        raise VerdictError(f"{QAT_METRICS} has no status; expected 'completed' or 'diverged'")

    live_dir = cfg.resolve(QAT_RESULTS)
    series: dict[str, list[float]] = {}
    losses: list[float] | None = None
    if (live_dir / PRIMARY_TSV).is_file():
        try:
            run = read_curve(live_dir)
        except CurveError as exc:
            raise VerdictError(str(exc)) from None
        series, losses = run.series, run.losses
    elif status != DIVERGED:
        raise VerdictError(
            f"{QAT_RESULTS / PRIMARY_TSV} not found; the qat stage logs val mAP50-95 per epoch there"
        )
    if LIVE not in series and not cfg.ema:
        series[LIVE] = series.get(PRIMARY, [])  # EMA off: the deployed curve is the live one

    # judged from the end of warm-up: falls while the lr still ramps never count
    stab = after_warmup(cfg.stability, cfg.qat.warmup_epochs)

    def judge(key: str) -> Verdict:
        return classify_run(series.get(key, []), losses, stab, status)

    verdicts: dict[str, Verdict | None] = {PRIMARY: judge(PRIMARY), LIVE: judge(LIVE)}
    verdicts[EMA] = judge(EMA) if cfg.ema else None
    # BN re-estimation: its paired curve (the deployed weights, statistics re-estimated)
    verdicts[BNRE] = judge(BNRE) if cfg.qat.bn_reestimate > 0 and BNRE in series else None
    # the deployed label judges the curve of the checkpoint that is saved: with BN
    # re-estimation on, the checkpoints carry the re-estimated statistics
    primary = verdicts[BNRE] or verdicts[PRIMARY]
    assert primary is not None
    out: dict[str, Any] = {**primary.as_dict(), "status": status, **run_params(cfg),
                           "deployed_curve": val_group(BNRE_PREFIX) if verdicts[BNRE] else val_group()}
    out.update(_curve_fields("live_", verdicts[LIVE]))
    out.update(_curve_fields("ema_", verdicts[EMA]))
    # the answer as numbers: EMA minus live on the same training run (None when EMA is off)
    out.update(_difference_fields("ema_minus_live_", verdicts[EMA], verdicts[LIVE]))
    out.update(_curve_fields("bnre_", verdicts[BNRE]))
    # repair curves (qat.repair_curves): e.g. ema_qc_label, the EMA + QC curve's verdict, and
    # ema_qc_minus_ema_best, what the repair adds to its model
    for model, repair, key in logged_repairs(cfg.ema, cfg.qat.repair_curves):
        verdicts[key] = judge(key) if key in series else None
        prefix = repair_prefix(model, repair)
        out.update(_curve_fields(f"{prefix}_", verdicts[key]))
        out.update(_difference_fields(f"{prefix}_minus_{model}_", verdicts[key],
                                      verdicts[model_key(model)]))
    out["qc_delta_mAP50-95"] = _qc_delta(cfg)
    fp_curve = _fp_curve(cfg)  # read once: the FP best's fallback and the curves table
    fp_best = _fp_best(cfg, fp_curve)
    control_best, control_curve = _control(cfg)
    out["fp_best"] = fp_best
    out["fp_control_best"] = control_best
    reference = control_best if control_best is not None else fp_best
    if reference is not None and out.get("best") is not None:
        out["gap_to_fp"] = reference - out["best"]
    out.update(_eval_fields(cfg))
    lines = plot_series(fp_curve, control_curve, series, cfg.ema)
    write_curves_csv(cfg.resolve(VERDICT_CURVES), lines)
    from yoloqat.pipeline.verdict_plot import PlotLine, write_curves_png

    plotted = [PlotLine(line.name, line.points(), *_marks(line, verdicts, stab)) for line in lines]
    write_curves_png(cfg.resolve(VERDICT_CURVES_PNG), plotted, title=_plot_title(cfg, primary),
                     qat_start=len(fp_curve) + 1 if fp_curve else None)
    # results only in metrics.json; the run's params and the verdicts' reasons in metadata.json
    write_metrics(cfg.resolve(VERDICT_METRICS), "verdict", out)
    write_json(cfg.resolve(VERDICT_METADATA), out)
    ema_verdict, live_verdict = verdicts[EMA], verdicts[LIVE]
    assert live_verdict is not None
    ema_text = f", EMA curve {ema_verdict.label}" if ema_verdict is not None else ""
    print(
        f"verdict: {cfg.model} ema={cfg.ema} qc={cfg.qc} seed={cfg.seed} -> {primary.label} "
        f"({primary.reason}); live curve {live_verdict.label}{ema_text}"
    )
    for line in comparison_lines(cfg, verdicts):
        print(f"verdict: {line}")
    return out


def _marks(line: PlotSeries, verdicts: dict[str, Verdict | None],
           rules: StabilityConfig) -> tuple[str | None, list[int], list[int]]:
    """A QAT curve's verdict label and the epochs (on the plot's axis) where its collapses and
    dips begin, as the verdict counted them (``rules``: the ones it judged with); FP curves
    have none."""
    judged = verdicts.get(line.key) if line.key is not None else None
    if judged is None:
        return None, [], []
    falls = fall_epochs(line.values, rules)
    shift = line.first_epoch - 1
    return (judged.label, [e + shift for e in falls["collapses"]],
            [e + shift for e in falls["dips"] if e not in falls["collapses"]])


def _plot_title(cfg: Config, primary: Verdict) -> str:
    deployed = "EMA" if cfg.ema else "live"
    return (f"{cfg.model} W{cfg.qat.bits}A16, ema={str(cfg.ema).lower()}, "
            f"qc={str(cfg.qc).lower()}, seed {cfg.seed}: deployed ({deployed}) curve {primary.label}")
