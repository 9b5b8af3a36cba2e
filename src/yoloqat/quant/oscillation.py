"""Track weight oscillations during QAT (Nagel et al. 2022, Sec. 4.1).

:class:`OscillationTracker` finds the quantized convs of a live model and updates their
oscillation state after optimizer steps: Nagel's per-weight statistics and the one engine that
computes them are in :mod:`yoloqat.quant.oscillation_state`, the fused per-bit-width groups (the
default on CUDA) in :mod:`yoloqat.quant.oscillation_fused`.  The summaries pool the layers'
statistics into the model-level ``osc/...`` keys.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from brevitas.nn import QuantConv2d
from torch import nn

from yoloqat.quant.convert import FastQuantConv2d, weight_scale
from yoloqat.quant.oscillation_fused import FusedOscillationGroup
from yoloqat.quant.oscillation_state import LayerOscillationState, OscillationGroup

SUMMARY_KEYS = (
    "osc/frac_oscillating",
    "osc/flip_rate",
    "osc/osc_rate",
    "osc/frac_near_boundary",
    "osc/scale_drift",
    "osc/mean_freq",
)

# Nagel's tracker momentum m (the EMA of oscillations): the QAT trainer's tracker uses it, and
# the freezing thresholds are judged against it (quant/freezing.py)
DEFAULT_MOMENTUM = 0.01

LAYER_COLUMNS = (
    "name",
    "bits",
    "weights",
    "frac_oscillating",
    "mean_freq",
    "flip_rate",
    "frac_near_boundary",
    "scale_drift",
)


def _fusable(m: nn.Module) -> bool:
    return isinstance(m, FastQuantConv2d) and m.weight.dtype == torch.float32


# -------------------------------------------------------------------------------------------
# model-level tracking


@torch.no_grad()
def latent_and_scale(q: QuantConv2d) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(w / s, s, bits)`` for one quantized conv, without autograd.

    FastQuantConv2d: the arithmetic of ``convert.fake_quant_maxabs`` (max-abs / int_max,
    clamped at 1e-10).  Any other QuantConv2d: Brevitas' own ``quant_weight()`` scale.
    """
    x, scale = _latent(q)
    return x, scale, _bits_of(q)


@torch.no_grad()
def _latent(q: QuantConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w / s, s)``, both fresh tensors; no host-device synchronisation."""
    scale = weight_scale(q)
    return q.weight.detach() / scale, scale


class OscillationTracker:
    """Oscillation statistics of every quantized conv of a live model.

    Call :meth:`step` after every optimizer step; it does work on every ``every``-th call
    (calls ``every``, ``2 * every``, ...).  The modules are held by reference, so pass the model
    that is really being optimized (with Ultralytics, ``trainer.model``, not the EMA copy).

    When the layers have more than one bit width (``first_last_bits`` != ``bits``), the summaries
    also give every key per bit width (``osc/frac_oscillating_w4``, ``..._w8``) and the headline
    keys count only the layers at ``headline_bits`` (default: the lowest width present).  Why:
    Nagel tracks the low-bit layers; an 8-bit layer barely oscillates, so pooling the first and
    last layers in would dilute the model-level figure.  With one bit width the keys are exactly
    :data:`SUMMARY_KEYS`.

    ``fused``: True tracks the float32 max-abs layers per bit width in flat buffers
    (:class:`FusedOscillationGroup`; the same statistics bit for bit, a fixed number of kernels
    per update); False keeps one :class:`LayerOscillationState` update per layer.  None (the
    default) fuses when the model is on CUDA, where per-layer updates are launch-bound; on CPU
    the per-layer path is faster (yolov10n, one thread: 18 ms vs 39 ms per update, measured),
    because the flat path copies every weight once more.  Learned-scale layers always take
    the per-layer path (their scale comes from Brevitas).
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = DEFAULT_MOMENTUM,
        threshold: float = 0.005,
        boundary: float = 0.05,
        every: int = 1,
        headline_bits: int | None = None,
        fused: bool | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.headline_bits = headline_bits
        self.calls = 0
        self.updates = 0
        self.layers: list[tuple[str, QuantConv2d, int, LayerOscillationState]] = []
        self.groups: list[FusedOscillationGroup] = []
        self._single: list[tuple[QuantConv2d, LayerOscillationState]] = []  # per-layer path
        members: dict[int, list[tuple[FastQuantConv2d, LayerOscillationState]]] = {}
        if fused is None:
            first = next((m.weight for m in model.modules() if isinstance(m, QuantConv2d)), None)
            fused = first is not None and first.is_cuda
        for name, m in model.named_modules():
            if isinstance(m, QuantConv2d):
                bits = _bits_of(m)
                int_max = 2 ** (bits - 1) - 1
                state = LayerOscillationState(int_max, momentum, threshold, boundary)
                if fused and _fusable(m):
                    members.setdefault(int_max, []).append((m, state))  # type: ignore[arg-type]
                else:
                    OscillationGroup([state], [m.weight.shape], int_max)  # a group of one
                    self._single.append((m, state))
                state.numel = m.weight.numel()
                self.layers.append((name, m, bits, state))
        for int_max, pairs in sorted(members.items()):
            self.groups.append(
                FusedOscillationGroup([m for m, _ in pairs], [st for _, st in pairs], int_max)
            )

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def step(self) -> bool:
        """Count one optimizer step; returns True when the states were updated."""
        self.calls += 1
        if self.calls % self.every:
            return False
        for group in self.groups:
            group.update()
        for m, state in self._single:
            state.update(*_latent(m))
        self.updates += 1
        return True

    def epoch_summary(self) -> dict[str, float]:
        """Model-level stats since the last call (resets the window), weighted by weights."""
        return self._by_bits([state.pop_stats() for _, _, _, state in self.layers])

    def summary(self) -> dict[str, float]:
        """Model-level stats of the latest state, rates averaged over the whole run."""
        return self._by_bits([state.run_stats() for _, _, _, state in self.layers])

    def _by_bits(self, stats: list[dict[str, float]]) -> dict[str, float]:
        widths = sorted({bits for _, _, bits, _ in self.layers})
        if len(widths) <= 1:
            return _aggregate(stats)
        headline = self.headline_bits if self.headline_bits in widths else widths[0]
        out = _aggregate(
            [s for s, (_, _, b, _) in zip(stats, self.layers, strict=True) if b == headline]
        )
        for width in widths:
            part = _aggregate(
                [s for s, (_, _, b, _) in zip(stats, self.layers, strict=True) if b == width]
            )
            out.update({f"{k}_w{width}": v for k, v in part.items()})
        return out

    def layer_table(self) -> list[dict[str, Any]]:
        rows = []
        for name, _, bits, state in self.layers:
            s = state.run_stats()
            rows.append(
                {
                    "name": name,
                    "bits": bits,
                    "weights": int(s["weights"]),
                    "frac_oscillating": s["frac_oscillating"],
                    "mean_freq": s["mean_freq"],
                    "flip_rate": s["flip_rate"],
                    "frac_near_boundary": s["frac_near_boundary"],
                    "scale_drift": s["scale_drift"],
                }
            )
        return rows

    def write_layer_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(LAYER_COLUMNS))
            writer.writeheader()
            writer.writerows(self.layer_table())
        return path


def _bits_of(m: QuantConv2d) -> int:
    if isinstance(m, FastQuantConv2d):
        return int(m.fast_bits)
    with torch.no_grad():
        return int(m.quant_weight().bit_width.item())


def _aggregate(stats: list[dict[str, float]]) -> dict[str, float]:
    """Weight-weighted means; rates weighted by weights x updates (i.e. pooled counts)."""
    out = dict.fromkeys(SUMMARY_KEYS, 0.0)
    w_total = sum(s["weights"] for s in stats)
    wu_total = sum(s["weights"] * s["updates"] for s in stats)
    if wu_total:
        for key, col in (("osc/flip_rate", "flip_rate"), ("osc/osc_rate", "osc_rate")):
            out[key] = sum(s[col] * s["weights"] * s["updates"] for s in stats) / wu_total
    if w_total:
        for key, col in (
            ("osc/frac_oscillating", "frac_oscillating"),
            ("osc/frac_near_boundary", "frac_near_boundary"),
            ("osc/mean_freq", "mean_freq"),
        ):
            out[key] = sum(s[col] * s["weights"] for s in stats) / w_total
        drift = [(s["scale_drift"], s["weights"]) for s in stats]
        drift = [(d, w) for d, w in drift if not math.isnan(d)]
        dw = sum(w for _, w in drift)
        out["osc/scale_drift"] = sum(d * w for d, w in drift) / dw if dw else 0.0
    return out
