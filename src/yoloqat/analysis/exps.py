"""``yoloqat exps``: one compact line per DVC experiment, the columns a reader compares.

``dvc exp show`` prints every param and metric (and prefixes a name with its file when two files
share it), which is too wide to read.  This table picks what answers the question: the run's
model / method / seed, the QAT live (control) and EMA (method) curves' best and final mAP50-95
and verdicts, QC's own effect, and the deployed W4A16 vs FP32 mAP on onnxruntime with the size
ratio.  It fits in 160 columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from yoloqat.analysis.experiments import ExpRecord
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
    ("live verdict", 12, lambda r: r.verdict.get("live_label")),
    ("ema verdict", 11, lambda r: r.verdict.get("ema_label")),
    ("QC delta", 8, lambda r: _num(r, "verdict", "qc_delta_mAP50-95", "+.4f")),
    ("W4A16", 6, lambda r: _num(r, "evaluate", "w4a16_mAP50-95")),
    ("FP32", 6, lambda r: _num(r, "evaluate", "fp32_mAP50-95")),
    ("size", 5, lambda r: _num(r, "evaluate", "size_ratio", ".3f")),
    ("state", 7, lambda r: r.state),
)


def _num(rec: ExpRecord, stage: str, key: str, spec: str = ".4f") -> str | None:
    v = finite_number(rec.metrics.get(stage, {}).get(key))
    return None if v is None else format(v, spec)


def _cell(value: Any, width: int) -> str:
    text = "-" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
    return text if len(text) <= width else text[: width - 1] + "~"


def experiment_rows(records: Sequence[ExpRecord]) -> list[ExpRecord]:
    """The experiments (not the workspace or plain commits), oldest first."""
    exps = [r for r in records if r.kind == "experiment"]
    return sorted(exps, key=lambda r: (r.timestamp or "", r.name))


def format_exps(records: Sequence[ExpRecord]) -> str:
    lines = [" ".join(h.ljust(w) for h, w, _ in COLUMNS).rstrip()]
    for rec in experiment_rows(records):
        lines.append(" ".join(_cell(get(rec), w).ljust(w) for _, w, get in COLUMNS).rstrip())
    return "\n".join(lines)
