"""Ladder reports: ``reports/ladder/<model>.md`` plus two PNGs per model.

* ``<model>_map.png``: val mAP50-95 per epoch, one panel per setting; each seed's live curve
  (the control) and EMA curve as thin lines, their means over seeds bold, the FP baseline's
  best as a dashed line.  Runs made before the paired curves were logged show their deployed
  curve as "EMA".
* ``<model>_osc.png``: ``osc/frac_oscillating`` per epoch (fraction of int weights whose
  oscillation frequency is above Nagel's threshold), same layout.

Curves are read per experiment with :func:`yoloqat.analysis.exp_curves.read_curves` (the
DVCLive TSVs at the experiment's revision, or the curves an archive file carries), or with any
``curve_reader`` given.
Matplotlib runs on the Agg backend with its bundled DejaVu font: nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from yoloqat.analysis.exp_curves import read_curves
from yoloqat.analysis.ladder import Decision
from yoloqat.analysis.ladder_groups import Group, differing_keys
from yoloqat.analysis.ladder_tables import markdown_table, seed_rows_markdown
from yoloqat.analysis.records import ExpRecord
from yoloqat.numbers import finite_number
from yoloqat.paths import LADDER_REPORTS

CurveReader = Callable[[ExpRecord], dict[str, list[float] | None]]
DEFAULT_OUT = LADDER_REPORTS
SERIES = (("live", "live (control)", "tab:blue"), ("ema", "EMA", "tab:orange"))


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Per-epoch mean over the curves that have a finite value at that epoch."""
    n = max((len(c) for c in curves), default=0)
    out = []
    for i in range(n):
        vals = [c[i] for c in curves if i < len(c) and math.isfinite(c[i])]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def _series(curves: dict[str, list[float] | None], rec: ExpRecord) -> dict[str, list[float]]:
    """live/EMA curves of a run; an old run's deployed curve stands in for its method curve."""
    out: dict[str, list[float]] = {}
    if curves.get("live"):
        out["live"] = list(curves["live"] or [])
    if curves.get("ema"):
        out["ema"] = list(curves["ema"] or [])
    if curves.get("map") and "live" not in out and "ema" not in out:
        out["ema" if rec.params.get("ema") else "live"] = list(curves["map"] or [])
    return out


def _fp_best(group: Group) -> float | None:
    vals = [finite_number(r.verdict.get("fp_best")) for r in group.records]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _plot(path: Path, model: str, groups: Sequence[Group], curves: dict[str, dict],
          key: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = differing_keys(groups)
    n = max(len(groups), 1)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.8 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, group in zip(flat, groups, strict=False):
        drawn = False
        if key == "map":
            for name, label, color in SERIES:
                seeds = [c[name] for c in (curves[r.name]["series"] for r in group.records)
                         if name in c]
                for c in seeds:
                    ax.plot(range(1, len(c) + 1), c, lw=0.8, alpha=0.4, color=color)
                if seeds:
                    m = mean_curve(seeds)
                    ax.plot(range(1, len(m) + 1), m, lw=2.4, color=color,
                            label=f"{label}, mean of {len(seeds)}")
                    drawn = True
            fp = _fp_best(group)
            if fp is not None:
                ax.axhline(fp, ls="--", lw=1.2, color="tab:red", label=f"FP best {fp:.3f}")
        else:
            seeds = [c for c in (curves[r.name]["raw"].get(key) for r in group.records) if c]
            for c in seeds:
                ax.plot(range(1, len(c) + 1), c, lw=0.8, alpha=0.5, color="tab:blue")
            if seeds:
                m = mean_curve(seeds)
                ax.plot(range(1, len(m) + 1), m, lw=2.4, color="black", label="mean")
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(group.setting.describe(keys)[:90], fontsize=8)
        ax.set_xlabel("QAT epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    for ax in flat[len(groups):]:
        ax.axis("off")
    if not groups:
        flat[0].text(0.5, 0.5, "no judged runs", ha="center", va="center")
    fig.suptitle(f"{model}: {ylabel}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_markdown(model: str, groups: Sequence[Group], decision: Decision,
                   unreadable: list[str]) -> str:
    lines = [f"# Ladder report: {model}", "", "## Decision", ""]
    lines += ["```", *decision.lines(), "```", "", "## Settings (seeds pooled only within one)",
              ""]
    lines += [markdown_table(groups) if groups else "No runs for this model yet.", ""]
    lines += [
        ("live: the training trajectory's own weights (the control); EMA: the averaged weights "
         "the run deploys; not stable = collapsed, unstable, diverged or no_learning; a too_short "
         "curve (no more epochs than stability.grace_epochs) is left out of the counts. p: one-"
         "sided exact McNemar test, paired by seed, that EMA fails less often than live. max dd: "
         "mean deepest fall below the running best. QC delta: mAP50-95 after minus before QC "
         "on the same checkpoint (PyTorch; the fold is exact and ONNX parity is checked). "
         "ORT W4A16: the exported int4 model on onnxruntime; gap to FP: FP32 (the FP-continued "
         "control when trained) minus W4A16 on onnxruntime."),
        "",
    ]
    keys = differing_keys(groups)
    for g in groups:
        lines += [f"### Seeds: {g.setting.describe(keys)}", "", seed_rows_markdown(g), ""]
        for what, items in (("queued/running", g.pending), ("failed (never judged)", g.failed),
                            ("finished without a verdict", g.unjudged)):
            if items:
                lines += [f"{what}: " + ", ".join(f"{n} (seed {s})" for n, s in items), ""]
    lines += ["## Curves", "", f"![val mAP50-95]({model}_map.png)", "",
              f"![osc/frac_oscillating]({model}_osc.png)", ""]
    if unreadable:
        lines += [f"Curves could not be read for: {', '.join(unreadable)}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_reports(
    groups: Sequence[Group],
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
        models = list(dict.fromkeys(g.model for g in groups))
    written: list[Path] = []
    for model in models:
        mgroups = [g for g in groups if g.model == model]
        curves: dict[str, dict] = {}
        unreadable = []
        for g in mgroups:
            for rec in g.records:
                raw = reader(rec)
                curves[rec.name] = {"raw": raw, "series": _series(raw, rec)}
                if not curves[rec.name]["series"]:
                    unreadable.append(rec.name)
        out.mkdir(parents=True, exist_ok=True)
        md = out / f"{model}.md"
        md.write_text(model_markdown(model, mgroups, decision, unreadable))
        map_png, osc_png = out / f"{model}_map.png", out / f"{model}_osc.png"
        _plot(map_png, model, mgroups, curves, "map", "val mAP50-95")
        _plot(osc_png, model, mgroups, curves, "osc", "osc/frac_oscillating")
        written += [md, map_png, osc_png]
    return written
