"""``yoloqat judge PATH...``: read training curves and print a stability verdict per curve.

A PATH may be an Ultralytics ``results.csv`` (of any YOLO version) or run folder, a DVCLive
metric TSV, or a DVCLive folder such as ``results/qat``; a DVCLive folder gives one row per
validation curve it holds (``val``, ``val_live``, ``val_ema``, repair curves).  ``val`` is the
model the run deploys: the table names it ``val (deployed: EMA)`` when the run also logged
``val_ema`` (EMA on), ``val (deployed: live)`` when it logged only ``val_live``.  Under the table,
one line per paired comparison of the same run: EMA minus live and each repair curve minus the
model it repairs (best, final, max drawdown; in ``--json``, the row's ``minus``).  Reading follows
:mod:`yoloqat.curves.reader` (the one rule for missing and non-finite epochs); the verdict
rules are :mod:`yoloqat.curves.stability`'s, with thresholds from the ``stability`` block of
``--params`` (default ``params.yaml``) when that file exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from yoloqat.config import StabilityConfig, load_config_for
from yoloqat.curves.compare import baseline_of, curve_title, difference, difference_words
from yoloqat.curves.keys import EMA, LIVE, PRIMARY
from yoloqat.curves.keys import curve_name as series_name
from yoloqat.curves.reader import RunCurve, read_curve
from yoloqat.curves.stability import Verdict, classify_run
from yoloqat.errors import ConfigError, CurveError
from yoloqat.numbers import fixed

# --------------------------------------------------------------------------------------------
# CLI


def stability_config(params: str | Path) -> StabilityConfig:
    """The ``stability`` thresholds of a params file, or the defaults when it is absent.

    The whole file is validated with :func:`load_config`; if something outside the
    ``stability`` block is wrong (e.g. a dataset path missing on this machine) the block
    is validated on its own, so judging a curve does not need the training setup.
    """
    return load_config_for(params, "stability").stability


def _fmt(x: Any, digits: int = 4) -> str:
    """Floats as numbers (NaN shown, a diverged curve's best is one); labels and counts as text."""
    return fixed(x, digits, nonfinite="nan") if x is None or isinstance(x, float) else str(x)


TABLE_COLUMNS = (
    ("path", "path"),
    ("curve", "curve"),
    ("label", "label"),
    ("best", "best"),
    ("best_ep", "best_epoch"),
    ("final", "final"),
    ("final/best", "final_over_best"),
    ("max_dd", "max_drawdown"),
    ("collapses", "collapse_events"),
    ("ep_collapsed", "epochs_collapsed"),
)


def deployed_model(keys: set[str]) -> str | None:
    """Which model a run's ``val`` curve scores: ``ema`` when it logged ``val_ema`` (EMA on),
    ``live`` when it logged only ``val_live`` (EMA off), None when it cannot tell."""
    if EMA in keys:
        return "ema"
    return "live" if LIVE in keys else None


def curve_name(key: str, keys: set[str]) -> str:
    """The table's name of a curve; the deployed curve says which model it is."""
    name = series_name(key)
    model = deployed_model(keys) if key == PRIMARY else None
    return name if model is None else f"{name} (deployed: {'EMA' if model == 'ema' else 'live'})"


def _keys_by_path(rows: list[tuple[str, str, Verdict]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, key, _ in rows:
        out.setdefault(name, set()).add(key)
    return out


def comparisons(rows: list[tuple[str, str, Verdict]]) -> list[tuple[str, str, str, dict[str, float | None]]]:
    """(path, curve, baseline curve, curve minus baseline) for every paired curve of a run:
    EMA vs live, and each repair curve vs the model it repairs."""
    verdicts = {(name, key): v for name, key, v in rows}
    out = []
    for name, key, v in rows:
        base = baseline_of(key)
        if base is not None and (name, base) in verdicts:
            out.append((name, key, base, difference(v, verdicts[(name, base)])))
    return out


def comparison_lines(rows: list[tuple[str, str, Verdict]]) -> list[str]:
    """``results/qat: EMA vs live: +0.0020 best, +0.0100 final, -0.050 max drawdown``, ..."""
    return [f"{name}: {difference_words(curve_title(key), curve_title(base), diff)}"
            for name, key, base, diff in comparisons(rows)]


def json_rows(curves: list[RunCurve], rows: list[tuple[str, str, Verdict]]) -> list[dict[str, Any]]:
    """The ``--json`` list: one object per curve, with ``deployed`` (the model ``val`` scores,
    on its row only) and ``minus`` (the paired difference, on EMA and repair rows)."""
    sources = {c.name: c.source for c in curves}
    keys = _keys_by_path(rows)
    minus = {(name, key): {"curve": base, **diff} for name, key, base, diff in comparisons(rows)}
    return [{"path": name, "curve": key, "source": sources[name], **v.as_dict(),
             "deployed": deployed_model(keys[name]) if key == PRIMARY else None,
             "minus": minus.get((name, key))}
            for name, key, v in rows]


def format_table(rows: list[tuple[str, str, Verdict]]) -> str:
    cells = [[h for h, _ in TABLE_COLUMNS]]
    keys = _keys_by_path(rows)
    for name, key, v in rows:
        d = {"path": name, "curve": curve_name(key, keys[name]),
             **{f: getattr(v, f) for _, f in TABLE_COLUMNS[2:]}}
        digits = {"final_over_best": 3, "max_drawdown": 3}
        cells.append([_fmt(d[f], digits.get(f, 4)) for _, f in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for r in cells:
        parts = [c.ljust(w) for c, w in zip(r[:3], widths[:3], strict=True)]
        parts += [c.rjust(w) for c, w in zip(r[3:], widths[3:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    compared = comparison_lines(rows)
    if compared:
        lines += ["", *compared]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="yoloqat judge",
        description="Label training runs stable / collapsed / unstable / diverged / "
        "no_learning / too_short from their whole validation mAP50-95 curve.",
    )
    ap.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="results.csv, DVCLive metric .tsv, or DVCLive/Ultralytics run directory",
    )
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument(
        "--params", default="params.yaml",
        help="params file whose stability block sets the thresholds (default: params.yaml; "
        "defaults are used when it does not exist)",
    )
    return ap


def judged_rows(curves: list[RunCurve], cfg: StabilityConfig) -> list[tuple[str, str, Verdict]]:
    """(path, curve key, verdict) for every val curve of every run, the primary curve first."""
    rows = []
    for c in curves:
        for key, values in c.series.items() or [(PRIMARY, c.values)]:
            rows.append((c.name, key, classify_run(values, c.losses, cfg)))
    return rows


def judge_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = stability_config(args.params)
        curves = [read_curve(p) for p in args.paths]
    except (CurveError, ConfigError) as exc:
        print(f"yoloqat judge: error: {exc}", file=sys.stderr)
        return 2
    rows = judged_rows(curves, cfg)
    if args.json:
        print(json.dumps(json_rows(curves, rows), indent=2))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(judge_main(sys.argv[1:]))
