"""``yoloqat judge PATH...``: read training curves and print a stability verdict per run.

A PATH may be

* an Ultralytics ``results.csv`` of any YOLO version (older versions pad the header
  names with spaces; the mAP50-95 column is one of :data:`MAP_COLUMNS`; the training
  loss per epoch is the sum of the ``train/*loss`` columns);
* a DVCLive metric TSV (tab-separated: ``step``, optionally ``timestamp``, and one value
  column), e.g. ``results/qat/plots/metrics/val/mAP50-95.tsv``;
* a DVCLive directory, e.g. ``results/qat``, holding ``plots/metrics/val/mAP50-95.tsv``
  (and, if present, ``plots/metrics/train/*loss*.tsv``, summed per step), or an
  Ultralytics run directory holding ``results.csv``.

The verdict rules live in :mod:`yoloqat.stability`.  Thresholds come from the
``stability`` block of ``--params`` (default ``params.yaml``) when that file exists.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoloqat.config import ConfigError, StabilityConfig, load_config_for
from yoloqat.stability import Verdict, classify_run

MAP_COLUMNS = ("metrics/mAP50-95(B)", "metrics/mAP_0.5:0.95", "metrics/mAP50-95", "val/mAP50-95")
DVCLIVE_MAP = Path("plots/metrics/val/mAP50-95.tsv")
DVCLIVE_LOSS_DIR = Path("plots/metrics/train")
TSV_INDEX_COLUMNS = ("step", "timestamp")


class JudgeError(ValueError):
    """A curve that cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class RunCurve:
    name: str  # the path as given, used as the run's label
    values: list[float]  # validation mAP50-95 per epoch (or per DVCLive step)
    losses: list[float] | None = None  # summed training loss per epoch, if logged
    source: str = "ultralytics_csv"  # ultralytics_csv | dvclive_tsv | dvclive_dir
    path: Path = field(default_factory=Path)


# --------------------------------------------------------------------------------------------
# parsing helpers


def _float(text: str, path: Path, row: int, column: str) -> float:
    t = text.strip()
    if not t:
        raise JudgeError(f"judge: {path} row {row} has an empty {column} value")
    try:
        return float(t)
    except ValueError:
        raise JudgeError(
            f"judge: {path} row {row} has {t!r} in column {column}; expected a number"
        ) from None


def _read_table(path: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    """Header (stripped) and the non-blank rows (cells stripped)."""
    if not path.exists():
        raise JudgeError(f"judge: {path} does not exist; expected {_expected()}")
    if not path.is_file():
        raise JudgeError(f"judge: {path} is not a file; expected {_expected()}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [
                [c.strip() for c in r]
                for r in csv.reader(fh, delimiter=delimiter)
                if any(c.strip() for c in r)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise JudgeError(f"judge: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise JudgeError(f"judge: {path} is empty; expected a header and one row per epoch")
    header, body = rows[0], rows[1:]
    if not body:
        raise JudgeError(f"judge: {path} has a header but no rows; expected one row per epoch")
    return header, body


def _expected() -> str:
    return (
        "an Ultralytics results.csv, a DVCLive metric .tsv, or a DVCLive directory with "
        f"{DVCLIVE_MAP}"
    )


def _cell(row: list[str], i: int) -> str:
    return row[i] if i < len(row) else ""


def _by_step(
    path: Path, header: list[str], body: list[list[str]], key: str, col: int
) -> list[tuple[float, float]]:
    """(step, value) pairs; a repeated step (a resumed run) keeps its last value."""
    k = header.index(key)
    out: dict[float, float] = {}
    for n, row in enumerate(body, start=2):
        step = _float(_cell(row, k), path, n, key)
        out[step] = _float(_cell(row, col), path, n, header[col])
    return sorted(out.items())


# --------------------------------------------------------------------------------------------
# the three sources


def _read_results_csv(path: Path, name: str) -> RunCurve:
    header, body = _read_table(path, ",")
    lookup = {h: i for i, h in enumerate(header)}
    lower = {h.lower(): i for i, h in enumerate(header)}
    col = next((lookup[c] for c in MAP_COLUMNS if c in lookup), None)
    if col is None:
        col = next((lower[c.lower()] for c in MAP_COLUMNS if c.lower() in lower), None)
    if col is None:
        raise JudgeError(
            f"judge: {path} has no mAP50-95 column (looked for {', '.join(MAP_COLUMNS)})"
        )
    loss_cols = [i for i, h in enumerate(header) if h.startswith("train/") and h.endswith("loss")]

    epoch_col = lookup.get("epoch")
    # a resumed run may repeat epochs: keep the last row of each (keyed by row without one)
    keyed: dict[float, tuple[float, float | None]] = {}
    for n, row in enumerate(body, start=2):
        key = float(n) if epoch_col is None else _float(_cell(row, epoch_col), path, n, "epoch")
        value = _float(_cell(row, col), path, n, header[col])
        loss = (
            math.fsum(_float(_cell(row, i), path, n, header[i]) for i in loss_cols)
            if loss_cols
            else None
        )
        keyed[key] = (value, loss)
    rows = [keyed[k] for k in sorted(keyed)]
    losses = [r[1] for r in rows if r[1] is not None]
    return RunCurve(
        name=name,
        values=[r[0] for r in rows],
        losses=losses if loss_cols else None,
        source="ultralytics_csv",
        path=path,
    )


def _tsv_series(path: Path) -> list[tuple[float, float]]:
    header, body = _read_table(path, "\t")
    if "step" not in header:
        raise JudgeError(f"judge: {path} has no step column; expected a DVCLive metric TSV")
    others = [i for i, h in enumerate(header) if h not in TSV_INDEX_COLUMNS]
    if len(others) != 1:
        raise JudgeError(
            f"judge: {path} has {len(others)} value columns; expected a DVCLive metric TSV "
            "with step and exactly one value column"
        )
    return _by_step(path, header, body, "step", others[0])


def _read_dvclive_tsv(path: Path, name: str) -> RunCurve:
    return RunCurve(
        name=name,
        values=[v for _, v in _tsv_series(path)],
        losses=None,
        source="dvclive_tsv",
        path=path,
    )


def _read_dvclive_dir(path: Path, name: str) -> RunCurve:
    series = _tsv_series(path / DVCLIVE_MAP)
    losses: list[float] | None = None
    loss_dir = path / DVCLIVE_LOSS_DIR
    loss_files = sorted(loss_dir.glob("*loss*.tsv")) if loss_dir.is_dir() else []
    if loss_files:
        total: dict[float, list[float]] = {}
        for f in loss_files:
            for step, value in _tsv_series(f):
                total.setdefault(step, []).append(value)
        losses = [math.fsum(total[s]) for s in sorted(total)]
    return RunCurve(
        name=name,
        values=[v for _, v in series],
        losses=losses,
        source="dvclive_dir",
        path=path,
    )


def read_curve(path: str | Path) -> RunCurve:
    """Read one run's validation mAP50-95 curve; raises JudgeError with a one-line message."""
    name = str(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise JudgeError(f"judge: {p} does not exist; expected {_expected()}")
    if p.is_dir():
        if (p / DVCLIVE_MAP).is_file():
            return _read_dvclive_dir(p, name)
        if (p / "results.csv").is_file():
            return _read_results_csv(p / "results.csv", name)
        raise JudgeError(
            f"judge: {p} is a directory without {DVCLIVE_MAP} or results.csv; "
            "expected a DVCLive or Ultralytics run directory"
        )
    if p.suffix.lower() == ".tsv":
        return _read_dvclive_tsv(p, name)
    return _read_results_csv(p, name)


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
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


TABLE_COLUMNS = (
    ("path", "path"),
    ("label", "label"),
    ("best", "best"),
    ("best_ep", "best_epoch"),
    ("final", "final"),
    ("final/best", "final_over_best"),
    ("max_dd", "max_drawdown"),
    ("collapses", "collapse_events"),
    ("ep_collapsed", "epochs_collapsed"),
)


def format_table(rows: list[tuple[str, Verdict]]) -> str:
    cells = [[h for h, _ in TABLE_COLUMNS]]
    for name, v in rows:
        d = {"path": name, **{f: getattr(v, f) for _, f in TABLE_COLUMNS[1:]}}
        digits = {"final_over_best": 3, "max_drawdown": 3}
        cells.append([_fmt(d[f], digits.get(f, 4)) for _, f in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for r in cells:
        parts = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        parts += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="yoloqat judge",
        description="Label training runs stable / collapsed / unstable / diverged / "
        "no_learning from their whole validation mAP50-95 curve.",
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


def judge_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = stability_config(args.params)
        curves = [read_curve(p) for p in args.paths]
    except (JudgeError, ConfigError) as exc:
        msg = str(exc).removeprefix("judge: ")
        print(f"yoloqat judge: error: {msg}", file=sys.stderr)
        return 2
    rows = [(c.name, classify_run(c.values, c.losses, cfg)) for c in curves]
    if args.json:
        out = [
            {"path": c.name, "source": c.source, **v.as_dict()}
            for c, (_, v) in zip(curves, rows, strict=True)
        ]
        print(json.dumps(out, indent=2))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(judge_main(sys.argv[1:]))
