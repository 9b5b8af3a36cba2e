"""Training-loop throughput of an Ultralytics trainer, from its epoch callbacks.

A stage's wall time mixes the batch loop with fixed costs (the first epoch's cuDNN and
dataloader warm-up, validation and checkpoint saves every epoch); on a small dataset those
dominate, so "images per second over the stage" says little about the loop.  This timer
measures the batch loop alone (``on_train_epoch_start`` to ``on_train_epoch_end``, which
Ultralytics fires before validation) and reports the median of the epochs after the first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


class EpochTimer:
    """Seconds and images of each epoch's batch loop (a plain object: picklable into DDP
    workers, where each rank times its own loop)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.epochs: list[tuple[float, int]] = []  # (seconds, images) per finished epoch
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: Any) -> None:
        self._start = self.clock()

    def on_train_epoch_end(self, trainer: Any) -> None:
        if self._start is None:
            return
        images = len(trainer.train_loader.dataset)
        self.epochs.append((self.clock() - self._start, images))
        self._start = None

    def attach(self, trainer: Any) -> None:
        trainer.add_callback("on_train_epoch_start", self.on_train_epoch_start)
        trainer.add_callback("on_train_epoch_end", self.on_train_epoch_end)

    def summary(self) -> dict[str, float]:
        """``train_loop_images_per_s``: the median epoch after the first (warm-up) one, or the
        only epoch; ``first_epoch_loop_s``: the first epoch's loop seconds.  Empty before an
        epoch has finished."""
        if not self.epochs:
            return {}
        steady = self.epochs[1:] or self.epochs
        rate = statistics.median(images / seconds for seconds, images in steady if seconds > 0)
        return {"train_loop_images_per_s": round(rate, 1),
                "first_epoch_loop_s": round(self.epochs[0][0], 2)}
