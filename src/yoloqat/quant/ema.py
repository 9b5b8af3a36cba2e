"""EMA of the latent float weights (and learned quantizer scales) for QAT, or explicitly none.

Ultralytics' ``ModelEMA`` already averages every floating-point entry of the state_dict
(weights, BN statistics and, once materialized, Brevitas' learned scales) with
a(t) = decay * (1 - exp(-t / tau)), the ramp of Gupta & Asthana.  It is reused as is; the only
addition is an explicit "off" switch: Ultralytics always keeps an EMA and validates it, so
"EMA off" is an EMA with decay 0, whose copy equals the live weights after every step.
"""

from __future__ import annotations

import math

from torch import nn
from ultralytics.utils.torch_utils import ModelEMA


def ema_decay_at(step: int, decay: float, tau: float) -> float:
    """The decay Ultralytics' ModelEMA applies at optimizer step ``step`` (1-based)."""
    return decay * (1.0 - math.exp(-step / tau))


def averaging_window(step: int, decay: float, tau: float) -> float:
    """About how many recent steps the EMA averages at ``step``: 1 / (1 - a(step))."""
    d = ema_decay_at(step, decay, tau)
    return 1.0 / (1.0 - d) if d < 1.0 else float("inf")


def make_ema(model: nn.Module, enabled: bool, decay: float, tau: float) -> ModelEMA:
    """The trainer's EMA: the paper's averaging when enabled, a live-weight mirror when not."""
    if enabled:
        return ModelEMA(model, decay=decay, tau=tau)
    return ModelEMA(model, decay=0.0, tau=1.0)
