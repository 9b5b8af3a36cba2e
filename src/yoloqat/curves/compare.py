"""Names of a QAT run's val curves and the differences that answer the question.

One run logs several curves (named in :mod:`yoloqat.curves.keys`): ``val`` (the deployed model: EMA
when on, live when off), ``val_live``, ``val_ema``, ``val_bnre`` and the repair curves
``val_<model>_<repair>``.  The comparisons a reader wants are paired, on the same run:

* EMA minus live: what the averaging did to the same training trajectory;
* each repair minus the model it repairs (``val_ema_qc`` minus ``val_ema``: what QC would add
  to the EMA model at each epoch).

:func:`difference` takes two verdicts and returns their best, final and max-drawdown
differences (None where either lacks the number); :func:`difference_words` says it in one line,
e.g. ``EMA vs live: +0.0020 best, +0.0100 final, -0.050 max drawdown``.
"""

from __future__ import annotations

import math
from typing import Any

from yoloqat.config import REPAIR_CURVES
from yoloqat.curves.keys import (
    BNRE,
    EMA,
    LIVE,
    MODELS,
    PRIMARY,
    curve_name,
    logged_repairs,
    model_key,
    repair_prefix,
)
from yoloqat.curves.stability import Verdict

DIFFERENCE_FIELDS = ("best", "final", "max_drawdown")
MODEL_TITLES = {"live": "live", "ema": "EMA"}
REPAIR_TITLES = {"bnre": "BN re-est.", "qc": "QC", "bnre_qc": "BN re-est. + QC"}
# Every QAT curve a table has a row for, by its verdict prefix (``ema_qc`` -> ``ema_qc_label``)
# and the row's short name; the control (live) first, then EMA, then each repair of each model.
_ROW_REPAIRS = {"bnre": "BNre", "qc": "QC", "bnre_qc": "BNre+QC"}
CURVE_ROWS: tuple[tuple[str, str], ...] = (
    ("live", "live"), ("ema", "EMA"),
    *((repair_prefix(m, r), f"{MODEL_TITLES[m]}+{_ROW_REPAIRS[r]}") for r in REPAIR_CURVES for m in MODELS),
)


def repair_curves() -> list[tuple[str, str, str]]:
    """(model, repair, curve key) of every possible repair curve, live first, in REPAIR_CURVES order."""
    return logged_repairs(True, REPAIR_CURVES)


def curve_title(key: str, ema: bool | None = None) -> str:
    """A reader's name for a curve key: ``live``, ``EMA``, ``EMA + QC``, ...; the deployed curve
    (``val``) is named after its model when ``ema`` is known."""
    if key == LIVE:
        return "live"
    if key == EMA:
        return "EMA"
    if key == PRIMARY:
        return "deployed" if ema is None else f"deployed ({'EMA' if ema else 'live'})"
    if key == BNRE:
        # qat.bn_reestimate (its own batches, walking on through the training split): not the
        # bnre repair curve, which re-estimates on the same repair_bn_batches every epoch
        return "deployed + bn_reestimate" if ema is None else f"{'EMA' if ema else 'live'} + bn_reestimate"
    for model, repair, rkey in repair_curves():
        if key == rkey:
            return f"{MODEL_TITLES[model]} + {REPAIR_TITLES[repair]}"
    return curve_name(key)


def baseline_of(key: str) -> str | None:
    """The curve a curve is compared with: live for EMA, the repaired model for a repair."""
    if key == EMA:
        return LIVE
    for model, _repair, rkey in repair_curves():
        if key == rkey:
            return model_key(model)
    return None


def _value(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def difference(a: Verdict | dict[str, Any] | None,
               b: Verdict | dict[str, Any] | None) -> dict[str, float | None]:
    """``a`` minus ``b`` for best, final and max drawdown (None where either is missing)."""
    da = a.as_dict() if isinstance(a, Verdict) else (a or {})
    db = b.as_dict() if isinstance(b, Verdict) else (b or {})
    out: dict[str, float | None] = {}
    for f in DIFFERENCE_FIELDS:
        x, y = _value(da.get(f)), _value(db.get(f))
        out[f] = None if x is None or y is None else x - y
    return out


def difference_words(a_title: str, b_title: str, diff: dict[str, float | None]) -> str:
    """``EMA vs live: +0.0020 best, +0.0100 final, -0.050 max drawdown`` (``n/a`` where a
    number is missing)."""
    def f(key: str, spec: str) -> str:
        v = diff.get(key)
        return "n/a" if v is None else format(v, spec)

    return (f"{a_title} vs {b_title}: {f('best', '+.4f')} best, {f('final', '+.4f')} final, "
            f"{f('max_drawdown', '+.3f')} max drawdown")
