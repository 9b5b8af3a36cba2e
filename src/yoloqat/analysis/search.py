"""The failure-search report: one row per experiment, what it changed and how its curves went.

``yoloqat search NAME [NAME ...]`` reads the named DVC experiments (``dvc exp show``), describes
each by the params it sets away from the defaults (after its preset is applied, so a preset row
shows the recipe it ran), and writes ``README.md`` (the table) and ``curves.png`` (each run's
paired live / EMA val mAP50-95 curves) to ``--out`` (default ``reports/failure_search``).

Single runs, not seed groups: this is where a failure is looked for; ``yoloqat ladder`` is
where a found one is measured over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yoloqat.analysis.exp_curves import read_curves
from yoloqat.analysis.records import ExpRecord, flatten, is_setting_param, resolved_params
from yoloqat.config import Config, StabilityConfig
from yoloqat.curves.stability import classify_run
from yoloqat.errors import ExperimentsError
from yoloqat.numbers import finite_number, fixed


@dataclass(frozen=True)
class SearchRow:
    name: str
    setting: str  # the params set away from the defaults, "k=v k=v"
    status: str
    live_label: str | None
    live_best: float | None
    live_best_epoch: int | None
    live_final: float | None
    live_max_drawdown: float | None
    ema_label: str | None
    ema_final: float | None
    osc_final: float | None
    scale_ratio_final: float | None
    epochs: int | None
    seconds: float | None
    bnre_label: str | None = None  # the BN-re-estimated curve, judged here (qat.bn_reestimate > 0)
    bnre_final: float | None = None


def setting_text(params: dict[str, Any]) -> str:
    """The run's params that differ from the defaults once its preset is applied (``default`` if
    none), the preset first.  Keys the config does not know (an older run) are shown as given."""
    defaults = flatten(Config().as_dict())
    resolved = resolved_params({k: v for k, v in params.items() if v is not None or k in defaults})
    preset = resolved.get("preset", "none")
    diffs = [
        f"{k}={_text(v)}" for k, v in sorted(resolved.items())
        if k != "preset" and is_setting_param(k)
        and k in defaults and _norm(v) != _norm(defaults[k])
    ]
    head = [f"preset={preset}"] if preset not in (None, "none") else []
    return " ".join(head + diffs) or "default"


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def judge_with_defaults(series: list[float], status: str | None) -> str:
    """A curve's verdict label by the default stability rules: for curves of runs whose verdict
    stage stored no label for them (older runs)."""
    return classify_run(series, None, StabilityConfig(), status).label


def search_row(rec: ExpRecord, bnre: list[float] | None = None) -> SearchRow:
    """One table row from the run's stored verdicts; ``bnre`` (its val_bnre curve, if logged) is
    judged here with the default stability rules, since runs older than the verdict's bnre_*
    fields have only the curve."""
    if rec.state != "done":
        # a queued or running experiment shows its baseline's files, not its own results
        return SearchRow(rec.name, setting_text(rec.params), rec.state, *([None] * 11))
    v, q = rec.verdict, rec.metrics.get("qat", {})
    epoch = v.get("live_best_epoch")
    bnre_label = judge_with_defaults(bnre, q.get("status")) if bnre else None
    return SearchRow(
        name=rec.name, setting=setting_text(rec.params),
        status=rec.state if rec.state != "done" else str(q.get("status") or v.get("status") or "done"),
        live_label=v.get("live_label") or v.get("label"),
        live_best=finite_number(v.get("live_best", v.get("best"))),
        live_best_epoch=int(epoch) if isinstance(epoch, int) else None,
        live_final=finite_number(v.get("live_final", v.get("final"))),
        live_max_drawdown=finite_number(v.get("live_max_drawdown", v.get("max_drawdown"))),
        ema_label=v.get("ema_label"), ema_final=finite_number(v.get("ema_final")),
        osc_final=finite_number(q.get("osc/frac_oscillating")),
        scale_ratio_final=finite_number(q.get("scale_ratio_geomean_final")),
        epochs=q.get("epochs") if isinstance(q.get("epochs"), int) else None,
        seconds=finite_number(q.get("seconds")),
        bnre_label=bnre_label,
        bnre_final=bnre[-1] if bnre else None,
    )


def find(records: Sequence[ExpRecord], names: Sequence[str]) -> tuple[list[ExpRecord], list[str]]:
    """The experiments called ``names`` that exist, in that order, and the names not found."""
    # A name can repeat (a failed run queued again): take a finished run, then the newest.
    by_name: dict[str, ExpRecord] = {}
    for r in records:
        if r.kind != "experiment":
            continue
        kept = by_name.get(r.name)
        if kept is None or _preference(r) > _preference(kept):
            by_name[r.name] = r
    return [by_name[n] for n in names if n in by_name], [n for n in names if n not in by_name]


def _unknown(records: Sequence[ExpRecord], missing: Sequence[str]) -> str:
    known = sorted({r.name for r in records if r.kind == "experiment"})
    shown = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
    return f"unknown experiment(s) {', '.join(missing)}; known: {shown or 'none'}"


def select(records: Sequence[ExpRecord], names: Sequence[str]) -> list[ExpRecord]:
    """The experiments called ``names``, in that order; an unknown name is an error."""
    found, missing = find(records, names)
    if missing:
        raise ExperimentsError(_unknown(records, missing))
    return found


def find_named(
    records: Sequence[ExpRecord], names: Sequence[str], out: str | None, default_out: str
) -> tuple[list[ExpRecord], list[str]]:
    """(found, missing) for a report command.  Its default folder ``default_out`` holds committed
    evidence: with ``out`` None any missing name is an :class:`ExperimentsError` (one line: what
    was missing, and that nothing was written), so a fresh clone, which has no experiments (git
    does not clone them), never replaces that report with an empty one.  An explicit ``out`` is
    written with the experiments found, the missing ones listed."""
    found, missing = find(records, names)
    if missing and out is None:
        raise ExperimentsError(
            f"{_unknown(records, missing)}; {default_out} left as is (DVC experiments are not "
            "cloned with git: dvc exp pull <remote>); pass --out DIR to write the others there")
    return found, missing


def _preference(r: ExpRecord) -> tuple[bool, str]:
    return (r.state == "done" and not r.error, r.timestamp or "")


def markdown_table(rows: Sequence[SearchRow]) -> str:
    head = ("| exp | setting (vs defaults) | epochs | live verdict | live best (epoch) | live final "
            "| max drawdown | EMA verdict / final | BN re-est. verdict / final | oscillating "
            "| scale ratio | qat s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        best = "-" if r.live_best is None else f"{r.live_best:.4f} ({r.live_best_epoch})"
        ema = "-" if r.ema_label is None else f"{r.ema_label} / {fixed(r.ema_final, 4, 'nan')}"
        bnre = "-" if r.bnre_label is None else f"{r.bnre_label} / {fixed(r.bnre_final, 4, 'nan')}"
        lines.append(
            f"| {r.name} | `{r.setting}` | {r.epochs or '-'} | {r.live_label or r.status} | {best} "
            f"| {fixed(r.live_final, 4, 'nan')} | {fixed(r.live_max_drawdown, 3, 'nan')} | {ema} | {bnre} | {fixed(r.osc_final, 4, 'nan')} "
            f"| {fixed(r.scale_ratio_final, 3, 'nan')} | {fixed(r.seconds, 0, 'nan')} |"
        )
    return "\n".join(lines)


def panel_grid(n: int) -> tuple[Any, Any, Any]:
    """(pyplot, figure, axes) for ``n`` small curve panels, three per row, spare ones hidden."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(n, 1)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, axes


def finish_panel(ax: Any, title: str, legend_size: int = 7) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("val mAP50-95", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run without curves (not readable here) has none
        ax.legend(fontsize=legend_size)


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(path: Path, rows: Sequence[SearchRow], curves: Sequence[dict[str, Any]]) -> None:
    """One small panel per run: live (solid) and EMA (dashed) val mAP50-95 per epoch."""
    plt, fig, axes = panel_grid(len(rows))
    for ax, row, c in zip(axes.flat, rows, curves, strict=False):
        live = c.get("live") or c.get("map") or []
        ema = c.get("ema") or []
        if live:
            ax.plot(range(1, len(live) + 1), live, "-o", ms=2.5, label="live (plain QAT)")
        if ema:
            ax.plot(range(1, len(ema) + 1), ema, "--", label="EMA")
        bnre = c.get("bnre") or []
        if bnre:
            ax.plot(range(1, len(bnre) + 1), bnre, ":", label="BN re-estimated")
        labels = f"live {row.live_label or row.status}" + (f", EMA {row.ema_label}" if row.ema_label else "")
        finish_panel(ax, f"{row.name}: {labels}")
    save_figure(plt, fig, path)


def write_search_report(
    out_dir: Path, records: Sequence[ExpRecord], repo: str | Path = ".", title: str = "Failure search",
    missing: Sequence[str] = (),
) -> tuple[Path, str]:
    """README.md + curves.png of ``records`` in ``out_dir``; ``missing`` names experiments asked
    for but not found (listed under the table)."""
    curves = [read_curves(r, repo) for r in records]
    rows = [search_row(r, c.get("bnre")) for r, c in zip(records, curves, strict=True)]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(out_dir / "curves.png", rows, curves)
    text = [
        f"# {title}",
        "",
        "Written by `yoloqat search " + " ".join(r.name for r in rows) + "`; one row per DVC "
        "experiment, its setting given as the params it sets away from the defaults (after its "
        "preset). Verdicts by the rules of docs/decision.md; `scale ratio` is "
        "the geometric mean of |learned scale| / |initial| at the end (learned scalings only).",
        "",
        markdown_table(rows),
        "",
        *([f"Not found in `dvc exp show` (left out): {', '.join(missing)}.", ""] if missing else []),
        "![live and EMA val mAP50-95 per epoch](curves.png)",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(text))
    table = markdown_table(rows)
    return out_dir / "README.md", table + (f"\nnot found (left out): {', '.join(missing)}" if missing else "")
