"""The repair-curve table of archived runs: every QAT curve of each run (live, EMA, and each
repair of each model), judged with the current stability rules from the end of warm-up, with
its continuous endpoints.  It reads only the archive files (``yoloqat archive``), so the table is
regenerated from committed data: ``yoloqat repairs --from reports/collapse_repairs/runs``.

Why its own table: the ladder pools seeds by setting and decides a rung; this one shows, run by
run, what each repair made of each model at every epoch's checkpoint, which is what the repair
curves were built to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from yoloqat.analysis.archive_reader import read_archive
from yoloqat.analysis.endpoint_table import FP_CONTROL_ROW
from yoloqat.analysis.exp_curves import fp_control_series, run_curves
from yoloqat.analysis.records import REPAIR_CURVE_PARAMS, ExpRecord
from yoloqat.analysis.rejudge import current_label
from yoloqat.curves.compare import CURVE_ROWS
from yoloqat.curves.endpoints import endpoints, warmup_skip
from yoloqat.curves.keys import curve_key
from yoloqat.numbers import fixed

HEADER = "| run | curve | label (current rules) | best (epoch) | final | post-peak drawdown | mean after warm-up |"


def run_rows(rec: ExpRecord) -> list[str]:
    """One row per QAT curve of the run, then its FP-continued control (QAT's recipe, no
    quantization) when ``fp.control`` trained one."""
    warmup = float(rec.params.get("qat.warmup_epochs") or 0.0)
    curves = run_curves(rec)
    qat = curves.get("qat", {})
    named = [(name, qat.get(curve_key(prefix))) for prefix, name in CURVE_ROWS]
    named.append((FP_CONTROL_ROW, fp_control_series(rec, curves)))
    rows = []
    for name, values in named:
        if not values:
            continue
        label = current_label(rec, values)
        e = endpoints(values, warmup_skip(warmup))

        def f(x: float | None) -> str:
            return fixed(x, 3, nonfinite="nan")

        rows.append(f"| {rec.name} | {name} | {label} | {f(e.best)} ({e.best_epoch}) | "
                    f"{f(e.final)} | {f(e.drawdown)} | {f(e.auc)} |")
    return rows


def repair_table(records: Sequence[ExpRecord]) -> str:
    lines = [HEADER, "|" + "---|" * 7]
    for rec in sorted(records, key=lambda r: r.name):
        lines += run_rows(rec)
    return "\n".join(lines) + "\n"


COST_HEADER = ("| run | QAT epochs | qat stage (s) | repair curves (s) | repair_time_ratio "
               "| mechanism metrics (s) | side by side: over the run without curves |")

# params that may differ between a run with repair curves and its twin without them: the curves'
# own, and the preset that filled them (the twin spells its other keys out)
_REPAIR_ONLY_PARAMS = REPAIR_CURVE_PARAMS | {"preset"}


def _twins_without_curves(rec: ExpRecord, runs: Sequence[ExpRecord]) -> list[ExpRecord]:
    """The runs without repair curves whose resolved params equal ``rec``'s but for the
    params of the curves (and the preset that turned them on)."""
    if not rec.params.get("qat.repair_curves"):
        return []

    def rest(r: ExpRecord) -> dict:
        return {k: v for k, v in r.params.items() if k not in _REPAIR_ONLY_PARAMS}

    mine = rest(rec)
    return [r for r in runs if not r.params.get("qat.repair_curves") and r.params and rest(r) == mine]


def cost_table(records: Sequence[ExpRecord]) -> str:
    """Where each run's qat stage time went, from its ``metrics.json``: the repair curves'
    cost (the ratio is the stage's time over its time without them); a run without repair
    curves shows its stage time alone, and a run with them is divided by each such run of the
    same resolved params (side by side).  Empty when no run timed its repair curves."""
    timed = [r for r in sorted(records, key=lambda r: r.name) if "seconds" in r.metrics.get("qat", {})]
    if not any("repair_seconds" in r.metrics["qat"] for r in timed):
        return ""
    rows = []
    for rec in timed:
        q = rec.metrics["qat"]
        cells = [q.get(k) for k in ("epochs", "seconds", "repair_seconds", "repair_time_ratio",
                                    "mechanism_seconds")]
        twins = _twins_without_curves(rec, timed)
        side = ", ".join(f"{q['seconds'] / t.metrics['qat']['seconds']:.2f} ({t.name})" for t in twins)
        rows.append(f"| {rec.name} | " + " | ".join("-" if c is None else str(c) for c in cells)
                    + f" | {side or '-'} |")
    return ("\n## QAT stage time\n\nEach run's `results/qat/metrics.json`: `seconds`, `repair_seconds` "
            "(scoring every repair curve of both models), `repair_time_ratio` (the stage's time over "
            "its time without the repair curves) and `mechanism_seconds`; the last column divides "
            "the stage's time by that of each run here with the same resolved params but no repair "
            "curves (the curves' own params aside).  Wall times of the machine and load each run "
            "had.\n\n" + COST_HEADER + "\n|" + "---|" * 7 + "\n" + "\n".join(rows) + "\n")


def table_from_archive(folder: str | Path) -> str:
    from yoloqat.analysis.mechanism_report import mechanism_sections

    records = read_archive(folder)
    return repair_table(records) + cost_table(records) + mechanism_sections(records)
