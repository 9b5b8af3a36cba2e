"""The ladder's tables: one row per group (plain text and markdown), one per seed, and the
JSON of groups and decision."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from yoloqat.analysis.ladder import Decision
from yoloqat.analysis.ladder_groups import Group, differing_keys
from yoloqat.numbers import fixed


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return fixed(mean, digits) if std is None else f"{fixed(mean, digits)} ± {fixed(std, digits)}"


# "method": the curve the rung is decided on, EMA + QC per epoch where the runs logged it, else
# EMA (the decision lines below the table name which)
TABLE_HEADER = (
    "model", "setting", "seeds", "live not stable", "method not stable", "p (method < live)",
    "live max dd", "method max dd", "QC delta (improved/n)", "ORT W4A16", "gap to FP",
    "queued", "failed",
)


def table_cells(groups: Sequence[Group]) -> list[list[str]]:
    keys = differing_keys(groups)
    out = []
    for g in groups:
        s = g.stats()
        p = s["paired"]
        out.append([
            g.model, g.setting.describe(keys), str(len(g.runs)),
            f"{s['live_failed']}/{s['live_n']} ({s['live_collapsed']} collapsed)",
            f"{s['ema_failed']}/{s['ema_n']} ({s['ema_collapsed']} collapsed)",
            f"{p['p_value']:.3f} ({p['pairs']} pairs)" if p["pairs"] else "-",
            fixed(s["live_max_drawdown_mean"], 3), fixed(s["ema_max_drawdown_mean"], 3),
            f"{_pm(s['qc_delta_mean'], s['qc_delta_std'])} ({s['qc_improved']}/{s['qc_n']})"
            if s["qc_n"] else "-",
            _pm(s["w4a16_mean"], s["w4a16_std"]), fixed(s["gap_mean"]),
            str(len(g.pending)), str(len(g.failed)),
        ])
    return out


def format_table(groups: Sequence[Group]) -> str:
    cells = [list(TABLE_HEADER), *table_cells(groups)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def markdown_table(groups: Sequence[Group]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(groups)]
    return "\n".join(lines)


def seed_rows_markdown(group: Group) -> str:
    header = ("| seed | live (control) | method (EMA+QC, or EMA) | live max dd | method max dd "
              "| QC delta | ORT W4A16 | experiments |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in group.runs:
        live = r.live.label if r.live else (r.note or "-")
        ema = r.ema.label if r.ema else "-"
        lines.append(
            f"| {r.seed} | {live} | {ema} | {fixed(r.live.max_drawdown if r.live else None, 3)} "
            f"| {fixed(r.ema.max_drawdown if r.ema else None, 3)} | {fixed(r.qc_delta)} "
            f"| {fixed(r.w4a16)} | {', '.join(r.names)} |"
        )
    return "\n".join(lines)


def ladder_json(groups: Sequence[Group], decision: Decision) -> dict[str, Any]:
    keys = differing_keys(groups)
    return {
        "groups": [{"model": g.model, "setting": g.setting.describe(keys),
                    "setting_params": dict(g.setting.values), **g.stats(),
                    "pending": g.pending, "failed": g.failed, "unjudged": g.unjudged,
                    "runs": [{"seed": r.seed, "experiments": r.names, "note": r.note,
                              "live": r.live.__dict__ if r.live else None,
                              "ema": r.ema.__dict__ if r.ema else None,
                              "qc_delta": r.qc_delta, "w4a16": r.w4a16, "gap": r.gap}
                             for r in g.runs]}
                   for g in groups],
        "decision": decision.as_dict(),
    }
