"""The remedies report: one row per variant (a curve of a group of seed runs), judged and plotted.

``yoloqat remedies --variant "LABEL=CURVE:exp1,exp2,exp3" ...`` reads the named DVC experiments
and, for every variant, judges the chosen curve of each run (``live``: plain QAT, ``ema``: the
EMA model, ``bnre``: the deployed model after BN re-estimation) by the README's stability rules,
then writes ``README.md`` (the variant table; the endpoint table of
:mod:`yoloqat.analysis.endpoint_table`: best, final, post-peak drawdown and AUC after warm-up per
variant, with the paired AUC difference to the first ``live`` variant; per run QC's
before/after, onnxruntime W4A16, QAT seconds and frozen fraction) and ``curves.png`` (one panel
per variant, one line per seed) to ``--out``.  Several variants may read different curves of the same runs: the live and EMA curves
of one run are one training trajectory, so they are paired.

Where a run's verdict stage stored a label for the curve (``live_label``, ``ema_label``,
``bnre_label``: judged with the run's own stability params) that label is used; otherwise (runs
older than the field) the curve is judged here with the default stability rules.
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from yoloqat.analysis.endpoint_table import remedies_rows, remedies_text
from yoloqat.analysis.exp_curves import read_curves
from yoloqat.analysis.records import ExpRecord, resolved_params
from yoloqat.analysis.search import finish_panel, judge_with_defaults, panel_grid, save_figure
from yoloqat.config import REPAIR_CURVES
from yoloqat.curves.keys import logged_repairs, repair_prefix
from yoloqat.errors import ExperimentsError
from yoloqat.numbers import finite_number

# the plain curves, the deployed model after BN re-estimation (qat.bn_reestimate), and every
# repair curve of either model (qat.repair_curves: ema_qc, live_bnre, ...)
CURVES = ("live", "ema", "bnre") + tuple(
    repair_prefix(model, repair) for model, repair, _ in logged_repairs(True, REPAIR_CURVES))


@dataclass(frozen=True)
class Variant:
    label: str
    curve: str  # one of CURVES
    names: tuple[str, ...]  # DVC experiment names, one per seed


def parse_variant(text: str) -> Variant:
    """``LABEL=CURVE:exp1,exp2`` -> Variant; a malformed text is one error naming it."""
    label, eq, rest = text.partition("=")
    curve, colon, names = rest.partition(":")
    exps = tuple(n.strip() for n in names.split(",") if n.strip())
    if not (eq and colon and label.strip() and exps) or curve.strip() not in CURVES:
        raise ExperimentsError(
            f"--variant {text!r} is not allowed; expected LABEL=CURVE:exp1,exp2,... with CURVE one of "
            + " | ".join(CURVES)
        )
    return Variant(label.strip(), curve.strip(), exps)


@dataclass(frozen=True)
class VariantRow:
    variant: Variant
    labels: tuple[str, ...]  # one verdict per run that has the curve
    bests: tuple[float, ...]
    finals: tuple[float, ...]
    missing: tuple[str, ...]  # runs not done, or without the curve (EMA off, BN re-estimation off)
    qc_after: tuple[float, ...] = ()  # QC's result, when this curve is of the model QC corrects

    @property
    def stable(self) -> int:
        return sum(label == "stable" for label in self.labels)


def _judge(rec: ExpRecord, curve: str, series: list[float]) -> str:
    stored = rec.verdict.get(f"{curve}_label")
    if isinstance(stored, str):
        return stored
    status = rec.metrics.get("qat", {}).get("status")
    return judge_with_defaults(series, status)


def deployed_curve(rec: ExpRecord) -> str:
    """The curve of the model the run saves, and QC then corrects: after BN re-estimation when
    that is on, else the EMA model's when EMA is on, else the live weights'."""
    params = resolved_params(rec.params)
    if (finite_number(params.get("qat.bn_reestimate")) or 0) > 0:
        return "bnre"
    return "ema" if params.get("ema") is not False else "live"


def variant_row(variant: Variant, records: Sequence[ExpRecord],
                curves: Sequence[dict[str, list[float] | None]]) -> VariantRow:
    labels, bests, finals, missing, qc_after = [], [], [], [], []
    for rec, c in zip(records, curves, strict=True):
        if rec.state != "done":
            # a queued or running experiment shows its baseline's files, not its own results
            missing.append(f"{rec.name} {rec.state}")
            continue
        series = list(c.get(variant.curve) or [])  # NaN marks an epoch without a value
        finite = [x for x in series if finite_number(x) is not None]
        if not finite:
            missing.append(rec.name)
            continue
        labels.append(_judge(rec, variant.curve, series))
        bests.append(max(finite))
        finals.append(finite[-1])
        after = finite_number(rec.metrics.get("qc", {}).get("after_mAP50-95"))
        if after is not None and deployed_curve(rec) == variant.curve:
            qc_after.append(after)
    return VariantRow(variant, tuple(labels), tuple(bests), tuple(finals), tuple(missing), tuple(qc_after))


def mean_sd(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def variant_table(rows: Sequence[VariantRow]) -> str:
    lines = ["| variant | curve | runs | stable | verdicts | best | final | final + QC |", "|" + "---|" * 8]
    for r in rows:
        n = len(r.labels)
        note = f" (left out: {', '.join(r.missing)})" if r.missing else ""
        qc = mean_sd(r.qc_after) if len(r.qc_after) == n else "-"
        lines.append(f"| {r.variant.label} | {r.variant.curve} | {n} | {r.stable}/{n} | "
                     f"{', '.join(r.labels) or '-'}{note} | {mean_sd(r.bests)} | {mean_sd(r.finals)} | {qc} |")
    return "\n".join(lines)


def _num(x: object, fmt: str) -> str:
    v = finite_number(x)
    return "-" if v is None else format(v, fmt)


def run_table(records: Sequence[ExpRecord]) -> str:
    lines = ["| run | QC before -> after (delta) | onnxruntime W4A16 | qat s | frozen |", "|" + "---|" * 5]
    for rec in records:
        if rec.state != "done":
            lines.append(f"| {rec.name} | {rec.state} | - | - | - |")
            continue
        qc, ev, qat = (rec.metrics.get(k, {}) for k in ("qc", "evaluate", "qat"))
        qc_text = (f"{_num(qc.get('before_mAP50-95'), '.4f')} -> {_num(qc.get('after_mAP50-95'), '.4f')} "
                   f"({_num(qc.get('delta_mAP50-95'), '+.4f')})")
        lines.append(f"| {rec.name} | {qc_text} | {_num(ev.get('w4a16_mAP50-95'), '.4f')} | "
                     f"{_num(qat.get('seconds'), '.0f')} | {_num(qat.get('frac_frozen_final'), '.3f')} |")
    return "\n".join(lines)


def plot_variants(path: Path, rows: Sequence[VariantRow],
                  curves: dict[str, dict[str, list[float] | None]]) -> None:
    """One panel per variant: its curve for every run, one line per seed."""
    plt, fig, axes = panel_grid(len(rows))
    for ax, row in zip(axes.flat, rows, strict=False):
        for name in row.variant.names:
            series = curves.get(name, {}).get(row.variant.curve) or []
            if series:
                ax.plot(range(1, len(series) + 1), series, "-o", ms=2, label=name)
        finish_panel(ax, f"{row.variant.label} ({row.variant.curve}): {row.stable}/{len(row.labels)} stable",
                     legend_size=6)
    save_figure(plt, fig, path)


def _quoted(text: str) -> str:
    """``text`` as one shell word, always in quotes (the command line a README shows)."""
    quoted = shlex.quote(text)
    return quoted if quoted.startswith("'") else f"'{text}'"


def write_remedies_report(out_dir: Path, variants: Sequence[Variant], by_name: dict[str, ExpRecord],
                          repo: str | Path = ".", title: str = "Remedies",
                          archives: Sequence[str | Path] = ()) -> tuple[Path, str]:
    """README.md + curves.png in ``out_dir``.  A variant's experiment missing from ``by_name``
    (not found in ``dvc exp show``; the CLI allows that only with an explicit ``--out``) is
    left out of its row as ``NAME (not found)``.  The README opens with the command that wrote
    it (``archives``: the ``--from`` folders read), so it can be regenerated from them."""
    curves = {name: read_curves(rec, repo) for name, rec in by_name.items()}
    rows = []
    for v in variants:
        names = [n for n in v.names if n in by_name]
        row = variant_row(v, [by_name[n] for n in names], [curves[n] for n in names])
        absent = tuple(f"{n} (not found)" for n in v.names if n not in by_name)
        rows.append(replace(row, missing=row.missing + absent) if absent else row)
    ordered = [n for n in dict.fromkeys(n for v in variants for n in v.names) if n in by_name]
    ends, pairing = remedies_rows(variants, by_name, curves, _judge)
    tables = (variant_table(rows) + "\n\n" + remedies_text(ends, pairing) + "\n\n"
              + run_table([by_name[n] for n in ordered]))
    command = " ".join(
        ["yoloqat remedies", *(f"--from {a}" for a in archives)]
        + [f"--variant {_quoted(f'{v.label}={v.curve}:' + ','.join(v.names))}" for v in variants]
        + ([f"--title {_quoted(title)}"] if title != "Remedies" else [])
        + ([f"--out {out_dir}"] if archives else []))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_variants(out_dir / "curves.png", rows, curves)
    text = [
        f"# {title}", "",
        (f"Written by `{command}`. Each variant is one curve (live: plain QAT; ema: the EMA model; "
        "bnre: the deployed model after BN re-estimation; ema_qc, live_bnre, ...: a repair curve "
        "of qat.repair_curves) of a group of seed runs, judged by the "
        "rules of docs/decision.md; best and final are mean ± sd over the runs. "
        "QC corrects the final deployed model of each run (after BN re-estimation when that is "
        "on, else the EMA model when EMA is on): `final + QC` is on that curve's row only."), "",
        tables, "", "![each variant's curve per seed](curves.png)", "",
    ]
    (out_dir / "README.md").write_text("\n".join(text))
    return out_dir / "README.md", tables
