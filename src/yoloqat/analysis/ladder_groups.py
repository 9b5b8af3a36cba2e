"""The ladder's evidence: runs grouped by model and setting, each seed's curves merged.

Grouping.  Runs are grouped by model and *setting*: every param of the run except ``seed``,
the method switches ``ema`` and ``qc``, and the params that do not change a run (``device``,
``evaluate.*``, ``ladder.*``).  Runs whose settings differ in anything else (epochs, lr,
``data.*``, EMA decay, bits, stability thresholds, ...) are never pooled.  Within a setting each
seed counts once: records are merged per seed (an ``ema=true`` run gives the live and the EMA
curve, a ``qc=true`` run the QC delta); among duplicates the judged, newest experiment wins.
A failed experiment is listed as failed and never judged, even when DVC shows its baseline's
metrics; a run whose verdict lacks the paired curves (made before they were logged) is shown
as "no live curve".

Per setting, over seeds: the *control* is the live curve (the training trajectory itself; for
``ema=false`` runs it is the deployed curve), the *method* the EMA + QC curve: the EMA model
after QC at every epoch (``qat.repair_curves`` with ``qc``), what would be deployed at each
epoch.  Runs that did not log it fall back to the EMA curve, and the output names the curve
it decided on; every other curve of the run (EMA, each repair of each model) is kept per seed.  A curve *fails* when its verdict is
not ``stable``; a ``too_short`` curve (no more epochs than ``stability.grace_epochs``) is neither
stable nor failed and is left out of every count (its seed is not queued again: the same setting
would give the same short curve).  Reported: failures of each, the paired one-sided exact McNemar p-value that
EMA fails less often than live, mean max drawdown, and QC delta mean +- std with the number of
seeds it improved.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoloqat.analysis.exp_curves import fp_control_ran, fp_control_series, run_curves
from yoloqat.analysis.paired import PairedOutcome, paired_outcome
from yoloqat.analysis.records import (
    FAILED,
    PENDING,
    Curves,
    ExpRecord,
    is_setting_param,
    resolved_params,
)
from yoloqat.analysis.rejudge import verdict_now
from yoloqat.config import MODELS
from yoloqat.curves.compare import CURVE_ROWS
from yoloqat.curves.keys import curve_key
from yoloqat.curves.stability import STABLE, TOO_SHORT, mean_std
from yoloqat.errors import ExperimentsError
from yoloqat.numbers import finite_number

RUNGS = MODELS  # yolo10n, yolo10s, yolo10m
CurvesOf = Callable[[ExpRecord], Curves]  # a run's curves (exp_curves.run_curves)
# What the ladder varies within a setting (the seeds, EMA / QC on or off of one seed's runs) and
# across rungs (the model): kept out of a Setting's values, which hold every other setting param
# (records.is_setting_param).  fp.seed is a seed too: a grid over QAT seeds from one FP model
# (fp.seed fixed) and runs whose FP seed follows seed (fp.seed null) draw from the same setting,
# and seed 0 with fp.seed null is the very run seed 0 with fp.seed 0.
POOLED_AXES = frozenset({"seed", "fp.seed", "ema", "qc", "model"})


def _text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# --------------------------------------------------------------------------------------------
# settings and per-seed runs


@dataclass(frozen=True)
class Setting:
    model: str
    values: tuple[tuple[str, str], ...]  # every setting param, sorted, as text

    def describe(self, keys: Iterable[str]) -> str:
        """The params in ``keys`` (those that tell groups apart), after the preset the setting
        was made from unless that is ``none``: ``default`` for the plain default."""
        d = dict(self.values)
        keys = list(keys)
        preset = [] if "preset" in keys or d.get("preset", "none") == "none" else ["preset"]
        shown = [f"{k}={d.get(k, '-')}" for k in preset + keys]
        return " ".join(shown) if shown else "default"


def setting_values(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(
        (k, _text(v)) for k, v in params.items()
        if is_setting_param(k) and k not in POOLED_AXES and v is not None
    ))


def setting_of(rec: ExpRecord) -> Setting | None:
    p = resolved_params(rec.params)  # a preset's values, not the defaults params.yaml shows
    if not isinstance(p.get("model"), str) or not isinstance(p.get("ema"), bool):
        return None
    if not isinstance(p.get("qc"), bool):
        return None
    return Setting(p["model"], setting_values(p))


@dataclass(frozen=True)
class CurveResult:
    label: str
    best: float | None
    final: float | None
    max_drawdown: float | None
    collapse_events: int
    reason: str

    @property
    def judged(self) -> bool:
        """False for a curve too short to judge: it is evidence of nothing."""
        return self.label != TOO_SHORT

    @property
    def failed(self) -> bool:
        return self.judged and self.label != STABLE

    @property
    def severity(self) -> int:
        """How badly the curve failed: stable 0, unstable (and any other label) 1, collapsed
        2, diverged 3."""
        return _SEVERITY.get(self.label, 1)


_SEVERITY = {STABLE: 0, "collapsed": 2, "diverged": 3}


def _curve(v: dict[str, Any], prefix: str) -> CurveResult | None:
    label = v.get(f"{prefix}label")
    if not isinstance(label, str):
        return None
    return CurveResult(
        label=label, best=finite_number(v.get(f"{prefix}best")),
        final=finite_number(v.get(f"{prefix}final")),
        max_drawdown=finite_number(v.get(f"{prefix}max_drawdown")),
        collapse_events=int(v.get(f"{prefix}collapse_events") or 0),
        reason=str(v.get(f"{prefix}reason") or ""),
    )


@dataclass
class SeedRun:
    seed: int
    names: list[str] = field(default_factory=list)  # the experiments it was merged from
    live: CurveResult | None = None  # the control curve
    ema: CurveResult | None = None  # the method curve: EMA + QC per epoch where it was logged
    method: str = ""  # which curve ``ema`` is: METHOD_EMA_QC, or METHOD_EMA (no QC curve)
    # every other judged curve of the run by verdict prefix (ema, live_bnre, ema_bnre_qc, ...)
    others: dict[str, CurveResult] = field(default_factory=dict)
    # the FP-continued control of the same seed (fp.control: QAT's recipe, no quantization),
    # judged by today's rules from its curve; None where none was trained
    fp_control: CurveResult | None = None
    qc_delta: float | None = None
    w4a16: float | None = None
    gap: float | None = None  # FP reference (control when trained) minus W4A16, onnxruntime
    note: str = ""


def live_failed_beyond_fp(run: SeedRun) -> bool:
    """The live curve failed, and worse than the same seed's FP-continued control (when one
    was trained): a failure the unquantized model shows as badly under the same recipe is the
    recipe's, not quantization's."""
    if run.live is None or not run.live.failed:
        return False
    fp = run.fp_control
    return fp is None or not fp.judged or run.live.severity > fp.severity


def _is_failed(rec: ExpRecord) -> bool:
    return rec.state == FAILED or bool(rec.error)


def _seed(rec: ExpRecord) -> int | None:
    s = rec.params.get("seed")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


_KIND_RANK = {"experiment": 2, "baseline": 1, "workspace": 0}


def _newest_first(recs: Iterable[ExpRecord]) -> list[ExpRecord]:
    return sorted(recs, key=lambda r: (_KIND_RANK.get(r.kind, 0), r.timestamp or ""), reverse=True)


# The method's curve: EMA + QC at every epoch (qat.repair_curves with qc), the model that would
# be deployed; runs without it fall back to the EMA curve, and the output says which it was.
METHOD_EMA_QC, METHOD_EMA = "EMA+QC", "EMA"
OTHER_CURVES = tuple(prefix for prefix, _ in CURVE_ROWS if prefix not in ("live", "ema_qc"))


def method_name(runs: Sequence[SeedRun]) -> str:
    """How the output names the method's curve over ``runs``."""
    kinds = {r.method for r in runs if r.ema is not None}
    if kinds <= {METHOD_EMA_QC}:
        return METHOD_EMA_QC
    if kinds == {METHOD_EMA}:
        return "EMA (no per-epoch QC curve: qat.repair_curves lacks qc)"
    return "EMA+QC or EMA (some seeds lack the per-epoch QC curve)"


def merge_order(recs: Iterable[ExpRecord]) -> list[ExpRecord]:
    """The order a seed's records give evidence in: EMA+QC runs first (the method), then
    EMA-only, then EMA-off controls; newest first within each."""
    return sorted(_newest_first(recs), key=lambda r: (not r.params["ema"], not r.params["qc"]))


def _rejudged(rec: ExpRecord, prefix: str, curves_of: CurvesOf) -> CurveResult | None:
    """A repair curve the run logged (``qat.repair_curves``) that its stored verdict has no
    label for (runs made before the verdict kept one): judged by today's rules, as the endpoint
    rows and the repair table judge it."""
    _, _, repair = prefix.partition("_")
    if repair not in (rec.params.get("qat.repair_curves") or ()):
        return None
    values = curves_of(rec).get("qat", {}).get(curve_key(prefix))
    return _judged_now(rec, values) if values else None


def _fp_control(rec: ExpRecord, curves_of: CurvesOf) -> CurveResult | None:
    """The run's FP-continued control curve judged by today's rules (the verdict stores no
    label for it); None when the run trained none or did not log it."""
    if not fp_control_ran(rec):
        return None  # asked first: reading a run's curves at its revision is slow
    values = fp_control_series(rec, curves_of(rec))
    return _judged_now(rec, values) if values else None


def _judged_now(rec: ExpRecord, values: Sequence[float | None]) -> CurveResult:
    verdict = verdict_now(rec, [math.nan if x is None else x for x in values])
    return CurveResult(
        label=verdict.label, best=finite_number(verdict.best), final=finite_number(verdict.final),
        max_drawdown=finite_number(verdict.max_drawdown),
        collapse_events=verdict.collapse_events, reason=verdict.reason,
    )


def merge_seed(seed: int, recs: Sequence[ExpRecord], curves_of: CurvesOf = run_curves) -> SeedRun:
    """One seed's evidence from its judged records; each field from the first record that has
    it, in the order EMA+QC, EMA only, EMA off (newest first within each).  A repair curve
    without a stored label is judged from the run's curves (``curves_of``) by today's rules."""
    run = SeedRun(seed)
    lacks_live = False
    for rec in merge_order(recs):
        v = rec.verdict
        run.names.append(rec.name)
        if rec.params["ema"]:
            method = _curve(v, "ema_qc_") or _rejudged(rec, "ema_qc", curves_of)
            ema = _curve(v, "ema_") or (_curve(v, "") if "live_label" not in v else None)
            if run.ema is None and (method or ema):
                run.ema, run.method = (method, METHOD_EMA_QC) if method else (ema, METHOD_EMA)
            for name in OTHER_CURVES:
                curve = _curve(v, f"{name}_")
                if curve is None and "_" in name:
                    curve = _rejudged(rec, name, curves_of)
                if curve is not None:
                    run.others.setdefault(name, curve)
            lacks_live = lacks_live or "live_label" not in v
            run.live = run.live or _curve(v, "live_")
        else:
            run.live = run.live or _curve(v, "live_") or _curve(v, "")
        if run.fp_control is None:
            run.fp_control = _fp_control(rec, curves_of)
        if rec.params["qc"] and run.qc_delta is None:
            run.qc_delta = finite_number(v.get("qc_delta_mAP50-95"))
        run.w4a16 = run.w4a16 if run.w4a16 is not None else finite_number(v.get("w4a16_mAP50-95"))
        run.gap = run.gap if run.gap is not None else finite_number(v.get("gap_mAP50-95"))
    if run.live is None and lacks_live:
        run.note = "no live curve"
    return run


# --------------------------------------------------------------------------------------------
# groups


@dataclass
class Group:
    setting: Setting
    runs: list[SeedRun]  # judged seeds, by seed
    pending: list[tuple[str, int]] = field(default_factory=list)  # (experiment, seed)
    failed: list[tuple[str, int]] = field(default_factory=list)
    unjudged: list[tuple[str, int]] = field(default_factory=list)
    records: list[ExpRecord] = field(default_factory=list, repr=False)  # judged, for curves

    @property
    def model(self) -> str:
        return self.setting.model

    def ema_runs(self) -> list[SeedRun]:
        """Seeds whose EMA curve was judged (a too_short one was not)."""
        return [r for r in self.runs if r.ema is not None and r.ema.judged]

    def too_short(self) -> list[SeedRun]:
        return [r for r in self.runs if r.ema is not None and not r.ema.judged]

    def paired(self) -> PairedOutcome:
        return paired_outcome([(r.live.failed, r.ema.failed) for r in self.runs
                               if r.live is not None and r.ema is not None
                               and r.live.judged and r.ema.judged])

    def stats(self) -> dict[str, Any]:
        live = [r.live for r in self.runs if r.live is not None and r.live.judged]
        ema = [r.ema for r in self.runs if r.ema is not None and r.ema.judged]
        qc = [r.qc_delta for r in self.runs if r.qc_delta is not None]
        w4 = [r.w4a16 for r in self.runs if r.w4a16 is not None]
        gaps = [r.gap for r in self.runs if r.gap is not None]

        def dd(curves: list[CurveResult]) -> float | None:
            vals = [c.max_drawdown for c in curves if c.max_drawdown is not None]
            return statistics.fmean(vals) if vals else None

        qc_mean, qc_std = mean_std(qc)
        w4_mean, w4_std = mean_std(w4)
        return {
            "seeds": [r.seed for r in self.runs],
            "live_n": len(live), "live_failed": sum(c.failed for c in live),
            "live_collapsed": sum(c.label == "collapsed" for c in live),
            "ema_n": len(ema), "ema_failed": sum(c.failed for c in ema),
            "ema_collapsed": sum(c.label == "collapsed" for c in ema),
            "ema_too_short": len(self.too_short()),
            "live_max_drawdown_mean": dd(live), "ema_max_drawdown_mean": dd(ema),
            "paired": self.paired().as_dict(),
            "qc_n": len(qc), "qc_delta_mean": qc_mean, "qc_delta_std": qc_std,
            "qc_improved": sum(1 for x in qc if x > 0),
            "w4a16_mean": w4_mean, "w4a16_std": w4_std,
            "gap_mean": mean_std(gaps)[0],
        }


def group_runs(records: Iterable[ExpRecord], curves_of: CurvesOf = run_curves) -> list[Group]:
    """One group per model and setting, in ladder order (``curves_of``: see :func:`merge_seed`)."""
    buckets: dict[Setting, list[ExpRecord]] = {}
    for rec in records:
        if rec.kind == "baseline":  # a plain commit is not an experiment of a setting
            continue
        setting = setting_of(rec)
        if setting is not None and _seed(rec) is not None:
            buckets.setdefault(setting, []).append(rec)
    groups = []
    for setting, recs in buckets.items():
        by_seed: dict[int, list[ExpRecord]] = {}
        pending, failed, unjudged, judged_recs = [], [], [], []
        for rec in recs:
            seed = _seed(rec)
            if _is_failed(rec):
                failed.append((rec.name, seed))
            elif rec.state in PENDING:
                pending.append((rec.name, seed))
            elif rec.label is not None:
                by_seed.setdefault(seed, []).append(rec)
                judged_recs.append(rec)
            elif "qat" in rec.metrics:
                unjudged.append((rec.name, seed))
        runs = [merge_seed(s, rs, curves_of) for s, rs in sorted(by_seed.items())]
        if runs or pending or failed or unjudged:
            groups.append(Group(setting, runs, sorted(pending), sorted(failed), sorted(unjudged),
                                judged_recs))
    return sorted(groups, key=lambda g: (_rung_rank(g.model), g.model, g.setting.values))


def committed_report_models(
    records: Sequence[ExpRecord], groups: Sequence[Group], out: str | Path
) -> tuple[list[str], list[str]]:
    """(models whose report may be written to the committed ``out``, models left out).

    The committed reports are evidence from DVC experiments.  A fresh clone has none (git does
    not clone them), only commits and the workspace, whose results would silently replace the
    committed reports with "incomplete (1/5 seeds)".  So a model's report goes to ``out`` only
    when ``dvc exp show`` listed an experiment of it; with none at all this raises an
    :class:`ExperimentsError` saying what was missing (an explicit ``--out`` skips this check).
    """
    with_exps = {st.model for r in records
                 if r.kind == "experiment" and (st := setting_of(r)) is not None}
    models = list(dict.fromkeys(g.model for g in groups))
    if not with_exps:
        exps = sum(r.kind == "experiment" for r in records)
        commits = sum(r.kind == "baseline" for r in records)
        what = (f"only {commits} git commit(s) and the workspace; DVC experiments are not cloned "
                "with git: dvc exp pull <remote>" if not exps else
                f"none of the {exps} names a model, ema, qc and seed")
        raise ExperimentsError(
            f"no DVC experiments found ({what}); {out} left as is: pass --out DIR to write a "
            "report there anyway, or --no-report")
    return [m for m in models if m in with_exps], [m for m in models if m not in with_exps]


def _rung_rank(model: str) -> int:
    return RUNGS.index(model) if model in RUNGS else len(RUNGS)


def differing_keys(groups: Sequence[Group]) -> list[str]:
    """The setting params whose values differ between groups (what tells them apart)."""
    keys: dict[str, set[str]] = {}
    for g in groups:
        d = dict(g.setting.values)
        for k in {k for gg in groups for k, _ in gg.setting.values}:
            keys.setdefault(k, set()).add(d.get(k, "-"))
    return sorted(k for k, vals in keys.items() if len(vals) > 1)
