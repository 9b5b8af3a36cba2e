"""The one reader of per-epoch training curves, with one rule for missing and non-finite epochs.

Sources:

* a DVCLive folder (``results/qat``) holding ``plots/metrics/<group>/mAP50-95.tsv`` for every
  validation curve it logged (``val``: the model the run deploys; ``val_live`` / ``val_ema``:
  the paired live and EMA weights) and ``plots/metrics/train/*loss*.tsv``;
* a single DVCLive metric TSV (``step``, optionally ``timestamp``, one value column);
* an Ultralytics ``results.csv`` of any YOLO version (older ones pad header names), or a run
  folder holding one.

The rule (used by the verdict stage, ``yoloqat judge``, the ladder and the report alike): a
curve has one value per epoch of the run; an epoch whose value is missing (DVCLive refuses to
log NaN, so a diverged epoch leaves a gap) or not finite is NaN, and a NaN anywhere makes the
stability verdict ``diverged``.  One exception, thinned curves: the repair curves of a run with
``qat.repair_every = k`` have values at epochs k, 2k, ... and the last epoch only
(:func:`scored_epochs`).  A curve whose finite values sit exactly on such a schedule (k >= 2)
and nowhere else is judged on those epochs (:func:`judged_points`); any other gap is still NaN.
In a DVCLive folder the run's epochs are every step that any of
its TSVs logged (the learning rate is logged every epoch), so even a NaN final epoch is seen.
A repeated step (a resumed run) keeps its last value.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yoloqat.curves.keys import (
    DVCLIVE_PLOTS,
    MAP,
    PRIMARY,
    PRIMARY_TSV,
    TRAIN,
    TRAIN_DIR,
    TSV_SUFFIX,
    is_tsv,
    is_val_curve,
    series_of_tsv,
)
from yoloqat.errors import CurveError

# Ultralytics results.csv columns of the val mAP50-95, by version
MAP_COLUMNS = (f"metrics/{MAP}(B)", "metrics/mAP_0.5:0.95", f"metrics/{MAP}", PRIMARY)
TSV_INDEX_COLUMNS = ("step", "timestamp")


@dataclass(frozen=True)
class RunCurve:
    name: str  # the path as given, used as the run's label
    values: list[float]  # the primary val mAP50-95 per epoch, NaN where missing/non-finite
    losses: list[float] | None = None  # summed training loss per epoch, if logged
    source: str = "ultralytics_csv"  # ultralytics_csv | dvclive_tsv | dvclive_dir
    path: Path = field(default_factory=Path)
    series: dict[str, list[float]] = field(default_factory=dict)  # every val curve by key


def expected_inputs() -> str:
    return (
        "an Ultralytics results.csv, a DVCLive metric .tsv, or a DVCLive directory with "
        f"{PRIMARY_TSV}"
    )


# --------------------------------------------------------------------------------------------
# parsing


def _number(text: str, where: str, row: int, column: str) -> float:
    t = text.strip()
    if not t:
        raise CurveError(f"{where} row {row} has an empty {column} value")
    try:
        return float(t)
    except ValueError:
        raise CurveError(f"{where} row {row} has {t!r} in column {column}; expected a number") from None


def _rows(text: str, where: str, delimiter: str) -> tuple[list[str], list[list[str]]]:
    try:
        rows = [
            [c.strip() for c in r]
            for r in csv.reader(io.StringIO(text), delimiter=delimiter)
            if any(c.strip() for c in r)
        ]
    except csv.Error as exc:
        raise CurveError(f"{where} cannot be parsed ({exc})") from None
    if not rows:
        raise CurveError(f"{where} is empty; expected a header and one row per epoch")
    if len(rows) == 1:
        raise CurveError(f"{where} has a header but no rows; expected one row per epoch")
    return rows[0], rows[1:]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise CurveError(f"{path} does not exist; expected {expected_inputs()}")
    if not path.is_file():
        raise CurveError(f"{path} is not a file; expected {expected_inputs()}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurveError(f"{path} cannot be read ({type(exc).__name__})") from None


def _cell(row: list[str], i: int) -> str:
    return row[i] if i < len(row) else ""


def parse_tsv(text: str, where: str) -> dict[int, float]:
    """A DVCLive metric TSV as {step: value}; a repeated step keeps its last value."""
    header, body = _rows(text, where, "\t")
    if "step" not in header:
        raise CurveError(f"{where} has no step column; expected a DVCLive metric TSV")
    others = [i for i, h in enumerate(header) if h not in TSV_INDEX_COLUMNS]
    if len(others) != 1:
        raise CurveError(
            f"{where} has {len(others)} value columns; expected a DVCLive metric TSV "
            "with step and exactly one value column"
        )
    k, col = header.index("step"), others[0]
    out: dict[int, float] = {}
    for n, row in enumerate(body, start=2):
        step = _number(_cell(row, k), where, n, "step")
        if step < 0 or step != int(step):
            raise CurveError(f"{where} row {n} has step {step:g}; expected 0, 1, 2, ...")
        out[int(step)] = _number(_cell(row, col), where, n, header[col])
    return out


def scored_epochs(epochs: int, every: int) -> list[int]:
    """The 1-based epochs at which a curve scored every ``every`` epochs has a value: every
    ``every``-th epoch and always the last (``qat.repair_every``)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]


def thinning(values: Sequence[float]) -> int:
    """``k`` when ``values`` (one per epoch of the run, NaN where missing) has finite values at
    exactly :func:`scored_epochs` ``(len(values), k)`` for some k >= 2 and NaN elsewhere, else 1
    (a curve of every epoch, whose gaps are missing values)."""
    have = [i + 1 for i, v in enumerate(values) if math.isfinite(v)]
    if not have or have[0] < 2 or len(have) == len(values):
        return 1
    k = have[0]
    return k if have == scored_epochs(len(values), k) else 1


def judged_points(values: Sequence[float]) -> tuple[list[int], list[float]]:
    """(1-based epochs, values) a curve is judged on: every epoch, or for a thinned curve
    (:func:`thinning`) its scored epochs only."""
    k = thinning(values)
    epochs = list(range(1, len(values) + 1)) if k == 1 else scored_epochs(len(values), k)
    return epochs, [float(values[e - 1]) for e in epochs]


def on_epochs(by_step: dict[int, float], steps: Iterable[int]) -> list[float]:
    """The one rule: a value for every step of the run, NaN where missing or not finite."""
    out = []
    for s in steps:
        v = by_step.get(s, math.nan)
        out.append(v if math.isfinite(v) else math.nan)
    return out


def steps_up_to(*series: dict[int, float]) -> list[int]:
    """0 .. the last step logged by any series (a gap inside is an epoch without a value)."""
    last = max((max(s) for s in series if s), default=-1)
    return list(range(last + 1))




def on_run_epochs(by_name: dict[str, dict[int, float]]) -> dict[str, list[float]]:
    """Every metric of one DVCLive folder (``{DVCLive name: {step: value}}``) on the run's
    epochs: every step any of them logged, NaN where a metric has no finite value."""
    steps = steps_up_to(*by_name.values())
    return {name: on_epochs(s, steps) for name, s in sorted(by_name.items())}


# --------------------------------------------------------------------------------------------
# the three sources


def read_results_csv(path: Path, name: str | None = None) -> RunCurve:
    where = str(path)
    header, body = _rows(_read_text(path), where, ",")
    lookup = {h: i for i, h in enumerate(header)}
    lower = {h.lower(): i for i, h in enumerate(header)}
    col = next((lookup[c] for c in MAP_COLUMNS if c in lookup), None)
    if col is None:
        col = next((lower[c.lower()] for c in MAP_COLUMNS if c.lower() in lower), None)
    if col is None:
        raise CurveError(f"{where} has no mAP50-95 column (looked for {', '.join(MAP_COLUMNS)})")
    loss_cols = [i for i, h in enumerate(header) if h.startswith(TRAIN + "/") and h.endswith("loss")]
    epoch_col = lookup.get("epoch")
    keyed: dict[float, tuple[float, float | None]] = {}
    for n, row in enumerate(body, start=2):
        key = float(n) if epoch_col is None else _number(_cell(row, epoch_col), where, n, "epoch")
        value = _number(_cell(row, col), where, n, header[col])
        loss = (
            math.fsum(_number(_cell(row, i), where, n, header[i]) for i in loss_cols)
            if loss_cols else None
        )
        keyed[key] = (value if math.isfinite(value) else math.nan, loss)
    rows = [keyed[k] for k in sorted(keyed)]
    values = [r[0] for r in rows]
    return RunCurve(
        name=name or where, values=values,
        losses=[r[1] for r in rows if r[1] is not None] if loss_cols else None,
        source="ultralytics_csv", path=path, series={PRIMARY: values},
    )


def read_tsv(path: Path, name: str | None = None) -> RunCurve:
    by_step = parse_tsv(_read_text(path), str(path))
    values = on_epochs(by_step, steps_up_to(by_step))
    return RunCurve(name=name or str(path), values=values, source="dvclive_tsv", path=path,
                    series={PRIMARY: values})


def read_live_dir(path: Path, name: str | None = None) -> RunCurve:
    """Every val curve and the summed training loss of a DVCLive folder, on the run's epochs."""
    plots = path / DVCLIVE_PLOTS
    every = {f: parse_tsv(_read_text(f), str(f)) for f in sorted(plots.rglob("*" + TSV_SUFFIX))}
    steps = steps_up_to(*every.values())
    aligned = on_run_epochs({series_of_tsv(f.relative_to(plots).as_posix()): s for f, s in every.items()})
    series = {name: values for name, values in aligned.items() if is_val_curve(name)}
    if PRIMARY not in series:
        raise CurveError(f"{path} has no {PRIMARY_TSV}; expected {expected_inputs()}")
    loss_files = [f for f in every if f.parent == path / TRAIN_DIR and "loss" in f.name]
    losses = None
    if loss_files:
        losses = [math.fsum(every[f].get(s, math.nan) for f in loss_files) for s in steps]
    return RunCurve(name=name or str(path), values=series[PRIMARY], losses=losses,
                    source="dvclive_dir", path=path, series=dict(sorted(series.items())))


def read_curve(path: str | Path) -> RunCurve:
    """Read one run's curves; raises CurveError with a one-line message."""
    name = str(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise CurveError(f"{p} does not exist; expected {expected_inputs()}")
    if p.is_dir():
        if (p / PRIMARY_TSV).is_file():
            return read_live_dir(p, name)
        if (p / "results.csv").is_file():
            return read_results_csv(p / "results.csv", name)
        raise CurveError(
            f"{p} is a directory without {PRIMARY_TSV} or results.csv; "
            "expected a DVCLive or Ultralytics run directory"
        )
    if is_tsv(p.suffix.lower()):
        return read_tsv(p, name)
    return read_results_csv(p, name)
