"""``yoloqat exps``: one compact line per DVC experiment, the columns a reader compares.

``dvc exp show`` prints every param and metric (and prefixes a name with its file when two files
share it), which is too wide to read.  This table picks what answers the question: the run's
model / method / seed, the QAT live (control) and EMA (method) curves' best and final mAP50-95,
EMA minus live (best, final, max drawdown: the paired answer of one training run) and the
verdicts, QC's own effect, and the deployed W4A16 mAP and the FP-continued model's on
onnxruntime.  It fits in 160 columns.  When runs logged repair curves (``qat.repair_curves``), a
second table gives each repair minus the model it repairs (e.g. EMA + QC minus EMA).

Numbers of one checkpoint differ between columns for a reason: the curves (``live``/``ema``) are
the qat stage's Ultralytics validation during training; ``W4A16`` and ``FP cont.`` are
onnxruntime on the evaluate stage's fixed square input (docs/pipeline.md "Why one checkpoint has
several numbers").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from yoloqat.analysis.records import ExpRecord
from yoloqat.numbers import finite_number

COLUMNS = (
    # header, width, how to get the value
    ("experiment", 16, lambda r: r.name),
    ("model", 7, lambda r: r.params.get("model")),
    ("ema", 5, lambda r: r.params.get("ema")),
    ("qc", 5, lambda r: r.params.get("qc")),
    ("seed", 4, lambda r: r.params.get("seed")),
    ("live best", 9, lambda r: _num(r, "qat", "live_best")),
    ("live fin", 8, lambda r: _num(r, "qat", "live_final")),
    ("ema best", 8, lambda r: _num(r, "qat", "ema_best")),
    ("ema fin", 7, lambda r: _num(r, "qat", "ema_final")),
    # EMA minus live on the same training run: best, final, max drawdown
    ("E-L best", 8, lambda r: _delta(r, "ema", "live", "best")),
    ("E-L fin", 7, lambda r: _delta(r, "ema", "live", "final")),
    ("E-L dd", 6, lambda r: _delta(r, "ema", "live", "max_drawdown")),
    ("live verdict", 12, lambda r: r.verdict.get("live_label")),
    ("ema verdict", 11, lambda r: r.verdict.get("ema_label")),
    ("QC delta", 8, lambda r: _num(r, "verdict", "qc_delta_mAP50-95", "+.4f")),
    ("W4A16", 6, lambda r: _num(r, "evaluate", "w4a16_mAP50-95")),
    ("FP cont.", 8, lambda r: _fp_continued(r)),
    ("state", 7, lambda r: r.state),
)
# the repair curves' table: (model, repair) as the verdict names them, e.g. ema_qc
REPAIR_COLUMNS = (("curve", 21), ("best", 7), ("final", 7), ("max dd", 6), ("verdict", 11))
DELTA_SPECS = {"best": "+.4f", "final": "+.4f", "max_drawdown": "+.2f"}


def _num(rec: ExpRecord, stage: str, key: str, spec: str = ".4f") -> str | None:
    v = finite_number(rec.metrics.get(stage, {}).get(key))
    return None if v is None else format(v, spec)


def _delta(rec: ExpRecord, curve: str, base: str, field: str) -> str | None:
    """``curve`` minus ``base`` (verdict prefixes, e.g. ``ema`` and ``live``): the verdict's
    ``<curve>_minus_<base>_<field>``, or for runs judged before it existed, the difference of the
    two curves' own ``<prefix>_<field>``."""
    v = rec.verdict
    diff = finite_number(v.get(f"{curve}_minus_{base}_{field}"))
    if diff is None:
        a, b = finite_number(v.get(f"{curve}_{field}")), finite_number(v.get(f"{base}_{field}"))
        diff = None if a is None or b is None else a - b
    return None if diff is None else format(diff, DELTA_SPECS[field])


def _fp_continued(rec: ExpRecord) -> str | None:
    """evaluate's FP32 mAP: the FP-continued model's when the run trained it (the verdict's
    ``fp_control_best``), else the FP baseline's, which is not this column's model."""
    if finite_number(rec.verdict.get("fp_control_best")) is None:
        return None
    return _num(rec, "evaluate", "fp32_mAP50-95")


def _cell(value: Any, width: int) -> str:
    text = "-" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
    return text if len(text) <= width else text[: width - 1] + "~"


def experiment_rows(records: Sequence[ExpRecord]) -> list[ExpRecord]:
    """The experiments (not the workspace or plain commits), oldest first."""
    exps = [r for r in records if r.kind == "experiment"]
    return sorted(exps, key=lambda r: (r.timestamp or "", r.name))


def repair_rows(rec: ExpRecord) -> list[list[str | None]]:
    """One row per repair curve the run logged: its name, minus its model (best, final, max
    drawdown) and its verdict."""
    from yoloqat.curves.compare import MODEL_TITLES, REPAIR_TITLES

    rows: list[list[str | None]] = []
    for model in ("live", "ema"):
        for repair in REPAIR_TITLES:
            name = f"{model}_{repair}"
            if rec.verdict.get(f"{name}_label") is None:
                continue
            rows.append([f"{MODEL_TITLES[model]} + {REPAIR_TITLES[repair]}",
                         *(_delta(rec, name, model, f) for f in DELTA_SPECS),
                         rec.verdict.get(f"{name}_label")])
    return rows


def format_exps(records: Sequence[ExpRecord]) -> str:
    lines = [" ".join(h.ljust(w) for h, w, _ in COLUMNS).rstrip()]
    rows = experiment_rows(records)
    for rec in rows:
        lines.append(" ".join(_cell(get(rec), w).ljust(w) for _, w, get in COLUMNS).rstrip())
    repairs = [(rec, row) for rec in rows for row in repair_rows(rec)]
    if repairs:
        lines += ["", "repair curves, minus the model they repair (best, final, max drawdown):"]
        header = [("experiment", 16), *REPAIR_COLUMNS]
        lines.append(" ".join(h.ljust(w) for h, w in header).rstrip())
        for rec, row in repairs:
            cells = [rec.name, *row]
            lines.append(" ".join(_cell(c, w).ljust(w)
                                  for c, (_, w) in zip(cells, header, strict=True)).rstrip())
    return "\n".join(lines)
