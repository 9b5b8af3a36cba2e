"""Per-epoch DVCLive logging for an Ultralytics trainer, with clean metric names.

Ultralytics names its metrics ``metrics/mAP50-95(B)``; the plots in dvc.yaml and the ladder
read ``val/mAP50-95``.  The logger is a plain object holding callbacks so it can be pickled
into DDP workers before its ``Live`` exists (only rank 0 ever opens one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yoloqat.curves.keys import PRIMARY, VAL
from yoloqat.numbers import finite_or_none


def clean_metric_name(name: str) -> str:
    """``metrics/mAP50-95(B)`` -> ``val/mAP50-95``; ``lr/pg0`` and ``train/box_loss`` kept."""
    if name.startswith("metrics/"):
        name = f"{VAL}/" + name[len("metrics/") :]
    return name.replace("(B)", "")




class EpochLogger:
    """Collects per-epoch metrics from a trainer and mirrors them to DVCLive.

    ``extra`` is called at each epoch end with the trainer and returns more metrics to log
    (the QAT stage adds oscillation statistics there).
    """

    def __init__(
        self, live_dir: Path | str, extra: Callable[[Any], dict[str, float]] | None = None,
        metrics_key: str | None = None,
    ):
        self.live_dir = str(live_dir)
        self.extra = extra
        self.metrics_key = metrics_key or Path(live_dir).name  # results/qat -> "qat"
        self.history: list[dict[str, float | None]] = []
        self._live: Any = None
        self._logged_epochs: set[int] = set()

    # -- Ultralytics callbacks ------------------------------------------------------------
    def open(self) -> None:
        """Open the Live folder (wiping an old one); only the process that logs calls this."""
        from dvclive import Live

        if self._live is None:
            self._live = Live(self.live_dir, dvcyaml=False, save_dvc_exp=False)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        # Ultralytics fires this event on every DDP rank and carries the callbacks into its
        # workers: only the rank that logs (0, or -1 without DDP) writes
        if int(os.environ.get("RANK", "-1")) not in (-1, 0):
            return
        epoch = int(trainer.epoch) + 1
        if getattr(trainer, "in_final_eval", False) or epoch in self._logged_epochs:
            return  # final_eval re-fires this event for best.pt; it is not an epoch
        self._logged_epochs.add(epoch)
        row: dict[str, float | None] = {"epoch": float(epoch)}
        if trainer.tloss is not None:
            for k, v in trainer.label_loss_items(trainer.tloss, prefix="train").items():
                loss = finite_or_none(v)
                row[k] = float("nan") if loss is None else loss  # a diverged loss stays visible
        for k, v in (trainer.metrics or {}).items():
            row[clean_metric_name(k)] = finite_or_none(v)
        for k, v in getattr(trainer, "lr", {}).items():
            row[k] = finite_or_none(v)
        if self.extra is not None:
            row.update(self.extra(trainer))
        self.history.append(row)
        self.log_row(row)

    # -- direct use (evaluation-only runs, the final summary) ------------------------------
    def log_row(self, row: dict[str, float | None]) -> None:
        self.open()
        for k, v in row.items():
            if k == "epoch":
                continue
            # DVCLive refuses NaN; a diverged value is logged as NaN-free by skipping it.
            if v is not None and math.isfinite(v):
                self._live.log_metric(k, v)
        self._live.next_step()

    def curve(self, key: str = PRIMARY) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in self.history]

    def finish(self, summary: dict[str, Any]) -> None:
        """Close DVCLive, then write ``metrics.json`` as the stage's results (not the last step's
        values, and nested under the stage name: see :func:`yoloqat.provenance.write_metrics`)."""
        from yoloqat.provenance import write_metrics

        self.open()
        self._live.end()  # DVCLive's own summary (last values + step) is replaced just below
        self._live = None
        write_metrics(Path(self.live_dir) / "metrics.json", self.metrics_key,
                      {k: v for k, v in summary.items() if v is not None})


def curve_summary(curve: list[float], prefix: str = "") -> dict[str, Any]:
    """Best, best epoch (1-based), final and final/best of a per-epoch curve."""
    finite = [(i, v) for i, v in enumerate(curve) if math.isfinite(v)]
    if not finite:
        return {f"{prefix}best": None, f"{prefix}best_epoch": None, f"{prefix}final": None}
    best_i, best = max(finite, key=lambda t: t[1])
    final = curve[-1] if math.isfinite(curve[-1]) else None
    return {
        f"{prefix}best": best,
        f"{prefix}best_epoch": best_i + 1,
        f"{prefix}final": final,
        f"{prefix}final_over_best": (final / best) if (final is not None and best > 0) else None,
    }
