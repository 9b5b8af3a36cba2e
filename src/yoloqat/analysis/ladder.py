"""The model ladder yolo10n -> yolo10s -> yolo10m: group runs by method, decide the next rung.

Grouping.  Records (from :mod:`yoloqat.experiments`) are grouped by model and method
``(ema, qc, bits, init)``.  Within a group each seed counts once: when several records share
a seed (the workspace and the experiment it came from, a committed copy, a rerun), the one
kept is, in order, the one with a verdict label, then a queued/running one, then one with
metrics but no verdict, then a failed one; ties go to experiments over baseline commits over
the workspace, then to the newest.  A run is *judged* when its verdict metrics carry a label.

Rung decision.  A rung (model) passes when its EMA+QC variant (ema=true, qc=true, bits 4,
init = params' ``qat.init``) has at least ``ladder.min_seeds`` judged seeds and every one of
them is ``stable``.  One judged seed with another label fails the rung, and the ladder stops
there (the method is not stable at that size).  The rungs are walked in order, so a later
rung is never recommended before every earlier one has passed.

Queueing.  ``--queue-next`` queues the next rung's whole ema x qc x seed grid in one
``dvc exp run --queue`` call; the seeds are the ``ladder.seeds`` that some grid variant still
lacks (neither judged nor queued).  dvc expands ``-S`` lists into a full product, so a
combination that already exists is queued again; the command says which.
"""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoloqat.analysis.experiments import FAILED, PENDING, ExpRecord, run_dvc
from yoloqat.config import (
    MODELS,
    LadderConfig,
    QATConfig,
    load_config_for,
)
from yoloqat.curves.stability import LABELS, Verdict, summarize_group
from yoloqat.numbers import finite_number, nan_if_none

RUNGS = MODELS  # yolo10n, yolo10s, yolo10m
RUNG_BITS = QATConfig().bits  # 4: the rung variant is W4A16
GRID = ((True, True), (True, False), (False, True), (False, False))  # (ema, qc)

# what a seed's chosen record says
JUDGED, PENDING_RUN, UNJUDGED, FAILED_RUN = "judged", "pending", "unjudged", "failed"
_STATUS_RANK = {JUDGED: 3, PENDING_RUN: 2, UNJUDGED: 1, FAILED_RUN: 0}
_KIND_RANK = {"experiment": 2, "baseline": 1, "workspace": 0}


def _bool_text(b: Any) -> str:
    return str(b).lower() if isinstance(b, bool) else str(b)


@dataclass(frozen=True, order=True)
class MethodKey:
    model: str
    ema: bool
    qc: bool
    bits: int
    init: str

    def sort_key(self) -> tuple:
        rank = RUNGS.index(self.model) if self.model in RUNGS else len(RUNGS)
        return (rank, self.model, not self.ema, not self.qc, self.bits, self.init)

    def variant(self) -> str:
        return f"ema={_bool_text(self.ema)} qc={_bool_text(self.qc)}"

    def describe(self) -> str:
        return f"{self.model} {self.variant()} bits={self.bits} init={self.init}"


def method_key(rec: ExpRecord) -> MethodKey | None:
    p = rec.params
    model, ema, qc, bits, init = (p.get(k) for k in ("model", "ema", "qc", "qat.bits", "qat.init"))
    if not isinstance(model, str) or not isinstance(ema, bool) or not isinstance(qc, bool):
        return None
    if isinstance(bits, bool) or not isinstance(bits, int):
        return None
    return MethodKey(model, ema, qc, bits, str(init) if init is not None else "fp")


def run_status(rec: ExpRecord) -> str | None:
    """judged | pending | unjudged | failed; None when the record is not a QAT run (a code
    commit, or a workspace / experiment that has no qat results, e.g. only train_fp ran)."""
    if rec.label is not None:
        return JUDGED
    if rec.state in PENDING:
        return PENDING_RUN
    if rec.state == FAILED:
        return FAILED_RUN
    return UNJUDGED if "qat" in rec.metrics else None


def _seed(rec: ExpRecord) -> int | None:
    s = rec.params.get("seed")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _priority(rec: ExpRecord, status: str) -> tuple:
    return (_STATUS_RANK[status], _KIND_RANK.get(rec.kind, 0), rec.timestamp or "")


def select_runs(records: Iterable[ExpRecord]) -> dict[MethodKey, dict[int, tuple[str, ExpRecord]]]:
    """method -> seed -> (status, record), one record per seed (see the module docstring)."""
    out: dict[MethodKey, dict[int, tuple[str, ExpRecord]]] = {}
    for rec in records:
        key, seed, status = method_key(rec), _seed(rec), run_status(rec)
        if key is None or seed is None or status is None:
            continue
        seeds = out.setdefault(key, {})
        old = seeds.get(seed)
        if old is None or _priority(rec, status) > _priority(old[1], old[0]):
            seeds[seed] = (status, rec)
    return out


# --------------------------------------------------------------------------------------------
# the table


def as_verdict(rec: ExpRecord) -> Verdict:
    """The record's verdict metrics as a :class:`Verdict` (best/final fall back to qat's)."""
    v, qat = rec.verdict, rec.metrics.get("qat", {})
    best = finite_number(v.get("best"))
    final = finite_number(v.get("final"))
    if best is None and "best" not in v:
        best = finite_number(qat.get("best"))
    if final is None and "final" not in v:
        final = finite_number(qat.get("final"))
    return Verdict(
        label=str(rec.label),
        epochs=int(v.get("epochs") or qat.get("epochs") or 0),
        best=nan_if_none(best),
        best_epoch=int(v.get("best_epoch") or 0),
        final=nan_if_none(final),
        final_over_best=nan_if_none(v.get("final_over_best")),
        max_drawdown=nan_if_none(v.get("max_drawdown")),
        collapse_events=int(v.get("collapse_events") or 0),
        epochs_collapsed=int(v.get("epochs_collapsed") or 0),
        swings=int(v.get("swings") or 0),
        reason=str(v.get("reason") or ""),
    )


def w4a16_map(rec: ExpRecord) -> float | None:
    """onnxruntime W4A16 mAP50-95 (evaluate stage, or the verdict's copy of it)."""
    ev = finite_number(rec.metrics.get("evaluate", {}).get("w4a16_mAP50-95"))
    return ev if ev is not None else finite_number(rec.verdict.get("w4a16_mAP50-95"))


def fp_best(rec: ExpRecord) -> float | None:
    v = finite_number(rec.verdict.get("fp_best"))
    return v if v is not None else finite_number(rec.metrics.get("train_fp", {}).get("best"))


def gap_to_fp(rec: ExpRecord) -> float | None:
    """FP best minus the QAT best (PyTorch val mAP50-95)."""
    gap = finite_number(rec.verdict.get("gap_to_fp"))
    if gap is not None:
        return gap
    fp, best = fp_best(rec), as_verdict(rec).best
    return fp - best if fp is not None and math.isfinite(best) else None


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) >= 2 else None)


@dataclass
class GroupRow:
    key: MethodKey
    runs: int  # judged seeds
    seeds: list[int]
    counts: dict[str, int]
    all_stable: bool
    best_mean: float | None
    best_std: float | None
    final_mean: float | None
    final_std: float | None
    w4a16_mean: float | None
    w4a16_std: float | None
    w4a16_runs: int
    gap_fp_mean: float | None
    fp_best_mean: float | None
    pending: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    unjudged: list[int] = field(default_factory=list)
    records: list[ExpRecord] = field(default_factory=list, repr=False)  # judged, by seed

    @property
    def model(self) -> str:
        return self.key.model

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.key.model, "ema": self.key.ema, "qc": self.key.qc,
            "bits": self.key.bits, "init": self.key.init, "runs": self.runs,
            "seeds": self.seeds, "counts": self.counts, "all_stable": self.all_stable,
            "best_mean": self.best_mean, "best_std": self.best_std,
            "final_mean": self.final_mean, "final_std": self.final_std,
            "w4a16_mean": self.w4a16_mean, "w4a16_std": self.w4a16_std,
            "w4a16_runs": self.w4a16_runs, "gap_fp_mean": self.gap_fp_mean,
            "fp_best_mean": self.fp_best_mean, "pending": self.pending, "failed": self.failed,
            "unjudged": self.unjudged, "experiments": [r.name for r in self.records],
        }


def group_rows(records: Iterable[ExpRecord]) -> list[GroupRow]:
    """One row per model and method, in ladder order (ema/qc on first)."""
    rows = []
    for key, seeds in select_runs(records).items():
        judged = [(s, rec) for s, (st, rec) in sorted(seeds.items()) if st == JUDGED]
        recs = [rec for _, rec in judged]
        summary = summarize_group([as_verdict(r) for r in recs])
        w4 = [x for x in (w4a16_map(r) for r in recs) if x is not None]
        gaps = [x for x in (gap_to_fp(r) for r in recs) if x is not None]
        fps = [x for x in (fp_best(r) for r in recs) if x is not None]
        w4_mean, w4_std = _mean_std(w4)
        rows.append(GroupRow(
            key=key,
            runs=summary["runs"],
            seeds=[s for s, _ in judged],
            counts=summary["counts"],
            all_stable=summary["all_stable"],
            best_mean=summary["best_mean"], best_std=summary["best_std"],
            final_mean=summary["final_mean"], final_std=summary["final_std"],
            w4a16_mean=w4_mean, w4a16_std=w4_std, w4a16_runs=len(w4),
            gap_fp_mean=_mean_std(gaps)[0], fp_best_mean=_mean_std(fps)[0],
            pending=sorted(s for s, (st, _) in seeds.items() if st == PENDING_RUN),
            failed=sorted(s for s, (st, _) in seeds.items() if st == FAILED_RUN),
            unjudged=sorted(s for s, (st, _) in seeds.items() if st == UNJUDGED),
            records=recs,
        ))
    return sorted(rows, key=lambda r: r.key.sort_key())


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return _fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std)}"


def counts_text(counts: dict[str, int]) -> str:
    parts = [f"{label} {n}" for label in LABELS if (n := counts.get(label, 0))]
    return ", ".join(parts) or "-"


TABLE_HEADER = (
    "model", "ema", "qc", "bits", "init", "runs", "verdicts", "best mAP50-95",
    "final mAP50-95", "ORT W4A16 mAP50-95", "gap to FP", "queued/running", "failed",
    "no verdict",
)


def table_cells(rows: Sequence[GroupRow]) -> list[list[str]]:
    out = []
    for r in rows:
        out.append([
            r.key.model, _bool_text(r.key.ema), _bool_text(r.key.qc), str(r.key.bits),
            r.key.init, str(r.runs), counts_text(r.counts), _pm(r.best_mean, r.best_std),
            _pm(r.final_mean, r.final_std), _pm(r.w4a16_mean, r.w4a16_std),
            _fmt(r.gap_fp_mean), str(len(r.pending)), str(len(r.failed)), str(len(r.unjudged)),
        ])
    return out


def format_table(rows: Sequence[GroupRow]) -> str:
    """Aligned plain-text table (means ± sample std over seeds)."""
    cells = [list(TABLE_HEADER), *table_cells(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def markdown_table(rows: Sequence[GroupRow]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the rung decision

PASSED, FAILED_RUNG, INCOMPLETE, NOT_STARTED = "passed", "failed", "incomplete", "not_started"


@dataclass
class Rung:
    model: str
    state: str  # passed | failed | incomplete | not_started
    judged: int  # judged seeds of the EMA+QC variant
    stable: int
    need: int
    counts: dict[str, int]
    pending: list[int]
    missing: list[str]  # grid variants with fewer than `need` judged seeds, as text
    missing_seeds: list[int]  # ladder seeds to queue so every grid variant has them
    existing_in_grid: list[str] = field(default_factory=list)  # queued again by that grid
    blocked_by: str | None = None  # an earlier rung that has not passed

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Decision:
    rungs: list[Rung]
    next_rung: str | None
    summary: str
    min_seeds: int
    seeds: list[int]
    init: str
    bits: int = RUNG_BITS

    def rung(self, model: str) -> Rung:
        return next(r for r in self.rungs if r.model == model)

    def lines(self) -> list[str]:
        out = [
            (f"Ladder {' -> '.join(RUNGS)}: a rung passes when ema=true qc=true "
             f"(bits={self.bits}, init={self.init}) has >= {self.min_seeds} judged seeds, "
             "all stable.")
        ]
        for r in self.rungs:
            if r.blocked_by:
                what = f"waiting for {r.blocked_by}"
            elif r.state == PASSED:
                what = f"passed ({r.stable}/{r.judged} seeds stable)"
            elif r.state == FAILED_RUNG:
                what = f"FAILED ({counts_text(r.counts)})"
            elif r.state == INCOMPLETE:
                what = f"incomplete ({r.judged}/{r.need} seeds judged, {r.stable} stable"
                what += f", {len(r.pending)} queued/running)" if r.pending else ")"
            else:
                what = "not started"
            out.append(f"  {r.model}: {what}")
        shown = [r for r in self.rungs if not r.blocked_by and r.missing]
        if shown:
            out.append("Missing variants:")
            out += [f"  {m}" for r in shown for m in r.missing]
        out.append(f"Next rung: {self.next_rung or 'none'}. {self.summary}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "next_rung": self.next_rung, "summary": self.summary, "min_seeds": self.min_seeds,
            "seeds": self.seeds, "bits": self.bits, "init": self.init,
            "rungs": [r.as_dict() for r in self.rungs],
        }


def _rung(model: str, rows: dict[MethodKey, GroupRow], cfg: LadderConfig, init: str) -> Rung:
    need = cfg.min_seeds
    main = rows.get(MethodKey(model, True, True, RUNG_BITS, init))
    counts = dict(main.counts) if main else {label: 0 for label in LABELS}
    judged = main.runs if main else 0
    stable = counts.get("stable", 0)
    pending = list(main.pending) if main else []
    if judged and stable < judged:
        state = FAILED_RUNG
    elif judged >= need:
        state = PASSED
    elif judged or pending:
        state = INCOMPLETE
    else:
        state = NOT_STARTED

    missing, missing_seeds = [], set()
    for ema, qc in GRID:
        row = rows.get(MethodKey(model, ema, qc, RUNG_BITS, init))
        n = row.runs if row else 0
        covered = set(row.seeds + row.pending) if row else set()
        missing_seeds |= {s for s in cfg.seeds if s not in covered}
        if n < need:
            text = f"{model} ema={_bool_text(ema)} qc={_bool_text(qc)}: {n}/{need} seeds"
            if row and row.pending:
                text += f" ({len(row.pending)} queued/running)"
            if row and row.failed:
                text += f" ({len(row.failed)} failed)"
            if (ema, qc) == (True, True):
                text += "  <- required to pass the rung"
            missing.append(text)
    existing = []
    for ema, qc in GRID:
        row = rows.get(MethodKey(model, ema, qc, RUNG_BITS, init))
        covered = set(row.seeds + row.pending) if row else set()
        existing += [f"ema={_bool_text(ema)} qc={_bool_text(qc)} seed={s}"
                     for s in sorted(missing_seeds & covered)]
    return Rung(
        model=model, state=state, judged=judged, stable=stable, need=need, counts=counts,
        pending=pending, missing=missing, missing_seeds=sorted(missing_seeds),
        existing_in_grid=existing,
    )


def decide(rows: Sequence[GroupRow], cfg: LadderConfig, init: str = "fp") -> Decision:
    by_key = {r.key: r for r in rows}
    rungs = [_rung(m, by_key, cfg, init) for m in RUNGS]
    next_rung: str | None = None
    summary = f"EMA+QC is stable on every rung ({', '.join(RUNGS)}): the ladder is complete."
    blocker: str | None = None
    for r in rungs:
        if blocker:
            r.blocked_by = blocker
            continue
        if r.state == PASSED:
            continue
        blocker = r.model
        if r.state == FAILED_RUNG:
            summary = (
                f"EMA+QC is not stable on {r.model} ({counts_text(r.counts)}); the ladder stops "
                "here: do not climb to a larger model."
            )
        else:
            next_rung = r.model
            have = f"{r.judged}/{r.need} judged EMA+QC seeds"
            if r.pending and not r.missing_seeds:
                summary = (f"{r.model} has {have}; {len(r.pending)} queued/running: "
                           "start or wait for the queue.")
            else:
                summary = f"{r.model} has {have}; run its grid next."
    return Decision(rungs, next_rung, summary, cfg.min_seeds, list(cfg.seeds), init)


# --------------------------------------------------------------------------------------------
# queueing the next rung


def queue_command(model: str, seeds: Sequence[int]) -> list[str]:
    """``dvc exp run --queue`` for the rung's ema x qc x seed grid (dvc expands the grid)."""
    return [
        "dvc", "exp", "run", "--queue", "-S", f"model={model}", "-S", "ema=true,false",
        "-S", "qc=true,false", "-S", "seed=" + ",".join(str(s) for s in seeds),
    ]


QUEUE_START = ["dvc", "queue", "start"]


def queue_next(
    decision: Decision,
    repo: str | Path = ".",
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[str] | None:
    """Queue the next rung's grid (one ``dvc exp run --queue`` call); returns the command,
    or None when there is nothing to queue."""
    if decision.next_rung is None:
        echo(f"nothing to queue: {decision.summary}")
        return None
    rung = decision.rung(decision.next_rung)
    if not rung.missing_seeds:
        echo(f"nothing to queue: every {rung.model} variant already has seeds "
             f"{','.join(map(str, decision.seeds))} judged or queued")
        return None
    cmd = queue_command(rung.model, rung.missing_seeds)
    if rung.existing_in_grid:
        grid = len(GRID) * len(rung.missing_seeds)
        echo(f"note: {len(rung.existing_in_grid)} of the {grid} grid runs already exist "
             f"(judged or queued): {', '.join(rung.existing_in_grid)}; dvc expands -S lists "
             "into the full grid")
    if dry_run:
        echo(f"would run: {shlex.join(cmd)}")
    else:
        echo(f"$ {shlex.join(cmd)}")
        out = run_dvc(cmd[1:], repo)
        for line in out.splitlines():
            if line.strip():
                echo(line.rstrip())
    echo(f"then start the queue: {shlex.join(QUEUE_START)}  (add -j N for N parallel workers)")
    return cmd


# --------------------------------------------------------------------------------------------
# params


def ladder_settings(params: str | Path) -> tuple[LadderConfig, str]:
    """(ladder config, qat.init) from a params file; defaults when it does not exist.  When
    something unrelated is invalid (e.g. a dataset path missing here) only the ladder block
    is validated."""
    cfg = load_config_for(params, "ladder", "qat")
    return cfg.ladder, cfg.qat.init


def ladder_json(rows: Sequence[GroupRow], decision: Decision) -> dict[str, Any]:
    return {"table": [r.as_dict() for r in rows], "decision": decision.as_dict()}

