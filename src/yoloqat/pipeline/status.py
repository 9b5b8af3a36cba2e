"""The one upstream-status rule: did an earlier stage record a diverged QAT run?

The qat stage writes ``status: diverged``; qc, export and evaluate pass it on as
``skipped_diverged`` instead of working on a non-finite model.  Every stage asks this module,
with the metrics files of the stages it depends on, in DAG order.
"""

from __future__ import annotations

from pathlib import Path

from yoloqat.config import Config
from yoloqat.provenance import read_metrics

DIVERGED = "diverged"
SKIPPED_DIVERGED = "skipped_diverged"
DIVERGED_STATES = (DIVERGED, SKIPPED_DIVERGED)


def recorded_status(path: Path) -> str | None:
    """The ``status`` a stage's metrics.json records, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        status = read_metrics(path).get("status")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return status if isinstance(status, str) else None


def diverged_upstream(cfg: Config, *metrics: Path) -> Path | None:
    """The first of ``metrics`` that records a diverged run, else None."""
    for rel in metrics:
        if recorded_status(cfg.resolve(rel)) in DIVERGED_STATES:
            return rel
    return None
