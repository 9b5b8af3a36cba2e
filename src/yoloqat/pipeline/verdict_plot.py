"""``results/verdict/curves.png``: every val mAP50-95 curve of the run, drawn with matplotlib.

The same curves as ``results/verdict/curves.csv`` (FP, FP continued, QAT live and EMA, BN
re-estimation and every repair curve that ran), each in its own colour and only over the epochs
where its stage logged a value; the y-range is fitted to the data; where the verdict counted a
collapse or a dip, a marker shows the epoch it began.  DVC shows it as an image plot, so
``dvc plots diff`` puts the runs side by side without the Vega scripts its HTML loads from a CDN.
Rendered with the Agg backend and matplotlib's bundled DejaVu Sans: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# a fixed colour per curve, so the same curve looks the same in every run's picture
COLOURS = {  # the same order and colours as .dvc/plots/curves_by_series.json
    "FP": "#7f7f7f",
    "FP continued": "#8c564b",
    "QAT live": "#1f77b4",
    "QAT EMA": "#d62728",
    "QAT live + BN re-est.": "#17becf",
    "QAT EMA + BN re-est.": "#9467bd",
    "QAT live + QC": "#2ca02c",
    "QAT EMA + QC": "#ff7f0e",
    "QAT live + BN re-est. + QC": "#bcbd22",
    "QAT EMA + BN re-est. + QC": "#e377c2",
    "QAT live + bn_reestimate": "#393b79",
    "QAT EMA + bn_reestimate": "#000000",
}
SPARE_COLOURS = ("#637939", "#8c6d31", "#843c39", "#7b4173")


@dataclass(frozen=True)
class PlotLine:
    name: str
    points: list[tuple[int, float]]  # (epoch, value): only epochs that have a value
    label: str | None = None  # the curve's verdict (QAT curves)
    collapses: list[int] = field(default_factory=list)  # epochs where a collapse begins
    dips: list[int] = field(default_factory=list)  # epochs where a dip (not a collapse) begins


def y_range(lines: list[PlotLine]) -> tuple[float, float] | None:
    """The data's range with a 6 % margin (at least 0.005 each side); None without data."""
    values = [v for line in lines for _, v in line.points]
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = max(0.06 * (hi - lo), 0.005)
    return lo - pad, hi + pad


def _colours(lines: list[PlotLine]) -> dict[str, str]:
    out, spare = {}, 0
    for line in lines:
        if line.name not in COLOURS:
            out[line.name], spare = SPARE_COLOURS[spare % len(SPARE_COLOURS)], spare + 1
        else:
            out[line.name] = COLOURS[line.name]
    return out


def _draw(ax: Any, lines: list[PlotLine], colours: dict[str, str], shift: int = 0) -> None:
    """Each line (x moved by ``-shift``) and its collapse / dip markers."""
    for line in lines:
        colour = colours[line.name]
        xs = [x - shift for x, _ in line.points]
        ys = [y for _, y in line.points]
        repair = line.name.startswith("QAT ") and "+" in line.name
        legend = line.name if line.label is None else f"{line.name} ({line.label})"
        ax.plot(xs, ys, color=colour, lw=1.2 if repair else 1.8, ls="--" if repair else "-",
                marker="o", ms=2.5, label=legend)
        by_epoch = dict(line.points)
        for epochs, marker, size in ((line.collapses, "X", 11), (line.dips, "v", 9)):
            hits = [(e, by_epoch[e]) for e in epochs if e in by_epoch]
            if hits:
                ax.scatter([e - shift for e, _ in hits], [v for _, v in hits], marker=marker,
                           s=size ** 2, color=colour, edgecolors="black", linewidths=0.8, zorder=5)


def write_curves_png(path: Path, lines: list[PlotLine], title: str,
                     qat_start: int | None = None) -> Path:
    """Draw ``lines`` to ``path`` (PNG).  ``qat_start`` is the first QAT epoch on the axis when
    FP's epochs come first: a dotted line marks where QAT starts from the FP model, and a second
    panel shows the QAT epochs alone (numbered 1, 2, ...), its y-range fitted to them, so FP's
    early epochs near 0 do not squeeze the comparison that matters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    drawn = [line for line in lines if line.points]
    colours = _colours(drawn)
    after = [line for line in drawn if qat_start is not None and line.points[0][0] >= qat_start]
    zoom = qat_start is not None and bool(after) and len(after) < len(drawn)
    if zoom:
        fig, (ax, zax) = plt.subplots(1, 2, figsize=(13, 5.5), width_ratios=(1, 1.25))
    else:
        fig, ax = plt.subplots(figsize=(9, 5.5))
    _draw(ax, drawn, colours)
    handles, labels = ax.get_legend_handles_labels()
    if any(line.collapses for line in drawn):
        handles.append(Line2D([], [], ls="", marker="X", ms=9, color="white", mec="black"))
        labels.append("collapse begins")
    if any(line.dips for line in drawn):
        handles.append(Line2D([], [], ls="", marker="v", ms=8, color="white", mec="black"))
        labels.append("dip begins")
    limits = y_range(drawn)
    if limits is None:
        ax.text(0.5, 0.5, "no val mAP50-95 logged", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.set_ylim(*limits)
        if qat_start is not None and after:
            ax.axvline(qat_start - 0.5, color="grey", ls=":", lw=1)
            ax.text(qat_start - 0.6, limits[0], "QAT starts from the FP model", rotation=90,
                    fontsize=7, color="grey", va="bottom", ha="right")
    x_text = "epoch"
    if qat_start is not None:
        x_text = (f"epoch (FP: 1-{qat_start - 1}; QAT and FP continued: epoch k at "
                  f"{qat_start - 1} + k)")
    for a, text in ((ax, x_text), *(((zax, "QAT epoch (FP continued: its epoch k)"),) if zoom else ())):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel(text)
        a.set_ylabel("val mAP50-95")
        a.grid(alpha=0.3)
    if zoom:
        assert qat_start is not None
        _draw(zax, after, colours, shift=qat_start - 1)
        zoom_limits = y_range(after)
        assert zoom_limits is not None
        zax.set_ylim(*zoom_limits)
        zax.set_title("the QAT epochs, y fitted to them", fontsize=9)
        ax.set_title("the whole run", fontsize=9)
        fig.suptitle(title, fontsize=10)
    else:
        ax.set_title(title, fontsize=10)
    legend_rows = 0
    if handles:  # under the panels, where it hides no data
        ncol = min(len(handles), 4)
        legend_rows = -(-len(handles) // ncol)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * legend_rows, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
