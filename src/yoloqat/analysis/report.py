"""Ladder reports: ``reports/ladder/<model>.md`` plus two PNGs per model.

* ``<model>_map.png``: val mAP50-95 per epoch, one panel per method variant; each seed is
  a thin line, the mean over seeds a bold line, the FP baseline's best (mean over seeds) a
  dashed horizontal line.
* ``<model>_osc.png``: ``osc/frac_oscillating`` per epoch (fraction of int weights whose
  oscillation frequency is above Nagel's threshold), same layout.

Curves are read per experiment with :func:`yoloqat.experiments.read_curves` (``git show
REV:PATH`` of the git-tracked DVCLive TSVs), or with any ``curve_reader`` given.  Runs whose
curves cannot be read are listed in the markdown, not plotted.  Matplotlib runs on the Agg
backend with its bundled DejaVu font: nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from yoloqat.analysis.experiments import ExpRecord, read_curves
from yoloqat.analysis.ladder import Decision, GroupRow, as_verdict, markdown_table, w4a16_map
from yoloqat.paths import LADDER_REPORTS

CurveReader = Callable[[ExpRecord], dict[str, list[float] | None]]
DEFAULT_OUT = LADDER_REPORTS


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Per-epoch mean over the curves that have a finite value at that epoch."""
    n = max((len(c) for c in curves), default=0)
    out = []
    for i in range(n):
        vals = [c[i] for c in curves if i < len(c) and math.isfinite(c[i])]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def _panel_title(row: GroupRow) -> str:
    k = row.key
    counts = ", ".join(f"{n} {lab}" for lab, n in row.counts.items() if n)
    return f"ema={str(k.ema).lower()} qc={str(k.qc).lower()} W{k.bits} init={k.init}\n{counts}"


def _plot(
    path: Path,
    model: str,
    rows: Sequence[GroupRow],
    curves: dict[str, dict[str, list[float] | None]],
    key: str,
    ylabel: str,
    fp_line: bool,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(rows), 1)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), sharey=True, squeeze=False
    )
    flat = list(axes.flat)
    for ax, row in zip(flat, rows, strict=False):
        seed_curves = []
        for rec in row.records:
            c = curves.get(rec.name, {}).get(key)
            if not c:
                continue
            seed = rec.params.get("seed")
            ax.plot(range(1, len(c) + 1), c, lw=0.9, alpha=0.55, label=f"seed {seed}")
            seed_curves.append(c)
        if seed_curves:
            m = mean_curve(seed_curves)
            ax.plot(range(1, len(m) + 1), m, lw=2.6, color="black", label="mean")
        else:
            ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes)
        if fp_line and row.fp_best_mean is not None:
            ax.axhline(row.fp_best_mean, ls="--", lw=1.2, color="tab:red",
                       label=f"FP best {row.fp_best_mean:.3f}")
        ax.set_title(_panel_title(row), fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if seed_curves or (fp_line and row.fp_best_mean is not None):
            ax.legend(fontsize=7)
    for ax in flat[len(rows):]:
        ax.axis("off")
    if not rows:
        flat[0].text(0.5, 0.5, "no judged runs", ha="center", va="center")
    fig.suptitle(f"{model}: {ylabel}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def model_markdown(
    model: str, rows: Sequence[GroupRow], decision: Decision, unreadable: list[str]
) -> str:
    lines = [f"# Ladder report: {model}", "", "## Decision", ""]
    lines += ["```", *decision.lines(), "```", "", "## Methods (mean ± sample std over seeds)", ""]
    lines += [markdown_table(rows) if rows else "No judged runs for this model yet.", ""]
    lines += [
        ("best/final: PyTorch val mAP50-95 of the QAT run (qat + verdict stages); ORT W4A16: "
         "the exported int4 model on onnxruntime (evaluate stage); gap to FP: FP baseline best "
         "minus QAT best."),
        "",
        "## Runs",
        "",
        "| variant | seed | experiment | verdict | best | final | ORT W4A16 | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for rec in row.records:
            v = as_verdict(rec)
            lines.append(
                f"| {row.key.variant()} W{row.key.bits} {row.key.init} | {rec.params.get('seed')} "
                f"| {rec.name} | {v.label} | {_f(v.best)} | {_f(v.final)} "
                f"| {_f(w4a16_map(rec))} | {v.reason.replace('|', '/')} |"
            )
    lines += ["", "## Curves", "", f"![val mAP50-95]({model}_map.png)", "",
              f"![osc/frac_oscillating]({model}_osc.png)", ""]
    if unreadable:
        lines += [f"Curves could not be read for: {', '.join(unreadable)}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_reports(
    rows: Sequence[GroupRow],
    decision: Decision,
    out_dir: str | Path = DEFAULT_OUT,
    repo: str | Path = ".",
    curve_reader: CurveReader | None = None,
    models: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``<model>.md``, ``<model>_map.png`` and ``<model>_osc.png`` for every model with
    runs (or the given ``models``); returns the paths written."""
    reader = curve_reader or (lambda rec: read_curves(rec, repo))
    out = Path(out_dir)
    if models is None:
        models = list(dict.fromkeys(r.model for r in rows))
    written: list[Path] = []
    for model in models:
        mrows = [r for r in rows if r.model == model and r.records]
        curves: dict[str, dict[str, list[float] | None]] = {}
        unreadable = []
        for row in mrows:
            for rec in row.records:
                c = reader(rec)
                curves[rec.name] = c
                if not c.get("map"):
                    unreadable.append(rec.name)
        out.mkdir(parents=True, exist_ok=True)
        md = out / f"{model}.md"
        md.write_text(model_markdown(model, mrows, decision, unreadable))
        map_png, osc_png = out / f"{model}_map.png", out / f"{model}_osc.png"
        _plot(map_png, model, mrows, curves, "map", "val mAP50-95", fp_line=True)
        _plot(osc_png, model, mrows, curves, "osc", "osc/frac_oscillating", fp_line=False)
        written += [md, map_png, osc_png]
    return written
