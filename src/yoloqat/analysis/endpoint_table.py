"""Endpoint tables: how much each curve of a group of seed runs gained or lost against live.

One row per curve (the ladder: live, EMA and each repair of each model, of one setting; the
remedies report: one row per variant), with, over seeds:

* ``stable``: curves labelled ``stable`` / curves judged (``too_short`` is not judged);
* ``best``, ``final``, ``drawdown`` (post-peak, mAP), ``AUC`` (mean mAP50-95 per epoch after
  ``ceil(qat.warmup_epochs)`` warm-up epochs): mean ± sd over the seeds, defined in
  :mod:`yoloqat.curves.endpoints`; ``(k)`` after a cell when only k of the row's seeds had the
  value (a diverged curve has no endpoints; a run whose curve could not be read has best and
  final from its verdict, and no drawdown or AUC);
* ``Δ AUC vs live``: the mean over seeds of the row's AUC minus the live curve's AUC of the same
  seed, its 95 % interval (exact sign-flip inversion: infinite below 6 pairs) and the exact
  paired sign-flip p-values, one-sided (row higher than live) and two-sided
  (:func:`yoloqat.analysis.paired.sign_flip`);
* ``not stable``: the other labels, counted: secondary, the stability rules' reading of the
  same curves.

Curves are read with a :data:`Reader` ``(record, DVCLive TSV path) -> values or None``; the
default reads the run's curves (its archive file, or the TSVs at its revision: :func:`run_curves`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yoloqat.analysis.exp_curves import (
    EMA_TSV,
    FP_CONTROL_TSV,
    LIVE_FOLDERS,
    LIVE_TSV,
    MAP_TSV,
    fp_control_ran,
    run_curves,
)
from yoloqat.analysis.ladder_groups import Group, differing_keys, merge_order
from yoloqat.analysis.paired import SignFlip, sign_flip
from yoloqat.analysis.records import ExpRecord, resolved_params
from yoloqat.analysis.rejudge import current_label
from yoloqat.curves.compare import CURVE_ROWS
from yoloqat.curves.endpoints import endpoints, warmup_skip
from yoloqat.curves.keys import DVCLIVE_PLOTS, curve_key, series_of_tsv, tsv_of
from yoloqat.curves.stability import LABELS, STABLE, TOO_SHORT
from yoloqat.numbers import finite_number
from yoloqat.paths import QAT_RESULTS

Reader = Callable[[ExpRecord, str], "list[float] | None"]
ENDPOINTS = ("best", "final", "drawdown", "auc")
PRIMARY = "auc"  # the endpoint the paired difference is on
# the ladder's rows: the verdict prefix / DVCLive group suffix of each curve, and its name
HEADER = ("curve", "stable", "best", "final", "drawdown", "AUC", "Δ AUC vs live [95% CI]",
          "p (>, ≠)", "not stable")


def curve_tsv(key: str) -> str:
    """The DVCLive TSV of a curve prefix (live, ema_qc, ...) in the qat results."""
    return tsv_of(QAT_RESULTS, curve_key(key))


def default_reader(repo: str | Path = ".") -> Reader:
    """Reads a run's curve by its TSV path (QAT's, or a float stage's) from the run's curves
    (its archive file, or DVCLive's files at its revision: :func:`run_curves`), each run read
    once."""
    runs: dict[tuple[str, str | None], Any] = {}
    folders = {stage: (results / DVCLIVE_PLOTS).as_posix() + "/"
               for stage, results in LIVE_FOLDERS.items()}

    def read(rec: ExpRecord, path: str) -> list[float] | None:
        stage = next((st for st, folder in folders.items() if path.startswith(folder)), None)
        if stage is None:
            return None
        curves = runs.setdefault((rec.name, rec.rev), run_curves(rec, repo))
        values = curves.get(stage, {}).get(series_of_tsv(path[len(folders[stage]):]))
        return list(values) if values else None

    return read


@dataclass(frozen=True)
class Obs:
    """One seed's curve in a row."""

    pair: Any  # what pairs it with the control: the seed (or the run's position)
    label: str | None
    values: dict[str, float | None]  # ENDPOINTS
    from_curve: bool  # False: the curve could not be read, best/final are the verdict's


@dataclass(frozen=True)
class EndpointRow:
    name: str
    obs: tuple[Obs, ...]
    vs_live: SignFlip | None = None  # paired difference of PRIMARY (None on the live row)
    is_control: bool = False

    def column(self, endpoint: str) -> list[float]:
        return [v for o in self.obs if (v := o.values.get(endpoint)) is not None]

    @property
    def judged(self) -> int:
        return sum(1 for o in self.obs if o.label is not None and o.label != TOO_SHORT)

    @property
    def stable(self) -> int:
        return sum(1 for o in self.obs if o.label == STABLE)

    def as_dict(self) -> dict[str, Any]:
        return {"curve": self.name, "stable": self.stable, "judged": self.judged,
                "seeds": [{"pair": o.pair, "label": o.label, "from_curve": o.from_curve,
                           **o.values} for o in self.obs],
                "vs_live": self.vs_live.as_dict() if self.vs_live else None}


def observe(pair: Any, label: str | None, series: list[float] | None, skip: int,
            verdict: dict[str, Any] | None = None, prefix: str = "") -> Obs:
    """One seed's endpoints: from its curve when read, else best/final from its verdict."""
    if series:
        e = endpoints(series, skip)
        return Obs(pair, label, {k: getattr(e, k) for k in ENDPOINTS}, True)
    v = verdict or {}
    diverged = label == "diverged"  # a diverged curve has no endpoints, whatever it logged
    values = {k: None if diverged or k not in ("best", "final") else
              finite_number(v.get(f"{prefix}{k}")) for k in ENDPOINTS}
    return Obs(pair, label, values, False)


def with_paired(rows: Sequence[EndpointRow], control: EndpointRow | None) -> list[EndpointRow]:
    """Each row with its paired difference to ``control`` (AUC, matched on ``Obs.pair``)."""
    if control is None:
        return list(rows)
    base = {o.pair: o.values.get(PRIMARY) for o in control.obs}
    out = []
    for row in rows:
        if row is control:
            out.append(EndpointRow(row.name, row.obs, None, True))
            continue
        diffs = [v - base[o.pair] for o in row.obs
                 if (v := o.values.get(PRIMARY)) is not None and base.get(o.pair) is not None]
        out.append(EndpointRow(row.name, row.obs, sign_flip(diffs)))
    return out


# --------------------------------------------------------------------------------------------
# formatting


def _pm(xs: Sequence[float], of: int) -> str:
    if not xs:
        return "-"
    text = f"{xs[0]:.3f}" if len(xs) == 1 else f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"
    return text if len(xs) == of else f"{text} ({len(xs)})"


def _bound(x: float) -> str:
    return f"{x:+.3f}" if abs(x) != float("inf") else ("-inf" if x < 0 else "+inf")


def _labels(obs: Iterable[Obs]) -> str:
    """The labels other than stable, counted (the stable ones are the ``stable`` column)."""
    counts: dict[str, int] = {}
    for o in obs:
        if o.label != STABLE:
            counts[o.label or "no label"] = counts.get(o.label or "no label", 0) + 1
    order = [*LABELS, *sorted(set(counts) - set(LABELS))]
    return ", ".join(f"{counts[k]} {k}" for k in order if k in counts) or "-"


def row_cells(row: EndpointRow) -> list[str]:
    n = len(row.obs)
    d = row.vs_live
    if row.is_control:
        diff, p = "(control)", "-"
    elif d is None:
        diff, p = "-", "-"
    else:
        diff = f"{d.mean:+.3f} [{_bound(d.low)}, {_bound(d.high)}]" + (f" ({d.n})" if d.n != n else "")
        p = f"{d.p_greater:.3f}/{d.p_two_sided:.3f}"
    return [row.name, f"{row.stable}/{row.judged}",
            *(_pm(row.column(k), n) for k in ENDPOINTS), diff, p, _labels(row.obs)]


def format_rows(rows: Sequence[EndpointRow], markdown: bool = False,
                first: str = HEADER[0]) -> str:
    """The table, aligned plain text (the ladder) or markdown (the remedies README)."""
    header = [first, *HEADER[1:]]
    cells = [header, *(row_cells(r) for r in rows)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells[1:]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


LEGEND = ("mean ± sd over seeds, (k): only k seeds had it; drawdown: best minus the lowest value "
          "after the best epoch;\nAUC: mean val mAP50-95 per epoch after {warmup}; Δ: paired by "
          "{pairing}, 95% CI by exact sign-flip inversion\n(infinite below 6 pairs); p: exact "
          "paired sign-flip test, one-sided (higher than live) / two-sided.")


# --------------------------------------------------------------------------------------------
# the ladder: one table per setting


def _seed(rec: ExpRecord) -> int | None:
    s = rec.params.get("seed")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _source(recs: Sequence[ExpRecord], key: str) -> tuple[ExpRecord, str, list[str]] | None:
    """The record that gives a seed's ``key`` curve (the ladder's merge order), its verdict
    prefix and the TSVs that may hold the curve (first found wins)."""
    for rec in recs:
        v, ema = rec.verdict, bool(rec.params.get("ema"))
        if isinstance(v.get(f"{key}_label"), str):
            if key == "live":
                return rec, "live_", [LIVE_TSV] + ([] if ema else [MAP_TSV])
            if key == "ema":
                return rec, "ema_", [EMA_TSV, MAP_TSV]
            return rec, f"{key}_", [curve_tsv(key)]
        if isinstance(v.get("label"), str) and "live_label" not in v and (key == "ema") == ema \
                and key in ("live", "ema"):
            return rec, "", [MAP_TSV]  # a run from before the paired curves: its deployed curve
    return None


def _unlabelled_repair(recs: Sequence[ExpRecord], key: str, read: Reader,
                       skip: int) -> tuple[str, dict[str, float | None]] | None:
    """A repair curve a run logged while its stored verdict has no label for it (runs made
    before the verdict kept repair labels): the label under today's rules, and its endpoints."""
    if key in ("live", "ema"):
        return None
    for rec in recs:
        if series := read(rec, curve_tsv(key)):
            e = endpoints(series, skip)
            return current_label(rec, list(series)), {k: getattr(e, k) for k in ENDPOINTS}
    return None


def group_rows(group: Group, read: Reader) -> list[EndpointRow]:
    """The endpoint rows of one ladder group (only the curves some seed has)."""
    skip = group_skip(group)
    by_seed: dict[int, list[ExpRecord]] = {}
    for rec in group.records:
        if (s := _seed(rec)) is not None:
            by_seed.setdefault(s, []).append(rec)
    rows = []
    for key, name in CURVE_ROWS:
        obs = []
        for run in group.runs:
            recs = merge_order(by_seed.get(run.seed, []))
            src = _source(recs, key)
            if src is None:
                if (late := _unlabelled_repair(recs, key, read, skip)) is not None:
                    obs.append(Obs(run.seed, late[0], late[1], True))
                continue
            rec, prefix, paths = src
            series = next((c for p in paths if (c := read(rec, p))), None)
            obs.append(observe(run.seed, rec.verdict.get(f"{prefix}label"), series, skip,
                               rec.verdict, prefix))
        if obs:
            rows.append(EndpointRow(name, tuple(obs)))
    if control := _fp_control_row(group, by_seed, read, skip):
        rows.append(control)
    return with_paired(rows, next((r for r in rows if r.name == "live"), None))


FP_CONTROL_ROW = "FP cont."  # the FP model trained on with QAT's own recipe, unquantized


def _fp_control_row(group: Group, by_seed: dict[int, list[ExpRecord]], read: Reader,
                    skip: int) -> EndpointRow | None:
    """The FP-continued control of each seed (``fp.control``: QAT's optimizer, schedule and
    augmentation, no quantization), judged by today's rules: a dip it shows too is the recipe's,
    not quantization's.  None when no seed trained it."""
    obs = []
    for run in group.runs:
        for rec in merge_order(by_seed.get(run.seed, [])):
            if fp_control_ran(rec) and (series := read(rec, FP_CONTROL_TSV)):
                e = endpoints(series, skip)
                obs.append(Obs(run.seed, current_label(rec, list(series)),
                               {k: getattr(e, k) for k in ENDPOINTS}, True))
                break
    return EndpointRow(FP_CONTROL_ROW, tuple(obs)) if obs else None


def group_skip(group: Group) -> int:
    return warmup_skip(dict(group.setting.values).get("qat.warmup_epochs"))


@dataclass(frozen=True)
class GroupTable:
    group: Group
    title: str
    skip: int
    rows: list[EndpointRow]


def ladder_tables(groups: Sequence[Group], read: Reader) -> list[GroupTable]:
    keys = differing_keys(groups)
    out = []
    for g in groups:
        if g.runs:
            title = (f"{g.model} {g.setting.describe(keys)} (seeds "
                     f"{', '.join(str(r.seed) for r in g.runs)})")
            out.append(GroupTable(g, title, group_skip(g), group_rows(g, read)))
    return out


def ladder_text(tables: Sequence[GroupTable]) -> str:
    parts = []
    for t in tables:
        parts += [f"Endpoints: {t.title}, AUC from epoch {t.skip + 1}",
                  format_rows(t.rows) if t.rows else "no curves", ""]
    if tables:
        parts.append(LEGEND.format(warmup="ceil(qat.warmup_epochs) warm-up epochs", pairing="seed"))
    return "\n".join(parts).rstrip("\n")


def ladder_json(tables: Sequence[GroupTable]) -> list[dict[str, Any]]:
    return [{"model": t.group.model, "setting": t.title, "auc_skip_epochs": t.skip,
             "rows": [r.as_dict() for r in t.rows]} for t in tables]


# --------------------------------------------------------------------------------------------
# the remedies report: one row per variant


def remedies_rows(variants: Sequence[Any], by_name: dict[str, ExpRecord],
                  curves: dict[str, dict[str, list[float] | None]],
                  judge: Callable[[ExpRecord, str, list[float]], str]) -> tuple[list[EndpointRow], str]:
    """One row per variant (``Variant``: label, curve, names) vs the first variant whose curve
    is ``live`` (none: no paired difference).  Runs are paired by their ``seed`` param when
    every run has one, else by their position in the variant; returns (rows, how paired)."""
    runs = {v.label: [by_name[n] for n in v.names if n in by_name] for v in variants}
    by_seed = all(_seed(r) is not None for rs in runs.values() for r in rs)
    rows = []
    for v in variants:
        obs = []
        for i, rec in enumerate(runs[v.label]):
            if rec.state != "done":
                continue
            series = list(curves.get(rec.name, {}).get(v.curve) or [])
            if not any(finite_number(x) is not None for x in series):
                continue  # the run has no such curve (EMA off, BN re-estimation off)
            skip = warmup_skip(resolved_params(rec.params).get("qat.warmup_epochs"))
            obs.append(observe(_seed(rec) if by_seed else i, judge(rec, v.curve, series),
                               series, skip))
        rows.append(EndpointRow(v.label, tuple(obs)))
    control = next((r for r, v in zip(rows, variants, strict=True) if v.curve == "live"), None)
    return with_paired(rows, control), "seed" if by_seed else "position in the variant"


def remedies_text(rows: Sequence[EndpointRow], pairing: str) -> str:
    legend = LEGEND.format(warmup="each run's ceil(qat.warmup_epochs) warm-up epochs",
                           pairing=pairing).replace("\n", " ")
    return (format_rows(rows, markdown=True, first="variant") + "\n\n"
            + legend.replace("higher than live", "higher than the first live row, the control"))
