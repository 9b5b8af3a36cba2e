"""The mechanism of archived runs against cumulative scale decay (lr x wd x steps): one figure
and the table it plots, so runs that decay their learned scales at different rates are compared
at the same total decay (``yoloqat repairs --from DIR --decay-plot PATH.png``).

Three panels share x, the learned scales' cumulative lr x wd x steps at each epoch's end
(mechanism_report.cumulative_decay): (a) the learned scale over its start (median), (b) the BN
log-var mismatch on the plain images, (c) val mAP50-95.  Colour is the rate (the scale weight
decay), the marker the run within it (its seeds), the dash the model.
The CSV beside the PNG holds exactly the plotted points, one row each; the markdown beside it
(:func:`decay_summary`) one row per run: where its EMA curve fell lowest after warm-up and where
its EMA model's BN mismatch peaked, each with its epoch and cumulative decay.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from yoloqat.analysis.exp_curves import run_curves
from yoloqat.analysis.mechanism_report import cumulative_decay, has_mechanism
from yoloqat.analysis.records import ExpRecord, resolved_params
from yoloqat.analysis.rejudge import current_label
from yoloqat.curves.endpoints import warmup_skip
from yoloqat.curves.keys import curve_key, mechanism_group, series
from yoloqat.errors import ExperimentsError
from yoloqat.numbers import finite_number

# the models a series belongs to: its legend text and its dash, the same in every panel
MODELS = {
    "live": ("live", "-"),
    "ema": ("EMA", "--"),
    "ema_bnre": ("EMA after BN re-estimation", ":"),
}


@dataclass(frozen=True)
class Panel:
    key: str  # the CSV's panel column
    title: str
    ylabel: str
    lines: tuple[tuple[str, str], ...]  # (series, model of MODELS), drawn in this order


def _mech(model: str, metric: str, bnre: bool = False) -> str:
    return series(mechanism_group(model, bnre=bnre), metric)


PANELS = (
    Panel(
        "scale",
        "(a) learned scale / its start (median)",
        "scale / start",
        (
            (_mech("live", "scale_ratio_median"), "live"),
            (_mech("ema", "scale_ratio_median"), "ema"),
        ),
    ),
    Panel(
        "bn_mismatch",
        "(b) BN log-var mismatch on the plain images: |log(running var / batch var)|, "
        "mean over layers",
        "BN log-var mismatch",
        (
            (_mech("live", "bn_logvar_mean"), "live"),
            (_mech("ema", "bn_logvar_mean"), "ema"),
            (_mech("ema", "bn_logvar_mean", bnre=True), "ema_bnre"),
        ),
    ),
    Panel(
        "map",
        "(c) val mAP50-95",
        "mAP50-95",
        ((curve_key("live"), "live"), (curve_key("ema"), "ema")),
    ),
)
CSV_HEADER = ("run", "panel", "series", "epoch", "cum_lr_wd_steps", "value")


@dataclass(frozen=True)
class DecayRun:
    """A run that can be drawn: its name, scale weight decay, epochs and per-epoch cumulative
    decay (epoch i + 1 at index i)."""

    name: str
    weight_decay: float
    epochs: int
    decay: tuple[float, ...]

    @property
    def label(self) -> str:
        return f"{self.name} (scale wd {self.weight_decay:.3g} x {self.epochs} epochs)"


@dataclass(frozen=True)
class DecayPoint:
    run: str
    panel: str
    series: str
    epoch: int  # 1-based
    decay: float
    value: float


def decay_run(rec: ExpRecord) -> DecayRun | None:
    """The run as drawn, or None when it logged no mechanism metrics, no cumulative decay, or a
    total decay of 0 (every point would sit at x = 0)."""
    decay = cumulative_decay(rec) if has_mechanism(rec) else None
    if not decay or not decay[-1] > 0:
        return None
    wd = resolved_params(rec.params)["qat.scale_weight_decay"]
    return DecayRun(rec.name, float(wd), len(decay), tuple(decay))


def decay_points(records: Sequence[ExpRecord]) -> tuple[list[DecayRun], list[DecayPoint]]:
    """The runs that can be drawn (by name) and every point the figure plots: each panel's
    series at each epoch with both a finite value and a cumulative decay.  ExperimentsError (one
    line) when no run can be drawn."""
    by_name = {r.name: r for r in records}
    runs = [run for run in (decay_run(by_name[n]) for n in sorted(by_name)) if run is not None]
    if not runs:
        names = ", ".join(sorted(by_name)) or "none"
        raise ExperimentsError(
            f"no run logged mechanism metrics with a cumulative scale decay (runs: {names}); "
            "expected a run with qat.mechanism_batches > 0, learned scales and a numeric "
            "qat.scale_weight_decay > 0 (and qat steps / epochs in its metrics)"
        )
    points = []
    for run in runs:
        qat = run_curves(by_name[run.name]).get("qat", {})
        for panel in PANELS:
            for name, _ in panel.lines:
                for i, value in enumerate(qat.get(name) or []):
                    if i < len(run.decay) and finite_number(value) is not None:
                        points.append(
                            DecayPoint(run.name, panel.key, name, i + 1, run.decay[i], value)
                        )
    return runs, points


def decay_csv(points: Sequence[DecayPoint]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for p in points:
        writer.writerow((p.run, p.panel, p.series, p.epoch, f"{p.decay:.6f}", f"{p.value:.6g}"))
    return out.getvalue()


SUMMARY_HEADER = (
    "| run | seed | scale wd x epochs | EMA label (current rules) | EMA lowest after warm-up "
    "(epoch, cum. decay) | EMA final | EMA BN log-var mismatch, peak (epoch, cum. decay) | "
    "live mismatch, peak | EMA scale / start at the end |"
)


def _extreme(values: Sequence[float | None] | None, decay: Sequence[float], skip: int,
             pick: Callable[..., tuple[float, int]]) -> str:
    """``value (epoch, x)`` of the finite value ``pick`` (min or max) chooses at epochs after
    ``skip``, the first such epoch on a tie; ``-`` when there is none (an archive stores an
    epoch without a value as null)."""
    found = [(f, i) for i, v in enumerate(values or []) if skip <= i < len(decay)
             and (f := finite_number(v)) is not None]
    if not found:
        return "-"
    value, i = pick(found, key=lambda pair: pair[0])
    return f"{value:.3f} ({i + 1}, {decay[i]:.3f})"


def _last(values: Sequence[float | None] | None) -> str:
    finite = [f for v in values or [] if (f := finite_number(v)) is not None]
    return f"{finite[-1]:.3f}" if finite else "-"


def decay_summary(runs: Sequence[DecayRun], records: Sequence[ExpRecord]) -> str:
    """One markdown row per drawable run (``runs``, as :func:`decay_points` found them among
    ``records``): the EMA curve's label by today's rules, its lowest value after warm-up and its
    final value, the peak BN log-var mismatch (plain images) of the EMA and the live model, and
    the EMA model's median scale over its start at the end; each extreme with its epoch and
    cumulative decay, so runs at different rates are compared at the decay where things
    happened."""
    by_name = {r.name: r for r in records}
    lines = [SUMMARY_HEADER, "|" + "---|" * 9]
    for run in runs:
        rec = by_name[run.name]
        qat = run_curves(rec).get("qat", {})
        ema = qat.get(curve_key("ema"))
        skip = warmup_skip(resolved_params(rec.params).get("qat.warmup_epochs"))
        label = current_label(rec, ema) if ema else "-"
        lines.append(
            f"| {run.name} | {rec.params.get('seed', '-')} | {run.weight_decay:.3g} x {run.epochs} "
            f"| {label} | {_extreme(ema, run.decay, skip, min)} | {_last(ema)} "
            f"| {_extreme(qat.get(_mech('ema', 'bn_logvar_mean')), run.decay, 0, max)} "
            f"| {_extreme(qat.get(_mech('live', 'bn_logvar_mean')), run.decay, 0, max)} "
            f"| {_last(qat.get(_mech('ema', 'scale_ratio_median')))} |"
        )
    return "\n".join(lines) + "\n"


def _fitted(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.06 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
    return lo - pad, hi + pad


RUN_MARKERS = ("o", "s", "^", "D", "v", "P")


def run_styles(runs: Sequence[DecayRun]) -> tuple[dict[str, str], dict[str, str]]:
    """Colour per rate (the runs' scale weight decay, in order of first appearance) and marker
    per run within its rate, so the seeds of one rate read as one family."""
    rates: dict[float, list[str]] = {}
    for run in runs:
        rates.setdefault(run.weight_decay, []).append(run.name)
    colours, markers = {}, {}
    for i, names in enumerate(rates.values()):
        for j, name in enumerate(names):
            colours[name] = f"C{i % 10}"
            markers[name] = RUN_MARKERS[j % len(RUN_MARKERS)]
    return colours, markers


def decay_png(runs: Sequence[DecayRun], points: Sequence[DecayPoint]) -> bytes:
    """The figure as PNG bytes: Agg, no pyplot state, the bundled font, no date or version in
    the file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colours, markers = run_styles(runs)
    fig = Figure(figsize=(8.0, 9.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, panel in zip(axes, PANELS, strict=True):
        mine = [p for p in points if p.panel == panel.key]
        drawn_models = []
        for run in runs:
            for name, model in panel.lines:
                xy = [(p.decay, p.value) for p in mine if p.run == run.name and p.series == name]
                if not xy:
                    continue
                xs, ys = zip(*xy, strict=True)
                ax.plot(
                    xs, ys, MODELS[model][1], color=colours[run.name], lw=1.3,
                    marker=markers[run.name], ms=2.6,
                )
                drawn_models.append(model)
        if mine:
            ax.set_ylim(*_fitted([p.value for p in mine]))
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        models = [m for _, m in panel.lines if m in drawn_models]
        if models:
            ax.legend(
                [Line2D([], [], ls=MODELS[m][1], color="0.25") for m in models],
                [MODELS[m][0] for m in models],
                fontsize=7,
                loc="best",
            )
        ax.set_title(panel.title, fontsize=9, loc="left")
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(
        "cumulative lr x wd x steps of the learned scales (at each epoch's end)", fontsize=8
    )
    axes[-1].set_xlim(left=0.0)
    fig.legend(
        [Line2D([], [], color=colours[r.name], lw=2, marker=markers[r.name], ms=5) for r in runs],
        [r.label for r in runs],
        loc="upper center",
        ncols=min(len(runs), 2),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.035 * math.ceil(len(runs) / 2)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def csv_beside(png: Path) -> Path:
    return png.with_suffix(".csv")


def summary_beside(png: Path) -> Path:
    return png.with_suffix(".md")


def write_decay_plot(png: str | Path, records: Sequence[ExpRecord]) -> tuple[Path, Path, Path]:
    """Write the figure to ``png``, its points to the CSV and the per-run summary to the
    markdown of the same stem; all or none (ExperimentsError for a path that is not .png or no
    drawable run, OSError for a folder that cannot be written)."""
    png = Path(png)
    if png.suffix.lower() != ".png":
        raise ExperimentsError(
            f"--decay-plot {png}: not allowed; expected a path ending in .png "
            "(the CSV and the summary are written beside it with the same stem)"
        )
    runs, points = decay_points(records)
    image, table, summary = decay_png(runs, points), decay_csv(points), decay_summary(runs, records)
    written: list[Path] = []
    try:
        for path, write in (
            (csv_beside(png), lambda p: p.write_text(table)),
            (summary_beside(png), lambda p: p.write_text(summary)),
            (png, lambda p: p.write_bytes(image)),
        ):
            write(path)
            written.append(path)
    except OSError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return png, csv_beside(png), summary_beside(png)
